"""Data parallelism with ZeRO-style sharding over the dp mesh (FSDP2).

``parallel.zero`` picks what each data-parallel rank keeps a 1/dp shard of:

    zero  optimizer state  gradients            parameters (at rest / during the step)
    0     full             full (all-reduced)    full / full           plain data parallelism
    1     1/dp             full until the step's  1/dp / full           ~ DeepSpeed ZeRO-1
                           last micro-batch
    2     1/dp             1/dp                   1/dp / full           ~ DeepSpeed ZeRO-2
    3     1/dp             1/dp                   1/dp / one block      ~ DeepSpeed ZeRO-3

All three levels are ``fully_shard`` (FSDP2) per transformer block and then on
the root (embeddings, final norm, tied head) over ``mesh["dp"]``; they differ
only in when parameters are resharded and when gradients are reduced:

* zero=3: ``reshard_after_forward=True``: each block's parameters are
  all-gathered for its forward, freed, all-gathered again for its backward;
  gradients are reduce-scattered after each micro-batch's backward.
* zero=2: ``reshard_after_forward=False`` and, on every micro-batch but the
  step's last, ``set_reshard_after_backward(False)``: parameters are gathered
  once per step and kept until the last backward; gradients are
  reduce-scattered (fp32) after every micro-batch into sharded accumulators.
* zero=1: as zero=2, plus ``set_requires_gradient_sync(False)`` on all but
  the last micro-batch: full gradients accumulate locally (in fp32) and are
  reduce-scattered once per step.

The optimizer steps the 1/dp shards (DTensors), so its state is sharded at
every level.  Unlike DeepSpeed ZeRO-1/2 the parameters are also sharded
between steps (after the optimizer step), which saves memory and costs
nothing: DeepSpeed all-gathers the updated partitions after its step, FSDP at
the start of the next forward.

Precision: the sharded parameters are fp32.  ``bf16`` becomes
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: blocks compute
on bf16 copies gathered from the fp32 shards, gradients are reduce-scattered
and accumulated in fp32, and the optimizer updates the fp32 shards, so the
trainer's ``MasterWeights`` is not needed (the fp32 shard is the master copy).
``fp32`` and ``bf16-autocast`` use fp32 parameters without a policy.

With tensor parallelism the dp shards are taken of the tp shards (2-D
DTensors on the ``(dp, tp)`` sub-mesh).

zero=0 over dp > 1 ranks is torch's composable ``replicate`` (built on the
FSDP2 machinery, parameters ``Replicate()`` over dp): each block's gradients
are all-reduced by a hook as soon as its backward finishes, overlapping the
communication with the rest of the backward (DDP's habit), once per step
(``set_requires_gradient_sync(False)`` on all but the last micro-batch).

Inside a pipeline stage (``parallel.pp`` > 1), zero 0 and 1: the stage root
is an ``FSDPModule``, so ``PipelineStage`` drives it: during every
micro-batch's backward gradient sync and resharding are off, and after the
step's last backward it reduces once per stage (all-reduce under replicate,
reduce-scatter under ZeRO-1): one reduction per step whatever the
micro-batch count (MT-NLG's recipe is ZeRO-1).  zero 2 and 3: the stage
runs behind a ``StageShell`` (``mtnlg.parallel.schedules``) and FSDP behaves
as without a pipeline, reduce-scattering each micro-batch's gradients into
the sharded accumulators (zero 3 also frees parameters after each block's
forward and backward), so the stage never holds its whole unsharded
gradients: more communication, ~1/dp the gradient memory.  The zero-bubble
schedules split backward and need ``PipelineStage`` to drive FSDP, so there
zero 2 reduces once per step and zero 3 is refused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # FSDP2's custom-comm interface (no public alias)

from mtnlg.errors import UserError

ZERO_LEVELS = (0, 1, 2, 3)


def check_zero(zero: int, dp: int, pp: int, precision: str) -> None:
    """Validate ``parallel.zero`` against the layout (raises UserError)."""
    if zero not in ZERO_LEVELS:
        raise UserError(f"parallel.zero must be 0 (plain data parallelism), 1 (shard optimizer state), "
                        f"2 (+ gradients) or 3 (+ parameters), got {zero!r}")
    if zero and precision == "fp16":
        raise UserError(f"parallel.zero={zero} does not support train.precision=fp16 (dynamic loss scaling) "
                        f"yet; use bf16, bf16-autocast or fp32")


def uses_fsdp(zero: int, dp: int) -> bool:
    """Whether ``apply_data_parallel`` shards anything (zero>0 over dp>1 ranks);
    with dp=1 there is nothing to shard and zero is ignored."""
    return zero > 0 and dp > 1


def reduces_in_backward(zero: int, dp: int, precision: str) -> bool:
    """Whether data-parallel gradients are reduced by backward hooks (FSDP or
    ``replicate``) rather than by the trainer after backward.  fp16 with
    zero=0 keeps the trainer's flat all-reduce: its GradScaler unscales
    plain tensors only."""
    return dp > 1 and (zero > 0 or precision != "fp16")


def mixed_precision(precision: str):
    """The FSDP2 policy for a train.precision (None: compute in the fp32 parameters' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def apply_data_parallel(model: nn.Module, dp_mesh: DeviceMesh, zero: int, precision: str = "fp32") -> nn.Module:
    """Shard ``model`` (fp32 parameters, tensor parallelism already applied;
    a meta model is fine) over ``dp_mesh`` with FSDP2 in place and return it;
    zero=0 replicates it with gradient all-reduce hooks instead.  A size-1
    mesh leaves it untouched, and so does zero=0 with fp16 (the trainer
    all-reduces gradients after backward)."""
    from torch.distributed.fsdp import fully_shard
    if not reduces_in_backward(zero, dp_mesh.size(), precision):
        return model
    if zero == 0:
        from torch.distributed._composable.replicate_with_fsdp import replicate
        mp = mixed_precision(precision)
        kw = {"mesh": dp_mesh, **({"mp_policy": mp} if mp is not None else {})}
        for block in model.blocks.values():
            replicate(block, **kw)
        replicate(model, **kw)
        return model
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise UserError(f"parallel.zero={zero} shards fp32 parameters (bf16 compute comes from the FSDP "
                        f"mixed-precision policy), but the model holds {', '.join(low)} parameters")
    kw = {"mesh": dp_mesh, "reshard_after_forward": zero == 3}
    mp = mixed_precision(precision)
    if mp is not None:
        kw["mp_policy"] = mp
    for block in model.blocks.values():
        fully_shard(block, **kw)
    for unit in _vocab_units(model):
        fully_shard(unit, **kw)
        if unit is getattr(model, "tok_emb", None):
            unit.set_unshard_in_backward(False)  # an embedding's backward needs the indices, not the weight
    fully_shard(model, **kw)
    if dp_mesh.device_type == "cpu":
        for m in fsdp_modules(model):
            m.set_custom_reduce_scatter(ChunkedReduceScatter())
    return model


class ChunkedReduceScatter(ReduceScatter):
    """FSDP2's gradient reduce-scatter in slices of at most ``chunk_elems`` elements.
    gloo's reduce-scatter stages a full copy of its input, so FSDP's one call per unit
    costs another unsharded gradient of memory at the end of each unit's backward (the
    vocabulary-sized embedding's is the largest: +154 MB per rank in the 760M drill at tp 2,
    fp32).  Slicing bounds that copy; each slice is an ordinary reduce-scatter of the
    same elements (gloo may add them in another order than for the whole buffer)."""

    def __init__(self, chunk_elems: int = 1 << 22):
        self.chunk_elems = chunk_elems

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        import torch.distributed as dist
        n, world = output_tensor.numel(), dist.get_world_size(group)
        step = max(1, self.chunk_elems // world)
        if n <= step:
            return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        rows = input_tensor.view(world, n)
        for a in range(0, n, step):
            b = min(n, a + step)
            dist.reduce_scatter_single(output_tensor[a:b], rows[:, a:b].contiguous().view(-1), op=op, group=group)
        return None



def _vocab_units(model: nn.Module) -> list[nn.Module]:
    """The embedding and the output layer as FSDP units of their own where they do not share a
    weight (pipeline stages: the first holds the embedding, the last its own copy of the head).
    In the root unit they would stay gathered from the first forward to the end of backward
    (FSDP2 never reshards the root after forward); as units they are gathered only around their
    own forward and backward and their gradients are reduce-scattered as soon as they are ready.
    A tied embedding (no pipeline) must stay in the root: one parameter, one unit."""
    emb, head = getattr(model, "tok_emb", None), getattr(model, "lm_head", None)
    if emb is not None and head is not None and head.weight is emb.weight:
        return []
    return [m for m in (emb, head) if m is not None]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def micro_batch_hook(model: nn.Module, zero: int) -> Callable[[bool], None]:
    """``hook(last)``, called before each micro-batch's forward (``last`` on the
    step's final one): keeps parameters (zero 1, 2) and unreduced gradients
    (zero 0 replicate, zero 1) across a step's micro-batches.  Not used under
    pipeline parallelism (``PipelineStage`` does this itself)."""
    modules = fsdp_modules(model)
    if not modules or zero == 3:
        return lambda last: None

    def hook(last: bool) -> None:
        for m in modules:
            if zero:
                m.set_reshard_after_backward(last, recurse=False)
            if zero in (0, 1):
                m.set_requires_gradient_sync(last, recurse=False)
    return hook


def reshard(model: nn.Module) -> None:
    """Free gathered parameters (e.g. kept by a no-grad evaluation forward
    under zero 1/2), so the module holds its sharded parameters again."""
    for m in fsdp_modules(model):
        m.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full plain tensors under the plain model's keys (all-gathers over dp and tp)."""
    from mtnlg.parallel.tensor import full_state_dict as gather
    reshard(model)
    return gather(model)


def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors into the sharded model; each rank slices its own piece."""
    from mtnlg.parallel.tensor import load_full_state_dict as scatter
    reshard(model)
    scatter(model, sd, strict)


def local_numel(tensors) -> int:
    """Elements this rank stores for ``tensors`` (DTensor: the local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)
