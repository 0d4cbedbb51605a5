"""Helpers shared by trainer and CLI tests."""
from __future__ import annotations

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
