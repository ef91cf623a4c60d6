"""An editor shipped as LoRA adapters alone (`npedit export RUN --adapters`): the folder is small, names its base,
loads through `NPEditPipeline.from_pretrained` (so the CLI and the app take it) into the very student the run
checkpointed, and its LoRA file is in diffusers' layout, so PEFT applies the same update to the base's transformer."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_runner import run_npedit  # tests/cli_runner.py
from npedit import lora
from npedit.adapters import EXTRA_FILE, LORA_FILE, META_FILE, export_adapters, fold_lora
from npedit.backbones.tiny import build_tiny_sd3
from npedit.config import load_config, save_config
from npedit.pipeline import NPEditPipeline
from script_modules import load_script  # tests/script_modules.py


def _lora_run(base, manifest, out, *extra):
    """A LoRA run's trainer with random (non-zero) adapters and own parameters, checkpointed at step 1."""
    from npedit.training.trainer import Trainer

    trainer = Trainer(load_config(None, [f"model.base={base}", f"data.train={manifest}", f"output_dir={out}",
                                         "stage=npedit", "loss.lambda_vlm=0", "loss.lambda_dmd=0",
                                         "loss.lambda_target=1", "data.batch_size=2", "model.lora_rank=2",
                                         "model.lora_alpha=6", *extra]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.student.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trainer.step = 1
    trainer.save_checkpoint()
    return trainer


def _velocity(backbone, net, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompt(["make the circle red", "remove the square"], with_reference=True)
    x = torch.randn(2, backbone.latent_channels, 8, 8, generator=g)
    ref = torch.randn(2, backbone.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        return backbone.velocity(net.eval(), x, torch.tensor([0.3, 0.8]), cond, reference=ref)


def test_sd3_adapters_export_small_and_load_as_the_checkpointed_editor(tmp_path, tiny_manifest):
    base = build_tiny_sd3(tmp_path / "base")
    trainer = _lora_run(base, tiny_manifest, tmp_path / "run")
    run = tmp_path / "run"
    out = run_npedit("export", str(run), "--adapters", cwd=tmp_path)
    folder = Path(out.stdout.strip())
    assert folder == run / "exports" / "step_000001-lora" and "MiB of adapters" in out.stderr
    assert {p.name for p in folder.iterdir()} >= {LORA_FILE, EXTRA_FILE, META_FILE, "training_config.json",
                                                  "README.md"}
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["base"] == str(base) and meta["rank"] == 2 and meta["alpha"] == 6 and meta["extra"] == ["ref_embed"]
    shared = json.loads((folder / "training_config.json").read_text())  # what may be published: no run or data path
    assert shared["data"]["train"] == f"local:{Path(tiny_manifest).name}" and shared["output_dir"] == "local:run"
    assert meta["exported_from"] == "local:step_000001"
    tensors = load_file(str(folder / LORA_FILE))
    assert tensors and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                           for k in tensors)
    assert "NPEditPipeline.from_pretrained" in (folder / "README.md").read_text()
    # scripts/lora_size.py, which sizes adapters from a config alone, predicts this file's parameters
    predicted = load_script("lora_size").sizes(load_script("lora_size").build(
        None, str(run / "checkpoints/step_000001/student/config.json")), [2], ())
    assert predicted[0]["parameters"] == sum(v.numel() for v in tensors.values())
    # the folder loads into the student the checkpoint folded (scale alpha / r = 3 carried in lora_B)
    checkpointed = trainer.backbone.load_transformer(run / "checkpoints/step_000001/student", for_student=True)
    import logging

    warned = []  # diffusers 0.42 warns on every to(dtype) of its models, of float32 modules it lists as none
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe = NPEditPipeline.from_pretrained(folder)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in warned if "kept in float32" in m]
    torch.testing.assert_close(_velocity(pipe.backbone, pipe.transformer), _velocity(trainer.backbone, checkpointed),
                               atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_velocity(pipe.backbone, pipe.transformer),
                              _velocity(trainer.backbone, trainer.backbone.load_transformer(base, for_student=True)),
                              atol=1e-3)  # the adapters did change it
    full = sum(p.stat().st_size for p in (run / "checkpoints/step_000001/student").glob("*.safetensors"))
    adapters = sum(p.stat().st_size for p in (folder / LORA_FILE, folder / EXTRA_FILE))
    assert adapters < full / 2
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image.save(tmp_path / "in.png")
    assert pipe(image=image, prompt="make it blue", num_inference_steps=2).images[0].size == (64, 64)
    assert pipe.transformer.dtype == torch.float32
    # the app takes the folder as an editor
    from npedit.folders import EDITOR_KIND, what_is
    from workbench.models import check_editor

    assert what_is(folder) == EDITOR_KIND and check_editor(str(folder)) == str(folder)
    # the base moved: a clear error, and base= finds it
    moved = tmp_path / "moved-base"
    shutil.move(str(base), moved)
    with pytest.raises(FileNotFoundError, match="pass base="):
        NPEditPipeline.from_pretrained(folder)
    from npedit.cli import main

    with pytest.raises(SystemExit) as stop:  # one line, not "... (unexpected; NPEDIT_DEBUG=1 shows the traceback)"
        main(["edit", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--instruction", "x",
              "--output", str(tmp_path / "out.png")])
    assert str(stop.value).startswith("error: cannot load the adapters' base model") and "unexpected" not in str(
        stop.value)
    again = NPEditPipeline.from_pretrained(folder, base=str(moved), torch_dtype=torch.bfloat16)
    assert again.transformer.dtype == torch.bfloat16 and again.vae.dtype == torch.bfloat16
    folded = load_file(str(run / "checkpoints/step_000001/student/diffusion_pytorch_model.safetensors"))
    for key, value in again.transformer.state_dict().items():  # the float32 sum, rounded once
        assert torch.equal(value, folded[key].to(torch.bfloat16)), key


def test_adapters_on_the_hub_load_by_their_id(tmp_path, tiny_manifest, monkeypatch):
    """A LoRA export uploaded to the hub did not load by its id while the hub answered: diffusers' download asked for
    the model_index.json an adapter folder has not, and the error said the repo was nowhere. Its snapshot is fetched
    and loaded as the local folder is (here from the hub cache, the hub's answer faked; no network)."""
    import huggingface_hub

    from test_hub_ids import cached

    base = build_tiny_sd3(tmp_path / "base")
    _lora_run(base, tiny_manifest, tmp_path / "run")
    folder = export_adapters(tmp_path / "run")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the libraries read the cache
    monkeypatch.setattr("npedit.folders.hub_unreachable", lambda: None)  # what `locate` sees when the hub answers
    cached(tmp_path / "hub", "owner/lora", folder)
    pipe, local = NPEditPipeline.from_pretrained("owner/lora"), NPEditPipeline.from_pretrained(folder)
    torch.testing.assert_close(_velocity(pipe.backbone, pipe.transformer), _velocity(local.backbone, local.transformer))
    # the download keywords reach the hub client: a repo in another cache loads by cache_dir= (it went to the default
    # cache, and local_files_only= or proxies= were dropped)
    cached(tmp_path / "elsewhere", "owner/lora2", folder)
    other = NPEditPipeline.from_pretrained("owner/lora2", cache_dir=str(tmp_path / "elsewhere"), local_files_only=True)
    torch.testing.assert_close(_velocity(other.backbone, other.transformer), _velocity(local.backbone, local.transformer))


def test_push_refuses_adapters_that_name_a_local_base(tmp_path, tiny_manifest, monkeypatch):
    """`export --adapters --push` of a run on a local base would upload adapters nobody else can load; it stops
    before any upload, saying to export with --base HUB_ID."""
    import huggingface_hub

    from npedit.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # any upload attempt would fail loudly
    _lora_run(build_tiny_sd3(tmp_path / "base"), tiny_manifest, tmp_path / "run")
    with pytest.raises(SystemExit, match="not pushed: the adapters name the local base .*--base HUB_ID"):
        main(["export", str(tmp_path / "run"), "--adapters", "--push", "owner/lora"])


def test_export_adapters_refuses_what_has_none(tmp_path, tiny_manifest):
    from npedit.training.trainer import Trainer

    base = build_tiny_sd3(tmp_path / "base")
    trainer = Trainer(load_config(None, [f"model.base={base}", f"data.train={tiny_manifest}",
                                         f"output_dir={tmp_path}/full", "stage=npedit", "loss.lambda_vlm=0",
                                         "loss.lambda_dmd=0", "loss.lambda_target=1", "data.batch_size=2"]))
    trainer.step = 1
    trainer.save_checkpoint()
    bad = run_npedit("export", "full", "--adapters", cwd=tmp_path, ok=False)
    assert "holds no LoRA adapters" in bad.stderr and "Traceback" not in bad.stderr
    _lora_run(base, tiny_manifest, tmp_path / "lora")
    bad = run_npedit("export", "lora", "--adapters", "--average", "2", cwd=tmp_path, ok=False)
    assert "drop --average" in bad.stderr


def test_fold_lora_refuses_foreign_adapters(tmp_path):
    from npedit.backbones.sd3 import SD3Backbone

    base = build_tiny_sd3(tmp_path / "base")
    net = SD3Backbone.from_pretrained(base).load_transformer(base)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layer = next(n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and ".attn." in n)
    size = net.get_submodule(layer)
    good = {f"transformer.{layer}.lora_A.weight": torch.ones(2, size.in_features),
            f"transformer.{layer}.lora_B.weight": torch.ones(size.out_features, 2)}
    with pytest.raises(ValueError, match="adapters for another model"):
        fold_lora(net, {**good, "transformer.blocks.99.to_q.lora_A.weight": torch.ones(2, 4),
                        "transformer.blocks.99.to_q.lora_B.weight": torch.ones(4, 2)})
    with pytest.raises(ValueError, match="adapters for another model"):
        fold_lora(net, {k: v[:, :-1] if "lora_A" in k else v for k, v in good.items()})
    with pytest.raises(ValueError, match="has only lora_A"):
        fold_lora(net, {k: v for k, v in good.items() if "lora_A" in k})
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # nothing changed on refusal
    assert fold_lora(net, good) == 1
    torch.testing.assert_close(net.get_submodule(layer).weight, before[f"{layer}.weight"] + 2.0)


def test_zimage_adapters_load_in_our_pipeline_and_in_diffusers_with_peft(tiny_zimage, tmp_path, tiny_manifest):
    pytest.importorskip("peft")  # pinned in requirements.txt; diffusers' LoRA loading needs it
    from diffusers import ZImageTransformer2DModel

    trainer = _lora_run(tiny_zimage, tiny_manifest, tmp_path / "run", "model.lora_critic=false")
    folder = export_adapters(tmp_path / "run", out=tmp_path / "adapters")
    assert not (folder / EXTRA_FILE).exists()  # the Z-Image student is the base's own class: nothing of its own
    expected = _velocity(trainer.backbone, lora.merged_copy(trainer.student))
    pipe = NPEditPipeline.from_pretrained(folder)
    torch.testing.assert_close(_velocity(pipe.backbone, pipe.transformer), expected, atol=1e-5, rtol=1e-4)
    # diffusers' own LoRA loader (PEFT) on the base transformer applies the same update
    stock = ZImageTransformer2DModel.from_pretrained(tiny_zimage, subfolder="transformer")
    card = (folder / "README.md").read_text()
    assert f'load_lora_adapter(folder, prefix="transformer", weight_name="{LORA_FILE}")' in card
    stock.load_lora_adapter(str(folder), prefix="transformer", weight_name=LORA_FILE)  # as the card says
    torch.testing.assert_close(_velocity(pipe.backbone, stock), expected, atol=1e-5, rtol=1e-4)


def test_adapters_on_a_trained_student_name_it_and_rebuild_from_it(tmp_path, tiny_manifest):
    base = build_tiny_sd3(tmp_path / "base")
    first = _lora_run(base, tiny_manifest, tmp_path / "first")
    editor = first.export()  # a plain editor folder: the second run's starting student
    second = _lora_run(base, tiny_manifest, tmp_path / "second", f"model.student={editor}")
    folder = export_adapters(tmp_path / "second")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["student"] == str(editor) and meta["extra"] == ["ref_embed"]
    pipe = NPEditPipeline.from_pretrained(folder)
    torch.testing.assert_close(_velocity(pipe.backbone, pipe.transformer),
                               _velocity(second.backbone, lora.merged_copy(second.student)), atol=1e-5, rtol=1e-4)
    shutil.rmtree(editor)
    with pytest.raises(FileNotFoundError, match="student="):
        NPEditPipeline.from_pretrained(folder)


def test_adapters_of_a_run_on_a_relative_base_record_it_absolute(tmp_path, tiny_manifest, monkeypatch):
    """A run started in /work with `model.base=hub/tiny` (relative, one slash like a hub id) wrote that string into
    npedit_lora.json, so its adapters loaded only from /work. The base and student are recorded absolute (where the
    run was started, whatever folder the export runs in); a relative --base is the one meant here; an older export
    naming its base relatively still loads from where it leads."""
    work, other = tmp_path / "work", tmp_path / "other"
    other.mkdir()
    base = Path(build_tiny_sd3(work / "hub" / "tiny")).resolve()
    monkeypatch.chdir(work)
    trainer = _lora_run("hub/tiny", tiny_manifest, "runs/lora")
    editor = Path(trainer.export()).resolve()  # runs/lora/pipeline: a second run's relative starting student
    _lora_run("hub/tiny", tiny_manifest, "runs/second", "model.student=runs/lora/pipeline")
    monkeypatch.chdir(other)
    folder = export_adapters(work / "runs" / "lora")
    assert json.loads((folder / META_FILE).read_text())["base"] == str(base)
    want = _velocity(trainer.backbone, lora.merged_copy(trainer.student))
    torch.testing.assert_close(_velocity(*_parts(NPEditPipeline.from_pretrained(folder))), want, atol=1e-5, rtol=1e-4)
    second = json.loads((export_adapters(work / "runs" / "second") / META_FILE).read_text())
    assert second["base"] == str(base) and second["student"] == str(editor)
    monkeypatch.chdir(work)
    assert json.loads((export_adapters("runs/lora", base="hub/tiny") / META_FILE).read_text())["base"] == str(
        base.resolve())
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "base": "hub/tiny"}))  # as an older export wrote it
    torch.testing.assert_close(_velocity(*_parts(NPEditPipeline.from_pretrained(folder))), want, atol=1e-5, rtol=1e-4)
    hub = export_adapters("runs/lora", base="owner/some-base")  # a hub id stays an id
    assert json.loads((hub / META_FILE).read_text())["base"] == "owner/some-base"


