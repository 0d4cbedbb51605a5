"""Training throughput vs this machine's matmul rate, measured in the same run.

For each model config and precision it times full training steps (forward,
backward, clipping, AdamW) through the real Trainer and reports tokens/s,
achieved model TFLOP/s and the ratio to the matmul rate of the model's own
GEMM shapes (forward and backward, each as often as a step runs it, at its
best of three timings) in the same dtype, timed here and now.  Ratios, not absolute seconds: the machine is
shared and noisy.

    python benchmarks/train_throughput.py [--steps 6] [--configs tiny,14m] [--repeats 3] [--device cpu]

A/B against another checkout of the code (a before/after table of a change):

    git archive <old-commit> | tar -x -C /tmp/before
    python benchmarks/train_throughput.py --baseline /tmp/before --repeats 3 --precisions bf16

runs each row ``--repeats`` times for each tree, alternating, each run in its
own process with this file's timing and the tree's ``mtnlg`` package, and
reports the median tokens/s of each and the median of the paired ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtnlg.config import load_config  # noqa: E402
from mtnlg.model.flops import flops_per_token  # noqa: E402
from mtnlg.model.gpt import build_model  # noqa: E402
from mtnlg.train.precision import param_dtype  # noqa: E402
from mtnlg.train.trainer import Trainer  # noqa: E402

CONFIGS = {
    "tiny": ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256",
             "model.vocab_size=8192", "train.micro_batch=8", "train.global_batch=16"],
    "14m": ["model.n_layers=6", "model.hidden=384", "model.n_heads=6", "model.seq_len=256",
            "model.vocab_size=8192", "train.micro_batch=8", "train.global_batch=8"],
}
# the same model with the exact erf GeLU (Megatron's, model.activation=gelu) instead of GPT-2's tanh form
CONFIGS["14m-erf"] = CONFIGS["14m"] + ["model.activation=gelu"]
# GPT-3 XL's shape (configs/gpt-1.3b.toml) at sequence 2048, for one GPU: 4 micro-batches of 4
CONFIGS["gpt-1.3b"] = ["model.n_layers=24", "model.hidden=2048", "model.n_heads=16", "model.seq_len=2048",
                       "model.vocab_size=50257", "train.micro_batch=4", "train.global_batch=16"]
# dense 16-bit datasheet peaks (TFLOP/s) for MFU on CUDA, by a substring of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
PRECISIONS = {"fp32": torch.float32, "bf16-autocast": torch.bfloat16, "bf16": torch.bfloat16}


class RandomTokens:
    def __init__(self, n: int, seq_len: int, vocab: int):
        self.data = np.random.default_rng(0).integers(0, vocab, size=(n, seq_len + 1), dtype=np.int64)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, k):
        return self.data[k]


def gemm_shapes(cfg, tokens: int, vocab: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of every weight GEMM of a micro-batch in forward and backward (dgrad,
    wgrad): each layer's four, once per layer, and the output layer's, once."""
    h, f = cfg.hidden, cfg.ffn
    fwd = [(tokens, h, 3 * h, cfg.n_layers), (tokens, h, h, cfg.n_layers), (tokens, h, f, cfg.n_layers),
           (tokens, f, h, cfg.n_layers), (tokens, h, vocab, 1)]
    out = []
    for m, k, n, c in fwd:
        out += [(m, k, n, c), (m, n, k, c), (k, m, n, c)]
    return out


def matmul_rate(shapes, dtype, device, seconds=0.4, passes=3) -> float:
    """TFLOP/s of the step's GEMM mix: the FLOPs of every (m, k, n, count) over the time they
    take at each shape's best rate; each shape timed in ``passes`` rounds of seconds/len(shapes)
    and its fastest round kept (the machine's undisturbed rate: a conservative denominator on a
    shared machine)."""
    total_flops, total_time = 0.0, 0.0
    for m, k, n, count in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        best = float("inf")
        for _ in range(passes):
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / len(shapes):
                a @ b
                reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / reps)
        total_flops += 2.0 * m * k * n * count
        total_time += best * count
    return total_flops / total_time / 1e12


