"""A model folder whose config.json asks for a far larger model than its safetensors weights hold (or than memory
allows) is refused at once by every loader, with one line naming the folder and the sizes, before anything is built."""

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npedit import assets
from npedit.backbones import load_backbone
from npedit.folders import CheckpointError, check_model_size, stored_numel

HUGE = {"dim": 65536, "n_layers": 200000}  # 45 GB asked at once / minutes of building before the guard


def edit_config(folder, **values):
    """Rewrite `folder`/config.json with `values` changed (nested keys as "text_config.hidden_size")."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    for key, value in values.items():
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[last] = value
    file.write_text(json.dumps(config))


def refused_at_once(load, *says):
    """The CheckpointError `load()` raises within 2 s; its message holds every string of `says`."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load()
    assert time.perf_counter() - start < 2, "the guard must answer before building anything"
    message = str(info.value)
    assert "\n" not in message and all(s in message for s in says), message
    return message


def test_stored_numel_reads_headers_only_and_refuses_a_header_that_claims_more_than_its_file(tmp_path):
    tensors = {"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.zeros(0)}
    save_file(tensors, tmp_path / "model.safetensors")
    save_file({"d": torch.zeros(2, 2)}, tmp_path / "more.safetensors")
    assert stored_numel(tmp_path) == 15 + 7 + 4
    liar = tmp_path / "liar"
    liar.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 16]}}).encode()
    (liar / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        stored_numel(liar)
    (liar / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        stored_numel(liar)


@pytest.mark.parametrize("key", sorted(HUGE))
def test_a_transformer_config_asking_for_a_huge_model_is_refused_at_once(tiny_zimage, tmp_path, key):
    base = shutil.copytree(tiny_zimage, tmp_path / "base")
    stored = stored_numel(base / "transformer")
    edit_config(base / "transformer", **{key: HUGE[key]})
    backbone = load_backbone(tiny_zimage)
    for student in (False, True):
        refused_at_once(lambda: backbone.load_transformer(base, for_student=student),
                        f"{base / 'transformer'}: its config.json builds a ZImageTransformer2DModel of more than",
                        f"the {stored:,} its safetensors weights hold")


def test_a_vae_or_text_encoder_config_asking_for_a_huge_model_is_refused_at_once(tiny_zimage, tmp_path):
    vae = shutil.copytree(tiny_zimage, tmp_path / "vae")
    edit_config(vae / "vae", block_out_channels=[65536, 65536])
    refused_at_once(lambda: load_backbone(vae), f"{vae / 'vae'}: its config.json builds a AutoencoderKL")
    text = shutil.copytree(tiny_zimage, tmp_path / "text")
    edit_config(text / "text_encoder", intermediate_size=10**7)
    refused_at_once(lambda: load_backbone(text), f"{text / 'text_encoder'}: its config.json builds a AutoModel")


def test_an_editor_folder_with_a_huge_component_config_is_refused_at_once(tmp_path):
    """NPEditPipeline.from_pretrained (diffusers builds every component) and the SD3 base loader check each model the
    folder holds: the bundled editor's transformer, its CLIP text encoder."""
    from npedit.pipeline import NPEditPipeline

    if not (assets.DEFAULT_MODEL / "model_index.json").is_file():
        pytest.skip("bundled assets not present")
    editor = shutil.copytree(assets.DEFAULT_MODEL, tmp_path / "editor")
    edit_config(editor / "transformer", num_layers=200000)
    refused_at_once(lambda: NPEditPipeline.from_pretrained(editor),
                    f"{editor / 'transformer'}: its config.json builds a NPEditSD3Transformer2DModel of more than")
    shutil.copy(assets.DEFAULT_MODEL / "transformer" / "config.json", editor / "transformer" / "config.json")
    edit_config(editor / "text_encoder", hidden_size=65536)
    for load in (lambda: NPEditPipeline.from_pretrained(editor), lambda: load_backbone(editor)):
        refused_at_once(load, f"{editor / 'text_encoder'}: its config.json builds a CLIPTextModelWithProjection")


def test_an_editor_component_of_another_class_is_named_as_what_it_is(tmp_path):
    """A component folder holding another kind of model (another family's transformer, a UNet as the VAE, a GPT-2 as
    the text encoder) was blamed on "a config edited to a larger size?", or failed on a missing attribute as an
    unexpected error: it is named as what it holds, before anything is built."""
    from npedit.pipeline import NPEditPipeline

    if not (assets.DEFAULT_MODEL / "model_index.json").is_file():
        pytest.skip("bundled assets not present")
    editor = shutil.copytree(assets.DEFAULT_MODEL, tmp_path / "editor")
    shutil.copy(editor / "vae" / "config.json", editor / "transformer" / "config.json")
    with pytest.raises(CheckpointError, match=f"^{editor / 'transformer'} holds a model of class AutoencoderKL; "
                                              "expected: NPEditSD3Transformer2DModel \\(a folder of another model"):
        NPEditPipeline.from_pretrained(editor)
    shutil.copy(assets.DEFAULT_MODEL / "transformer" / "config.json", editor / "transformer" / "config.json")
    shutil.copy(editor / "text_encoder" / "config.json", editor / "vae" / "config.json")
    with pytest.raises(CheckpointError, match="vae holds a transformers clip_text_model model; expected: AutoencoderKL"):
        NPEditPipeline.from_pretrained(editor)
    shutil.copy(assets.DEFAULT_MODEL / "vae" / "config.json", editor / "vae" / "config.json")
    edit_config(editor / "text_encoder", model_type="gpt2")
    with pytest.raises(CheckpointError, match="text_encoder holds a transformers gpt2 model; expected: CLIPText"):
        NPEditPipeline.from_pretrained(editor)
    # restored, it loads (the check passes the classes an editor names)
    shutil.copy(assets.DEFAULT_MODEL / "text_encoder" / "config.json", editor / "text_encoder" / "config.json")
    assert NPEditPipeline.from_pretrained(editor) is not None


def test_a_judge_config_asking_for_a_huge_model_is_refused_at_once(tiny_judge, tmp_path):
    from npedit.judges import load_judge

    for key, value in (("vision_config.num_hidden_layers", 200000), ("text_config.intermediate_size", 10**7)):
        judge = shutil.copytree(tiny_judge, tmp_path / key)
        edit_config(judge, **{key: value})
        refused_at_once(lambda: load_judge(judge), f"{judge}: its config.json builds a "
                        "LlavaOnevisionForConditionalGeneration of more than")


def test_a_model_larger_than_the_memory_available_is_refused(tiny_zimage, monkeypatch):
    from diffusers import ZImageTransformer2DModel

    folder = Path(tiny_zimage, "transformer")
    assert check_model_size(folder, ZImageTransformer2DModel) == stored_numel(folder)  # the real tiny model passes
    monkeypatch.setattr("npedit.folders.available_memory", lambda: 2**20)
    message = refused_at_once(lambda: check_model_size(folder, ZImageTransformer2DModel, torch.float32),
                              "MiB in float32), more than the 1.0 MiB of RAM available")  # was "0.0 GiB"
    assert "GiB" not in message, message
    refused_at_once(lambda: load_backbone(tiny_zimage).load_transformer(tiny_zimage), "of RAM available")


def test_the_memory_available_is_known_without_proc_meminfo(tmp_path, monkeypatch):
    """macOS and Windows have no /proc/meminfo: the RAM available read as unknown there, and every memory check (a
    run's models, a model's size) was skipped. psutil gives it; on Linux it is still MemAvailable."""
    import psutil

    from npedit import folders

    assert folders.MEMINFO.is_file()  # (this test runs on Linux)
    kib = next(int(line.split()[1]) for line in folders.MEMINFO.read_text(encoding="utf-8").splitlines()
               if line.startswith("MemAvailable:"))
    assert folders.available_memory() == kib * 1024
    monkeypatch.setattr(folders, "MEMINFO", tmp_path / "no-proc" / "meminfo")
    available = folders.available_memory()
    assert available is not None and abs(available - psutil.virtual_memory().available) < 256 << 20
    assert folders.memory_limits("cpu") and folders.memory_limits("cpu")[0][1] == "of RAM available"


def fake_gpu(monkeypatch, free: int):
    """A CUDA device with `free` bytes free, as torch.cuda reports it (this machine may have none)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")


def test_a_model_loaded_onto_a_gpu_is_checked_against_its_free_memory(tiny_zimage, tiny_judge, monkeypatch):
    """Loading onto CUDA, a model must fit the GPU's free memory (it was checked against the RAM alone), and still
    the RAM, which the loaders read the weights into before they move; on the CPU the GPU's figure plays no part."""
    from diffusers import ZImageTransformer2DModel

    from npedit.judges import load_judge

    folder = Path(tiny_zimage, "transformer")
    need = stored_numel(folder) * 4
    monkeypatch.setattr("npedit.folders.available_memory", lambda: 64 << 30)
    fake_gpu(monkeypatch, need - 1)
    refused_at_once(lambda: check_model_size(folder, ZImageTransformer2DModel, torch.float32, "cuda:0"),
                    "in float32), more than the", "free on cuda:0 (a test GPU)")
    assert check_model_size(folder, ZImageTransformer2DModel, torch.float32, "cpu") == stored_numel(folder)
    fake_gpu(monkeypatch, need)
    assert check_model_size(folder, ZImageTransformer2DModel, torch.float32, "cuda:0") == stored_numel(folder)
    monkeypatch.setattr("npedit.folders.available_memory", lambda: need - 1)
    refused_at_once(lambda: check_model_size(folder, ZImageTransformer2DModel, torch.float32, "cuda:0"),
                    "of RAM available")
    monkeypatch.setattr("npedit.folders.available_memory", lambda: 64 << 30)
    fake_gpu(monkeypatch, 1 << 10)  # the judge is refused before a weight is read or moved to the (absent) GPU
    refused_at_once(lambda: load_judge(tiny_judge, torch_dtype=torch.float32, device="cuda:0"),
                    f"{tiny_judge}: its config.json builds a", "more than the 1.0 KiB free on cuda:0 (a test GPU)")


def test_real_tiny_models_still_load(tiny_zimage, tiny_judge):
    from npedit.judges import load_judge

    backbone = load_backbone(tiny_zimage)
    teacher = backbone.load_transformer(tiny_zimage)
    assert sum(p.numel() for p in teacher.parameters()) == stored_numel(Path(tiny_zimage, "transformer"))
    assert load_judge(tiny_judge).model is not None
    vae = load_file(str(Path(tiny_zimage, "vae", "diffusion_pytorch_model.safetensors")))
    assert sum(t.numel() for t in vae.values()) == stored_numel(Path(tiny_zimage, "vae"))


def test_an_editor_loaded_onto_a_gpu_is_checked_against_its_free_memory(monkeypatch, tmp_path):
    """NPEditPipeline.from_pretrained(device=...) checks the editor's models, together, against that device's free
    memory before building any, and returns the editor there; `edit` on a GPU loads it so: one line, no weights read."""
    from PIL import Image

    from npedit import NPEditPipeline
    from npedit.cli import main
    from npedit.folders import model_components

    need = sum(check_model_size(folder, cls) for folder, cls in model_components(assets.DEFAULT_MODEL)) * 4
    monkeypatch.setattr("npedit.folders.available_memory", lambda: 64 << 30)
    fake_gpu(monkeypatch, need - 1)
    message = refused_at_once(lambda: NPEditPipeline.from_pretrained(assets.DEFAULT_MODEL, device="cuda:0"),
                              "its models need", "together in float32", "free on cuda:0 (a test GPU)")
    assert "GiB" not in message and "MiB" in message, message  # the bundled editor's few MiB, in MiB
    pipe = NPEditPipeline.from_pretrained(assets.DEFAULT_MODEL, device="cpu")
    assert pipe.device.type == "cpu" and pipe.transformer.dtype == torch.float32
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    monkeypatch.setattr("npedit.cli._device", lambda: "cuda:0")
    with pytest.raises(SystemExit, match=r"^error: .*together in float32 .*free on cuda:0 \(a test GPU\)") as info:
        main(["edit", "--image", str(tmp_path / "in.png"), "--instruction", "x", "--output", str(tmp_path / "o.png"),
              "--dtype", "float32"])
    assert "\n" not in str(info.value)
