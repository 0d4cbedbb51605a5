"""Parallelize a built model for the trainer, in the documented order:
tensor parallel -> pipeline stage split -> data parallel (gradient all-reduce
over the dp mesh by the trainer, or with ``parallel.zero`` > 0 FSDP2 sharding,
see mtnlg/parallel/data.py) -> activation checkpointing (by the caller).

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
    from mtnlg.parallel.data import check_zero
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size)
    check_zero(cfg.parallel.zero, dims.dp, dims.pp, cfg.train.precision)
    if dims.pp > 1 and cfg.train.precision == "fp16":
        raise UserError(f"parallel.pp={dims.pp} does not support train.precision=fp16 (dynamic loss scaling) yet; "
                        f"use bf16 or fp32")
    t, unit = cfg.train, cfg.train.micro_batch * dims.dp
    sizes = [t.global_batch] + ([t.batch_rampup[0], t.batch_rampup[1]] if t.batch_rampup else [])
    if any(size % unit for size in sizes):
        raise UserError(f"global batch / ramp-up sizes {sizes} must be multiples of micro_batch x dp = "
                        f"{t.micro_batch} x {dims.dp} = {unit}")
    if dims.pp > 1 and min(sizes) // unit < dims.pp:
        raise UserError(f"the 1F1B pipeline schedule needs at least pp={dims.pp} micro-batches per step, but the "
                        f"smallest global batch {min(sizes)} gives {min(sizes) // unit} (micro_batch x dp = {unit})")
    return dims


def parallelize(cfg: Config, model: torch.nn.Module, device: torch.device, rank: int,
                dims: ParallelDims) -> Topology:
    from mtnlg.parallel import data
    from mtnlg.parallel import tensor as tp

    mesh = dims.build_mesh(device.type)
    if dims.tp > 1:
        tp.apply_tensor_parallel(model, mesh["tp"], cfg.parallel.sequence_parallel)
    dp_mesh = mesh["dp"]
    pp = _apply_pipeline(model, mesh["pp"], dims.pp, device) if dims.pp > 1 else {}
    zero = cfg.parallel.zero if data.uses_fsdp(cfg.parallel.zero, dims.dp) else 0
    if zero:
        data.apply_data_parallel(model, dp_mesh, zero, cfg.train.precision)
    sd = data if zero else tp  # full_state_dict / load_full_state_dict
    return Topology(**pp,
        zero=zero, before_micro_batch=data.micro_batch_hook(model, zero),
        rank=rank, world_size=dims.world_size, dp_rank=dp_mesh.get_local_rank(), dp_size=dims.dp,
        dp_group=dp_mesh.get_group() if dims.dp > 1 else None, mesh=mesh,
        loss_context=lambda: tp.loss_context(model),
        full_state_dict=sd.full_state_dict, load_full_state_dict=sd.load_full_state_dict,
        gather_logits=tp.gather_logits, local_value=tp.local_value, full_tensor=tp.local_value,
        shard_like=_shard_like)


def _shard_like(full: torch.Tensor, ref):
    """This rank's piece of a full tensor, placed like ``ref`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return full


def _apply_pipeline(model: torch.nn.Module, pp_mesh, pp: int, device: torch.device) -> dict:
    """Cut ``model`` down to this rank's stage; return the Topology fields.
    Schedules are built lazily, one per (micro-batch count, batch rows):
    batch ramp-up and evaluation change them, and a PipelineStage fixes its
    activation shapes on first use."""
    from mtnlg.parallel import pipeline as pl

    pp_rank = pp_mesh.get_local_rank()
    pl.split_stage(model, pp_rank, pp)
    group = pp_mesh.get_group()
    cache: dict = {}

    def pipeline(n_micro: int, rows: int, loss_fn, context=None, schedule: str = "1f1b"):
        key = (n_micro, rows, schedule)
        if key not in cache:
            cache[key] = pl.build_pipeline_schedule(model, group, pp_rank, pp, n_micro, loss_fn,
                                                    schedule=schedule, device=device, context=context)
        return cache[key]

    return dict(pp_size=pp, pp_rank=pp_rank, pp_group=group,
                pp_first_rank=torch.distributed.get_global_rank(group, 0),
                pp_last_rank=torch.distributed.get_global_rank(group, pp - 1),
                pipeline=pipeline, tied_copies=pl.tied_copies(model),
                clip_grad_norm=lambda params, max_norm, skip=(): pl.clip_grad_norm_(params, max_norm, group, skip))
