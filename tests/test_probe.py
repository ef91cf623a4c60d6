"""scripts/probe_reference_tokens.py: token indexing, the hooks read the real forward, a small real probe."""

import json
from pathlib import Path

import pytest
import torch

from script_modules import load_script  # tests/script_modules.py

ROOT = Path(__file__).resolve().parents[1]
EDITOR = ROOT / "assets" / "shapes" / "editor-sft-npedit"


@pytest.fixture(scope="module")
def probe():
    return load_script("probe_reference_tokens")


def test_cell_token_is_the_patch_under_the_cell_centre(probe):
    from npedit.shapes import CELL_CENTRES

    grid = 8
    assert probe.cell_token("top left", grid) == (CELL_CENTRES["top left"][1] // 8) * grid + CELL_CENTRES["top left"][0] // 8
    tokens = {probe.cell_token(c, grid) for c in CELL_CENTRES}
    assert len(tokens) == len(CELL_CENTRES) and all(0 <= k < grid * grid for k in tokens)


@pytest.mark.skipif(not EDITOR.exists(), reason="bundled editor not present")
def test_states_come_from_the_students_own_forward(probe):
    from npedit import NPEditPipeline
    from npedit.shapes.edits import held_out_cases

    pipe = NPEditPipeline.from_pretrained(EDITOR)
    cases = held_out_cases(6, seed=1)[:3]
    states = probe.reference_states(pipe, cases, 1.0, seed=0)
    model = pipe.transformer
    assert len(states) == len(model.transformer_blocks) + 1
    tokens = (64 // (pipe.backbone.codec.downsample * model.config.patch_size)) ** 2
    assert all(s.shape == (3, tokens, model.inner_dim) for s in states)
    # Layer 0 is what the forward joins as reference tokens: patch embedding plus the type embedding.
    pixels, _ = pipe.prepare_images([probe.render(c.reference) for c in cases], 1024)
    with torch.no_grad():
        ref = model.pos_embed(pipe.backbone.encode_image(pixels)) + model.ref_embed
    assert torch.allclose(states[0], ref, atol=1e-5)
    assert not torch.allclose(states[1], states[0])
    # Hooks are removed: a second call returns as many layers again.
    assert len(probe.reference_states(pipe, cases, 0.5, seed=0)) == len(states)


@pytest.mark.skipif(not EDITOR.exists(), reason="bundled editor not present")
def test_small_probe_reads_colour_well_above_chance(probe, tmp_path):
    out = tmp_path / "probe.json"
    assert probe.main(["--model", str(EDITOR), "--scenes", "160", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scenes"] == 160 and result["objects"] > 160
    layers = result["layers"]
    assert len(layers) == 5  # the bundled student has 4 blocks
    for row in layers.values():
        assert set(row) == {"shape", "colour", "size", "shape of small", "shape of large"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert max(row["colour"] for row in layers.values()) > 0.5  # chance is 1/6


def test_bad_arguments_are_refused(probe, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text("{}")
    for argv, says in ((["--scenes", "3"], "--scenes must be at least 8"), (["--t", "1.5"], "--t must be in [0, 1]"),
                       (["--with", str(other)], "--with needs --plot"),
                       (["--plot", str(tmp_path / "p.png"), "--with", str(other)], f"--with {other}: not a probe result (written by")):
        with pytest.raises(SystemExit) as exit_:  # argparse's error: status 2, the reason on stderr
            probe.main(argv)
        assert exit_.value.code == 2 and f"error: {says}" in capsys.readouterr().err, argv


def test_plot_draws_every_result(probe, tmp_path):
    from PIL import Image

    def result(name, shift):
        rows = {str(k): {"shape": 0.4 + shift + 0.1 * k, "colour": 0.9, "size": 0.8} for k in range(3)}
        return {"model": f"runs/{name}/pipeline", "t": 1.0, "layers": rows}

    path = tmp_path / "probe.png"
    probe.plot_layers([result("a", 0.0), result("b", 0.2)], str(path))
    with Image.open(path) as im:
        assert im.size == (640, 360)
        pixels = im.convert("RGB").getdata()
        assert any(abs(r - 0xC4) < 8 and abs(g - 0x4E) < 8 and abs(b - 0x52) < 8 for r, g, b in pixels)  # shape lines


def test_models_without_reference_tokens_are_refused(probe):
    from types import SimpleNamespace

    for config in (SimpleNamespace(reference_mode="channels"), SimpleNamespace()):  # SD3 channels mode; Z-Image
        pipe = SimpleNamespace(transformer=SimpleNamespace(config=config), backbone=None)
        with pytest.raises(SystemExit, match="reference tokens"):
            probe.reference_states(pipe, [], 1.0, seed=0)


@pytest.mark.skipif(not EDITOR.exists(), reason="bundled editor not present")
def test_encoder_share_measures_the_encoder_against_the_tokens(probe):
    from npedit import NPEditPipeline
    from npedit.shapes.edits import held_out_cases

    pipe = NPEditPipeline.from_pretrained(EDITOR)
    cases = held_out_cases(6, seed=1)[:4]
    assert probe.encoder_share(pipe, cases) is None  # the bundled editor has no encoder
    pipe.transformer = pipe.backbone.add_reference_encoder(pipe.transformer, 2, width=8, gated=True).eval()
    shut = probe.encoder_share(pipe, cases)
    assert shut["gated"] and shut["encoder_norm"] == 0.0 and shut["token_norm"] > 0
    with torch.no_grad():
        pipe.transformer.ref_encoder.gate.fill_(0.5)  # normalised vectors of norm sqrt(D), scaled by the gate
    share = probe.encoder_share(pipe, cases)
    assert share["encoder_norm"] == pytest.approx(0.5 * pipe.transformer.inner_dim ** 0.5, rel=1e-3)
    assert share["token_norm"] == pytest.approx(shut["token_norm"])
