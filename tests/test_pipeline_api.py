"""`NPEditPipeline` as a diffusers user calls it from Python: the inputs, outputs and arguments of diffusers' image
pipelines (e.g. `StableDiffusionInstructPix2PixPipeline.__call__`), on the bundled Shapes editor (CPU, 64x64)."""

import numpy as np
import pytest
import torch
from PIL import Image

from npedit.assets import DEFAULT_MODEL, EXAMPLES_DIR
from npedit.domain import Domain
from npedit.images import ImageError

PROMPT = "make the circle blue"


@pytest.fixture(scope="module")
def pipe():
    from npedit import NPEditPipeline

    pipe = NPEditPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def scene():
    return Image.open(EXAMPLES_DIR / "recolor-0000.png").convert("RGB")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_arrays_and_tensors_go_in_as_diffusers_pipelines_take_them(pipe, scene):
    want = np.asarray(pipe(image=scene, prompt=PROMPT, generator=seeded()).images[0])
    rgb = np.asarray(scene)
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    for image in (rgb / 255.0, tensor, tensor[None]):  # numpy float (H, W, C), torch (C, H, W), torch (1, C, H, W)
        assert np.array_equal(np.asarray(pipe(image=image, prompt=PROMPT, generator=seeded()).images[0]), want)
    # output_type "pt" / "np" feeds straight back in, one image per batch row
    pt = pipe(image=[scene, scene], prompt=PROMPT, generator=[seeded(), seeded(1)], output_type="pt").images
    np_out = pipe(image=[scene, scene], prompt=PROMPT, generator=[seeded(), seeded(1)], output_type="np").images
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_out)
    again = [pipe(image=x, prompt=PROMPT, generator=[seeded(2), seeded(3)], output_type="np").images
             for x in (pt, np_out)]
    assert again[0].shape == (2, 64, 64, 3) and np.array_equal(again[0], again[1])
    assert len(pipe(image=(scene, scene), prompt=PROMPT).images) == 2  # a tuple is a batch, as a list is


def test_wrong_arguments_are_one_clear_error_before_any_model_runs(pipe, scene, monkeypatch):
    def no_encoding(*_):
        raise AssertionError("the image was encoded before the arguments were checked")

    monkeypatch.setattr(type(pipe.backbone), "encode_image", no_encoding)
    for kwargs, why in (({"prompt": None}, "prompt must be a string or a list of strings, got NoneType"),
                        ({"prompt": 3}, "got int"),
                        ({"image": []}, "give one image and one prompt"),
                        ({"num_inference_steps": "4"}, "whole number"), ({"num_inference_steps": 2.5}, "whole number"),
                        ({"num_inference_steps": 0}, ">= 1"),
                        ({"num_inference_steps": 10**8}, "at most 1000"),  # (4.8 GB of times, then days)
                        ({"generator": 0}, "must be a torch.Generator .* got int"),
                        ({"generator": [seeded(), 1]}, "got int"),
                        ({"image": [scene, scene], "generator": [seeded()]}, "1 generators for a batch of 2"),
                        ({"output_type": "PIL"}, "output_type must be")):
        with pytest.raises(ValueError, match=why):
            pipe(**{"image": scene, "prompt": PROMPT, **kwargs})


def test_num_images_per_prompt_gives_each_input_its_own_seeded_edits_in_diffusers_order(pipe, scene):
    other = scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gens = [seeded(s) for s in range(4)]
    got = pipe(image=[scene, other], prompt=[PROMPT, "remove the circle"], num_images_per_prompt=2, generator=gens,
               output_type="latent").images
    want = pipe(image=[scene, scene, other, other], prompt=[PROMPT, PROMPT, "remove the circle", "remove the circle"],
                generator=[seeded(s) for s in range(4)], output_type="latent").images
    assert got.shape == (4, 4, 16, 16) and torch.equal(got, want)
    assert not torch.equal(got[0], got[1])  # the copies draw their own noise
    assert len(pipe(image=scene, prompt=PROMPT, num_images_per_prompt=3).images) == 3
    with pytest.raises(ValueError, match="2 generators for a batch of 4"):
        pipe(image=[scene, other], prompt=PROMPT, num_images_per_prompt=2, generator=[seeded(), seeded()])
    with pytest.raises(ValueError, match="num_images_per_prompt must be"):
        pipe(image=scene, prompt=PROMPT, num_images_per_prompt=0)


