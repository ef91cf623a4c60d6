"""Metrics to metrics.jsonl and TensorBoard, and sample grids as PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..files import write_atomic
from ..images import tensor_to_pil


class MetricsLogger:
    """Append one JSON line per logged step; mirror scalars to TensorBoard when available."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        """Write `metrics` (tensors or numbers) for `step`."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            row[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def rewind(self, step: int) -> None:
        """Drop what was logged after `step` (a resumed run logs those steps again): metrics.jsonl lines, and
        TensorBoard's events from its next write on."""
        if not self.enabled:
            return
        if self.path.is_file():
            # (a damaged line that is not UTF-8 is dropped as a torn one: it stopped the resume, naming no file)
            text = self.path.read_bytes().decode("utf-8", errors="replace")
            kept = [r for r in text.splitlines() if _step(r) is not None and _step(r) <= step]
            rewound = "".join(r + "\n" for r in kept)  # (a last row cut before its newline: the next row joins it)
            if rewound != text:  # rewritten whole or not at all: a run killed meanwhile keeps every row
                write_atomic(self.path, rewound)
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(self.tb.log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short (a run killed while writing it)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def fitting_prefix(word: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """How many characters of `word` (at least one) fit in `width` pixels in `font`."""
    # prefixes twice as long each time, then bisected: a few measures of about a line's length each, where measuring
    # every prefix of the whole word took 22 s for one caption of 1,000 characters without a space, per sample grid
    lo, hi = 1, 2  # word[:lo] is kept whatever its width; look for a word[:hi] too wide
    while hi < len(word) and font.getlength(word[:hi]) <= width:
        lo, hi = hi, hi * 2
    hi = min(hi, len(word))
    if font.getlength(word[:hi]) <= width:
        return hi
    while hi - lo > 1:  # word[:lo] fits (or is one character), word[:hi] does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if font.getlength(word[:mid]) <= width else (lo, mid)
    return lo


def wrap_text(text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """`text` split into lines no wider than `width` pixels in `font` (at spaces; a longer word is cut anywhere)."""
    lines, line = [], ""
    for word in text.split():
        # a word wider than the grid (a URL, a text without spaces): cut where it overflows
        while len(word) > 1 and (cut := fitting_prefix(word, width, font)) < len(word):
            lines += [line, word[:cut]] if line else [word[:cut]]
            line, word = "", word[cut:]
        joined = f"{line} {word}" if line else word
        if line and font.getlength(joined) > width:
            lines.append(line)
            joined = word
        line = joined
    return lines + [line] if line else lines


def image_grid(rows: list[list[torch.Tensor]], labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """Tile (3, H, W) tensors in [-1, 1] row by row, with an optional text label under each row (wrapped to fit)."""
    tiles = [[tensor_to_pil(x) for x in row] for row in rows]
    w, h = tiles[0][0].size
    w, h = w * scale, h * scale
    cols = max(len(r) for r in tiles)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    # every row gets the space of the longest label, so the rows stay on one pitch
    lines = [wrap_text(text, cols * w - 4, font) for text in labels] if labels else []
    label_h = line_h * max(1, max(map(len, lines))) if labels else 0
    grid = Image.new("RGB", (cols * w, len(tiles) * (h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(tile.resize((w, h), Image.Resampling.NEAREST), (j * w, i * (h + label_h)))
        for k, line in enumerate(lines[i] if labels else []):
            draw.text((2, i * (h + label_h) + h + k * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def sample_grid(references: torch.Tensor, edits: torch.Tensor, instructions: list[str]) -> Image.Image:
    """A run's samples/step_N.png: reference | edit per row, its instruction below; tiles of >= 128 px."""
    rows = [[r, e] for r, e in zip(references, edits)]  # each (3, H, W) in [-1, 1]
    return image_grid(rows, list(instructions), scale=max(1, 128 // rows[0][0].shape[-1]))
