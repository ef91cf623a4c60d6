import json

import pytest
import torch

from npedit.backbones import detect_family, load_backbone
from npedit.backbones.tiny import build_tiny_sd3
from npedit.folders import CheckpointError


@pytest.fixture(scope="module")
def parts(tiny_zimage):
    bb = load_backbone(tiny_zimage)
    teacher = bb.load_transformer(tiny_zimage)
    return bb, teacher, bb.prepare_student(teacher)


def test_family_detection(tiny_zimage, tmp_path):
    assert detect_family(tiny_zimage) == "zimage"
    with pytest.raises(FileNotFoundError, match="not a diffusers-layout"):
        detect_family(tmp_path)
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(CheckpointError, match="a judge/VLM.*not a diffusers-layout"):
        detect_family(tmp_path / "judge")  # says what the folder is, not "unsupported transformer class ''"


def test_a_transformer_of_another_family_or_none_is_refused_not_built_at_random(parts, tiny_zimage, tmp_path):
    """diffusers would build a ZImageTransformer2DModel of its default (6B) size from an SD3 config, its weights
    random, warning only: the class the config names is checked first."""
    bb, _, _ = parts
    sd3 = build_tiny_sd3(tmp_path / "sd3")
    for student in (False, True):
        with pytest.raises(CheckpointError, match="holds a SD3Transformer2DModel: not a zimage transformer"):
            bb.load_transformer(sd3, for_student=student)
    with pytest.raises(CheckpointError, match="holds a ZImageTransformer2DModel: not a sd3 transformer"):
        load_backbone(sd3).load_transformer(tiny_zimage, for_student=True)
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(CheckpointError, match="a judge/VLM.*not a zimage transformer"):
        bb.load_transformer(tmp_path / "judge", for_student=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty is a folder without model files"):
        bb.load_transformer(tmp_path / "empty")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")  # a pickle: it holds weights, never read
    with pytest.raises(CheckpointError, match="empty is a folder whose weights are pickles .* never read here"):
        bb.load_transformer(tmp_path / "empty")


def test_a_missing_folder_named_like_a_hub_id_or_pickle_weights_are_one_clear_error(parts, tiny_zimage, tmp_path,
                                                                                     monkeypatch):
    """`model.student=runs/nothing` (one slash: a hub id's shape, found nowhere) and a transformer folder whose weights
    are a pickle .bin only are CheckpointErrors (one line from the CLI), not diffusers' OSError traceback."""
    import shutil

    from safetensors.torch import load_file

    bb, _, _ = parts
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="cannot find 'runs/nothing' locally or on the hub"):
        bb.load_transformer("runs/nothing", for_student=True)
    pickled = shutil.copytree(tiny_zimage, tmp_path / "pickled")
    weights = pickled / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"no safetensors weights in .*transformer \(a pickle .bin is not read\)"):
        bb.load_transformer(pickled)


def test_images_wider_than_the_rotary_table_are_worked_on_smaller(tiny_zimage, parts):
    """The pipeline's working size stays within the transformer's `axes_lens` (as SD3's within its position grid)."""
    from PIL import Image

    from npedit.pipeline import NPEditPipeline

    bb, _, student = parts
    pipe = NPEditPipeline.from_parts(student, bb)
    side = min(student.config.axes_lens[1:]) * pipe.backbone.pixel_multiple
    assert pipe.backbone.max_side == side
    pixels, sizes = pipe.prepare_images([Image.new("RGB", (2 * side, 16))], max_side=4 * side)
    assert pixels.shape[-1] == side and sizes == [(2 * side, 16)]


def test_native_convention(parts):
    # Z-Image runs at t_native = 1 - t and predicts -v; the adapter converts at the boundary.
    bb, teacher, _ = parts
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    cond = bb.encode_prompt(["a red circle", "a blue square"], with_reference=False)
    raw = teacher(list(x.unsqueeze(2).unbind(0)), 1 - t, cond, return_dict=False)[0]
    torch.testing.assert_close(bb.velocity(teacher, x, t, cond), -torch.stack(raw).squeeze(2))


def test_no_reference_encoder_in_this_family(parts):
    bb, _, student = parts
    assert bb.add_reference_encoder(student, 0) is student
    with pytest.raises(ValueError, match="zimage family has no reference encoder"):
        bb.add_reference_encoder(student, 2)
    assert bb.add_layers(student, 0) == (student, [])
    with pytest.raises(ValueError, match="zimage family cannot grow a student"):
        bb.add_layers(student, 1)


def test_reference_tokens_are_attended_and_batch_invariant(parts):
    bb, _, student = parts
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.9])
    ref = torch.randn(2, 4, 8, 8)
    cond = bb.encode_prompt(["make it red", "remove the square"], with_reference=True)
    v = bb.velocity(student, x, t, cond, reference=ref)
    v_other = bb.velocity(student, x, t, cond, reference=torch.randn(2, 4, 8, 8))
    assert v.shape == x.shape and not torch.allclose(v, v_other)
    one = bb.velocity(student, x[1:], t[1:], cond[1:], reference=ref[1:])
    torch.testing.assert_close(one, v[1:], atol=1e-4, rtol=1e-4)


def test_gradient_reaches_student(parts):
    bb, _, student = parts
    student.zero_grad()
    cond = bb.encode_prompt(["make it red"], with_reference=True)
    v = bb.velocity(student, torch.randn(1, 4, 8, 8), torch.tensor([0.7]), cond, reference=torch.randn(1, 4, 8, 8))
    v.square().mean().backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.any()) for g in grads) > len(grads) // 2  # most tensors learn, not only exist with zeros


def test_vae_round_trip_shapes(parts):
    bb, _, _ = parts
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    z = bb.encode_image(pixels)
    assert z.shape == (2, bb.latent_channels, 8, 8) and bb.pixel_multiple == 16
    assert bb.decode_latents(z).shape == pixels.shape
