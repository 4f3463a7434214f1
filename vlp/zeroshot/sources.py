"""Where the images come from: an ImageFolder tree, labelled shards, a folder, files.

Every source yields `(key, label, image)` with a decoded RGB PIL image; `label` is None
when the source carries none (then only predictions are made). Unreadable images are
counted in `source.skipped` by reason and logged, never silently dropped.
"""
from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from vlp.data.images import ImageTooLarge, decode_image
from vlp.data.sources import known_sample_count
from vlp.zeroshot.errors import ZeroShotError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_LOGGED_SKIPS = 20


class ImageSource:
    """Base: subclasses list their items; decoding and skip counting live here."""
    kind = "files"
    labelled = False

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        # JPEGs decode at a reduced scale down to this short side (the model's input size).
        self.min_side = 224
        # Pixel budget per image (the model config's data.max_image_pixels); 0: none.
        self.max_pixels = 40_000_000

    def expected_count(self) -> int | None:
        """Images the source will yield before skips; None when unknown (shards whose
        count neither sizes.json nor img2dataset's stats give)."""
        return None

    def __iter__(self) -> Iterator[tuple[str, str | None, Image.Image]]:
        raise NotImplementedError

    def skip(self, reason: str, key: str, detail: object = "") -> None:
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= _LOGGED_SKIPS:
            log.warning("skipped %s (%s) %s", key, reason, detail)

    def decode(self, key: str, data: bytes | Path) -> Image.Image | None:
        try:
            # The training decoder, so transparency is flattened the same way.
            return decode_image(data.read_bytes() if isinstance(data, Path) else data,
                                self.min_side, self.max_pixels)
        except ImageTooLarge as err:
            self.skip("image too large", key, err)
        except Exception as err:  # PIL raises many types for bad files
            self.skip("unreadable image", key, err)
        return None


class FileListSource(ImageSource):
    """Explicit image paths, with optional labels (ImageFolder) or none."""

    def __init__(self, items: list[tuple[Path, str | None]], kind: str) -> None:
        super().__init__()
        self.items = items
        self.kind = kind
        self.labelled = kind == "imagefolder"

    def expected_count(self) -> int:
        return len(self.items)

    def __iter__(self):
        for path, label in self.items:
            image = self.decode(str(path), path)
            if image is not None:
                yield str(path), label, image


class ShardSource(ImageSource):
    """WebDataset tar shards; the label is a field of each sample's json."""
    kind = "shards"

    def __init__(self, urls: list[str], label_field: str | None) -> None:
        super().__init__()
        self.urls = urls
        self.label_field = label_field
        self.labelled = label_field is not None
        self.size = known_sample_count(urls)

    def expected_count(self) -> int | None:
        return self.size

    def __iter__(self):
        import webdataset as wds

        def on_error(err: Exception) -> bool:
            self.skip("unreadable shard member", "shard", err)
            return True

        dataset = wds.WebDataset(self.urls, shardshuffle=False, handler=on_error,
                                 empty_check=False)
        for sample in dataset:
            key = sample.get("__key__", "?")
            data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
            if data is None:
                self.skip("no image member", key)
                continue
            label = self._label(sample, key)
            if label is _MISSING:
                continue
            image = self.decode(key, data)
            if image is not None:
                yield key, label, image

    def _label(self, sample: dict, key: str):
        if self.label_field is None:
            return None
        try:
            meta = json.loads(sample["json"])
            value = meta[self.label_field]
        except KeyError:
            self.skip(f"no '{self.label_field}' in json", key)
            return _MISSING
        except (ValueError, TypeError) as err:
            self.skip("unreadable json", key, err)
            return _MISSING
        return str(value)


_MISSING = object()


def open_source(specs: list[str], label_field: str | None = None) -> ImageSource:
    """Pick the source type from what `specs` points at (see module docstring)."""
    if not specs:
        raise ZeroShotError("no images given")
    if all(_looks_like_shards(s) for s in specs):  # also an unquoted glob the shell expanded
        return ShardSource([url for s in specs for url in _expand_shards(s)], label_field)
    if len(specs) > 1:
        return FileListSource([(_existing_file(s), None) for s in specs], "files")
    spec = specs[0]
    if label_field is not None:
        raise ZeroShotError(f"--label-field applies to shards (*.tar), not to {spec}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return FileListSource([(path, None)], "single")
    if path.is_file():  # a text file listing image paths, one a line
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        base = path.parent
        return FileListSource(
            [(_existing_file(str(base / ln)), None) for ln in lines if ln], "files")
    raise ZeroShotError(f"images not found: {spec}")


def _folder_source(root: Path) -> ImageSource:
    top_images = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top_images or not class_dirs:
        if not top_images:
            raise ZeroShotError(f"no images in {root}")
        return FileListSource([(p, None) for p in top_images], "folder")
    items = [(p, d.name) for d in class_dirs for p in sorted(d.rglob("*")) if _is_image(p)]
    if not items:
        raise ZeroShotError(f"no images in the class folders of {root}")
    return FileListSource(items, "imagefolder")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _existing_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ZeroShotError(f"image file not found: {spec}")
    return path


def _looks_like_shards(spec: str) -> bool:
    return spec.endswith(".tar") or (".tar" in spec and any(c in spec for c in "*?{["))


def _expand_shards(spec: str) -> list[str]:
    import braceexpand

    urls = []
    for pattern in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        urls.extend(matches)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing or not urls:
        raise ZeroShotError(f"shards not found: {missing[:5] or spec}")
    return urls


def source_batches(source: ImageSource, transform, batch_size: int):
    """(keys, labels, images [B,3,H,W]) from a source, decoding errors already counted."""
    keys, labels, images = [], [], []
    for key, label, image in source:
        keys.append(key)
        labels.append(label)
        images.append(transform(image))
        if len(keys) == batch_size:
            yield keys, labels, torch.stack(images)
            keys, labels, images = [], [], []
    if keys:
        yield keys, labels, torch.stack(images)