def bench(name: str, precision: str, steps: int, device: torch.device, compile: bool = False,
          sets: tuple = ()) -> dict:
    cfg = load_config(None, CONFIGS[name] + list(sets) + [f"train.precision={precision}", "optim.warmup_steps=1",
                                             f"train.steps={steps + 2}", "train.eval_interval=0"])
    vocab = cfg.model.padded_vocab()
    model = build_model(cfg.model, device, seed=0).to(param_dtype(precision))
    if compile:  # as apply_parallelism does with train.compile=true; the two warm-up steps compile
        model.compile()
    data = RandomTokens(cfg.train.global_batch * (steps + 2), cfg.model.seq_len, cfg.model.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, model, data, data, Path(d), device)
        for _ in range(2):
            trainer.train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    # the median step: robust to another process taking the shared machine's cores for a while
    elapsed = steps * statistics.median(times)
    tokens = steps * cfg.train.global_batch * cfg.model.seq_len
    tflops = tokens / elapsed * flops_per_token(cfg.model, vocab=vocab) / 1e12
    rate = matmul_rate(gemm_shapes(cfg.model, cfg.train.micro_batch * cfg.model.seq_len, vocab),
                       PRECISIONS[precision], device)
    params = sum(p.numel() for p in model.parameters())
    out = {"config": name, "params_m": params / 1e6, "precision": precision + ("+compile" if compile else ""),
           "tokens_per_s": tokens / elapsed,
           "tflops": tflops, "matmul_tflops": rate, "ratio": tflops / rate}
    if device.type == "cuda":
        out["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def bench_tree(tree: Path, name: str, precision: str, steps: int, device: torch.device,
               compile: bool = False, sets: tuple = ()) -> dict:
    """``bench`` in a fresh process, timing the ``mtnlg`` package of checkout ``tree``."""
    here = Path(__file__).resolve().parent
    code = (f"import json, sys; sys.path.insert(0, {str(tree)!r}); import mtnlg, torch; "
            f"assert mtnlg.__file__.startswith({str(tree)!r}), mtnlg.__file__; "
            f"sys.path.insert(0, {str(here)!r}); from train_throughput import bench; "
            f"print(json.dumps(bench({name!r}, {precision!r}, {steps}, torch.device({str(device)!r}), {compile!r}, {tuple(sets)!r})))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark in {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(baseline: Path, names: list[str], precisions: list[str], steps: int, repeats: int,
            device: torch.device) -> None:
    """Before (``baseline`` checkout) / after (this checkout) rows, alternating runs, each pair in
    the other order than the last."""
    this = Path(__file__).resolve().parents[1]
    head = (f"{'config':<7} {'precision':<14} {'before tok/s':>12} {'after tok/s':>12} {'speedup':>8} "
            f"{'before MFU/mm':>14} {'after MFU/mm':>13}")
    print(f"before: {baseline}\nafter:  {this}\n{head}\n" + "-" * len(head))
    for name in names:
        for precision in precisions:
            runs = {"before": [], "after": []}
            for i in range(repeats):  # ABBA: which tree runs first alternates (on this machine the first
                # process of a back-to-back pair was often the slower one, which favoured "after")
                order = (("before", baseline), ("after", this))
                for key, tree in (order if i % 2 == 0 else order[::-1]):
                    runs[key].append(bench_tree(tree, name, precision, steps, device))
            med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
            ratio = {k: statistics.median(r["ratio"] for r in v) for k, v in runs.items()}
            speedup = statistics.median(a["tokens_per_s"] / b["tokens_per_s"]
                                        for b, a in zip(runs["before"], runs["after"]))
            print(f"{name:<7} {precision:<14} {med['before']:>12.0f} {med['after']:>12.0f} {speedup:>7.3f}x "
                  f"{100 * ratio['before']:>13.1f}% {100 * ratio['after']:>12.1f}%", flush=True)
    print(f"\nmedians over {repeats} alternating runs of {steps} timed steps each; speedup = median of the paired "
          f"after/before tokens/s; MFU/mm = model FLOP/s over the matmul rate at the model's shapes, same run.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--configs", default="tiny,14m", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--precisions", default="fp32,bf16-autocast,bf16", help="comma list of: " + ", ".join(PRECISIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile=true)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every row, e.g. --set train.micro_batch=8 (repeatable)")
    p.add_argument("--baseline", type=Path, help="another checkout: print before (it) / after (this) rows")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per row, each in a fresh process (median reported); with --baseline, alternating "
                        "runs per tree; 1 without --baseline runs every row in this process")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.baseline:
        compare(args.baseline.resolve(), args.configs.split(","), args.precisions.split(","), args.steps,
                args.repeats, device)
        return
    peak = device_peak_tflops(device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)}, peak {peak} TFLOP/s)" if device.type == "cuda" else "")
          + f" | torch {torch.__version__} | threads {torch.get_num_threads()}"
          + (f" | {' '.join(args.set)}" if args.set else ""))
    header = f"{'config':<8} {'params':>8} {'precision':<14} {'tokens/s':>10} {'model TFLOP/s':>14} {'matmul TFLOP/s':>15} {'MFU vs matmul':>14}"
    print(header)
    print("-" * len(header))
    for name in args.configs.split(","):
        for precision in args.precisions.split(","):
            if args.repeats > 1:  # fresh processes: one run's heap or threads don't shape the next
                runs = [bench_tree(Path(__file__).resolve().parents[1], name, precision, args.steps, device,
                                   args.compile, args.set)
                        for _ in range(args.repeats)]
                r = {**runs[0], **{k: statistics.median(x[k] for x in runs)
                                   for k in ("tokens_per_s", "tflops", "matmul_tflops", "ratio")}}
                r["runs"] = sorted(100 * x["ratio"] for x in runs)
            else:
                r = bench(name, precision, args.steps, device, args.compile, args.set)
            print(f"{r['config']:<8} {r['params_m']:>7.2f}M {r['precision']:<14} {r['tokens_per_s']:>10.0f} "
                  f"{r['tflops']:>14.4f} {r['matmul_tflops']:>15.4f} {100 * r['ratio']:>13.1f}%"
                  + (f"   runs: {' '.join(f'{x:.1f}' for x in r['runs'])}" if "runs" in r else ""), flush=True)
            if peak:
                print(f"{'':<10} MFU vs datasheet peak {100 * r['tflops'] / peak:.1f}%, "
                      f"max memory allocated {r.get('max_memory_gb', 0):.1f} GB", flush=True)
    if args.repeats > 1:
        print(f"\nmedians of {args.repeats} runs, each in a fresh process, of {args.steps} timed steps each "
              "(runs: each run's MFU vs matmul, sorted).")
    print("\nMFU vs matmul = model FLOPs/s (forward+backward, no recompute) / matmul rate at the model's own "
          "GEMM shapes in the same dtype, measured in this run.")


if __name__ == "__main__":
    main()
