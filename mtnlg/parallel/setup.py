"""Check a layout, then build this rank's part of the model on the meta device
and parallelize it, in the documented order:

    GPT on meta ─▶ tensor parallel ─▶ pipeline stage split ─▶ activation checkpointing
      ─▶ compile ─▶ data parallel (FSDP2 for zero 1/2/3, replicate for zero 0)
      ─▶ to_empty(device) ─▶ initialise the local shards

No rank ever holds more than its own shards: the meta model has shapes only,
every transform keeps it on meta, and ``to_empty`` allocates only what the
rank keeps.  The initial values come from ``mtnlg.model.init``, keyed by
(seed, parameter name, element index), so every layout (one process, tp, pp,
dp, zero) starts from the same weights; ``mtnlg.parallel.init`` fills the
local pieces.  Returns the model (a ``StageView`` over several chunks for the
interleaved and zero-bubble schedules) and the ``Topology`` the trainer reads.
"""
from __future__ import annotations

import torch

from mtnlg.config import Config
from mtnlg.errors import UserError
from mtnlg.parallel.mesh import ParallelDims
from mtnlg.parallel.topology import Topology


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """Validate the layout before any work (raises UserError)."""
    from mtnlg.parallel.data import check_zero
    from mtnlg.train.schedule import rampup_sizes
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size)
    check_zero(cfg.parallel.zero, dims.dp, dims.pp, cfg.train.precision)
    if dims.pp > 1 and cfg.train.precision == "fp16":
        raise UserError(f"parallel.pp={dims.pp} does not support train.precision=fp16 (dynamic loss scaling) yet; "
                        f"use bf16 or fp32")
    t, unit = cfg.train, cfg.train.micro_batch * dims.dp
    if t.global_batch % unit:
        raise UserError(f"train.global_batch={t.global_batch} must be a multiple of micro_batch x dp = "
                        f"{t.micro_batch} x {dims.dp} = {unit}")
    if t.batch_rampup and min(rampup_sizes(t)) > t.global_batch:
        raise UserError(f"train.batch_rampup start {t.batch_rampup[0]} exceeds train.global_batch={t.global_batch}")
    p = cfg.parallel
    if dims.pp > 1 and p.pp_schedule == "zbv" and t.global_batch // unit < dims.pp:
        raise UserError(f"parallel.pp_schedule=zbv needs at least pp={dims.pp} micro-batches per step, but "
                        f"global_batch {t.global_batch} gives {t.global_batch // unit}; use 1f1b or gpipe")
    if dims.pp > 1 and p.pp_schedule == "zbv" and t.batch_rampup and min(rampup_sizes(t)) // unit < dims.pp:
        raise UserError(f"parallel.pp_schedule=zbv needs at least pp={dims.pp} micro-batches per step, but the "
                        f"batch ramp-up starts at {t.batch_rampup[0]}; use 1f1b (it runs GPipe for those steps)")
    if dims.pp > 1 and p.pp_schedule in ("zb", "zbv") and p.zero == 3 and dims.dp > 1:
        raise UserError(f"parallel.zero=3 with parallel.pp_schedule={p.pp_schedule}: zero-bubble schedules split "
                        f"backward in two and ZeRO-3 reshards parameters in between, which gives wrong weight "
                        f"gradients in torch 2.13; use zero 1 or 2 (inside a pipeline they shard gradients and "
                        f"optimizer state the same way) or pp_schedule 1f1b / interleaved")
    if dims.pp > 1 and (p.pp_schedule in ("zb", "zbv")) and t.compile:
        raise UserError(f"parallel.pp_schedule={p.pp_schedule} splits backward in two, which torch.compile'd "
                        f"stages do not support; set train.compile=false or use 1f1b / interleaved")
    return dims


