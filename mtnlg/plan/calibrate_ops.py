"""The non-GEMM primitives of a training step, timed for ``mtnlg plan --calibrate``.

On a CPU the kernels between the GEMMs are not bandwidth-bound: a tanh GeLU,
a LayerNorm, a bf16<->fp32 cast or a column sum spend their time computing,
and the fp32 loss over a vocabulary-sized row allocates buffers the kernel
first has to fault in.  So each kind gets its own measured rate, nanoseconds
per element, timed here as the step calls it (allocating its outputs) at the
shapes of the configs being calibrated:

    layernorm    F.layer_norm forward + backward            per element of the input
    gelu         tanh GeLU forward + backward               per element of the input
                 (model.activation = gelu_tanh; the kind's name predates the option), as the
                 model runs it: bf16 on CPU the compiled bias + GeLU region (mtnlg.model.bias_gelu)
    gelu_erf     exact erf GeLU forward + backward          per element of the input
                 (model.activation = gelu), the same way
    gelu_eager, gelu_erf_eager  the same through F.gelu: the unfused path tensor-parallel
                 MLPs take (DTensor weights)
    add          an out-of-place add (residual stream)      per element
    copy         a layout copy (transpose -> contiguous)    per element
    bias_grad    a column sum (a Linear's bias gradient)    per element summed
    cast         bf16 -> fp32 and fp32 -> bf16, averaged    per element
    loss         the trainer's cross-entropy, fwd + bwd     per logit element
    loss_bytes   resident bytes the loss adds at its peak   per logit element (not ns: memory)
    grad_to_fp32, grad_accumulate
                 ``MasterWeights.accumulate_grads`` on the first micro-batch of a
                 step (fp32 copy of the bf16 gradient) and on a later one (add)
                                                            per parameter
    optim_param, optim_tensor
                 the trainer's optimizer path (gradient clipping, AdamW on the fp32
                 master copy, copy back to bf16), fitted as
                 tensors x optim_tensor + parameters x optim_param

With two processes (``distributed_kinds``, run in the gloo workers of
``calibrate.measure_link``): the vocabulary-parallel loss on DTensor logits
(``loss_tp``, and ``loss_tp_bytes``: the resident bytes it adds), the dispatch overhead of one DTensor op with autograd
(``dtensor_op``), and the optimizer path over DTensor parameters
(``optim_dtensor_*`` for tensor parallelism's bf16 parameters with fp32
master copies, ``optim_replicate_*`` for data parallelism's fp32 ones: the
trainer steps DTensors without foreach).
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from mtnlg.config import ModelConfig


def _time(fn, budget_s: float) -> float:
    from mtnlg.plan.calibrate import time_call
    return time_call(fn, torch.device("cpu"), budget_s)


def _loss_fn():
    try:  # the trainer's loss, wherever it lives
        from mtnlg.train.loss import cross_entropy_fp32
    except ImportError:
        from mtnlg.train.trainer import cross_entropy_fp32
    return cross_entropy_fp32


def _per_elem(fn, n: int, budget_s: float) -> float:
    return _time(fn, budget_s) / n * 1e9


def _activation(u: torch.Tensor, gu: torch.Tensor, approximate: str):
    """The MLP's GeLU forward + backward as the model runs it at this shape: the compiled
    bias + GeLU region where ``mtnlg.model.bias_gelu`` uses it (bf16 on CPU, large enough),
    else ``F.gelu`` (the unfused path's bias add is in the GEMM)."""
    from mtnlg.model import regions
    from mtnlg.model.bias_gelu import _REGIONS, bias_gelu
    fused = (u.device.type == "cpu" and u.dtype == torch.bfloat16 and u.numel() >= regions.MIN_ELEMS
             and all(r.usable() for r in _REGIONS[approximate]))
    if fused:
        bias = torch.zeros(u.shape[-1], dtype=u.dtype, requires_grad=True)
        return lambda: bias_gelu(u, bias, approximate).backward(gu)
    return lambda: F.gelu(u, approximate=approximate).backward(gu)


def elementwise_ns(cfgs: list[ModelConfig], micro_batch: int, budget_s: float = 0.05) -> dict[str, float]:
    """ns per element of each kind, the median over the configs' shapes (bf16)."""
    dt = torch.bfloat16
    got: dict[str, list[float]] = {}
    for cfg in cfgs:
        B, s, h, f, H = micro_batch, cfg.seq_len, cfg.hidden, cfg.ffn, cfg.n_heads
        T = B * s
        x = torch.randn(B, s, h, dtype=dt, requires_grad=True)
        w, b = torch.ones(h, dtype=dt, requires_grad=True), torch.zeros(h, dtype=dt, requires_grad=True)
        g = torch.randn(B, s, h, dtype=dt)

        def ln():
            F.layer_norm(x, (h,), w, b, cfg.layernorm_eps).backward(g)
        got.setdefault("layernorm", []).append(_per_elem(ln, T * h, budget_s))
        u = torch.randn(B, s, f, dtype=dt, requires_grad=True)
        gu = torch.randn(B, s, f, dtype=dt)
        for kind, approximate in (("gelu", "tanh"), ("gelu_erf", "none")):
            got.setdefault(kind, []).append(_per_elem(_activation(u, gu, approximate), T * f, budget_s))
            got.setdefault(kind + "_eager", []).append(  # the unfused path (tensor parallel, small calls)
                _per_elem(lambda a=approximate: F.gelu(u, approximate=a).backward(gu), T * f, budget_s))
        y = torch.randn(B, s, h, dtype=dt)
        got.setdefault("add", []).append(_per_elem(lambda: torch.add(g, y), T * h, budget_s))
        qkv = torch.randn(B, s, H, 3 * cfg.head_dim, dtype=dt)
        got.setdefault("copy", []).append(_per_elem(lambda: qkv.transpose(1, 2).contiguous(), qkv.numel(), budget_s))
        gf = torch.randn(T, f, dtype=dt)
        got.setdefault("bias_grad", []).append(_per_elem(lambda: gf.sum(0), gf.numel(), budget_s))
        p16 = torch.randn(f, h, dtype=dt)
        p32 = p16.float()
        got.setdefault("cast", []).append((_per_elem(p16.float, p16.numel(), budget_s) +
                                           _per_elem(p32.bfloat16, p32.numel(), budget_s)) / 2)
        V = cfg.padded_vocab()
        logits = torch.randn(T, V, dtype=dt).mul_(3).requires_grad_()
        targets = torch.randint(0, cfg.vocab_size, (T,))
        loss = _loss_fn()

        def ce():
            loss(logits, targets).backward()
            logits.grad = None
        got.setdefault("loss", []).append(_per_elem(ce, T * V, budget_s))
        del logits
    out = {k: float(statistics.median(v)) for k, v in got.items()}
    out.update(master_grad_ns(budget_s))
    out.update(optimizer_ns(budget_s))
    return out


_LOSS_RSS = """
import sys, torch
from mtnlg.plan.calibrate_ops import _loss_fn, vm_hwm, step_allocator
step_allocator()
T, V, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
logits = torch.randn(T, V, dtype=torch.bfloat16).mul_(3).requires_grad_()
targets = torch.randint(0, n, (T,))
loss = _loss_fn()
h0 = vm_hwm()
for _ in range(2):
    loss(logits, targets).backward()
    logits.grad = None
print(vm_hwm() - h0)
"""


def step_allocator() -> None:
    """Run with the allocator settings the trainer uses (``mtnlg.perf.alloc``), where it has them."""
    try:
        from mtnlg.perf.alloc import keep_freed_memory
    except ImportError:
        return
    keep_freed_memory()


def vm_hwm() -> int:
    """This process's peak resident bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def vm_rss() -> int:
    """This process's resident bytes now (VmRSS)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def loss_peak_bytes(cfgs: list[ModelConfig], micro_batch: int) -> float:
    """Resident bytes the trainer's loss adds, forward + backward, per logit element, beyond
    the logits themselves: the peak (VmHWM) of a fresh process running it on bf16 logits of
    the model's shape, less the peak before it; the median over the configs."""
    import os
    import subprocess
    import sys
    got = []
    for cfg in cfgs:
        T, V = micro_batch * cfg.seq_len, cfg.padded_vocab()
        out = subprocess.run([sys.executable, "-c", _LOSS_RSS, str(T), str(V), str(cfg.vocab_size)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got.append(int(out.stdout.split()[-1]) / (T * V))
    return float(statistics.median(got))


def _param_sets():
    """Two parameter sets: many small tensors (per-tensor cost) and few large ones (per-element cost)."""
    return [[(64, 64)] * 48 + [(64,)] * 48, [(1024, 1024)] * 3 + [(1024,)] * 3]


def _fit_tensor_param(rows: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(ns per tensor, ns per parameter) from two timings t = tensors·a + params·b."""
    (n1, p1, t1), (n2, p2, t2) = rows
    det = n1 * p2 - n2 * p1
    a = (t1 * p2 - t2 * p1) / det
    b = (n1 * t2 - n2 * t1) / det
    return max(a, 0.0) * 1e9, max(b, 0.0) * 1e9


def optimizer_ns(budget_s: float, wrap=None, prefix: str = "optim") -> dict[str, float]:
    """The trainer's own optimizer path (built by ``Trainer``: AdamW over fp32 master
    copies of bf16 parameters, clipping, master-to-model copy), per tensor and per parameter.
    ``wrap`` turns a module into its parallel form (DTensor parameters) first."""
    import tempfile
    from pathlib import Path

    from mtnlg.config import Config
    from mtnlg.train.trainer import Trainer
    rows = []
    for shapes in _param_sets():
        model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in shapes])
        if wrap is not None:
            model = wrap(model)
        else:
            model = model.to(torch.bfloat16)
        cfg = Config()
        cfg.train.precision = "bf16"
        with tempfile.TemporaryDirectory() as d:
            tr = Trainer(cfg, model, None, None, Path(d), torch.device("cpu"))
        params = tr.master.params if tr.master else tr.params
        for p in params:
            p.grad = torch.randn_like(p)

        def step():
            tr.topo.clip_grad_norm(params, 1.0)
            tr.optimizer.step()
            if tr.master:
                tr.master.master_to_model()
        n = sum(p.numel() for p in params)
        rows.append((len(params), n, _time(step, budget_s)))
    a, b = _fit_tensor_param(rows)
    return {f"{prefix}_tensor": a, f"{prefix}_param": b}


def master_grad_ns(budget_s: float) -> dict[str, float]:
    """``MasterWeights.accumulate_grads`` per parameter: the step's first micro-batch
    (the fp32 master gradient is created from the bf16 one) and a later one (added)."""
    from mtnlg.train.precision import MasterWeights
    shapes = [(1024, 1024)] * 2 + [(1024,)] * 4
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    master = MasterWeights(params)
    n = sum(p.numel() for p in params)

    def first():
        for m in master.params:
            m.grad = None
        for p, g in zip(params, grads):
            p.grad = g
        master.accumulate_grads()

    def later():
        for p, g in zip(params, grads):
            p.grad = g
        master.accumulate_grads()
    first()
    return {"grad_to_fp32": _time(first, budget_s) / n * 1e9, "grad_accumulate": _time(later, budget_s) / n * 1e9}


def _micro_gpt(layers: int, vocab_size: int):
    from mtnlg.config import load_config
    return load_config(None, [f"model.n_layers={layers}", "model.hidden=32", "model.n_heads=2", "model.seq_len=16",
                              "model.vocab_size=256", "model.make_vocab_divisible_by=64", "model.dropout=0.0"]).model


def _fixed_costs(build, timed, key: str) -> dict[str, float]:
    """Fixed cost per block and the rest, per micro-batch (forward + backward + the trainer's
    loss) of a parallel GPT at a negligible size (width 32, 16 tokens), from 1 and 5 blocks:
    what remains at that size is dispatch, hooks, redistribution and the collectives' latency."""
    loss = _loss_fn()
    got = {}
    for layers in (1, 5):
        torch.manual_seed(0)
        model, ctx = build(layers)
        x = torch.randint(0, 256, (1, 16))

        def step():
            with ctx(model):
                loss(model(x).flatten(0, 1), x.flatten()).backward()
            model.zero_grad(set_to_none=True)
        got[layers] = timed(step)
    per = (got[5] - got[1]) / 4
    return {f"{key}_layer": max(per, 0.0) * 1e9, f"{key}_base": max(got[1] - per, 0.0) * 1e9}


def tp_block_overhead(mesh, timed) -> dict[str, float]:
    """``tp_layer``/``tp_base``: the tensor-parallel plan (``apply_tensor_parallel``, bf16)."""
    from mtnlg.model.gpt import build_model
    from mtnlg.parallel.tensor import apply_tensor_parallel, loss_context

    def build(layers):
        cfg = _micro_gpt(layers, 256)
        model = build_model(cfg, "cpu", seed=0, vocab_size=cfg.padded_vocab(mesh.size())).to(torch.bfloat16)
        return apply_tensor_parallel(model, mesh), loss_context
    return _fixed_costs(build, timed, "tp")


def dp_block_overhead(mesh, timed) -> dict[str, float]:
    """``dp_layer``/``dp_base``: data parallelism's ``replicate`` (``apply_data_parallel``, zero 0,
    fp32 parameters under the bf16 mixed-precision policy): hooks, casts' dispatch, per-block
    gradient all-reduce latency."""
    from contextlib import nullcontext

    from mtnlg.model.gpt import build_model
    from mtnlg.parallel.data import apply_data_parallel

    def build(layers):
        model = build_model(_micro_gpt(layers, 256), "cpu", seed=0)
        return apply_data_parallel(model, mesh, 0, "bf16"), lambda m: nullcontext()
    return _fixed_costs(build, timed, "dp")


def distributed_kinds(cfgs: list[ModelConfig], micro_batch: int, budget_s: float = 0.05) -> dict[str, float]:
    """Inside an initialised 2-rank gloo group, one thread per rank: the
    vocabulary-parallel loss, one DTensor op's overhead and the optimizer over
    replicated DTensor parameters (ns per unit, see the module docstring)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, list[float]] = {}

    def timed(fn, reps: int = 8):  # every rank runs fn the same number of times (fn may hold collectives)
        import time
        dist.barrier()
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best
    # smallest logits first: each loss's peak then tops the process's earlier ones, so its
    # resident bytes are the peak after it less the resident memory before it
    for cfg in sorted(cfgs, key=lambda c: c.seq_len * c.padded_vocab(world)):
        T, V = micro_batch * cfg.seq_len, cfg.padded_vocab(world)
        torch.manual_seed(0)
        full = torch.randn(T, V, dtype=torch.bfloat16).mul_(3)
        logits = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
        targets = torch.randint(0, cfg.vocab_size, (T,))  # the trainer's targets stay plain tensors
        loss = _loss_fn()

        def ce():
            with loss_parallel():
                loss(logits, targets).backward()
            logits.grad = None
        r0 = vm_rss()
        out.setdefault("loss_tp", []).append(timed(ce) / (T * V / world) * 1e9)
        out.setdefault("loss_tp_bytes", []).append((vm_hwm() - r0) / (T * V / world))
    small = distribute_tensor(torch.randn(16), mesh, [Replicate()]).requires_grad_()

    def chain():
        h = small
        for _ in range(20):
            h = h * 1.0001
        h.sum().backward()
    res = {k: float(statistics.median(v)) for k, v in out.items()}
    res["dtensor_op"] = timed(chain) / 41 * 1e9  # 20 muls, their 20 backward muls, the sum
    res.update(tp_block_overhead(mesh, timed))
    res.update(dp_block_overhead(mesh, timed))

    def wrap(dtype):
        def w(model):
            for i, p in enumerate(model):
                model[i] = torch.nn.Parameter(distribute_tensor(p.detach().to(dtype), mesh, [Replicate()]))
            return model
        return w
    # tensor parallel: bf16 DTensor parameters with fp32 master copies; data parallel (replicate):
    # fp32 DTensor parameters, the bf16 compute copies are FSDP's (no master copy)
    res.update(optimizer_ns(budget_s, wrap=wrap(torch.bfloat16), prefix="optim_dtensor"))
    res.update(optimizer_ns(budget_s, wrap=wrap(torch.float32), prefix="optim_replicate"))
    return res
