"""Runtime switches for ``ab_steps.py --switch switches:NAME`` that compare a kept change
with what it replaced, in one process (the replaced code lives here, not in the package).

    python benchmarks/ab_steps.py --switch switches:attention_widened_dp --configs 14m,tiny --pairs 24
"""
from __future__ import annotations

import torch

import mtnlg.model.attention as A

_KEPT = A._CausalGemmAttention


class _Fp32dPAttention(_KEPT):
    """The attention kernel's backward before the widened GEMM: dP from an fp32 GEMM of its
    own (fp32 copies of dO and v), ``dS = (dP - D) * P`` in fp32, rounded once."""

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, *probs = ctx.saved_tensors
        B, H, T, D = ctx.shape
        do = do.contiguous().view(B * H, T, D)
        do32 = do.float()
        v32 = v.float().mul_(ctx.scale)
        dd = (do32 * o.float()).sum(-1, keepdim=True).mul_(ctx.scale)

        def score_grad(r0, r1, p):
            dp = torch.bmm(do32[:, r0:r1], v32[:, :r1].transpose(1, 2))
            return dp.sub_(dd[:, r0:r1]).mul_(p).to(q.dtype)

        return A.block_gradients(q, k, do, probs, ctx.shape, score_grad)


def attention_widened_dp(on: bool) -> None:
    """True: the kept kernel (dP - D from one bf16 GEMM of widened inputs); False: the fp32 dP."""
    A._CausalGemmAttention = _KEPT if on else _Fp32dPAttention


_KEPT_LOSS = None


def loss_parts_in_denominator(on: bool) -> None:
    """True: the trainer's 1/n_micro is part of the loss's denominator (kept); False: the loss of
    each micro-batch is divided after (the trainer before), which makes the bf16 gradient written
    in the forward pass be scaled by a second pass over the logits' gradient."""
    global _KEPT_LOSS
    from mtnlg.train.trainer import Trainer
    if _KEPT_LOSS is None:
        _KEPT_LOSS = Trainer._loss
    Trainer._loss = _KEPT_LOSS if on else (lambda self, x, y, parts=1: _KEPT_LOSS(self, x, y) / parts)
