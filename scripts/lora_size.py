"""How large a LoRA run's adapters are for a real transformer, without its weights (prints computed figures).

Builds the transformer on the meta device (no memory, no download) from a `transformer/config.json` or from the
class's default config (Z-Image: the 6B model; SD3: 18 blocks, 0.86B parameters), wraps the layers that
`model.lora_targets` would choose, and prints the transformer's size in bfloat16 and per rank: layers wrapped, adapter
parameters and the size of `npedit export --adapters`'s LoRA file (float32, as it writes).

    python scripts/lora_size.py --family zimage --ranks 16 64 128
    python scripts/lora_size.py --config path/to/model/transformer/config.json --ranks 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CLASSES = {"zimage": "ZImageTransformer2DModel", "sd3": "SD3Transformer2DModel"}


def build(family: str | None, config: str | None):
    """The transformer on the meta device, from `config` (its `_class_name` picks the class) or the family's
    default config."""
    import diffusers
    import torch

    if config:
        from npedit.backbones import sd3

        path = Path(config)
        if path.is_dir():  # a model folder, where its transformer/config.json was meant
            path = path / "transformer" / "config.json" if (path / "transformer").is_dir() else path / "config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SystemExit(f"error: --config {config}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise SystemExit(f"error: --config {config}: not a JSON config ({exc})") from None
        if not isinstance(data, dict):
            raise SystemExit(f"error: --config {config}: not a JSON config (a JSON object of settings)")
        name = data.get("_class_name", "")
        cls = getattr(diffusers, name, None) or getattr(sd3, name, None)  # our SD3 student class too
        if cls is None:
            raise SystemExit(f"error: {config} names no diffusers class ({data.get('_class_name')!r})")
        with torch.device("meta"):
            return cls.from_config(data)
    with torch.device("meta"):
        return getattr(diffusers, CLASSES[family])()


def sizes(model, ranks: list[int], targets: tuple[str, ...]) -> list[dict]:
    """Per rank: layers wrapped, adapter parameters, their float32 bytes (a copy of `model` is wrapped per rank)."""
    import copy

    from npedit import lora

    rows = []
    for rank in ranks:
        net = copy.deepcopy(model)
        wrapped = lora.add_lora(net, rank, targets=targets)
        count = sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)
        rows.append({"rank": rank, "layers": len(wrapped), "parameters": count, "float32_bytes": 4 * count})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", choices=sorted(CLASSES), help="the class's default config")
    src.add_argument("--config", help="a transformer config.json (e.g. BASE/transformer/config.json)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--targets", nargs="*", default=[], help="model.lora_targets (default: attention and feed-forward)")
    args = p.parse_args(argv)
    if min(args.ranks) < 1:
        p.error(f"--ranks must each be >= 1, got {min(args.ranks)}")
    model = build(args.family, args.config)
    total = sum(p.numel() for p in model.parameters())
    size = 2 * total / 2**20
    print(f"{type(model).__name__}: {total:,} parameters, "
          f"{f'{size / 1024:.2f} GiB' if size >= 1024 else f'{size:.1f} MiB'} in bfloat16")
    print("| rank | layers | adapter parameters | LoRA file (float32) |")
    print("|---|---|---|---|")
    for row in sizes(model, args.ranks, tuple(args.targets)):
        print(f"| {row['rank']} | {row['layers']} | {row['parameters']:,} | {row['float32_bytes'] / 2**20:,.1f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
