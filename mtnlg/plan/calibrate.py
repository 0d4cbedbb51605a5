"""``mtnlg plan --calibrate``: time this machine's operations and save a device
profile for the cost model (``cost.py``).

What is timed, for one thread and for every core (CPU) or on the GPU:
* GEMMs at the model's own shapes (forward, input- and weight-gradient of
  every weight matrix, from ``cost.step_ops``) plus a sweep of square and
  skinny shapes; the roofline ``t = 2mkn/P + bytes/W + t0`` is fitted to them
  by least squares on relative error;
* the attention core (the model's ``causal_attention``, forward + backward) at the models' shapes;
* elementwise streaming bandwidth (an add of large tensors), that of the
  dtype-converting kernels (``cast_gbps``) and the dispatch cost of one small autograd op;
* the optimizer path of the trainer (AdamW on fp32 master weights, gradient
  clipping, copy back to bf16) per parameter;
* gloo all-reduce between two processes (latency and bandwidth);
* the resident memory of the training runtime (imports + two steps of a negligible model).
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from mtnlg.config import ModelConfig
from mtnlg.model.attention import causal_attention
from mtnlg.plan.cost import DeviceProfile, Rates, step_ops
from mtnlg.plan.calibrate_ops import elementwise_ns

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device, budget_s: float = 0.05, min_reps: int = 3) -> float:
    """Best-of-repeats seconds per call (the minimum is the least noisy estimator on a shared machine)."""
    fn()
    _sync(device)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < budget_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
        if reps >= 200:
            break
    return best


def gemm_shapes(cfgs: list[ModelConfig], micro_batch: int, tps: tuple[int, ...] = (1, 2)) -> list[tuple]:
    shapes = set()
    for cfg in cfgs:
        for tp in tps:
            if cfg.n_heads % tp:
                continue
            for op in step_ops(cfg, micro_batch, 1, tp=tp, layers=1):
                if op.category == "gemm":
                    shapes.add(op.shape)
    sweep = [(n, n, n) for n in (64, 128, 256, 512, 1024)] + [(2048, 64, 256), (2048, 256, 64), (256, 2048, 256)]
    return sorted(shapes) + sweep


def _fit(F_, B_, t):
    """Least squares on relative error of t = a·F + b·B + c, dropping terms that go negative."""
    cols = {"flops": F_, "bytes": B_, "one": np.ones_like(t)}
    active = list(cols)
    while True:
        A = np.stack([cols[c] / t for c in active], axis=1)
        coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
        neg = [c for c, v in zip(active, coef) if v <= 0 and c != "flops"]
        if not neg:
            break
        active.remove(neg[0])
    got = dict(zip(active, coef))
    pred = got["flops"] * F_ + got.get("bytes", 0.0) * B_ + got.get("one", 0.0)
    return got, float(np.max(np.abs(pred / t - 1)))


def fit_roofline(shapes: list[tuple], seconds: list[float], dtype_bytes: int) -> tuple[float, float, float, float]:
    """(P TFLOP/s, W GB/s, t0 us, C MB) minimising the worst relative error over a grid of
    cache sizes C; a machine where streaming never limits a GEMM gets W = inf."""
    F_ = np.array([2.0 * m * k * n for m, k, n in shapes])
    raw = np.array([dtype_bytes * (m * k + k * n + m * n) for m, k, n in shapes], dtype=float)
    t = np.array(seconds)
    best = None
    for C in [0.0] + list(np.geomspace(0.25e6, 64e6, 25)):
        got, err = _fit(F_, np.maximum(0.0, raw - C), t)
        if best is None or err < best[0]:
            best = (err, got, C)
    _, got, C = best
    P = 1.0 / got["flops"] / 1e12
    W = 1.0 / got["bytes"] / 1e9 if got.get("bytes", 0) > 0 else 1e9
    return P, W, got.get("one", 0.0) * 1e6, C / 1e6


def measure_rates(cfgs: list[ModelConfig], micro_batch: int, threads: int, device: torch.device,
                  precision: str = "bf16", budget_s: float = 0.05, log=print) -> tuple[Rates, dict]:
    if device.type == "cpu":
        torch.set_num_threads(threads)
    dt = DTYPES["fp32" if precision == "fp32" else "bf16"]
    ab = 4 if dt == torch.float32 else 2
    shapes = gemm_shapes(cfgs, micro_batch)
    secs = []
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dt, device=device)
        b = torch.randn(k, n, dtype=dt, device=device)
        secs.append(time_call(lambda: a @ b, device, budget_s))
    P, W, t0, C = fit_roofline(shapes, secs, ab)
    fp32 = 0.0
    if dt != torch.float32:
        big = [s for s in shapes if s[0] * s[1] * s[2] >= 2 ** 24][:4]
        rates = []
        for m, k, n in big:
            a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
            rates.append(2.0 * m * k * n / time_call(lambda: a @ b, device, budget_s) / 1e12)
        fp32 = max(rates) if rates else 0.0

    attn = []
    for cfg in cfgs:
        B, H, s, d = micro_batch, cfg.n_heads, cfg.seq_len, cfg.head_dim
        q, k, v = (torch.randn(B, H, s, d, dtype=dt, device=device, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, s, d, dtype=dt, device=device)

        def fwd_bwd():
            y = causal_attention(q, k, v)  # the model's own kernel choice (SDPA, or GEMMs for CPU bf16)
            y.backward(g)
        sec = time_call(fwd_bwd, device, budget_s)
        attn.append(3 * 4.0 * B * s * s * H * d / sec / 1e12)

    # 8 MB per tensor on a CPU; on a GPU 256 MB, since at 8 MB the add is its launch (an H200's
    # 4.8 TB/s measured as 1.4 TB/s)
    n = 1 << (27 if device.type == "cuda" else 22)
    x, y, z = (torch.randn(n, dtype=dt, device=device) for _ in range(3))
    mem = 3 * n * ab / time_call(lambda: torch.add(x, y, out=z), device, budget_s) / 1e9
    del x, y, z
    cast = cast_gbps(device, n, budget_s)
    small = torch.randn(16, device=device, requires_grad=True)

    def chain():
        h = small
        for _ in range(50):
            h = h * 1.0001
        h.sum().backward()
    overhead = time_call(chain, device, budget_s) / 100 * 1e6

    optim = optimizer_ns_per_param(device, precision, budget_s)
    kinds = elementwise_ns(cfgs, micro_batch, budget_s) if device.type == "cpu" and dt == torch.bfloat16 else {}
    if kinds:
        from mtnlg.plan.calibrate_ops import loss_peak_bytes
        kinds["loss_bytes"] = loss_peak_bytes(cfgs, micro_batch)
    r = Rates(gemm_tflops=P, gemm_gbps=W, gemm_overhead_us=t0, attn_tflops=float(np.median(attn)),
              mem_gbps=mem, op_overhead_us=overhead, optim_ns_per_param=optim, fp32_gemm_tflops=fp32,
              gemm_cache_mb=C, kind_ns=kinds, cast_gbps=cast)
    fitted = [gemm_seconds_rel(s, t, r, ab) for s, t in zip(shapes, secs)]
    detail = {"gemm_shapes": [list(s) for s in shapes], "gemm_seconds": secs,
              "gemm_fit_rel_error_max": max(abs(e) for e in fitted)}
    log(f"  threads {threads}: GEMM P {P:.3f} TFLOP/s, W {W:.1f} GB/s beyond {C:.1f} MB, t0 {t0:.1f} us "
        f"(fit within {100 * detail['gemm_fit_rel_error_max']:.0f}%), attention {r.attn_tflops:.3f} TFLOP/s, "
        f"memory {mem:.1f} GB/s, casts {cast:.1f} GB/s, op {overhead:.1f} us, optimizer {optim:.2f} ns/param; ns per element: "
        + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    return r, detail


def cast_gbps(device: torch.device, n: int, budget_s: float = 0.05) -> float:
    """Streaming rate of the two dtype-converting kernels a bf16 step runs most (torch's
    unrolled TensorIterator loop, no vector loads): a bf16 -> fp32 copy (6 bytes per element:
    the loss's casts, the master gradients of a step's first micro-batch) and an fp32 += bf16
    add (10 bytes: the later micro-batches), the bytes of both over the time of both."""
    x = torch.randn(n, device=device).to(torch.bfloat16)
    y = torch.zeros(n, device=device)
    t = time_call(lambda: y.copy_(x), device, budget_s) + time_call(lambda: y.add_(x), device, budget_s)
    return 16 * n / t / 1e9


def gemm_seconds_rel(shape, measured: float, r: Rates, ab: int) -> float:
    from mtnlg.plan.cost import gemm_seconds
    return gemm_seconds(*shape, r, ab) / measured - 1


def optimizer_ns_per_param(device: torch.device, precision: str, budget_s: float) -> float:
    """The trainer's per-step optimizer path (its AdamW kernel choice, clipping, master copy)
    per parameter, in model-like tensors.  On the CPU at 2M parameters; on a GPU the slope
    between 2M and 64M, since at 2M a GPU step is kernel launches, not bandwidth (0.21 ns per
    parameter measured on an H100 at 2M: 0.28 s per step predicted for 1.3B parameters)."""
    from mtnlg.train.precision import MasterWeights, param_dtype
    from mtnlg.train.trainer import adamw_implementation

    def per_step(scale: int) -> tuple[int, float]:
        shapes = [(1024 * scale, 512)] * 3 + [(512 * scale,)] * 8 + [(256 * scale, 1024)] * 2
        params = [torch.nn.Parameter(torch.randn(s, device=device).to(param_dtype(precision))) for s in shapes]
        master = MasterWeights(params) if precision == "bf16" else None
        opt_params = master.params if master else params
        for p in opt_params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(opt_params, lr=1e-4, weight_decay=0.1, **adamw_implementation(opt_params))

        def step():
            torch.nn.utils.clip_grad_norm_(opt_params, 1.0)
            opt.step()
            if master:
                master.master_to_model()
        return sum(p.numel() for p in opt_params), time_call(step, device, budget_s)
    n1, t1 = per_step(1)
    if device.type != "cuda":
        return t1 / n1 * 1e9
    n2, t2 = per_step(32)
    return max(t2 - t1, 0.0) / (n2 - n1) * 1e9


def _gloo_worker(rank: int, world: int, port: int, queue, cfgs=(), micro_batch: int = 1,
                 budget_s: float = 0.05) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = []
    for nbytes in (1 << 12, 1 << 16, 1 << 20, 1 << 23):
        t = torch.zeros(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(t)
        best = float("inf")
        for _ in range(10):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            best = min(best, time.perf_counter() - t0)
        out.append((nbytes, best))
    kinds = {}
    if cfgs:
        from mtnlg.plan.calibrate_ops import distributed_kinds
        kinds = distributed_kinds(list(cfgs), micro_batch, budget_s)
    if rank == 0:
        queue.put((out, kinds))
    dist.destroy_process_group()


def measure_link(world: int = 2, cfgs=(), micro_batch: int = 1, budget_s: float = 0.05) -> tuple[float, float, dict]:
    """(bus GB/s, latency us per ring step) of a gloo all-reduce on this machine, and
    (given configs) the two-process kinds of ``calibrate_ops.distributed_kinds``."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_gloo_worker, args=(world, port, q, tuple(cfgs), micro_batch, budget_s), nprocs=world,
                       start_method="spawn")
    rows, kinds = q.get()
    # t = 2(n-1)/n · bytes / bw + 2(n-1) · lat
    A = np.array([[2 * (world - 1) / world * b, 2 * (world - 1)] for b, _ in rows])
    t = np.array([s for _, s in rows])
    (inv_bw, lat), *_ = np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)
    return 1.0 / max(inv_bw, 1e-15) / 1e9, max(lat, 0.0) * 1e6, kinds


