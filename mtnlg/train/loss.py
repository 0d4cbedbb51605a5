"""The training loss: next-token cross-entropy computed in float32.

bf16 logits are never upcast whole.  The forward pass upcasts a slice of rows
at a time and keeps only the summed loss; the backward pass recomputes each
slice's softmax in float32 and writes ``(softmax - onehot) * scale`` straight
into a bf16 gradient, one slice at a time.  Against autograd through
``F.cross_entropy(chunk.float())`` this saves the float32 log-probabilities
kept for backward (2x the logits' bytes), NLL's zero-filled gradient, the
fp32->bf16 cast of every slice's gradient and the ``cat`` that joins them
(forward + backward 2.1x faster at 2048 x 8192 on the 2-core CPU, measured
in isolation; ``tests/train/test_loss.py`` checks it against float32 autograd).
In bf16 on CPU the forward pass writes that gradient itself while each slice
is in cache (one cast and one softmax per slice instead of two each: loss
49 -> 34 ms per 14M step, ``benchmarks/profile_step.py``'s op table) and
keeps it instead of the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets that carry no loss (fine-tuning prompts, padding); F.cross_entropy's default
# float32 elements of one slice of rows: 4 MB on CPU (measured 2.7x faster than 16 MB on the 2-core CPU);
# elsewhere the earlier 16 MB (not measured on GPU yet: fewer, larger slices mean fewer kernel launches)
CHUNK_ELEMS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMS = 1 << 22


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``-log softmax(logits)[target]`` divided by ``denom``,
    in float32, for low-precision 2-D ``logits``; rows whose target is
    ``IGNORE_INDEX`` count zero and get a zero gradient.

    With ``eager_grad`` (bf16 on CPU, gradient wanted) the forward pass writes
    the gradient for an upstream gradient of 1 while each slice is in cache
    (one cast and one softmax per slice instead of two each) and keeps it
    instead of the logits.  The backward returns it for an upstream gradient
    of 1 (the trainer's ``loss.backward()``: the fp32 gradient rounded once),
    else multiplies it by the upstream gradient (a second rounding)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int, denom: float | torch.Tensor,
                eager_grad: bool = False) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        if not eager_grad:
            for c, t in zip(logits.split(rows), targets.split(rows)):
                total += F.cross_entropy(c.float(), t, reduction="sum", ignore_index=IGNORE_INDEX)
        else:
            grad = torch.empty_like(logits)
            for c, t, o in zip(logits.split(rows), targets.split(rows), grad.split(rows)):
                c32 = c.float()
                p = torch.softmax(c32, dim=-1)
                valid = t != IGNORE_INDEX
                pt = p.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
                if bool((pt[valid] < 1e-37).any()):  # log(p) would lose precision below fp32's normal range
                    total += F.cross_entropy(c32, t, reduction="sum", ignore_index=IGNORE_INDEX)
                else:
                    total -= torch.where(valid, pt.log(), 0.0).sum()
                _write_grad(p, t, valid / denom, o)
        ctx.eager = eager_grad
        ctx.save_for_backward(*((grad,) if eager_grad else (logits, targets)))
        ctx.rows, ctx.denom = rows, denom
        return total / denom

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.eager:
            (eager,) = ctx.saved_tensors
            return (eager if grad.item() == 1.0 else eager * grad), None, None, None, None
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        scale = grad.float() / ctx.denom
        for c, t, o in zip(logits.split(ctx.rows), targets.split(ctx.rows), out.split(ctx.rows)):
            _write_grad(torch.softmax(c.float(), dim=-1), t, (t != IGNORE_INDEX) * scale, o)
        return out, None, None, None, None


def _write_grad(p: torch.Tensor, t: torch.Tensor, row_scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = (p - onehot(t)) * row_scale`` for a slice's fp32 softmax ``p`` (modified in
    place): scale, zero ignored rows (scale 0), then round to ``out``'s dtype.  An in-place
    multiply and a cast: ``torch.mul(..., out=bf16)`` computes into an fp32 temporary and copies it
    (bitwise the same, 1.7x the time at 128 x 8192 on the 2-core CPU)."""
    p.scatter_add_(1, t.clamp(min=0)[:, None], torch.full_like(p[:, :1], -1.0))
    out.copy_(p.mul_(row_scale[:, None]))


def cross_entropy_fp32(logits: torch.Tensor, targets: torch.Tensor, chunk_elems: int | None = None,
                       denom: float | torch.Tensor | None = None, parts: int = 1) -> torch.Tensor:
    """Mean cross-entropy computed in float32.  Low-precision plain logits take
    the sliced path above; float32 and sharded (tensor-parallel, DTensor)
    logits take ``F.cross_entropy`` (vocabulary-parallel for a DTensor).

    With ``denom`` the loss is the *sum* over targets other than
    ``IGNORE_INDEX`` divided by ``denom`` (fine-tuning divides by the loss
    tokens of the whole global batch, see ``Trainer._loss_scale``).

    ``parts`` divides the loss once more: the trainer's share of one of ``parts``
    micro-batches of a step.  It is part of the denominator, not a division of the
    returned loss, so the gradient that bf16 on CPU writes in the forward pass is
    the one ``loss.backward()`` wants (unit upstream gradient): no second pass
    over the logits' gradient to scale it, and one rounding instead of two."""
    if logits.dtype == torch.float32 or type(logits) is not torch.Tensor:
        if denom is None:
            return F.cross_entropy(logits.float(), targets) / parts
        return F.cross_entropy(logits.float(), targets, reduction="sum") / (denom * parts)
    if denom is None:  # the mean over the targets that count, as F.cross_entropy (a tensor: no device sync)
        denom = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    if parts != 1:
        denom = denom * parts
    chunk_elems = chunk_elems or CHUNK_ELEMS.get(logits.device.type, DEFAULT_CHUNK_ELEMS)
    rows = max(1, chunk_elems // logits.shape[-1])
    eager_grad = (logits.device.type == "cpu" and logits.dtype == torch.bfloat16 and torch.is_grad_enabled()
                  and logits.requires_grad)
    return _ChunkedCrossEntropy.apply(logits, targets, rows, denom, eager_grad)
