"""Process topology: the data × pipeline × tensor layout and its DeviceMesh.

MT-NLG places the 8 tensor-parallel ranks of a layer inside one DGX node
(NVLink), pipeline stages across nodes and data parallelism outermost.  With
torchrun numbering ranks node by node (``RANK = node * nproc_per_node +
local_rank``), a row-major mesh of shape ``(dp, pp, tp)`` puts consecutive
ranks in one tensor-parallel group, so tp innermost means "tp within a node".

``ParallelDims`` is the one validated object the rest of the code receives;
there is no module-level parallel state.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtnlg.errors import UserError

MESH_DIM_NAMES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """A validated (dp, pp, tp) layout over ``world_size`` ranks."""

    dp: int
    pp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, parallel_cfg, model_cfg, world_size: int) -> "ParallelDims":
        """Resolve ``dp=0`` to ``world_size / (tp*pp)`` and check the layout
        fits the world and the model, before any work is done."""
        tp, pp, dp = parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.dp
        if world_size < 1:
            raise UserError(f"world size must be >= 1, got {world_size}")
        for name, v in (("tp", tp), ("pp", pp)):
            if v < 1:
                raise UserError(f"parallel.{name} must be >= 1, got {v}")
        if dp < 0:
            raise UserError(f"parallel.dp must be >= 0 (0 = infer), got {dp}")
        if world_size % (tp * pp):
            raise UserError(
                f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
                f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp")
        if dp == 0:
            dp = world_size // (tp * pp)
        if dp * pp * tp != world_size:
            raise UserError(
                f"dp*pp*tp = {dp}*{pp}*{tp} = {dp * pp * tp} does not equal the world size {world_size}; "
                f"set parallel.dp={world_size // (tp * pp)} or parallel.dp=0 to infer it")
        m = model_cfg
        if m.n_heads % tp:
            raise UserError(f"parallel.tp={tp} must divide model.n_heads={m.n_heads} (attention heads are split across tensor-parallel ranks)")
        if m.ffn % tp:
            raise UserError(f"parallel.tp={tp} must divide the MLP width {m.ffn}")
        if m.hidden % tp:
            raise UserError(f"parallel.tp={tp} must divide model.hidden={m.hidden}")
        if pp > m.n_layers:
            raise UserError(f"parallel.pp={pp} exceeds model.n_layers={m.n_layers}; each pipeline stage needs at least one layer")
        if getattr(parallel_cfg, "sequence_parallel", False) and m.seq_len % tp:
            raise UserError(f"sequence parallelism shards the sequence: parallel.tp={tp} must divide model.seq_len={m.seq_len}")
        return cls(dp=dp, pp=pp, tp=tp, world_size=world_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (tp innermost)."""
        return {"dp": rank // (self.pp * self.tp), "pp": (rank // self.tp) % self.pp, "tp": rank % self.tp}

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A (dp, pp, tp) DeviceMesh; needs an initialised default process group
        of ``world_size`` ranks.  Slice it by name: ``mesh["tp"]``."""
        if not dist.is_initialized():
            raise UserError("build_mesh needs torch.distributed initialised (launch with torchrun)")
        if dist.get_world_size() != self.world_size:
            raise UserError(f"process group has {dist.get_world_size()} ranks but the layout expects {self.world_size}")
        return init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIM_NAMES)


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """auto (cuda if available), cpu or cuda:local_rank; a clear error otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda was requested but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: int = 1800,
                     device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK.

    Returns (rank, world_size, device).  A single process (WORLD_SIZE unset or
    1) creates no process group.  ``backend='auto'`` picks nccl on CUDA and
    gloo on CPU.  On CPU each rank gets ``cpu_count // local_world_size``
    intra-op threads so ranks sharing a machine do not oversubscribe it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    dev = pick_device(device, local_rank)
    if world_size <= 1:
        return 0, 1, dev
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise UserError(f"parallel.backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("parallel.backend=nccl needs CUDA devices; use gloo on CPU")
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return dist.get_rank(), dist.get_world_size(), dev