_BASELINE = """
import sys
import tempfile
from pathlib import Path
import numpy as np
import torch
import mtnlg.data.samples, mtnlg.parallel.setup, mtnlg.train.dcp, mtnlg.train.run  # what `mtnlg train` loads
from mtnlg.config import load_config
from mtnlg.model.gpt import build_model
from mtnlg.train.trainer import Trainer
if len(sys.argv) > 1:  # with the compiled regions a large model's trainer compiles at start
    from mtnlg.model import bias_gelu, regions
    bias_gelu.warm_up("tanh", regions.MIN_ELEMS)
cfg = load_config(None, ["model.n_layers=1", "model.hidden=64", "model.n_heads=2", "model.seq_len=32",
                         "model.vocab_size=256", "train.micro_batch=2", "train.global_batch=4", "train.precision=bf16"])
model = build_model(cfg.model, torch.device("cpu"), seed=0).to(torch.bfloat16)
class Rows:
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return (np.arange(33) + i) % 256
with tempfile.TemporaryDirectory() as d:
    trainer = Trainer(cfg, model, Rows(), Rows(), Path(d), torch.device("cpu"))
    for _ in range(2):
        trainer.train_step()
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def baseline_rss_gb(regions: bool = False) -> float:
    """Resident memory of the training runtime itself: the peak (VmHWM) of a fresh process
    that imported what `mtnlg train` loads and ran two steps of a negligible model (1 layer,
    width 64, 50 k parameters): torch, the libraries, thread pools, the autograd engine and
    kernel caches.  (VmHWM is the process's own peak: ru_maxrss would carry over the peak
    of the forked calibrating parent across exec.)  ``regions``: the same process after the
    trainer's start-up compile of the bias + GeLU region (``mtnlg.model.bias_gelu.warm_up``)."""
    out = subprocess.run([sys.executable, "-c", _BASELINE] + (["regions"] if regions else []), capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1]) * 1024 / 1e9


