"""Hub ids for people with real checkpoints: one found nowhere fails at once offline, naming where it was looked for;
one in the local Hugging Face cache loads from its snapshot offline and is size-checked there before anything is
built; a reachable hub is left to the hub client, as it always was."""

import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from npedit import assets
from npedit.folders import CheckpointError
from test_model_size import edit_config  # (tests/ is on sys.path: pytest prepends it)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def closed_port() -> int:
    """A local TCP port nothing listens on (a connection to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own."""
    import huggingface_hub

    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    return folder


@pytest.fixture
def no_network(cache, monkeypatch, tmp_path):
    """No hub to reach (its endpoint refuses connections) and no HF_HUB_OFFLINE: the hub client then retries."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.chdir(tmp_path)
    return cache


def cached(cache: Path, repo_id: str, model: Path) -> Path:
    """Put the folder `model` into `cache` as the hub client lays out a download of `repo_id`; its snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = shutil.copytree(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def within(seconds: float, load, clock=time.perf_counter):
    """`load()`'s result, asserting it took under `seconds` by `clock`: wall-clock by default (a hub client's retries
    wait, using no CPU); `time.process_time` for a refusal that must not build the model it refuses (CPU work, which
    a machine busy with other jobs does not inflate: its wall-clock reached 2.4 s against 2 there)."""
    start = clock()
    try:
        return load()
    finally:
        assert clock() - start < seconds, f"took {clock() - start:.1f} s"


def loaders(tiny_zimage):
    """Every loader a hub id reaches, by name."""
    from npedit import NPEditPipeline
    from npedit.backbones import detect_family, load_backbone
    from npedit.backbones.sd3 import SD3Backbone
    from npedit.backbones.vae import AnyVAE
    from npedit.backbones.zimage import ZImageBackbone
    from npedit.judges import load_judge
    from npedit.judges.llava_onevision import LlavaOnevisionJudge

    zimage = load_backbone(tiny_zimage)
    return {
        "editor": NPEditPipeline.from_pretrained, "backbone": load_backbone, "family": detect_family,
        "zimage": ZImageBackbone.from_pretrained, "sd3": SD3Backbone.from_pretrained,
        "transformer": zimage.load_transformer, "vae": AnyVAE.from_pretrained, "judge": load_judge,
        "judge class": LlavaOnevisionJudge.from_pretrained,
    }


def test_a_hub_id_found_nowhere_fails_at_once_saying_where_it_was_looked_for(no_network, tiny_zimage, tmp_path):
    """Offline without HF_HUB_OFFLINE, `nosuch/repo` cost every loader ~23 s of the hub client's retries; now one
    line in well under 2 s that names the local folder, the cache and the hub it tried, and what to do."""
    for name, load in loaders(tiny_zimage).items():
        with pytest.raises(CheckpointError) as info:
            within(2, lambda: load("nosuch/repo"))
        message = str(info.value)
        for says in (f"cannot find 'nosuch/repo' locally or on the hub: no folder {tmp_path / 'nosuch' / 'repo'}",
                     f"no repo nosuch/repo in the Hugging Face cache ({no_network})",
                     "the hub cannot be reached (ConnectError", "`hf download nosuch/repo`"):
            assert says in message and "\n" not in message, (name, message)
    from npedit.judges import read_model_type
    from workbench.models import ModelError, check_judge

    assert within(2, lambda: read_model_type("nosuch/repo")) is None
    with pytest.raises(ModelError, match="nosuch/repo is not readable offline"):  # the app's judge check
        within(2, lambda: check_judge("nosuch/repo"))


def test_hub_unreachable_tells_no_connection_from_an_answer(no_network, monkeypatch):
    """A refused connection or HF_HUB_OFFLINE is unreachable; any HTTP answer (here a 404 from a local server) is a
    reachable hub, so `locate` leaves the id to the hub client as before, even when the cache holds the repo."""
    import huggingface_hub

    from npedit.folders import hub_unreachable, locate

    assert hub_unreachable().startswith("ConnectError")

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_unreachable() is None
        cached(no_network, "owner/name", assets.DEFAULT_MODEL)
        assert locate("owner/name") == "owner/name" and locate("nosuch/repo") == "nosuch/repo"
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    assert locate("owner/name") == str(no_network / "models--owner--name" / "snapshots" / COMMIT)


def test_a_load_asks_the_hub_once_not_once_per_part(no_network, tiny_zimage, monkeypatch):
    """Each loader a hub id passes through (`locate`: here the backbone, then the transformer; a run's start has
    more, and the app checks its judge on every edit) asked the hub's endpoint again, each request waiting
    HF_HUB_ETAG_TIMEOUT (10 s) where a network drops packets. One answer now stands for HUB_ANSWER_S."""
    import huggingface_hub.utils

    from npedit import folders
    from npedit.backbones import load_backbone

    asked = []
    session = huggingface_hub.utils.get_session

    def counted():
        real = session()

        class Counting:
            def head(self, *args, **kwargs):
                asked.append(args[0] if args else kwargs.get("url"))
                return real.head(*args, **kwargs)

        return Counting()

    monkeypatch.setattr(huggingface_hub.utils, "get_session", counted)
    cached(no_network, "owner/zimage", tiny_zimage)
    backbone = load_backbone("owner/zimage")
    backbone.load_transformer("owner/zimage")
    assert len(asked) == 1, asked
    monkeypatch.setattr(folders, "HUB_ANSWER_S", 0.0)  # an answer older than that is asked again
    assert folders.hub_unreachable().startswith("ConnectError") and len(asked) == 2

def test_a_cached_hub_id_loads_offline_from_its_snapshot(no_network, tiny_zimage, tiny_judge):
    """The editor, a base (backbone and transformer) and a judge in the cache load offline without the hub client's
    retries for the files a download never fetched."""
    from npedit import NPEditPipeline
    from npedit.backbones import load_backbone
    from npedit.judges import load_judge

    cached(no_network, "owner/editor", assets.DEFAULT_MODEL)
    cached(no_network, "owner/zimage", tiny_zimage)
    cached(no_network, "owner/judge", tiny_judge)
    pipe = within(10, lambda: NPEditPipeline.from_pretrained("owner/editor"))
    assert type(pipe.transformer).__name__ == "NPEditSD3Transformer2DModel"
    backbone = within(10, lambda: load_backbone("owner/zimage"))
    assert within(5, lambda: backbone.load_transformer("owner/zimage")) is not None
    assert within(10, lambda: load_judge("owner/judge")).model is not None


def test_a_revision_of_a_cached_editor_loads_that_revision_offline(no_network, monkeypatch):
    """`from_pretrained("owner/name", revision=...)` offline loaded the snapshot "main" names whatever the revision
    asked (a tag or commit hash was dropped without a word); now that revision's snapshot, by ref or full hash, and a
    revision the cache lacks is one error naming it. The editor records its hub id, not the cache folder."""
    import huggingface_hub

    from npedit import NPEditPipeline
    from npedit.domain import Domain, write_domain

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached(no_network, "owner/editor", assets.DEFAULT_MODEL)  # main: the bundled 64 px editor
    repo = no_network / "models--owner--editor"
    tagged = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(assets.DEFAULT_MODEL, repo / "snapshots" / tagged)
    write_domain(repo / "snapshots" / tagged, Domain("shapes", 32))  # told apart from main by its domain file
    (repo / "refs" / "v1").write_text(tagged)
    assert NPEditPipeline.from_pretrained("owner/editor").domain.resolution == 64
    for revision in ("v1", tagged):
        pipe = NPEditPipeline.from_pretrained("owner/editor", revision=revision)
        assert pipe.domain.resolution == 32, revision
    assert pipe.config._name_or_path == "owner/editor"
    with pytest.raises(CheckpointError, match="'owner/editor' at revision 'v2'.*`hf download owner/editor --revision "
                                              "v2`"):
        NPEditPipeline.from_pretrained("owner/editor", revision="v2")


def test_the_cli_and_the_app_load_a_revision_of_a_hub_editor(no_network, monkeypatch, capsys, tmp_path):
    """`edit --revision` and the app's `--revision` ($NPEDIT_REVISION) pick the version of a hub editor; neither
    had a way to (the newest on main was the only one)."""
    import huggingface_hub
    from PIL import Image

    import app
    from npedit.cli import main
    from npedit.domain import Domain, write_domain

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached(no_network, "owner/editor", assets.DEFAULT_MODEL)
    repo = no_network / "models--owner--editor"
    tagged = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(assets.DEFAULT_MODEL, repo / "snapshots" / tagged)
    write_domain(repo / "snapshots" / tagged, Domain("shapes", 32))
    (repo / "refs" / "v1").write_text(tagged)
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "in.png")
    edit = ["edit", "--model", "owner/editor", "--image", str(tmp_path / "in.png"), "--instruction", "make it red",
            "--output", str(tmp_path / "out.png")]
    assert main(edit) == 0 and "32x32" not in capsys.readouterr().err  # main: the 64 px editor, no rescaling
    assert main([*edit, "--revision", "v1"]) == 0 and "edited at 32x32" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--revision picks a version of a hub id"):
        main([*edit[:2], str(assets.DEFAULT_MODEL), *edit[3:], "--revision", "v1"])
    monkeypatch.setenv("NPEDIT_REVISION", "v1")
    args = app.parse_args(["--model", "owner/editor"])
    assert args.revision == "v1"
    assert app.make_app(args).models.editor().domain.resolution == 32


