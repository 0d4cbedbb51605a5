"""Run the model for the serving engine, on one process or a tensor-parallel group.

Rank 0 owns the scheduler and the HTTP server.  Each step it describes the
work as a :class:`StepPlan` (plain CPU tensors) and calls
:meth:`ModelRunner.forward`, which first broadcasts the plan to the other
ranks of the group; every rank then runs the same forward on its shard of the
model and the vocabulary-sharded logits are gathered, so rank 0 can sample.
The other ranks sit in :meth:`ModelRunner.serve_forever` until rank 0 sends
``stop``.  Beam search (Megatron's ``beam_width``) is broadcast the same way
and runs as one exclusive job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from mtnlg.serve.cache import SlotKVCache


@dataclass
class StepPlan:
    """One forward over the step's tokens packed into one row: sequence r
    feeds the next ``lengths[r]`` of ``tokens`` (at ``positions``) into cache
    slot ``rows[r]``."""

    tokens: torch.Tensor     # (N,) int64
    positions: torch.Tensor  # (N,) int64
    lengths: torch.Tensor    # (R,) int64
    rows: torch.Tensor       # (R,) int64


@dataclass
class BeamJob:
    prompt: list[int]
    max_new_tokens: int
    beams: int
    eos_id: int | None
    length_penalty: float


class ModelRunner:
    """The model, its slot cache and (under tensor parallelism) the group.

    ``gather_logits`` turns the model's output into full logits (an
    all-gather of vocabulary shards under tensor parallelism)."""

    def __init__(self, model: torch.nn.Module, slots: int, max_len: int, device: torch.device,
                 gather_logits: Callable = lambda x: x, group=None):
        self.model, self.device, self.gather_logits = model.eval(), device, gather_logits
        self.cache = SlotKVCache(slots, max_len)
        self.group = group
        self.distributed = group is not None and dist.get_world_size(group) > 1

    # ---- rank 0
    def forward(self, plan: StepPlan) -> torch.Tensor:
        self._send(("forward", plan))
        return self.execute(plan)

    def beam(self, job: BeamJob) -> list[tuple[list[int], float]]:
        self._send(("beam", job))
        return self.execute_beam(job)

    def shutdown(self) -> None:
        self._send(("stop", None))

    def _send(self, msg) -> None:
        if self.distributed:
            dist.broadcast_object_list([msg], src=dist.get_global_rank(self.group, 0), group=self.group)

    # ---- every rank
    @torch.no_grad()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits (N, V) of every packed token."""
        d = self.device
        tokens, positions = plan.tokens.to(d), plan.positions.to(d)
        self.cache.plan(plan.rows.to(d), positions, plan.lengths.to(d))
        return self.gather_logits(self.model(tokens[None], self.cache, positions[None]))[0]

    @torch.no_grad()
    def execute_beam(self, job: BeamJob) -> list[tuple[list[int], float]]:
        from mtnlg.infer.generate import beam_search_all
        prompt = torch.tensor([job.prompt], device=self.device)
        return beam_search_all(self.model, prompt, job.max_new_tokens, job.beams, eos_id=job.eos_id,
                               length_penalty=job.length_penalty, gather_logits=self.gather_logits)

    def serve_forever(self) -> None:
        """Ranks other than 0: execute what rank 0 broadcasts until ``stop``."""
        src = dist.get_global_rank(self.group, 0)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=src, group=self.group)
            kind, payload = box[0]
            if kind == "stop":
                return
            if kind == "forward":
                self.execute(payload)
            elif kind == "beam":
                self.execute_beam(payload)
