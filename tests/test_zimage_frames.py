"""The Z-Image "frames" reference layout (the re-implementation's): its forward against diffusers' own, batching."""

import copy
import datetime
import os
import re

import pytest
import torch
from PIL import Image

from npedit.backbones.tiny import tiny_zimage_transformer
from npedit.backbones.zimage import NPEditZImageTransformer2DModel, frames_forward


@pytest.fixture(scope="module")
def transformer():
    plain = tiny_zimage_transformer(in_channels=4, cap_feat_dim=32, seed=3)
    frames = NPEditZImageTransformer2DModel(**{k: v for k, v in plain.config.items() if not k.startswith("_")},
                                            reference_layout="frames")
    frames.load_state_dict(plain.state_dict())
    return frames.eval()


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_at_the_clean_time_it_is_diffusers_two_frame_forward(transformer):
    """With the target at the clean time too, dual modulation is one modulation: the frames layout must then be
    exactly diffusers' plain forward on the two-frame latent video (captions and images already multiples of 32)."""
    ref, x = rand(2, 4, 8, 8, seed=0), rand(2, 4, 8, 8, seed=1)  # 2 x 16 tokens: no image padding
    caps = [rand(32, 32, seed=2), rand(32, 32, seed=3)]  # no caption padding
    t = torch.ones(2)
    with torch.no_grad():
        ours = frames_forward(transformer, ref, x, t, caps)
        video = [torch.stack([r, xi], dim=1) for r, xi in zip(ref, x)]  # (C, 2, h, w) each
        theirs = torch.stack([o[:, 1] for o in transformer(video, t, caps, return_dict=False)[0]])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_reference_is_modulated_clean_and_padding_is_masked(transformer):
    ref, x = rand(3, 4, 8, 12, seed=4), rand(3, 4, 8, 12, seed=5)  # 2 x 24 tokens: padded to 64
    caps = [rand(n, 32, seed=6 + n) for n in (5, 40, 17)]  # padded to 32, 64, 32
    t = torch.tensor([0.3, 0.7, 0.5])
    with torch.no_grad():
        batched = frames_forward(transformer, ref, x, t, caps)
        for i in range(3):  # each sample alone: the batch's padding changes nothing
            alone = frames_forward(transformer, ref[i:i + 1], x[i:i + 1], t[i:i + 1], caps[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        # the reference frame's tokens are modulated at the clean time: not the plain forward at t
        video = [torch.stack([r, xi], dim=1) for r, xi in zip(ref[:1], x[:1])]
        plain = transformer(video, t[:1], caps[:1], return_dict=False)[0][0][:, 1]
    assert batched.shape == (3, 4, 8, 12)
    assert (batched[0] - plain).abs().max() > 1e-3


@pytest.fixture(scope="module")
def reimpl_checkpoint(tmp_path_factory, tiny_zimage):
    """A tiny stand-in for the released checkpoint: a Z-Image transformer's weights, perturbed, under "transformer."."""
    from diffusers import ZImageTransformer2DModel

    base = ZImageTransformer2DModel.from_pretrained(tiny_zimage, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    state = {f"transformer.{k}": v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    path = tmp_path_factory.mktemp("reimpl") / "zimage_npedit_internvl.pt"
    torch.save(state, path)
    return path, state


def test_import_reimpl_makes_an_editor_that_edits_in_the_frames_layout(tmp_path, tiny_zimage, reimpl_checkpoint):
    from npedit import NPEditPipeline
    from npedit.backbones.zimage import _FRAMES_TEMPLATE
    from npedit.cli import main

    path, state = reimpl_checkpoint
    out = tmp_path / "editor"
    assert main(["import-reimpl", str(path), "--base", str(tiny_zimage), "--out", str(out), "--dtype", "float32"]) == 0
    assert not list(out.rglob("*.pt")) and list(out.rglob("*.safetensors"))
    assert "re-implementation" in (out / "README.md").read_text()
    from npedit.reimpl import import_reimpl

    with pytest.raises(ValueError, match="exists and is not empty"):  # from Python too: it would replace the folder
        import_reimpl(path, tiny_zimage, out=tiny_zimage)
    pipe = NPEditPipeline.from_pretrained(out)
    tf = pipe.transformer
    assert isinstance(tf, NPEditZImageTransformer2DModel) and tf.config.reference_layout == "frames"
    for name, value in tf.state_dict().items():
        torch.testing.assert_close(value, state[f"transformer.{name}"])
    bb = pipe.backbone
    assert bb.reference_layout == "frames"
    cond = bb.encode_prompt(["make the sky red"], with_reference=True)
    torch.testing.assert_close(cond[0], bb._embed([_FRAMES_TEMPLATE.format(prompt="make the sky red")])[0])
    latents = torch.randn(1, tf.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = torch.randn(1, tf.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v = bb.velocity(tf, latents, torch.tensor([0.4]), cond, reference=reference)
        native = frames_forward(tf, reference, latents, torch.tensor([0.6]), cond)
    torch.testing.assert_close(v, -native)
    picture = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
    image = pipe(image=picture, prompt="make the sky red", output_type="pil").images[0]
    assert image.size == (64, 64)


def test_import_reimpl_refuses_what_it_cannot_trust_or_place(tmp_path, tiny_zimage, reimpl_checkpoint):
    from npedit.cli import main

    evil = tmp_path / "evil.pt"  # an object that is not a tensor: weights_only refuses to build it, nothing runs
    torch.save({"transformer.x": datetime.date(2026, 1, 1)}, evil)
    with pytest.raises(SystemExit, match="not a plain state dict of tensors"):
        main(["import-reimpl", str(evil), "--base", str(tiny_zimage), "--out", str(tmp_path / "a")])
    _, state = reimpl_checkpoint
    partial = tmp_path / "partial.pt"
    torch.save(dict(list(state.items())[:-3]), partial)
    with pytest.raises(SystemExit, match="3 missing"):
        main(["import-reimpl", str(partial), "--base", str(tiny_zimage), "--out", str(tmp_path / "b")])
    name, value = next((k, v) for k, v in state.items() if v.dim() == 2)
    reshaped = tmp_path / "reshaped.pt"  # every name right, one tensor of another size: a clear line, no traceback
    torch.save({**state, name: torch.zeros(value.shape[0] + 1, value.shape[1])}, reshaped)
    with pytest.raises(SystemExit, match=re.escape(f"1 of the checkpoint's tensors differ in shape from this base's "
                                                   f"Z-Image transformer (e.g. {name[len('transformer.'):]} (")):
        main(["import-reimpl", str(reshaped), "--base", str(tiny_zimage), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match=r"refused without running it \(Unsupported global: GLOBAL datetime.date"):
        main(["import-reimpl", str(evil), "--base", str(tiny_zimage), "--out", str(tmp_path / "a")])  # one line

    class Call:  # a pickle that would run a program: refused, and torch's advice to load it unsafely not passed on
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"transformer.x": Call()}, evil)
    with pytest.raises(SystemExit, match=r"refused without running it \(Trying to load unsupported GLOBAL .*system") as said:
        main(["import-reimpl", str(evil), "--base", str(tiny_zimage), "--out", str(tmp_path / "a")])
    assert "weights_only" not in str(said.value) and "Re-running" not in str(said.value)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_import_reimpl_reads_a_legacy_format_state_dict(tmp_path, reimpl_checkpoint):
    """A `torch.save` file of the pre-zip format cannot be memory-mapped; it is read whole, not refused."""
    from npedit.reimpl import read_state_dict

    _, state = reimpl_checkpoint
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    read = read_state_dict(tmp_path / "legacy.pt")
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())


def test_the_imported_editor_trains_on_in_its_own_layout(tmp_path, tiny_zimage, tiny_manifest, reimpl_checkpoint):
    """NP-Edit can continue from the imported editor (warm-start): the student keeps the frames layout end to end."""
    from cli_runner import run_npedit

    from npedit.cli import main

    editor = tmp_path / "editor"
    main(["import-reimpl", str(reimpl_checkpoint[0]), "--base", str(tiny_zimage), "--out", str(editor),
          "--dtype", "float32"])
    run_npedit("train", "stage=npedit", "output_dir=run", f"model.base={tiny_zimage}", f"model.student={editor}",
               f"data.train={tiny_manifest}", "data.batch_size=2", "loss.lambda_vlm=0", "critic_steps=1",
               "max_steps=1", "sample_every=0", cwd=tmp_path)
    config = (tmp_path / "run/pipeline/transformer/config.json").read_text()
    assert '"NPEditZImageTransformer2DModel"' in config and '"reference_layout": "frames"' in config


def test_gradient_checkpointing_gives_the_same_gradients(transformer):
    ref, x = rand(1, 4, 8, 8, seed=20), rand(1, 4, 8, 8, seed=21)
    caps, t = [rand(7, 32, seed=22)], torch.tensor([0.5])
    grads, calls = [], []
    for on in (False, True):
        transformer.enable_gradient_checkpointing() if on else transformer.disable_gradient_checkpointing()
        if on:
            inner = transformer._gradient_checkpointing_func
            transformer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
        transformer.zero_grad()
        frames_forward(transformer, ref, x, t, caps).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None]))
    transformer.disable_gradient_checkpointing()
    transformer.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0 and len(calls) == 4  # every block: noise and context refiner, 2 main layers


def test_the_time_reaches_a_bf16_transformer_unrounded(transformer):
    """Z-Image's time goes in as float32 even to a bf16 transformer (as diffusers' pipeline passes it): rounded to
    bf16, 1000 (1 - t) of the 4-step schedule would be off by up to 1 (52.75 for 52.63)."""
    import copy

    from npedit.backbones.zimage import ZImageBackbone

    half = copy.deepcopy(transformer).to(torch.bfloat16)
    seen = []
    half.t_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ZImageBackbone.velocity(None, half, rand(1, 4, 8, 8, seed=9), torch.tensor([0.9474]), [rand(5, 32, seed=10)],
                            reference=rand(1, 4, 8, 8, seed=11))
    assert seen[0].dtype == torch.float32
    assert abs(float(seen[0][0]) - (1 - 0.9474) * transformer.t_scale) < 1e-3


def test_model_offload_moves_each_model_before_it_runs(transformer, tiny_zimage):
    """Under diffusers' model offload (`enable_model_cpu_offload`, GPU only) a model moves to its device when its
    hook fires: the VAE's before `encode` reads where its weights are, the frames transformer although its blocks are
    called one by one (its `forward` never runs). A hook that moves its model to float64 stands in for the GPU here:
    a model that ran before its hook moved it meets inputs of the other dtype, as it would meet CPU tensors."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from npedit.backbones import load_backbone
    from npedit.pipeline import NPEditPipeline

    class Onload(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            module.to(torch.float64)
            return args, kwargs

    pipe = NPEditPipeline.from_parts(copy.deepcopy(transformer), load_backbone(tiny_zimage))
    for name in ("text_encoder", "transformer", "vae"):
        add_hook_to_module(getattr(pipe, name), Onload())
    out = pipe(image=Image.new("RGB", (64, 64)), prompt="make it red", generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    assert out.dtype == torch.float64 and pipe.transformer.dtype == torch.float64
