"""``mtnlg export``: a run's checkpoint as a Hugging Face GPT-2 directory."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory made by `mtnlg train` (or `mtnlg import`)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split model.safetensors into shards of at most this size, with an index (e.g. 2GB)")


def run(args: argparse.Namespace) -> int:
    from mtnlg.convert.hf import export_run
    s = export_run(args.run, args.out, args.step, args.dtype, args.max_shard_size)
    trimmed = s["padded_vocab"] - s["vocab"]
    note = (f"; embedding trimmed from {s['padded_vocab']} padded rows to the tokenizer's {s['vocab']} tokens"
            if trimmed else "")
    print(f"mtnlg export: {s['checkpoint']} -> {s['out']} ({s['dtype']}, {len(s['files'])} safetensors file(s), "
          f"{s['total_size'] / 1e6:.1f} MB, activation_function {s['activation_function']}{note}); load with transformers.AutoModelForCausalLM.from_pretrained")
    return 0
