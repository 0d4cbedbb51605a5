"""Training metrics: tokens/s, TFLOP/s, MFU; metrics.jsonl, console/progress
bar and TensorBoard sinks.

TFLOP/s counts *model* FLOPs (``flops_per_token`` without recomputation, the
PaLM definition of MFU), so turning on activation checkpointing lowers the
reported figure instead of inflating it.  MFU divides by the configured peak
(``logging.peak_tflops``) or, when that is 0, a known figure for the GPU or,
on CPU, the best matmul rate measured on this machine (``peak_tflops``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from mtnlg.errors import UserError
from mtnlg.io import write_atomic

# dense bf16 datasheet peaks; more specific names first (H100 PCIe/NVL are lower than SXM)
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0, "H100": 989.0, "H200": 989.0,
                   "B200": 2250.0, "L40S": 362.0, "A10": 125.0}


def measure_matmul_tflops(shapes: list[tuple[int, int, int]] | None = None, dtype=torch.bfloat16,
                          device: str | torch.device = "cpu", seconds: float = 0.3) -> float:
    """Achieved TFLOP/s of ``torch.matmul`` over the given (m, k, n) shapes."""
    shapes = shapes or [(1024, 1024, 1024)]
    flops, elapsed = 0.0, 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - t0 > seconds / len(shapes):
                break
        elapsed += time.perf_counter() - t0
        flops += 2.0 * m * k * n * reps
    return flops / elapsed / 1e12


def default_peak_tflops(device: torch.device, precision: str) -> float:
    return peak_tflops(device, precision)[0]


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> tuple[float, str]:
    """The per-device peak MFU divides by, and where it comes from (shown next to MFU).

    GPUs: the datasheet dense bf16 figure.  CPUs: the best matmul rate ever
    measured on this machine (CPU model, torch version, threads, dtype), kept in
    ``~/.cache/mtnlg/peak_tflops.json``: each run measures briefly and keeps the
    maximum, so a measurement taken while the machine was busy cannot inflate
    MFU for long.  ``logging.peak_tflops`` overrides both."""
    if configured > 0:
        return configured, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{key} datasheet bf16"
        return 0.0, f"unknown GPU {name!r}: set logging.peak_tflops for MFU"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    key = f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {dtype}"
    path = peak_cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    rounds = 2 if key in cache else 5  # first time on this machine: measure longer
    measured = max(measure_matmul_tflops([(1024, 1024, 1024)], dtype=dtype, seconds=0.2) for _ in range(rounds))
    best = max(measured, float(cache.get(key, 0.0)))
    if best > cache.get(key, 0.0):
        cache[key] = best
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only home only loses the cache
    return best, f"best {str(dtype).removeprefix('torch.')} matmul measured on this CPU, cached in {path}"


def peak_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtnlg" / "peak_tflops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def precision_warning(device: torch.device, precision: str) -> str | None:
    if device.type == "cpu" and precision == "fp16":
        return ("warning: train.precision=fp16 on CPU runs ~50x slower than bf16 (CPUs have no fast fp16 "
                "matmul); use train.precision=bf16 or bf16-autocast")
    return None


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and shows
    progress on the console; only the rank that owns it (rank 0) writes."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress_bar: str = "auto", tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.tb = None
        self.warned_mfu = False
        if not enabled:
            return
        if self.path.exists():  # a new run (start_step 0) drops a killed attempt's lines too
            self._truncate_after(start_step)
        use_bar = progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs the tensorboard package: pip install 'mtnlg[tensorboard]'") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step)

    def _truncate_after(self, step: int) -> None:
        """Make the file the history of the run as resumed: drop the lines after
        the resumed step (all of them for a new run), lines cut short by a crash,
        and earlier copies of a step (the newest attempt's line wins); the file
        is replaced atomically."""
        kept: dict[int, str] = {}
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                at = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if at <= step:
                kept.pop(at, None)
                kept[at] = line
        write_atomic(self.path, "".join(kept[s] + "\n" for s in sorted(kept)))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        if record.get("mfu", 0) > 1 and not self.warned_mfu:
            self.warned_mfu = True
            print(f"warning: MFU above 100% means the peak ({record.get('peak_tflops', 0):.3g} TFLOP/s) is too "
                  f"low, e.g. measured while the machine was busy; set logging.peak_tflops "
                  f"(cached CPU peaks: {peak_cache_path()})", file=sys.stderr, flush=True)
        line = format_record(record)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.3f}", refresh=False)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def format_record(r: dict) -> str:
    parts = [f"step {r['step']}"]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if r.get("val_loss") is not None:
        parts.append(f"val_loss {r['val_loss']:.4f}")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if "tflops" in r:
        parts.append(f"{r['tflops']:.3f} TFLOP/s")
    if "mfu" in r:
        peak = f" of {r['peak_tflops']:.3g}" if "peak_tflops" in r else ""
        parts.append(f"mfu {100 * r['mfu']:.1f}%{peak}")
    return " | ".join(parts)
