"""`NPEditPipeline`: a diffusers pipeline around the student, with the few-step sampler."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from dataclasses import dataclass

from . import flow
from .backbones import backbone_class, family_of_class_name, import_families
from .domain import Domain, read_domain, write_domain
from .images import DEFAULT_MAX_SIDE, editable_size, load_image, pil_to_tensor, split_batch, tensor_to_pil
from .sampler import StepState, draw_noise, sample

logger = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 2000


@dataclass
class NPEditPipelineOutput(BaseOutput):
    """Edited images (PIL list, numpy (B, H, W, 3) in [0, 1], torch (B, 3, H, W) in [0, 1] or latents)."""

    images: list | np.ndarray | torch.Tensor


def _is_file(text: str) -> bool:
    """Whether `text` names a file here; False for text that cannot be a path (too long a name, a NUL)."""
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):
        return False


def check_instruction(text: str) -> str:
    """Strip an instruction; refuse empty or absurdly long ones with a clear message."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the instruction is empty: say what to change, e.g. 'make the circle blue'")
    text = text.strip()
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"the instruction has {len(text)} characters; at most {MAX_INSTRUCTION_CHARS} are accepted")
    return text


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_call_arguments(num_inference_steps, generator, output_type, images: int,
                         num_images_per_prompt: int = 1) -> None:
    """Refuse a call's wrong-typed arguments before any model runs, each with a message naming what is accepted
    (`images`: how many inputs, each edited `num_images_per_prompt` times)."""
    for name, value in (("num_inference_steps", num_inference_steps), ("num_images_per_prompt", num_images_per_prompt)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if num_inference_steps > flow.MAX_SAMPLING_STEPS:
        raise ValueError(f"num_inference_steps must be at most {flow.MAX_SAMPLING_STEPS}, got {num_inference_steps} "
                         f"(this editor was trained to sample in a few steps: 4 by default)")
    batch = images * int(num_images_per_prompt)
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
        kinds = sorted({type(g).__name__ for g in gens if not isinstance(g, torch.Generator)})
        raise ValueError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of "
                         f"them, one per image; got {', '.join(kinds)}")
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}: give one per sample")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}")


