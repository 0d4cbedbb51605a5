"""Files of a Hugging Face model directory: sharded safetensors with an index,
tokenizer files, and an all-or-nothing output directory."""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from mtnlg.errors import UserError
from mtnlg.io import fsync_dir, fsync_file, write_atomic

SAFE_META = {"format": "pt"}  # transformers refuses safetensors files without it


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.I)
    if not m:
        raise UserError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def write_safetensors(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> dict:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` when the total exceeds ``max_shard_bytes``.
    Holds at most one shard in memory.  Returns {"files": [...], "total_size": bytes}."""
    shards: list[dict[str, int]] = []  # names -> sizes, per written shard
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal pending, size
        save_file(pending, str(out_dir / f"shard-{len(shards):05d}.tmp"), metadata=SAFE_META)
        shards.append({k: v.numel() * v.element_size() for k, v in pending.items()})
        pending, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = t
        size += nbytes
    if pending or not shards:
        flush()
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, final in enumerate(names):
        os.replace(out_dir / f"shard-{i:05d}.tmp", out_dir / final)
    total = sum(sum(s.values()) for s in shards)
    if n > 1:
        weight_map = {k: names[i] for i, s in enumerate(shards) for k in s}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"files": names, "total_size": total}


def write_tokenizer_files(tokenizer, out_dir: Path, max_length: int) -> None:
    """tokenizer.json (ours, as is) plus the GPT-2 vocab.json/merges.txt pair and
    tokenizer_config.json, so AutoTokenizer gives a GPT-2 tokenizer with no custom code."""
    from mtnlg.data.tokenizer import EOD_TOKEN
    spec = json.loads(tokenizer.to_json())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise UserError("only byte-level BPE tokenizers can be exported as GPT-2 tokenizers")
    (out_dir / "tokenizer.json").write_text(tokenizer.to_json())
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    (out_dir / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                                   ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN, "pad_token": EOD_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer", **special, "model_max_length": max_length,
              "add_prefix_space": False, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a sibling staging directory that becomes ``out`` only if the block
    succeeds; ``out`` must be absent or empty, and is never left half-written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