def layout_warnings(cfg: Config, dims: ParallelDims) -> list[str]:
    """Legal but costly choices, one line each (the train command prints them)."""
    from mtnlg.parallel.schedules import chunks_per_rank, effective_schedule
    from mtnlg.train.schedule import rampup_sizes
    t, unit, out = cfg.train, cfg.train.micro_batch * dims.dp, []
    odd = [s for s in rampup_sizes(t) if s % unit]
    if odd:
        out.append(f"batch ramp-up sizes {odd[:4]}{' ...' if len(odd) > 4 else ''} are not multiples of micro_batch x "
                   f"dp = {unit}: each runs rounded down to a multiple (at least {unit})")
    if dims.pp > 1:
        few = min(max(unit, s // unit * unit) for s in rampup_sizes(t)) // unit
        if few < dims.pp:
            sched = cfg.parallel.pp_schedule
            used = effective_schedule(sched, few, dims.pp, chunks_per_rank(sched, cfg.parallel.virtual_stages))
            out.append(f"steps with {few} micro-batches on pp={dims.pp} stages leave most stages idle (bubble "
                       f"{(dims.pp - 1) / (few + dims.pp - 1):.0%}); they run the {used} schedule")
    return out


def _mesh(dims: ParallelDims, device: torch.device):
    return dims.build_mesh(device.type) if dims.world_size > 1 else None


def build(cfg: Config, dims: ParallelDims | None, device: torch.device, rank: int = 0,
          seed: int | None = None) -> tuple[torch.nn.Module, Topology]:
    """This rank's initialised, parallelized model and its Topology (module doc).
    ``dims=None`` is one process (no process group needed)."""
    from mtnlg.model.gpt import build_model
    from mtnlg.parallel import data
    from mtnlg.parallel.init import init_local_shards
    from mtnlg.train.precision import param_dtype

    p, seed = cfg.parallel, cfg.train.seed if seed is None else seed
    dims = dims or ParallelDims(dp=1, pp=1, tp=1, world_size=1)
    vocab = cfg.model.padded_vocab(dims.tp)
    dp_hooks = data.reduces_in_backward(p.zero, dims.dp, cfg.train.precision)
    # FSDP / replicate keep fp32 parameters (bf16 compute comes from their mixed-precision policy)
    dtype = torch.float32 if dp_hooks else param_dtype(cfg.train.precision)
    mesh = _mesh(dims, device)
    n_chunks = 1
    if dims.pp > 1:
        from mtnlg.parallel.schedules import chunks_per_rank
        n_chunks = chunks_per_rank(p.pp_schedule, p.virtual_stages)
    chunks = []
    for k in range(n_chunks):
        model = build_model(cfg.model, "meta", vocab_size=vocab).to(dtype)
        if dims.tp > 1:
            from mtnlg.parallel.tensor import apply_tensor_parallel
            apply_tensor_parallel(model, mesh["tp"], p.sequence_parallel)
        if dims.pp > 1:
            from mtnlg.parallel.pipeline import split_stage
            from mtnlg.parallel.schedules import placement
            split_stage(model, mesh["pp"].get_local_rank(), dims.pp, n_chunks, k, placement(p.pp_schedule))
        if cfg.train.activation_checkpointing:
            from mtnlg.train.ac import apply_activation_checkpointing
            apply_activation_checkpointing(model)
        if cfg.train.compile:
            model.compile()
        if dp_hooks:
            data.apply_data_parallel(model, mesh["dp"], p.zero, cfg.train.precision)
        tied = model.lm_head is not None and model.tok_emb is not None and model.lm_head.weight is model.tok_emb.weight
        model.to_empty(device=device)
        if tied and model.lm_head.weight is not model.tok_emb.weight:
            if dp_hooks:  # FSDP/replicate own the parameter objects: a broken tie cannot be mended here
                raise RuntimeError("to_empty untied the embedding of a data-parallel model")
            model.lm_head.weight = model.tok_emb.weight
        init_local_shards(model, seed)
        chunks.append(model)
    if dims.world_size == 1:
        return chunks[0], Topology()
    return _assemble(cfg, dims, chunks, mesh, device, rank, dp_hooks)


def _assemble(cfg, dims, chunks, mesh, device, rank, dp_hooks) -> tuple[torch.nn.Module, Topology]:
    from mtnlg.parallel import data
    from mtnlg.parallel import tensor as tp
    model = chunks[0]
    pp = {}
    if dims.pp > 1:
        from mtnlg.parallel.pipeline import StageView
        pp = _pipeline_fields(cfg, chunks, mesh["pp"], dims.pp, device, dims.dp)
        model = StageView(chunks) if len(chunks) > 1 else chunks[0]
    zero = cfg.parallel.zero if data.uses_fsdp(cfg.parallel.zero, dims.dp) else 0
    dp_mesh = mesh["dp"]
    sd = data if dp_hooks else tp  # full_state_dict / load_full_state_dict
    hook = data.micro_batch_hook(model, zero) if dp_hooks and dims.pp == 1 else (lambda last: None)
    return model, Topology(
        **pp, zero=zero, grads_reduced_in_backward=dp_hooks, before_micro_batch=hook,
        rank=rank, world_size=dims.world_size, dp_rank=dp_mesh.get_local_rank(), dp_size=dims.dp,
        dp_group=dp_mesh.get_group() if dims.dp > 1 else None, mesh=mesh,
        loss_context=lambda: tp.loss_context(model) if dims.pp == 1 else tp.loss_context(chunks[-1]),
        full_state_dict=sd.full_state_dict, load_full_state_dict=sd.load_full_state_dict,
        gather_logits=tp.gather_logits, local_value=tp.local_value, full_tensor=tp.local_value,
        shard_like=_shard_like)


def _shard_like(full: torch.Tensor, ref):
    """This rank's piece of a full tensor, placed like ``ref`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return full


def _pipeline_fields(cfg: Config, chunks: list, pp_mesh, pp: int, device: torch.device, dims_dp: int) -> dict:
    """The Topology fields of a pipeline rank.  Schedules are built lazily, one
    per (micro-batch count, batch rows, mode): batch ramp-up and evaluation
    change them, and a PipelineStage fixes its activation shapes on first use."""
    from mtnlg.parallel import pipeline as pl
    from mtnlg.parallel.schedules import eval_schedule_name

    pp_rank = pp_mesh.get_local_rank()
    group = pp_mesh.get_group()
    cache: dict = {}
    schedule = cfg.parallel.pp_schedule
    # zero 2/3 keep gradients (and zero 3 parameters) sharded between micro-batches: FSDP reduces per
    # micro-batch; zero 0/1, and 2/3 with parallel.zero_reduce=step, let PipelineStage reduce once per
    # step (see mtnlg/parallel/data.py)
    per_micro_batch = cfg.parallel.zero >= 2 and dims_dp > 1 and cfg.parallel.zero_reduce == "micro_batch"

    def pipeline(n_micro: int, rows: int, loss_fn, context=None, mode: str = "train"):
        name = schedule if mode == "train" else eval_schedule_name(schedule, len(chunks))
        key = (n_micro, rows, name)
        if key not in cache:
            stage = chunks if len(chunks) > 1 else chunks[0]
            cache[key] = pl.build_pipeline_schedule(stage, group, pp_rank, pp, n_micro, loss_fn,
                                                    schedule=name, device=device, context=context,
                                                    forward_only=mode != "train",
                                                    shell=per_micro_batch and name not in ("zb", "zbv"))
        return cache[key]

    return dict(pp_size=pp, pp_rank=pp_rank, pp_group=group,
                pp_first_rank=torch.distributed.get_global_rank(group, 0),
                pp_last_rank=torch.distributed.get_global_rank(group, 0 if schedule == "zbv" else pp - 1),
                pipeline=pipeline, tied_copies=pl.tied_copies(chunks),
                clip_grad_norm=lambda params, max_norm, skip=(): pl.clip_grad_norm_(params, max_norm, group, skip))
