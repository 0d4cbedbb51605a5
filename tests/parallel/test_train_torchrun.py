"""End to end: `torchrun ... -m mtnlg train` with tensor and data parallelism
produces the single-process loss curve, and a dp=2 run resumes as tp=2."""
import os
import subprocess
import sys

import pytest

from trainhelpers import read_metrics, tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def launch(nproc, run_dir, overrides, config="configs/tiny.toml"):
    cmd = ([sys.executable, "-m", "mtnlg"] if nproc == 1 else TORCHRUN + [f"--nproc-per-node={nproc}", "-m", "mtnlg"])
    cmd += ["train", "--run-dir", str(run_dir)] + (["--config", config] if config else [])
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def curve(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss"), r["grad_norm"]) for r in read_metrics(run_dir)]


def assert_same_curve(a, b, rel=1e-4):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (step, *xs), (_, *ys) in zip(a, b):
        for x, y in zip(xs, ys):
            if x is None:
                assert y is None
            else:
                assert y == pytest.approx(x, rel=rel), (step, a, b)


def test_tp_and_dp_training_match_one_process(tmp_path, sotu_small):
    over = tiny_overrides(sotu_small, **{"train.steps": 4, "train.eval_interval": 2, "train.save_interval": 2})
    launch(1, tmp_path / "single", over + ["train.threads=1"])
    launch(2, tmp_path / "tp2", over + ["parallel.tp=2"])
    launch(2, tmp_path / "dp2", over)
    single = curve(tmp_path / "single")
    assert_same_curve(single, curve(tmp_path / "tp2"))
    assert_same_curve(single, curve(tmp_path / "dp2"))
    # resume the dp=2 run as tp=2 (checkpoints hold full tensors) and extend it
    out = launch(2, tmp_path / "dp2", ["train.steps=6", "parallel.tp=2"], config=None)
    assert "resumed at step 4" in out.stdout
    launch(1, tmp_path / "single", ["train.steps=6"], config=None)
    assert_same_curve(curve(tmp_path / "single"), curve(tmp_path / "dp2"))


def test_invalid_layout_fails_before_work(tmp_path, sotu_small):
    cmd = TORCHRUN + ["--nproc-per-node=2", "-m", "mtnlg", "train", "--run-dir", str(tmp_path / "r"),
                      "--config", "configs/tiny.toml"]
    for o in tiny_overrides(sotu_small, **{"parallel.tp": 4}):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "mtnlg train: error: world size 2 is not divisible by tp*pp = 4*1 = 4" in proc.stdout + proc.stderr
    assert not (tmp_path / "r").exists()


def test_pipeline_training_matches_one_process_and_resumes_in_another_layout(tmp_path, sotu_small):
    """pp=2 x tp=2 (4 processes, 1F1B) gives the single-process curve; its checkpoint (gathered
    from both stages) resumes as pp=2 alone and continues on the single-process curve."""
    over = tiny_overrides(sotu_small, **{"train.steps": 4, "train.eval_interval": 2, "train.save_interval": 2,
                                         "model.n_layers": 3})
    launch(1, tmp_path / "single", over + ["train.threads=1"])
    launch(4, tmp_path / "pp", over + ["parallel.pp=2", "parallel.tp=2"])
    assert_same_curve(curve(tmp_path / "single"), curve(tmp_path / "pp"))
    out = launch(2, tmp_path / "pp", ["train.steps=6", "parallel.pp=2", "parallel.tp=1"], config=None)
    assert "resumed at step 4" in out.stdout
    launch(1, tmp_path / "single", ["train.steps=6"], config=None)
    assert_same_curve(curve(tmp_path / "single"), curve(tmp_path / "pp"))
