"""The fast distilled VAE: its class, loading by config, the distillation recipe and swapping it into an editor."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from npedit.assets import DEFAULT_JUDGE, DEFAULT_MODEL
from npedit.backbones.fast_vae import PatchAutoencoder
from npedit.backbones.vae import AnyVAE, LatentCodec
from npedit.folders import CheckpointError


def test_patch_autoencoder_shapes_gradients_and_round_trip(tmp_path):
    vae = PatchAutoencoder(latent_channels=4, downsample=4, width=8, depth=1, head=8, refine=4)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    z = vae.encode(x).latents
    assert z.shape == (2, 4, 16, 12)
    z = z.detach().requires_grad_(True)
    rec = vae.decode(z).sample
    assert rec.shape == x.shape
    rec.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # NP-Edit's judge gradient passes through the decoder
    vae.save_pretrained(tmp_path / "vae")
    loaded = AnyVAE.from_pretrained(tmp_path / "vae")
    assert isinstance(loaded, PatchAutoencoder)
    codec = LatentCodec(loaded)
    assert (codec.channels, codec.downsample, codec.scale, codec.shift) == (4, 4, 1.0, 0.0)
    assert torch.allclose(codec.encode(x), vae.encode(x).latents)
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_any_vae_loads_autoencoder_kl_and_refuses_other_classes(tmp_path):
    kl = AnyVAE.from_pretrained(DEFAULT_MODEL / "vae")
    assert type(kl).__name__ == "AutoencoderKL"
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "SomethingElse"}))
    with pytest.raises(ValueError, match="unsupported VAE class 'SomethingElse'"):
        AnyVAE.from_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="nothing does not exist: a VAE folder holds config.json"):
        AnyVAE.from_pretrained(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="is not a VAE .*'llava_onevision'"):
        AnyVAE.from_pretrained(DEFAULT_JUDGE)
    with pytest.raises(CheckpointError, match="vae does not exist"):  # a subfolder that is not there
        AnyVAE.from_pretrained(DEFAULT_JUDGE, subfolder="vae")


@pytest.fixture(scope="module")
def quick_fast_vae(tmp_path_factory):
    from npedit.shapes.recipes import run

    root = tmp_path_factory.mktemp("fast")
    out = run("fast-vae", ["preset=quick", f"output_dir={root}", f"source={DEFAULT_MODEL / 'vae'}", "device=cpu"])
    return out


def test_distillation_recipe_writes_a_loadable_vae_and_a_report(quick_fast_vae):
    report = json.loads((quick_fast_vae.parent / "report.json").read_text())
    assert set(report) >= {"exact_source", "exact_source_to_fast", "exact_fast", "latent_rel_mse", "params"}
    assert report["exact_source"] > 0.5  # the bundled VAE itself reconstructs most scenes exactly
    assert (quick_fast_vae.parent / "reconstructions.png").is_file()
    vae = AnyVAE.from_pretrained(quick_fast_vae)
    assert isinstance(vae, PatchAutoencoder) and vae.config.latent_channels == 4 and vae.config.downsample == 4


def test_distillation_continues_from_a_trained_fast_vae(quick_fast_vae, tmp_path):
    from npedit.shapes.recipes import run

    out = run("fast-vae", ["preset=quick", f"output_dir={tmp_path}", f"source={DEFAULT_MODEL / 'vae'}", "device=cpu",
                           f"init={quick_fast_vae}", "steps=1", "width=32", f"editors=[{DEFAULT_MODEL}]",
                           "editor_cases=3", "editor_batch=2"])
    assert PatchAutoencoder.from_pretrained(out).config.width == 8  # the init's architecture, not the override
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 <= report["editor_latents_mae_vs_source"] <= 2  # decoded the editor's own latents
    PatchAutoencoder(latent_channels=8, width=4, depth=0).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="8 latent channels"):
        run("fast-vae", ["preset=quick", f"output_dir={tmp_path}/x", f"source={DEFAULT_MODEL / 'vae'}", "device=cpu",
                         f"init={tmp_path / 'other'}"])


def test_swap_vae_writes_an_editor_that_edits(quick_fast_vae, tmp_path):
    from npedit.cli import main
    from npedit.pipeline import NPEditPipeline

    out = tmp_path / "editor-fast"
    assert main(["swap-vae", "--vae", str(quick_fast_vae), "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["npedit.backbones.fast_vae", "PatchAutoencoder"]
    assert (out / "npedit_domain.json").is_file()
    card = (out / "README.md").read_text()
    assert (DEFAULT_MODEL / "README.md").read_text() in card and "VAE was replaced" in card  # the source's, + the swap
    if (DEFAULT_MODEL / "critic").is_dir():  # the editor's own critic comes along (same latent space)
        assert (out / "critic" / "diffusion_pytorch_model.safetensors").read_bytes() == (
            DEFAULT_MODEL / "critic" / "diffusion_pytorch_model.safetensors").read_bytes()
    pipe = NPEditPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    result = pipe(image=image, prompt="make the circle red", generator=torch.Generator().manual_seed(0)).images[0]
    assert result.size == (64, 64)
    # the transformer is the source editor's, unchanged
    src = NPEditPipeline.from_pretrained(str(DEFAULT_MODEL))
    assert all(torch.equal(a, b) for a, b in zip(src.transformer.state_dict().values(),
                                                   pipe.transformer.state_dict().values()))
    with pytest.raises(SystemExit, match="not empty"):
        main(["swap-vae", "--vae", str(quick_fast_vae), "--out", str(out)])


def test_with_vae_refuses_another_latent_space():
    from npedit.pipeline import NPEditPipeline

    pipe = NPEditPipeline.from_pretrained(str(DEFAULT_MODEL))
    with pytest.raises(ValueError, match="do not match"):
        pipe.with_vae(PatchAutoencoder(latent_channels=8, downsample=4, width=4, depth=0))


def test_bundled_fast_vae_shares_the_editors_latent_space():
    from npedit.shapes import parse, random_scene
    from npedit.shapes.training import render_tensor

    fast, source = LatentCodec(AnyVAE.from_pretrained(DEFAULT_MODEL.parent / "fast-vae")), LatentCodec(
        AnyVAE.from_pretrained(DEFAULT_MODEL / "vae"))
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng) for _ in range(20)]
    x = torch.stack([render_tensor(s) for s in scenes])
    with torch.no_grad():
        z_fast, z_src = fast.encode(x), source.encode(x)
        rel = float((z_fast - z_src).pow(2).mean() / z_src.var())
        out = ((fast.decode(z_src).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert rel < 0.02  # the same latents as the editors' VAE, to within 2% of their variance
    assert np.mean([parse(o) == s for o, s in zip(out, scenes)]) >= 0.5  # decodes the editors' latents to scenes
