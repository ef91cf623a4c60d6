"""Low-rank adapters (LoRA) for the student and the critic: train r x (in + out) numbers per linear layer, not all.

`add_lora` wraps the chosen `nn.Linear` layers of a transformer in `LoRALinear`: y = W x + b + (alpha / r) U D x,
with W, b frozen, D (r x in) random and U (out x r) zero, so the wrapped network computes exactly what it did.
Everything else is frozen too, except the parameters the caller names (the student's own additions, which the
base model does not have: its reference embedding, a reference encoder). `share_weights` points a wrapped
network's frozen tensors (parameters and buffers) at another network's equal ones, so the teacher, the critic and a
student built from the teacher hold one copy of the base weights between them.

What leaves a run is always a plain network: `merged_copy` folds each adapter into its layer (W + (alpha / r) U D),
so pipelines, checkpoints' `student/` and `critic/` folders and exports load as before; the adapters themselves
(`adapter_state`, all trainable tensors) are what a LoRA run resumes from.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Path components under which every linear layer gets an adapter by default: the attention and feed-forward
# blocks of the SD3 (attn, ff, ff_context) and Z-Image (attention, feed_forward) transformers.
DEFAULT_TARGETS = ("attn", "attn2", "ff", "ff_context", "attention", "feed_forward")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update that starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = base.weight.device
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that reads a layer's weight (dtype, device) still finds the base's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (self.scale * delta).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) U D, in float32."""
        return self.base.weight.float() + self.scale * (self.lora_up.weight.float() @ self.lora_down.weight.float())


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    """Whether the layer `name` is chosen: a target equal to it, ending it after a dot, or one of its path
    components."""
    parts = name.split(".")
    return any(name == t or name.endswith("." + t) or t in parts for t in targets)


def targeted_layers(model: nn.Module, targets: tuple[str, ...] = ()) -> list[str]:
    """The names of the linear layers of `model` that `targets` (default `DEFAULT_TARGETS`) choose for adapters; a
    target list that names none is an error listing the layers there are."""
    targets = tuple(targets) or DEFAULT_TARGETS
    chosen = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name
              and not name.endswith((".lora_down", ".lora_up")) and _targeted(name, targets)]
    if not chosen:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"model.lora_targets {list(targets)} names no linear layer of {type(model).__name__} "
                         f"(its linear layers end in: {', '.join(linear[:20])})")
    return chosen


def adapter_elements(model: nn.Module, rank: int, targets: tuple[str, ...] = ()) -> int:
    """Elements of the adapters `add_lora(model, rank, targets=targets)` would add: r x (in + out) per layer."""
    layers = [model.get_submodule(name) for name in targeted_layers(model, targets)]
    return rank * sum(layer.in_features + layer.out_features for layer in layers)


def add_lora(model: nn.Module, rank: int, alpha: float = 0.0, targets: tuple[str, ...] = (),
             train: tuple[str, ...] = ()) -> list[str]:
    """Wrap the linear layers of `model` that `targets` name (default `DEFAULT_TARGETS`) in `LoRALinear` of this
    rank (alpha 0: alpha = rank, a scale of 1), freeze every other parameter except those named in `train`, and
    return the names of the wrapped layers. A target list that names no linear layer is an error."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    chosen = targeted_layers(model, targets)
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, float(alpha or rank)))
    params = dict(model.named_parameters())
    for name in train:
        params[name].data = params[name].data.float()
        params[name].requires_grad_(True)
    return chosen


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a LoRA-wrapped model (the adapters and the parameters trained in full), by name."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `adapter_state`: the names must be exactly the model's trainable ones."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"the saved adapters do not fit this run's LoRA setup (missing {missing[:5]}, "
                         f"unexpected {extra[:5]}): same model.lora_rank, lora_targets and student as the saved run?")
    with torch.no_grad():
        for name, p in own.items():
            if state[name].shape != p.shape:
                raise ValueError(f"saved adapter {name} has shape {tuple(state[name].shape)}, "
                                 f"this run's {tuple(p.shape)}: not the same LoRA rank or model")
            p.copy_(state[name])


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model` with every adapter folded into its layer, under the plain layers' names: copies on
    the CPU, float32 for floating-point tensors."""
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner.endswith((".lora_down", ".lora_up")) or owner in ("lora_down", "lora_up"):
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in wrapped:
            layer = owner[: -len(".base")]
            key = f"{layer}.{leaf}"
            if leaf == "weight":
                value = wrapped[layer].merged_weight()
        out[key] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype, copy=True)
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A new plain network (the model's class, from its config; float32, on the CPU) holding `model`'s weights with
    the adapters folded in: what `save_pretrained` writes and every loader reads. A model without adapters is
    returned as it is."""
    if not has_lora(model):
        return model
    with torch.device("meta"):
        plain = type(model).from_config(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    return plain.eval()


def trained_modules(model: nn.Module) -> list[str]:
    """Names of `model`'s modules whose parameters all train (a block trained in full: an added layer, a reference
    encoder; "" when the whole model does), under which a buffer may be the model's own to change."""
    return [name for name, m in model.named_modules()
            if any(True for _ in m.parameters()) and all(p.requires_grad for p in m.parameters())]


def within(name: str, owners: list[str]) -> bool:
    """Whether module `name` is one of `owners` or under one ("" owns every module)."""
    return any(not o or name == o or name.startswith(o + ".") for o in owners)


def share_weights(model: nn.Module, source: nn.Module) -> int:
    """Point each frozen tensor of `model` at `source`'s frozen tensor of the same name (a wrapped layer's
    `X.base.weight` is `X.weight` there) when shape, dtype, device and values agree; returns how many now share.
    Frozen: a parameter that does not train, a buffer outside the modules trained in full (`trained_modules`), in
    either network. For a critic or a student built from the teacher: one copy of the base weights and of its
    buffers (SD3's position table) for all three."""
    theirs = dict(source.named_parameters())
    their_trained = trained_modules(source)
    their_buffers = {n: b for n, b in source.named_buffers() if not within(n.rpartition(".")[0], their_trained)}
    own_trained = trained_modules(model)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    shared = 0

    def same(other, t) -> bool:
        return (other is not None and other is not t and other.shape == t.shape and other.dtype == t.dtype
                and other.device == t.device and torch.equal(other, t))

    for name, module in model.named_modules():
        plain = name[: -len(".base")] if name.endswith(".base") and name[: -len(".base")] in wrapped else name
        for leaf, p in list(module._parameters.items()):
            if p is None or p.requires_grad:
                continue
            other = theirs.get(f"{plain}.{leaf}" if plain else leaf)
            if same(other, p) and not other.requires_grad:
                module._parameters[leaf] = other
                shared += 1
        if within(name, own_trained):  # a buffer of a part trained in full stays its own (it may change)
            continue
        for leaf, b in list(module._buffers.items()):
            other = their_buffers.get(f"{plain}.{leaf}" if plain else leaf)
            if b is not None and same(other, b):
                module._buffers[leaf] = other
                shared += 1
    return shared


def describe(model: nn.Module) -> str:
    """"LoRA rank r on N layers, P trainable parameters" (for a run's first line)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {layers[0].rank} (alpha {layers[0].alpha:g}) on {len(layers)} layers, "
            f"{trainable:,} of {total:,} parameters trained")
