"""Model folders laid out as the real hub repos are (sharded weights with their index, tokenizers saved whole) and
what one missing file does: a line naming it before anything loads, never a library's error about another folder,
a tokenizer that silently encodes every prompt to nothing, or a pad token missing after the models loaded."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from npedit.backbones import load_backbone
from npedit.folders import CheckpointError


def reshard(folder, model_class, max_shard_size="60KB"):
    """Save the model in `folder` again as shards + index, as the hub repos of large models hold their weights."""
    model = model_class.from_pretrained(folder)
    for file in [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        file.unlink()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.safetensors.index.json"))


@pytest.fixture(scope="module")
def sharded_zimage(tmp_path_factory, tiny_zimage):
    """The tiny Z-Image base with its transformer and text encoder in shards, as Tongyi-MAI/Z-Image-Turbo."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Model

    folder = shutil.copytree(tiny_zimage, tmp_path_factory.mktemp("hub") / "Z-Image-Turbo")
    reshard(folder / "transformer", ZImageTransformer2DModel)
    reshard(folder / "text_encoder", Qwen3Model)
    as_qwen2_tokenizer(folder / "tokenizer")
    return folder


def as_qwen2_tokenizer(folder):
    """Name Qwen2Tokenizer in `folder`'s tokenizer_config.json, as Z-Image's tokenizer does (ours names no class)."""
    file = folder / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "tokenizer_class": "Qwen2Tokenizer"}))


def _without(folder, tmp_path, *files):
    """A copy of `folder` lacking `files` (paths inside it)."""
    copy = shutil.copytree(folder, tmp_path / f"{folder.name}-{len(list(tmp_path.iterdir()))}")
    for file in files:
        (copy / file).unlink()
    return copy


