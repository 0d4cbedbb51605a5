"""Megatron tensor + sequence parallelism for ``GPT``, applied from outside.

Built on PyTorch's DTensor tensor-parallel API (``parallelize_module`` with
Colwise/Rowwise/SequenceParallel styles); see docs/parallel.md for why.  The
per-block plan is Megatron's:

    ln_1 ─▶ qkv (column: whole heads per rank) ─▶ attention on local heads ─▶ proj (row) ─▶ +
    ln_2 ─▶ fc  (column)                       ─▶ GeLU                     ─▶ proj (row) ─▶ +

so each block costs one all-reduce per sub-layer in forward (after the row
layer) and one in backward (before the column layer).  With sequence
parallelism the residual stream, LayerNorms and dropouts hold ``T/tp``
positions per rank and each all-reduce becomes an all-gather (before the
column layer) plus a reduce-scatter (after the row layer).

The input embedding is vocabulary-parallel (rows of the table split across
ranks, masked lookup, all-reduce / reduce-scatter of the partial sums), the
tied output layer is column-parallel over the same shard and returns logits
sharded on the vocabulary dimension; ``loss_context`` makes
``F.cross_entropy`` compute the vocabulary-parallel loss without gathering
them.  Every parameter becomes a DTensor (norms, position table and row-layer
biases replicated), which keeps the foreach/fused AdamW and
``clip_grad_norm_`` working; parameter names are those of the plain model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle,
                                               RowwiseParallel, SequenceParallel, loss_parallel,
                                               parallelize_module)

from mtnlg.errors import UserError
from mtnlg.model.gpt import GPT

_TP_ATTR = "_mtnlg_tp_mesh"


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors; tensor inputs enter as Replicate and
    the output leaves as a plain tensor, optionally keeping only this rank's
    chunk along ``shard_dim`` (a free slice forward, an all-gather backward)."""

    def __init__(self, shard_dim: int | None = None):
        super().__init__()
        self.shard_dim = shard_dim

    def _partition(self, name, module, mesh):
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()])))

    @staticmethod
    def _input_fn(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def _output_fn(self, mod, out, mesh):
        if self.shard_dim is not None:  # a negative dim counts from the end (positions may come batched)
            out = out.redistribute(mesh, [Shard(self.shard_dim % out.ndim)])
        return out.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input_fn, self._output_fn)


class SequenceShardDropout(nn.Module):
    """Dropout on a sequence shard (B, T/tp, ...) whose mask is this rank's
    slice of the mask ``nn.Dropout`` would draw for the full (B, T, ...)
    tensor.  Every tp rank draws the same full mask from the same generator
    state, so the generator stays in step across ranks and the result equals
    the non-sequence-parallel model's, dropout included."""

    def __init__(self, p: float, mesh: DeviceMesh):
        super().__init__()
        self.p, self.tp, self.rank = p, mesh.size(), mesh.get_local_rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        full = list(x.shape)
        full[1] *= self.tp
        noise = torch.empty(full, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise.chunk(self.tp, dim=1)[self.rank]

    def extra_repr(self) -> str:
        return f"p={self.p}, tp={self.tp}"


def _block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if not sequence_parallel:
        return {
            "ln_1": ReplicateParallel(), "ln_2": ReplicateParallel(),
            "attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
        }
    # LayerNorms hand a Shard(1) DTensor to the column layers, which all-gather
    # it (forward) and reduce-scatter its gradient (backward); the row layers
    # reduce-scatter their partial sums back to sequence shards.
    return {
        "ln_1": SequenceParallel(), "ln_2": SequenceParallel(),
        "attn.qkv": ColwiseParallel(input_layouts=Shard(1)),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "mlp.fc": ColwiseParallel(input_layouts=Shard(1)),
        "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> GPT:
    """Shard ``model`` (full weights, identical on every rank) over the 1-D
    ``tp_mesh`` in place and return it.  A size-1 mesh leaves it untouched."""
    tp = tp_mesh.size()
    if tp == 1:
        return model
    if getattr(model, _TP_ATTR, None) is not None:
        raise UserError("tensor parallelism is already applied to this model")
    cfg = model.cfg
    for what, n in (("model.n_heads", cfg.n_heads), ("the MLP width", cfg.ffn),
                    ("the padded vocabulary", model.vocab_size)):
        if n % tp:
            raise UserError(f"parallel.tp={tp} must divide {what} ({n})")
    if model.tok_emb is None or model.lm_head is None:
        raise UserError("apply_tensor_parallel expects the whole model (apply it before splitting pipeline stages)")
    seq = Shard(1) if sequence_parallel else Replicate()

    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel))
        if cfg.dropout > 0:
            per_rank_attention_rng(block.attn, tp_mesh.get_local_rank())
        if sequence_parallel:
            block.attn.resid_drop = SequenceShardDropout(block.attn.resid_drop.p, tp_mesh)
            block.mlp.drop = SequenceShardDropout(block.mlp.drop.p, tp_mesh)
    parallelize_module(model, tp_mesh, {
        # vocabulary-parallel embedding: masked lookup, then all-reduce (or reduce-scatter under SP)
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "pos_emb": ReplicateParallel(shard_dim=-2 if sequence_parallel else None),  # (T, C) or (B, T, C)
        "ln_f": SequenceParallel() if sequence_parallel else ReplicateParallel(),
        # tied output layer: column-parallel over the same vocabulary shard; logits stay sharded
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    })
    model.lm_head.weight = model.tok_emb.weight  # re-tie: both are Shard(0) of the same table
    if sequence_parallel:
        model.drop = SequenceShardDropout(model.drop.p, tp_mesh)
        model.register_forward_pre_hook(_check_sequence_divisible)
        _replicate_partial_grads(model)
    setattr(model, _TP_ATTR, tp_mesh)
    model._mtnlg_sequence_parallel = sequence_parallel
    return model