def _parts(pipe):
    return pipe.backbone, pipe.transformer


def test_a_bfloat16_run_rebuilds_its_rounded_base(tmp_path, tiny_manifest):
    """Frozen weights held in bfloat16 during training are what the adapters were added to: the folder rebuilds
    them rounded the same way, so it loads into the checkpoint's folded student, not the float32 base plus adapters."""
    from accelerate.state import AcceleratorState

    base = build_tiny_sd3(tmp_path / "base")
    AcceleratorState._reset_state(reset_partial_state=True)  # one mixed precision per process: this test's own
    try:
        trainer = _lora_run(base, tiny_manifest, tmp_path / "run", "model.dtype=bfloat16", "mixed_precision=bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    folder = export_adapters(tmp_path / "run")
    assert json.loads((folder / META_FILE).read_text())["dtype"] == "bfloat16"
    checkpointed = load_file(str(tmp_path / "run/checkpoints/step_000001/student/diffusion_pytorch_model.safetensors"))
    got = NPEditPipeline.from_pretrained(folder).transformer.state_dict()
    assert got.keys() == checkpointed.keys()
    for key, value in checkpointed.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5)
    assert trainer.student.pos_embed.proj.weight.dtype == torch.bfloat16


def test_the_apps_export_writes_a_lora_runs_adapters_too(tmp_path, tiny_manifest):
    from workbench import runs

    base = build_tiny_sd3(tmp_path / "base")
    trainer = _lora_run(base, tiny_manifest, tmp_path / "run")
    save_config(trainer.cfg, tmp_path / "run/config.yaml")  # what makes a folder a run (train() writes it)
    message = runs.export_newest(tmp_path / "run", "run")
    assert f"`{tmp_path / 'run/exports/step_000001'}`" in message and "LoRA adapters alone" in message
    assert (tmp_path / "run/exports/step_000001-lora" / LORA_FILE).is_file()
    labels = [label for label, _ in runs.finished_editors(tmp_path)]
    assert labels == ["run: run (step 1, LoRA adapters)", "run: run (step 1)"]


def test_an_adapter_export_cut_short_leaves_the_previous_one(tmp_path, tiny_manifest, full_disk):
    """An adapter export that runs out of disk (or is killed) midway leaves the folder as an earlier export wrote it:
    not one that the app lists as an editor (by its npedit_lora.json) with its adapters cut short or gone."""
    base = build_tiny_sd3(tmp_path / "base")
    _lora_run(base, tiny_manifest, tmp_path / "run")
    folder = export_adapters(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OSError, match="I/O error"), full_disk((folder / LORA_FILE).stat().st_size // 2):
        export_adapters(tmp_path / "run")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
