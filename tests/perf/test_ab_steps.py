"""The paired A/B benchmark's statistics (benchmarks/ab_steps.py) on planted values, and one
real A/B of a switch whose effect is known."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ab_steps  # noqa: E402


def test_median_interval_from_order_statistics():
    # n = 16: P(Bin(16, 1/2) <= 3) = 697/65536 = 0.0106 <= 0.025 < P(<= 4) = 0.0384, so the
    # 4th smallest and the 4th largest of the ratios bound the median
    assert ab_steps.median_interval([float(i) for i in range(16, 0, -1)]) == (4.0, 13.0)
    # n = 5: even the extremes give only 1 - 2/32 = 94 % coverage: the full range
    assert ab_steps.median_interval([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.0, 5.0)


def test_abba_order():
    assert ab_steps.order(3) == [False, True, True, False, False, True]


def test_switch_errors_name_the_problem():
    with pytest.raises(SystemExit, match="module:function"):
        ab_steps.resolve_switch("mtnlg.model.regions")
    with pytest.raises(SystemExit, match="no_such_function"):
        ab_steps.resolve_switch("mtnlg.model.regions:no_such_function")


def test_a_switch_that_sleeps_in_b_shows_as_slower(monkeypatch):
    """A planted effect: B sleeps 0.2 s before every step of a tiny model; the interval must
    lie above 1 and the medians differ by the sleep.  (No A/A test here: a 95 % interval
    excludes 1 in one A/A run of 20 by construction; the README's A/A run shows it.)"""
    import time

    from mtnlg.train.trainer import Trainer
    state = {"b": False}
    step = Trainer.train_step

    def slowed(self):
        if state["b"]:
            time.sleep(0.2)
        return step(self)
    monkeypatch.setattr(Trainer, "train_step", slowed)
    monkeypatch.setitem(ab_steps.CONFIGS, "micro", ["model.n_layers=1", "model.hidden=64", "model.n_heads=2",
                                                    "model.seq_len=32", "model.vocab_size=256",
                                                    "train.micro_batch=2", "train.global_batch=2"])
    r = ab_steps.run("micro", lambda on: state.update(b=on), pairs=8, warmup=1, precision="bf16", sets=[])
    # the step itself is ~10 ms: B's median lies above A's by about the sleep (loosely: a busy
    # machine stretches both, and a loaded one wakes the sleeper late by up to a step or more)
    assert r["lo"] > 1.0 and 0.15 < r["b_s"] - r["a_s"] < 0.2 + max(0.2, 2 * r["a_s"])
