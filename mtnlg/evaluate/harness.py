"""Run zero-/few-shot tasks on a causal LM and compute the field's metrics.

``evaluate(lm, tasks, ...)`` is the library entry point (tests call it);
``mtnlg eval --tasks`` (mtnlg/evaluate/cli.py) loads a model and calls it.
Under data parallelism each dp rank scores the examples ``i`` with
``i % dp_size == dp_rank`` and the per-example results are gathered, so the
metrics equal those of one process.

Metrics (as lm-evaluation-harness computes them):
* ``acc``: LAMBADA, every target token is the greedy choice; multiple choice,
  the option with the highest summed log-likelihood is the gold one (ties go
  to the first option);
* ``acc_norm``: the same with each log-likelihood divided by the option's
  length in characters;
* ``perplexity`` (LAMBADA): exp(-mean per-passage target log-likelihood);
* standard errors: sample standard deviation / sqrt(n) for means, the delta
  method (perplexity x stderr of the mean log-likelihood) for perplexity.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Sequence

import numpy as np

from mtnlg.evaluate.scoring import CausalLM, ScoreStats, score_text_pairs
from mtnlg.evaluate.tasks import FEWSHOT_SEED, TaskSpec, load_docs, with_fewshot


def task_items(spec: TaskSpec, limit: int = 0) -> int:
    n = len(load_docs(spec.name))
    return min(n, limit) if limit else n


def score_items(lm: CausalLM, spec: TaskSpec, items: Sequence[int], shots: int, batch_size: int,
                seed: int = FEWSHOT_SEED, stats: ScoreStats | None = None) -> list[dict]:
    """Per-example results: log-likelihood and greedy flag of every option."""
    docs = load_docs(spec.name)
    built = [with_fewshot(docs, i, shots, seed) for i in items]
    pairs = [doc.pair(o) for doc in built for o in range(doc.n_options)]
    scores = iter(score_text_pairs(lm, pairs, batch_size, stats))
    out = []
    for i, doc in zip(items, built):
        opts = [next(scores) for _ in range(doc.n_options)]
        out.append({"item": i, "gold": doc.gold, "ll": [s for s, _ in opts], "greedy": [g for _, g in opts],
                    "chars": list(doc.choice_chars)})
    return out


def _mean_stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def task_metrics(spec: TaskSpec, results: list[dict]) -> tuple[dict, dict]:
    """(metrics, stderr) from per-example results."""
    if spec.kind == "cloze":
        ll = np.array([r["ll"][0] for r in results])
        acc = np.array([float(r["greedy"][0]) for r in results])
        ppl = math.exp(-ll.mean())
        return ({"acc": float(acc.mean()), "perplexity": ppl},
                {"acc": _mean_stderr(acc), "perplexity": ppl * _mean_stderr(ll)})
    metrics, stderr = {}, {}
    for name in spec.metrics:
        hits = []
        for r in results:
            ll = np.array(r["ll"])
            if name == "acc_norm":
                ll = ll / np.array(r["chars"], dtype=np.float64)
            hits.append(float(int(np.argmax(ll)) == r["gold"]))
        arr = np.array(hits)
        metrics[name], stderr[name] = float(arr.mean()), _mean_stderr(arr)
    return metrics, stderr


def evaluate(lm: CausalLM, specs: list[TaskSpec], shots: int = 0, limit: int = 0, batch_size: int = 16,
             seed: int = FEWSHOT_SEED, dp_rank: int = 0, dp_size: int = 1, dp_group=None,
             log=None, keep_samples: bool = False) -> dict:
    """Score every task; every rank returns the same report (dict)."""
    report: dict = {"shots": shots, "limit": limit or None, "fewshot_seed": seed, "max_length": lm.max_length,
                    "dp": dp_size, "tasks": {}}
    for spec in specs:
        t0 = time.perf_counter()
        n = task_items(spec, limit)
        stats = ScoreStats()
        mine = score_items(lm, spec, range(dp_rank, n, dp_size), shots, batch_size, seed, stats)
        mine_stats = [stats.requests, stats.truncated, stats.continuation_cut]
        if dp_size > 1:
            import torch.distributed as dist
            gathered: list = [None] * dp_size
            dist.all_gather_object(gathered, (mine, mine_stats), group=dp_group)
            results = sorted((r for part, _ in gathered for r in part), key=lambda r: r["item"])
            counts = np.sum([s for _, s in gathered], axis=0).tolist()
        else:
            results, counts = mine, mine_stats
        metrics, stderr = task_metrics(spec, results)
        stderr = {k: None if math.isnan(v) else v for k, v in stderr.items()}  # one example: undefined (JSON null)
        entry = {"metrics": metrics, "stderr": stderr, "samples": len(results), "shots": shots,
                 "split": spec.split, "requests": counts[0], "truncated": counts[1],
                 "continuation_truncated": counts[2], "seconds": round(time.perf_counter() - t0, 2)}
        if keep_samples:
            entry["per_example"] = results
        report["tasks"][spec.name] = entry
        if log:
            log(f"{spec.name}: {len(results)} examples, {counts[0]} requests in {entry['seconds']:.1f}s")
    return report


def format_table(report: dict) -> str:
    """Terminal table: one row per task and metric."""
    lines = [f"{'task':<15}{'shots':>6}{'n':>7}  {'metric':<11}{'value':>10}{'± stderr':>11}{'truncated':>11}"]
    lines.append("-" * len(lines[0]))
    for name, t in report["tasks"].items():
        for j, (metric, value) in enumerate(t["metrics"].items()):
            se = t["stderr"][metric]
            head = f"{name:<15}{t['shots']:>6}{t['samples']:>7}" if j == 0 else " " * 28
            trunc = f"{t['truncated']:>11}" if j == 0 else ""
            shown, se_s = _fmt(value, metric, 10), f"{'-':>11}" if se is None else _fmt(se, metric, 11)
            lines.append(f"{head}  {metric:<11}{shown}{se_s}{trunc}")
    return "\n".join(lines)


def _fmt(x: float, metric: str, width: int) -> str:
    if metric != "perplexity":
        return f"{x:{width}.4f}"
    return f"{x:{width}.2f}" if abs(x) < 1e6 else f"{x:{width}.3e}"


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
