"""Runtime switches for ``ab_steps.py --switch switches:NAME`` that compare a kept change
with what it replaced, in one process (the replaced code lives here, not in the package).

    python benchmarks/ab_steps.py --switch switches:attention_widened_dp --configs 14m,tiny --pairs 24
    python benchmarks/ab_steps.py --switch switches:attention_packed --configs 14m,tiny --pairs 24
    python benchmarks/ab_steps.py --switch switches:gelu_keeps_derivative --configs 14m,tiny --pairs 24
"""
from __future__ import annotations

import math

import torch

import mtnlg.model.attention as A
import mtnlg.model.bias_gelu as BG
from mtnlg.model import regions

_KEPT = A._CausalGemmAttention


class _UnpackedAttention(torch.autograd.Function):
    """The kernel before session 7: (B, H, T, D) inputs made contiguous first, fp32 copies of
    q and k in (B*H, T, D) sliced per block (``bmm`` copies each slice), the output a
    (B, H, T, D) tensor that the model transposes and copies, gradients concatenated by
    autograd (``split``'s backward) and copied again into the projection's layout."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D)
        q, k, v = (t.contiguous().view(B * H, T, D) for t in (q, k, v))
        q32 = q.float().mul_(scale)
        k32 = k.float()
        o = torch.empty_like(q)
        probs = []
        for r0, r1 in A._blocks(T):
            s = torch.bmm(q32[:, r0:r1], k32[:, :r1].transpose(1, 2))
            s[..., r0:] += A._causal_bias(r1 - r0, q.device)
            p = torch.softmax(s, dim=-1).to(q.dtype)
            torch.bmm(p, v[:, :r1], out=o[:, r0:r1])
            probs.append(p)
        ctx.save_for_backward(q, k, v, o, *probs)
        ctx.scale, ctx.shape = scale, (B, H, T, D)
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, *probs = ctx.saved_tensors
        B, H, T, D = ctx.shape
        scale = ctx.scale
        bf = q.dtype
        do = do.contiguous().view(B * H, T, D)
        dd = (do.float() * o.float()).sum(-1, keepdim=True)
        exact = scale == 2.0 ** round(math.log2(scale))
        s = scale if exact else 1.0
        hi = dd.to(bf)
        do_aug = do.new_empty(B * H, T, D + 2)
        torch.mul(do, s, out=do_aug[..., :D])
        do_aug[..., D:D + 1] = hi * -s
        do_aug[..., D + 1:] = dd.sub_(hi.float()).mul_(-s)
        v_aug = v.new_empty(B * H, T, D + 2)
        v_aug[..., :D] = v
        v_aug[..., D:] = 1

        def score_grad(r0, r1, p):
            ds = torch.bmm(do_aug[:, r0:r1], v_aug[:, :r1].transpose(1, 2)).mul_(p)
            return ds if exact else ds.mul_(scale)

        return _block_gradients(q, k, do, probs, ctx.shape, score_grad)


def _block_gradients(q, k, do, probs, shape, score_grad):
    B, H, T, D = shape
    dq = torch.empty_like(q)
    dk = dv = None
    for (r0, r1), p in reversed(list(zip(A._blocks(T), probs))):
        dvi = torch.bmm(p.transpose(1, 2), do[:, r0:r1])
        ds = score_grad(r0, r1, p)
        torch.bmm(ds, k[:, :r1], out=dq[:, r0:r1])
        dki = torch.bmm(ds.transpose(1, 2), q[:, r0:r1])
        if dk is None:
            dk, dv = dki.float(), dvi.float()
        else:
            dk[:, :r1] += dki
            dv[:, :r1] += dvi
    return tuple(t.view(B, H, T, D) for t in (dq, dk.to(q.dtype), dv.to(q.dtype)))


def _packed(kernel):
    """``kernel`` (q, k, v in (B, H, T, D)) behind the packed kernel's interface."""
    class Packed:
        @staticmethod
        def apply(qkv):
            q, k, v = qkv.transpose(1, 2).split(qkv.shape[-1] // 3, dim=-1)
            return kernel.apply(q, k, v).transpose(1, 2)
    return Packed


class _Fp32dPAttention(_UnpackedAttention):
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

        return _block_gradients(q, k, do, probs, ctx.shape, score_grad)


def attention_widened_dp(on: bool) -> None:
    """True: the widened-GEMM dP - D (session 6); False: the fp32 dP.  Both in the kernel's
    layout before session 7 (``_UnpackedAttention``)."""
    A._CausalGemmAttention = _packed(_UnpackedAttention if on else _Fp32dPAttention)


def attention_packed(on: bool) -> None:
    """True: the kept kernel (session 7: packed qkv in and out, query blocks contiguous);
    False: the kernel before (``_UnpackedAttention``) with its copies around it."""
    A._CausalGemmAttention = _KEPT if on else _packed(_UnpackedAttention)


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


class _RecomputingBiasGelu(torch.autograd.Function):
    """The bias-GeLU region before session 7: the forward kept the GEMM output and the bias, and
    the backward's region recomputed the pre-activation and its sigmoid to get the derivative."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        x2 = x.contiguous().view(-1, x.shape[-1])
        ctx.save_for_backward(x2, bias)
        ctx.approximate, ctx.in_shape = approximate, x.shape
        return _OLD_GELU[approximate][0](x2.detach(), bias.detach()).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, bias = ctx.saved_tensors
        gx = _OLD_GELU[ctx.approximate][1](grad.contiguous().view(x2.shape).detach(), x2.detach(), bias.detach())
        return gx.view(ctx.in_shape), (gx.sum(0) if ctx.needs_input_grad[1] else None), None


def _old_fwd_tanh(x, b):
    y = x.float() + b.float()
    return (y * torch.sigmoid(y * (BG._K2 + BG._K2 * BG._A * y * y))).to(x.dtype)


def _old_bwd_tanh(g, x, b):
    y = x.float() + b.float()
    s = torch.sigmoid(y * (BG._K2 + BG._K2 * BG._A * y * y))
    return (g.float() * (s + y * (BG._K2 + 3 * BG._K2 * BG._A * y * y) * s * (1 - s))).to(x.dtype)


def _old_fwd_erf(x, b):
    return torch.nn.functional.gelu(x.float() + b.float()).to(x.dtype)


def _old_bwd_erf(g, x, b):
    return torch.ops.aten.gelu_backward(g.float(), x.float() + b.float()).to(x.dtype)


_OLD_GELU = {"tanh": (regions.Region(_old_fwd_tanh, "old_bias_gelu_tanh"),
                      regions.Region(_old_bwd_tanh, "old_bias_gelu_tanh_bwd")),
             "none": (regions.Region(_old_fwd_erf, "old_bias_gelu_erf"),
                      regions.Region(_old_bwd_erf, "old_bias_gelu_erf_bwd"))}
_KEPT_GELU = BG._BiasGelu


def gelu_keeps_derivative(on: bool) -> None:
    """True: the bias-GeLU forward keeps the derivative (fp16) and the backward multiplies
    (kept); False: it keeps the GEMM output and the backward recomputes the derivative."""
    BG._BiasGelu = _KEPT_GELU if on else _RecomputingBiasGelu


def session7(on: bool) -> None:
    """Every step change of session 7 at once: the packed attention kernel and the bias-GeLU
    forward that keeps its derivative (True), or the code each replaced (False)."""
    attention_packed(on)
    gelu_keeps_derivative(on)
