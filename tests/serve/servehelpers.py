"""Shared pieces of the serving tests: a tiny randomly initialised model and a
helper that runs requests through an Engine and collects what they produce."""
from __future__ import annotations

import functools
import gzip
import itertools
import json
import threading
import time
from pathlib import Path

import torch

from mtnlg.config import ModelConfig
from mtnlg.data.tokenizer import train_tokenizer
from mtnlg.model.gpt import build_model
from mtnlg.serve.engine import Engine, EngineConfig, Output, Request, SamplingParams
from mtnlg.serve.runner import ModelRunner

# init_std 0.1 (not 0.02) makes the random model's next-token distributions
# peaked, so greedy comparisons are not decided by float rounding in near ties.
TINY = dict(n_layers=2, hidden=64, n_heads=4, seq_len=96, vocab_size=512, make_vocab_divisible_by=64,
            init_std=0.1)


ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on 40 shipped speeches (~1 s)."""
    with gzip.open(ROOT / "data" / "sotu" / "sotu.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, 150, 190)]
    return train_tokenizer(texts, 512)


def tiny_model(seed: int = 0, **over):
    cfg = ModelConfig(**{**TINY, **over})
    return cfg, build_model(cfg, seed=seed).eval()


def make_engine(model, cfg, **engine_cfg) -> Engine:
    runner = ModelRunner(model, engine_cfg.get("max_batch", 8), cfg.seq_len, torch.device("cpu"))
    return Engine(runner, cfg.seq_len, cfg.vocab_size, EngineConfig(**engine_cfg)).start()


class Collector:
    """A sink per request; ``wait()`` returns {id: (tokens, finish_reason, outputs)}."""

    def __init__(self):
        self.outputs: dict[str, list[Output]] = {}
        self.done: dict[str, threading.Event] = {}

    def request(self, rid: str, prompt: list[int], delay: float = 0.0, **params) -> Request:
        """``delay`` seconds of sleep in the sink slow the engine down (to abort mid-flight)."""
        self.outputs[rid], self.done[rid] = [], threading.Event()

        def sink(out: Output, rid=rid):
            if delay:
                time.sleep(delay)
            self.outputs[rid].append(out)
            if out.finish_reason:
                self.done[rid].set()
        return Request(rid, prompt, SamplingParams(**params), sink)

    def wait(self, timeout: float = 60.0) -> dict:
        for rid, ev in self.done.items():
            assert ev.wait(timeout), f"request {rid} did not finish"
        return {rid: ([t for o in outs for t in o.token_ids], outs[-1].finish_reason, outs)
                for rid, outs in self.outputs.items()}
