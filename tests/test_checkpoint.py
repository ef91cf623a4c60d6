import json
import os
import random

import numpy as np
import pytest
import torch

from npedit.training import checkpoint as ckpt


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.0, 0.9))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt.optimizer_state_to_files(opt, tmp_path / "opt")
    opt2 = torch.optim.AdamW(net.parameters(), lr=5.0)
    ckpt.optimizer_state_from_files(opt2, tmp_path / "opt")
    a, b = opt.state_dict(), opt2.state_dict()
    assert b["param_groups"][0]["lr"] == 1e-3 and b["param_groups"][0]["betas"] == (0.0, 0.9)
    for pid in a["state"]:
        for k in a["state"][pid]:
            torch.testing.assert_close(b["state"][pid][k], a["state"][pid][k])
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_rng_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    ckpt.rng_state_to_files(tmp_path / "rng", {"train": gen})
    expect = (torch.rand(2), torch.rand(2, generator=gen), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(3), torch.rand(3, generator=gen)
    ckpt.rng_state_from_files(tmp_path / "rng", {"train": gen})
    got = (torch.rand(2), torch.rand(2, generator=gen), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expect[0])
    torch.testing.assert_close(got[1], expect[1])
    assert got[2:] == expect[2:]


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, False)):
        d = root / f"step_{step:06d}"
        d.mkdir(parents=True)
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (root / ".tmp_step_000015").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step_000005"
    tmp = root / ".tmp_step_000020"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")
    ckpt.finalize(tmp, root / "step_000020", keep=1)
    assert [d.name for d in ckpt.checkpoint_dirs(root)] == ["step_000020"]


def test_a_pruned_checkpoint_is_never_half_seen(tmp_path, monkeypatch):
    """Pruning renames a checkpoint away before deleting it: a run killed during the deletion leaves a `.trash_*`
    folder (never listed as a checkpoint, for a resume or `export --average`), which the next save removes."""
    import shutil

    root = tmp_path / "checkpoints"

    def save(step):
        tmp = root / f".tmp_step_{step:06d}"
        (tmp / "student").mkdir(parents=True)
        (tmp / "trainer_state.json").write_text("{}")
        ckpt.finalize(tmp, root / f"step_{step:06d}", keep=1)

    save(1)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # killed before the deletion did anything
    save(2)
    assert [d.name for d in ckpt.checkpoint_dirs(root)] == ["step_000002"]
    assert (root / ".trash_step_000001" / "trainer_state.json").is_file()
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    save(3)
    assert sorted(p.name for p in root.iterdir()) == ["step_000003"]


def test_model_card_says_how_each_stage_trained():
    from npedit.pipeline import training_summary

    assert "paired SFT" in training_summary("sft") and "no before/after pairs" not in training_summary("sft")
    assert "no before/after pairs" in training_summary("npedit", "runs/sft/pipeline")
    assert "`runs/sft/pipeline`" in training_summary("npedit", "runs/sft/pipeline")
    assert "started from" not in training_summary("warmup")


def test_model_card_names_the_signals_an_npedit_run_used():
    from npedit.config import LossConfig
    from npedit.pipeline import training_summary

    full = training_summary("npedit", None, LossConfig(), "cases.jsonl")
    assert "no before/after pairs" in full and "judge" in full
    unroll = training_summary("npedit", "editor", LossConfig(lambda_target=1, lambda_vlm=0, lambda_dmd=0), "shapes")
    assert "no before/after pairs" not in unroll and "uses before/after pairs" in unroll
    assert "no judge and no DMD" in unroll and "`editor`" in unroll
    pixels = training_summary("npedit", "editor", LossConfig(lambda_target_pixels=1, lambda_vlm=0), "shapes")
    assert "no before/after pairs" not in pixels and "uses before/after pairs" in pixels
    own = training_summary("npedit", None, LossConfig(lambda_target=0.5), "verdicts.jsonl")
    assert "uses before/after pairs" not in own and "judge" in own and "distribution matching" in own
    dmd_only = training_summary("npedit", None, LossConfig(lambda_vlm=0), "shapes")
    assert "distribution matching" in dmd_only and "judge" not in dmd_only and "only" in dmd_only


