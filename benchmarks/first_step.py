"""Time to the first training steps: Trainer construction (which compiles the regions), the
first step and the second, in one fresh process.

    python benchmarks/first_step.py --config 14m [--cold]

``--cold`` gives Inductor an empty cache directory (a fresh machine, CI, ``make demo``), so
every compile is paid in full; without it, the user's cache may hold earlier compiles.  A first
step slower than the second by more than its usual spread means something compiled there.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="14m")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16-autocast", "bf16"])
    p.add_argument("--cold", action="store_true", help="an empty Inductor cache for this process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as run_dir:
        if args.cold:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before torch is imported
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import torch
        from train_throughput import CONFIGS, RandomTokens

        from mtnlg.config import load_config
        from mtnlg.model.gpt import build_model
        from mtnlg.train.precision import param_dtype
        from mtnlg.train.trainer import Trainer
        cfg = load_config(None, CONFIGS[args.config] + [f"train.precision={args.precision}", "optim.warmup_steps=1",
                                                        "train.steps=3", "train.eval_interval=0"])
        model = build_model(cfg.model, "cpu", seed=0).to(param_dtype(args.precision))
        data = RandomTokens(cfg.train.global_batch * 3, cfg.model.seq_len, cfg.model.vocab_size)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, model, data, data, Path(run_dir), torch.device("cpu"))
        t1 = time.perf_counter()
        trainer.train_step()
        t2 = time.perf_counter()
        trainer.train_step()
        t3 = time.perf_counter()
    print(f"{args.config} {args.precision} ({'cold' if args.cold else 'warm'} compile cache): "
          f"trainer {t1 - t0:.2f} s, first step {t2 - t1:.2f} s, second step {t3 - t2:.2f} s")


if __name__ == "__main__":
    main()
