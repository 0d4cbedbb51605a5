"""Causal self-attention for bf16 training on CPU, from GEMMs.

PyTorch's CPU flash-attention kernel is exact but slow in bf16 here: at the
14M benchmark's shapes (8 x 6 heads x 256 tokens x 64) its backward takes
2.5x its forward and the pair ~4x the time of the same FLOPs in bf16 GEMMs
(``benchmarks/profile_step.py``).  This kernel computes the same function
with the precision choices of FlashAttention on GPUs:

* scores ``q k^T`` are computed in fp32 (from the exact bf16 inputs), so the
  softmax sees no bf16 rounding: CPU torch offers no bf16 GEMM with an fp32
  output, so this one runs as an fp32 GEMM over the causal lower triangle
  only, by blocks of ``BLOCK`` queries;
* the probabilities P are rounded once to bf16 and multiplied in bf16 GEMMs
  (``P v``, ``P^T dO``), as FlashAttention does with its tiles;
* the softmax backward needs ``dP - D`` with ``D = rowsum(dO * O)`` (from the
  bf16 output, as in FlashAttention-2), a difference of nearly equal numbers
  where a query attends mostly to one key.  It comes from one bf16 GEMM of
  inputs widened by two columns, ``[dO, -D_hi, -D_lo] . [v, 1, 1]``, with
  ``D_hi + D_lo`` the fp32 ``D`` split into two bf16 numbers (to about 2^-16 of
  ``D``): the GEMM accumulates in fp32 and rounds once, so the difference is
  rounded relative to itself.  A power-of-two score scale (head dims 16, 64,
  256) folds into ``dO`` and ``D`` exactly; any other is one more rounding of
  dS.  Then ``dS = P * (dP - D)`` in bf16 for the two bf16 GEMMs ``dS k`` and
  ``dS^T q``.

Before, dP was an fp32 GEMM of its own.  A bf16 dP rounded before subtracting
D, with ``D = rowsum(P * dP)`` (softmax's own backward), had the same error per
call against fp64 but made two bf16 trainings whose weights differ in a few last
bits drift apart within two steps (12,362 of 135k bf16 weights different at
step 4, against 2-3 with this kernel, the fp32-dP one, or SDPA:
``tests/train/test_loss.py::test_trainer_steps_fused_adamw_like_foreach``).

Its error against an fp64 reference is that of SDPA's CPU kernel (checked in
``tests/model/test_attention.py``).  Unlike FlashAttention it keeps P for
the backward, about B*H*T^2/2 bf16 values per layer (the causal lower
triangle in blocks: 3.9 MB per layer at the 14M benchmark's shapes), so it is
used only for sequences up to ``MAX_SEQ``; the planner's CPU memory model
counts it (``mtnlg.plan.local_memory.predict_memory``).

``causal_attention`` picks this kernel or SDPA: this one for bf16 on CPU
without dropout and ``T <= MAX_SEQ``, SDPA everywhere else (CUDA has its own
flash kernels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 64       # queries per block (64 vs 128: 1.0x at seq 256, 1.13x at seq 1024 on the 2-core CPU)
MAX_SEQ = 1024   # longest sequence whose probabilities (about B*H*T^2/2 bf16) are kept for the backward


def uses_gemm_kernel(q: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether ``causal_attention`` runs the GEMM kernel for these inputs."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0
            and q.shape[-2] <= MAX_SEQ and type(q) is torch.Tensor)


def probability_bytes(batch: int, heads: int, seq: int) -> int:
    """Bytes the GEMM kernel keeps per layer for the backward beyond what SDPA keeps, where it
    runs (bf16 on CPU): the bf16 probabilities of each query block against the keys up to its
    end; 0 past ``MAX_SEQ``, where SDPA runs."""
    if seq > MAX_SEQ:
        return 0
    return batch * heads * sum((r1 - r0) * r1 for r0, r1 in _blocks(seq)) * 2


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v over (B, H, T, D) tensors."""
    if uses_gemm_kernel(q, dropout_p):
        return _CausalGemmAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


def _blocks(T: int):
    for r0 in range(0, T, BLOCK):
        yield r0, min(T, r0 + BLOCK)


def _causal_bias(n: int, device) -> torch.Tensor:
    """0 on and below the diagonal of an n x n block, -inf above (added: faster than masked_fill_)."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


class _CausalGemmAttention(torch.autograd.Function):
    """Every GEMM skips the blocks above the diagonal: query block i (rows
    ``r0:r1``) meets keys ``[0, r1)`` only.  Each block's probabilities are kept
    as their own contiguous (B*H, r1 - r0, r1) bf16 tensor; the key-side
    gradients (dK, dV) sum one bf16 GEMM per query block in fp32.  Everything
    runs on (B*H, T, D) views through ``bmm`` (``matmul`` on the 4-D slices
    copies its operands: 1.4x slower here)."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D)
        q, k, v = (t.contiguous().view(B * H, T, D) for t in (q, k, v))
        q32 = q.float().mul_(scale)
        k32 = k.float()
        o = torch.empty_like(q)
        probs = []
        for r0, r1 in _blocks(T):
            s = torch.bmm(q32[:, r0:r1], k32[:, :r1].transpose(1, 2))
            s[..., r0:] += _causal_bias(r1 - r0, q.device)  # the diagonal block; keys before r0 are all seen
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
        dd = (do.float() * o.float()).sum(-1, keepdim=True)  # D = rowsum(dO * O), fp32
        exact = scale == 2.0 ** round(math.log2(scale))  # folds into dO and D without rounding
        s = scale if exact else 1.0
        hi = dd.to(bf)
        do_aug = do.new_empty(B * H, T, D + 2)
        torch.mul(do, s, out=do_aug[..., :D])
        do_aug[..., D:D + 1] = hi * -s
        do_aug[..., D + 1:] = dd.sub_(hi.float()).mul_(-s)
        v_aug = v.new_empty(B * H, T, D + 2)
        v_aug[..., :D] = v
        v_aug[..., D:] = 1

        def score_grad(r0, r1, p):  # scale * P * (dP - D) of query block r0:r1, bf16
            ds = torch.bmm(do_aug[:, r0:r1], v_aug[:, :r1].transpose(1, 2)).mul_(p)
            return ds if exact else ds.mul_(scale)

        return block_gradients(q, k, do, probs, ctx.shape, score_grad)


def block_gradients(q, k, do, probs, shape, score_grad):
    """dq, dk, dv from the query blocks' bf16 probabilities and their score gradients
    (``score_grad(r0, r1, p)``): per block one bf16 GEMM each for dV and dK's partial sums
    (added in fp32) and dQ's rows, last block first (it spans every key)."""
    B, H, T, D = shape
    dq = torch.empty_like(q)
    dk = dv = None
    for (r0, r1), p in reversed(list(zip(_blocks(T), probs))):
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