def _published(root, step):
    """A complete checkpoint folder at `step` (trainer state + a small safetensors file), as `finalize` leaves it."""
    from safetensors.torch import save_file

    d = root / f"step_{step:06d}"
    (d / "student").mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    save_file({"w": torch.ones(64)}, str(d / "student/diffusion_pytorch_model.safetensors"))
    return d


def test_a_damaged_checkpoint_is_named_and_the_newest_readable_one_found(tmp_path):
    """A published checkpoint whose files were cut short afterwards (a crash before the disk had them, a copy cut off)
    is named with the file that does not read back; the newest one that reads back is the one to resume from."""
    root = tmp_path / "checkpoints"
    five, ten = _published(root, 5), _published(root, 10)
    weights = ten / "student/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    assert ckpt.damage(five) is None
    assert "student/diffusion_pytorch_model.safetensors" in ckpt.damage(ten)
    assert ckpt.latest_readable(root) == (five, [f"step_000010 is damaged ({ckpt.damage(ten)})"])
    (five / "trainer_state.json").write_text("")
    assert "trainer_state.json is empty" in ckpt.damage(five) and ckpt.latest_readable(root)[0] is None


def test_a_checkpoint_missing_a_file_or_its_state_is_named_and_passed_over(tmp_path):
    """A checkpoint copied without one of its files (optimizer_student.safetensors, rng_0.safetensors) failed the
    resume with "No such file or directory" and no fallback, and the workbench called it resumable; one without its
    trainer_state.json (the last file an interrupted copy writes) was passed over unnamed."""
    import shutil

    from safetensors.torch import save_file

    root = tmp_path / "checkpoints"
    five, ten = _published(root, 5), _published(root, 10)
    for d in (five, ten):  # as the trainer saves them since: trainer_state.json lists the folder's files
        save_file({"x": torch.zeros(2)}, str(d / "optimizer_student.safetensors"))
        (d / "optimizer_student.json").write_text("{}")
        (d / "trainer_state.json").write_text(json.dumps({"step": ckpt.checkpoint_step(d),
                                                          "files": ckpt.saved_files(d)}))
    assert ckpt.damage(ten) is None and "student/diffusion_pytorch_model.safetensors" in ckpt.saved_files(ten)
    (ten / "optimizer_student.safetensors").unlink()
    assert ckpt.damage(ten) == "optimizer_student.safetensors is missing"
    assert ckpt.latest_readable(root) == (five, ["step_000010 is damaged (optimizer_student.safetensors is missing)"])
    assert ckpt.damage(ten, use="export") is None  # an export reads the weights only (a copy of just those exports)
    # a checkpoint saved before the list: a half-present optimizer pair (for a resume), a network folder without weights
    (five / "trainer_state.json").write_text(json.dumps({"step": 5}))
    (five / "optimizer_student.safetensors").unlink()
    assert ckpt.damage(five) == "optimizer_student.safetensors is missing" and ckpt.damage(five, use="export") is None
    (five / "optimizer_student.json").unlink()
    (five / "rng_0.json").write_text("{}")  # (a resume goes on without the RNG state it lacks)
    assert ckpt.damage(five) is None
    (five / "student/diffusion_pytorch_model.safetensors").unlink()
    assert ckpt.damage(five) == ckpt.damage(five, use="export") == "student/ weights (.safetensors) is missing"
    # the newest folder without its trainer_state.json is named, not silently passed over
    shutil.rmtree(ten)
    _published(root, 7)
    incomplete = _published(root, 12)
    (incomplete / "trainer_state.json").unlink()
    good, passed = ckpt.latest_readable(root)
    assert good.name == "step_000007" and passed[0].startswith("step_000012 is incomplete (no trainer_state.json")


