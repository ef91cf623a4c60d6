"""scripts/profile_train_step.py: its exclusive part timer, and one profiled NP-Edit update on the bundled models."""

import time

from script_modules import load_script  # tests/script_modules.py


def test_part_timer_counts_each_part_without_the_parts_it_calls():
    """A part's time leaves out the time of the parts it calls, so the parts add up to no more than the wall time."""
    timer = load_script("profile_train_step").PartTimer()

    class Work:
        def inner(self):
            time.sleep(0.1)

        def outer(self):
            time.sleep(0.01)
            self.inner()

    work = Work()
    timer.wrap(work, "inner", "inner")
    timer.wrap(work, "outer", "outer")
    start = time.perf_counter()
    work.outer()
    wall = time.perf_counter() - start
    assert timer.seconds["inner"] >= 0.1 and 0.01 <= timer.seconds["outer"] < 0.08
    assert sum(timer.seconds.values()) <= wall and not timer.stack


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
