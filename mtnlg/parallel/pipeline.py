"""Pipeline parallelism for ``GPT``: stage partitioning and schedules.

A stage is the same ``GPT`` with the parts of other stages removed
(``split_stage``): blocks outside the stage are deleted from the
``blocks`` ModuleDict, ``tok_emb``/``pos_emb``/``drop`` become None except on
the first stage, ``ln_f``/``lm_head`` None except on the last.  ``GPT.forward``
skips missing parts, so a stage maps tokens or hidden states to hidden states
or logits, and parameter names stay the full model's (checkpoints and
gradient comparisons line up across layouts).

Layers are split as evenly as possible with the remainder on the *first*
stages (``mtnlg.plan.layout.stage_layers``, shared with the planner): the
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

Schedules come from ``torch.distributed.pipelining`` (``PipelineStage`` +
``Schedule1F1B`` / ``ScheduleGPipe`` / ``ScheduleInterleaved1F1B``), wrapped
by ``PipelineSchedule.step(inputs, targets)``.  The loss function returns the
*mean* loss of one micro-batch; the schedule divides gradients by the number
of micro-batches, so gradients equal those of the mean loss over the whole
batch, and the last stage returns the per-micro-batch losses (their mean is
the batch loss).
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
from mtnlg.plan.layout import stage_layers

SCHEDULE_NAMES = ("1f1b", "gpipe", "interleaved")


# --------------------------------------------------------------- partitioning
def stage_block_ids(n_layers: int, n_stages: int, stage: int) -> list[int]:
    """The contiguous, balanced run of block indices of ``stage``."""
    counts = stage_layers(n_layers, n_stages)
    start = sum(counts[:stage])
    return list(range(start, start + counts[stage]))


def split_stage(model: GPT, pp_rank: int, pp_size: int, virtual_stages: int = 1, chunk: int = 0) -> GPT:
    """Keep only this stage's parts of ``model`` (in place) and return it.

    With ``virtual_stages = v > 1`` (interleaved 1F1B) the model is cut into
    ``pp_size * v`` stages and this is chunk ``chunk`` of rank ``pp_rank``:
    global stage ``pp_rank + chunk * pp_size`` (Megatron's round-robin
    placement); build one full model per chunk and split each.  Call after
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
    stage = pp_rank + chunk * pp_size
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
def sync_tied_embedding_grads(model: GPT | Sequence[GPT], pp_group_or_mesh) -> None:
    """Sum the gradients of the tied input/output embedding between the first
    stage (``tok_emb.weight``) and the last stage (``lm_head.weight``), so both
    hold the full-model gradient.  Call after the backward of every step,
    before clipping and the optimizer.  ``model`` may be this rank's list of
    chunks (interleaved).  A no-op when pp == 1 or the rank holds neither;
    under tensor parallelism each tp rank exchanges its own shard with the
    matching tp rank of the other end (the pp group is per tp coordinate)."""
    group = _pp_group(pp_group_or_mesh)
    if group is None or dist.get_world_size(group) == 1:
        return
    pp = dist.get_world_size(group)
    mine = []
    for m in _chunks(model):
        stage, n_stages = stage_of(m)
        if stage == 0 and m.tok_emb is not None:
            mine.append((m.tok_emb.weight, dist.get_global_rank(group, pp - 1)))
        if stage == n_stages - 1 and m.lm_head is not None and n_stages > 1:
            mine.append((m.lm_head.weight, dist.get_global_rank(group, 0)))
    if not mine:
        return
    ops, bufs = [], []
    for p, peer in mine:
        if p.grad is None:  # a stage whose copy saw no gradient still takes part
            p.grad = torch.zeros_like(p)
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


