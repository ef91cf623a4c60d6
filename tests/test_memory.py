"""The whole run's memory check: every network a training run holds, costed from meta-device builds before any
weights load, against the device's free memory (a monkeypatched figure here)."""

import re

import pytest
import torch

from npedit import lora
from npedit.config import load_config
from npedit.folders import human_size
from npedit.training import memory


def config(base, manifest, out, *extra, judge=None):
    judged = [f"judge.path={judge}"] if judge else ["loss.lambda_vlm=0", "loss.lambda_target=1"]
    return load_config(None, [f"model.base={base}", f"data.train={manifest}", f"output_dir={out}", "data.batch_size=2",
                              "critic_steps=1", "sample_every=0", "optim.skip_grad_norm=1e9", *judged, *extra])


def estimate(cfg) -> int:
    return sum(n for n, _ in memory.run_parts(cfg, memory.count_models(cfg)[0]).values())


def held_bytes(trainer) -> int:
    """Bytes of every distinct tensor the trainer's networks hold (a tensor shared between them counted once)."""
    nets = [trainer.backbone, trainer.teacher, trainer.student, trainer.critic, trainer.judge]
    tensors = {t.data_ptr(): t for net in nets if net is not None for t in [*net.parameters(), *net.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("extra", [(), ("model.lora_rank=2",), ("model.dtype=bfloat16", "judge.dtype=bfloat16")])
def test_estimate_is_what_the_trainer_holds_with_its_optimiser_state(tiny_zimage, tiny_judge, tiny_manifest, tmp_path,
                                                                      extra):
    """Full fine-tuning, LoRA over the teacher's shared weights, bfloat16 frozen parts: the estimate from meta builds
    equals the bytes of the tensors the built trainer holds plus, per trained parameter, its float32 gradient and
    AdamW's two float32 moments (as one iteration allocates them)."""
    from npedit.training.trainer import Trainer

    cfg = config(tiny_zimage, tiny_manifest, tmp_path / "run", "judge.temperature_warmup_steps=0", *extra,
                 judge=tiny_judge)
    trainer = Trainer(cfg)
    trainer.iteration()
    trained = [p for opt in (trainer.opt_student, trainer.opt_critic) for g in opt.param_groups for p in g["params"]]
    moments = sum(t.numel() * t.element_size() for opt in (trainer.opt_student, trainer.opt_critic)
                  for state in opt.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
    assert moments == 8 * sum(p.numel() for p in trained)  # AdamW: two float32 copies
    grads = 4 * sum(p.numel() for p in trained)
    held = held_bytes(trainer) + grads + moments
    # loaded in bfloat16, a model may keep a float buffer (a rotary table) in float32: 2 bytes an element more
    nets = [trainer.backbone, trainer.teacher, trainer.judge]
    slack = 2 * sum(b.numel() for n in nets for b in n.buffers() if b.is_floating_point()) if "bfloat16" in str(extra) \
        else 0
    assert estimate(cfg) <= held <= estimate(cfg) + slack  # exact in float32; a lower bound always
    assert ("model.lora_rank=2" in extra) == lora.has_lora(trainer.student)


def test_a_run_that_does_not_fit_is_refused_before_any_weights_load(tiny_zimage, tiny_judge, tiny_manifest, tmp_path,
                                                                    monkeypatch):
    """One line naming each part's size, the activations left out, and settings that would fit, each with the size
    it would need; the suggested LoRA run then fits the same memory, and check_memory=false skips the check."""
    from npedit.training import trainer as trainer_module

    cfg = config(tiny_zimage, tiny_manifest, tmp_path / "run", judge=tiny_judge)
    lora_cfg = config(tiny_zimage, tiny_manifest, tmp_path / "run", f"model.lora_rank={memory.SUGGESTED_RANK}",
                      judge=tiny_judge)
    free = estimate(lora_cfg)
    assert free < estimate(cfg)
    monkeypatch.setattr(memory, "device_memory", lambda device: (free, "free on cuda:0 (a test GPU)"))
    real_load = trainer_module.load_backbone

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the memory check")

    monkeypatch.setattr(trainer_module, "load_backbone", no_load)
    with pytest.raises(memory.MemoryCheckError) as info:
        trainer_module.Trainer(cfg)
    message = str(info.value)
    assert "\n" not in message and f"more than the {human_size(free)} free on cuda:0 (a test GPU)" in message, message
    assert f"at least {human_size(estimate(cfg))}" in message and "activations (not counted" in message, message
    for part in ("teacher", "student", "critic", "judge", "text encoder", "VAE"):
        assert f"{part} " in message, (part, message)
    assert f"model.lora_rank={memory.SUGGESTED_RANK} ({human_size(free)})" in message, message
    assert "model.dtype=bfloat16 judge.dtype=bfloat16" in message and "a smaller judge" in message, message
    assert "check_memory=false" in message, message
    monkeypatch.setattr(trainer_module, "load_backbone", real_load)
    assert trainer_module.Trainer(lora_cfg).judge is not None  # the suggestion fits what was free
    skipped = config(tiny_zimage, tiny_manifest, tmp_path / "run", "check_memory=false", judge=tiny_judge)
    assert trainer_module.Trainer(skipped).critic is not None


def test_the_cli_refuses_in_one_line(tiny_zimage, tiny_manifest, tmp_path, monkeypatch, capsys):
    from npedit.cli import main

    monkeypatch.setattr(memory, "device_memory", lambda device: (1 << 20, "of RAM available"))
    with pytest.raises(SystemExit) as info:
        main(["train", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", f"output_dir={tmp_path}/run",
              "loss.lambda_vlm=0", "max_steps=1"])
    assert str(info.value).startswith("error: this run's models need at least") and "1.0 MiB of RAM" in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_student_grown_or_loaded_is_costed_as_built(tiny_zimage, tiny_manifest, tmp_path):
    """A warm-up run without DMD drops the teacher once the student is copied; a loaded student with LoRA keeps its
    own frozen weights in model.dtype; optim.frozen parameters carry no optimiser state."""
    from npedit.training.trainer import Trainer

    warm = config(tiny_zimage, tiny_manifest, tmp_path / "w", "stage=warmup", "loss.lambda_target=0",
                  "optim.frozen=[layers.0]")
    trainer = Trainer(warm)
    parts = memory.run_parts(warm, memory.count_models(warm)[0])
    assert "teacher" not in parts and "critic" not in parts and trainer.teacher is None
    trained = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)
    held = sum(t.numel() * 4 for t in [*trainer.student.parameters(), *trainer.student.buffers()])
    assert parts["student"][0] == held + 12 * trained
    loaded = config(tiny_zimage, tiny_manifest, tmp_path / "l", f"model.student={tiny_zimage}", "model.lora_rank=2",
                    "loss.lambda_dmd=0")
    parts = memory.run_parts(loaded, memory.count_models(loaded)[0])
    student = memory.count_models(loaded)[0]["student"]
    assert parts["student"][0] == 2 * student.width * 16 + memory.held(student, 4)


def test_device_memory_is_the_gpu_free_figure_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert memory.device_memory(torch.device("cuda:0")) == (7 << 30, "free on cuda:0 (NVIDIA H100)")
    monkeypatch.setattr("npedit.folders.available_memory", lambda: 3 << 30)
    assert memory.device_memory(torch.device("cpu")) == (3 << 30, "of RAM available")


@pytest.mark.parametrize("extra", [("model.reference_encoder=2", "model.reference_encoder_gated=true"),
                                   ("model.reference_encoder=2", "model.lora_rank=2"),
                                   ("model.add_layers=1", "model.reference_mode=channels")])
def test_an_sd3_student_from_the_teacher_is_costed_as_built(tmp_path, tiny_manifest, extra):
    """The SD3 student's own parameters (reference embedding or projection, a new reference encoder, added blocks)
    are counted as prepare_student, add_reference_encoder and add_layers build them; under LoRA they train in full."""
    from npedit.backbones.tiny import build_tiny_sd3
    from npedit.training.trainer import Trainer

    base = build_tiny_sd3(tmp_path / "sd3")
    cfg = config(base, tiny_manifest, tmp_path / "run", *extra)
    trainer = Trainer(cfg)
    trained = sum(p.numel() for net in (trainer.student, trainer.critic) for p in net.parameters() if p.requires_grad)
    assert estimate(cfg) == held_bytes(trainer) + 12 * trained


def test_a_run_from_cached_hub_ids_offline_is_counted_on_their_snapshots(tiny_zimage, tiny_judge, tiny_manifest,
                                                                         tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 a run from hub ids in the cache is counted on their snapshots and loads from them
    (transformers' own AutoTokenizer.from_pretrained(hub_id, subfolder=...) fails there: every loader goes through
    folders.locate); a model whose weights are not all downloaded yet is named as not counted."""
    import huggingface_hub
    from test_hub_ids import cached

    from npedit.training.trainer import Trainer

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached(cache, "owner/zimage", tiny_zimage)
    judge = cached(cache, "owner/judge", tiny_judge)
    cfg = config("owner/zimage", tiny_manifest, tmp_path / "run", judge="owner/judge")
    models, missing = memory.count_models(cfg)
    assert not missing and {"teacher", "student", "text_encoder", "vae", "judge"} <= set(models)
    assert estimate(cfg) == estimate(config(tiny_zimage, tiny_manifest, tmp_path / "run", judge=tiny_judge))
    assert Trainer(cfg).judge is not None
    monkeypatch.setattr("npedit.folders.hub_unreachable", lambda: None)  # online, the judge's download cut short
    for weights in judge.glob("*.safetensors"):
        weights.unlink()
    line = memory.check_run_memory(cfg, torch.device("cpu"))
    assert "not counted: judge (owner/judge: no local copy yet)" in line and not re.search(r"judge \d", line), line
