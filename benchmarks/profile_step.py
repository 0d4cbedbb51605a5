"""Where a training step's time goes: torch.profiler's self time per class of
operation (GEMMs, attention, norms/elementwise, softmax/loss, optimizer,
communication, data, other, idle), for one process on this machine, next to
the cost model's prediction from a device profile when one is given.

    python benchmarks/profile_step.py [--config tiny|14m] [--precision bf16] [--steps 3]
                                      [--trace trace.json] [--device-profile ~/.cache/mtnlg/device-profile.json]

With --predict-only it runs nothing and prints the prediction alone, per class (no GPU, no torch
model needed: e.g. what a GPU profile predicts for gpt-1.3b, to set beside a table measured there):

    python benchmarks/profile_step.py --predict-only --config gpt-1.3b --device-profile docs/gpu/profile-h200-141gb-calibrated.json

The trace opens in chrome://tracing or https://ui.perfetto.dev (a file you load, nothing is uploaded).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS, RandomTokens  # noqa: E402

from mtnlg.config import load_config  # noqa: E402
from mtnlg.model.gpt import build_model  # noqa: E402
from mtnlg.perf.breakdown import format_table, profile_steps  # noqa: E402
from mtnlg.train.precision import param_dtype  # noqa: E402
from mtnlg.train.trainer import Trainer  # noqa: E402

# cost-model category -> profiler class
CLASS_OF = {"gemm": "gemm", "attention": "attention", "elementwise": "norm/elementwise", "loss": "softmax/loss",
            "optimizer": "optimizer", "communication": "communication", "framework": "other"}


def predicted_classes(cfg, profile_path: str, precision: str) -> dict[str, float]:
    """The cost model's seconds per step of this run, by profiler class."""
    from mtnlg.plan.cost import DeviceProfile, predict_step
    prof = DeviceProfile.load(profile_path)
    step = predict_step(cfg.model, prof, micro_batch=cfg.train.micro_batch, global_batch=cfg.train.global_batch,
                        precision="fp32" if precision == "fp32" else "bf16", ranks_per_device=1)
    return {CLASS_OF[k]: v for k, v in step["breakdown_s"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16-autocast", "bf16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--trace", help="write a Chrome/Perfetto trace here")
    p.add_argument("--device-profile", help="device profile JSON (mtnlg plan --calibrate) for predicted times")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--predict-only", action="store_true", help="print the cost model's prediction alone (needs "
                   "--device-profile; runs no step)")
    args = p.parse_args()
    if args.predict_only:
        if not args.device_profile:
            raise SystemExit("--predict-only needs --device-profile")
        cfg = load_config(None, CONFIGS[args.config] + [f"train.precision={args.precision}"])
        predicted = predicted_classes(cfg, args.device_profile, args.precision)
        print(f"{args.config}, {args.precision}, micro-batch {cfg.train.micro_batch}, global batch "
              f"{cfg.train.global_batch}: predicted by {args.device_profile}")
        print(f"{'class':<18} {'predicted ms':>13}")
        for c, v in predicted.items():
            print(f"{c:<18} {1e3 * v:>13.1f}")
        print(f"{'step':<18} {1e3 * sum(predicted.values()):>13.1f}")
        return
    device = torch.device(args.device)
    cfg = load_config(None, CONFIGS[args.config] + [f"train.precision={args.precision}", "optim.warmup_steps=1",
                                                    f"train.steps={args.steps + 2}", "train.eval_interval=0"])
    model = build_model(cfg.model, device, seed=0).to(param_dtype(args.precision))
    data = RandomTokens(cfg.train.global_batch * (args.steps + 2), cfg.model.seq_len, cfg.model.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, model, data, data, Path(d), device)
        result = profile_steps(trainer, args.steps, warmup=1, trace=args.trace)
    predicted = predicted_classes(cfg, args.device_profile, args.precision) if args.device_profile else None
    print(f"{args.config} ({sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params), {args.precision}, "
          f"{device}, {torch.get_num_threads()} threads, {args.steps} profiled steps")
    print(format_table(result, predicted))
    if args.trace:
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
