"""LoRA (model.lora_rank): adapters start at zero, fold into plain weights, share the teacher's tensors, and a LoRA
run trains, checkpoints small adapters, resumes and exports a plain editor."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_npedit  # tests/cli_runner.py
from npedit import lora
from npedit.backbones.sd3 import SD3Backbone
from npedit.backbones.tiny import build_tiny_sd3
from npedit.config import load_config


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    path = build_tiny_sd3(tmp_path_factory.mktemp("lora_sd3"))
    backbone = SD3Backbone.from_pretrained(path)
    return path, backbone, backbone.load_transformer(path).requires_grad_(False).eval()  # frozen, as in training


def _inputs(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompt(["make the circle red", "remove the square"], with_reference=True)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ref = torch.randn(2, 4, 8, 8, generator=g)
    return x, torch.tensor([0.3, 0.8]), cond, ref


def test_adapters_start_at_zero_and_fold_into_plain_weights(sd3, tmp_path):
    path, backbone, teacher = sd3
    student = backbone.prepare_student(teacher).eval()
    x, t, cond, ref = _inputs(backbone)
    with torch.no_grad():
        before = backbone.velocity(student, x, t, cond, reference=ref)
    wrapped = lora.add_lora(student, rank=3, alpha=6, train=("ref_embed",))
    assert wrapped and all(".attn." in n or ".ff" in n for n in wrapped)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"ref_embed"} | {f"{n}.lora_{s}.weight" for n in wrapped for s in ("down", "up")}
    with torch.no_grad():
        assert torch.equal(backbone.velocity(student, x, t, cond, reference=ref), before)  # the up half is zero
        for name in wrapped:
            student.get_submodule(name).lora_up.weight.normal_(0, 0.05)
        student.ref_embed.normal_(0, 0.05)
        after = backbone.velocity(student, x, t, cond, reference=ref)
    assert not torch.allclose(after, before, atol=1e-4)
    plain = lora.merged_copy(student)
    assert not lora.has_lora(plain) and type(plain) is type(student)
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(plain, x, t, cond, reference=ref), after, atol=1e-5, rtol=1e-4)
    plain.save_pretrained(tmp_path / "plain")  # a plain student folder: what every loader reads
    loaded = backbone.load_transformer(tmp_path / "plain", for_student=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(loaded, x, t, cond, reference=ref), after, atol=1e-5, rtol=1e-4)
    state = lora.adapter_state(student)
    fresh = backbone.prepare_student(teacher)
    lora.add_lora(fresh, rank=3, alpha=6, train=("ref_embed",))
    lora.load_adapter_state(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(fresh.eval(), x, t, cond, reference=ref), after)
    other = backbone.prepare_student(teacher)
    lora.add_lora(other, rank=2, train=("ref_embed",))
    with pytest.raises(ValueError, match="not the same LoRA rank"):
        lora.load_adapter_state(other, state)


@pytest.mark.parametrize("mode", ["tokens", "channels"])
def test_a_student_with_a_reference_encoder_folds_into_the_same_architecture(sd3, mode):
    _, backbone, teacher = sd3
    student = backbone.add_reference_encoder(backbone.prepare_student(teacher, reference_mode=mode), 2, gated=True)
    base_names = {n for n, _ in teacher.named_parameters()}
    own = tuple(n for n, _ in student.named_parameters() if n not in base_names)
    assert any(n.startswith("ref_encoder.") for n in own)
    lora.add_lora(student, rank=2, train=own)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x, t, cond, ref = _inputs(backbone, seed=1)
    plain = lora.merged_copy(student)
    assert plain.config.reference_encoder_layers == 2 and plain.config.reference_mode == mode
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(plain, x, t, cond, reference=ref),
                                   backbone.velocity(student.eval(), x, t, cond, reference=ref), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["tokens", "channels"])
def test_a_bfloat16_lora_student_trains_under_autocast_and_edits_without_it(sd3, mode):
    """model.dtype=bfloat16 with LoRA: a bfloat16 base beside float32 trained additions (reference embedding or
    projection, a reference encoder). A training step under CPU autocast (what mixed_precision=bf16 enters) and a
    pipeline edit of the same student outside autocast both run, the additions get float32 gradients, the token
    stream is bfloat16 as the teacher's in both, and the two agree."""
    from PIL import Image

    from npedit.pipeline import NPEditPipeline

    path, _, _ = sd3
    backbone = SD3Backbone.from_pretrained(path, torch_dtype=torch.bfloat16)
    teacher = backbone.load_transformer(path, torch_dtype=torch.bfloat16).requires_grad_(False).eval()
    student = backbone.add_reference_encoder(backbone.prepare_student(teacher, reference_mode=mode), 1)
    own = tuple(n for n, _ in student.named_parameters() if n.startswith("ref_"))
    lora.add_lora(student, rank=2, train=own)
    with torch.no_grad():  # trained-looking additions (all start at zero), so the reference reaches the output
        for p in student.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    streams = []
    student.transformer_blocks[0].register_forward_pre_hook(
        lambda _, args, kwargs: streams.append(kwargs["hidden_states"].dtype), with_kwargs=True)
    x, t, cond, ref = _inputs(backbone, seed=2)  # the trainer's reference latents are float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = backbone.velocity(student, x, t, cond, reference=ref)
    trained.square().mean().backward()
    assert torch.isfinite(trained).all()
    for name in own:
        grad = student.get_parameter(name).grad
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        edited = backbone.velocity(student.eval(), x, t, cond, reference=ref)
    torch.testing.assert_close(edited, trained.detach(), atol=0.02, rtol=0.02)  # one bf16 step at |v| ~ 2: 0.008
    pipe = NPEditPipeline.from_parts(student, backbone)
    out = pipe(image=Image.new("RGB", (32, 32), (200, 30, 30)), prompt="make it blue", num_inference_steps=2,
               output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert set(streams) == {torch.bfloat16} and len(streams) == 1 + 1 + 2


def test_targets_choose_layers_and_a_wrong_target_says_what_exists(sd3):
    _, backbone, teacher = sd3
    student = backbone.prepare_student(teacher)
    wrapped = lora.add_lora(student, rank=2, targets=("to_q", "to_v"))
    assert wrapped and all(n.endswith((".to_q", ".to_v")) for n in wrapped)
    with pytest.raises(ValueError, match="names no linear layer.*to_k"):
        lora.add_lora(backbone.prepare_student(teacher), rank=2, targets=("query_proj",))


def test_shared_weights_are_the_teachers_own_tensors(sd3):
    """Frozen parameters and buffers (SD3's position table) become the teacher's own tensors; outputs are as before."""
    _, backbone, teacher = sd3
    student = backbone.prepare_student(teacher).eval()
    own = ("ref_embed",)
    wrapped = lora.add_lora(student, rank=2, train=own)
    with torch.no_grad():
        student.ref_embed.normal_(0, 0.05)  # the student's own part, so its output differs from the teacher's
    x, t, cond, ref = _inputs(backbone)
    with torch.no_grad():
        before = backbone.velocity(student, x, t, cond, reference=ref)
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    buffers = [n for n, _ in student.named_buffers()]
    assert buffers == ["pos_embed.pos_embed"]
    assert lora.share_weights(student, teacher) == len(frozen) + len(buffers)
    layer = student.get_submodule(wrapped[0])
    assert layer.base.weight is teacher.get_submodule(wrapped[0]).weight
    assert student.pos_embed.pos_embed is teacher.pos_embed.pos_embed
    ids = {id(p) for p in teacher.parameters()}
    assert all(id(p) in ids for p in student.parameters() if not p.requires_grad)
    assert all(id(p) not in ids for p in student.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(backbone.velocity(student, x, t, cond, reference=ref), before)


def test_buffers_of_parts_trained_in_full_stay_their_own():
    """A buffer under a part that trains in full (an added block, a student-only encoder) may change with it: it is
    not shared, nor one of a different value; a frozen part's equal buffer is."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    teacher.requires_grad_(False)
    student = torch.nn.Sequential(*(type(m)(3) if i else torch.nn.Linear(3, 3) for i, m in enumerate(teacher)))
    student.load_state_dict(teacher.state_dict())
    # the last norm trains in full (its running statistics follow its training), the rest under an adapter
    lora.add_lora(student, rank=1, targets=("0",), train=("2.weight", "2.bias"))
    assert lora.trained_modules(student) == ["0.lora_down", "0.lora_up", "2"]
    with torch.no_grad():
        student[1].running_var.add_(1)  # no longer equal to the teacher's
    lora.share_weights(student, teacher)
    assert student[1].running_mean is teacher[1].running_mean and student[1].weight is teacher[1].weight
    assert student[1].running_var is not teacher[1].running_var
    assert student[2].running_mean is not teacher[2].running_mean
    assert student[0].base.weight is teacher[0].weight


def test_config_refuses_what_lora_does_not_go_with(tmp_path):
    base = ["model.base=x", "data.train=shapes", f"output_dir={tmp_path}", "judge.path=j"]
    with pytest.raises(ValueError, match="does not go with model.lora_rank"):
        load_config(None, [*base, "model.lora_rank=4", "model.add_layers=1"])
    with pytest.raises(ValueError, match="set mixed_precision=bf16"):
        load_config(None, [*base, "model.lora_rank=4", "model.dtype=bfloat16"])
    with pytest.raises(ValueError, match="lora_rank must be between"):
        load_config(None, [*base, "model.lora_rank=-1"])
    cfg = load_config(None, [*base, "model.lora_rank=8", "model.lora_targets=[to_q,to_k]"])
    assert cfg.model.lora_targets == ("to_q", "to_k") and cfg.model.lora_critic


def test_trainer_holds_one_copy_of_the_base_and_trains_only_adapters(sd3, tmp_path, tiny_manifest):
    from npedit.training.trainer import Trainer

    path, _, _ = sd3
    cfg = load_config(None, [f"model.base={path}", f"data.train={tiny_manifest}", f"output_dir={tmp_path}/run",
                             "stage=npedit", "loss.lambda_vlm=0", "loss.lambda_target=1", "data.batch_size=2",
                             "critic_steps=1", "model.lora_rank=2", "optim.lr=1e-2", "optim.skip_grad_norm=1e9"])
    trainer = Trainer(cfg)
    teacher_ids = {id(p) for p in trainer.teacher.parameters()}
    for net in (trainer.student, trainer.critic):
        assert lora.has_lora(net)
        assert all(id(p) in teacher_ids for p in net.parameters() if not p.requires_grad)  # no copy of the base
        assert net.pos_embed.pos_embed is trainer.teacher.pos_embed.pos_embed  # nor of its position table
    nets = (trainer.teacher, trainer.student, trainer.critic)
    distinct = {t.data_ptr(): t for net in nets for t in [*net.parameters(), *net.buffers()]}
    trained = [p for net in nets for p in net.parameters() if p.requires_grad]
    teacher_bytes = sum(t.numel() * t.element_size() for t in [*trainer.teacher.parameters(),
                                                                *trainer.teacher.buffers()])
    assert sum(t.numel() * t.element_size() for t in distinct.values()) == \
        teacher_bytes + sum(p.numel() * p.element_size() for p in trained)  # the teacher's tensors, then the trained
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student_before = lora.merged_state_dict(trainer.student)
    metrics = trainer.iteration()
    assert metrics["student_skipped"] == 0 and metrics["critic_skipped"] == 0
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_before.items())
    after = lora.merged_state_dict(trainer.student)
    changed = {k for k in after if not torch.equal(after[k], student_before[k])}
    assert "ref_embed" in changed and any(k.endswith("attn.to_q.weight") for k in changed)
    assert not any(k.startswith(("pos_embed", "proj_out", "norm_out", "context_embedder")) for k in changed)
    assert "LoRA rank 2 (alpha 2) on" in trainer.describe() and "critic LoRA rank 2" in trainer.describe()
    no_critic_lora = Trainer(load_config(None, [f"model.base={path}", f"data.train={tiny_manifest}",
                                                f"output_dir={tmp_path}/run2", "loss.lambda_vlm=0",
                                                "loss.lambda_target=1", "model.lora_rank=2", "model.lora_critic=false"]))
    assert lora.has_lora(no_critic_lora.student) and not lora.has_lora(no_critic_lora.critic)


def test_lora_run_checkpoints_adapters_resumes_and_exports_a_plain_editor(sd3, tmp_path, tiny_manifest):
    path, backbone, _ = sd3
    common = ["stage=npedit", f"model.base={path}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "loss.lambda_vlm=0", "loss.lambda_target=1", "critic_steps=1", "model.lora_rank=2", "log_every=1",
              "save_every=2", "keep_checkpoints=3", "optim.lr=1e-2", "optim.skip_grad_norm=1e9",
              "output_dir=runs/lora", "sample_every=0"]
    out = run_npedit("train", "max_steps=2", *common, cwd=tmp_path)
    assert "LoRA rank 2" in out.stdout
    run_npedit("train", "--resume", "max_steps=3", *common, cwd=tmp_path)
    run_dir = tmp_path / "runs/lora"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    step2 = run_dir / "checkpoints/step_000002"
    adapters = load_file(str(step2 / "student_adapters.safetensors"))
    assert "ref_embed" in adapters and all(k == "ref_embed" or ".lora_" in k for k in adapters)
    assert (step2 / "critic_adapters.safetensors").is_file()
    plain = load_file(str(step2 / "student/diffusion_pytorch_model.safetensors"))
    assert not any(".lora_" in k or ".base." in k for k in plain)  # the folded, plain student
    assert sum(v.numel() for v in adapters.values()) < sum(v.numel() for v in plain.values()) / 2
    # the run's editor and an export of a checkpoint load and edit like any other
    final = load_file(str(run_dir / "pipeline/transformer/diffusion_pytorch_model.safetensors"))
    assert final.keys() == plain.keys() and any(not torch.equal(final[k], plain[k]) for k in plain)
    exported = run_npedit("export", "runs/lora", "--step", "2", cwd=tmp_path).stdout.strip()
    got = load_file(str(tmp_path / exported / "transformer/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    from npedit.pipeline import NPEditPipeline

    pipe = NPEditPipeline.from_pretrained(run_dir / "pipeline")
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    assert pipe(image=image, prompt="make it blue", num_inference_steps=2).images[0].size == (64, 64)
    card = (run_dir / "pipeline/README.md").read_text()
    assert "low-rank adapters (LoRA, rank 2) now folded into the weights" in card
    critic = backbone.load_transformer(run_dir / "critic")  # the critic, folded, as --critic loads it
    assert not any(".lora_" in n for n, _ in critic.named_parameters())
    # resuming a LoRA checkpoint without LoRA (or the reverse) is one clear error
    bad = run_npedit("train", "--resume", "max_steps=4", *[a for a in common if a != "model.lora_rank=2"], cwd=tmp_path,
               ok=False)
    assert "with LoRA" in bad.stderr and "Traceback" not in bad.stderr


def test_zimage_student_and_critic_take_adapters_on_one_shared_base(tiny_zimage, tmp_path, tiny_manifest):
    from npedit.training.trainer import Trainer

    trainer = Trainer(load_config(None, [f"model.base={tiny_zimage}", f"data.train={tiny_manifest}",
                                         f"output_dir={tmp_path}/z", "loss.lambda_vlm=0", "loss.lambda_target=1",
                                         "data.batch_size=2", "critic_steps=1", "model.lora_rank=2"]))
    wrapped = [n for n, m in trainer.student.named_modules() if isinstance(m, lora.LoRALinear)]
    assert any(".attention." in n for n in wrapped) and any(".feed_forward." in n for n in wrapped)
    teacher_ids = {id(p) for p in trainer.teacher.parameters()}
    for net in (trainer.student, trainer.critic):
        assert all(id(p) in teacher_ids for p in net.parameters() if not p.requires_grad)
        assert all(".lora_" in n for n, p in net.named_parameters() if p.requires_grad)  # no own additions here
    metrics = trainer.iteration()
    assert metrics["student_skipped"] == 0 and metrics["critic_skipped"] == 0
