"""The Shapes world (spec/shapes-world.md): palette, scenes, rendering, captions and parsing.

Cell regions for parsing: every pixel belongs to the cell whose centre is nearest on each axis,
i.e. the 3 x 3 partition of the canvas with boundaries between 21/22 and 42/43 (no ties occur).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

CANVAS = 64
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "sky": (140, 190, 235),
    "sand": (220, 200, 150),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (145, 65, 185),
    "orange": (240, 135, 35),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 5, "large": 9}  # name -> radius r
GRID = (11, 32, 53)  # cell centres on each axis
CELLS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # reading order: top row first, left to right
CELL_CENTRES: dict[str, tuple[int, int]] = {
    name: (GRID[i % 3], GRID[i // 3]) for i, name in enumerate(CELLS)
}  # name -> (cx, cy)
MAX_OBJECTS = 3
MIN_IOU = 0.5
CLEAN_DISTANCE = 40

# All 11 palette colours, backgrounds first; a quantised label indexes this list.
PALETTE_NAMES = tuple(BACKGROUNDS) + tuple(COLOURS)
_PALETTE = np.array([*BACKGROUNDS.values(), *COLOURS.values()], dtype=np.float64)  # (11, 3)
_N_BACKGROUNDS = len(BACKGROUNDS)
# (shape, size) pairs in template order; ties in parsing go to the earlier one.
TEMPLATE_KEYS = tuple((shape, size) for shape in SHAPES for size in SIZES)


def _check_name(kind: str, value: object, allowed: Sequence[str]) -> None:
    """Raise a ValueError listing the allowed names when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class Obj:
    """One object: a shape of a colour and size sitting in a grid cell."""

    shape: str
    colour: str
    size: str
    cell: str

    def __post_init__(self):
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, tuple(COLOURS))
        _check_name("size", self.size, tuple(SIZES))
        _check_name("cell", self.cell, CELLS)

    @property
    def name(self) -> str:
        """`{colour} {shape}`, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background and 1 to 3 objects, at most one per cell, stored in reading order."""

    background: str
    objects: tuple[Obj, ...]

    def __post_init__(self):
        _check_name("background", self.background, tuple(BACKGROUNDS))
        objects = tuple(self.objects)
        if not all(isinstance(o, Obj) for o in objects):
            raise TypeError(f"objects must be Obj instances, got {objects!r}")
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(objects)}")
        if len({o.cell for o in objects}) != len(objects):
            raise ValueError(f"at most one object per cell, got cells {[o.cell for o in objects]}")
        # Canonical order makes scenes equal whatever order the objects were given in.
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: CELLS.index(o.cell))))

    def at(self, cell: str) -> Obj | None:
        """The object in `cell`, or None when the cell is empty."""
        return next((o for o in self.objects if o.cell == cell), None)

    @property
    def empty_cells(self) -> tuple[str, ...]:
        """The cells without an object, in reading order."""
        return tuple(c for c in CELLS if self.at(c) is None)


_RASTERS = {
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    "square": lambda dx, dy, r: (np.abs(dx) <= r - 1) & (np.abs(dy) <= r - 1),
    "triangle": lambda dx, dy, r: (dy >= -r) & (dy <= r) & (2 * np.abs(dx) <= dy + r),
}  # dx = x - cx, dy = y - cy; the triangle's apex points up


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: str, cell: str) -> np.ndarray:
    """Read-only boolean (64, 64) mask of one object, per the spec's rasterisation inequalities."""
    cx, cy = CELL_CENTRES[cell]
    y, x = np.mgrid[0:CANVAS, 0:CANVAS]  # row, column
    mask = _RASTERS[shape](x - cx, y - cy, SIZES[size])
    mask.setflags(write=False)
    return mask


def _cell_index_map() -> np.ndarray:
    """(64, 64) index into CELLS of the cell each pixel belongs to (nearest centre per axis)."""
    nearest = np.abs(np.arange(CANVAS)[:, None] - np.array(GRID)[None, :]).argmin(1)  # (64,)
    return nearest[:, None] * 3 + nearest[None, :]


_CELL_INDEX = _cell_index_map().ravel()  # (4096,)
_CELL_REGIONS = _CELL_INDEX[None, :] == np.arange(len(CELLS))[:, None]  # (9, 4096)
_TEMPLATES = np.stack(
    [np.stack([shape_mask(s, z, c).ravel() for s, z in TEMPLATE_KEYS]) for c in CELLS]
).astype(np.float32)  # (9, 6, 4096)
_TEMPLATE_AREAS = _TEMPLATES.sum(-1)  # (9, 6)
_BORDER = np.ones((CANVAS, CANVAS), dtype=bool)
_BORDER[1:-1, 1:-1] = False


