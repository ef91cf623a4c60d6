"""Pick the training dataset named by `data.train`: a cases.jsonl or .csv manifest or a generated domain."""

from __future__ import annotations

import importlib

import torch
from torch.utils.data import Dataset, Sampler

from ..config import DataConfig
from ..data import EditDataset, load_manifest, subset

# Generated domains: name -> "module:factory"; factory(data_cfg, stage=..., seed=...) -> Dataset.
GENERATED = {"shapes": "npedit.shapes.training:training_dataset"}


def build_dataset(cfg: DataConfig, *, stage: str, seed: int, targets: bool = False) -> Dataset:
    """The dataset for `stage`; "sft", or `targets`, needs target images (generated domains always have them)."""
    if cfg.train in GENERATED:
        module, name = GENERATED[cfg.train].split(":")
        return getattr(importlib.import_module(module), name)(cfg, stage=stage, seed=seed)
    if cfg.pool:
        raise ValueError(f"data.pool={cfg.pool} sizes a generated domain ({', '.join(GENERATED)}); "
                         f"a manifest ({cfg.train}) has its own cases: use data.fraction to take a share of them")
    if cfg.min_objects:
        raise ValueError(f"data.min_objects={cfg.min_objects} filters a generated domain ({', '.join(GENERATED)}); "
                         f"a manifest ({cfg.train}) has its own cases")
    if cfg.categories or cfg.forms or cfg.filter_share < 1:
        raise ValueError(f"data.categories, data.forms and data.filter_share filter a generated domain "
                         f"({', '.join(GENERATED)}); a manifest ({cfg.train}) has its own cases: write one with just "
                         "the cases you want")
    if cfg.exclude_held_out:
        raise ValueError(f"data.exclude_held_out={list(cfg.exclude_held_out)} filters a generated domain "
                         f"({', '.join(GENERATED)}); a manifest ({cfg.train}) has its own cases")
    records = subset(load_manifest(cfg.train, allow_outside_paths=cfg.allow_outside_paths), cfg.fraction, seed)
    return EditDataset(records, cfg.resolution, need_target=stage == "sft" or targets)


class EpochSampler(Sampler[int]):
    """A shuffled order that is a function of (seed, epoch) alone, so a resumed run draws exactly the samples the
    uninterrupted run would have: `start(epoch, skip)` begins `skip` samples into `epoch`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start(self, epoch: int, skip: int) -> None:
        """Resume at sample `skip` of `epoch`'s order (for this epoch only)."""
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()

    def __iter__(self):
        order = self.order(self.epoch)[self.skip:]
        self.skip = 0
        return iter(order)

    def __len__(self) -> int:
        return self.n - self.skip