def test_a_sharded_base_loads_and_each_missing_part_is_named(sharded_zimage, tiny_manifest, tmp_path):
    """Each file whose loss the loaders reported as another folder's missing model.safetensors (an index), as a pad
    token missing at the first step (tokenizer_config.json), or not at all (tokenizer.json: an empty tokenizer that
    encodes every prompt to no tokens) is named at once, for the backbone and the run's memory check alike."""
    from npedit.config import load_config
    from npedit.training.memory import count_models

    backbone = load_backbone(sharded_zimage)
    backbone.load_transformer(sharded_zimage)
    assert backbone.tokenizer("make the car red").input_ids  # whole
    shards = sorted(p.name for p in (sharded_zimage / "text_encoder").glob("*.safetensors"))
    cases = {
        "text_encoder/model.safetensors.index.json":
            f"text_encoder/ holds weight shards ({shards[0]}, ...) but not their index, model.safetensors.index.json",
        f"text_encoder/{shards[0]}": f"1 of the {len(shards)} weight files that text_encoder/ lists in "
                                     f"model.safetensors.index.json are missing ({shards[0]})",
        "tokenizer/tokenizer_config.json": "no tokenizer_config.json in tokenizer/",
        "tokenizer/tokenizer.json": "no tokenizer files in tokenizer/ (tokenizer.json",
        "vae/diffusion_pytorch_model.safetensors": "no safetensors weights in vae/",
    }
    for file, says in cases.items():
        broken = _without(sharded_zimage, tmp_path, file)
        for load in (lambda: load_backbone(broken),
                     lambda: count_models(load_config(None, [
                         "stage=warmup", f"model.base={broken}", f"data.train={tiny_manifest}"]))):
            with pytest.raises(CheckpointError, match=f"{re.escape(str(broken))} is an incomplete Z-Image "
                                                      f"checkpoint: .*{re.escape(says)}"):
                load()
    broken = _without(sharded_zimage, tmp_path, "transformer/diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(CheckpointError, match=r"transformer holds weight shards \(diffusion_pytorch_model-00001-of-"):
        backbone.load_transformer(broken)


def test_an_editor_without_its_tokenizer_vocabulary_is_refused_not_run_on_empty_prompts(sharded_zimage, tmp_path):
    """An editor trained from Z-Image holds a Qwen2Tokenizer, which transformers builds from tokenizer_config.json
    alone (its special tokens only: every prompt encoded to nothing), so one copied without tokenizer/tokenizer.json
    edited with empty instructions, silently."""
    from npedit.pipeline import NPEditPipeline

    backbone = load_backbone(sharded_zimage)
    editor = tmp_path / "editor"
    NPEditPipeline.from_parts(backbone.prepare_student(backbone.load_transformer(sharded_zimage)), backbone)\
        .save_pretrained(editor)
    assert json.loads((editor / "model_index.json").read_text())["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert NPEditPipeline.from_pretrained(editor).tokenizer("make the car red").input_ids
    (editor / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("incomplete editor folder: no tokenizer files in tokenizer/")):
        NPEditPipeline.from_pretrained(editor)


def test_an_editor_holding_a_vae_of_another_latent_space_is_refused_before_it_loads(tmp_path):
    """A VAE of another channel count copied into an editor's vae/ loaded silently; the edit then failed at its first
    step with a convolution's shape error, said as an unexpected one."""
    from npedit.assets import DEFAULT_MODEL
    from npedit.backbones.tiny import tiny_vae
    from npedit.pipeline import NPEditPipeline

    editor = shutil.copytree(DEFAULT_MODEL, tmp_path / "editor", ignore=shutil.ignore_patterns("critic"))
    shutil.rmtree(editor / "vae")
    tiny_vae(8, 4).save_pretrained(editor / "vae")
    with pytest.raises(CheckpointError, match=re.escape("its VAE (vae/) makes latents of 8 channels and its "
                                                        "transformer takes 4: the VAE is of another latent space")):
        NPEditPipeline.from_pretrained(editor)
    with pytest.raises(CheckpointError, match="makes latents of 8 channels"):  # as a model.base of a training run
        load_backbone(editor)
    shutil.rmtree(editor / "vae")
    tiny_vae(4, 4).save_pretrained(editor / "vae")  # the same latent space's shape (its weights are the user's call)
    assert NPEditPipeline.from_pretrained(editor).vae.config.latent_channels == 4


def test_weights_problem_reads_a_folder_of_shards(tmp_path):
    """Shards that a whole file stands beside, or whose index is there, are fine; shards alone are not."""
    from safetensors.torch import save_file

    from npedit.folders import weights_problem

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / name))
    assert "but not their index, model.safetensors.index.json" in weights_problem(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert weights_problem(tmp_path) is None
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert weights_problem(tmp_path) is None
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert weights_problem(tmp_path, "judge/") == ("1 of the 2 weight files that judge/ lists in "
                                                   "model.safetensors.index.json are missing "
                                                   "(model-00002-of-00002.safetensors)")


def test_a_judge_missing_a_processor_file_is_named_before_its_weights(tiny_judge, tmp_path):
    """A LLaVA-OneVision repo as the hub holds it (image processor in preprocessor_config.json) without its
    processor_config.json built a processor with no image token count (TypeError at the first question); an
    InternVL without tokenizer_config.json a tokenizer with no image tokens (AttributeError): named now, before the
    weights are read."""
    from npedit.judges import load_judge
    from npedit.judges.tiny import build_tiny_internvl

    llava = shutil.copytree(tiny_judge, tmp_path / "llava-onevision-qwen2-0.5b-ov-hf")
    processor = json.loads((llava / "processor_config.json").read_text())
    (llava / "preprocessor_config.json").write_text(json.dumps(processor.pop("image_processor")))
    (llava / "processor_config.json").write_text(json.dumps(processor))
    load_judge(llava)  # the hub's layout loads
    (llava / "processor_config.json").unlink()
    internvl = build_tiny_internvl(tmp_path / "InternVL3-1B-hf", image_size=64, patch_size=4)
    (Path(internvl) / "tokenizer_config.json").unlink()
    for folder, says in ((llava, "no processor_config.json"), (internvl, "no tokenizer_config.json in the folder")):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(folder))} is an incomplete judge folder: "
                                                  f"{re.escape(says)}; copy what is missing from the model's hub"):
            load_judge(folder)


