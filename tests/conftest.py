import json
import os
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory):
    """A tiny Z-Image-family base model (transformer, VAE, Qwen3 text encoder, tokenizer) on disk."""
    from npedit.backbones.tiny import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("zimage"))


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory):
    """A tiny LLaVA-OneVision judge on disk."""
    from npedit.judges.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("judge"))


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory, tiny_zimage, tiny_judge):
    """Editor, judge, teacher and critic paths of one tiny model set (workbench.tiny), shared by the app tests."""
    from workbench.tiny import build_tiny_set

    return build_tiny_set(tmp_path_factory.getbasetemp() / "tiny-set", base=tiny_zimage, judge=tiny_judge)


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """Four 64x64 samples (two recolors, two removals) with targets, as a cases.jsonl."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / "images" / f"t{i}.png")
        lines.append(json.dumps({
            "id": str(i), "image": f"images/{i}.png", "target": f"images/t{i}.png",
            "instruction": "make the red circle green" if i % 2 == 0 else "remove the red circle",
            "caption_reference": "a red circle on a gray background",
            "caption_target": "a green circle on a gray background" if i % 2 == 0 else "a gray background",
            "edit_type": "recolor" if i % 2 == 0 else "remove", "object_name": "red circle",
            # objects to leave in place (judge.keep_questions): a list, a ";"-separated string, or none
            **([{"keep": ["blue square", "red circle"]}, {"keep": "red circle; green triangle"}, {}, {}][i]),
            # the edit's own result (judge.change_questions): objects it creates / makes disappear
            **([{"new": ["green circle"]}, {}, {"new": "green circle", "gone": "red circle"}, {}][i]),
        }))
    (root / "cases.jsonl").write_text("\n".join(lines) + "\n")
    return root / "cases.jsonl"


@pytest.fixture(scope="session")
def photo():
    """A real photo (matplotlib's sample portrait, 512x600) as PIL RGB and as a (1, 3, H, W) tensor in [0, 1]."""
    import torch
    from matplotlib import cbook

    pil = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return pil, torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture
def full_disk():
    """`with full_disk(n):` no file of this process grows past n bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ): a write
    that crosses it stops there and raises OSError (EFBIG), as a disk filling up midway cuts a file short."""
    resource = pytest.importorskip("resource", reason="no RLIMIT_FSIZE here (Windows)")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    @contextmanager
    def limit(nbytes: int):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limit


@pytest.fixture
def ctrl_c_at_fsync(monkeypatch):
    """A context in which every file write is stopped as by Ctrl-C where it flushes to disk (`files.os.fsync`), the
    last moment before a write publishes its file: what a whole-or-nothing write must survive."""
    from npedit import files

    def interrupted(fd, *args):
        raise KeyboardInterrupt

    @contextmanager
    def stopped():
        with monkeypatch.context() as m:
            m.setattr(files.os, "fsync", interrupted)
            yield

    return stopped


@pytest.fixture(autouse=True)
def no_trainers_elsewhere(monkeypatch):
    """A start sees no `npedit train` of the machine's other users of it (`jobs.outside_trainer`: a trainer of another
    session on this machine would refuse every job a test starts; `npedit train` in this process would warn of it);
    tests of those checks show them their own processes."""
    monkeypatch.setattr("npedit.processes.listing", lambda: iter(()))


@pytest.fixture(autouse=True)
def fresh_hub_answers(monkeypatch):
    """Each test asks the hub's endpoint itself (`folders.hub_unreachable` keeps an answer for HUB_ANSWER_S): a port
    refused in one test may serve another's local hub."""
    monkeypatch.setattr("npedit.folders._HUB_ANSWERS", {})
