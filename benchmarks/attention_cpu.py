"""The CPU bf16 attention kernel (mtnlg/model/attention.py) against SDPA: forward +
backward time per layer and the error of each against a float64 reference.

    python benchmarks/attention_cpu.py [--shape B,H,T,D ...] [--repeats 7]

Inputs are made as the model makes them (strided q/k/v views of one projection);
times are the best and the median of ``--repeats`` rounds of 5 forward + backward
calls, the two kernels alternating; errors are relative Frobenius norms of the
output and the three input gradients.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtnlg.model.attention import _CausalGemmAttention  # noqa: E402
from mtnlg.perf.alloc import keep_freed_memory  # noqa: E402


def make_inputs(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (1.5 * torch.randn(B, T, H, 3 * D, generator=g)).to(torch.bfloat16).transpose(1, 2)
    q, k, v = (t.detach().requires_grad_() for t in qkv.split(D, dim=-1))
    return q, k, v, torch.randn(B, H, T, D, generator=g).to(torch.bfloat16)


def reference(q, k, v, do):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ v
    o.backward(do.double())
    return [o.detach(), q.grad, k.grad, v.grad]


def errors(fn, q, k, v, do, ref):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [((a.double() - r).norm() / r.norm()).item() for a, r in zip((o.detach(), q.grad, k.grad, v.grad), ref)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="B,H,T,D (default: the tiny and 14M benchmark layers, "
                                                    "and 2,6,1024,64)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    keep_freed_memory()  # as the trainer does on CPU
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else \
        [(8, 4, 256, 64), (8, 6, 256, 64), (2, 6, 1024, 64)]
    kernels = {"sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
               "gemm": _CausalGemmAttention.apply}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, forward + backward per call")
    head = f"{'B,H,T,D':<14} {'kernel':<6} {'best ms':>8} {'median ms':>10}   rel. error vs fp64: out / dq / dk / dv"
    print(head + "\n" + "-" * len(head))
    for shape in shapes:
        q, k, v, do = make_inputs(*shape)
        ref = reference(q, k, v, do)
        times = {n: [] for n in kernels}
        for _ in range(args.repeats):
            for n, fn in kernels.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    fn(q, k, v).backward(do)
                times[n].append((time.perf_counter() - t0) / 5 * 1e3)
        for n, fn in kernels.items():
            e = errors(fn, q, k, v, do, ref)
            print(f"{','.join(map(str, shape)):<14} {n:<6} {min(times[n]):>8.2f} {statistics.median(times[n]):>10.2f}   "
                  + " / ".join(f"{x:.2e}" for x in e), flush=True)


if __name__ == "__main__":
    main()
