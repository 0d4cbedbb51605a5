"""``mtnlg plan --calibrate`` and ``mtnlg plan --local``: this machine's device
profile, and the cost model's prediction of a `mtnlg train` run on it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtnlg.errors import UserError
from mtnlg.io import write_atomic
from mtnlg.plan.cost import CATEGORIES, DeviceProfile, predict_step
from mtnlg.plan.local_memory import predict_memory

DEFAULT_PROFILE = Path.home() / ".cache" / "mtnlg" / "device-profile.json"


def run_local(args: argparse.Namespace) -> int:
    import torch

    from mtnlg.config import load_config
    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else DEFAULT_PROFILE
    precision = args.precision or cfg.train.precision
    if args.calibrate:
        from mtnlg.plan.calibrate import calibrate
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"calibrating {device} at the shapes of {args.config or 'the default config'} ...", flush=True)
        prof = calibrate([cfg.model], args.micro_batch or cfg.train.micro_batch, device,
                         "fp32" if precision == "fp32" else "bf16")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, prof.to_json())
        print(f"wrote {out}")
        if not args.local:
            return 0
    path = Path(args.device_profile) if args.device_profile else out
    if not path.exists():
        raise UserError(f"no device profile at {path}; run `mtnlg plan --calibrate --config ...` first")
    prof = DeviceProfile.load(path)
    tp, dp = args.tp or 1, args.dp
    if tp < 1 or dp < 1:
        raise UserError(f"--tp and --dp must be >= 1, got {tp} and {dp}")
    mb, gb = args.micro_batch or cfg.train.micro_batch, args.global_batch or cfg.train.global_batch
    recompute = args.recompute or ("full" if cfg.train.activation_checkpointing else "none")
    step = predict_step(cfg.model, prof, micro_batch=mb, global_batch=gb, tp=tp, dp=dp, precision=precision,
                        recompute=recompute, zero=args.zero)
    mem = predict_memory(cfg.model, prof, micro_batch=mb, tp=tp, dp=dp, zero=args.zero, precision=precision,
                         global_batch=gb, compiled_regions=cfg.train.compiled_regions)
    if args.json:
        print(json.dumps({"profile": prof.name, "source": prof.source, "tp": tp, "dp": dp, **step,
                          "memory": mem}, indent=1))
        return 0
    print(f"{prof.name} ({prof.source}); tp={tp} dp={dp}, micro-batch {mb}, global batch {gb}, {precision}")
    print(f"predicted step {step['seconds']:.3f} s = {step['tokens'] / step['seconds']:.0f} tokens/s")
    for c in CATEGORIES:
        s = step["breakdown_s"][c]
        print(f"  {c:<14} {1e3 * s:9.1f} ms  {100 * s / step['seconds']:5.1f}%")
    print(f"predicted peak memory per rank {mem['bytes'] / 1e9:.3f} GB (at the {mem['peak']}): " +
          ", ".join(f"{k} {v / 1e9:.3f}" for k, v in mem["parts"].items()))
    return 0