# ------------------------------------------------------------------ schedule
def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class PipelineSchedule:
    """One rank's share of a pipeline: its stage(s) and a schedule.

    ``step(inputs, targets)`` runs forward and backward of the whole local
    batch (n_microbatches * micro_batch rows) and leaves the gradients,
    already divided by ``n_microbatches`` and with the tied-embedding
    gradients summed between first and last stage
    (``sync_tied_embedding_grads``), in the stage parameters; gradients
    accumulate into existing ``.grad`` (zero them between steps).  Every
    rank of the pp group passes the same batch (only the first stage reads
    ``inputs``, only the last ``targets``); the last stage returns the
    per-micro-batch losses as a 1-D tensor, the others None.  ``context``
    (e.g. autocast) is entered around the whole step; on a last stage under
    tensor parallelism ``loss_parallel()`` is too, so the vocabulary-parallel
    loss and its backward work."""

    def __init__(self, stages: list, schedule, n_microbatches: int, group: dist.ProcessGroup | None,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 sync_tied: bool = True):
        self.stages, self.schedule, self.n_microbatches = stages, schedule, n_microbatches
        self.group, self.sync_tied = group, sync_tied
        self.context = context or contextlib.nullcontext
        self.is_first = any(s.is_first for s in stages)
        self.is_last = any(s.is_last for s in stages)
        last = [s.submod for s in stages if s.is_last]
        from mtnlg.parallel.tensor import loss_context
        self._loss_context = (lambda: loss_context(last[0])) if last else contextlib.nullcontext

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        return self._run(inputs, targets, train=True)

    @torch.no_grad()
    def eval(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Forward only (validation): the same batch contract as ``step``;
        the last stage returns the per-micro-batch losses."""
        return self._run(inputs, targets, train=False)

    def _run(self, inputs, targets, train: bool) -> torch.Tensor | None:
        n = self.n_microbatches
        for name, t, needed in (("inputs", inputs, self.is_first), ("targets", targets, self.is_last)):
            if needed and (t is None or t.shape[0] % n):
                raise UserError(f"pipeline {name} of shape {None if t is None else tuple(t.shape)}: the batch "
                                f"must split into n_microbatches={n} equal micro-batches")
        args = (inputs,) if self.is_first else ()
        losses: list[torch.Tensor] = []
        with self.context(), self._loss_context():
            target = targets if self.is_last else None
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                self.schedule.eval(*args, target=target, losses=losses, return_outputs=False)
        if train:
            for stage in self.stages:
                _match_grad_placements(stage.submod)
            if self.sync_tied:
                sync_tied_embedding_grads([st.submod for st in self.stages], self.group)
        if not self.is_last:
            return None
        return torch.stack([_full(l.detach()) for l in losses])


def _match_grad_placements(model: nn.Module) -> None:
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


def build_pipeline_schedule(stage_model: GPT | Sequence[GPT], pp_group_or_mesh, pp_rank: int, pp_size: int,
                            n_microbatches: int, loss_fn: Callable = cross_entropy_loss,
                            schedule: str = "1f1b", device: torch.device | str = "cpu",
                            context: Callable[[], contextlib.AbstractContextManager] | None = None
                            ) -> PipelineSchedule:
    """Wrap this rank's stage (or, for ``schedule="interleaved"``, its list
    of chunks from ``split_stage(..., virtual_stages=v, chunk=k)``, k = 0..v-1)
    in ``PipelineStage``s over the pp group and build the named schedule."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)
    if schedule not in SCHEDULE_NAMES:
        raise UserError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    chunks = _chunks(stage_model)
    if (schedule == "interleaved") != (len(chunks) > 1):
        raise UserError(f"schedule {schedule!r} with {len(chunks)} model chunks per rank: the interleaved "
                        "schedule takes a list of virtual-stage chunks, the others exactly one stage")
    n_stages = pp_size * len(chunks)
    for k, m in enumerate(chunks):
        if stage_of(m) != (pp_rank + k * pp_size, n_stages) and n_stages > 1:
            raise UserError(f"chunk {k} is stage {stage_of(m)}, expected ({pp_rank + k * pp_size}, {n_stages}): "
                            "split it with split_stage(model, pp_rank, pp_size, virtual_stages, chunk)")
    if n_microbatches < pp_size and schedule != "gpipe":
        raise UserError(f"n_microbatches={n_microbatches} must be >= pp={pp_size} (global_batch / (micro_batch * dp)); "
                        "fewer leave stages idle and 1F1B refuses them (GPipe accepts any count, e.g. for evaluation)")
    if schedule == "interleaved" and n_microbatches % pp_size:
        raise UserError(f"the interleaved schedule needs n_microbatches={n_microbatches} divisible by pp={pp_size}")
    group = _pp_group(pp_group_or_mesh)
    device = torch.device(device)
    stages = [PipelineStage(m, pp_rank + k * pp_size, n_stages, device, group=group) for k, m in enumerate(chunks)]
    if schedule == "interleaved":
        sched = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=True)
    else:
        cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        sched = cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=True)
    return PipelineSchedule(stages, sched, n_microbatches, group, context)


def copy_for_chunks(model: GPT, virtual_stages: int) -> list[GPT]:
    """``virtual_stages`` independent copies of a whole (not yet tensor-
    parallel) model, one per interleaved chunk; split each with
    ``split_stage(..., chunk=k)``."""
    return [model] + [copy.deepcopy(model) for _ in range(virtual_stages - 1)]
