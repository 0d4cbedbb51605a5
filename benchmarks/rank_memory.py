"""Peak resident memory per rank of a few training steps through the real
``parallel.setup.build`` and ``Trainer``, without the CLI (synthetic token rows,
no dataset, tokenizer, metrics files or checkpoints), and each rank's median step
time after the first: separates what the steps hold from what ``mtnlg train`` adds around them (compare with
``benchmarks/plan_vs_measured.py``, which runs the CLI).

    python benchmarks/rank_memory.py [--tp 1] [--dp 1] [--pp 1] [--set model.n_layers=4 ...] [--memory-trace] [--malloc]

It launches itself under ``torch.distributed.run`` for tp*dp > 1 (one thread per
rank, as torchrun sets) and prints each rank's VmHWM next to
``mtnlg.plan.local_memory.predict_memory`` without a device profile (so without the
measured loss footprint and runtime baseline: pass ``--baseline`` to run the
same steps on a 1-layer width-64 model, the runtime's share).  ``--malloc`` samples
glibc's account (``mtnlg.perf.alloc.malloc_stats``) every 2 ms during the steps and splits
each rank's peak into the main heap's resident bytes (which never shrink under the trainer's
malloc settings), the heap bytes in use at that moment, the blocks mapped beside the heap and
the rest (libraries, the interpreter, stacks).
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

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256", "model.vocab_size=8192",
        "train.micro_batch=8", "train.global_batch=16", "train.precision=bf16"]
NEGLIGIBLE = ["model.n_layers=1", "model.hidden=64", "model.n_heads=2", "model.seq_len=32", "model.vocab_size=256",
              "train.micro_batch=2", "train.global_batch=4", "train.precision=bf16"]


def rank_main(args) -> None:
    import numpy as np
    import torch

    import mtnlg.data.samples, mtnlg.parallel.setup, mtnlg.train.dcp, mtnlg.train.run  # noqa: F401,E401 (`mtnlg train`'s imports)
    from mtnlg.config import load_config
    from mtnlg.parallel.mesh import init_distributed
    from mtnlg.parallel.setup import build, check_layout
    from mtnlg.perf.alloc import MallocSampler
    from mtnlg.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    sets = (NEGLIGIBLE if args.baseline else TINY) + args.set + [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}"]
    probe = load_config(None, sets)
    sets += [f"train.global_batch={probe.train.global_batch * args.dp}"]
    cfg = load_config(None, sets)
    dims = check_layout(cfg, world) if world > 1 else None
    rank, world, device = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s, device="cpu")
    model, topo = build(cfg, dims, device, rank)
    vocab, T = cfg.model.vocab_size, cfg.model.seq_len

    class Rows:
        def __len__(self):
            return 64 * args.dp

        def __getitem__(self, i):
            return (np.arange(T + 1) * 7 + i) % vocab
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, model, Rows(), Rows(), Path(d), device, topo)
        sampler = MallocSampler() if args.malloc else None
        times = []
        for _ in range(args.steps - (1 if args.memory_trace else 0)):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        if sampler:
            print(f"rank {rank}: {malloc_report(sampler.stop())}", flush=True)
        if args.memory_trace:  # the last step under the profiler, tracking every tensor allocation
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                trainer.train_step()
            if rank == 0:
                trace = Path(d) / "trace.json"
                prof.export_chrome_trace(str(trace))
                print(f"tensors held between steps (parameters, master copies, optimizer state): "
                      f"{held_bytes(trainer) / 1e6:.1f} MB", flush=True)
                print(tensor_peak_report(json.loads(trace.read_text())["traceEvents"]), flush=True)
    hwm = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) * 1024
    # the first step builds the optimizer state (and any compile): the median of the others
    step_s = f"; median step {statistics.median(times[1:] or times):.3f} s" if times else ""
    from mtnlg.plan.local_memory import predict_memory
    if args.pp == 1:
        pred = predict_memory(cfg.model, None, micro_batch=cfg.train.micro_batch, tp=args.tp, dp=args.dp,
                              global_batch=cfg.train.global_batch)["bytes"]
        print(f"rank {rank}: peak RSS {hwm / 1e6:.0f} MB; predict_memory without a profile {pred / 1e6:.0f} MB"
              + step_s, flush=True)
    else:  # predict_memory models no pipeline: the peak alone
        print(f"rank {rank} (stage {topo.pp_rank}): peak RSS {hwm / 1e6:.0f} MB" + step_s, flush=True)


def malloc_report(got: dict) -> str:
    """One line from ``MallocSampler.stop()`` (see the module docstring)."""
    mb = lambda b: f"{b / 1e6:.0f}"  # noqa: E731
    if not got["samples"]:
        return "no malloc statistics (not glibc)"
    return (f"sampled RSS peak {mb(got['rss'])} MB = main heap {mb(got['heap'])} resident (in use then "
            f"{mb(got['in_use'])}, free {mb(got['heap'] - got['in_use'])}; most in use at any sample "
            f"{mb(got['most_in_use'])}) + mapped blocks {mb(got['mmapped'])} + rest "
            f"{mb(got['rss'] - got['heap'] - got['mmapped'])} ({got['samples']} samples)")


def held_bytes(trainer) -> int:
    """Bytes of this rank's tensors alive between steps: the model's parameters, the master
    copies (``MasterWeights``), the optimizer's state (DTensors: the local shard)."""
    import torch
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    ts = {id(p): p for p in trainer.params}
    ts.update({id(p): p for p in (trainer.master.params if trainer.master else [])})
    ts.update({id(v): v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)})
    return sum(local(t).numel() * local(t).element_size() for t in ts.values())


