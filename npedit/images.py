"""Image I/O that survives odd inputs: EXIF rotation, RGBA, grayscale, 16-bit, huge or broken files."""

from __future__ import annotations

import errno
import mimetypes
import os
import re
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 64_000_000  # larger images are refused (decompression-bomb guard)
DEFAULT_MAX_SIDE = 1024  # the longest side a general editor edits at (the pipeline's max_side, edit --max-side)
# what Pillow's readers raise on a damaged file: not only OSError but a bare ValueError (a PNG header cut short, a
# text chunk that inflates past its limit, a PPM size that is no number) and, in some readers, these others
UNREADABLE = (OSError, ValueError, TypeError, SyntaxError, EOFError, IndexError, KeyError, struct.error,
              ZeroDivisionError, Image.DecompressionBombError)
UNSAFE_FORMATS = ("EPS",)  # Pillow's EPS reader runs Ghostscript, a PostScript interpreter, on the file


class ImageError(ValueError):
    """An input image that cannot be used; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF rotation and convert any mode to 8-bit RGB (alpha or a transparent colour key over white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raw = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):  # by the full 16-bit range, as an editor converts: 65535 -> 255
            lo, hi = 0.0, 65535.0
        elif lo >= 0:  # the smallest usual range that holds the values, so a flat or dim image keeps its level
            lo, hi = 0.0, next(top for top in (1.0, 255.0, 65535.0, hi) if hi <= top)
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(arr.round().astype(np.uint8), mode="L")
        key = img.info.get("transparency")
        if isinstance(key, (int, float)):  # a PNG tRNS key in the image's own (16-bit) values: alpha 0 there
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), mode="L")))
        img = grey
    if img.mode == "La":  # premultiplied grey + alpha: Pillow converts it to LA alone
        img = img.convert("LA")
    keyed = img.mode in ("P", "L", "RGB") and "transparency" in img.info  # one colour (or palette entries) see-through
    if img.mode in ("RGBA", "RGBa", "LA", "PA") or keyed:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def array_to_pil(array: np.ndarray | torch.Tensor) -> Image.Image:
    """One image as an array, in diffusers' layouts: numpy (H, W[, C]) uint8 or float in [0, 1], torch (C, H, W)
    (or (1, C, H, W)) likewise; C is 1, 3 or 4. Floats in [-1, 1] are read as such (diffusers accepts them too)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ImageError(f"a tensor image must be (C, H, W) with C = 1, 3 or 4, got shape {tuple(array.shape)}")
        array = (tensor if tensor.dtype == torch.uint8 else tensor.float()).permute(1, 2, 0).numpy()
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"an array image must be (H, W) or (H, W, C) with C = 1, 3 or 4, got shape {array.shape}")
    if not array.size:
        raise ImageError(f"empty image array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("the image array holds NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < -1 or hi > 1:
            raise ImageError(f"float images must lie in [0, 1] (or [-1, 1]); got values in [{lo:.3g}, {hi:.3g}]")
        if lo < 0:  # [-1, 1], as a VAE decodes; diffusers reads a tensor with negative values this way too
            array = (array + 1) / 2
        array = (array * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"array images must be uint8 or float in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def split_batch(image) -> list:
    """An image input as a list of single images: a list or tuple as it is, a 4-D numpy (B, H, W, C) or torch
    (B, C, H, W) batch split along B (a float batch, or list, with negative values read as [-1, 1] as a whole:
    `_as_unit_range`), anything else as one image."""
    if isinstance(image, (list, tuple)):
        return _as_unit_range(list(image))
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return _as_unit_range(list(image))
    return [image]


def _as_unit_range(images: list) -> list:
    """Float arrays or tensors of one batch read as one (as diffusers reads a batch): when any value is negative and
    all lie in [-1, 1], every one is mapped from [-1, 1] to [0, 1] (an image of the batch with no negative value, a
    bright one, was read as [0, 1] on its own, its pixels darkened); anything else as it is."""
    def floating(x) -> bool:
        if isinstance(x, torch.Tensor):
            return x.is_floating_point() and x.numel() > 0
        return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating) and x.size > 0

    if len(images) < 2 or not all(floating(x) for x in images):
        return images
    lo, hi = min(float(x.min()) for x in images), max(float(x.max()) for x in images)
    return [(x + 1) / 2 for x in images] if -1 <= lo < 0 and hi <= 1 else images


def load_image(source: str | os.PathLike | Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """Open a path, PIL image, numpy array or torch tensor (`array_to_pil`) as an RGB PIL image, or raise
    ImageError with the reason."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        source = array_to_pil(source)
    if isinstance(source, Image.Image):
        if source.width * source.height > MAX_PIXELS:
            raise ImageError(too_large_message("the image", f"{source.width}x{source.height}, "
                                                            f"{source.width * source.height:,} pixels"))
        if not source.width * source.height:
            raise ImageError(f"empty image ({source.width}x{source.height} pixels)")
        return to_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"an image must be a path, a PIL image, a numpy array or a torch tensor; got "
                         f"{type(source).__name__}")
    if not str(source).strip():
        raise ImageError("no image given (an empty path)")  # Path("") is the current folder
    path = Path(source)
    try:
        info = path.stat()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        if getattr(exc, "errno", None) in (None, errno.ENOENT, errno.ENOTDIR):
            raise ImageError(f"image not found: {path}") from None
        raise ImageError(f"cannot read {path}: {exc.strerror}") from None  # a name too long, a link loop, ...
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path} is a folder, not an image")
    if not stat.S_ISREG(info.st_mode):  # a pipe or a device would block or never end
        raise ImageError(f"{path} is not a regular file")
    if info.st_size == 0:
        raise ImageError(f"{path} is an empty file (0 bytes)")
    too_large = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS below is the guard here
            img = Image.open(path, formats=readable_formats())
        with img:
            if img.width * img.height > MAX_PIXELS:  # (said below: a readable file, not "cannot read")
                too_large = f"{img.width}x{img.height}, {img.width * img.height:,} pixels"
            else:
                img.load()
                return to_rgb(img)
    except Image.DecompressionBombError as exc:  # over Pillow's own limit, refused as it opens
        raise ImageError(bomb_message(str(path), exc)) from None
    except UNREADABLE as exc:
        raise ImageError(f"cannot read {path} as an image: {exc}{_no_reader_note(path)}") from None
    raise ImageError(too_large_message(str(path), too_large))


def bomb_message(name: str, exc: Exception) -> str:
    """`too_large_message` for an image Pillow refused to open as a decompression bomb (over twice its own limit):
    the size it gives, and the limit that refused it (ours, or Pillow's where a host lowered it below ours)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pillows = Image.MAX_IMAGE_PIXELS
    return too_large_message(name, f"{int(found[1]):,} pixels" if found else "too many pixels",
                             min(MAX_PIXELS, 2 * pillows) if pillows else MAX_PIXELS)


def too_large_message(name: str, size: str, limit: int | None = None) -> str:
    """The one message for an image over the limit (MAX_PIXELS, or `limit`), named `name`, of `size` (in words)."""
    return (f"{name} is too large: {size}, more than the {limit or MAX_PIXELS:,} an image may have here (decoding it "
            "would take gigabytes of memory); scale it down first")


def readable_formats() -> list[str]:
    """The formats load_image reads: every one Pillow (and its registered plugins) reads, less UNSAFE_FORMATS."""
    Image.init()
    return [f for f in Image.ID if f not in UNSAFE_FORMATS]


def _no_reader_note(path: Path) -> str:
    """A note for an image file whose extension no reader here claims (e.g. .heic without a HEIF plugin), else ''."""
    suffix = path.suffix.lower()
    claimed = {ext for ext, fmt in Image.registered_extensions().items() if fmt not in UNSAFE_FORMATS}
    if suffix in claimed or not (mimetypes.guess_type(path.name)[0] or "").startswith("image/"):
        return ""
    return f" (no reader for {suffix} files here: convert it to PNG or JPEG, or install a Pillow plugin for it)"


def fit_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover `size` (W, H) keeping the aspect ratio, then centre-crop."""
    return ImageOps.fit(img, size, method=Image.Resampling.BICUBIC)


def editable_size(width: int, height: int, multiple: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
    """The working size for an image: both sides multiples of `multiple`, nearest to the image scaled to fit
    `max_side`, never above it (one `multiple` at least, even where `max_side` is smaller); with `upscale`, a smaller
    image is scaled up to `max_side` too (an editor trained at one resolution)."""
    scale = max_side / max(width, height) if upscale else min(1.0, max_side / max(width, height))
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