def test_code_shipped_in_a_folder_never_runs(tiny_zimage, tiny_judge, tmp_path, monkeypatch):
    """A judge or base whose configs name classes in a .py file of their own (`auto_map`, remote code) loads the
    library's classes: nothing passes trust_remote_code, so the file is never imported."""
    from npedit.judges import load_judge

    ran = tmp_path / "ran"
    code = f"open({str(ran)!r}, 'w').write('ran')\n"

    def ship_code(folder, *names):
        (folder / "custom.py").write_text(code)
        for name in names:
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**config, "auto_map": {
                "AutoConfig": "custom.C", "AutoModel": "custom.M", "AutoModelForImageTextToText": "custom.M",
                "AutoProcessor": "custom.P", "AutoImageProcessor": "custom.I",
                "AutoTokenizer": ["custom.T", "custom.T"]}}))

    judge = shutil.copytree(tiny_judge, tmp_path / "judge")
    ship_code(judge, "config.json", "processor_config.json", "tokenizer_config.json")
    base = shutil.copytree(tiny_zimage, tmp_path / "base")
    ship_code(base / "text_encoder", "config.json")
    ship_code(base / "tokenizer", "tokenizer_config.json")
    monkeypatch.syspath_prepend(str(judge))  # even where the file could be imported by its plain name
    load_judge(judge)
    load_backbone(base).load_transformer(base)
    assert not ran.exists()


def test_an_sdxl_checkpoint_given_as_the_base_is_named(tmp_path):
    """An SDXL pipeline folder (unet/, no transformer/) said only "holds no transformer/config.json", and its bare
    UNet "unsupported transformer class" without naming the folder: both now say what and where it is."""
    from diffusers import UNet2DConditionModel

    from npedit.backbones import detect_family

    sdxl = tmp_path / "stable-diffusion-xl-base-1.0"
    UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).save_pretrained(sdxl / "unet")
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(sdxl))} is a diffusers pipeline of class "
                                                "StableDiffusionXLPipeline, with no transformer/config.json"):
        detect_family(sdxl)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(sdxl / 'unet'))} holds a UNet2DConditionModel: "
                                              "unsupported transformer class"):
        detect_family(sdxl / "unet")


def test_a_plain_clip_is_not_called_a_judge(tmp_path, tiny_judge):
    """A CLIP folder given as the editor or the base was described as "a judge/VLM", which it is not."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from npedit.folders import what_is

    clip = tmp_path / "clip-vit-base-patch32"
    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(clip)
    assert what_is(clip) == "a transformers model of type 'clip_text_model' (neither an editor nor a judge)"
    assert what_is(tiny_judge) == "a transformers model of type 'llava_onevision' (a judge/VLM, not an editor)"


def test_an_sd3_base_may_leave_t5_out_but_not_half_there(tmp_path):
    """SD3 runs without its T5 (a download that skipped text_encoder_3/ and tokenizer_3/ loads); a T5 folder that is
    there without its weights was diffusers' OSError about a missing model.safetensors, now one line naming it."""
    from npedit.backbones.tiny import build_tiny_sd3

    base = Path(build_tiny_sd3(tmp_path / "stable-diffusion-3-medium-diffusers", t5_hidden=48))
    without_t5 = shutil.copytree(base, tmp_path / "no-t5")
    for part in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(without_t5 / part)
    assert load_backbone(without_t5).text_encoder_3 is None
    broken = _without(base, tmp_path, "text_encoder_3/model.safetensors")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(broken))} is an incomplete SD3 checkpoint: "
                                              r"no safetensors weights in text_encoder_3/$"):
        load_backbone(broken)
