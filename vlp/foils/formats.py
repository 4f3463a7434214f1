"""Foil files: one test a line (jsonl) or a .json list / {id: record} mapping of them.

Each record names an image, its true caption and one or more foils (captions that share
most of its words and do not describe it); optionally foil images (images the caption does
not describe) and a `type` that the report groups by. Field names of the community's sets
are read as they are:

| format     | image        | true caption   | foils                    | type                  |
|------------|--------------|----------------|--------------------------|-----------------------|
| vlp        | `image`      | `caption`      | `foils` (list)           | `type`                |
| SugarCrepe | `filename`   | `caption`      | `negative_caption`       | `type`                |
| ARO        | `image_path` | `true_caption` | `false_caption`          | `type`, `relation_name` |
| Winoground | `image_0`    | `caption_0`    | `caption_1` (+ `image_1`) | `type`, `collapsed_tag` |

Foils may be one string or a list. `foil_images` (a list) adds the image side in any
format. A record without a type takes the file's stem (SugarCrepe reports per file).
ARO's `bbox_x/y/w/h` crop the image, as ARO's own loader does.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from vlp.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# (format, image field, caption field, foils field, type fields in order of preference)
FIELD_SETS = (
    ("vlp", "image", "caption", "foils", ("type",)),
    ("SugarCrepe", "filename", "caption", "negative_caption", ("type",)),
    ("ARO", "image_path", "true_caption", "false_caption", ("type", "relation_name")),
)
WINOGROUND_FIELDS = ("image_0", "image_1", "caption_0", "caption_1")
ARO_BOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


class FoilsError(ValueError):
    """A foil file that cannot be read; the message names the file, the line and the fault."""


@dataclass(frozen=True)
class FoilItem:
    """One test. Index 0 of `captions` / `images` is the true one.

    With one foil caption and one foil image the record is a Winoground pair: the foil
    caption describes the foil image."""
    where: str                       # "FILE:LINE" (or "FILE[id]") for messages
    images: tuple[str, ...]
    captions: tuple[str, ...]
    type: str
    box: Optional[tuple[float, float, float, float]] = None  # (left, top, right, bottom)

    @property
    def winoground(self) -> bool:
        return len(self.images) == 2 and len(self.captions) == 2


@dataclass
class FoilSet:
    path: Path
    items: list[FoilItem]
    root: Path                       # relative image paths resolve against it
    skipped: Counter = field(default_factory=Counter)

    def resolve(self, image: str) -> Path:
        """The image's file; a name without a suffix (Winoground's `ex_0_img_0`) may be
        any image extension."""
        path = Path(image).expanduser()
        path = path if path.is_absolute() else self.root / path
        if not path.suffix and not path.exists():
            for ext in IMAGE_EXTENSIONS:
                if path.with_suffix(f".{ext}").is_file():
                    return path.with_suffix(f".{ext}")
        return path


def read_foils(path: str | Path, images_root: str | Path | None = None) -> FoilSet:
    """Every record of the file as a FoilItem; a malformed one is a FoilsError naming it.
    A foil identical to its true caption cannot be failed or passed: that test is skipped,
    counted and logged. Relative image paths resolve against `images_root` (default: the
    file's folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FoilsError(f"foils file not found: {path}")
    root = Path(images_root).expanduser() if images_root else path.parent
    if images_root and not root.is_dir():
        raise FoilsError(f"images root is not a folder: {root}")
    foil_set = FoilSet(path, [], root)
    for where, record in _records(path):
        item = parse_record(record, where, default_type=path.stem)
        if item.captions[0] in item.captions[1:]:
            foil_set.skipped["foil_equals_caption"] += 1
            log.warning("%s: a foil is the true caption itself; skipped", where)
            continue
        foil_set.items.append(item)
    if not foil_set.items:
        raise FoilsError(f"{path} holds no foil test (skipped: {dict(foil_set.skipped) or 'none'})")
    return foil_set


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FoilsError(f"{path}: not valid JSON: {err}") from None
        if isinstance(data, dict):
            yield from ((f"{path}[{key!r}]", value) for key, value in data.items())
        elif isinstance(data, list):
            yield from ((f"{path}[{i}]", value) for i, value in enumerate(data))
        else:
            raise FoilsError(f"{path}: a .json foil file holds a list or an {{id: record}} object, "
                             f"not {type(data).__name__}")
        return
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise FoilsError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def parse_record(record: Any, where: str, default_type: str = "") -> FoilItem:
    if not isinstance(record, dict):
        raise FoilsError(f"{where}: a record is a JSON object, not {type(record).__name__}")
    if all(name in record for name in WINOGROUND_FIELDS):
        images = [_text(record, "image_0", where), _text(record, "image_1", where)]
        captions = [_text(record, "caption_0", where), _text(record, "caption_1", where)]
        type_fields: tuple[str, ...] = ("type", "collapsed_tag")
    else:
        for _, image_field, caption_field, foils_field, type_fields in FIELD_SETS:
            if image_field in record and caption_field in record:
                break
        else:
            raise FoilsError(f"{where}: no known field set; expected image/caption/foils, "
                             f"filename/caption/negative_caption, image_path/true_caption/"
                             f"false_caption or image_0/image_1/caption_0/caption_1; got "
                             f"{', '.join(sorted(record)) or 'no fields'}")
        images = [_text(record, image_field, where)]
        captions = [_text(record, caption_field, where), *_texts(record, foils_field, where)]
    images += _texts(record, "foil_images", where, required=False)
    kind = next((record[name] for name in type_fields if record.get(name) is not None), default_type)
    if not isinstance(kind, str):
        raise FoilsError(f"{where}: field 'type' must be a string, got {kind!r}")
    return FoilItem(where, tuple(images), tuple(captions), kind, _box(record, where))


def _text(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise FoilsError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _texts(record: dict, name: str, where: str, required: bool = True) -> list[str]:
    """A string or a non-empty list of strings (a list may be left out when not required)."""
    if name not in record and not required:
        return []
    value = record.get(name)
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or \
            not all(isinstance(v, str) and v.strip() for v in values):
        raise FoilsError(f"{where}: field {name!r} must be a non-empty string or a non-empty "
                         f"list of them, got {value!r}")
    return values


def _box(record: dict, where: str) -> Optional[tuple[float, float, float, float]]:
    if not all(name in record for name in ARO_BOX):
        return None
    x, y, w, h = (record[name] for name in ARO_BOX)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y, w, h)) \
            or w <= 0 or h <= 0:
        raise FoilsError(f"{where}: bbox_x/y/w/h must be numbers with w, h > 0, got {[x, y, w, h]}")
    return (x, y, x + w, y + h)
