"""Checkpoints written by tp=2 and pp=2 training (torchrun, gloo) export to
the same bytes as a 1-process checkpoint of the same weights.

The 1-process checkpoint is made by the 1-process Trainer itself: it resumes
the parallel run's checkpoint and saves it again, so whatever layout each
writes (full tensors today, per-rank shards with DCP) the export must read
both back to identical files, every file of the directory compared."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from trainhelpers import tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def torchrun_train(run_dir, overrides):
    cmd = TORCHRUN + ["-m", "mtnlg", "train", "--run-dir", str(run_dir), "--config", "configs/tiny.toml"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def resave_in_one_process(src, dst):
    """Copy the run and rewrite its latest checkpoint from a 1-process Trainer."""
    from mtnlg.config import load_config
    from mtnlg.model.gpt import build_model
    from mtnlg.train.trainer import Trainer
    shutil.copytree(src, dst)
    cfg = load_config(dst / "config.toml")
    cfg.parallel.tp = cfg.parallel.pp = 1
    model = build_model(cfg.model, "cpu", seed=0, vocab_size=cfg.model.padded_vocab(1))
    trainer = Trainer(cfg, model, None, None, dst, torch.device("cpu"))
    assert trainer.resume() and trainer.step == 2
    trainer.save()


def same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("layout", ["tp", pytest.param("pp", marks=pytest.mark.slow)])
def test_parallel_checkpoints_export_like_one_process(tmp_path, sotu_small, layout):
    """~25-50 s per layout on the shared 2-core machine: pp=2 runs under `make test-slow`."""
    from mtnlg.convert.hf import export_run
    over = tiny_overrides(sotu_small, **{"train.steps": 2, "train.save_interval": 2, "train.eval_interval": 0,
                                         "model.make_vocab_divisible_by": 100})
    par = tmp_path / layout
    torchrun_train(par, over + [f"parallel.{layout}=2"])
    resave_in_one_process(par, tmp_path / f"{layout}_single")
    export_run(par, tmp_path / f"{layout}_hf")
    s = export_run(tmp_path / f"{layout}_single", tmp_path / f"{layout}_single_hf")
    assert s["padded_vocab"] == 600 and s["vocab"] <= 512  # trimmed
    same_files(tmp_path / f"{layout}_hf", tmp_path / f"{layout}_single_hf")
