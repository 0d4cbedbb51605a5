"""The loss and the optimizer path of one training step, kernel by kernel, next to
the bytes the cost model (``mtnlg.plan.cost``) charges them.

Runs, on the device and at a config's shapes, what the trainer runs (nothing else):
* the loss: ``cross_entropy_fp32`` forward + backward on bf16 logits of one
  micro-batch ([micro_batch x seq, padded vocab]);
* the state path of one step: ``MasterWeights.accumulate_grads`` once per
  micro-batch, gradient clipping, the trainer's AdamW (fused on CUDA), ``zero_grad``
  and ``master_to_model``, over the config's own parameters;
* an out-of-place add of three 256 MB (GPU) / 8 MB (CPU) tensors: the streaming
  bandwidth ``mtnlg plan --calibrate`` measures (``mem_gbps``), in the same run.

For each it prints the profiler's kernels (device time on CUDA, self CPU time on a
CPU: name, calls, ms per step), the bytes the cost model charges, the time those
bytes take at the add's bandwidth, and the time measured (CUDA events / wall).

    python benchmarks/memory_bound_ops.py --config gpt-1.3b --device cuda

The bytes are those of the GPU path: on a CPU the loss in bf16 takes its own path (the gradient
written in the forward, mtnlg.train.loss) and the cost model prices it by a measured kind instead.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS  # noqa: E402

from mtnlg.config import load_config  # noqa: E402
from mtnlg.model.gpt import build_model  # noqa: E402
from mtnlg.plan.cost import local_params, loss_traffic, state_ops, step_ops  # noqa: E402
from mtnlg.train.loss import cross_entropy_fp32  # noqa: E402
from mtnlg.train.trainer import Trainer  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device, reps: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_table(fn, device, reps: int = 2) -> tuple[list[tuple[str, int, float]], float]:
    """(name, calls per rep, ms per rep) of the kernels ``fn`` runs (CUDA: device time of each
    kernel/memset/memcpy; CPU: self CPU time of each op), and the total ms per rep."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    calls, ms = collections.Counter(), collections.Counter()
    events = prof.events()
    # a record_function region (Optimizer.step) also shows a device-side span of its own name: not a kernel
    cpu_names = {e.name for e in events if str(getattr(e, "device_type", "")).endswith("CPU")}
    for e in events:
        on_device = not str(getattr(e, "device_type", "")).endswith("CPU")
        if cuda and on_device and e.name not in cpu_names:
            calls[e.name] += 1
            ms[e.name] += e.time_range.elapsed_us() / 1e3
        elif not cuda and e.self_cpu_time_total > 0:
            calls[e.name] += 1
            ms[e.name] += e.self_cpu_time_total / 1e3
    rows = sorted(((n, calls[n] // reps, ms[n] / reps) for n in ms), key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows)


def print_table(title: str, rows, total: float, top: int = 14) -> None:
    print(f"-- {title}: {total:.2f} ms per step in {sum(r[1] for r in rows)} kernels")
    for name, n, t in rows[:top]:
        print(f"   {t:9.3f} ms {n:6d}x {1e3 * t / max(n, 1):9.1f} us  {name[:90]}")
    rest = rows[top:]
    if rest:
        print(f"   {sum(r[2] for r in rest):9.3f} ms {sum(r[1] for r in rest):6d}x  ({len(rest)} other kernels)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_config(None, CONFIGS[args.config] + ["train.precision=bf16"])
    mc, mb = cfg.model, cfg.train.micro_batch
    n_micro = cfg.train.global_batch // mb
    T, V = mb * mc.seq_len, mc.padded_vocab()
    name = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB)"
    print(f"{args.config}: micro-batch {mb} x {mc.seq_len} = {T} tokens, vocab {V}, {n_micro} micro-batches; {name}, "
          f"torch {torch.__version__}")

    n = (1 << 27) if device.type == "cuda" else (1 << 22)
    x, y, z = (torch.randn(n, dtype=torch.bfloat16, device=device) for _ in range(3))
    gbps = 3 * 2 * n / best_seconds(lambda: torch.add(x, y, out=z), device, 10) / 1e9
    del x, y, z
    print(f"streaming add: {gbps:.0f} GB/s")

    # ---- the loss, one micro-batch, x n_micro per step
    torch.manual_seed(0)
    logits = (torch.randn(T, V, dtype=torch.bfloat16, device=device) * 3).requires_grad_()
    targets = torch.randint(0, mc.vocab_size, (T,), device=device)

    def loss_step():
        cross_entropy_fp32(logits, targets).backward()
        logits.grad = None
    rows, dev_ms = kernel_table(loss_step, device)
    wall = best_seconds(loss_step, device) * 1e3
    print_table(f"loss, one micro-batch x {n_micro}", [(a, b * n_micro, c * n_micro) for a, b, c in rows],
                dev_ms * n_micro, args.top)
    op = next(o for o in step_ops(mc, mb, n_micro, vocab=V) if o.name == "cross_entropy")
    print(f"   model: {loss_traffic(T, V)[0]:.0f} B per logit, {op.bytes / 1e9:.2f} GB "
          f"-> {op.bytes / gbps / 1e6:.2f} ms at {gbps:.0f} GB/s, {op.count} kernels; "
          f"measured wall {wall * n_micro:.2f} ms")
    del logits, targets

    # ---- the state path of one step over the config's parameters
    model = build_model(mc, device, seed=0).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, model, None, None, Path(d), device)
    grads = [torch.randn_like(q) for q in tr.params]

    def state_step():
        for _ in range(n_micro):
            for q, g in zip(tr.params, grads):
                q.grad = g
            tr.master.accumulate_grads()
        tr.topo.clip_grad_norm(tr.master.params, 1.0)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.master.master_to_model()
    rows, dev_ms = kernel_table(state_step, device)
    wall = best_seconds(state_step, device) * 1e3
    print_table("optimizer path of one step", rows, dev_ms, args.top)
    nparam = local_params(mc)
    ops = state_ops(mc, n_micro)
    nbytes = sum(o.bytes for o in ops if o.category == "optimizer")
    print(f"   model: {nparam / 1e6:.1f}M parameters, {nbytes / nparam:.0f} B per parameter, {nbytes / 1e9:.2f} GB "
          f"-> {nbytes / gbps / 1e6:.2f} ms at {gbps:.0f} GB/s; measured wall {wall:.2f} ms")
    for o in ops:
        if o.bytes:
            print(f"     {o.name:<24} {o.bytes / nparam:5.0f} B/param  {o.bytes / gbps / 1e6:8.2f} ms  {o.count} kernels")


if __name__ == "__main__":
    main()
