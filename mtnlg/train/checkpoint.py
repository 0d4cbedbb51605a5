"""Checkpoints: the on-disk format and everything that reads it.

Layout of ``RUN/checkpoints`` (see docs/checkpoints.md)::

    step_00000200/
        dcp/.metadata, dcp/__R_I.distcp   torch.distributed.checkpoint (DCP): every rank wrote its own
                                          shards of "model.<name>" (fp32: the master copy when the
                                          run keeps one) and "optim.<name>.<state>" (AdamW moments, step)
        rng_rank00000.pt ...              per-rank CPU/CUDA RNG state
        trainer.json                      step, consumed samples, config digest, loss scaler
        manifest.json                     format version, tied aliases, bytes + sha256 of every file
    latest                                text file naming the newest complete checkpoint

Writers live in ``mtnlg/train/dcp.py`` (sharded, sync or async), the old
single-file format (``model.safetensors`` + ``optimizer.pt``) in
``mtnlg/train/legacy_checkpoint.py``.  Every reader here accepts both.

``latest_checkpoint`` verifies the manifest (sizes and checksums) of the
checkpoint ``latest`` names and falls back to the newest intact earlier one
with a warning naming what it skipped; training, generation and evaluation
all find their checkpoint through it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch.distributed.checkpoint.api import CheckpointException

from mtnlg.errors import UserError

# DCP reports failures as CheckpointException, a BaseException
ERRORS = (Exception, CheckpointException)
MANIFEST = "manifest.json"
DCP_DIR = "dcp"
TRAINER_FILE = "trainer.json"
FORMAT, VERSION = "mtnlg-checkpoint", 2
MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."
# GPT ties its output projection to the token embedding (mtnlg/model/gpt.py): one tensor, two names.
# The checkpoint stores it once, under the embedding's name.
TIED_ALIASES = {"lm_head.weight": "tok_emb.weight"}


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns on every single-process call that it assumes a single process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def warn(msg: str) -> None:
    print(f"mtnlg: warning: {msg}", file=sys.stderr, flush=True)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rng_file(path: Path, rank: int) -> Path:
    return Path(path) / f"rng_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_legacy(path: Path) -> bool:
    """A checkpoint in the pre-DCP format (model.safetensors + optimizer.pt)."""
    from mtnlg.train.legacy_checkpoint import MODEL_FILE
    path = Path(path)
    return not (path / MANIFEST).exists() and (path / MODEL_FILE).exists()


# ------------------------------------------------------------------ manifest
def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_files(step_path: Path, names) -> dict[str, dict]:
    """{relative name: {"bytes", "sha256"}} for files under ``step_path``."""
    out = {}
    for name in names:
        p = Path(step_path) / name
        out[str(name)] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    return out


def write_manifest(step_path: Path, files: dict[str, dict], step: int, world_size: int,
                   alias: dict[str, str] | None = None) -> None:
    """Write ``manifest.json`` (atomically, fsynced): the last file of a checkpoint."""
    from mtnlg.io import write_atomic
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "aliases": dict(TIED_ALIASES if alias is None else alias),
                "total_bytes": sum(f["bytes"] for f in files.values()), "files": dict(sorted(files.items()))}
    write_atomic(Path(step_path) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def checkpoint_bytes(path: Path) -> int:
    """Bytes a checkpoint occupies (from its manifest, else by listing it)."""
    try:
        return int(read_manifest(path)["total_bytes"])
    except (UserError, KeyError, ValueError):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file} is missing: {path} is not a complete checkpoint") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{file} has format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                        f"mtnlg reads {FORMAT!r} version {VERSION} (and the older model.safetensors checkpoints)")
    return manifest


def checkpoint_problem(path: Path, checksums: bool = True) -> str | None:
    """Why ``path`` is not an intact checkpoint (missing/truncated/corrupt file), or None."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    if is_legacy(path):
        from mtnlg.train.legacy_checkpoint import legacy_problem
        return legacy_problem(path)
    try:
        manifest = read_manifest(path)
    except UserError as e:
        return str(e)
    for name, want in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        if checksums and file_digest(f) != want["sha256"]:
            return f"{f} fails its sha256 checksum (corrupted)"
    return None


def verify_checkpoint(path: Path, checksums: bool = True) -> None:
    problem = checkpoint_problem(path, checksums)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")


