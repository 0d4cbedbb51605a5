"""``mtnlg import``: a Hugging Face GPT-2 directory as a run directory
(config.toml, tokenizer.json, a step-0 checkpoint) for train, generate and eval."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="Hugging Face GPT-2 directory (config.json, safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--config", help="TOML whose data/optim/train/... sections the run takes (its [model] is "
                                    "replaced by the checkpoint's), e.g. to continue pretraining on your data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a non-shape config key, e.g. --set data.blend='[[1.0, \"runs/data/x\"]]'")


def run(args: argparse.Namespace) -> int:
    from mtnlg.convert.hf import import_hf
    s = import_hf(args.hf, args.out, args.config, args.overrides)
    padded = f" (table padded to {s['rows']} rows)" if s["rows"] > s["vocab"] else ""
    print(f"mtnlg import: {args.hf} -> {s['run']} ({s['params'] / 1e6:.2f}M params, {s['n_layers']} layers, "
          f"hidden {s['hidden']}, vocab {s['vocab']}{padded}, context {s['seq_len']}, "
          f"model.activation {s['activation']}); "
          f"continue with `mtnlg train --run {s['run']}` (needs data.blend) or `mtnlg generate --run {s['run']}`")
    return 0
