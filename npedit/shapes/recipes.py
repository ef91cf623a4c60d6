"""Training recipes of the Shapes-world base model: the small VAE, then text encoder + teacher.

Each stage is a frozen config with named presets, one command (`python -m npedit shapes STAGE
[preset=NAME] [key=value ...]`), a progress bar and a run folder (config.yaml, metrics.jsonl,
samples/, the trained model). The editor itself is trained by the NP-Edit trainer
(`python -m npedit train --config configs/shapes/*.yaml`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import flow
from ..backbones.base import set_config
from ..backbones.tiny import add_bos_eos, tiny_clip, tiny_sd3_transformer, tiny_vae
from ..config import BUNDLE_PATH, apply_overrides, build_config, overrides_as_flags, pick_preset, save_config
from ..devices import resolve_device
from ..files import write_atomic, write_png
from ..sampler import sample
from ..tokenization import build_bpe_tokenizer
from ..training.checkpoint import disk_writes, publishing
from ..training.logging import MetricsLogger, image_grid
from .training import corpus, render_tensor
from .world import CELLS, COLOURS, SHAPES, SIZES, caption, cell_token, clean_fraction, parse, random_scene


@dataclass(frozen=True)
class RunSettings:
    """What every recipe stage shares: seed, logging, threads, device, wall-clock limit, render workers."""

    seed: int = 0
    log_every: int = 50
    threads: int = 0  # torch threads (0: leave as is)
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    max_minutes: float = 0.0  # also stop after this much wall-clock (the lr decay follows whichever limit is nearer)
    workers: int = 0  # render scenes in this many background processes (0: in the loop, the bundled recipe)

    def __post_init__(self):
        # every stage has steps and batch_size; 0 or less "trained" nothing, or failed inside the first batch
        counts = {name: getattr(self, name) for name in ("steps", "batch_size") if hasattr(self, name)}
        if min(counts.values(), default=1) < 1:
            raise ValueError(f"{' and '.join(counts)} must be >= 1, got "
                             + ", ".join(f"{k}={v}" for k, v in counts.items()))
        if self.log_every < 1 or min(self.threads, self.workers, self.max_minutes) < 0:
            raise ValueError(f"log_every must be >= 1 and threads, workers, max_minutes >= 0, got "
                             f"log_every={self.log_every}, threads={self.threads}, workers={self.workers}, "
                             f"max_minutes={self.max_minutes}")
        if not 0 <= self.seed < 2**32:  # numpy's range
            raise ValueError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.device != "auto":
            resolve_device(self.device)  # an unknown device is said now, before the run folder and config.yaml


@dataclass(frozen=True)
class VAEConfig(RunSettings):
    """The small AutoencoderKL for 64x64 scenes (downsample 4: 16x16 latents)."""

    output_dir: str = "runs/shapes/vae"
    steps: int = 4000
    batch_size: int = 32
    crop: int = 32  # train on random crops (convolutions are translation-equivariant): 4x cheaper
    lr: float = 1e-3
    width: int = 16
    latent_channels: int = 4
    downsample: int = 4
    kl_weight: float = 1e-6
    init: str = field(default="", metadata=BUNDLE_PATH)  # continue from a trained VAE folder
    decoder_only: bool = False  # with `init`: refine the decoder, keeping the latent space (and the teacher) valid
    # Weight of a per-pixel palette classification loss (cross-entropy of -distance / palette_temperature
    # to the 11 palette colours): it pushes every pixel to the side of its true colour, as the parser
    # quantises; plain L1/L2 leaves the few pixels that tell a small circle from a small square blurred.
    palette_weight: float = 0.0
    palette_temperature: float = 0.05  # in squared [-1, 1] units; neighbouring palette colours lie ~0.5 apart


@dataclass(frozen=True)
class TeacherConfig(RunSettings):
    """Text-to-image flow matching on coarse captions: SD3-class MMDiT + small CLIP text encoder."""

    output_dir: str = "runs/shapes/teacher"
    vae: str = field(default="runs/shapes/vae/vae", metadata=BUNDLE_PATH)
    # continue a trained teacher base folder (its tokenizer, text encoder, VAE and weights; `vae` unused)
    init: str = field(default="", metadata=BUNDLE_PATH)
    steps: int = 3000  # the bundled teacher
    batch_size: int = 32
    lr: float = 5e-4
    dim: int = 128
    layers: int = 4
    heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    max_text_tokens: int = 32
    caption_dropout: float = 0.1  # trains the unconditional branch CFG needs
    sample_steps: int = 16
    cfg_scale: float = 3.5
    sample_every: int = 1000


@dataclass(frozen=True)
class FastVAEConfig(RunSettings):
    """A `PatchAutoencoder` distilled into a trained VAE's latent space (a drop-in, faster VAE for pipelines)."""

    output_dir: str = "runs/shapes/fast-vae"
    # the VAE whose scaled latents it must reproduce (a vae/ folder)
    source: str = field(default="assets/shapes/editor/vae", metadata=BUNDLE_PATH)
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    width: int = 64
    depth: int = 3
    head: int = 128  # the decoder's per-position head (0: none)
    refine: int = 16  # channels of the decoder's half-resolution seam layer (0: unfold in one step)
    latent_noise: float = 0.05  # decoder inputs: the source's latents + this much Gaussian noise (editors' latents are imperfect)
    # continue from a PatchAutoencoder folder (its own width/depth/head/refine are kept)
    init: str = field(default="", metadata=BUNDLE_PATH)
    # Editors' latents (off the VAE's manifold: blurry, half-edited): each editor pipeline (whose VAE must be the
    # source) edits `editor_cases` random cases; the fast decoder also learns to decode those latents as the
    # source decoder does, on `editor_batch` of them per step, so it is a drop-in for those editors' outputs too.
    editors: tuple[str, ...] = ()
    editor_cases: int = 1000
    editor_batch: int = 16
    latent_weight: float = 10.0  # encoder loss weight (MSE to the source's scaled latents)
    palette_weight: float = 0.0  # palette classification loss on decodes of true scenes (see VAEConfig)
    palette_temperature: float = 0.05
    eval_scenes: int = 500