def group_indices(keys: list) -> list[list[int]]:
    """Indices of equal keys, grouped: groups in the order of their first index, indices ascending in each."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def check_stackable(output_type: str, keep_size: bool, sizes: list, work: list) -> None:
    """Refuse an output type that stacks the edits into one array when their sizes differ, saying what works."""
    if output_type == "latent" and len(set(work)) > 1:
        raise ValueError(f"output_type 'latent' stacks the latents into one tensor, but the images have different "
                         f"working sizes {sorted(set(work))}: edit each size in a call of its own")
    if output_type not in ("np", "pt"):
        return
    if len(set(work)) > 1:
        raise ValueError(f"output_type {output_type!r} stacks the edits into one array, but the images have different "
                         f"working sizes {sorted(set(work))} (each is edited at its own aspect): use output_type='pil'")
    if keep_size and len(set(sizes)) > 1:
        raise ValueError(f"output_type {output_type!r} stacks the edits into one array, but the images have different "
                         f"sizes {sorted(set(sizes))}: use output_type='pil' or keep_size=False")


# from_pretrained's keywords that say how to download, passed on to the hub client as diffusers passes them
HUB_KWARGS = ("cache_dir", "local_files_only", "proxies", "token", "force_download")


def hub_adapters(repo_id: str, revision: str | None = None, **hub) -> str | None:
    """The downloaded folder of hub repo `repo_id` when it holds LoRA adapters (`npedit.adapters`: its
    npedit_lora.json), else None (an editor repo, or an answer that is no file: diffusers' download then says why);
    `hub`: the download keywords of HUB_KWARGS (a cache_dir, local_files_only... the caller gave)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from .adapters import META_FILE

    hub = {k: v for k, v in hub.items() if k in HUB_KWARGS and v is not None}
    try:
        hf_hub_download(repo_id, META_FILE, revision=revision, **hub)
    except Exception:  # no such file (an editor repo), or no such repo: not adapters; the editor's load reports it
        return None
    return snapshot_download(repo_id, revision=revision, **hub)


class NPEditPipeline(DiffusionPipeline):
    """Instruction-based editing in a few steps: `pipe(image=..., prompt="make the sky pink")`."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "x0"]
    _optional_components = ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )
        self._backbone = None
        # what the editor was trained on (`from_pretrained` reads the folder's npedit_domain.json): a fixed
        # resolution makes it the working size of every input
        self.domain = Domain()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "NPEditPipeline":
        """`DiffusionPipeline.from_pretrained`, with our backbone modules imported first (their student classes).

        A folder of LoRA adapters (`python -m npedit export RUN --adapters`) loads too: its base model (or `base=`)
        supplies the rest, and the adapters are folded into the student (`npedit.adapters`), in `torch_dtype`.
        Weights are read from safetensors only; without a dtype every component is float32. `device=` moves the
        loaded editor there, and its models are checked against that device's free memory first (a CUDA one's too).
        A local path that is not an editor (or an editor folder missing a component) raises `CheckpointError`
        saying what it is. A hub id is downloaded, then checked as a folder is (`check_editor_folder`: each model's
        size, and all together against memory) before anything is built; when the hub cannot be reached, its cached
        snapshot loads, or one `CheckpointError` says where it was looked for (`folders.locate`)."""
        from .adapters import is_adapter_folder, load_adapter_pipeline
        from .devices import as_torch_dtype
        from .folders import check_editor_folder, found_nowhere, locate, looks_local

        revision = kwargs.get("revision")  # offline, the cache's snapshot of that revision, not of main
        path = locate(pretrained_model_name_or_path, "editor folder", revision)  # offline: a snapshot, or one error now
        import_families()  # (before the size check, which builds the classes model_index.json names)
        kwargs.setdefault("use_safetensors", True)  # weights are never unpickled (a .bin-only folder is refused)
        for key in ("torch_dtype", "dtype"):  # "bfloat16", as the CLI and configs name it
            if kwargs.get(key) is not None:
                kwargs[key] = as_torch_dtype(kwargs[key])
        if None not in (kwargs.get("torch_dtype"), kwargs.get("dtype")) and kwargs["torch_dtype"] != kwargs["dtype"]:
            raise ValueError(f"two dtypes for the editor: dtype={kwargs['dtype']} and torch_dtype="
                             f"{kwargs['torch_dtype']}")
        if kwargs.get("torch_dtype") is None and kwargs.get("dtype") is None:
            # float32 for every component, as the adapter path does (transformers alone would keep a text encoder
            # saved in bfloat16 as it is, beside a float32 transformer and VAE)
            kwargs["dtype"] = torch.float32
        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
        device = kwargs.pop("device", None)
        if not looks_local(path):  # the hub answers: a repo of adapters has no model_index.json for diffusers to read
            path = hub_adapters(path, revision, **{k: kwargs.get(k) for k in HUB_KWARGS}) or path
        if is_adapter_folder(path):
            check_editor_folder(path, dtype, device=device)
            pipe = load_adapter_pipeline(path, base=kwargs.pop("base", None), student=kwargs.pop("student", None),
                                         torch_dtype=kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None))
            pipe.domain = read_domain(path)
            return pipe.to(device) if device is not None else pipe
        try:
            # a hub id is fetched first (what diffusers' from_pretrained does before building), so that its snapshot
            # is checked like a local folder before any component is built
            folder = path if looks_local(path) else cls.download(path, **kwargs)
            check_editor_folder(folder, dtype, device=device, revision=revision)
            pipe = super().from_pretrained(folder, **kwargs)
        except OSError as exc:
            if Path(path).expanduser().exists():
                raise
            raise found_nowhere(path, exc, "editor folder") from None
        if folder != str(pretrained_model_name_or_path):  # downloaded, or a cached snapshot found offline
            # the hub id, as diffusers records it, not the cache folder
            pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        pipe.domain = read_domain(folder)
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def from_parts(cls, transformer, backbone, *, shift: float = flow.DEFAULT_SHIFT) -> "NPEditPipeline":
        """Assemble from a trained student transformer and a loaded backbone."""
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        return cls(transformer=transformer, scheduler=scheduler, **backbone.pipeline_components())

    @property
    def family(self) -> str:
        return family_of_class_name(type(self.transformer).__name__)

    @property
    def backbone(self):
        """The family adapter over this pipeline's frozen parts (built once, shares the modules)."""
        if self._backbone is None:
            names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
            parts = {n: getattr(self, n, None) for n in names}
            parts = {n: m for n, m in parts.items() if m is not None}
            self._backbone = backbone_class(self.family).from_components(transformer=self.transformer, **parts)
        return self._backbone

    def times(self, num_inference_steps: int) -> list[float]:
        """The sampling times for `num_inference_steps` under the scheduler's shift."""
        return flow.few_step_times(num_inference_steps, float(self.scheduler.config.shift))

    def working_size(self, size: tuple[int, int], max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
        """The (width, height) an image of `size` is edited at: its own aspect (no crop), its longest side the
        editor's trained resolution (`domain.resolution`, up or down: a Shapes editor knows 64 px scenes only), else
        at most `max_side`; within the backbone's limit either way."""
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        limit = self.backbone.max_side  # a larger image would not fit the transformer (e.g. SD3's position grid)
        side = min(max_side, limit or max_side)
        fixed = self.domain.resolution
        return editable_size(*size, self.backbone.pixel_multiple, min(fixed, side) if fixed else side,
                             upscale=bool(fixed))

    def working_note(self, size: tuple[int, int], max_side: int = DEFAULT_MAX_SIDE,
                     keep_size: bool = True) -> str | None:
        """A sentence for the user when an image of `size` is edited at another scale (the editor's trained resolution,
        `max_side` or the backbone's limit), else None; the CLI prints it and the app shows it."""
        (w, h), (ww, wh) = size, self.working_size(size, max_side)
        fixed, limit = self.domain.resolution, self.backbone.max_side
        cap = min(max_side, limit or max_side)
        if (max(w, h) == min(fixed, cap)) if fixed else (max(w, h) <= cap):
            return None  # not scaled, only rounded to the backbone's multiple: nothing a user would notice
        back = f" and the result resized back to {w}x{h}" if keep_size else ""
        if fixed:
            note = (f"This editor was trained on {fixed}x{fixed} {self.domain.name}-world images: your {w}x{h} image "
                    f"is edited at {ww}x{wh}{back}.")
            if self.domain.is_shapes:
                note += " It knows only simple shapes on plain backgrounds, so expect a photo to come back as shapes."
            return note
        why = (f"this editor's largest size, {limit} px" if limit and limit < max_side else
               f"max_side (--max-side) {max_side}")
        return f"Your {w}x{h} image is edited at {ww}x{wh} ({why}){back}."

    def prepare_images(self, images, max_side: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Load and fit images that share one working size; returns (B, 3, H, W) in [-1, 1] and original sizes.
        Images of different working sizes are refused (one tensor cannot hold them; the call groups them itself)."""
        pils = [load_image(im) for im in images]
        sizes = [im.size for im in pils]
        work = [self.working_size(s, max_side) for s in sizes]
        if len(set(work)) > 1:
            raise ValueError(f"the images have different working sizes {sorted(set(work))}: prepare each size apart")
        return torch.stack([pil_to_tensor(im.resize(w, resample=3)) for im, w in zip(pils, work)]), sizes

    def _device(self) -> torch.device:
        """Where the models run: diffusers' `_execution_device` under offload hooks, else the transformer's own
        device (read from one parameter: `_execution_device` walks every component, ~1.3 ms per call here)."""
        if any(hasattr(m, "_hf_hook") for m in (self.transformer, self.vae)):
            return self._execution_device
        return next(self.transformer.parameters()).device

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] = "",
        num_inference_steps: int = 4,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
        keep_size: bool = True,
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Edit `image` following `prompt`: a path, a PIL image, a numpy array ((H, W, C), uint8 or float in [0, 1]),
        a torch tensor ((C, H, W) in [0, 1]), a list of those, or a numpy (B, H, W, C) / torch (B, C, H, W) batch
        (so `output_type="np"` or `"pt"` output feeds straight back in).

        `num_images_per_prompt` edits of each input, in diffusers' order (input 0's edits first); `generator`: one
        for the batch, or one per output image (diffusers' convention: image b's noise then comes from generator b
        alone, so it is the single edit seeded alike).
        Each image is edited at its own working size (`working_size`: its own aspect, never cropped; an editor with a
        fixed resolution, e.g. the Shapes world's 64 px, at that resolution, `working_note` says so in words): images
        of several working sizes run one pass per size, in the order of each size's first image, and come back in
        input order; one `generator` serves those passes in turn. `python -m npedit edit` and the app edit through
        this call, so the same image, prompt, seed and steps give them the same result.
        `callback_on_step_end(pipe, step, t, {"latents": x_t, "x0": x0})` runs after each step (and size), t in [0, 1];
        `callback_on_step_end_tensor_inputs` picks the keys (default both). Its return value is not used: each step
        re-noises x0 with fresh noise, so there is no running latent for it to replace.
        Outputs are resized back to each input's size unless `keep_size` is False.
        """
        images = split_batch(image)
        if not isinstance(prompt, (str, list, tuple)):
            swapped = isinstance(prompt, (Image.Image, np.ndarray, torch.Tensor))  # diffusers' order is (prompt, image)
            hint = " (image and prompt swapped? pass both by name)" if swapped else ""
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}{hint}")
        if isinstance(image, str) and isinstance(prompt, str) and not _is_file(image) and _is_file(prompt):
            raise ValueError(f"image {image!r} is no file, and the prompt {prompt!r} is one: image and prompt "
                             "swapped? pass both by name")
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if image is None or not images or len(prompts) != len(images):
            raise ValueError("give one image and one prompt (or equal-length lists of both)")
        prompts = [check_instruction(p) for p in prompts]
        check_call_arguments(num_inference_steps, generator, output_type, len(images), num_images_per_prompt)
        n = int(num_images_per_prompt)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = self._callback_tensor_inputs if callback_on_step_end_tensor_inputs is None else list(
            callback_on_step_end_tensor_inputs)
        if not set(tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}; got "
                             f"{tensor_inputs}")
        pils = [load_image(im) for im in images]
        sizes = [im.size for im in pils]
        work = [self.working_size(s, max_side) for s in sizes]
        check_stackable(output_type, keep_size, sizes, work)
        # one pass per working size, in the order of each size's first image: one pass when all share it
        groups = group_indices(work)
        device = self._device()
        out_images, out_latents = [None] * (len(images) * n), None
        # diffusers' denoising bar (`set_progress_bar_config(disable=True)` silences it); the pipeline's alone: the
        # sampler, shared with training, shows none
        with self.progress_bar(total=num_inference_steps * len(groups)) as bar:
            for group in groups:
                rows = [i * n + k for i in group for k in range(n)]  # this group's outputs: input i's copies in order
                pixels = torch.stack([pil_to_tensor(pils[i].resize(work[i], resample=3)) for i in group])
                gens = [generator[j] for j in rows] if isinstance(generator, (list, tuple)) else generator
                latents = self._sample(pixels, [prompts[i] for i in group], n, gens, num_inference_steps, device,
                                       callback_on_step_end, tensor_inputs, bar)
                if output_type == "latent":
                    out_latents = latents  # one group: check_stackable refused several working sizes
                    continue
                decoded = self.backbone.decode_latents(latents).clamp(-1, 1)  # (B, 3, H, W)
                for j, x in zip(rows, decoded):
                    im, size = tensor_to_pil(x), sizes[j // n]
                    out_images[j] = im.resize(size, resample=3) if keep_size and im.size != size else im
        if output_type == "latent":
            out = out_latents
        elif output_type == "pil":
            out = out_images
        elif output_type == "np":
            out = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in out_images])
        else:
            out = torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1).float() / 255
                               for p in out_images])
        self.maybe_free_model_hooks()
        return NPEditPipelineOutput(images=out) if return_dict else (out,)

    def _sample(self, pixels, prompts, n, generator, num_inference_steps, device, callback_on_step_end,
                tensor_inputs, bar) -> torch.Tensor:
        """Edit one working size's images (B, 3, H, W) `n` times each; returns the latents (B n, C, h, w)."""
        bb = self.backbone
        # each input encoded once; its copies share the reference and draw their own noise, input 0's first
        reference = bb.encode_image(pixels.to(device)).repeat_interleave(n, dim=0)  # (B n, C, h, w)
        cond = bb.encode_prompt([p for p in prompts for _ in range(n)], with_reference=True)
        noise = draw_noise(reference.shape, generator, device, reference.dtype)

        def denoise(x_t, t):
            return bb.velocity(self.transformer, x_t, t, cond, reference=reference)

        def on_step(s: StepState):
            bar.update()
            if callback_on_step_end is not None:
                tensors = {"latents": s.x_t, "x0": s.x0}
                callback_on_step_end(self, s.step, s.t, {k: tensors[k] for k in tensor_inputs})

        return sample(denoise, noise, self.times(num_inference_steps), generator=generator, callback=on_step)

    def with_vae(self, vae) -> "NPEditPipeline":
        """This pipeline with its VAE replaced by `vae`, which must share the latent space (channels and
        downsampling; e.g. a `PatchAutoencoder` distilled from this VAE). The models are shared, not copied."""
        from .backbones.vae import LatentCodec

        old, new = LatentCodec(self.vae), LatentCodec(vae)
        if (old.channels, old.downsample) != (new.channels, new.downsample):
            raise ValueError(f"the new VAE's latents ({new.channels} channels, downsample {new.downsample}) do not "
                             f"match this pipeline's ({old.channels} channels, downsample {old.downsample})")
        parts = {name: getattr(self, name) for name in self.components}
        pipe = type(self)(**{**parts, "vae": vae})
        pipe.domain = self.domain
        return pipe

    def save_pretrained(self, save_directory, *, training: str | None = None, card: dict | None = None, **kwargs):
        """Save every component as safetensors plus a model card (README.md); `training` says how it was trained
        (the trainer passes its stage; see `training_summary`), `card` more of the card (`model_card`'s keywords),
        and the domain it edits in (`npedit_domain.json`)."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        forget_load_paths(save_directory)
        Path(save_directory, "README.md").write_text(model_card(self, training, **(card or {})), encoding="utf-8")
        if self.domain != Domain():  # a copy of a Shapes editor edits at its 64 px too, wherever it is loaded from
            write_domain(save_directory, self.domain)


STAGE_SUMMARIES = {
    "npedit": "trained with NP-Edit: no before/after pairs in this stage; a frozen vision-language judge scores "
              "each edit and distribution matching against a text-to-image teacher keeps outputs realistic",
    "sft": "trained with paired SFT: flow matching on before/after pairs (the supervised baseline, not NP-Edit)",
    "warmup": "after the identity warm-up only: it reproduces its input image and does not edit yet",
}


def training_summary(stage: str, student: str | None = None, loss=None, data_train: str | None = None,
                     lora_rank: int = 0) -> str:
    """One sentence on how a stage's export was trained, naming the checkpoint it continued from. For stage
    `npedit`, `loss` (a LossConfig) says which signals were on: the card must not say "no pairs" for a run that
    regressed onto true edits (`loss.lambda_target` > 0 with `data_train` "shapes"), nor name a judge or DMD that
    had weight 0. `lora_rank` > 0: the stage trained adapters (`model.lora_rank`), folded in at export."""
    summary = STAGE_SUMMARIES.get(stage, f"trained by the {stage!r} stage")
    if stage == "npedit" and loss is not None:
        signals = [name for name, weight in (("a frozen vision-language judge", loss.lambda_vlm),
                                             ("distribution matching against a text-to-image teacher", loss.lambda_dmd))
                   if weight > 0]
        if loss.uses_targets:
            paired = data_train == "shapes"
            summary = ("trained by unrolled regression: its sampled few-step output is pulled towards each sample's "
                       "target image (`loss.lambda_target`, `loss.lambda_target_pixels`), "
                       + ("here the true edit, so this stage uses before/after pairs" if paired else
                          "from the training data (pairs if those targets are true edits)")
                       + (", alongside " + " and ".join(signals) if signals else ", with no judge and no DMD"))
        elif len(signals) < 2:
            summary = ("trained with NP-Edit, no before/after pairs in this stage, with "
                       + (signals[0] + " only (the other loss weight is 0)" if signals else
                          "every loss weight at 0 (it did not learn)"))
    if lora_rank:
        summary += f", as low-rank adapters (LoRA, rank {lora_rank}) now folded into the weights"
    return summary + (f" (its student started from `{student}`)" if student else "")


def forget_load_paths(folder: str | Path) -> None:
    """Drop `_name_or_path` from the component configs saved in `folder`: diffusers writes where each model was loaded
    from (the trainer's checkpoint, its base's VAE: paths of that machine), which names nothing where it is shared."""
    import json

    for config in [*Path(folder).glob("*/config.json"), *Path(folder).glob("*/scheduler_config.json")]:
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_card(pipe: NPEditPipeline, training: str | None = None, *, repo_id: str | None = None,
               base_model: str | None = None, license: str | None = None, sections: tuple[str, ...] = ()) -> str:
    """A model card (Hub YAML front matter and how to load it) for a saved pipeline; `training` (a sentence fragment)
    says how it was trained, `repo_id` is its hub id for the loading lines, `base_model` a hub id it derives from,
    `license` a Hub license id (default "other"), `sections` more Markdown (its training config, its metrics)."""
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    mode = getattr(pipe.transformer.config, "reference_mode", None)
    seen = f" It sees the reference as {mode} (`reference_mode`)" if mode else ""
    layers = getattr(pipe.transformer.config, "reference_encoder_layers", 0)
    seen += (f", through a reference encoder of {layers} convolutions (`reference_encoder_layers`)." if layers and mode
             else "." if mode else "")
    how = training or ("for few-step editing; how it was trained is not recorded here (see training_config.json if "
                       "present)")
    where = repo_id or "OWNER/NAME"  # (the folder's hub id is known only when it is pushed)
    base = f"base_model: {base_model}\n" if base_model else ""
    rest = "".join(f"\n{section.strip()}\n" for section in sections)
    return f"""---
