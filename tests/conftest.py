"""Shared fixtures: a small real dataset (a slice of the shipped State of the
Union corpus, tokenized with a freshly trained BPE) and tiny configs."""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOTU = ROOT / "data" / "sotu" / "sotu.jsonl.gz"


def run_preprocess(argv: list[str]) -> int:
    from mtnlg.data.preprocess import add_arguments, run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


@pytest.fixture(scope="session")
def sotu_small(tmp_path_factory) -> str:
    """PREFIX of an indexed dataset of 40 speeches with a 512-token BPE."""
    d = tmp_path_factory.mktemp("sotu")
    src = d / "slice.jsonl"
    with gzip.open(SOTU, "rt") as f, open(src, "w") as out:
        for line in itertools.islice(f, 150, 190):
            out.write(line)
    prefix = str(d / "sotu")
    assert run_preprocess(["--input", str(src), "--output", prefix, "--train-tokenizer",
                           "--vocab-size", "512", "--dedup", "exact", "--quiet"]) == 0
    return prefix


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
