"""Parallelize a built model for the trainer, in the documented order:
tensor parallel -> (pipeline stages: not yet) -> activation checkpointing (by
the caller) -> data parallel (gradient all-reduce over the dp mesh).

Returns the ``Topology`` the trainer reads; the model itself stays the plain
GPT, with its parameters turned into DTensors by tensor parallelism.
"""
from __future__ import annotations

import torch

from mtnlg.config import Config
from mtnlg.errors import UserError
from mtnlg.parallel.mesh import ParallelDims
from mtnlg.train.topology import Topology


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """Validate the layout before any work (raises UserError)."""
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size)
    if dims.pp > 1:
        raise UserError(f"parallel.pp={dims.pp}: the trainer does not run pipeline stages yet (the stage "
                        f"split and 1F1B schedule in mtnlg.parallel.pipeline are tested, but checkpointing a "
                        f"pipelined run is not); use tp/dp, or `mtnlg plan` to study pipeline layouts")
    t, unit = cfg.train, cfg.train.micro_batch * dims.dp
    sizes = [t.global_batch] + ([t.batch_rampup[0], t.batch_rampup[1]] if t.batch_rampup else [])
    if any(size % unit for size in sizes):
        raise UserError(f"global batch / ramp-up sizes {sizes} must be multiples of micro_batch x dp = "
                        f"{t.micro_batch} x {dims.dp} = {unit}")
    return dims


def parallelize(cfg: Config, model: torch.nn.Module, device: torch.device, rank: int,
                dims: ParallelDims) -> Topology:
    from mtnlg.parallel import tensor as tp

    mesh = dims.build_mesh(device.type)
    if dims.tp > 1:
        tp.apply_tensor_parallel(model, mesh["tp"], cfg.parallel.sequence_parallel)
    dp_mesh = mesh["dp"]
    return Topology(
        rank=rank, world_size=dims.world_size, dp_rank=dp_mesh.get_local_rank(), dp_size=dims.dp,
        dp_group=dp_mesh.get_group() if dims.dp > 1 else None, mesh=mesh,
        loss_context=lambda: tp.loss_context(model),
        full_state_dict=tp.full_state_dict, load_full_state_dict=tp.load_full_state_dict,
        gather_logits=tp.gather_logits, local_value=tp.local_value, full_tensor=tp.local_value,
        shard_like=_shard_like)


def _shard_like(full: torch.Tensor, ref):
    """This rank's piece of a full tensor, placed like ``ref`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return full
