"""Pipeline parallelism for ``GPT``: stage partitioning and schedules.

A stage is the same ``GPT`` with the parts of other stages removed
(``split_stage``): blocks outside the stage are deleted from the
``blocks`` ModuleDict, ``tok_emb``/``pos_emb``/``drop`` become None except on
the first stage, ``ln_f``/``lm_head`` None except on the last.  ``GPT.forward``
skips missing parts, so a stage maps tokens or hidden states to hidden states
or logits, and parameter names stay the full model's (checkpoints and
gradient comparisons line up across layouts).

Layers are split as evenly as possible with the remainder on the *first*
stages (``mtnlg.parallel.stages``, shared with the planner): the
last stage also runs the output layer and the loss, so it never takes an
extra block.  The embedding lookup (first stage) is cheap in compute; its
table, like the head's, costs ``V*h`` parameters on the first and last stage.

Tied embeddings (Megatron's embedding group): with ``pp > 1`` the first stage
owns ``tok_emb.weight`` and the last stage owns ``lm_head.weight`` as a
separate parameter initialised from the same full weights.  After each
backward ``sync_tied_embedding_grads`` sums the two gradients (a pairwise
exchange between the first and last rank of the pipeline group), so both
copies receive the full-model gradient and, updated by the same optimizer
from the same state, stay equal.  ``PipelineSchedule.step`` does this
exchange itself.  ``clip_grad_norm_`` counts that shared weight once (on
the first stage; ``tied_copies`` names the last stage's copy) and all-reduces
the squared norm over the pp group, so clipping matches the single-process
model.

Schedules (``mtnlg.parallel.schedules``) come from
``torch.distributed.pipelining``, wrapped by ``PipelineSchedule.step(inputs,
targets)``.  The loss function returns the *mean* loss of one micro-batch;
the schedule divides gradients by the number of micro-batches, so gradients
equal those of the mean loss over the whole batch, and the last stage
returns the per-micro-batch losses (their mean is the batch loss).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mtnlg.errors import UserError
from mtnlg.model.gpt import GPT
from mtnlg.parallel.stages import rank_stages, stage_block_ids

SCHEDULE_NAMES = ("1f1b", "gpipe", "interleaved")


# --------------------------------------------------------------- partitioning
def split_stage(model: GPT, pp_rank: int, pp_size: int, virtual_stages: int = 1, chunk: int = 0,
                style: str = "loop") -> GPT:
    """Keep only this stage's parts of ``model`` (in place) and return it.

    With ``virtual_stages = v > 1`` (interleaved 1F1B) the model is cut into
    ``pp_size * v`` stages and this is chunk ``chunk`` of rank ``pp_rank``:
    global stage ``pp_rank + chunk * pp_size`` (Megatron's round-robin
    placement; ``style="v"``: stages r and 2p-1-r, for ZBV); build one full
    model per chunk and split each.  Call after
    tensor parallelism.  Works on meta models (the dry run uses it)."""
    n_stages = pp_size * virtual_stages
    if not (0 <= pp_rank < pp_size and 0 <= chunk < virtual_stages):
        raise UserError(f"pipeline stage (rank {pp_rank}, chunk {chunk}) is outside pp={pp_size} x "
                        f"virtual_stages={virtual_stages}")
    n_layers = len(model.blocks)
    if n_stages > n_layers:
        raise UserError(f"{n_stages} pipeline stages (pp={pp_size} x virtual_stages={virtual_stages}) exceed the "
                        f"model's {n_layers} layers; each stage needs at least one layer")
    if n_stages == 1:
        return model
    if model.tok_emb is None or model.lm_head is None or n_layers != model.cfg.n_layers:
        raise UserError("split_stage expects the whole model (it is already split)")
    stage = rank_stages(pp_rank, pp_size, virtual_stages, style)[chunk]
    keep = {str(i) for i in stage_block_ids(n_layers, n_stages, stage)}
    for name in [n for n in model.blocks.keys() if n not in keep]:
        del model.blocks[name]
    last = stage == n_stages - 1
    if last and model.lm_head.weight is model.tok_emb.weight:
        # untie: the last stage gets its own copy of the (full) shared weight
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone(),
                                            requires_grad=model.tok_emb.weight.requires_grad)
    if stage != 0:
        model.tok_emb = model.pos_emb = model.drop = None
    if not last:
        model.ln_f = model.lm_head = None
    model._mtnlg_stage = (stage, n_stages)
    return model


def stage_of(model: GPT) -> tuple[int, int]:
    """(stage index, number of stages) of a split model; (0, 1) if whole."""
    return getattr(model, "_mtnlg_stage", (0, 1))


def _pp_group(pp_group_or_mesh) -> dist.ProcessGroup | None:
    if pp_group_or_mesh is None or isinstance(pp_group_or_mesh, dist.ProcessGroup):
        return pp_group_or_mesh
    return pp_group_or_mesh.get_group()  # a 1-D DeviceMesh


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _chunks(model_or_chunks) -> list[GPT]:
    return list(model_or_chunks) if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]


# ------------------------------------------------------------ tied embedding
def sync_tied_embedding_grads(model: GPT | Sequence[GPT], pp_group_or_mesh, last_rank: int | None = None) -> None:
    """Sum the gradients of the tied input/output embedding between the first
    stage (``tok_emb.weight``) and the last stage (``lm_head.weight``), so both
    hold the full-model gradient.  Call after the backward of every step,
    before clipping and the optimizer.  ``model`` may be this rank's list of
    chunks (interleaved).  A no-op when pp == 1 or the rank holds neither;
    under tensor parallelism each tp rank exchanges its own shard with the
    matching tp rank of the other end (the pp group is per tp coordinate).
    ``last_rank`` is the pp rank holding the last stage (default pp-1; 0 for
    the V placement, where both ends live on one rank and are summed locally)."""
    group = _pp_group(pp_group_or_mesh)
    if group is None or dist.get_world_size(group) == 1:
        return
    pp = dist.get_world_size(group)
    last_rank = pp - 1 if last_rank is None else last_rank
    mine = []
    for m in _chunks(model):
        stage, n_stages = stage_of(m)
        if stage == 0 and m.tok_emb is not None:
            mine.append((m.tok_emb.weight, dist.get_global_rank(group, last_rank)))
        if stage == n_stages - 1 and m.lm_head is not None and n_stages > 1:
            mine.append((m.lm_head.weight, dist.get_global_rank(group, 0)))
    for p, _ in mine:
        if p.grad is None:  # a stage whose copy saw no gradient still takes part
            p.grad = torch.zeros_like(p)
    if len(mine) == 2 and last_rank == 0:  # both ends on this rank
        a, b = (_local(p.grad) for p, _ in mine)
        a.add_(b)
        b.copy_(a)
        return
    if not mine:
        return
    ops, bufs = [], []
    for p, peer in mine:
        send = _local(p.grad).contiguous()  # gloo cannot send non-contiguous tensors
        recv = torch.empty_like(send)
        ops += [dist.P2POp(dist.isend, send, peer, group), dist.P2POp(dist.irecv, recv, peer, group)]
        bufs.append((p, recv))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    for p, recv in bufs:
        _local(p.grad).add_(recv)


# ---------------------------------------------------------- gradient norm/clip
def tied_copies(model: GPT | Sequence[GPT]) -> list[nn.Parameter]:
    """The last stage's copy of the tied embedding (``lm_head.weight``), if this
    rank holds it: it is clipped but not counted in the global gradient norm
    (the first stage counts the shared weight once, as the whole model does)."""
    out = []
    for m in _chunks(model):
        stage, n_stages = stage_of(m)
        if n_stages > 1 and stage == n_stages - 1 and m.lm_head is not None:
            out.append(m.lm_head.weight)
    return out


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float, pp_group_or_mesh,
                    skip_in_norm: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Clip the gradients of all pipeline stages by their global L2 norm and
    return the norm (a plain tensor, the same on every rank of the pp group).

    This rank's squared norm over ``params`` minus ``skip_in_norm`` (matched
    by identity; pass ``tied_copies(model)`` or the matching optimizer
    copies) is all-reduced over the pp group; tensor-parallel gradients are
    DTensors whose norm DTensor reduces over tp.  Data-parallel replicas hold
    averaged, identical gradients, so there is no dp reduction.  Every
    parameter of ``params`` is scaled, the skipped ones included."""
    skip = {id(p) for p in skip_in_norm}
    grads = [p.grad for p in params if p.grad is not None]
    counted = [p.grad for p in params if p.grad is not None and id(p) not in skip]
    sq = torch.nn.utils.get_total_norm(counted, 2.0) ** 2 if counted else torch.zeros(())
    sq = _full(sq).float()
    group = _pp_group(pp_group_or_mesh)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    if max_norm < float("inf") and grads:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0).item()
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total