def test_callback_on_step_end_takes_diffusers_tensor_inputs_and_pipeline_callbacks(pipe, scene):
    from diffusers.callbacks import PipelineCallback

    seen = []
    pipe(image=scene, prompt=PROMPT, num_inference_steps=2, callback_on_step_end_tensor_inputs=["latents"],
         callback_on_step_end=lambda p, step, t, kwargs: seen.append((step, t, sorted(kwargs))) or kwargs)
    assert [(s, k) for s, _, k in seen] == [(0, ["latents"]), (1, ["latents"])] and seen[0][1] == 1.0
    seen.clear()
    pipe(image=scene, prompt=PROMPT, num_inference_steps=1, callback_on_step_end=lambda p, i, t, kw: seen.append(kw))
    assert sorted(seen[0]) == ["latents", "x0"]  # by default both, as before

    class Record(PipelineCallback):
        tensor_inputs = ["x0"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            return callback_kwargs

    seen.clear()
    pipe(image=scene, prompt=PROMPT, num_inference_steps=1, callback_on_step_end=Record())
    assert seen == [["x0"]]
    with pytest.raises(ValueError, match="may name"):
        pipe(image=scene, prompt=PROMPT, callback_on_step_end=print,
             callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_mixed_sizes_come_back_at_their_own_sizes_or_a_clear_error_for_one_array(pipe, scene):
    wide = scene.resize((96, 48))
    assert [im.size for im in pipe(image=[scene, wide], prompt=PROMPT).images] == [(64, 64), (96, 48)]
    big = scene.resize((128, 128))  # another size, the same working size (max_side 64): one array of the edits
    assert pipe(image=[scene, big], prompt=PROMPT, output_type="np", keep_size=False, max_side=64).images.shape == (
        2, 64, 64, 3)
    for kind in ("np", "pt"):
        with pytest.raises(ValueError, match="different sizes .* use output_type='pil' or keep_size=False"):
            pipe(image=[scene, big], prompt=PROMPT, output_type=kind, max_side=64)
        with pytest.raises(ValueError, match="different working sizes .* use output_type='pil'$"):
            pipe(image=[scene, wide], prompt=PROMPT, output_type=kind, keep_size=False)
    with pytest.raises(ValueError, match="'latent' stacks .* different working sizes"):
        pipe(image=[scene, wide], prompt=PROMPT, output_type="latent")


def test_each_image_of_a_mixed_batch_is_edited_at_its_own_working_size_as_alone(pipe, scene, monkeypatch):
    monkeypatch.setattr(pipe, "domain", Domain())  # a general editor: each image at its own size, not the Shapes 64 px
    wide, tall = scene.resize((96, 48)), scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((48, 96))
    inputs, prompts = [wide, scene, tall, wide], [PROMPT, "remove the circle", PROMPT, "remove the square"]
    seen = []
    encode = type(pipe.backbone).encode_image
    monkeypatch.setattr(type(pipe.backbone), "encode_image", lambda bb, px: seen.append(tuple(px.shape)) or encode(
        bb, px))
    got = pipe(image=inputs, prompt=prompts, num_images_per_prompt=2, generator=[seeded(s) for s in range(8)]).images
    # one pass per working size, in the order of each size's first image; nothing squashed to the first one's size
    assert seen == [(2, 3, 48, 96), (1, 3, 64, 64), (1, 3, 96, 48)]
    assert [im.size for im in got] == [(96, 48)] * 2 + [(64, 64)] * 2 + [(48, 96)] * 2 + [(96, 48)] * 2
    # image b's edits are its single call's with the same generators (the wide pair: batched, so up to rounding)
    for i, (image, prompt) in enumerate(zip(inputs, prompts)):
        alone = pipe(image=image, prompt=prompt, num_images_per_prompt=2,
                     generator=[seeded(2 * i), seeded(2 * i + 1)]).images
        for k in range(2):
            diff = np.abs(np.asarray(got[2 * i + k], dtype=int) - np.asarray(alone[k], dtype=int))
            assert diff.max() <= (1 if image is wide else 0), (i, k, diff.max())
    seen.clear()
    pipe(image=[scene, scene.rotate(90)], prompt=PROMPT)
    assert seen == [(2, 3, 64, 64)]  # one working size: one pass, as before


def test_one_generator_serves_the_size_groups_in_turn(pipe, scene):
    wide = scene.resize((96, 48))
    mixed = pipe(image=[scene, wide, scene], prompt=PROMPT, generator=seeded(5), output_type="pil").images
    first = pipe(image=[scene, scene], prompt=PROMPT, generator=seeded(5)).images  # the first size's group, alone
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip([mixed[0], mixed[2]], first))
    again = pipe(image=[scene, wide, scene], prompt=PROMPT, generator=seeded(5)).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mixed, again))