@dataclass(frozen=True)
class RefEncoderConfig(RunSettings):
    """Dense pretraining of an editor's reference encoder on single scenes (no pairs): from the reference latent, the
    patch under each cell's centre must tell whether an object is there, its shape and size, and its colour.

    The editor's own reference tokens barely know the shape of the object they sit on (a linear probe: 0.54-0.65,
    chance 0.33; colour 0.87-0.95), and it fails the edits that name an object by shape alone. The encoder's output
    stays zero, so the written editor edits exactly as before; the editor stage can then read features that already
    carry the shape (with `optim.reference_encoder_lr_scale`; on CPU budgets it did not: docs/shapes_experiments.md).

    `gated`: a new encoder gets the normalised, gated output (see `ReferenceEncoder`); its projection is pretrained
    too (the reading heads read its normalised tokens), so the gate, when it opens, lets in token-space vectors that
    already say each cell's object. Otherwise only the convolutions are pretrained and the projection stays zero."""

    output_dir: str = "runs/shapes/ref-encoder"
    # an SD3-family editor pipeline (reference as tokens or channels)
    editor: str = field(default="assets/shapes/editor-sft-npedit", metadata=BUNDLE_PATH)
    layers: int = 3  # 3x3 convolutions: with the patch, a receptive field of 8x8 latent pixels covers a large object
    width: int = 64
    gated: bool = False
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    eval_scenes: int = 500

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.layers <= 8 or self.width < 1:
            raise ValueError(f"layers must be between 1 and 8 and width >= 1, got {self.layers} and {self.width}")


PRESETS: dict[str, dict[str, dict]] = {
    "vae": {"default": {}, "quick": {"steps": 3, "batch_size": 4, "width": 8, "log_every": 1, "crop": 64}},
    "fast-vae": {"default": {}, "quick": {"steps": 3, "batch_size": 4, "width": 8, "depth": 1, "head": 8, "refine": 4,
                                          "log_every": 1, "eval_scenes": 8}},
    "teacher": {"default": {}, "quick": {"steps": 3, "batch_size": 4, "dim": 32, "layers": 1, "heads": 2,
                                         "text_hidden": 32, "log_every": 1, "sample_every": 3, "sample_steps": 2}},
    "ref-encoder": {"default": {}, "quick": {"steps": 3, "batch_size": 4, "width": 8, "log_every": 1, "eval_scenes": 8}},
}
CONFIGS = {"vae": VAEConfig, "teacher": TeacherConfig, "fast-vae": FastVAEConfig, "ref-encoder": RefEncoderConfig}


def make_config(stage: str, overrides: list[str]):
    """The stage's config: `preset=NAME` picks a preset, other `key=value` items override it."""
    preset, rest = pick_preset(overrides)
    if preset not in PRESETS[stage]:
        raise ValueError(f"unknown preset {preset!r} for {stage}; presets: {', '.join(PRESETS[stage])}")
    return build_config(CONFIGS[stage], apply_overrides(PRESETS[stage][preset], rest))


class Budget:
    """Progress of a run limited by a step count and, optionally, by wall-clock minutes."""

    def __init__(self, steps: int, max_minutes: float):
        self.steps, self.seconds, self.start = steps, 60 * max_minutes, time.monotonic()

    def progress(self, step: int) -> float:
        """Fraction of the run done: the larger of the step and the time fractions."""
        done = step / max(1, self.steps)
        if self.seconds:
            done = max(done, (time.monotonic() - self.start) / self.seconds)
        return min(1.0, done)

    def over(self, step: int) -> bool:
        return step >= self.steps or bool(self.seconds) and time.monotonic() - self.start >= self.seconds


AGAIN = "free space (or make the folder writable) and run the stage again"


