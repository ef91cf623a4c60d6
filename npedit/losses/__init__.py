"""Losses as pure functions on tensors; each returns (loss, dict of detached metrics)."""

from .dmd import dmd_loss
from .do_nothing import do_nothing_loss
from .flow_matching import flow_matching_loss
from .target import target_loss
from .vlm import vlm_loss

__all__ = ["dmd_loss", "do_nothing_loss", "flow_matching_loss", "target_loss", "vlm_loss"]