# ------------------------------------------------------------------ finding
def latest_checkpoint(root: Path, verify: bool = True) -> Path | None:
    """The checkpoint ``root/latest`` names, or, if that one is missing or
    damaged, the newest intact earlier ``step_*`` (with a warning naming what
    was skipped).  None when there is no checkpoint yet; UserError when no
    candidate is intact.  ``verify=False`` skips the checksums (sizes only)."""
    root = Path(root)
    marker = root / "latest"
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    if marker.exists():
        named = marker.read_text().strip()
        # step dirs after the named one belong to an abandoned timeline (latest was pointed back)
        candidates = [root / named] + [p for p in steps if p.name < named]
    elif steps:  # a crash between renaming the first checkpoint into place and writing `latest`
        warn(f"{marker} is missing; looking for the newest intact step_* in {root}")
        candidates = steps
    else:
        return None
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate, checksums=verify)
        if problem is None:
            if skipped:
                warn(f"skipped damaged checkpoint(s) {'; '.join(skipped)}; using {candidate}")
            return candidate
        skipped.append(f"{candidate.name} ({problem})")
    raise UserError(f"no intact checkpoint in {root}: {'; '.join(skipped)}; restore one or start a new --run")


# ------------------------------------------------------------------ reading
def read_trainer_state(path: Path) -> dict:
    file = Path(path) / TRAINER_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint file {file} is unreadable ({type(e).__name__}: {e})") from None


def aliases(path: Path) -> dict[str, str]:
    """Names the checkpoint stores under another name (tied weights): {alias: stored name}."""
    if is_legacy(path):
        from mtnlg.train.legacy_checkpoint import legacy_aliases
        return legacy_aliases(path)
    return dict(read_manifest(path).get("aliases", {}))


def _dcp_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    meta_file = Path(path) / DCP_DIR / ".metadata"
    if not meta_file.is_file():
        raise UserError(f"checkpoint file {meta_file} is missing")
    try:
        return FileSystemReader(str(Path(path) / DCP_DIR)).read_metadata()
    except ERRORS as e:  # pickle/EOF errors on a damaged file
        raise UserError(f"checkpoint file {meta_file} is unreadable ({type(e).__name__}: {e})") from None


def tensor_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{DCP key: (full shape, dtype)} of every tensor in a DCP checkpoint."""
    meta = _dcp_metadata(path)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if hasattr(v, "size")}


def model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: full shape}, aliases included, without reading any weights."""
    path = Path(path)
    if is_legacy(path):
        from mtnlg.train.legacy_checkpoint import legacy_shapes
        return legacy_shapes(path)
    shapes = {k[len(MODEL_PREFIX):]: s for k, (s, _) in tensor_metadata(path).items() if k.startswith(MODEL_PREFIX)}
    shapes.update({a: shapes[t] for a, t in aliases(path).items() if t in shapes})
    return shapes


def load_tensors(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` ({DCP key: tensor}) from a DCP checkpoint in this
    process alone (no process group); reads only the bytes of those keys."""
    import torch.distributed.checkpoint as dcp
    try:
        with quiet_dcp():
            dcp.load(targets, checkpoint_id=str(Path(path) / DCP_DIR), no_dist=True)
    except ERRORS as e:  # noqa: BLE001 - DCP wraps file errors in CheckpointException
        raise UserError(f"cannot read checkpoint {path}: {short_error(e)}") from None


def iter_model_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full CPU tensor) for every model tensor, one at a time (aliases
    of tied weights follow their tensor), so a model larger than memory can
    be converted or exported piece by piece."""
    path = Path(path)
    if is_legacy(path):
        from mtnlg.train.legacy_checkpoint import legacy_iter
        yield from legacy_iter(path)
        return
    meta = tensor_metadata(path)
    alias = {a: t for a, t in aliases(path).items() if MODEL_PREFIX + a not in meta}  # stored itself: no alias
    for key, (shape, dtype) in meta.items():
        if not key.startswith(MODEL_PREFIX):
            continue
        name = key[len(MODEL_PREFIX):]
        t = torch.empty(shape, dtype=dtype)
        load_tensors(path, {key: t})
        yield name, t
        for a, target in alias.items():
            if target == name:
                yield a, t


def load_model_state(path: Path, with_aliases: bool = False):
    """Full weights in one process, tied aliases restored (the same tensor
    under both names), and the alias map if asked."""
    state = dict(iter_model_tensors(path))
    return (state, aliases(path)) if with_aliases else state


def short_error(e: BaseException) -> str:
    """One line for an exception, digging the first real cause out of DCP's
    multi-rank CheckpointException."""
    inner = root_error(e)
    text = f"{type(inner).__name__}: {inner}".strip()
    return text.splitlines()[0] if text else type(inner).__name__


def root_error(e: BaseException) -> BaseException:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))  # (exception, traceback summary)
        return root_error(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
    if isinstance(e, OSError):
        return e
    cause = e.__cause__ or e.__context__
    return root_error(cause) if cause is not None else e
