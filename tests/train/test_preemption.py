"""Preemption: SIGTERM / SIGINT sent to a real `mtnlg train` process finish the
step, write a checkpoint, say where the run resumes and exit 75; a second
signal aborts at once.  The resumed run continues on the uninterrupted curve."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainhelpers import read_metrics, tiny_overrides, train
from mtnlg.train import signals as sig_mod
from mtnlg.train.signals import EXIT_PREEMPTED, StopRequest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
LONG = {"train.steps": 2000, "train.save_interval": 1000, "train.eval_interval": 0, "train.threads": 1}


def start(cmd, run_dir):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def wait_for_steps(proc, run_dir, n, timeout=120):
    path, deadline = Path(run_dir) / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("trainer made no progress")


def train_cmd(run_dir, overrides, torchrun=0):
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
            if torchrun else [sys.executable])
    cmd = head + ["-m", "mtnlg", "train", "--config", "configs/tiny.toml", "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def curve(run_dir):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resumes_on_the_same_curve(tmp_path, sotu_small, signum):
    run_dir = tmp_path / "run"
    over = tiny_overrides(sotu_small, **LONG)
    proc = start(train_cmd(run_dir, over), run_dir)
    wait_for_steps(proc, run_dir, 3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    assert f"{name} received: finishing the current step" in err
    step = int(out.split(f"stopped by {name} after step ")[1].split()[0])
    assert step >= 3 and f"resume from step {step} with: mtnlg train --run {run_dir}" in out
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, step + 1))
    if signum == signal.SIGINT:
        return  # the resume check below is the same for both signals
    # resume for two more steps; an uninterrupted run (same schedule length) gives the same numbers
    assert train(run_dir, [f"train.steps={step + 2}"], config=None) == 0
    train(tmp_path / "full", over, stop_after=step + 2)
    assert curve(run_dir) == curve(tmp_path / "full")


def test_duplicate_signal_is_one_request_and_a_later_one_aborts(monkeypatch, capfd):
    class Aborted(Exception):
        pass

    def fake_exit(code):
        raise Aborted(code)
    monkeypatch.setattr(sig_mod.os, "_exit", fake_exit)
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(rank=0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the terminal's Ctrl-C: the same request
        assert stop.signum == signal.SIGTERM and not stop.poll(__import__("torch").device("cpu")).save
        time.sleep(sig_mod.DUPLICATE_WINDOW_S + 0.05)
        with pytest.raises(Aborted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.args == (128 + signal.SIGINT,)
        stop.abort_on_next_signal()  # from here on the default action: dies even inside a blocking call
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    err = capfd.readouterr().err
    assert "SIGTERM received" in err and "second SIGINT: aborting now" in err


def _worker_pid(parent: int, rank: int, timeout=60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "status").read_text().split("PPid:")[1].split()[0])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} worker under {parent}")


@pytest.mark.slow  # ~30 s on 2 shared cores
def test_torchrun_ranks_agree_on_the_stop_step(tmp_path, sotu_small):
    """Only rank 1 of a dp=2 torchrun job gets SIGTERM: rank 0 learns of it through the per-step
    all-reduce, both stop after the same step and write one checkpoint together, which resumes."""
    run_dir = tmp_path / "run"
    over = tiny_overrides(sotu_small, **LONG)
    proc = start(train_cmd(run_dir, over, torchrun=2), run_dir)
    try:
        worker = _worker_pid(proc.pid, 1)
        wait_for_steps(proc, run_dir, 3)
        os.kill(worker, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by SIGTERM after step " in out, out[-2000:] + err[-3000:]
    step = int(out.split("stopped by SIGTERM after step ")[1].split()[0])
    assert "resume from step" in out and "torchrun --nproc-per-node 2 -m mtnlg train --run-dir" in out
    assert "exitcode  : 75" in err or "exit code 75" in out  # each worker exits 75
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, step + 1))
    # the checkpoint holds full tensors: it resumes in one process, on the one-process curve
    assert train(run_dir, [f"train.steps={step + 2}"], config=None) == 0
    train(tmp_path / "single", over, stop_after=step + 2)
    for a, b in zip(curve(run_dir), curve(tmp_path / "single"), strict=True):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-4)


def test_restart_without_checkpoint_starts_metrics_afresh(tmp_path, sotu_small):
    run_dir = tmp_path / "run"
    over = tiny_overrides(sotu_small)
    train(run_dir, over, stop_after=3)
    import shutil
    shutil.rmtree(run_dir / "checkpoints")  # the attempt was killed before its first checkpoint
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0')  # and its last line was torn
    assert train(run_dir, [], config=None, stop_after=2) == 0  # "new run" in the existing directory
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_metrics_keep_one_line_per_step_up_to_the_resumed_step(tmp_path):
    from mtnlg.train.metrics import MetricsLogger
    lines = [{"step": s, "loss": float(i)} for i, s in enumerate([2, 4, 6, 2, 4, 6, 8])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 10, "lo')
    MetricsLogger(tmp_path, 100, start_step=4, progress_bar="never").close()
    assert read_metrics(tmp_path) == [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 4.0}]  # newest copy wins
    MetricsLogger(tmp_path, 100, start_step=0, progress_bar="never").close()
    assert read_metrics(tmp_path) == []


@pytest.mark.parametrize("minutes, saved_at", [(0.0, [4]), (1e-9, [1, 2, 3, 4])])
def test_time_based_checkpoints(tmp_path, sotu_small, monkeypatch, minutes, saved_at):
    from mtnlg.train.trainer import Trainer
    steps, real_save = [], Trainer.save

    def save(self):
        steps.append(self.step)
        return real_save(self)
    monkeypatch.setattr(Trainer, "save", save)
    train(tmp_path / "r", tiny_overrides(sotu_small, **{"train.steps": 4, "train.save_interval": 100,
                                                        "train.save_interval_minutes": minutes}))
    assert steps == saved_at