@pytest.fixture
def strict(monkeypatch):
    """The size bound without its margin, so a tiny model's config made a few times larger is refused (and the
    build that a missing check would run stays small)."""
    monkeypatch.setattr("npedit.folders.SIZE_MARGIN", 0)


@pytest.fixture
def hub_answers(cache, monkeypatch):
    """A reachable hub for our checks (no `locate` detour to the cache), the libraries reading the cache (the
    suite runs with HF_HUB_OFFLINE): what a load of an already-downloaded hub id does online."""
    monkeypatch.setattr("npedit.folders.hub_unreachable", lambda: None, raising=False)  # (absent before it)
    return cache


@pytest.mark.parametrize("part", ["transformer", "text_encoder", "vae", "judge"])
def test_a_cached_hub_id_is_size_checked_on_its_snapshot(hub_answers, strict, tiny_zimage, tiny_judge, part):
    """A hub id already in the cache whose config builds far more than its weights hold is refused before it is
    built, as a local folder is (the check read local folders only)."""
    from npedit.backbones import load_backbone
    from npedit.backbones.vae import AnyVAE
    from npedit.judges import load_judge

    model = tiny_judge if part == "judge" else tiny_zimage
    snapshot = cached(hub_answers, "owner/model", model)
    change = {"transformer": {"n_layers": 20}, "text_encoder": {"intermediate_size": 640},
              "vae": {"block_out_channels": [64, 128, 128, 128]},
              "judge": {"text_config.intermediate_size": 2048}}[part]
    edit_config(snapshot / ("" if part == "judge" else part), **change)
    load = {"transformer": lambda: load_backbone(tiny_zimage).load_transformer("owner/model"),
            "text_encoder": lambda: load_backbone("owner/model"),
            "vae": lambda: AnyVAE.from_pretrained("owner/model", subfolder="vae"),
            "judge": lambda: load_judge("owner/model")}[part]
    with pytest.raises(CheckpointError, match="its config.json builds a .* its safetensors weights hold"):
        within(2, load, clock=time.process_time)