def test_diffusers_positional_order_is_named_in_the_error(pipe, scene):
    with pytest.raises(ValueError, match="image and prompt swapped"):
        pipe(PROMPT, scene)  # diffusers' pix2pix takes (prompt, image); ours is (image, prompt)
    path = str(EXAMPLES_DIR / "recolor-0000.png")  # the image as a path: it said "image not found: make the ..."
    with pytest.raises(ValueError, match="is no file, and the prompt .* is one: image and prompt swapped"):
        pipe(PROMPT, path)
    with pytest.raises(ImageError, match="cannot read make it blue .*: File name too long"):  # no OSError, no swap
        pipe(image="make it blue " * 40, prompt="make it blue")


def test_a_denoising_progress_bar_as_diffusers_shows_it_and_set_progress_bar_config_silences(pipe, scene):
    import io
    import re

    try:
        # one step per sampler step; a mixed-size batch counts every size's pass (2 sizes x 2 steps)
        for steps, images, total in ((4, [scene], 4), (3, [scene, scene], 3), (2, [scene, scene.resize((96, 48))], 4)):
            shown = io.StringIO()
            pipe.set_progress_bar_config(file=shown)  # diffusers' default otherwise: shown (on rank 0)
            pipe(image=images, prompt=PROMPT, num_inference_steps=steps)
            counts = re.findall(r"(\d+)/(\d+) \[", shown.getvalue())
            assert counts and {int(t) for _, t in counts} == {total} and counts[-1][0] == str(total), counts
        pipe.set_progress_bar_config(file=shown, disable=True)
        before = shown.getvalue()
        pipe(image=scene, prompt=PROMPT)
        assert shown.getvalue() == before
    finally:
        pipe.set_progress_bar_config(disable=True)