def test_pruning_never_removes_the_checkpoint_just_written_nor_reads_stale_saves(tmp_path):
    """A resume that passed over a damaged step_20 saves step 15 next: with keep=1 the new checkpoint stays (only
    older ones are pruned). A save killed halfway left `.tmp_step_*` (a whole checkpoint's size): the next save
    removes it."""
    root = tmp_path / "checkpoints"
    _published(root, 10)
    _published(root, 20)
    (root / ".tmp_step_000012" / "student").mkdir(parents=True)  # killed while writing step 12
    tmp = root / ".tmp_step_000015"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")
    ckpt.finalize(tmp, root / "step_000015", keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_000015", "step_000020"]
    for step in (25, 30, 35):
        tmp = root / f".tmp_step_{step:06d}"
        tmp.mkdir()
        (tmp / "trainer_state.json").write_text("{}")
        ckpt.finalize(tmp, root / f"step_{step:06d}", keep=3)
    assert [d.name for d in ckpt.checkpoint_dirs(root)] == ["step_000025", "step_000030", "step_000035"]


def test_an_export_is_published_whole_or_not_at_all(tmp_path):
    """A folder written through `publishing` replaces the old one only once complete: a failure midway leaves the
    previous folder as it was and no temporary folder; leftovers of a killed export are cleared first."""
    from npedit.training.checkpoint import publishing

    final = tmp_path / "pipeline"
    with publishing(final) as folder:
        (folder).mkdir()
        (folder / "model_index.json").write_text("old")
    assert (final / "model_index.json").read_text() == "old"
    with pytest.raises(OSError, match="disk full"):
        with publishing(final) as folder:
            folder.mkdir()
            (folder / "model_index.json").write_text("half")
            raise OSError("disk full")
    assert (final / "model_index.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "pipeline"]
    (tmp_path / ".tmp_pipeline").mkdir()  # what a killed export left
    (tmp_path / ".tmp_pipeline" / "stale.safetensors").write_text("x")
    with publishing(final) as folder:
        folder.mkdir()
        (folder / "model_index.json").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["model_index.json"]
    assert (final / "model_index.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "pipeline"]


def test_a_published_folder_is_flushed_to_the_disk_before_it_takes_its_place(tmp_path, monkeypatch):
    """Every file of a checkpoint or export is fsync'ed before the rename that publishes it, and the parent folder
    after it: a power cut then cannot leave a complete-looking folder of empty files."""
    import os

    from npedit.training import checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                           real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    final = tmp_path.resolve() / "checkpoints" / "step_000002"  # as /proc names an open file
    tmp = final.with_name(".tmp_step_000002")
    (tmp / "student").mkdir(parents=True)
    for name in ("trainer_state.json", "student/model.safetensors"):
        (tmp / name).write_text("x")
    checkpoint.finalize(tmp, final, keep=2)
    published = events.index(("replace", str(final)))
    flushed = {path for kind, path in events[:published] if kind == "fsync"}
    assert {str(tmp / "trainer_state.json"), str(tmp / "student/model.safetensors"), str(tmp)} <= flushed
    assert ("fsync", str(final.parent)) in events[published:]


def test_a_resume_rewinds_metrics_whole_or_not_at_all(tmp_path, full_disk):
    """The rewind of metrics.jsonl to the resumed checkpoint rewrites the file: a disk that fills up (or a kill)
    midway leaves every row, not the file cut at that point; a last row cut just before its newline is closed, so the
    next step's row does not join it."""
    from npedit.training.logging import MetricsLogger

    log = MetricsLogger(tmp_path)
    if log.tb is not None:  # (TensorBoard's own files are not the point here)
        log.tb.close()
        log.tb = None
    for step in range(1, 7):
        log.log(step, {"loss": float(step)})
    before = log.path.read_text()
    with pytest.raises(OSError), full_disk(len(before) // 2):
        log.rewind(4)  # keeps 4 of 6 rows: more than the disk has room for
    assert log.path.read_text() == before
    assert not list(tmp_path.glob(".*"))  # no temporary file left holding the space
    log.rewind(4)
    with log.path.open("a") as f:
        f.write('{"step": 5, "time": 0, "loss": 5.0}')  # step 5 written up to its newline when the run stopped
    log.rewind(5)
    log.log(6, {"loss": 6.0})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_folder_saved_again_is_in_place_before_the_old_one_is_deleted(tmp_path, monkeypatch):
    """An editor exported again (or a damaged checkpoint saved again) replaces a folder whose deletion can take minutes
    for a large model: a run killed meanwhile must leave the new folder in place, not neither of them."""
    import shutil
    from pathlib import Path

    final, real_rmtree = tmp_path / "pipeline", shutil.rmtree
    with ckpt.publishing(final) as folder:
        folder.mkdir()
        (folder / "model_index.json").write_text("old")

    def killed_while_deleting_the_old_one(path, *args, **kwargs):
        if Path(path).name.startswith(".trash_") and Path(path).exists():
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting_the_old_one)
    with pytest.raises(KeyboardInterrupt):
        with ckpt.publishing(final) as folder:
            folder.mkdir()
            (folder / "model_index.json").write_text("new")
    assert (final / "model_index.json").read_text() == "new"
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    with ckpt.publishing(final) as folder:  # the next export clears what the killed one left
        folder.mkdir()
        (folder / "model_index.json").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_a_write_that_fails_on_the_disk_stops_with_one_line_saying_what_is_kept(tmp_path):
    """`writing` (a checkpoint) and `disk_writes` (anything else a run writes) share one rule: an OSError or
    safetensors' "I/O error" inside becomes a one-line WriteError naming what was not written, the error and what is
    kept (a checkpoint's partial folder removed first: it holds the space a retry needs); another error passes
    unchanged, the partial folder left; a WriteError from inside passes as it is (no "could not write" twice)."""
    from safetensors import SafetensorError

    root = tmp_path / "checkpoints"
    (root / "step_000002").mkdir(parents=True)
    (root / "step_000002" / "trainer_state.json").write_text("{}")
    tmp = root / ".tmp_step_000003"
    full = "I/O error: No space left on device (os error 28)"
    kept = ("the newest complete checkpoint, step_000002, is untouched: free space (or make the folder writable), "
            "then resume the run (--resume)")
    for error in (OSError(full), SafetensorError(full)):
        tmp.mkdir()
        with pytest.raises(ckpt.WriteError) as got, ckpt.writing(tmp):
            raise error
        assert str(got.value) == f"could not write checkpoint step_000003 in {root} ({full}); {kept}"
        assert not tmp.exists()
        with pytest.raises(ckpt.WriteError) as got, ckpt.disk_writes(tmp_path / "report.json", "the run is kept"):
            raise error
        assert str(got.value) == f"could not write {tmp_path / 'report.json'} ({full}); the run is kept"
    tmp.mkdir()
    for error in (ValueError("not the disk"), SafetensorError("invalid header")):
        for around in (ckpt.writing(tmp), ckpt.disk_writes("a grid", "kept")):
            with pytest.raises(type(error)) as got, around:
                raise error
            assert got.value is error and tmp.is_dir()
    inner = ckpt.WriteError("could not write config.yaml (No space left on device); nothing was trained yet")
    for around in (ckpt.writing(tmp), ckpt.disk_writes("a grid", "kept")):
        with pytest.raises(ckpt.WriteError) as got, around:
            raise inner
        assert got.value is inner
    assert not tmp.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_published_weights_are_readable_as_the_umask_lets_others_read(tmp_path):
    """safetensors (0.8) writes weights owner-only (0o600): an editor exported or trained on a shared machine could not
    be read by an app or a colleague running as another user. A published folder's owner-only files get the mode the
    umask gives new files (0o644 under 022); under umask 077 they stay 0o600; other modes are left alone."""
    from safetensors.torch import save_file

    from npedit.training.checkpoint import publishing

    old = os.umask(0o022)
    try:
        with publishing(tmp_path / "editor") as folder:
            (folder / "transformer").mkdir(parents=True)
            save_file({"w": torch.zeros(2)}, str(folder / "transformer" / "model.safetensors"))
            (folder / "run.sh").write_text("#!/bin/sh\n")
            (folder / "run.sh").chmod(0o750)
        assert (tmp_path / "editor" / "transformer" / "model.safetensors").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "editor" / "run.sh").stat().st_mode & 0o777 == 0o750
        assert not list(tmp_path.rglob(".mode_probe*"))
        os.umask(0o077)
        with publishing(tmp_path / "private") as folder:
            folder.mkdir()
            save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        assert (tmp_path / "private" / "model.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