def region_rss_gb(base: float) -> float:
    """What the compiled region's start-up compile adds to a training process's resident
    memory (Inductor and its generated code; a config whose MLP activation reaches
    ``regions.MIN_ELEMS`` pays it): the baseline process with it less ``base``; 0 where
    compiling is off or fails."""
    from mtnlg.model import regions
    if not regions.enabled():
        return 0.0
    try:
        return max(0.0, baseline_rss_gb(regions=True) - base)
    except subprocess.CalledProcessError:
        return 0.0


def _heap_slack(cfgs, micro_batch: int) -> float:
    from mtnlg.plan.calibrate_heap import heap_slack_bytes
    return heap_slack_bytes(list(cfgs), micro_batch) if cfgs else 0.0


def _ticks() -> tuple[float, float]:
    """(CPU seconds every process used, CPU seconds this process and its reaped children used)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0, 0.0
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def others_share(fn):
    """(fn(), the share of the machine's CPU time other processes used while it ran): a
    timing taken while other jobs ran is not this machine's rate."""
    a0, s0 = _ticks()
    w0 = time.perf_counter()
    out = fn()
    a1, s1 = _ticks()
    wall = time.perf_counter() - w0
    cores = os.cpu_count() or 1
    return out, max(0.0, (a1 - a0) - (s1 - s0)) / max(wall * cores, 1e-9)


def wait_quiet(max_wait_s: float = 60.0, share: float = 0.1, log=print) -> float:
    """Wait (at most max_wait_s) until other processes use under ``share`` of the CPUs."""
    t0 = time.perf_counter()
    while True:
        _, busy = others_share(lambda: time.sleep(0.5))
        if busy < share or time.perf_counter() - t0 > max_wait_s:
            if busy >= share:
                log(f"  (other processes still use {100 * busy:.0f}% of the CPUs; measuring anyway)")
            return busy


def calibrate(cfgs: list[ModelConfig], micro_batch: int, device: torch.device, precision: str = "bf16",
              budget_s: float = 0.05, link: bool = True, log=print) -> DeviceProfile:
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            pass
        threads = sorted({1, cores})
    else:
        threads = [1]
    if device.type == "cpu":  # time the kernels under the allocator settings the trainer runs with
        from mtnlg.plan.calibrate_ops import step_allocator
        step_allocator()
    old = torch.get_num_threads()
    rates, details = {}, {}
    try:
        for t in threads:  # on a shared machine: wait for quiet, retry a contended pass, keep the cleanest
            best = None
            for attempt in range(3 if device.type == "cpu" else 1):
                if device.type == "cpu":
                    wait_quiet(log=log)
                got, busy = others_share(lambda: measure_rates(cfgs, micro_batch, t, device, precision, budget_s,
                                                               log))
                got[1]["others_cpu_share"] = busy
                if best is None or busy < best[1]:
                    best = (got, busy)
                if busy < 0.1:
                    break
                log(f"  other processes used {100 * busy:.0f}% of the CPUs during that pass: measuring again")
            (rates[t], details[str(t)]), _ = best
    finally:
        torch.set_num_threads(old)
    if link and device.type == "cpu":
        wait_quiet(log=log)
    bw, lat, kinds = measure_link(2, cfgs, micro_batch, budget_s) if link and device.type == "cpu" else (0.0, 0.0, {})
    if link and device.type == "cpu":
        log(f"  gloo all-reduce: {bw:.2f} GB/s, {lat:.0f} us per ring step; two ranks: " +
            ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()) + " ns")
        t = max(1, cores // 2)  # the rates a rank of a 2-process run uses (rates_for(2))
        if t in rates:
            rates[t] = replace(rates[t], kind_ns={**rates[t].kind_ns, **kinds})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    base = baseline_rss_gb() if device.type == "cpu" else 0.0
    return DeviceProfile(name=name, source=f"measured {when} on {socket.gethostname()} ({device.type}, {precision})",
                         rates=rates, link_gbps=bw, link_latency_us=lat, baseline_rss_gb=base,
                         region_rss_gb=region_rss_gb(base) if device.type == "cpu" else 0.0,
                         heap_slack_bytes=_heap_slack(cfgs, micro_batch) if device.type == "cpu" else 0.0,
                         cores=cores, extra={"precision": precision, "details": details})
