"""Helpers shared by trainer and CLI tests."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def tiny_overrides(prefix: str, **extra) -> list[str]:
    base = {
        "model.n_layers": 2, "model.hidden": 64, "model.n_heads": 4, "model.seq_len": 32,
        "model.vocab_size": 512, "model.make_vocab_divisible_by": 64,
        "data.blend": f'[[1.0, "{prefix}"]]', "data.split": "[0.9, 0.05, 0.05]",
        "data.tokenizer": f'"{prefix}.tokenizer.json"',
        "train.steps": 6, "train.global_batch": 8, "train.micro_batch": 4, "train.eval_interval": 3,
        "train.eval_batches": 2, "train.save_interval": 3, "train.precision": "fp32",
        "optim.warmup_steps": 2, "optim.lr": 1e-3, "optim.min_lr": 1e-4,
        "logging.log_interval": 1, "logging.peak_tflops": 1.0, "logging.progress_bar": "never",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train(run_dir, overrides, stop_after=None, config="configs/tiny.toml"):
    """`mtnlg train` in-process (same code path as the console command)."""
    from mtnlg.train.run import add_arguments, run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--run", str(run_dir)] + (["--config", config] if config else [])
    for o in overrides:
        argv += ["--set", o]
    if stop_after:
        argv += ["--stop-after", str(stop_after)]
    return run(parser.parse_args(argv))


def losses(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss"), r["lr"], r["grad_norm"]) for r in read_metrics(run_dir)]
