"""Does the planner predict our own runs?  Predicted vs measured step time and
per-rank peak memory of real `mtnlg train` runs on this machine.

For each config (tiny, 14m) and layout (1 process, tp=2, dp=2 on gloo) it
runs the real CLI (`python -m mtnlg train`, or `torchrun` for 2 ranks) on the
shipped corpus for a few steps, takes the median step time of the steps after
warm-up from metrics.jsonl and the peak resident memory of the largest rank
(VmHWM from /proc when the next-to-last step is logged), ``--repeats`` times (the
fastest run's step time, as calibration keeps each kernel's best timing, and the
median peak), and prints both next to the cost
model's prediction from a device profile calibrated on this machine
(`mtnlg plan --calibrate`, run here first unless --profile is given).

    python benchmarks/plan_vs_measured.py [--configs tiny,14m] [--layouts 1,tp2,dp2] [--steps 8]
                                          [--profile FILE] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mtnlg.config import load_config  # noqa: E402
from mtnlg.plan.cost import DeviceProfile, predict_step  # noqa: E402
from mtnlg.plan.local_memory import predict_memory  # noqa: E402

CONFIGS = {
    "tiny": ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256",
             "train.micro_batch=8", "train.global_batch=16"],
    "14m": ["model.n_layers=6", "model.hidden=384", "model.n_heads=6", "model.seq_len=256",
            "train.micro_batch=8", "train.global_batch=16"],
}
LAYOUTS = {"1": (1, 1), "tp2": (2, 1), "dp2": (1, 2)}


def _rss_tree(root_pid: int) -> dict[int, int]:
    """Peak resident bytes so far (VmHWM) of every process under root_pid (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/status") as f:  # kernel threads have no VmHWM
                rss[int(d)] = int(next((line for line in f if line.startswith("VmHWM")), "VmHWM: 0 kB").split()[1]) * 1024
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = {}, [root_pid]
    while todo:
        p = todo.pop()
        if p in rss:
            out[p] = rss[p]
        todo += children.get(p, [])
    return out


def run_measured(name: str, tp: int, dp: int, steps: int, data: str, tok: str, workdir: Path) -> dict:
    run = workdir / f"{name}-tp{tp}-dp{dp}"
    shutil.rmtree(run, ignore_errors=True)  # a retry starts afresh (no resume, no old metrics)
    sets = CONFIGS[name] + [f"model.vocab_size=8192", f"train.steps={steps}", "train.eval_interval=0",
                            f"train.save_interval={steps}", "logging.log_interval=1", "logging.progress_bar=\"never\"",
                            f'data.blend=[[1.0, "{data}"]]', f'data.tokenizer="{tok}"',
                            f"parallel.tp={tp}", "train.precision=bf16"]
    args = ["--config", str(ROOT / "configs/tiny.toml"), "--run-dir", str(run)]
    for s in sets:
        args += ["--set", s]
    world = tp * dp
    if world == 1:
        cmd = [sys.executable, "-m", "mtnlg", "train"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "mtnlg", "train"] + args
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak: dict[int, int] = {}
    metrics = run / "metrics.jsonl"
    done = threading.Event()

    def sample():  # VmHWM holds each process's peak: read it seldom (not to take CPU from the run), and
        # last when the second-to-last step is logged (every step peaks alike; the last one is followed
        # by the final checkpoint write)
        last = 0.0
        while not done.is_set():
            final = metrics.exists() and any(json.loads(l).get("step") == steps - 1
                                             for l in metrics.read_text().splitlines() if l.strip())
            if final or time.monotonic() - last > 1.0:
                for pid, b in _rss_tree(proc.pid).items():
                    peak[pid] = max(peak.get(pid, 0), b)
                last = time.monotonic()
            if final:
                break
            time.sleep(0.2)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    times = [r["global_batch"] * 256 / r["tokens_per_s"] for r in recs if r["step"] > 2]
    # the largest process is a training rank (torchrun's own agent is far smaller)
    return {"step_s": statistics.median(times), "peak_rss_gb": max(peak.values()) / 1e9 if peak else float("nan")}


def measure_quiet(run, tries: int = 3, share: float = 0.1) -> dict:
    """A measured run on a shared machine: wait for quiet, run, and run again (up to ``tries``)
    while other processes took more than ``share`` of the CPUs; the least contended run counts."""
    from mtnlg.plan.calibrate import others_share, wait_quiet
    best = None
    for _ in range(tries):
        wait_quiet()
        got, busy = others_share(run)
        got["others_cpu_share"] = busy
        if best is None or busy < best["others_cpu_share"]:
            best = got
        if busy < share:
            break
        print(f"  (other processes used {100 * busy:.0f}% of the CPUs during that run: measuring again)", flush=True)
    return best


def ensure_data(workdir: Path) -> tuple[str, str]:
    prefix = ROOT / "runs/data/sotu"
    if (Path(str(prefix) + ".bin")).exists():
        return str(prefix), str(prefix) + ".tokenizer.json"
    prefix = workdir / "sotu"
    subprocess.run([sys.executable, "-m", "mtnlg", "preprocess", "--input", str(ROOT / "data/sotu/sotu.jsonl.gz"),
                    "--output", str(prefix), "--train-tokenizer", "--vocab-size", "8192", "--dedup", "exact",
                    "--quiet"], check=True, cwd=ROOT)
    return str(prefix), str(prefix) + ".tokenizer.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,14m")
    p.add_argument("--layouts", default="1,tp2,dp2", help="comma list of: " + ", ".join(LAYOUTS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2,
                   help="measured runs per row: the fastest run's step time and the median peak memory count "
                        "(the same run of `mtnlg train` moved by up to 30 %% between runs here)")
    p.add_argument("--profile", help="device profile JSON (default: calibrate now)")
    p.add_argument("--save-profile", help="write the profile calibrated now here (to reuse with --profile)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--data", help="dataset PREFIX tokenized with PREFIX.tokenizer.json (default: runs/data/sotu "
                                  "or a fresh tokenization of the shipped corpus)")
    args = p.parse_args()
    args.layouts = [x for x in args.layouts.split(",") if x]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.profile:
            prof = DeviceProfile.load(args.profile)
        else:
            from mtnlg.plan.calibrate import calibrate
            import torch
            cfgs = [load_config(None, CONFIGS[c] + ["model.vocab_size=8192"]).model for c in args.configs.split(",")]
            print("calibrating this machine (mtnlg plan --calibrate) ...", flush=True)
            prof = calibrate(cfgs, 8, torch.device("cpu"))
            if args.save_profile:
                Path(args.save_profile).write_text(prof.to_json())
        data, tok = (args.data, args.data + ".tokenizer.json") if args.data else ensure_data(work)
        rows = []
        head = (f"{'config':<6} {'layout':<6} {'step s (pred)':>13} {'step s (meas)':>13} {'ratio':>6} "
                f"{'RSS GB (pred)':>13} {'RSS GB (meas)':>13} {'ratio':>6} {'others':>6}")
        print(head)
        print("-" * len(head), flush=True)
        for name in args.configs.split(","):
            cfg = load_config(None, CONFIGS[name] + ["model.vocab_size=8192"])
            for lay in args.layouts:
                tp, dp = LAYOUTS[lay]
                pred = predict_step(cfg.model, prof, micro_batch=cfg.train.micro_batch,
                                    global_batch=cfg.train.global_batch, tp=tp, dp=dp, precision="bf16")
                mem = predict_memory(cfg.model, prof, micro_batch=cfg.train.micro_batch, tp=tp, dp=dp,
                                     precision="bf16", global_batch=cfg.train.global_batch,
                                     compiled_regions=cfg.train.compiled_regions)
                runs = [measure_quiet(lambda: run_measured(name, tp, dp, args.steps, data, tok, work))
                        for _ in range(args.repeats)]
                # the fastest run's step (as calibration keeps each kernel's best timing: this
                # shared machine's undisturbed speed) and the median run's peak memory
                meas = {"step_s": min(r["step_s"] for r in runs),
                        "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
                        "others_cpu_share": max(r["others_cpu_share"] for r in runs)}
                row = {"config": name, "layout": lay, "pred_step_s": pred["seconds"], "meas_step_s": meas["step_s"],
                       "pred_rss_gb": mem["bytes"] / 1e9, "meas_rss_gb": meas["peak_rss_gb"],
                       "others_cpu_share": meas["others_cpu_share"],
                       "pred_breakdown_s": pred["breakdown_s"]}
                rows.append(row)
                print(f"{name:<6} {lay:<6} {row['pred_step_s']:>13.3f} {row['meas_step_s']:>13.3f} "
                      f"{row['pred_step_s'] / row['meas_step_s']:>6.2f} {row['pred_rss_gb']:>13.3f} "
                      f"{row['meas_rss_gb']:>13.3f} {row['pred_rss_gb'] / row['meas_rss_gb']:>6.2f} "
                      f"{100 * row['others_cpu_share']:>5.0f}%", flush=True)
        print(f"\nprofile: {prof.name}, {prof.source}; ratio = predicted / measured; others = share of the "
              f"CPUs other processes used during the measured runs (the most of the {args.repeats} runs, each the least of up "
              f"to 3 tries); measured = the fastest of {args.repeats} runs' median steps, their median peak")
        if args.json:
            Path(args.json).write_text(json.dumps({"profile": json.loads(prof.to_json()), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