library_name: diffusers
pipeline_tag: image-to-image
license: {license or "other"}
{base}tags: [image-editing, instruction-editing, npedit, few-step]
---
# NP-Edit editor ({pipe.family})

An instruction-based image editor {how}. Student transformer: {type(pipe.transformer).__name__},
{n_params:,} parameters.{seen} Sampling: {len(pipe.times(4))} steps, time shift {pipe.scheduler.config.shift}.

## Use it

It needs the `npedit` package of the NP-Edit workbench (`pip install -e .` in a clone of it): its transformer class
is defined there, so diffusers alone cannot build it.

```python
from npedit import NPEditPipeline
pipe = NPEditPipeline.from_pretrained("{where}")  # or a folder; revision="TAG_OR_COMMIT" for another version
edited = pipe(image="input.png", prompt="make the circle blue").images[0]
edited.save("edited.png")
```
From the command line, and in the workbench's app:

```bash
python -m npedit edit --model {where} --image input.png --instruction "make the circle blue" --output edited.png
python app.py --model {where}
```
{rest}"""


def carry_over(src: str | Path, out: str | Path, note: str) -> None:
    """After saving a changed copy of the editor folder `src` to `out`: bring over what the trainer's export adds
    beside the models (domain, training config), the editor's own critic (`critic/`, for DMD maps: a change that
    keeps the latent space keeps it valid) and `src`'s model card with `note` (a paragraph) appended. A file that
    is a link out of `src` is left out, with a warning (see `_linked_out`)."""
    import shutil

    src, out = Path(src), Path(out)
    for extra in ("npedit_domain.json", "training_config.json"):
        if (src / extra).is_file() and not _linked_out(src / extra, src):
            shutil.copy(src / extra, out / extra)
    if (src / "critic" / "config.json").is_file() and not (out / "critic").exists():
        shutil.copytree(src / "critic", out / "critic", ignore=lambda folder, names: [
            n for n in names if _linked_out(Path(folder) / n, src)])
    if (src / "README.md").is_file() and not _linked_out(src / "README.md", src):
        card = (src / "README.md").read_text(encoding="utf-8")
        (out / "README.md").write_text(card + "\n" + note + "\n", encoding="utf-8")


def _linked_out(path: Path, src: Path) -> bool:
    """Whether `path` resolves outside the editor folder `src` (a downloaded folder's README.md -> ~/.ssh/id_rsa
    would be copied into an editor its user may publish); a hub download's links into its repo's cache (blobs/)
    stay inside. Warns when it does."""
    root = src.resolve()
    repo = next((p for p in root.parents if p.name.startswith("models--")), None)  # the hub cache's repo folder
    target = path.resolve()
    if target.is_relative_to(root) or (repo is not None and target.is_relative_to(repo)):
        return False
    logger.warning("not carried over: %s links outside the editor folder %s (to %s)", path.relative_to(src), src,
                   target)
    return True


def register_with_diffusers() -> None:
    """Let `diffusers.DiffusionPipeline.from_pretrained(folder)` load a saved editor as an `NPEditPipeline`."""
    import diffusers

    # diffusers reads a model_index.json `_class_name` that is a plain name as an attribute of the diffusers module
    # (pipeline_loading_utils._get_pipeline_class): it has no registry for pipelines defined elsewhere, and its other
    # route (`custom_pipeline=`, or a [module, class] pair) runs a .py file from the folder under trust_remote_code,
    # which we never set. Components are another matter: it takes their modules from sys.modules once imported.
    import_families()
    if getattr(diffusers, NPEditPipeline.__name__, None) is None:  # never shadow a class of diffusers' own
        setattr(diffusers, NPEditPipeline.__name__, NPEditPipeline)


register_with_diffusers()