def cell_token(cell: str, grid: int) -> int:
    """Index of the patch token (row-major over grid x grid patches of the canvas) under the cell's centre pixel."""
    x, y = CELL_CENTRES[cell]
    size = CANVAS // grid
    return (y // size) * grid + x // size


def render(scene: Scene) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 image: background, then each object's mask filled."""
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        canvas[shape_mask(o.shape, o.size, o.cell)] = COLOURS[o.colour]
    return canvas


def caption(scene: Scene) -> str:
    """Coarse caption: `a {colour} {shape}` per object in reading order, then the background."""
    objects = ", ".join(f"a {o.colour} {o.shape}" for o in scene.objects)
    return f"{objects} on a {scene.background} background"


# The spec's referring expressions, in the order they are tried: `the {shape}`, `the {colour} {shape}`,
# `the {shape} at the {cell}`.
REFERENCE_FORMS = ("shape", "colour shape", "shape cell")


def referring_form(scene: Scene, obj: Obj) -> str:
    """Which form names `obj` first uniquely: "shape", "colour shape" or "shape cell" (`REFERENCE_FORMS`)."""
    if obj not in scene.objects:
        raise ValueError(f"{obj!r} is not in the scene")
    for form, key in (("shape", lambda o: o.shape), ("colour shape", lambda o: (o.colour, o.shape))):
        if sum(key(o) == key(obj) for o in scene.objects) == 1:
            return form
    return "shape cell"


def referring_expression(scene: Scene, obj: Obj) -> str:
    """Shortest unique name of `obj`: `the {shape}`, `the {colour} {shape}`, `the {shape} at the {cell}`."""
    return {"shape": f"the {obj.shape}", "colour shape": f"the {obj.colour} {obj.shape}",
            "shape cell": f"the {obj.shape} at the {obj.cell}"}[referring_form(scene, obj)]


def pick(rng: np.random.Generator, options: Sequence):
    """One element of `options`, uniformly."""
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def random_object(rng: np.random.Generator, cell: str) -> Obj:
    """An object with uniform shape, colour and size in `cell`."""
    return Obj(pick(rng, SHAPES), pick(rng, COLOURS), pick(rng, SIZES), cell)


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A uniform random scene; `n_objects` defaults to uniform over 1..3, cells drawn without replacement."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n}")
    cells = rng.choice(len(CELLS), size=n, replace=False)
    objects = tuple(random_object(rng, CELLS[i]) for i in cells)
    return Scene(pick(rng, BACKGROUNDS), objects)


def _as_rgb(image) -> np.ndarray:
    """The image as a uint8 (H, W, 3) array, or a ValueError saying what was wrong."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image with values 0..255, got dtype {array.dtype}")
    return array


def _palette_sq_distances(image: np.ndarray) -> np.ndarray:
    """Squared RGB distance of every pixel to every palette colour, (H, W, 11), exact in float64."""
    pixels = image.astype(np.float64)  # (H, W, 3)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: one small matmul instead of an (H, W, 11, 3) tensor.
    return (pixels**2).sum(-1, keepdims=True) - 2 * pixels @ _PALETTE.T + (_PALETTE**2).sum(-1)


def quantise(image) -> np.ndarray:
    """Index into PALETTE_NAMES of each pixel's nearest palette colour (Euclidean RGB), (H, W)."""
    return _palette_sq_distances(_as_rgb(image)).argmin(-1)


def clean_fraction(image) -> float:
    """Share of pixels within RGB distance 40 (inclusive) of some palette colour."""
    near = _palette_sq_distances(_as_rgb(image)).min(-1) <= CLEAN_DISTANCE**2
    return float(near.mean())


def _parse_background(labels: np.ndarray) -> str | None:
    """Most common background colour among border pixels (ties: palette order), or None."""
    counts = np.bincount(labels[_BORDER], minlength=len(PALETTE_NAMES))[:_N_BACKGROUNDS]
    return PALETTE_NAMES[int(counts.argmax())] if counts.max() > 0 else None


def _parse_objects(labels: np.ndarray) -> tuple[Obj, ...]:
    """Per cell: dominant object colour's mask, best shape/size template by IoU if IoU >= 0.5."""
    flat = labels.ravel()  # (4096,)
    counts = np.bincount(_CELL_INDEX * len(PALETTE_NAMES) + flat, minlength=len(CELLS) * len(PALETTE_NAMES))
    object_counts = counts.reshape(len(CELLS), len(PALETTE_NAMES))[:, _N_BACKGROUNDS:]  # (9, 6)
    dominant = object_counts.argmax(1) + _N_BACKGROUNDS  # (9,) palette label per cell
    masks = (flat[None, :] == dominant[:, None]) & _CELL_REGIONS  # (9, 4096); empty if no object pixels
    inter = (_TEMPLATES @ masks[..., None].astype(np.float32))[..., 0]  # (9, 6)
    iou = inter / (_TEMPLATE_AREAS + masks.sum(1, keepdims=True) - inter)
    best = iou.argmax(1)  # (9,)
    objects = []
    for c, cell in enumerate(CELLS):
        if iou[c, best[c]] >= MIN_IOU:
            shape, size = TEMPLATE_KEYS[best[c]]
            objects.append(Obj(shape, PALETTE_NAMES[dominant[c]], size, cell))
    return tuple(objects)


def parse(image) -> Scene | None:
    """Parse a (64, 64, 3) uint8 image back into a scene per the spec's scoring rule; None if no valid scene."""
    array = _as_rgb(image)
    if array.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"parse expects a ({CANVAS}, {CANVAS}, 3) image, got shape {array.shape}")
    labels = quantise(array)
    background = _parse_background(labels)
    objects = _parse_objects(labels)
    if background is None or not 1 <= len(objects) <= MAX_OBJECTS:
        return None
    return Scene(background, objects)


def scene_to_dict(scene: Scene) -> dict:
    """JSON-ready dict: {"background", "objects": [{"shape", "colour", "size", "cell"}, ...]}."""
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": o.cell} for o in scene.objects]
    return {"background": scene.background, "objects": objects}


def scene_from_dict(data: dict) -> Scene:
    """Inverse of scene_to_dict."""
    return Scene(data["background"], tuple(Obj(**o) for o in data["objects"]))
