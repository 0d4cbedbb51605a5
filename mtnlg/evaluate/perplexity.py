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
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtnlg.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run", help="run directory made by `mtnlg train` (required; "
                   "--run-dir under torchrun, whose own --run-path swallows --run)")
    p.add_argument("--checkpoint", help="a specific checkpoints/step_* directory (default: the latest)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("train", "valid", "test"), default="valid",
                     help="split of the run's data blend to score")
    src.add_argument("--text", metavar="FILE", help="score a UTF-8 text file instead of the data blend")
    p.add_argument("--data", action="append", metavar="PREFIX",
                   help="score these indexed datasets instead of the run's blend (repeatable; equal weights)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="score the first N sequences of the split; 0: the whole split (every sequence once); "
                        "default: the trainer's validation count (train.eval_batches x train.micro_batch), "
                        "so the loss compares with val_loss in metrics.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT",
                   help="one JSON object to OUT (stdout when OUT is omitted or '-')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal anyway)")


@torch.no_grad()
def score(model: torch.nn.Module, samples, batch_size: int, device: torch.device, progress: bool = False) -> dict:
    """Mean next-token loss over ``samples`` (token id rows; each row predicts
    all but its first token).  Rows of equal length are batched together."""
    from tqdm import tqdm

    total, tokens = 0.0, 0
    bar = tqdm(total=len(samples), unit="seq", desc="eval", disable=None if progress else True,
               dynamic_ncols=True, leave=False)
    start = 0
    while start < len(samples):
        rows = [samples[start]]
        while len(rows) < batch_size and start + len(rows) < len(samples) \
                and len(samples[start + len(rows)]) == len(rows[0]):
            rows.append(samples[start + len(rows)])
        start += len(rows)
        batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        tokens += batch[:, 1:].numel()
        bar.update(len(rows))
    bar.close()
    if tokens == 0:
        raise UserError("nothing to score: the selection holds no complete sequence")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "sequences": len(samples)}


def text_windows(ids: list[int], seq_len: int) -> list[np.ndarray]:
    """Every token of the text after the first is predicted exactly once: windows of
    seq_len + 1 tokens (consecutive windows share one), the last one possibly shorter."""
    arr = np.asarray(ids, dtype=np.int64)
    return [arr[i:i + seq_len + 1] for i in range(0, max(len(arr) - 1, 0), seq_len)]


def text_samples(path: Path, tok, seq_len: int) -> list[np.ndarray]:
    if not path.is_file():
        raise UserError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})") from None
    samples = text_windows(tok.encode(text), seq_len)
    if not samples:
        raise UserError(f"{path} holds fewer than 2 tokens: nothing to predict")
    return samples


def split_samples(cfg, args: argparse.Namespace):
    """The sequences of a split (or of --data datasets), exactly as many as asked
    and never a repeated one: more than the split holds is clamped, with a message."""
    from mtnlg.data.samples import build_datasets, split_capacity
    blend = [(1.0, p) for p in args.data] if args.data else [(float(w), p) for w, p in cfg.data.blend]
    split = tuple(float(x) for x in cfg.data.split) if not args.data else (0.0, 1.0, 0.0)
    name = args.split if not args.data else "valid"
    index = {"train": 0, "valid": 1, "test": 2}[name]
    what = f"{args.split} split of {', '.join(p for _, p in blend)}" if not args.data else ", ".join(args.data)
    seq_len = cfg.model.seq_len
    capacity = split_capacity(blend, split, seq_len, index)
    if capacity == 0:
        raise UserError(f"the {what} holds fewer than {seq_len + 1} tokens: no sequence of the model's context")
    wanted = cfg.train.eval_batches * cfg.train.micro_batch if args.max_samples is None else args.max_samples
    if wanted == 0:
        wanted = capacity
    elif wanted > capacity:
        print(f"mtnlg eval: the {what} holds {capacity} sequences of {seq_len + 1} tokens; scoring all "
              f"{capacity}, not {wanted} (a sequence is never scored twice)", file=sys.stderr)
        wanted = capacity
    counts = [0, 0, 0]
    counts[index] = wanted
    samples = build_datasets(blend, split, seq_len, cfg.train.seed, tuple(counts),
                             cache_dir=cfg.data.cache_dir or None)[index]
    return samples, what


def run(args: argparse.Namespace) -> int:
    from mtnlg.infer.load import load_run
    from mtnlg.parallel.mesh import pick_device

    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 0):
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size}) and --max-samples >= 0 "
                        f"(got {args.max_samples}; 0 scores the whole split)")
    device = pick_device(args.device, 0)
    cfg, model, tok = load_run(args.run, device, args.checkpoint)
    if args.text:
        samples, what = text_samples(Path(args.text), tok, cfg.model.seq_len), str(args.text)
        if args.max_samples:
            samples = samples[:args.max_samples]
    else:
        from mtnlg.config import check_relative_data_paths
        if not args.data:
            check_relative_data_paths(cfg, Path(args.run) / "config.toml")
        samples, what = split_samples(cfg, args)
    result = score(model, samples, args.batch_size, device, progress=not args.no_progress)
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
