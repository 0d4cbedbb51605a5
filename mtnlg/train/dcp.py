"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP): writing
(synchronous or asynchronous) and loading under any layout.

The state is one flat dict keyed by parameter name, ``model.<name>`` and
``optim.<name>.<state>``, whose values are this rank's tensors as they are:
DTensors under tensor parallelism or ZeRO (FSDP2), plain tensors otherwise.
DCP writes each rank's own shards (a tensor replicated over data-parallel
ranks is written once) and, on load, reads into whatever placement the
target tensors have, so any tp/pp/dp/zero layout resumes any other.
Pipeline stages keep the full model's parameter names, so their keys never
collide; the last stage's copy of the tied embedding is not saved and is
loaded from ``tok_emb.weight``.  Where the trainer keeps fp32 master copies
(bf16 weights) those are saved as the model weights, so a checkpoint always
holds fp32 weights and bf16 and ZeRO runs (whose fp32 shards are the
master copy) resume each other.

Why not ``torch.distributed.checkpoint.state_dict.get_state_dict``: it maps
optimizer parameters to names through the module's parameters, and the bf16
trainer's optimizer steps master copies that are not module parameters; the
flat name-keyed dict below is what it would produce for the others.

Commit protocol (``Checkpointer``): every rank writes into
``step_N.tmp/`` (DCP files, fsynced, and its RNG state), hashes the files it
wrote, and the ranks agree (one all-gather) that all succeeded; only then does
rank 0 write ``manifest.json``, fsync, rename ``step_N.tmp`` to ``step_N``
and replace ``latest``.  A failure anywhere removes the ``.tmp`` and raises a
one-line ``UserError`` on every rank; the previous checkpoint is untouched.
With ``async_save`` the write runs in a background thread on its own gloo
group; training continues, ``poll()`` (each step) commits it once every rank
has finished, and ``wait()`` (before the next save, at the end) blocks for it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from mtnlg.errors import UserError
from mtnlg.io import fsync_dir, fsync_file, write_atomic
from mtnlg.train import checkpoint as ck

# single-process saves (no_dist) warn on every call, also from the async writer thread: we mean it
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# ------------------------------------------------------------------ state dicts
def flat_state(named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               skip: set[str] | dict = ()) -> dict[str, torch.Tensor]:
    """{model.<name>: weight, optim.<name>.<k>: optimizer state} for the
    optimizer's parameters (``named``: (name, parameter) in any order)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        if name in skip:
            continue
        out[ck.MODEL_PREFIX + name] = p.detach()
        for k, v in optimizer.state.get(p, {}).items():
            out[f"{ck.OPTIM_PREFIX}{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_targets(named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer, copies: dict[str, str],
                 metadata: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[dict, Callable[[], None]]:
    """Tensors to load into (the parameters themselves and fresh optimizer
    state shaped like them) and a function that installs the loaded state.
    ``copies`` maps a tied copy's name to the name it is stored under."""
    targets: dict[str, torch.Tensor] = {}
    after: list[tuple[torch.Tensor, str]] = []  # a second local copy of a key: copied after the load
    states: list[tuple[torch.Tensor, dict]] = []
    for name, p in named:
        key = copies.get(name, name)
        if ck.MODEL_PREFIX + key in targets:
            after.append((p, key))
            continue
        targets[ck.MODEL_PREFIX + key] = p.detach()
        prefix, state = f"{ck.OPTIM_PREFIX}{key}.", {}
        for k, (shape, dtype) in metadata.items():
            if k.startswith(prefix) and "." not in k[len(prefix):]:
                t = (torch.zeros_like(p.detach()) if shape == tuple(p.shape) and p.is_floating_point()
                     else torch.zeros(shape, dtype=dtype))
                state[k[len(prefix):]] = targets[k] = t
        states.append((p, state))

    def install() -> None:
        by_key = {name: p for name, p in named}
        on_device = {id(q) for g in optimizer.param_groups if g.get("fused") or g.get("capturable")
                     for q in g["params"]}
        for p, state in states:
            if state:
                if id(p) in on_device and torch.is_tensor(state.get("step")):
                    # fused / capturable AdamW keep the step count on the parameter's device (as
                    # Optimizer.load_state_dict puts it); loaded on the CPU, the fused CUDA kernel refuses it
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                optimizer.state[p] = state
        with torch.no_grad():
            for p, key in after:
                src = by_key.get(key)
                if src is None:
                    src = next(q for n, q in named if copies.get(n, n) == key and q is not p)
                p.copy_(src)
                if src in optimizer.state:
                    optimizer.state[p] = {k: v.clone() for k, v in optimizer.state[src].items()}
    return targets, install


