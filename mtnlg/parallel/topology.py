"""What the trainer needs to know about the process layout, in one object.

The trainer imports no parallel machinery, only this record: the ``train``
command builds a ``Topology`` (``mtnlg.parallel.setup.build``; trivial for
one process) and passes it in.  Each hook has a single-process default, so
the trainer reads the same either way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _load_plain_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)


@dataclass
class Topology:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None
    mesh: Any = None
    # parallel.zero > 0: FSDP2 shards parameters/gradients/optimizer state over dp and reduces gradients
    # in backward (all_reduce_grads does nothing); before_micro_batch(last) runs before each micro-batch
    zero: int = 0
    # FSDP (zero > 0) or replicate (zero 0) reduce data-parallel gradients in backward hooks
    grads_reduced_in_backward: bool = False
    before_micro_batch: Callable[[bool], None] = lambda last: None
    loss_context: Callable[[], Any] = contextlib.nullcontext
    full_state_dict: Callable[[torch.nn.Module], dict] = _plain_state_dict
    load_full_state_dict: Callable[[torch.nn.Module, dict], None] = _load_plain_state_dict
    gather_logits: Callable[[Any], torch.Tensor] = lambda x: x
    local_value: Callable[[Any], torch.Tensor] = lambda x: x  # replicated DTensor -> plain tensor
    full_tensor: Callable[[Any], torch.Tensor] = lambda x: x  # sharded tensor -> full plain tensor (collective)
    shard_like: Callable[[torch.Tensor, Any], Any] = lambda full, ref: full  # full tensor -> this rank's piece, like ref
    extra: dict = field(default_factory=dict)
    # pipeline parallelism (pp_size > 1): this rank's stage runs through ``pipeline(n_micro, rows, loss_fn,
    # context)`` -> mtnlg.parallel.pipeline.PipelineSchedule; the loss lives on the last stage
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Any = None
    pp_first_rank: int = 0  # global rank of this pipeline's first stage
    pp_last_rank: int = 0  # global rank of this pipeline's last stage
    pipeline: Callable[..., Any] | None = None
    tied_copies: list = field(default_factory=list)  # last stage's lm_head copy: clipped, not counted in the norm
    clip_grad_norm: Callable[..., torch.Tensor] = (
        lambda params, max_norm, skip=(): torch.nn.utils.clip_grad_norm_(params, max_norm))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
            t /= self.dp_size
        return t

    def broadcast_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's value of ``t`` on every stage (for logging)."""
        if self.pp_size > 1:
            t = t.clone()
            dist.broadcast(t, src=self.pp_last_rank, group=self.pp_group)
        return t

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over data-parallel replicas (one flat bucket).
        Under ZeRO (FSDP) backward already reduce-scattered them."""
        if self.dp_size == 1 or self.zero or self.grads_reduced_in_backward:
            return
        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        flat = torch.cat([g.reshape(-1) for g in local])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.dp_group)
        flat /= self.dp_size
        offset = 0
        for g in local:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
