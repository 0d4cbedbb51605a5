"""Scale drill: a 760M-parameter GPT (configs/gpt-760m.toml) trained as 8 gloo
processes on one CPU machine, with every rank building only its own shards.

    make scale-drill                       # = python benchmarks/scale_drill.py
    python benchmarks/scale_drill.py --layers 4 --out runs/scale-drill-small   # a quick functional run

1. `mtnlg plan --json` predicts each rank's memory for the training layout
   (dp2 x pp2 x tp2, ZeRO-3) and for the resume layout (dp4 x tp2, ZeRO-3).
2. `torchrun --nproc-per-node 8 -m mtnlg train` runs the first steps and saves a
   sharded checkpoint; the drill samples every rank's peak resident memory
   (VmHWM in /proc/PID/status) while it runs.
3. The run resumes under the other layout (pp 2 -> 1, dp 2 -> 4) and trains on.
4. Prints a table (markdown) of peak RSS per rank next to the plan's prediction
   and the loss per step across the resume; writes OUT/drill.json.

The drill refuses to start when the machine lacks the memory it predicts
(MemAvailable), rather than letting the kernel kill processes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
LAYOUTS = {"train": {"parallel.tp": 2, "parallel.pp": 2, "parallel.dp": 0, "parallel.zero": 3},
           "resume": {"parallel.tp": 2, "parallel.pp": 1, "parallel.dp": 0, "parallel.zero": 3}}
RUNTIME_GB = 0.35  # python + torch + mtnlg imported: VmHWM 0.30 GB on this machine, + gloo buffers
RSS_OVER_PLAN = 1.0  # 24 layers, bf16: measured peaks 0.86-0.97 x (plan + runtime); the plan now holds FSDP buffers


def overrides(args, layout: dict, steps: int) -> list[str]:
    data = args.data
    kv = {"model.n_layers": args.layers, "model.seq_len": args.seq_len, "model.vocab_size": args.vocab_size, "train.steps": steps, "train.global_batch": args.global_batch,
          "train.micro_batch": 1, "train.precision": args.precision, "train.eval_interval": 0,
          "train.eval_batches": 2, "train.save_interval": 0, "train.threads": 1,
          "optim.warmup_steps": 1, "optim.lr": 3e-4, "optim.min_lr": 3e-5,
          "data.blend": f'[[1.0, "{data}"]]', "data.tokenizer": f'"{data}.tokenizer.json"',
          "logging.log_interval": 1, "logging.progress_bar": "never", "logging.peak_tflops": 1.0, **layout}
    return [f"{k}={v}" for k, v in kv.items()]


def plan(args, layout: dict) -> list[dict]:
    """`mtnlg plan`'s per-rank memory prediction for one layout (one entry per stage kind)."""
    cmd = [PY, "-m", "mtnlg", "plan", "--config", str(args.config), "--gpus", "8", "--gpus-per-node", "8",
           "--tp", str(layout["parallel.tp"]), "--pp", str(layout["parallel.pp"]),
           "--zero", str(layout["parallel.zero"]), "--micro-batch", "1", "--global-batch", str(args.global_batch),
           "--precision", args.precision, "--recompute", "none", "--json",
           "--set", f"model.n_layers={args.layers}", "--set", f"model.seq_len={args.seq_len}",
           "--set", f"model.vocab_size={args.vocab_size}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if out.returncode:
        raise SystemExit(f"mtnlg plan failed: {out.stdout[-500:]}{out.stderr[-1500:]}")
    p = json.loads(out.stdout)
    return [{"stage": s["kind"], "params": s["params"], "memory_gb": s["memory_gb"],
             "total_gb": s["memory_total_gb"]} for s in p["stages"]]


# glibc's malloc otherwise raises its mmap threshold as large blocks are freed and then keeps the
# freed gathered weights and gradient buffers in its heap: 0.25-0.6 GB per rank more resident memory
# in this drill (docs/scale.md). 1 MB makes every larger block an mmap that is returned when freed.
MMAP_THRESHOLD = str(1 << 20)


def _env() -> dict:
    return {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, **os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    return out + [g for k in out for g in _children(k)]


def _status(pid: int) -> tuple[int | None, float | None]:
    """(RANK, peak RSS in GB) of a worker, or Nones."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
        return rank, int(hwm.split()[1]) / 2**20
    except (OSError, StopIteration, ValueError):
        return None, None


def launch(args, run_dir: Path, layout: dict, steps: int, stop_after: int | None, log: Path,
           peaks: dict[int, float]) -> dict[int, float]:
    """Run torchrun with 8 ranks; ``peaks`` collects each rank's peak RSS (GB), also on failure."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", "-m", "mtnlg", "train",
           "--run-dir", str(run_dir), "--config", str(args.config)]
    for o in overrides(args, layout, steps):
        cmd += ["--set", o]
    if stop_after:
        cmd += ["--stop-after", str(stop_after)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())

        def sample():
            while proc.poll() is None:
                for pid in _children(proc.pid):
                    rank, gb = _status(pid)
                    if rank is not None and gb is not None:
                        peaks[rank] = max(peaks.get(rank, 0.0), gb)
                time.sleep(0.2)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        t.join()
    if rc:
        raise SystemExit(f"torchrun exited with {rc}; see {log}:\n" + log.read_text()[-3000:])
    return peaks


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _ranks_gb(stages: list[dict], pp: int) -> float:
    """Predicted resident memory of all 8 ranks: each stage kind's ranks times its total plus runtime."""
    kinds = {s["stage"]: s["total_gb"] + RUNTIME_GB for s in stages}
    per_stage = [kinds["only"]] if pp == 1 else [kinds["first"]] + [kinds.get("middle", 0)] * (pp - 2) + [kinds["last"]]
    return sum(per_stage) * 8 / pp


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=ROOT / "configs" / "gpt-760m.toml")
    ap.add_argument("--data", default="runs/data/sotu", help="dataset prefix made by `make data`")
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (24 = GPT-3 Large)")
    ap.add_argument("--seq-len", type=int, default=64, help="sequence length (GPT-3 used 2048; short so steps fit 2 cores)")
    ap.add_argument("--vocab-size", type=int, default=50257,
                    help="model vocabulary (GPT-2's 50257; the shipped corpus's tokenizer needs >= 8192)")
    ap.add_argument("--global-batch", type=int, default=4,
                    help="sequences per step: dp2 x 2 micro-batches of 1 (1F1B over 2 stages); dp4 x 1 on resume")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                    help="bf16: fp32 ZeRO-3 shards, bf16 gathered weights and compute (the preset's precision)")
    ap.add_argument("--steps-before", type=int, default=2, help="steps before the checkpoint")
    ap.add_argument("--steps-after", type=int, default=2, help="steps after resuming under the other layout")
    ap.add_argument("--out", default="runs/scale-drill")
    ap.add_argument("--force", action="store_true", help="start even if MemAvailable is below the prediction")
    ap.add_argument("--reference", action="store_true",
                    help="also train all steps uninterrupted in the first layout, for the loss comparison")
    args = ap.parse_args()
    out = ROOT / args.out
    if not (ROOT / f"{args.data}.bin").exists():
        raise SystemExit(f"dataset {args.data} not found: run `make data` first")
    predicted = {name: plan(args, lay) for name, lay in LAYOUTS.items()}
    need = RSS_OVER_PLAN * max(_ranks_gb(predicted[n], LAYOUTS[n]["parallel.pp"]) for n in predicted)
    avail = mem_available_gb()
    print(f"plan: {json.dumps(predicted)}\nneed ~{need:.1f} GB for 8 ranks, MemAvailable {avail:.1f} GB", flush=True)
    if need > avail and not args.force:
        raise SystemExit(f"not enough free memory ({avail:.1f} GB < ~{need:.1f} GB predicted); retry later or --force")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run_dir = out / "run"
    total = args.steps_before + args.steps_after
    result = {"steps_before": args.steps_before, "layers": args.layers, "seq_len": args.seq_len,
              "vocab_size": args.vocab_size, "precision": args.precision, "global_batch": args.global_batch,
              "plan": predicted, "peak_rss_gb": {}, "seconds": {}, "losses": [], "reference_losses": None}

    def record(phase: str, peaks: dict, seconds: float, error: str | None = None) -> None:
        result["peak_rss_gb"][phase], result["seconds"][phase] = peaks, seconds
        if error:
            result.setdefault("errors", {})[phase] = error
        if (run_dir / "metrics.jsonl").exists():
            result["records"] = _metrics(run_dir)
            result["losses"] = [(m["step"], m["loss"]) for m in result["records"]]
        (out / "drill.json").write_text(json.dumps(result, indent=1))  # partial results survive a failure

    for phase, steps, stop in (("train", total, args.steps_before), ("resume", total, None)):
        t0, peaks = time.time(), {}
        try:
            launch(args, run_dir, LAYOUTS[phase], steps, stop, out / f"{phase}.log", peaks)
        except SystemExit as e:
            record(phase, peaks, time.time() - t0, str(e).splitlines()[0])
            print(table(result))
            raise
        record(phase, peaks, time.time() - t0)
    if args.reference:
        launch(args, out / "reference", LAYOUTS["train"], total, None, out / "reference.log", {})
        result["reference_losses"] = [(m["step"], m["loss"]) for m in _metrics(out / "reference")]
        (out / "drill.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(r: dict) -> str:
    lines = ["| phase | layout | rank | stage | peak RSS (GB) | plan: model state + activations (GB) | plan + runtime (GB) |",
             "|---|---|---|---|---|---|---|"]
    for phase, lay in LAYOUTS.items():
        tp, pp = lay["parallel.tp"], lay["parallel.pp"]
        kinds = {s["stage"]: s for s in r["plan"][phase]}
        name = f"dp{8 // (tp * pp)} x pp{pp} x tp{tp}, zero {lay['parallel.zero']}"
        for rank, gb in sorted(r["peak_rss_gb"].get(phase, {}).items(), key=lambda kv: int(kv[0])):
            stage = (int(rank) // tp) % pp
            kind = "only" if pp == 1 else ("first" if stage == 0 else "last" if stage == pp - 1 else "middle")
            s = kinds[kind]
            lines.append(f"| {phase} | {name} | {rank} | {kind} | {gb:.2f} | {s['total_gb']:.2f} | "
                         f"{s['total_gb'] + RUNTIME_GB:.2f} |")
    lines.append("")
    ref = dict(r.get("reference_losses") or [])
    lines.append("| step | layout | loss | uninterrupted run |")
    lines.append("|---|---|---|---|")
    for s, loss in r["losses"]:
        phase = "first layout" if s <= r["steps_before"] else "resumed"
        lines.append(f"| {s} | {phase} | {loss:.4f} | {ref[s]:.4f} |" if s in ref else f"| {s} | {phase} | {loss:.4f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
