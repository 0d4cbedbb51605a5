"""Pipeline schedules from ``torch.distributed.pipelining``, chosen by name,
with a fallback for micro-batch counts a schedule refuses, and the bubble
(idle fraction of a step) measured next to its analytic value.

    name         torch class                     chunks/rank  placement
    gpipe        ScheduleGPipe                   1            -
    1f1b         Schedule1F1B                    1            -
    interleaved  ScheduleInterleaved1F1B         v            loop (r, r+p, ...)
    zb           ScheduleInterleavedZeroBubble   v (>= 1)     loop        (ZB1P, Qi et al. 2024)
    zbv          ScheduleZBVZeroBubble           2            V (r, 2p-1-r)

``v`` is ``parallel.virtual_stages``.  A replica with fewer micro-batches
than pipeline stages (MT-NLG's batch ramp-up: 4 micro-batches on 35
stages) is legal: 1F1B then degenerates to GPipe, and torch's
``Schedule1F1B`` refuses it, so such steps run GPipe; looped multi-chunk
schedules fall back to ``ScheduleLoopedBFS`` (breadth-first, any count)
when their round structure does not divide the micro-batches.

Analytic bubble (idle fraction of a step, equal stage times, F = B = W for
the zero-bubble schedules, ``p`` stages per replica, ``m`` micro-batches):

    gpipe, 1f1b              (p-1) / (m + p-1)
    interleaved, v chunks    (p-1) / (v*m + p-1)       (Narayanan et al. 2021)
    zb (ZB1P)                (p-1) / (3*v*m + p-1)     (bubble ~1/3 of 1F1B's: W fills it)
    zbv                      0 once m >= 2p-1, else as zb with v=2
    loopedbfs                (p-1) / (v*m + p-1)

Measured bubble: each rank times its compute (the stages' forward, input-
and weight-backward calls and the loss) inside a step; its bubble is
``1 - compute / step wall time``; the value reported is the mean over the
pipeline ranks.  On a shared CPU this includes scheduling noise.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mtnlg.errors import UserError
from mtnlg.parallel.stages import (SCHEDULE_NAMES, analytic_bubble, chunks_per_rank,  # noqa: F401
                                   effective_schedule, placement, rank_stages)



def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _ComputeTimer:
    """Accumulates the seconds spent inside wrapped methods."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, obj, name: str) -> None:
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        setattr(obj, name, timed)