def refuse_to_replace(output_dir, name: str, what: str, key: str = "init", model_class: str = "") -> None:
    """ValueError when `output_dir`/`name` holds a trained model (`what`, with its article) that a new run there would
    replace (its metrics mixed into the first run's), before anything is written: continue it with `key`= elsewhere
    (said when the folder holds a `model_class`, the one this stage takes), or pick another output_dir."""
    held = Path(output_dir) / name
    if not held.exists():
        return
    try:
        found = json.loads((held / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        found = None
    same = not model_class or found == model_class
    held_what = what if same else f"a trained model ({found or 'unknown class'})"
    go_on = f"continue it with {key}={held} and another output_dir, or " if same else ""
    raise ValueError(f"output_dir {output_dir} already holds {held_what} ({held}), which a new run would replace: "
                     f"{go_on}pick another output_dir")


def _start(cfg, name: str | None = None, what: str = "", key: str = "init",
           model_class: str = "") -> tuple[Path, MetricsLogger, np.random.Generator]:
    """The run folder of a stage saving its model as `name` (refused when it holds one: `refuse_to_replace`), its
    config written, its metrics logger and random stream."""
    if name:
        refuse_to_replace(cfg.output_dir, name, what, key, model_class)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with disk_writes(out / "config.yaml", f"nothing was trained yet: {AGAIN}"):  # the Runs tab reads it
        save_config(cfg, out / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return out, MetricsLogger(out), np.random.default_rng([cfg.seed, 4242])


def save_results(out: Path, name: str, save, report: dict, grid=None) -> Path:
    """A stage's end: its model folder `out/name` (`save(folder)` writes it) published whole, then report.json and
    reconstructions.png (`grid`) each written whole; a full disk stops the stage with one line (`WriteError`)."""
    with disk_writes(out / name, f"the previous {name}/ there, if any, is untouched: {AGAIN}"):
        with publishing(out / name) as folder:  # a cut model folder would load as a model, or fail to, later
            save(folder)
    with disk_writes(out / "report.json", f"{out / name} is written whole"):
        write_atomic(out / "report.json", json.dumps(report, indent=2))
        if grid is not None:
            write_png(out / "reconstructions.png", grid)
    return out / name


def scene_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """n random scenes as (n, 3, 64, 64) in [-1, 1] and their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    return torch.stack([render_tensor(s) for s in scenes]), [caption(s) for s in scenes]


class _SceneStream(torch.utils.data.IterableDataset):
    """Endless batches of random scenes: batch k is drawn from a stream of its own (seed, k), so whichever worker
    renders it, and however many there are, the loader yields the same batches in the same order."""

    def __init__(self, batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # the loader takes one batch from each worker in turn, so worker w renders batches w, w + n, w + 2n, ...
        k, n = (info.id, info.num_workers) if info else (0, 1)
        while True:
            yield scene_batch(np.random.default_rng([self.seed, 4243, k]), self.batch_size)
            k += n


def scene_batches(rng: np.random.Generator, batch_size: int, workers: int, seed: int):
    """Endless (pixels, captions) batches: drawn from `rng` in this process (`workers=0`, the bundled recipes), or
    rendered by `workers` background processes (a GPU run otherwise waits on the Python renderer), the same batches
    for any number of them (not those of `workers=0`)."""
    if workers <= 0:
        while True:
            yield scene_batch(rng, batch_size)
    loader = torch.utils.data.DataLoader(_SceneStream(batch_size, seed), batch_size=None, num_workers=workers,
                                         prefetch_factor=4, persistent_workers=True)
    yield from loader


def random_crops(x: torch.Tensor, size: int, align: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size x size crop per image, its corner on the `align` grid (keeps latents aligned)."""
    if size >= x.shape[-1]:
        return x
    starts = rng.integers(0, (x.shape[-1] - size) // align + 1, size=(x.shape[0], 2)) * align
    return torch.stack([img[:, r:r + size, c:c + size] for img, (r, c) in zip(x, starts)])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def palette_tensor(device=None) -> torch.Tensor:
    """The 11 palette colours in [-1, 1], (11, 3), in PALETTE_NAMES order."""
    from .world import BACKGROUNDS, COLOURS

    return torch.tensor([*BACKGROUNDS.values(), *COLOURS.values()], dtype=torch.float32, device=device) / 127.5 - 1


def palette_loss(rec: torch.Tensor, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each reconstructed pixel's palette class (logits -|rec - colour|^2 / temperature)
    against the true pixel's colour; `rec`, `x` (B, 3, H, W) in [-1, 1], `x` made of palette colours."""
    pal = palette_tensor(x.device)  # (11, 3)
    labels = torch.cdist(x.permute(0, 2, 3, 1).reshape(-1, 3), pal).argmin(-1)  # exact colours: distance 0
    logits = -torch.cdist(rec.permute(0, 2, 3, 1).reshape(-1, 3), pal).pow(2) / temperature
    return torch.nn.functional.cross_entropy(logits, labels)


def train_vae(cfg: VAEConfig) -> Path:
    """Train the VAE on random renders; writes <output_dir>/vae with latent scale/shift in its config."""
    out, log, rng = _start(cfg, "vae", "a VAE", model_class="AutoencoderKL")
    if cfg.init:
        from ..backbones.vae import AnyVAE

        vae = AnyVAE.from_pretrained(cfg.init, only="AutoencoderKL")  # the checks every loader runs (size, offline)
    else:
        vae = tiny_vae(cfg.latent_channels, cfg.downsample, width=cfg.width, seed=cfg.seed)
    if cfg.decoder_only:
        if not cfg.init:
            raise ValueError("decoder_only=true needs init=<a trained VAE folder>")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    device = resolve_device(cfg.device)
    vae.to(device)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.lr)
    budget = Budget(cfg.steps, cfg.max_minutes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.02, 1 - budget.progress(s)))
    bar = tqdm(total=cfg.steps, desc="vae")
    batches = scene_batches(rng, cfg.batch_size, cfg.workers, cfg.seed)
    step = 0
    while not budget.over(step):
        step += 1
        x = random_crops(next(batches)[0], cfg.crop, cfg.downsample, rng).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # the editor only ever uses the posterior mode
        recon = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        kl = post.kl().mean()
        loss = recon + cfg.kl_weight * kl
        if cfg.palette_weight > 0:
            loss = loss + cfg.palette_weight * palette_loss(rec, x, cfg.palette_temperature)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % cfg.log_every == 0 or budget.over(step):
            pixel_ok = ((rec.detach() - x).abs().amax(dim=1) < 0.25).float().mean()  # within ~32 of 255 per channel
            log.log(step, {"recon_loss": recon.detach(), "kl": kl.detach(), "pixel_accuracy": pixel_ok,
                           "elapsed_s": time.monotonic() - budget.start})
    bar.close()
    vae.eval()
    with torch.no_grad():
        x, _ = scene_batch(rng, 256)
        x = x.to(device)
        z = vae.encode(x).latent_dist.mode()
        if not cfg.decoder_only:  # a refined decoder keeps the latent statistics of its init
            set_config(vae, shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
        rec = vae.decode(z).sample.cpu()
        x = x.cpu()
    parsed = float(np.mean([parse(to_uint8(r)) == parse(to_uint8(o)) for r, o in zip(rec, x)]))
    clean = float(np.mean([clean_fraction(to_uint8(r)) for r in rec]))
    report = {"reconstruction_exact": parsed, "clean": clean, "scaling_factor": scale, "shift_factor": shift,
              "params": sum(p.numel() for p in vae.parameters()), "steps": step,
              "minutes": (time.monotonic() - budget.start) / 60}
    log.log(step, {"eval_reconstruction_exact": parsed, "eval_clean": clean})
    grid = image_grid([[a, b] for a, b in zip(x[:8], rec[:8])], scale=2)
    save_results(out, "vae", vae.cpu().save_pretrained, report, grid)
    log.close()
    return out / "vae"


@torch.no_grad()
def reconstruction_report(source, fast, n: int, rng: np.random.Generator, device) -> dict:
    """Exact-scene reconstruction rates of source->source, source->fast and fast->fast (encoder->decoder) on
    `n` random scenes, plus the fast encoder's latent error relative to the source latents' variance."""
    from ..backbones.vae import LatentCodec

    src, fst = LatentCodec(source), LatentCodec(fast)
    hits = {"source": [], "source_to_fast": [], "fast": []}
    err, var = 0.0, 0.0
    for start in range(0, n, 100):
        x, _ = scene_batch(rng, min(100, n - start))
        x = x.to(device)
        z_src, z_fast = src.encode(x), fst.encode(x)
        err += float((z_fast - z_src).pow(2).sum())
        var += float((z_src - z_src.mean()).pow(2).sum())
        truth = [parse(to_uint8(o)) for o in x.cpu()]
        for key, rec in (("source", src.decode(z_src)), ("source_to_fast", fst.decode(z_src)), ("fast", fst.decode(z_fast))):
            hits[key] += [parse(to_uint8(r)) == t for r, t in zip(rec.cpu(), truth)]
    return {**{f"exact_{k}": float(np.mean(v)) for k, v in hits.items()}, "latent_rel_mse": err / max(var, 1e-12)}


@torch.no_grad()
def editor_latents(editor: str, codec, n: int, seed: int, device, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents the editor pipeline in `editor` writes for `n` random Shapes cases, and the source decoder's
    images of them: ((n, C, h, w), (n, 3, H, W) in [-1, 1])."""
    from PIL import Image

    from ..pipeline import NPEditPipeline
    from .edits import sample_case
    from .world import render

    pipe = NPEditPipeline.from_pretrained(editor).to(device)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([seed, 77])
    cases = [sample_case(rng) for _ in range(n)]
    latents, images = [], []
    for start in tqdm(range(0, n, batch_size), desc=f"editor latents {Path(editor).name}", mininterval=10):
        chunk = cases[start:start + batch_size]
        z = pipe(image=[Image.fromarray(render(c.reference)) for c in chunk], prompt=[c.instruction for c in chunk],
                 generator=torch.Generator().manual_seed(seed * 1000 + start), output_type="latent").images
        latents.append(z)
        images.append(codec.decode(z.to(device)).clamp(-1, 1))
    return torch.cat(latents).to(device), torch.cat(images)


def train_fast_vae(cfg: FastVAEConfig) -> Path:
    """Distil a `PatchAutoencoder` into `cfg.source`'s latent space; writes <output_dir>/vae and report.json."""
    from ..backbones.fast_vae import PatchAutoencoder
    from ..backbones.vae import AnyVAE, LatentCodec

    out, log, rng = _start(cfg, "vae", "a fast VAE", model_class="PatchAutoencoder")
    device = resolve_device(cfg.device)
    source = AnyVAE.from_pretrained(cfg.source).to(device).eval().requires_grad_(False)
    codec = LatentCodec(source)
    if cfg.init:
        fast = AnyVAE.from_pretrained(cfg.init, only=PatchAutoencoder.__name__)
        if (fast.config.latent_channels, fast.config.downsample) != (codec.channels, codec.downsample):
            raise ValueError(f"init {cfg.init} has {fast.config.latent_channels} latent channels and downsample "
                             f"{fast.config.downsample}; the source has {codec.channels} and {codec.downsample}")
    else:
        fast = PatchAutoencoder(latent_channels=codec.channels, downsample=codec.downsample, width=cfg.width,
                                depth=cfg.depth, head=cfg.head, refine=cfg.refine)
    fast.to(device).train()
    pool_z, pool_x = [], []
    for k, editor in enumerate(cfg.editors):
        z, x = editor_latents(editor, codec, cfg.editor_cases, cfg.seed + k, device)
        if z.shape[1:] != (codec.channels, 64 // codec.downsample, 64 // codec.downsample):
            raise ValueError(f"{editor} writes latents of shape {tuple(z.shape[1:])}, not the source VAE's")
        pool_z.append(z)
        pool_x.append(x)
    pool = (torch.cat(pool_z), torch.cat(pool_x)) if pool_z else None
    opt = torch.optim.AdamW(fast.parameters(), lr=cfg.lr, weight_decay=0.0)
    budget = Budget(cfg.steps, cfg.max_minutes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.02, 1 - budget.progress(s)))
    bar = tqdm(total=cfg.steps, desc="fast-vae")
    batches = scene_batches(rng, cfg.batch_size, cfg.workers, cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step = 0
    while not budget.over(step):
        step += 1
        x = next(batches)[0].to(device)
        with torch.no_grad():
            z = codec.encode(x)  # the source's scaled latents: what the transformer reads and writes
        z_fast = fast.encode(x).latents
        noisy = z + cfg.latent_noise * torch.randn(z.shape, generator=gen).to(device)
        inputs, target = [noisy, z_fast.detach()], [x, x]
        if pool is not None:
            pick = torch.from_numpy(rng.integers(0, len(pool[0]), cfg.editor_batch)).to(device)
            inputs.append(pool[0][pick])
            target.append(pool[1][pick])
        rec = fast.decode(torch.cat(inputs)).sample
        target = torch.cat(target)
        recon = (rec - target).abs().mean() + (rec - target).pow(2).mean()
        latent = (z_fast - z).pow(2).mean()
        loss = recon + cfg.latent_weight * latent
        if cfg.palette_weight > 0:  # only the decodes of true scenes (editor-pool targets are not palette-exact)
            loss = loss + cfg.palette_weight * palette_loss(rec[:2 * len(x)], target[:2 * len(x)],
                                                            cfg.palette_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fast.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % cfg.log_every == 0 or budget.over(step):
            log.log(step, {"recon_loss": recon.detach(), "latent_mse": latent.detach(), "lr": sched.get_last_lr()[0],
                           "elapsed_s": time.monotonic() - budget.start})
    bar.close()
    fast.eval()
    report = reconstruction_report(source, fast, cfg.eval_scenes, np.random.default_rng([cfg.seed, 999]), device)
    if pool is not None:  # agreement with the source decoder on editors' latents (training pool: a fit check)
        with torch.no_grad():
            mine = fast.decode(pool[0][:500]).sample.clamp(-1, 1)
        report["editor_latents_mae_vs_source"] = float((mine - pool[1][:500]).abs().mean())
    report |= {"params": sum(p.numel() for p in fast.parameters()), "steps": step,
               "minutes": (time.monotonic() - budget.start) / 60, "source": cfg.source}
    log.log(step, {f"eval_{k}": v for k, v in report.items() if isinstance(v, float)})
    fast.cpu()
    with torch.no_grad():
        x, _ = scene_batch(rng, 8)
        rec = fast.decode(fast.encode(x).latents).sample
    save_results(out, "vae", fast.save_pretrained, report, image_grid([[a, b] for a, b in zip(x, rec)], scale=2))
    log.close()
    return out / "vae"


SLOT_CLASSES = ("empty",) + tuple(f"{size} {shape}" for shape in SHAPES for size in SIZES)  # what a cell holds


def cell_labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene and cell (`CELLS` order): the `SLOT_CLASSES` index and the colour index (-1 where empty), (B, 9) each."""
    slot = torch.zeros(len(scenes), len(CELLS), dtype=torch.long)
    colour = torch.full((len(scenes), len(CELLS)), -1, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            k = CELLS.index(obj.cell)
            slot[b, k] = SLOT_CLASSES.index(f"{obj.size} {obj.shape}")
            colour[b, k] = tuple(COLOURS).index(obj.colour)
    return slot, colour


class CellHeads(torch.nn.Module):
    """Reads, at the token under each cell's centre, (B, 9, slot classes) and (B, 9, colours) logits from either
    the encoder's body features (B, W, h, w), one patch per token as its output projection does, or (`from_tokens`)
    its per-patch vectors (B, N, W)."""

    def __init__(self, width: int, patch: int, latent_size: int, from_tokens: bool = False):
        super().__init__()
        classes = len(SLOT_CLASSES) + len(COLOURS)
        self.from_tokens = from_tokens
        self.read = (torch.nn.Linear(width, classes) if from_tokens
                     else torch.nn.Conv2d(width, classes, kernel_size=patch, stride=patch))
        grid = latent_size // patch  # tokens per side
        self.register_buffer("tokens", torch.tensor([cell_token(c, grid) for c in CELLS]), persistent=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.from_tokens:
            logits = self.read(features[:, self.tokens])  # (B, 9, classes)
        else:
            logits = self.read(features).flatten(2)[:, :, self.tokens].transpose(1, 2)
        return logits[..., :len(SLOT_CLASSES)], logits[..., len(SLOT_CLASSES):]


def cell_losses(heads: CellHeads, features: torch.Tensor, slot: torch.Tensor, colour: torch.Tensor) -> tuple:
    """Cross-entropy of what each cell holds and of each object's colour; and the counts of right answers
    (shape and size of occupied cells, emptiness, colour) for accuracy."""
    slot_logits, colour_logits = heads(features)
    occupied = colour >= 0
    loss = torch.nn.functional.cross_entropy(slot_logits.flatten(0, 1), slot.flatten())
    loss = loss + torch.nn.functional.cross_entropy(colour_logits[occupied], colour[occupied])
    slot_hat, colour_hat = slot_logits.argmax(-1), colour_logits.argmax(-1)
    right = {"object": int((slot_hat == slot)[occupied].sum()), "empty": int((slot_hat == 0)[~occupied].sum()),
             "colour": int((colour_hat == colour)[occupied].sum()), "objects": int(occupied.sum()),
             "empties": int((~occupied).sum())}
    return loss, right


def train_ref_encoder(cfg: RefEncoderConfig) -> Path:
    """Give `cfg.editor`'s student a reference encoder (or continue its own), pretrain its convolutions to read every
    cell's object; writes <output_dir>/pipeline (the editor with it, still editing as before) and report.json."""
    from ..pipeline import NPEditPipeline, carry_over

    out, log, rng = _start(cfg, "pipeline", "an editor with a pretrained reference encoder", key="editor")
    device = resolve_device(cfg.device)
    pipe = NPEditPipeline.from_pretrained(cfg.editor)
    backbone, student = pipe.backbone, pipe.transformer
    # else its own encoder is pretrained further (layers, width unused; the reading heads are not kept: fresh ones)
    if not hasattr(student, "ref_encoder"):
        student = backbone.add_reference_encoder(student, cfg.layers, cfg.width, gated=cfg.gated)
    encoder = student.ref_encoder.to(device).train()
    latent_size = 64 // backbone.codec.downsample
    gated = encoder.gated  # a continued encoder keeps its own output kind
    width = encoder.proj.out_channels if gated else encoder.proj.in_channels
    heads = CellHeads(width, student.config.patch_size, latent_size, from_tokens=gated).to(device)
    trained = [*encoder.body.parameters(), *(encoder.proj.parameters() if gated else ())]  # never the gate
    opt = torch.optim.AdamW([*trained, *heads.parameters()], lr=cfg.lr, weight_decay=0.0)
    features = encoder.tokens if gated else encoder.body
    budget = Budget(cfg.steps, cfg.max_minutes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.02, 1 - budget.progress(s)))
    backbone.codec.vae.to(device)

    def batch(generator: np.random.Generator, n: int):
        scenes = [random_scene(generator) for _ in range(n)]
        with torch.no_grad():
            z = backbone.encode_image(torch.stack([render_tensor(sc) for sc in scenes]).to(device))
        return z, *(t.to(device) for t in cell_labels(scenes))

    bar = tqdm(total=cfg.steps, desc="ref-encoder")
    step = 0
    while not budget.over(step):
        step += 1
        z, slot, colour = batch(rng, cfg.batch_size)
        loss, right = cell_losses(heads, features(z), slot, colour)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        if step % cfg.log_every == 0 or budget.over(step):
            log.log(step, {"cell_loss": loss.detach(), "object_acc": right["object"] / max(1, right["objects"]),
                           "colour_acc": right["colour"] / max(1, right["objects"]), "lr": sched.get_last_lr()[0],
                           "elapsed_s": time.monotonic() - budget.start})
    bar.close()
    encoder.eval()
    held, totals = np.random.default_rng([cfg.seed, 999]), {}
    with torch.no_grad():
        for i in range(0, cfg.eval_scenes, 100):
            z, slot, colour = batch(held, min(100, cfg.eval_scenes - i))
            for k, v in cell_losses(heads, features(z), slot, colour)[1].items():
                totals[k] = totals.get(k, 0) + v
    report = {"object_accuracy": totals["object"] / max(1, totals["objects"]),  # shape and size of each object
              "colour_accuracy": totals["colour"] / max(1, totals["objects"]),
              "empty_accuracy": totals["empty"] / max(1, totals["empties"]),
              "eval_scenes": cfg.eval_scenes, "steps": step, "minutes": (time.monotonic() - budget.start) / 60,
              "editor": cfg.editor, "layers": student.config.reference_encoder_layers, "gated": gated}
    log.log(step, {f"eval_{k}": v for k, v in report.items() if isinstance(v, float)})
    student.cpu()  # the pipeline's own transformer, now with the encoder (its config names it)
    note = (f"Its student was given a reference encoder of {report['layers']} convolutions, pretrained on single "
            f"scenes to read each cell's object (`python -m npedit shapes ref-encoder`: held-out shape and size "
            f"{report['object_accuracy']:.3f}, colour {report['colour_accuracy']:.3f}); its output is still zero ("
            f"{'a closed gate' if gated else 'a zero projection'}), so it edits as before.")

    def save(folder: Path) -> None:  # (the app lists a run's pipeline/ as an editor)
        pipe.save_pretrained(folder)
        carry_over(cfg.editor, folder, note)

    save_results(out, "pipeline", save, report)
    log.close()
    return out / "pipeline"


def build_base(out: Path, cfg: TeacherConfig):
    """Tokenizer + frozen CLIP text encoder + trained VAE + a fresh SD3 transformer, saved as a base folder."""
    from ..backbones.vae import AnyVAE

    tokenizer = add_bos_eos(build_bpe_tokenizer(corpus(seed=cfg.seed), vocab_size=768,
                                                model_max_length=cfg.max_text_tokens))
    clip = tiny_clip(tokenizer, hidden=cfg.text_hidden, projection_dim=cfg.text_hidden, layers=cfg.text_layers,
                     seed=cfg.seed)
    clip.config.npedit_empty_t5_tokens = 0  # no T5 and no zero T5 tokens: short sequences on a CPU
    vae = AnyVAE.from_pretrained(cfg.vae, only="AutoencoderKL")
    latent = 64 // (2 ** (len(vae.config.block_out_channels) - 1))
    transformer = tiny_sd3_transformer(vae.config.latent_channels, cfg.text_hidden, cfg.text_hidden, dim=cfg.dim,
                                       layers=cfg.layers, heads=cfg.heads, sample_size=latent,
                                       pos_embed_max_size=latent, seed=cfg.seed)
    tokenizer.save_pretrained(out / "tokenizer")
    clip.save_pretrained(out / "text_encoder")
    vae.save_pretrained(out / "vae")
    transformer.save_pretrained(out / "transformer")
    return out


def check_teacher_base(path: str | Path, what: str = "teacher") -> Path:
    """`path` as a Path if it is a Shapes teacher base folder, else a FileNotFoundError saying what to pass."""
    path = Path(path)
    missing = [p for p in ("tokenizer", "text_encoder", "vae", "transformer") if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{what}={path} is not a teacher base folder (no {', '.join(missing)}); "
                                f"pass the `base` folder a teacher run wrote, e.g. assets/shapes/teacher")
    return path


def continue_base(init: Path, out: Path) -> Path:
    """Copy a trained teacher base folder to `out` (the run continues its transformer; the rest stays as it is)."""
    check_teacher_base(init, "init")
    if init.resolve() == out.resolve():
        raise ValueError(f"init={init} is this run's own base folder; choose another output_dir")
    with disk_writes(out, f"the previous {out.name}/ there, if any, is untouched: {AGAIN}"), publishing(out) as folder:
        # what a killed save of `init` left (`publishing`'s hidden folders) is not copied
        shutil.copytree(init, folder, ignore=shutil.ignore_patterns(".tmp_*", ".trash_*"))
    return out


@torch.no_grad()
def sample_teacher(backbone, teacher, captions: list[str], steps: int, cfg_scale: float, seed: int) -> torch.Tensor:
    """Text-to-image samples (pixels in [-1, 1]) with an Euler ODE sampler and CFG."""
    gen = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompt(captions, with_reference=False)
    uncond = backbone.encode_prompt([""] * len(captions), with_reference=False)
    side = 64 // backbone.codec.downsample
    device = next(teacher.parameters()).device
    noise = torch.randn(len(captions), backbone.latent_channels, side, side, generator=gen).to(device)

    def denoise(x, t):
        return flow.guided(backbone.velocity(teacher, x, t, cond), backbone.velocity(teacher, x, t, uncond), cfg_scale)

    times = flow.few_step_times(steps, 3.0)
    return backbone.decode_latents(sample(denoise, noise, times, renoise="ode")).clamp(-1, 1).cpu()


def teacher_quality(images: torch.Tensor, captions: list[str], by_objects: bool = False) -> dict:
    """Share of samples that parse as a scene, match their caption exactly, and the clean-pixel share;
    with `by_objects`, the caption match per number of objects the caption names."""
    arrays = [to_uint8(x) for x in images]
    parsed = [parse(a) for a in arrays]
    matches = [p is not None and caption(p) == c for p, c in zip(parsed, captions)]
    out = {"parsed": float(np.mean([p is not None for p in parsed])), "caption_match": float(np.mean(matches)),
           "clean": float(np.mean([clean_fraction(a) for a in arrays]))}
    if by_objects:
        groups: dict[str, list[bool]] = {}
        for c, m in zip(captions, matches):
            groups.setdefault(str(c.count(", ") + 1), []).append(m)
        out["caption_match_by_objects"] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
    return out


def evaluate_teacher(base: str | Path, n: int = 300, seed: int = 0, steps: int = 16, cfg_scale: float = 3.5,
                     batch_size: int = 50, device: str = "auto") -> tuple[dict, torch.Tensor]:
    """Sample a teacher on `n` held-out random captions: parsed / caption-match / clean shares, and the images."""
    from ..backbones.sd3 import SD3Backbone

    base = check_teacher_base(base)
    dev = resolve_device(device)
    backbone = SD3Backbone.from_pretrained(base).to(dev)
    teacher = backbone.load_transformer(base).to(dev).eval()
    captions = scene_batch(np.random.default_rng([seed, 4242]), n)[1]
    images = [sample_teacher(backbone, teacher, captions[i:i + batch_size], steps, cfg_scale, seed + i)
              for i in tqdm(range(0, n, batch_size), desc="teacher samples")]
    images = torch.cat(images)
    quality = teacher_quality(images, captions, by_objects=True)
    return {"teacher": str(base), "n": n, "seed": seed, "steps": steps, "cfg_scale": cfg_scale, **quality}, images


def teacher_eval_main(argv=None, prog: str = "python -m npedit shapes teacher-eval") -> int:
    """`python -m npedit shapes teacher-eval`: how often a teacher's samples parse and match their caption."""
    import argparse
    import sys

    from ..assets import default_path

    ap = argparse.ArgumentParser(prog=prog, description=teacher_eval_main.__doc__)
    ap.add_argument("--teacher", help="teacher base folder (default: the bundled Shapes-world teacher)")
    ap.add_argument("--n", type=int, default=300, help="held-out random captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=16, help="sampling steps (Euler ODE)")
    ap.add_argument("--cfg", type=float, default=3.5, help="classifier-free guidance scale")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", help="write teacher_eval.json and teacher_eval.png (32 samples) here")
    argv = overrides_as_flags(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        ap.error("--n and --steps must be >= 1")
    if not math.isfinite(args.cfg):  # (NaN sampled black scenes and wrote NaN into the JSON)
        ap.error(f"--cfg must be a number, got {args.cfg}")
    if not 0 <= args.seed < 2**32:  # numpy's range (else "expected non-negative integer" once the teacher loaded)
        ap.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():  # before the evaluation, not after
        ap.error(f"--out {args.out} is a file; give a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = default_path("teacher", args.teacher)
    result, images = evaluate_teacher(base, n=args.n, seed=args.seed, steps=args.steps, cfg_scale=args.cfg)
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # whole or not at all: a Ctrl-C or a full disk midway keeps an earlier report, not half of one
        write_atomic(out / "teacher_eval.json", json.dumps(result, indent=2) + "\n")
        k = min(32, len(images))
        write_png(out / "teacher_eval.png", image_grid([list(images[i:i + 8]) for i in range(0, k, 8)], scale=2))
        print(f"wrote {out / 'teacher_eval.json'} and {out / 'teacher_eval.png'}")
    return 0


def train_teacher(cfg: TeacherConfig) -> Path:
    """Train the teacher on (render, caption) pairs; writes <output_dir>/base (a `model.base` folder)."""
    from ..backbones.sd3 import SD3Backbone

    # (a run starts by replacing base/: new, or init's copy)
    out, log, rng = _start(cfg, "base", "a teacher")
    if cfg.init:
        base = continue_base(Path(cfg.init), out / "base")
    else:
        with disk_writes(out / "base", f"the previous base/ there, if any, is untouched: {AGAIN}"):
            with publishing(out / "base") as folder:
                build_base(folder, cfg)
        base = out / "base"
    device = resolve_device(cfg.device)
    backbone = SD3Backbone.from_pretrained(base).to(device)
    teacher = backbone.load_transformer(base).to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr, weight_decay=0.0)
    budget = Budget(cfg.steps, cfg.max_minutes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * max(0.05, 1 - budget.progress(s)))
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_captions = scene_batch(np.random.default_rng([cfg.seed, 99]), 64)[1]
    bar = tqdm(total=cfg.steps, desc="teacher")
    batches = scene_batches(rng, cfg.batch_size, cfg.workers, cfg.seed)
    step = saved = 0
    while not budget.over(step):
        step += 1
        pixels, captions = next(batches)
        captions = ["" if rng.random() < cfg.caption_dropout else c for c in captions]
        with torch.no_grad():
            x0 = backbone.encode_image(pixels.to(device))
        cond = backbone.encode_prompt(captions, with_reference=False)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen)).to(device)  # logit-normal times, as SD3 trains
        v = backbone.velocity(teacher, flow.add_noise(x0, eps, t), t, cond)
        loss = (v - flow.velocity_target(x0, eps)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        last = budget.over(step)
        if step % cfg.log_every == 0 or last:
            log.log(step, {"fm_loss": loss.detach(), "lr": sched.get_last_lr()[0],
                           "elapsed_s": time.monotonic() - budget.start})
        if step % cfg.sample_every == 0 or last:
            teacher.eval()
            imgs = sample_teacher(backbone, teacher, eval_captions, cfg.sample_steps, cfg.cfg_scale, cfg.seed)
            teacher.train()
            quality = teacher_quality(imgs, eval_captions)
            log.log(step, {f"eval_{k}": v for k, v in quality.items()})
            # each whole or not at all: the app shows the newest grid, and base/ is the model (and an `init=`)
            held = f"of step {saved}" if saved else "it started from"
            with disk_writes(f"step {step}'s teacher, samples and report in {out}",
                             f"{base} holds the teacher {held} whole: free space, then continue from it with "
                             f"init={base} (and another output_dir)"):
                (out / "samples").mkdir(exist_ok=True)
                write_png(out / f"samples/step_{step:06d}.png",
                          image_grid([list(imgs[i:i + 8]) for i in range(0, 32, 8)], scale=2))
                with publishing(base / "transformer") as folder:
                    teacher.save_pretrained(folder)
                saved = step
                write_atomic(out / "report.json", json.dumps({**quality, "steps": step,
                                                              "eval_captions": len(eval_captions),
                                                              "minutes": (time.monotonic() - budget.start) / 60},
                                                             indent=2))
    bar.close()
    log.close()
    return base


def run(stage: str, overrides: list[str]) -> Path:
    """Entry point of `python -m npedit shapes STAGE`."""
    cfg = make_config(stage, overrides)
    return {"vae": train_vae, "teacher": train_teacher, "fast-vae": train_fast_vae,
            "ref-encoder": train_ref_encoder}[stage](cfg)


def config_fields(stage: str) -> list[str]:
    return [f.name for f in dataclasses.fields(CONFIGS[stage])]