def tensor_peak_report(events: list[dict], top: int = 12) -> str:
    """From a chrome trace with memory events: the peak of the bytes allocated during the traced
    step (tensors only: not the allocator's heap or what existed before), the ops running at that
    moment, and the allocations still alive then, grouped by size and the op that made them,
    largest first."""
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    total, peak, peak_ts, live, at_peak = 0, 0, 0, {}, {}
    for e in mem:
        a, b = e["args"]["Addr"], e["args"]["Bytes"]
        total += b
        if b > 0:
            live[a] = (b, e["ts"])
        else:
            live.pop(a, None)
        if total > peak:
            peak, peak_ts, at_peak = total, e["ts"], dict(live)

    def innermost(ts):  # the three innermost ops running at ts, outer to inner
        inside = sorted((o for o in ops if o["ts"] <= ts <= o["ts"] + o["dur"]), key=lambda o: -o["dur"])
        return " > ".join(o["name"] for o in inside[-3:]) or "?"
    running = [o["name"] for o in sorted(ops, key=lambda o: o["ts"]) if o["ts"] <= peak_ts <= o["ts"] + o["dur"]]
    lines = [f"tensors allocated during the traced step peak at {peak / 1e6:.0f} MB, inside "
             + " > ".join(running[-4:])]
    groups: dict[tuple[int, str], int] = {}
    for b, ts in at_peak.values():
        key = (b, innermost(ts))
        groups[key] = groups.get(key, 0) + 1
    for (b, name), k in sorted(groups.items(), key=lambda x: -x[0][0] * x[1])[:top]:
        lines.append(f"  {k:3d} x {b / 1e6:6.2f} MB = {k * b / 1e6:6.1f} MB from {name}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override on top of the tiny config")
    p.add_argument("--baseline", action="store_true", help="the negligible model instead (the runtime's share)")
    p.add_argument("--memory-trace", action="store_true",
                   help="profile the last step's tensor allocations and print their peak (rank 0)")
    p.add_argument("--malloc", action="store_true",
                   help="split each rank's peak into heap, heap in use, mapped blocks and the rest (glibc)")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    world = args.tp * args.dp * args.pp
    if args.rank_main or world == 1:
        rank_main(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           __file__, "--rank-main", "--tp", str(args.tp), "--dp", str(args.dp), "--pp", str(args.pp),
           "--steps", str(args.steps)]
    cmd += [f"--set={s}" for s in args.set] + (["--baseline"] if args.baseline else [])
    cmd += ["--memory-trace"] if args.memory_trace else []
    cmd += ["--malloc"] if args.malloc else []
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith(("rank", "tensors", "  ")))
          or out.stderr[-2000:])
    sys.exit(out.returncode)


if __name__ == "__main__":
    main()
