"""Paired in-process A/B of a runtime switch: one Trainer, steps alternating A and B.

Fresh-process A/B runs (``train_throughput.py --baseline``) carry this shared 2-core
machine's process-to-process noise (+-5-10 % in tokens/s), more than a 2-3 % change.
Here both settings run in the same process, on the same heap, weights and data, in
ABBA order (A B B A A B B A ...: neither setting always runs right after the other), so
slow periods of the machine hit both alike.  The report is the median over pairs of the
B/A step-time ratio and a 95 % confidence interval for it (the distribution-free
interval of the median from the order statistics of the pair ratios), so a change is
shown only when the interval excludes 1.

The switch is a function of one boolean, given as ``module:function``; it is called
with False before each A step and True before each B step.  A change made switchable
for this (``mtnlg.model.regions:set_enabled`` turns the compiled regions on and off):

    python benchmarks/ab_steps.py --switch mtnlg.model.regions:set_enabled --config 14m --pairs 16

Each step runs the trainer's full step (forward, backward, clipping, AdamW); the
weights move on, so each pair times two consecutive steps of one training run.
"""
from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_throughput import CONFIGS, RandomTokens  # noqa: E402

from mtnlg.config import load_config  # noqa: E402
from mtnlg.model.gpt import build_model  # noqa: E402
from mtnlg.train.precision import param_dtype  # noqa: E402
from mtnlg.train.trainer import Trainer  # noqa: E402


def resolve_switch(spec: str):
    """``module:function`` -> the function; a one-line error for anything else."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise SystemExit(f"--switch wants module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--switch {spec}: {e}") from None


def median_interval(ratios: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics k and n-1-k, with k the
    largest index such that P(Binomial(n, 1/2) <= k) <= (1 - confidence) / 2."""
    r, n = sorted(ratios), len(ratios)
    alpha, k, cdf = (1 - confidence) / 2, -1, 0.0
    for i in range(n):
        cdf += math.comb(n, i) / 2 ** n
        if cdf > alpha:
            break
        k = i
    if k < 0:  # too few pairs for this confidence: the full range
        return r[0], r[-1]
    return r[k], r[n - 1 - k]


def order(pairs: int) -> list[bool]:
    """ABBA ABBA ...: False is A, True is B."""
    out = []
    for i in range(pairs):
        out += [False, True] if i % 2 == 0 else [True, False]
    return out


def run(config: str, switch, pairs: int, warmup: int, precision: str, sets: list[str],
        device: str = "cpu") -> dict:
    steps = warmup * 2 + pairs * 2
    cfg = load_config(None, CONFIGS[config] + list(sets) + [f"train.precision={precision}", "optim.warmup_steps=1",
                                                            f"train.steps={steps + 1}", "train.eval_interval=0"])
    device = torch.device(device)
    model = build_model(cfg.model, device, seed=0).to(param_dtype(precision))
    data = RandomTokens(cfg.train.global_batch * (steps + 1), cfg.model.seq_len, cfg.model.vocab_size)
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, model, data, data, Path(d), device)
        for on in [False, True] * warmup:  # both paths warm (a compiled region compiles here)
            switch(on)
            trainer.train_step()
        for on in order(pairs):
            switch(on)
            t0 = time.perf_counter()
            trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[on].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(times[False], times[True])]
    lo, hi = median_interval(ratios)
    return {"a_s": statistics.median(times[False]), "b_s": statistics.median(times[True]),
            "ratio": statistics.median(ratios), "lo": lo, "hi": hi, "pairs": pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", required=True, help="module:function taking one bool (False: A, True: B)")
    p.add_argument("--configs", default="14m,tiny", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--pairs", type=int, default=16, help="A/B pairs per config (ABBA order)")
    p.add_argument("--warmup", type=int, default=2, help="untimed A/B pairs first")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16-autocast", "bf16"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    switch = resolve_switch(args.switch)
    print(f"switch {args.switch}: A = False, B = True | {args.device} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()}")
    head = f"{'config':<8} {'A ms/step':>10} {'B ms/step':>10} {'B/A time':>9} {'95% interval':>16} {'B speedup':>10}"
    print(head + "\n" + "-" * len(head))
    for name in args.configs.split(","):
        r = run(name, switch, args.pairs, args.warmup, args.precision, args.set, args.device)
        verdict = "faster" if r["hi"] < 1 else "slower" if r["lo"] > 1 else "no difference shown"
        print(f"{name:<8} {1e3 * r['a_s']:>10.1f} {1e3 * r['b_s']:>10.1f} {r['ratio']:>9.3f} "
              f"{r['lo']:>7.3f} - {r['hi']:<6.3f} {1 / r['ratio']:>9.3f}x  {verdict}", flush=True)
    print(f"\nmedians over {args.pairs} ABBA pairs in one process; B/A time = median of the pairs' step-time "
          f"ratios, its 95% interval from their order statistics (sign-test interval of the median).")


if __name__ == "__main__":
    main()
