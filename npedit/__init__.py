"""NP-Edit: instruction-based image editing trained without before/after pairs."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "NPEditPipeline": "npedit.pipeline",
    "NPEditSD3Transformer2DModel": "npedit.backbones.sd3",
    "NPEditZImageTransformer2DModel": "npedit.backbones.zimage",
}


def __getattr__(name):
    # Lazy so that `import npedit` stays light; diffusers resolves model_index.json classes through here.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'npedit' has no attribute {name!r}")
