"""Figures the trainer prints: a stable MFU peak (best measurement, cached per
machine) shown next to MFU, the fp16-on-CPU warning, and the end-of-training summary."""
import json
from pathlib import Path

import torch

from trainhelpers import tiny_overrides, train
from mtnlg.train import metrics
from mtnlg.train.summary import end_of_training


def test_cpu_peak_is_the_best_measurement_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readings = iter([0.10, 0.30, 0.20, 0.25, 0.15,   # first run: 5 rounds, best 0.30
                     0.12, 0.18,                     # a busy moment later: the cache still says 0.30
                     0.40, 0.35])                    # a better reading raises it
    monkeypatch.setattr(metrics, "measure_matmul_tflops", lambda *a, **k: next(readings))
    cpu = torch.device("cpu")
    peak, source = metrics.peak_tflops(cpu, "bf16")
    assert peak == 0.30 and "cached in" in source and "bfloat16" in source
    cache = json.loads((tmp_path / "mtnlg/peak_tflops.json").read_text())
    assert list(cache.values()) == [0.30] and "threads" in next(iter(cache))
    assert metrics.peak_tflops(cpu, "bf16")[0] == 0.30
    assert metrics.peak_tflops(cpu, "bf16")[0] == 0.40
    assert metrics.peak_tflops(cpu, "bf16", configured=2.5) == (2.5, "logging.peak_tflops")


def test_mfu_is_shown_with_its_peak_and_fp16_on_cpu_warns():
    line = metrics.format_record({"step": 3, "loss": 2.0, "tflops": 0.1, "mfu": 0.5, "peak_tflops": 0.2})
    assert "mfu 50.0% of 0.2" in line
    assert "50x slower" in metrics.precision_warning(torch.device("cpu"), "fp16")
    assert metrics.precision_warning(torch.device("cpu"), "bf16") is None


def test_training_ends_with_a_summary(tmp_path, sotu_small, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, tiny_overrides(sotu_small, **{"train.steps": 4}), stop_after=2) == 0
    out = capsys.readouterr().out
    assert "% of 1\n" in out  # the peak next to MFU (tiny_overrides sets 1.0)
    assert f"paused after step 2 (--stop-after) | step 2/4 | train loss" in out
    assert f"checkpoint {run_dir}/checkpoints/step_00000002" in out
    assert f"resume from step 2 with: mtnlg train --run {run_dir}" in out
    assert train(run_dir, [], config=None) == 0
    out = capsys.readouterr().out
    assert "mtnlg train: finished | step 4/4 | train loss" in out and "val loss" in out
    assert f"to train longer: mtnlg train --run {run_dir} --set train.steps=8" in out


def test_summary_of_a_preempted_multi_process_run(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    lines, code = end_of_training([{"step": 7, "loss": 3.5}], 7, 100, Path("runs/x y"),
                                  Path("runs/x y/checkpoints/step_00000007"), "SIGTERM", 8, 90.0)
    assert code == 75
    assert lines[0].startswith("mtnlg train: stopped by SIGTERM after step 7 | step 7/100 | train loss 3.5000")
    assert "resume from step 7 with: torchrun --nproc-per-node 4 -m mtnlg train --run-dir 'runs/x y'" in lines[2]


def test_mfu_above_100_percent_warns_once(tmp_path, capsys):
    logger = metrics.MetricsLogger(tmp_path, 10, 0, progress_bar="never")
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0, "tflops": 0.3, "mfu": 1.5, "peak_tflops": 0.2})
    err = capsys.readouterr().err
    assert err.count("MFU above 100%") == 1 and "logging.peak_tflops" in err