def test_a_partly_downloaded_snapshot_is_not_size_checked(hub_answers, tiny_judge):
    """A cache snapshot whose index lists a shard not yet downloaded holds no whole model to count (its weights
    would look smaller than the config): the check leaves it to the load."""
    from npedit.folders import model_folder, weights_complete

    snapshot = cached(hub_answers, "owner/judge", tiny_judge)
    assert model_folder("owner/judge") == snapshot and weights_complete(snapshot)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert not weights_complete(snapshot) and model_folder("owner/judge") is None
    assert model_folder("nosuch/repo") is None


def test_an_editor_from_the_hub_is_downloaded_then_size_checked_before_it_is_built(hub_answers, strict, tmp_path,
                                                                                  monkeypatch):
    """A hub id not yet in the cache: diffusers downloaded and built it in one call, unchecked; now the download
    comes first and its snapshot is checked as a local editor folder is."""
    from diffusers import DiffusionPipeline

    from npedit import NPEditPipeline

    snapshot = shutil.copytree(assets.DEFAULT_MODEL, tmp_path / "downloaded")
    edit_config(snapshot / "transformer", num_layers=16)
    asked = []

    def download(cls, repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("use_safetensors")))
        return str(snapshot)

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(download))
    with pytest.raises(CheckpointError, match=f"{snapshot / 'transformer'}: its config.json builds a "
                                              "NPEditSD3Transformer2DModel of more than"):
        within(2, lambda: NPEditPipeline.from_pretrained("owner/editor"), clock=time.process_time)
    assert asked == [("owner/editor", True)]
    shutil.copy(assets.DEFAULT_MODEL / "transformer" / "config.json", snapshot / "transformer" / "config.json")
    pipe = NPEditPipeline.from_pretrained("owner/editor")
    assert pipe.name_or_path == "owner/editor"  # as diffusers records a hub id, not the cache folder


