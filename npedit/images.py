"""Image I/O that survives odd inputs: EXIF rotation, RGBA, grayscale, 16-bit, huge or broken files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # larger images are refused (decompression-bomb guard)


class ImageError(ValueError):
    """An input image that cannot be used; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF rotation and convert any mode (RGBA over white, L, P, I;16, F, CMYK) to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):  # by the full 16-bit range, as an editor converts: 65535 -> 255
            lo, hi = 0.0, 65535.0
        elif lo >= 0:  # the smallest usual range that holds the values, so a flat or dim image keeps its level
            lo, hi = 0.0, next(top for top in (1.0, 255.0, 65535.0, hi) if hi <= top)
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """Open a path, PIL image or uint8 array as an RGB PIL image, or raise ImageError with the reason."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ImageError(f"array images must be uint8, got {source.dtype}")
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        if source.width * source.height > MAX_PIXELS:
            raise ImageError(f"image of {source.width}x{source.height} is larger than {MAX_PIXELS:,} pixels")
        return to_rgb(source)
    path = Path(source)
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image")
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS below is the guard here
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{path} is {img.width}x{img.height}, larger than {MAX_PIXELS:,} pixels")
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageError(f"cannot read {path} as an image: {exc}") from None


def fit_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover `size` (W, H) keeping the aspect ratio, then centre-crop."""
    return ImageOps.fit(img, size, method=Image.Resampling.BICUBIC)


def editable_size(width: int, height: int, multiple: int, max_side: int) -> tuple[int, int]:
    """The working size for an image: both sides multiples of `multiple`, nearest to the image scaled to fit
    `max_side`, never above it (one `multiple` at least, even where `max_side` is smaller)."""
    scale = min(1.0, max_side / max(width, height))
    most = max(1, max_side // multiple)

    def side(x: int) -> int:
        return min(max(1, int(round(x * scale / multiple))), most) * multiple

    return side(width), side(height)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