def test_diffusers_own_from_pretrained_loads_a_saved_editor_once_npedit_pipeline_is_imported(pipe, scene, tmp_path):
    import os
    import subprocess
    import sys

    from cli_runner import ROOT

    # a fresh process shows what the import alone does; no trust_remote_code (the folder holds no code)
    script = f"""
import torch
from diffusers import DiffusionPipeline
try:
    DiffusionPipeline.from_pretrained({str(DEFAULT_MODEL)!r})
except AttributeError as exc:
    print("before:", exc)
import npedit.pipeline
loaded = DiffusionPipeline.from_pretrained({str(DEFAULT_MODEL)!r})
loaded.set_progress_bar_config(disable=True)
print("type:", type(loaded).__name__)
out = loaded(image={str(EXAMPLES_DIR / "recolor-0000.png")!r}, prompt={PROMPT!r},
             generator=torch.Generator().manual_seed(0), output_type="pt").images
torch.save(out, "out.pt")
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "before: module diffusers has no attribute NPEditPipeline" in run.stdout  # diffusers' lookup, unchanged
    assert "type: NPEditPipeline" in run.stdout
    want = pipe(image=scene, prompt=PROMPT, generator=seeded(), output_type="pt").images
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_carry_over_copies_no_file_a_link_takes_from_outside_the_editor_folder(tmp_path, caplog):
    """`swap-vae` and the reference-encoder recipe copy an editor's README, training config and critic into the new
    editor, which its user may then publish. A downloaded editor whose README.md (or a critic file) is a symlink to
    ~/.ssh/id_rsa had that file's contents copied in. Links that stay inside the folder (or, for a hub download,
    inside its repo's cache, where every file is a link to a blob) are followed; others are left out, with a
    warning."""
    from npedit.pipeline import carry_over

    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY")
    src, out = tmp_path / "downloaded", tmp_path / "mine"
    (src / "critic").mkdir(parents=True)
    out.mkdir()
    (src / "README.md").symlink_to(secret)
    (src / "notes.json").write_text('{"a": 1}')
    (src / "training_config.json").symlink_to(src / "notes.json")  # inside: fine
    (src / "critic" / "config.json").write_text("{}")
    (src / "critic" / "diffusion_pytorch_model.safetensors").symlink_to(secret)
    with caplog.at_level("WARNING"):
        carry_over(src, out, "Swapped.")
    copied = [p for p in out.rglob("*") if p.is_file()]
    assert all("PRIVATE KEY" not in p.read_text() for p in copied)
    assert (out / "training_config.json").read_text() == '{"a": 1}' and (out / "critic" / "config.json").is_file()
    assert not (out / "critic" / "diffusion_pytorch_model.safetensors").exists()
    assert "README.md" in caplog.text and "outside" in caplog.text


def test_a_saved_copy_of_a_shapes_editor_edits_at_its_resolution_too(pipe, tmp_path):
    """save_pretrained keeps the domain (npedit_domain.json): a copy of the bundled editor, loaded from a folder with
    no training config, still edits a 200x150 photo at 64x48, not at its own size."""
    from npedit import NPEditPipeline

    pipe.save_pretrained(tmp_path / "copy")
    copy = NPEditPipeline.from_pretrained(tmp_path / "copy")
    assert copy.domain == pipe.domain and copy.working_size((200, 150)) == (64, 48)


def test_an_editor_trained_at_one_resolution_edits_every_image_there_without_cropping(pipe, scene, monkeypatch):
    """The bundled Shapes editor (npedit_domain.json: 64 px) edits any input at 64 px on its longest side, up or
    down, its aspect kept, and returns it at the input's size; `working_note` says so (the CLI and the app show it).
    A general editor edits at the image's own size within max_side, and says nothing of rounding to the multiple."""
    assert pipe.domain.is_shapes and pipe.domain.resolution == 64
    assert [pipe.working_size(s) for s in [(64, 64), (200, 150), (32, 32), (60, 80)]] == [
        (64, 64), (64, 48), (64, 64), (48, 64)]
    assert pipe.working_note((64, 64)) is None
    assert pipe.working_note((200, 150)).startswith("This editor was trained on 64x64 shapes-world images: your "
                                                    "200x150 image is edited at 64x48 and the result resized back")
    assert "edited at 64x64" in pipe.working_note((32, 32))  # scaled up too: it knows 64 px scenes only
    assert "resized back" not in pipe.working_note((32, 32), keep_size=False)
    assert pipe.working_size((200, 150), max_side=32) == (32, 24)  # a smaller max_side still caps it
    out = pipe(image=scene.resize((200, 150)), prompt=PROMPT, num_inference_steps=1).images[0]
    assert out.size == (200, 150)
    assert pipe.with_vae(pipe.vae).domain == pipe.domain  # a copy with another VAE edits alike
    monkeypatch.setattr(pipe, "domain", Domain())
    assert pipe.working_size((101, 75)) == (104, 72) and pipe.working_note((101, 75)) is None
    assert pipe.working_note((256, 100)) == ("Your 256x100 image is edited at 128x48 (this editor's largest size, "
                                             "128 px) and the result resized back to 256x100.")
    assert pipe.working_note((256, 100), max_side=64).startswith("Your 256x100 image is edited at 64x24 (max_side")


def test_the_editor_and_the_judge_take_their_dtype_by_either_name_and_as_text(tiny_judge):
    """`NPEditPipeline.from_pretrained(dtype=...)` and `load_judge(torch_dtype=...)` wanted opposite keywords
    (load_judge(dtype=) was a TypeError) and neither took "bfloat16", as the CLI and configs write it."""
    from npedit.judges import load_judge

    if not (DEFAULT_MODEL / "model_index.json").is_file():
        pytest.skip("bundled assets not present")
    from npedit.pipeline import NPEditPipeline

    assert NPEditPipeline.from_pretrained(DEFAULT_MODEL, dtype="bfloat16").transformer.dtype == torch.bfloat16
    for kwargs in ({"dtype": "bfloat16"}, {"torch_dtype": torch.bfloat16}, {"dtype": torch.bfloat16}):
        assert next(load_judge(tiny_judge, **kwargs).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_judge(tiny_judge, dtype="half")
    with pytest.raises(ValueError, match="two dtypes for the judge: dtype=bfloat16 and torch_dtype=torch.float32"):
        load_judge(tiny_judge, dtype="bfloat16", torch_dtype=torch.float32)
    assert next(load_judge(tiny_judge, dtype=None, torch_dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    assert next(load_judge(tiny_judge, dtype=None).parameters()).dtype == torch.float32  # the judge's default stays
    with pytest.raises(ValueError, match="two dtypes for the editor"):
        NPEditPipeline.from_pretrained(DEFAULT_MODEL, dtype="bfloat16", torch_dtype=torch.float32)