def test_an_editor_whose_models_fit_memory_alone_but_not_together_is_refused(monkeypatch):
    """Each model was checked against the memory available on its own: a transformer, text encoder and VAE that
    fit one at a time but not all at once loaded anyway. The whole pipeline's sum is checked, in float32 (what a
    load without a dtype gives)."""
    import torch

    from npedit import NPEditPipeline
    from npedit.folders import check_model_size, model_components

    counts = {folder.name: check_model_size(folder, cls) for folder, cls in model_components(assets.DEFAULT_MODEL)}
    need = sum(counts.values()) * 4
    monkeypatch.setattr("npedit.folders.available_memory", lambda: need - 1)
    assert max(counts.values()) * 4 < need - 1
    with pytest.raises(CheckpointError) as info:
        within(2, lambda: NPEditPipeline.from_pretrained(assets.DEFAULT_MODEL), clock=time.process_time)
    message = str(info.value)
    assert f"{assets.DEFAULT_MODEL}: its models need" in message and "together in float32 (" in message, message
    assert all(name in message for name in counts) and "MiB of RAM available" in message, message
    monkeypatch.setattr("npedit.folders.available_memory", lambda: need)
    assert NPEditPipeline.from_pretrained(assets.DEFAULT_MODEL, torch_dtype=torch.float32) is not None


def test_shapes_recipes_check_the_vae_they_load(strict, tiny_zimage, tmp_path):
    """The Shapes recipes loaded their VAE with AutoencoderKL / PatchAutoencoder.from_pretrained directly, past the
    size check; they now use the one VAE loader, which also names a folder of the wrong VAE class."""
    from npedit.shapes.recipes import FastVAEConfig, TeacherConfig, VAEConfig, build_base, train_fast_vae, train_vae

    vae = shutil.copytree(Path(tiny_zimage, "vae"), tmp_path / "vae")
    edit_config(vae, block_out_channels=[64, 128, 128, 128])
    with pytest.raises(CheckpointError, match=f"{vae}: its config.json builds a AutoencoderKL"):
        within(2, lambda: train_vae(VAEConfig(output_dir=str(tmp_path / "a"), init=str(vae), steps=1)),
               clock=time.process_time)
    with pytest.raises(CheckpointError, match=f"{vae}: its config.json builds a AutoencoderKL"):
        within(2, lambda: build_base(tmp_path / "b", TeacherConfig(vae=str(vae))), clock=time.process_time)
    with pytest.raises(CheckpointError, match="holds a AutoencoderKL, not the PatchAutoencoder this needs"):
        train_fast_vae(FastVAEConfig(output_dir=str(tmp_path / "c"), source=str(Path(tiny_zimage, "vae")),
                                     init=str(Path(tiny_zimage, "vae")), steps=1))


def test_diffusers_own_pipeline_loader_size_checks_our_transformer(strict, tmp_path):
    """`diffusers.DiffusionPipeline.from_pretrained(editor)` builds each component by its class, past our loaders:
    our student transformer classes check their own folder's size first, so an editor whose transformer config was
    made larger is refused there too (its text encoder and VAE are diffusers' and transformers' classes: unchecked)."""
    import diffusers

    from npedit.backbones.sd3 import NPEditSD3Transformer2DModel
    from npedit.pipeline import register_with_diffusers

    register_with_diffusers()
    editor = shutil.copytree(assets.DEFAULT_MODEL, tmp_path / "editor")
    edit_config(editor / "transformer", num_layers=16)
    with pytest.raises(CheckpointError, match=f"{editor / 'transformer'}: its config.json builds a "
                                              "NPEditSD3Transformer2DModel of more than"):
        within(2, lambda: diffusers.DiffusionPipeline.from_pretrained(editor), clock=time.process_time)
    with pytest.raises(CheckpointError, match="NPEditSD3Transformer2DModel of more than"):
        NPEditSD3Transformer2DModel.from_pretrained(editor, subfolder="transformer")
    assert NPEditSD3Transformer2DModel.from_pretrained(assets.DEFAULT_MODEL / "transformer") is not None
