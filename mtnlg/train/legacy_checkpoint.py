"""The pre-DCP checkpoint format (mtnlg before sharded checkpoints), read-only,
and its conversion to the current format.

    step_XXXXXXXX/
        model.safetensors   full weights gathered on rank 0, tied copies stored once
                            (metadata "aliases": {alias: stored name})
        optimizer.pt        {"format": "by-name", "state": {name: AdamW state},
                             "master": {name: fp32 master weight} or None}
        trainer.json, rng_rankNNNNN.pt

``convert_legacy`` rewrites such a directory in place into the DCP format
(the new files are written first; ``manifest.json``, written last, is what
makes a directory a new-format checkpoint; the old files are removed only
after it), so a crash during conversion leaves a loadable checkpoint.  The
trainer converts a legacy checkpoint it resumes from automatically; ``mtnlg
checkpoint convert RUN`` does it explicitly.  ``_save_legacy`` is the old
writer, kept only so tests can produce a genuine old checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from mtnlg.errors import UserError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"


def legacy_aliases(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(Path(path) / MODEL_FILE), "pt") as f:
            return json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds on damaged files
        raise UserError(f"cannot read checkpoint weights {Path(path) / MODEL_FILE}: {e}") from None


def legacy_problem(path: Path) -> str | None:
    """Missing files, a safetensors file shorter than its header promises, or
    an optimizer.pt whose zip CRCs fail: what the old format lets us check."""
    from safetensors import safe_open
    path = Path(path)
    for name in (MODEL_FILE, OPTIM_FILE, "trainer.json"):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    try:
        with safe_open(str(path / MODEL_FILE), "pt") as f:
            for k in f.keys():
                f.get_slice(k)
        with open(path / MODEL_FILE, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(header))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if (path / MODEL_FILE).stat().st_size < 8 + header + end:
            return f"{path / MODEL_FILE} is truncated"
    except Exception as e:  # noqa: BLE001
        return f"{path / MODEL_FILE} is unreadable ({type(e).__name__}: {e})"
    try:
        with zipfile.ZipFile(path / OPTIM_FILE) as z:
            bad = z.testzip()
        if bad:
            return f"{path / OPTIM_FILE} is corrupted ({bad})"
        json.loads((path / "trainer.json").read_text())
    except Exception as e:  # noqa: BLE001
        return f"{path} is damaged ({type(e).__name__}: {e})"
    return None


def legacy_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open
    with safe_open(str(Path(path) / MODEL_FILE), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    shapes.update({a: shapes[t] for a, t in legacy_aliases(path).items() if t in shapes})
    return shapes


def legacy_iter(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    alias = legacy_aliases(path)
    try:
        with safe_open(str(Path(path) / MODEL_FILE), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                yield k, t
                yield from ((a, t) for a, target in alias.items() if target == k)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint weights {Path(path) / MODEL_FILE}: {e}") from None


def read_legacy_optimizer(path: Path) -> dict:
    file = Path(path) / OPTIM_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"checkpoint file {file} is damaged ({type(e).__name__}: {e})") from None


def legacy_flat_state(path: Path) -> dict[str, torch.Tensor]:
    """The old checkpoint as the DCP state dict the trainer writes today:
    model.<name> (the fp32 master copy where there was one), optim.<name>.<k>."""
    from mtnlg.train.checkpoint import MODEL_PREFIX, OPTIM_PREFIX
    alias = legacy_aliases(path)
    weights = {k: v for k, v in legacy_iter(path) if k not in alias}
    optim = read_legacy_optimizer(path)
    master = optim.get("master") or {}
    out = {}
    for name, w in weights.items():
        m = master.get(name)
        if m is not None and tuple(m.shape) != tuple(w.shape):
            raise UserError(f"{Path(path) / OPTIM_FILE} stores fp32 master weight {name!r} with shape "
                            f"{tuple(m.shape)} for a weight of shape {tuple(w.shape)}: it was written by an mtnlg "
                            f"that misnamed bf16 master copies and cannot be converted")
        out[MODEL_PREFIX + name] = (m if m is not None else w).float() if w.is_floating_point() else w
    for name, st in optim.get("state", {}).items():
        name = alias.get(name, name)
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{OPTIM_PREFIX}{name}.{k}"] = v
            else:
                out[f"{OPTIM_PREFIX}{name}.{k}"] = torch.tensor(v)
    return out


def convert_legacy(path: Path) -> bool:
    """Rewrite a legacy checkpoint directory in place into the DCP format
    (one process; the old format held full tensors, so they fit). Returns
    False if ``path`` is already in the current format."""
    import torch.distributed.checkpoint as dcp
    from mtnlg.train import checkpoint as ck
    path = Path(path)
    if not ck.is_legacy(path):
        if (path / ck.MANIFEST).exists():
            return False
        raise UserError(f"{path} is not a checkpoint (no {MODEL_FILE} or {ck.MANIFEST})")
    problem = legacy_problem(path)
    if problem:
        raise UserError(f"cannot convert {path}: {problem}")
    state = legacy_flat_state(path)
    staging = path / (ck.DCP_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(path / ck.DCP_DIR, ignore_errors=True)
    with ck.quiet_dcp():
        dcp.save(state, checkpoint_id=str(staging), no_dist=True)
    os.replace(staging, path / ck.DCP_DIR)
    trainer = ck.read_trainer_state(path)
    names = [f"{ck.DCP_DIR}/{f.name}" for f in sorted((path / ck.DCP_DIR).iterdir())]
    names += [f.name for f in sorted(path.glob("rng_rank*.pt"))] + [ck.TRAINER_FILE]
    files = ck.describe_files(path, names)
    ck.write_manifest(path, files, trainer.get("step", 0), world_size=len(list(path.glob("rng_rank*.pt"))) or 1,
                      alias=legacy_aliases(path) or ck.TIED_ALIASES)
    for name in (MODEL_FILE, OPTIM_FILE):
        (path / name).unlink()
    return True


def _save_legacy(root: Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict,
                 trainer_state: dict) -> Path:
    """The old single-process writer (for tests that need a genuine old checkpoint)."""
    from safetensors.torch import save_file
    from mtnlg.io import write_atomic
    from mtnlg.train.checkpoint import rng_file, rng_state, step_dir
    root = Path(root)
    final = step_dir(root, step)
    root.mkdir(parents=True, exist_ok=True)
    final.mkdir()
    seen: dict[tuple, str] = {}
    tensors, alias = {}, {}
    for name, t in model_state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            alias[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    save_file(tensors, final / MODEL_FILE, metadata={"aliases": json.dumps(alias), "step": str(step)})
    torch.save(optim_state, final / OPTIM_FILE)
    (final / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    torch.save(rng_state(), rng_file(final, 0))
    write_atomic(root / "latest", final.name + "\n")
    return final
