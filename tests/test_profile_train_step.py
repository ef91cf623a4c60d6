"""scripts/profile_train_step.py: its exclusive part timer, and one profiled NP-Edit update on the bundled models."""

import types

from script_modules import load_script  # tests/script_modules.py


def test_part_timer_counts_each_part_without_the_parts_it_calls(monkeypatch):
    """A part's time leaves out the time of the parts it calls, so the parts add up to the wall time. (On a clock that
    the work moves, not the machine's: a loaded CI box stretches sleeps past any bound.)"""
    script = load_script("profile_train_step")
    now = [0.0]
    monkeypatch.setattr(script, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    timer = script.PartTimer()

    class Work:
        def inner(self):
            now[0] += 0.5

        def outer(self):
            now[0] += 0.25
            self.inner()
            now[0] += 0.125

    work = Work()
    timer.wrap(work, "inner", "inner")
    timer.wrap(work, "outer", "outer")
    work.outer()
    work.inner()
    assert timer.seconds == {"inner": 1.0, "outer": 0.375} and not timer.stack
    assert sum(timer.seconds.values()) == now[0]


def test_one_npedit_update_on_the_bundled_models_is_split_into_its_parts(capsys):
    """The script follows the trainer's API: each part it wraps is reached by one NP-Edit update of
    configs/shapes/npedit.yaml (critic updates, unroll, DMD, judge), and the parts add up to the update's time."""
    script = load_script("profile_train_step")
    row = script.profile_stage("npedit", updates=1, skip=0, cprofile=0)
    parts = row["parts_ms"]
    assert {"backward", "student unroll (forward)", "DMD: teacher (CFG) + critic, no grad",
            "judge forward (vision + language)", "VAE decode for the judge", "judge prompts (processor, tokenizer)",
            "data: draw + render a micro-batch", "optimizer step"} <= set(parts)
    assert all(ms > 0 for name, ms in parts.items() if not name.startswith("other"))
    assert abs(sum(parts.values()) - row["median_s"] * 1000) < 1e-6 * max(1.0, row["median_s"] * 1000)
    assert "npedit: batch 16 x 1, critic_steps 2" in capsys.readouterr().out
