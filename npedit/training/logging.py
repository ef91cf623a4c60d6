"""Metrics to metrics.jsonl and TensorBoard, and sample grids as PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

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
        with self.path.open("a") as f:
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
            rows = self.path.read_text().splitlines(keepends=True)
            kept = [r for r in rows if _step(r) is not None and _step(r) <= step]
            if len(kept) < len(rows):
                self.path.write_text("".join(kept))
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


def image_grid(rows: list[list[torch.Tensor]], labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """Tile (3, H, W) tensors in [-1, 1] row by row, with an optional text label under each row."""
    tiles = [[tensor_to_pil(x) for x in row] for row in rows]
    w, h = tiles[0][0].size
    w, h = w * scale, h * scale
    label_h = 12 if labels else 0
    cols = max(len(r) for r in tiles)
    grid = Image.new("RGB", (cols * w, len(tiles) * (h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(tile.resize((w, h), Image.Resampling.NEAREST), (j * w, i * (h + label_h)))
        if labels:
            draw.text((2, i * (h + label_h) + h), labels[i][: cols * w // 6], fill=(0, 0, 0))
    return grid
