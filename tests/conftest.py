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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