def match_grad_placements(model: nn.Module) -> None:
    """Under tensor parallelism the input embedding of a first stage (no tied
    head in its graph) receives a Replicate gradient for its Shard(0) table;
    keep this rank's rows (a local slice, no communication) so every grad is
    placed like its parameter for the tied-grad exchange, clipping and AdamW."""
    for p in model.parameters():
        g = p.grad
        if g is not None and hasattr(g, "placements") and g.placements != p.placements:
            p.grad = g.redistribute(g.device_mesh, p.placements)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def copy_for_chunks(model: GPT, virtual_stages: int) -> list[GPT]:
    """``virtual_stages`` independent copies of a whole (not yet tensor-
    parallel) model, one per interleaved chunk; split each with
    ``split_stage(..., chunk=k)``."""
    return [model] + [copy.deepcopy(model) for _ in range(virtual_stages - 1)]


class StageView(nn.Module):
    """This rank's model chunks (interleaved / zero-bubble schedules) seen
    as one module with the full model's parameter names: ``tok_emb``,
    ``blocks`` (the union of the chunks' blocks), ``ln_f``, ``lm_head``
    are the chunks' own modules, so the optimizer, clipping and state dicts
    see each parameter once under its usual name.  ``chunks`` holds the
    stage modules the schedule runs; forward is not defined."""

    def __init__(self, chunks: Sequence[GPT]):
        super().__init__()
        object.__setattr__(self, "chunks", list(chunks))
        first = chunks[0]
        self.cfg, self.vocab_size = first.cfg, first.vocab_size
        for part in ("tok_emb", "pos_emb", "drop", "ln_f", "lm_head"):
            setattr(self, part, next((getattr(c, part) for c in chunks if getattr(c, part) is not None), None))
        blocks = {k: b for c in chunks for k, b in c.blocks.items()}
        self.blocks = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})

    def forward(self, *args, **kwargs):  # pragma: no cover - the schedule runs the chunks
        raise RuntimeError("a StageView is not callable: run its chunks through the pipeline schedule")


def model_chunks(model: nn.Module) -> list[nn.Module]:
    """The stage modules a schedule runs: a StageView's chunks, else [model]."""
    return list(getattr(model, "chunks", None) or [model])


from mtnlg.parallel.schedules import (SCHEDULE_NAMES, PipelineSchedule,  # noqa: E402,F401  (re-exported)
                                      build_pipeline_schedule, cross_entropy_loss)