def per_rank_attention_rng(attn: nn.Module, tp_rank: int) -> None:
    """Give attention dropout on this rank's heads its own random stream.

    Every tp rank shares one RNG state (replicated regions need identical
    masks), so without this each rank would draw the same attention-dropout
    mask for its local heads and head h would always share its mask with head
    h + H/tp.  Before the attention core we draw one seed from the shared
    stream (all ranks draw the same, so they stay in step), seed the generator
    with seed + tp_rank, and restore the shared state before the output
    projection, whose residual dropout uses the shared stream again.  This is
    Megatron's model-parallel RNG tracker in two hooks; activation
    checkpointing replays it exactly because the seed comes from the shared
    stream it restores."""
    saved: dict = {}

    def enter(mod, args):
        if mod.training and mod.dropout > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            saved["cpu"] = torch.get_rng_state()
            if torch.cuda.is_available():
                saved["cuda"] = torch.cuda.get_rng_state()
            torch.manual_seed(seed + tp_rank)

    def leave(mod, args):
        if saved:
            torch.set_rng_state(saved.pop("cpu"))
            if "cuda" in saved:
                torch.cuda.set_rng_state(saved.pop("cuda"))

    attn.register_forward_pre_hook(enter)
    attn.proj.register_forward_pre_hook(leave)


def _reduce_grad(p: torch.Tensor) -> None:
    if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)


def _replicate_partial_grads(model: nn.Module) -> None:
    """Replicated parameters used on sequence shards (LayerNorms, row-layer
    biases) get partial-sum gradients; all-reduce them as soon as they are
    accumulated (h floats each), so every ``.grad`` matches its parameter's
    placement and the optimizer, clipping and checkpoints see plain
    replicated gradients (Megatron does this reduction in its grad finalize)."""
    for p in model.parameters():
        if isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements):
            p.register_post_accumulate_grad_hook(_reduce_grad)


def _check_sequence_divisible(model: GPT, args):
    T, tp = args[0].shape[1], getattr(model, _TP_ATTR).size()
    if T % tp:
        raise UserError(f"sequence parallelism needs the sequence length ({T}) divisible by tp={tp}; "
                        "for incremental generation apply tensor parallelism with sequence_parallel=False")


def tp_mesh_of(model: nn.Module) -> DeviceMesh | None:
    """The tensor-parallel mesh applied to ``model``, or None."""
    return getattr(model, _TP_ATTR, None)


def loss_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context under which ``F.cross_entropy(logits.flatten(0, 1).float(),
    targets.flatten())`` on the vocabulary-sharded logits computes the
    vocabulary-parallel loss (no logits gather).  Run ``loss.backward()``
    inside it too.  A null context when tensor parallelism is not applied."""
    return loss_parallel() if tp_mesh_of(model) is not None else contextlib.nullcontext()


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full logits as a plain tensor (all-gather of the vocabulary shards);
    identity for plain tensors."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a loss, a norm) as a plain tensor; identity otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain full tensors under the plain model's state_dict keys (the tied
    ``lm_head.weight`` included, as ``nn.Module.state_dict`` does).  Every tp
    rank gets the whole dict (all-gathers shards)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors into a (possibly tensor-parallel) model; each rank
    keeps its own shard, sliced locally without communication."""
    own = model.state_dict(keep_vars=True)
    if strict:
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise UserError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, dst in own.items():
        if k not in sd:
            continue
        src = sd[k]
        if tuple(src.shape) != tuple(dst.shape):
            raise UserError(f"state dict entry {k!r} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
        if isinstance(dst, DTensor):
            local = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements,
                                      src_data_rank=None).to_local()
            dst.to_local().copy_(local)
        else:
            dst.copy_(src)
