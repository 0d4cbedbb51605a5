"""The CPU bf16 attention kernel (mtnlg/model/attention.py) against SDPA: forward +
backward time per layer and the error of each against a float64 reference.

    python benchmarks/attention_cpu.py [--shape B,H,T,D ...] [--repeats 7] [--before]

Inputs are made as the model makes them: one (B, T, H, 3D) projection, which the GEMM
kernel takes whole and SDPA as strided q/k/v views; each call includes what the model
does around the kernel (SDPA: the output's transpose copy and, in the backward, the
concatenated and copied q/k/v gradients).  Times are the best and the median of
``--repeats`` rounds of 5 forward + backward calls, the two kernels alternating; errors
are relative Frobenius norms of the output and the three input gradients.  ``--before``
adds the kernel as it was before session 7 (``switches._UnpackedAttention``: unpacked
q/k/v, its output and gradients copied by the model and autograd as they were).
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
import mtnlg.model.attention as A  # noqa: E402
from mtnlg.perf.alloc import keep_freed_memory  # noqa: E402


def make_inputs(B, H, T, D, seed=0):
    """The packed projection (B, T, H, 3D) and an output gradient (B, T, H*D), both bf16."""
    g = torch.Generator().manual_seed(seed)
    qkv = (1.5 * torch.randn(B, T, H, 3 * D, generator=g)).to(torch.bfloat16)
    return qkv, torch.randn(B, T, H * D, generator=g).to(torch.bfloat16)


def sdpa(qkv):
    q, k, v = qkv.transpose(1, 2).split(qkv.shape[-1] // 3, dim=-1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def split(x):
    """(B, T, H, 3D) -> q, k, v as (B, H, T, D)."""
    return x.transpose(1, 2).split(x.shape[-1] // 3, dim=-1)


def reference(qkv, do):
    q, k, v = (t.detach().double().requires_grad_() for t in split(qkv))
    do = do.view(q.shape[0], q.shape[2], q.shape[1], -1).transpose(1, 2)
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ v
    o.backward(do.double())
    return [o.detach(), q.grad, k.grad, v.grad]


def call(fn, x, do):
    """One forward + backward as the model runs it: (B, T, H, D) output reshaped to (B, T, H*D)."""
    fn(x).reshape(do.shape).backward(do)


def errors(fn, qkv, do, ref):
    x = qkv.clone().requires_grad_()
    o = fn(x)
    o.reshape(do.shape).backward(do)
    ours = (o.detach().transpose(1, 2), *split(x.grad))
    return [((a.double() - r).norm() / r.norm()).item() for a, r in zip(ours, ref)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="B,H,T,D (default: the tiny and 14M benchmark layers, "
                                                    "and 2,6,1024,64)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--before", action="store_true",
                   help="also time the kernel before session 7 (benchmarks/switches.py)")
    args = p.parse_args()
    keep_freed_memory()  # as the trainer does on CPU
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else \
        [(8, 4, 256, 64), (8, 6, 256, 64), (2, 6, 1024, 64)]
    kernels = {"sdpa": sdpa, "gemm": lambda x: A._CausalGemmAttention.apply(x)}
    if args.before:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import switches
        kernels["before"] = switches._packed(switches._UnpackedAttention).apply
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, forward + backward per call")
    head = f"{'B,H,T,D':<14} {'kernel':<6} {'best ms':>8} {'median ms':>10}   rel. error vs fp64: out / dq / dk / dv"
    print(head + "\n" + "-" * len(head))
    for shape in shapes:
        qkv, do = make_inputs(*shape)
        ref = reference(qkv, do)
        x = qkv.clone().requires_grad_()
        times = {n: [] for n in kernels}
        for _ in range(args.repeats):
            for n, fn in kernels.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    call(fn, x, do)
                    x.grad = None
                times[n].append((time.perf_counter() - t0) / 5 * 1e3)
        for n, fn in kernels.items():
            e = errors(fn, qkv, do, ref)
            print(f"{','.join(map(str, shape)):<14} {n:<6} {min(times[n]):>8.2f} {statistics.median(times[n]):>10.2f}   "
                  + " / ".join(f"{x:.2e}" for x in e), flush=True)


if __name__ == "__main__":
    main()
