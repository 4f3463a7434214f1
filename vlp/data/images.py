"""Image decoding and transforms.

Transforms map a PIL image to the model's square input size as a PIL image; the loader
writes the pixels straight into its uint8 batch. Normalization (constants from the config)
happens once per batch, where the batch meets the model (on its device: the vision tower
normalizes uint8 input), so workers, the main process and the host-to-device copy all move
a quarter of the bytes of float32.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlp.config import DataConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_RESAMPLE = Image.Resampling.BICUBIC


class ImageTooLarge(ValueError):
    """The image would decode to more pixels than the budget allows; refused from its
    header, before any pixel is decoded."""


def decode_image(data: bytes, min_side: int, max_pixels: int | None = None) -> Image.Image:
    """Decode to RGB. JPEGs are decoded at a reduced DCT scale when the result stays at
    least `min_side` px on its short side: 2-8x faster, invisible after the downscale.

    `max_pixels` bounds the pixels actually decoded (after that reduction), checked from the
    header: a small PNG can declare 13000x13000 RGBA pixels, ~680 MB once decoded, and a
    few of those at once exhaust a server. Raises ImageTooLarge over the budget (also for
    images over PIL's own decompression-bomb limit) and ValueError for unreadable bytes."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"not a recognizable image ({len(data)} bytes)") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(str(err)) from None
    if img.format == "JPEG":
        w, h = img.size
        scale = max(min_side / min(w, h), 1e-6)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h / 1e6:.1f} MP to decode, over the "
                            f"{max_pixels / 1e6:g} MP budget")
    img.load()
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        # Transparent pixels carry arbitrary colors; show them as white, like a viewer would.
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return img


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def random_resized_box(w: int, h: int, scale: tuple[float, float], rng: random.Random,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): random area fraction in `scale`,
    random log-uniform aspect in `ratio`; after 10 misses, the largest centered box."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = rng.randint(0, w - cw)
            top = rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    return center_box(w, h)


def center_box(w: int, h: int) -> tuple[int, int, int, int]:
    """The centered square of side min(w, h): resize-shorter-side + center-crop in one box."""
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


class TrainTransform:
    """Random resized crop (+ horizontal flip only if `data.hflip`)."""

    def __init__(self, cfg: DataConfig):
        self.size = cfg.image_size
        self.scale = (cfg.crop_scale[0], cfg.crop_scale[1])
        self.hflip = cfg.hflip
        # Decode large enough that the smallest crop still has `size` px.
        self.min_side = math.ceil(self.size / math.sqrt(self.scale[0]))

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        box = random_resized_box(*img.size, self.scale, rng)
        img = img.resize((self.size, self.size), _RESAMPLE, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class EvalTransform:
    """Resize the shorter side to `image_size`, center crop."""

    def __init__(self, cfg: DataConfig):
        self.size = cfg.image_size
        self.min_side = self.size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        return img.resize((self.size, self.size), _RESAMPLE, box=center_box(*img.size))


class Normalize:
    """uint8 [..., 3, H, W] → float32, (x/255 - mean) / std with the config's constants, on
    the images' device (the same float32 operations on CPU and GPU, so the same values)."""

    def __init__(self, cfg: DataConfig):
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1) * 255.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.inv_std = self.mean.to(images.device), self.inv_std.to(images.device)
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        return out.copy_(images).sub_(self.mean).mul_(self.inv_std)


def eval_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalized float tensor [3, S, S]: what the model makes of an eval-loader image."""
    resize, normalize = EvalTransform(cfg), Normalize(cfg)

    def transform(img: Image.Image) -> torch.Tensor:
        return normalize(to_uint8_tensor(resize(img.convert("RGB"))))

    return transform


def load_image(path: str | Path, cfg: DataConfig) -> torch.Tensor:
    """One image file → normalized float tensor [3, S, S] (the eval transform).
    Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        img = decode_image(path.read_bytes(), cfg.image_size, cfg.max_image_pixels)
    except Exception as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    return eval_transform(cfg)(img)
