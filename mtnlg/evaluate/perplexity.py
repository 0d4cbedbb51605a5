"""``mtnlg eval``: language-model loss and perplexity of a trained run.

On a split of indexed datasets (the packed samples the trainer sees, so the
numbers are comparable with ``val_loss`` in metrics.jsonl) or on a plain text
file (tokenized with the run's tokenizer, cut into windows of ``seq_len``
predicted tokens each, also reporting bits per byte, which does not depend on
the tokenizer).

    mtnlg eval --run runs/tiny --split valid --json
    mtnlg eval --run runs/tiny --text speech.txt
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtnlg.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory made by `mtnlg train`")
    p.add_argument("--checkpoint", help="a specific checkpoints/step_* directory (default: the latest)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("train", "valid", "test"), default="valid",
                     help="split of the run's data blend to score (default: valid)")
    src.add_argument("--text", metavar="FILE", help="score a UTF-8 text file instead of the data blend")
    p.add_argument("--data", action="append", metavar="PREFIX",
                   help="score these indexed datasets instead of the run's blend (repeatable; equal weights)")
    p.add_argument("--max-samples", type=int, default=0, help="score at most this many sequences (0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@torch.no_grad()
def score(model: torch.nn.Module, samples, batch_size: int, device: torch.device) -> dict:
    """Mean next-token loss over ``samples`` (each seq_len + 1 token ids)."""
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        rows = np.stack([samples[i] for i in range(start, min(start + batch_size, len(samples)))])
        batch = torch.from_numpy(rows.astype(np.int64)).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        tokens += batch[:, 1:].numel()
    if tokens == 0:
        raise UserError("nothing to score: the selection holds no complete sequence")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "sequences": len(samples)}


def text_windows(ids: list[int], seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_len + 1 tokens (consecutive windows share one)."""
    arr = np.asarray(ids, dtype=np.int64)
    return [arr[i:i + seq_len + 1] for i in range(0, len(arr) - seq_len, seq_len)]


def run(args: argparse.Namespace) -> int:
    from mtnlg.infer.load import load_run
    from mtnlg.parallel.mesh import pick_device

    if args.batch_size < 1 or args.max_samples < 0:
        raise UserError("--batch-size must be >= 1 and --max-samples >= 0")
    device = pick_device(args.device, 0)
    cfg, model, tok = load_run(args.run, device, args.checkpoint)
    seq_len = cfg.model.seq_len
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"text file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e})") from None
        samples = text_windows(tok.encode(text), seq_len)
        if not samples:
            raise UserError(f"{path} has fewer than {seq_len + 1} tokens, the model's context + 1")
        what = str(path)
    else:
        from mtnlg.config import check_relative_data_paths
        from mtnlg.data.samples import build_datasets
        if not args.data:
            check_relative_data_paths(cfg, Path(args.run) / "config.toml")
        blend = [(1.0, p) for p in args.data] if args.data else [(float(w), p) for w, p in cfg.data.blend]
        split = tuple(float(x) for x in cfg.data.split) if not args.data else (0.0, 1.0, 0.0)
        index = {"train": 0, "valid": 1, "test": 2}[args.split if not args.data else "valid"]
        wanted = args.max_samples or cfg.train.eval_batches * cfg.train.micro_batch
        counts = [0, 0, 0]
        counts[index] = wanted
        samples = build_datasets(blend, split, seq_len, cfg.train.seed, tuple(counts),
                                 cache_dir=cfg.data.cache_dir or None)[index]
        what = f"{args.split} split of {', '.join(p for _, p in blend)}" if not args.data else ", ".join(args.data)
    if args.max_samples:
        samples = samples[:args.max_samples] if isinstance(samples, list) else _Head(samples, args.max_samples)
    result = score(model, samples, args.batch_size, device)
    if args.text:
        n_bytes = sum(len(tok.decode(s[1:].tolist()).encode("utf-8")) for s in samples)
        result["bits_per_byte"] = result["loss"] * result["tokens"] / n_bytes / math.log(2)
    result["source"] = what
    if args.json:
        print(json.dumps(result))
    else:
        extra = f" | {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else ""
        print(f"{what}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
              f"{result['tokens']} tokens in {result['sequences']} sequences{extra}")
    return 0


class _Head:
    def __init__(self, data, n: int):
        self.data, self.n = data, min(n, len(data))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.data[i]