def check_targets(path: Path, targets: dict[str, torch.Tensor], metadata: dict) -> str | None:
    """A one-line reason why ``targets`` cannot be loaded from ``path``, or None."""
    for key, t in targets.items():
        if key not in metadata:
            return (f"checkpoint {path} has no tensor {key!r}: it was written for a different model "
                    f"(e.g. other layer count)")
        if tuple(metadata[key][0]) != tuple(t.shape):
            return (f"checkpoint {path} stores {key!r} with shape {tuple(metadata[key][0])}, the model has "
                    f"{tuple(t.shape)}: it was written for a different model")
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is its global one


@dataclass
class _Pending:
    step: int
    tmp: Path
    final: Path
    local: Future | None  # this rank's write + hashing (async), or None
    files: dict | None = None
    error: BaseException | None = None


class Checkpointer:
    """Writes and reads one run's ``checkpoints/`` directory.  Collective: every
    rank of the job calls ``save``/``poll``/``wait``/``find_latest``/``load``."""

    def __init__(self, root: Path, rank: int = 0, world_size: int = 1, keep: int = 2, async_save: bool = False):
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self.keep, self.async_save = keep, async_save
        self._pending: _Pending | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._group = None
        self._estimate: int | None = None

    # -------------------------------------------------------------- collectives
    def _gather(self, obj: Any) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give every rank its result or its UserError."""
        result, err = None, None
        if self.rank == 0:
            try:
                result = fn()
            except UserError as e:
                err = str(e)
        if self.world_size > 1:
            box = [result, err]
            dist.broadcast_object_list(box, src=0)
            result, err = box
        if err:
            raise UserError(err)
        return result

    def _async_group(self):
        if self.world_size > 1 and self._group is None:
            self._group = dist.new_group(backend="gloo")  # keep DCP's background collectives off the trainer's
        return self._group

    # -------------------------------------------------------------- saving
    def save(self, step: int, state: dict[str, torch.Tensor], trainer_state: dict) -> Path:
        """Write ``state`` (each rank its own shards) as checkpoint ``step``.
        Synchronous: returns the committed directory.  Asynchronous: returns
        once the state is staged in memory; the write continues in the
        background and is committed by ``poll``/``wait``."""
        self.wait()
        final = ck.step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self._estimate is None:
            sizes: dict[str, int] = {}
            for part in self._gather({k: full_bytes(v) for k, v in state.items()}):
                sizes.update(part)
            self._estimate = sum(sizes.values())
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_space(step)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._gather(None)  # barrier: the directory exists
        from torch.distributed.checkpoint import FileSystemWriter
        writer = FileSystemWriter(str(tmp / ck.DCP_DIR), sync_files=True)
        pending = _Pending(step, tmp, final, None)
        no_dist = self.world_size == 1
        try:
            with ck.quiet_dcp():
                self._write_state(state, writer, pending, no_dist)
        except ck.ERRORS as e:  # noqa: BLE001 - reported collectively in wait()
            pending.error = e
        try:
            self._write_small_files(tmp, trainer_state)
        except ck.ERRORS as e:  # noqa: BLE001
            pending.error = pending.error or e
        self._pending = pending
        if not self.async_save:
            return self.wait()
        return final

    def _write_state(self, state, writer, pending: _Pending, no_dist: bool) -> None:
        import torch.distributed.checkpoint as dcp
        if self.async_save:  # staged (copied) in memory now, written by DCP's background thread
            future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group(), no_dist=no_dist)
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="mtnlg-ckpt")
            pending.local = self._pool.submit(self._finish_local, pending, future)
        else:
            dcp.save(state, storage_writer=writer, no_dist=no_dist)

    def _write_small_files(self, tmp: Path, trainer_state: dict) -> None:
        rng = ck.rng_file(tmp, self.rank)
        torch.save(ck.rng_state(), rng)
        fsync_file(rng)
        if self.rank == 0:
            write_atomic(tmp / ck.TRAINER_FILE, json.dumps(trainer_state, indent=1))

    def _own_files(self, tmp: Path) -> list[str]:
        names = [f"{ck.DCP_DIR}/{f.name}" for f in (tmp / ck.DCP_DIR).glob(f"__{self.rank}_*")]
        names.append(ck.rng_file(tmp, self.rank).name)
        if self.rank == 0:
            names += [f"{ck.DCP_DIR}/.metadata", ck.TRAINER_FILE]
        return names

    def _finish_local(self, pending: _Pending, future: Future | None) -> dict:
        if future is not None:
            future.result()
        return ck.describe_files(pending.tmp, self._own_files(pending.tmp))

    def poll(self) -> Path | None:
        """Commit a finished asynchronous save; call once per step on every rank."""
        p = self._pending
        if p is None:
            return None
        done = p.local is None or p.local.done()
        if self.world_size > 1:
            flag = torch.tensor([int(done)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            done = bool(flag.item())
        return self.wait() if done else None

    def wait(self) -> Path | None:
        """Block until the pending save is written, then commit it (or clean up
        and raise UserError on every rank); returns its directory."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        if p.error is None:
            try:
                p.files = p.local.result() if p.local is not None else self._finish_local(p, None)
            except ck.ERRORS as e:  # noqa: BLE001
                p.error = e
        reports = self._gather((ck.short_error(p.error) if p.error else None, p.files))
        failed = next((r[0] for r in reports if r[0]), None)
        commit_error = None
        if failed is None and self.rank == 0:
            try:
                files = {}
                for _, part in reports:
                    files.update(part)
                self._commit(p, files)
            except ck.ERRORS as e:  # noqa: BLE001
                p.error, failed = e, ck.short_error(e)
                commit_error = failed
        commit_error = self._gather(commit_error)[0]
        failed = failed or commit_error
        if failed:
            if self.rank == 0:
                shutil.rmtree(p.tmp, ignore_errors=True)
            self._gather(None)
            raise self._failure(p, failed) from p.error
        return p.final

    def _commit(self, p: _Pending, files: dict) -> None:
        ck.write_manifest(p.tmp, files, p.step, self.world_size)
        fsync_dir(p.tmp / ck.DCP_DIR)
        fsync_dir(p.tmp)
        if p.final.exists():
            shutil.rmtree(p.final)
        os.replace(p.tmp, p.final)
        fsync_dir(self.root)
        write_atomic(self.root / "latest", p.final.name + "\n")
        self._prune(p.final)

    def _prune(self, current: Path) -> None:
        # step dirs after `current` belong to an abandoned timeline (latest was pointed back):
        # they must not push the checkpoint just written out of the window
        done = sorted(p for p in self.root.glob("step_*")
                      if p.is_dir() and not p.name.endswith(".tmp") and p.name <= current.name)
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # -------------------------------------------------------------- disk space
    def _needed_bytes(self) -> int:
        last = self._last_committed()
        return max(ck.checkpoint_bytes(last) if last else 0, self._estimate or 0)

    def _last_committed(self) -> Path | None:
        marker = self.root / "latest"
        if marker.exists():
            path = self.root / marker.read_text().strip()
            if path.is_dir():
                return path
        return None

    def _check_space(self, step: int) -> None:
        need, free = self._needed_bytes(), shutil.disk_usage(self.root).free
        if free < need:
            ck.warn(f"{self.root} has {_fmt_bytes(free)} free but checkpoint step {step} needs about "
                    f"{_fmt_bytes(need)} (the size of the last one); the save will probably fail: free space "
                    f"or lower train.keep_checkpoints")

    def _failure(self, p: _Pending, reason: str) -> UserError:
        last = self._last_committed()
        kept = f"{last.name} is intact and resumable" if last else "there is no earlier checkpoint"
        inner = ck.root_error(p.error) if p.error else None
        full = (isinstance(inner, OSError) and inner.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in reason
        # torch's zip writer reports a short write as "unexpected pos", without the errno
        full = full or (self._needed_bytes() > shutil.disk_usage(self.root).free and "unexpected pos" in reason)
        if full:
            what = (f"no space left on device in {self.root} for checkpoint step {p.step}: it needs about "
                    f"{_fmt_bytes(self._needed_bytes())}, {_fmt_bytes(shutil.disk_usage(self.root).free)} are free")
        else:
            what = f"saving checkpoint step {p.step} into {self.root} failed ({reason})"
        return UserError(f"{what}; removed the partial {p.tmp.name}, {kept}; "
                         f"{'free space (or lower train.keep_checkpoints) and ' if full else ''}run again to resume")

    # -------------------------------------------------------------- loading
    def find_latest(self) -> Path | None:
        """Rank 0 picks the newest intact checkpoint (verifying checksums,
        converting an old-format one in place); every rank gets its path."""
        def pick():
            path = ck.latest_checkpoint(self.root)
            if path is not None and ck.is_legacy(path):
                from mtnlg.train.legacy_checkpoint import convert_legacy
                ck.warn(f"converting {path} from the old single-file format to sharded DCP (in place)")
                convert_legacy(path)
            return None if path is None else str(path)
        path = self._on_rank0(pick)
        return None if path is None else Path(path)

    def load(self, path: Path, targets: dict[str, torch.Tensor]) -> None:
        """Fill ``targets`` (DTensors read only their local shards); key or shape
        mismatches and unreadable files become one-line UserErrors on every rank."""
        import torch.distributed.checkpoint as dcp
        try:
            problem = check_targets(path, targets, ck.tensor_metadata(path))
        except UserError as e:
            problem = str(e)
        problem = next((r for r in self._gather(problem) if r), None)
        if problem:
            raise UserError(problem)
        error = None
        try:
            with ck.quiet_dcp():
                dcp.load(targets, checkpoint_id=str(Path(path) / ck.DCP_DIR), no_dist=self.world_size == 1)
        except ck.ERRORS as e:  # noqa: BLE001
            error = f"cannot read checkpoint {path}: {ck.short_error(e)}"
        error = next((r for r in self._gather(error) if r), None)
        if error:
            raise UserError(error)
