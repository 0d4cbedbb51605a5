"""Atomic checkpoints: weights in safetensors, the rest in torch/JSON files.

Layout of ``RUN/checkpoints``::

    step_00000200/
        model.safetensors     full (unsharded) weights, tied copies stored once
        optimizer.pt          optimizer state (and fp32 master weights if any)
        trainer.json          step, consumed samples, config digest
        rng_rank00000.pt      per-rank CPU/CUDA RNG state
    latest                    text file naming the newest complete checkpoint

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed into place
only after every file is flushed to disk; ``latest`` is replaced atomically
afterwards.  A crash at any point leaves the previous checkpoint and
``latest`` untouched, and a leftover ``*.tmp`` directory is ignored (and
removed by the next save).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from mtnlg.errors import UserError
from mtnlg.io import fsync_dir, fsync_file, write_atomic

MODEL_FILE = "model.safetensors"


_fsync_dir = fsync_dir
_fsync_file = fsync_file


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def dedup_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key; return the aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out, aliases


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor] | None,
                    optim_state: dict | None, trainer_state: dict, *, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None, keep: int = 2) -> Path:
    """Collective when distributed: every rank calls it (rank 0 passes the full
    model/optimizer state, others may pass None) and writes its RNG state."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    rng_path = tmp / f"rng_rank{rank:05d}.pt"
    torch.save(rng_state(), rng_path)
    _fsync_file(rng_path)
    if rank == 0:
        tensors, aliases = dedup_tied(model_state)
        save_file(tensors, tmp / MODEL_FILE, metadata={"aliases": json.dumps(aliases), "step": str(step)})
        torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        for name in (MODEL_FILE, "optimizer.pt", "trainer.json"):
            _fsync_file(tmp / name)
    barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / "latest", final.name + "\n")
        _fsync_dir(root)
        _prune(root, keep, current=final)
    barrier()
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    # step dirs after `current` belong to an abandoned timeline (latest was pointed back):
    # they must not push the checkpoint just written out of the window
    done = sorted(p for p in root.glob("step_*")
                  if p.is_dir() and not p.name.endswith(".tmp") and p.name <= current.name)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    if not (path / MODEL_FILE).exists() or not (path / "trainer.json").exists():
        raise UserError(f"{marker} names {path.name}, which is missing or incomplete; "
                        f"point 'latest' at an intact step_* directory")
    return path


def load_model_state(path: Path, with_aliases: bool = False):
    """Full weights with tied aliases restored (and the alias map if asked)."""
    from safetensors import safe_open
    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(file))
    except Exception as e:  # safetensors raises several kinds on damaged files
        raise UserError(f"cannot read checkpoint weights {file}: {e}") from None
    aliases = json.loads(meta.get("aliases", "{}"))
    for alias, target in aliases.items():
        state[alias] = state[target]
    return (state, aliases) if with_aliases else state


def load_checkpoint(path: Path, rank: int = 0, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    model, aliases = load_model_state(path, with_aliases=True)
    out = {"model": model, "aliases": aliases, "rng": None}
    rng_file = path / f"rng_rank{rank:05d}.pt"
    try:
        out["optimizer"] = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False)
        out["trainer"] = json.loads((path / "trainer.json").read_text())
        if rng_file.exists():
            out["rng"] = torch.load(rng_file, weights_only=False)
    except Exception as e:  # torch.load and json raise many kinds on damaged files
        raise UserError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); point "
                        f"{path.parent / 'latest'} at an earlier step_* directory to resume from it") from None
    return out