class PipelineSchedule:
    """One rank's share of a pipeline: its stage(s) and a schedule.

    ``step(inputs, targets)`` runs forward and backward of the whole local
    batch (n_microbatches * micro_batch rows) and leaves the gradients,
    already divided by ``n_microbatches`` and with the tied-embedding
    gradients summed between first and last stage, in the stage parameters;
    gradients accumulate into existing ``.grad`` (zero them between steps).
    Every rank of the pp group passes the same batch (only the first stage
    reads ``inputs``, only the last ``targets``); the last stage returns the
    per-micro-batch losses as a 1-D tensor, the others None.  ``context``
    (e.g. autocast) is entered around the whole step; on a last stage under
    tensor parallelism ``loss_parallel()`` is too.  After a training step
    ``bubble`` (measured, mean over the pp ranks) and ``bubble_analytic``
    describe it; ``name`` is the schedule that ran (after any fallback)."""

    def __init__(self, stages: list, schedule, n_microbatches: int, group: dist.ProcessGroup | None,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 sync_tied: bool = True, name: str = "", bubble_analytic: float = 0.0, style: str = "loop"):
        self.stages, self.schedule, self.n_microbatches = stages, schedule, n_microbatches
        self.group, self.sync_tied, self.style = group, sync_tied, style
        self.name, self.bubble_analytic, self.bubble = name, bubble_analytic, None
        self.context = context or contextlib.nullcontext
        self.is_first = any(s.is_first for s in stages)
        self.is_last = any(s.is_last for s in stages)
        last = [s.submod for s in stages if s.is_last]
        from mtnlg.parallel.tensor import loss_context
        self._loss_context = (lambda: loss_context(last[0])) if last else contextlib.nullcontext
        self._timer = _ComputeTimer()
        for st in stages:
            for method in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                self._timer.wrap(st, method)
        if hasattr(schedule, "_maybe_compute_loss"):
            self._timer.wrap(schedule, "_maybe_compute_loss")

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        return self._run(inputs, targets, train=True)

    @torch.no_grad()
    def eval(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Forward only (validation): the same batch contract as ``step``;
        the last stage returns the per-micro-batch losses."""
        return self._run(inputs, targets, train=False)

    def _run(self, inputs, targets, train: bool) -> torch.Tensor | None:
        from mtnlg.parallel.pipeline import match_grad_placements, sync_tied_embedding_grads
        n = self.n_microbatches
        for name, t, needed in (("inputs", inputs, self.is_first), ("targets", targets, self.is_last)):
            if needed and (t is None or t.shape[0] % n):
                raise UserError(f"pipeline {name} of shape {None if t is None else tuple(t.shape)}: the batch "
                                f"must split into n_microbatches={n} equal micro-batches")
        args = (inputs,) if self.is_first else ()
        losses: list[torch.Tensor] = []
        self._timer.seconds = 0.0
        t0 = time.perf_counter()
        with self.context(), self._loss_context():
            target = targets if self.is_last else None
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                self.schedule.eval(*args, target=target, losses=losses, return_outputs=False)
        if train:
            wall = time.perf_counter() - t0
            self._measure_bubble(wall)
            for stage in self.stages:
                match_grad_placements(stage.submod)
            if self.sync_tied:
                sync_tied_embedding_grads([st.submod for st in self.stages], self.group,
                                          last_rank=0 if self.style == "v" else None)
        if not self.is_last:
            return None
        return torch.stack([_full(l.detach()) for l in losses])

    def _measure_bubble(self, wall: float) -> None:
        idle = torch.tensor([max(0.0, 1.0 - self._timer.seconds / wall) if wall > 0 else 0.0],
                            dtype=torch.float64)
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(idle, group=self.group)
            idle /= dist.get_world_size(self.group)
        self.bubble = float(idle)


def _forward_only_v():
    """ZBV's V placement with a forward-only order (rank r: stage r for every
    micro-batch, then stage 2p-1-r), for evaluation: torch's ZBV order always
    contains backward actions, which its ``eval`` does not skip."""
    from torch.distributed.pipelining import ScheduleZBVZeroBubble
    from torch.distributed.pipelining.schedules import (_Action, _add_send_recv, _add_unshard_reshard,
                                                        _ComputationType)

    class ForwardOnlyV(ScheduleZBVZeroBubble):
        def _prepare_schedule_with_comms(self, actions, format="compute_only") -> None:
            # torch's validator insists on a backward per forward: lower the order without it
            # (the V stage->rank mapping was set by ScheduleZBVZeroBubble.__init__)
            for stage in self._stages:
                stage.stage_index_to_group_rank = self.stage_index_to_group_rank
            self.pipeline_order_with_comms = _add_send_recv(
                {rank: _add_unshard_reshard(ops) for rank, ops in actions.items()},
                stage_to_rank=lambda s: self.stage_index_to_group_rank[s], num_stages=self._num_stages)

        def _calculate_single_rank_operations(self, rank):
            last = self.num_stages - 1 - rank
            return [_Action(stage, _ComputationType.FORWARD, mb)
                    for stage in (rank, last) for mb in range(self._n_microbatches)]
    return ForwardOnlyV


def build_pipeline_schedule(stage_model, pp_group_or_mesh, pp_rank: int, pp_size: int,
                            n_microbatches: int, loss_fn: Callable = cross_entropy_loss,
                            schedule: str = "1f1b", device: torch.device | str = "cpu",
                            context: Callable[[], contextlib.AbstractContextManager] | None = None,
                            forward_only: bool = False) -> PipelineSchedule:
    """Wrap this rank's stage (or its list of chunks from ``split_stage(...,
    virtual_stages=v, chunk=k, style=placement(schedule))``) in
    ``PipelineStage``s over the pp group and build the named schedule, or
    the fallback that accepts ``n_microbatches`` (module doc).  A
    ``forward_only`` schedule serves ``eval`` only (needed for zbv)."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                              ScheduleLoopedBFS, ScheduleZBVZeroBubble)
    from mtnlg.parallel.pipeline import _chunks, _pp_group, stage_of
    chunks = _chunks(stage_model)
    if schedule not in SCHEDULE_NAMES:
        raise UserError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if schedule in ("gpipe", "1f1b") and len(chunks) != 1:
        raise UserError(f"schedule {schedule!r} runs one stage per rank, got {len(chunks)} model chunks; "
                        "use interleaved, zb or zbv for several (parallel.virtual_stages)")
    if schedule == "interleaved" and len(chunks) < 2:
        raise UserError("the interleaved schedule needs parallel.virtual_stages >= 2 model chunks per rank")
    if schedule == "zbv" and len(chunks) != 2:
        raise UserError(f"the zbv schedule places exactly 2 model chunks per rank in a V, got {len(chunks)}")
    style = placement(schedule)
    n_stages = pp_size * len(chunks)
    expected = rank_stages(pp_rank, pp_size, len(chunks), style)
    for k, m in enumerate(chunks):
        if n_stages > 1 and stage_of(m) != (expected[k], n_stages):
            raise UserError(f"chunk {k} is stage {stage_of(m)}, expected ({expected[k]}, {n_stages}): split it "
                            f"with split_stage(model, pp_rank, pp_size, virtual_stages, chunk, style={style!r})")
    name = effective_schedule(schedule, n_microbatches, pp_size, len(chunks))
    group = _pp_group(pp_group_or_mesh)
    device = torch.device(device)
    stages = [PipelineStage(m, expected[k], n_stages, device, group=group) for k, m in enumerate(chunks)]
    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B,
               "zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble, "loopedbfs": ScheduleLoopedBFS}
    cls = _forward_only_v() if forward_only and name == "zbv" else classes[name]
    single = cls in (ScheduleGPipe, Schedule1F1B)
    sched = cls(stages[0] if single else stages, n_microbatches, loss_fn=loss_fn, scale_grads=True)
    return PipelineSchedule(stages, sched, n_microbatches, group, context, name=name, style=style,
                            bubble_analytic=analytic_bubble(name, n_microbatches, pp_size, len(chunks)))


def eval_schedule_name(schedule: str, n_chunks: int) -> str:
    """Forward-only evaluation: GPipe for one chunk per rank, else the training schedule's family."""
    return "gpipe" if n_chunks == 1 else schedule
