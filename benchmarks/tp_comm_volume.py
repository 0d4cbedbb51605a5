"""Tensor-parallel communication volume per rank per training step, measured
by counting collectives, against Megatron's analytic figure.

    python benchmarks/tp_comm_volume.py [--layers 4 --hidden 256 --heads 8 --seq 128 --batch 4]

Spawns tp=2 and tp=4 gloo groups on CPU, runs one forward + backward of the
vocabulary-parallel loss (with and without sequence parallelism) under a
dispatch mode that records every collective and its tensor sizes, and prints
per rank:

* payload: the full (unsharded) size of each collective's tensor, summed;
  this is the quantity Megatron's formula counts;
* wire: bytes a rank sends with ring algorithms, 2(n-1)/n of the payload for
  all-reduce and (n-1)/n for all-gather / reduce-scatter.

Analytic (Korthikanti et al. 2022, fp32 activations of b·s·h elements):
without SP, 4 all-reduces per layer (2 forward, 2 backward) plus one in the
embedding forward and one for the output layer's input gradient: 4L+2; with
SP each becomes an all-gather + reduce-scatter pair (4L+2 of each), the same
wire volume.  Small extras are listed separately: the vocabulary-parallel
cross-entropy's 3 all-reduces of B·s floats, and under SP the LayerNorm
gradient all-reduces (2 of h floats per LayerNorm) and the position table's
gradient all-gather (s·h).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

fn = torch.ops._c10d_functional
c10d = torch.ops.c10d
# op -> (kind, factor turning the first input's bytes into the payload)
COLLECTIVES = {
    fn.all_reduce.default: ("all_reduce", lambda n, g: n),
    fn.all_gather_into_tensor.default: ("all_gather", lambda n, g: n * g),
    fn.reduce_scatter_tensor.default: ("reduce_scatter", lambda n, g: n),
    fn.all_to_all_single.default: ("all_to_all", lambda n, g: n),
    fn.broadcast.default: ("broadcast", lambda n, g: n),
}
WIRE = {"all_reduce": lambda p, g: 2 * (g - 1) / g * p, "all_gather": lambda p, g: (g - 1) / g * p,
        "reduce_scatter": lambda p, g: (g - 1) / g * p, "all_to_all": lambda p, g: (g - 1) / g * p,
        "broadcast": lambda p, g: p}


class CollectiveCounter(TorchDispatchMode):
    """Records (kind, payload bytes) of every functional collective; c10d
    in-place collectives (used outside DTensor) are counted too."""

    def __init__(self, group_size: int):
        super().__init__()
        self.g = group_size
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.distributed.tensor import DTensor
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into collectives first (as CommDebugMode does)
        if func in COLLECTIVES:
            kind, payload = COLLECTIVES[func]
            t = args[0]
            self.calls.append((kind, payload(t.numel() * t.element_size(), self.g)))
        elif getattr(func, "namespace", None) == "c10d" and func.__name__.split(".")[0] in (
                "allreduce_", "allgather_", "_allgather_base_", "_reduce_scatter_base_", "reduce_scatter_"):
            self.calls.append((func.__name__, -1))  # not expected on the DTensor path
        return func(*args, **kwargs)

    def summary(self) -> dict[str, tuple[int, int, float]]:
        out: dict = defaultdict(lambda: [0, 0, 0.0])
        for kind, b in self.calls:
            out[kind][0] += 1
            out[kind][1] += b
            out[kind][2] += WIRE.get(kind, lambda p, g: 0)(b, self.g)
        return {k: tuple(v) for k, v in out.items()}


def analytic(L: int, B: int, s: int, h: int, tp: int, sp: bool, elem: int = 4) -> dict:
    """Megatron's main activation traffic per rank per step (forward + backward)."""
    act = B * s * h * elem
    if not sp:
        n_ar = 4 * L + 2
        return {"all_reduce": (n_ar, n_ar * act), "wire": n_ar * 2 * (tp - 1) / tp * act}
    n_ag = n_rs = 4 * L + 2  # per layer 2+2 each way; embedding: RS fwd, AG bwd; head: AG fwd, RS bwd
    return {"all_gather": (n_ag, n_ag * act), "reduce_scatter": (n_rs, n_rs * act),
            "wire": (n_ag + n_rs) * (tp - 1) / tp * act}


def _worker(rank, world, port, args, sp, queue):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from mtnlg.config import ModelConfig
        from mtnlg.model.gpt import build_model
        from mtnlg.parallel.tensor import apply_tensor_parallel, loss_context
        cfg = ModelConfig(n_layers=args.layers, hidden=args.hidden, n_heads=args.heads, seq_len=args.seq,
                          vocab_size=args.vocab, make_vocab_divisible_by=128)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        model = apply_tensor_parallel(build_model(cfg, seed=0, vocab_size=cfg.padded_vocab(world)), mesh["tp"], sp)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
        counter = CollectiveCounter(world)
        with counter, loss_context(model):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
            loss.backward()
        clip = CollectiveCounter(world)
        with clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if rank == 0:
            queue.put((counter.summary(), counter.calls, clip.summary()))
    finally:
        dist.destroy_process_group()


def measure(args, tp: int, sp: bool):
    from socket import socket
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, tp, port, args, sp, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def mib(b: float) -> str:
    return f"{b / 2**20:.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args(argv)
    L, B, s, h = args.layers, args.batch, args.seq, args.hidden
    act = B * s * h * 4
    print(f"model L={L} h={h} heads={args.heads} s={s} B={B} V={args.vocab}; fp32; one B·s·h activation = "
          f"{act / 2**20:.3f} MiB.  Per rank, forward+backward of one micro-batch (MiB).")
    print("| tp | SP | activation collectives, measured | analytic | payload measured / analytic |"
          " wire measured / analytic | small extras | clip_grad_norm_ |")
    print("|---|---|---|---|---|---|---|---|")
    for tp in args.tp:
        for sp in (False, True):
            _, calls, clip = measure(args, tp, sp)
            ref = analytic(L, B, s, h, tp, sp)
            main_calls: dict = defaultdict(int)
            payload = wire = 0.0
            extras: dict = defaultdict(lambda: [0, 0])
            for kind, b in calls:
                if b == act:  # the activation-sized (B·s·h) collectives of Megatron's formula
                    main_calls[kind] += 1
                    payload += b
                    wire += WIRE[kind](b, tp)
                else:
                    extras[kind][0] += 1
                    extras[kind][1] += b
            ref_calls = {k: v for k, v in ref.items() if k != "wire"}
            measured = ", ".join(f"{n} {k}" for k, n in sorted(main_calls.items()))
            expected = ", ".join(f"{n} {k}" for k, (n, _) in sorted(ref_calls.items()))
            ref_payload = sum(b for _, b in ref_calls.values())
            small = "; ".join(f"{n} {k} {b / 2**10:.0f} KiB" for k, (n, b) in sorted(extras.items()))
            print(f"| {tp} | {'yes' if sp else 'no'} | {measured} | {expected} | {mib(payload)} / {mib(ref_payload)} |"
                  f" {mib(wire)} / {mib(ref['wire'])} | {small} | {sum(v[0] for v in clip.values())} all_reduce |")

if __name__ == "__main__":
    main()
