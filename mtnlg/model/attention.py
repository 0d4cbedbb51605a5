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
  256) folds into ``[v, 1, 1]`` exactly; any other is one more rounding of
  dS.  Then ``dS = P * (dP - D)`` in bf16 for the two bf16 GEMMs ``dS k`` and
  ``dS^T q``;
* dK and dV of a key block are the sum of one bf16 GEMM result per query block
  at or after it, summed in fp32 and rounded once (``sum_rounded_once``).

Before, dP was an fp32 GEMM of its own.  A bf16 dP rounded before subtracting
D, with ``D = rowsum(P * dP)`` (softmax's own backward), had the same error per
call against fp64 but made two bf16 trainings whose weights differ in a few last
bits drift apart within two steps (12,362 of 135k bf16 weights different at
step 4, against 2-3 with this kernel, the fp32-dP one, or SDPA:
``tests/train/test_loss.py::test_trainer_steps_fused_adamw_like_foreach``).

Its error against an fp64 reference is that of SDPA's CPU kernel (checked in
``tests/model/test_attention.py``).  Unlike FlashAttention it keeps P for
the backward, about B*H*T^2/2 bf16 values per layer (the causal lower
triangle in blocks of ``backward_block(T)`` queries: 4.7 MB per layer at the
14M benchmark's shapes), so it is used only for sequences up to ``MAX_SEQ``;
the planner's CPU memory model counts it (``probability_bytes``, used by
``mtnlg.plan.local_memory.predict_memory``).

Layout (session 7).  The model hands the kernel its fused projection as is,
(B, T, H, 3D) (``packed_causal_attention``), and gets back (B, T, H, D) and
the gradient in the projection's layout: before, q, k and v went in as
strided (B, H, T, D) views that the kernel copied, the output was transposed
and copied by the model, and autograd concatenated the three gradients and
copied them again.  ``torch.bmm`` (oneDNN) copies any operand that is not
contiguous or transposed-contiguous, so query-side operands are laid out
block by block (``block_views``: each block its own contiguous tensor, made by
the copy that happens anyway); key-side prefixes ``k[:, :r1]`` are still
copied inside ``bmm`` (a layout holding every prefix contiguously does not
exist).  The forward computes scores and softmax by blocks of ``BLOCK`` = 64
queries, the backward works by blocks of ``backward_block(T)`` queries (128 at
256 tokens, 256 at 1024): half the calls and partial sums, larger GEMMs, for
20 % more work in its GEMMs and ``P v`` at 256 tokens (12 64x64 tiles instead of
10); the forward writes P straight into those larger blocks (zero above the
causal edge) and multiplies ``P v`` by them.
Forward + backward per layer at the 14M shapes went from 16.7 to 14.6 ms
(1.14x), at (2, 6, 1024, 64) from 43.8 to 34.4 ms (1.27x)
(``benchmarks/attention_cpu.py --before``); the whole 14M training step
1.01-1.03x (``benchmarks/ab_steps.py --switch switches:attention_packed``).  Measured and
not kept: blocks of 128 in the forward too (forward 6.2 against 5.6 ms);
summing the dK/dV terms with ``torch.sum`` over a stacked bf16 buffer (its
bf16 reduction: 0.8 ms against 0.3 ms for fp32 accumulation); casting while
permuting in one copy (0.26 against 0.18 ms for a bf16 permute then a
contiguous cast); a strided ``torch.mul(..., out=)`` to fold the scale into
the query copy (the kernel 4 % slower); oneDNN's bf16 mode for fp32 matmuls
(``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``: bitwise the same
scores from these exact-bf16 inputs, but 0.60 against 0.64 ms per score GEMM,
with a global switch); forward blocks of 32 (within noise, more calls); dV
from the widened dO buffer instead of its own contiguous copy (0.50 against 0.43 ms
per GEMM); D in chunks of the batch to stay in cache (0.33 against 0.26 ms).

``causal_attention`` picks this kernel or SDPA: this one for bf16 on CPU
without dropout and ``T <= MAX_SEQ``, SDPA everywhere else (CUDA has its own
flash kernels); ``packed_causal_attention`` is the same choice for the packed
projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 64       # queries per block of the forward's fp32 scores and softmax
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
    return batch * heads * sum((r1 - r0) * r1 for r0, r1 in _blocks(seq, backward_block(seq))) * 2


def backward_block(T: int) -> int:
    """Queries per block of the backward and of the kept probabilities: whole forward blocks,
    at least 128 queries, and at most about four blocks per sequence (fewer, larger blocks were
    faster on the 2-core CPU: 2 x 128 at 256 tokens, 4 x 256 at 1024, ``benchmarks/attention_cpu.py``)."""
    return BLOCK * max(-(-128 // BLOCK), -(-T // (4 * BLOCK)))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v over (B, H, T, D) tensors."""
    if uses_gemm_kernel(q, dropout_p):
        return _CausalGemmAttention.apply(torch.cat((q, k, v), -1).transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


def packed_causal_attention(qkv: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``causal_attention`` of the fused projection's output ``qkv`` (B, T, H, 3D), per head
    ``[q | k | v]``; returns (B, T, H, D).  The GEMM kernel reads and writes these layouts
    directly (its gradient is qkv's, with no copy or concatenation by autograd)."""
    q, k, v = qkv.transpose(1, 2).split(qkv.shape[-1] // 3, dim=-1)
    if uses_gemm_kernel(q, dropout_p):
        return _CausalGemmAttention.apply(qkv)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p).transpose(1, 2)


def _blocks(T: int, n: int = 0, start: int = 0):
    n = n or BLOCK
    for r0 in range(start, T, n):
        yield r0, min(T, r0 + n)


def _causal_bias(n: int, device) -> torch.Tensor:
    """0 on and below the diagonal of an n x n block, -inf above (added: faster than masked_fill_)."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


def _causal_biases(T: int, device) -> dict[int, torch.Tensor]:
    """``_causal_bias`` for each block size of a length-T sequence (at most two), made once per call."""
    return {n: _causal_bias(n, device) for n in {min(BLOCK, T), T % BLOCK or BLOCK}}


def block_views(buf: torch.Tensor, BH: int, blocks, width: int) -> list[torch.Tensor]:
    """Query-block-major views of a flat buffer: block ``(r0, r1)`` is its own contiguous
    (BH, r1 - r0, width) tensor, the layout ``bmm`` takes without copying (a slice
    ``x[:, r0:r1]`` of a (BH, T, width) tensor it copies first)."""
    views, off = [], 0
    for r0, r1 in blocks:
        n = BH * (r1 - r0) * width
        views.append(buf[off:off + n].view(BH, r1 - r0, width))
        off += n
    return views


def fill_blocks(views, x: torch.Tensor, col: int = 0) -> None:
    """Copy x (B, T, H, d), any strides and dtype, into columns ``col:col + d`` of the block
    views: the full blocks in one copy, a shorter last block in a second."""
    B, T, H, d = x.shape
    n = views[0].shape[1]
    full = sum(1 for v in views if v.shape[1] == n)
    width = views[0].shape[2]
    first = views[0].storage_offset()
    dst = views[0].as_strided((full, B, H, n, d), (B * H * n * width, H * n * width, n * width, width, 1),
                              first + col)
    dst.copy_(x[:, :full * n].view(B, full, n, H, d).permute(1, 0, 3, 2, 4))
    if full < len(views):
        last = views[-1]
        last.view(B, H, last.shape[1], width)[..., col:col + d].copy_(x[:, full * n:].transpose(1, 2))


def sum_rounded_once(terms: list[torch.Tensor], out: torch.Tensor) -> None:
    """out = the sum of the bf16 ``terms`` in fp32, rounded once to out's dtype (bf16 in, bf16 out:
    an elementwise op on bf16 computes in fp32 and rounds its result, so two terms need no fp32
    copy; more are summed in an fp32 accumulator, in the order given)."""
    if len(terms) == 1:
        out.copy_(terms[0])
        return
    acc = terms[0]
    if len(terms) > 2:
        acc = terms[0].float()
        for t in terms[1:-1]:
            acc += t
    torch.add(acc, terms[-1], out=out)


class _CausalGemmAttention(torch.autograd.Function):
    """Input the packed projection ``qkv`` (B, T, H, 3D) (per head ``[q | k | v]``), output
    (B, T, H, D) contiguous, input gradient in qkv's layout.  Every GEMM skips the blocks
    above the diagonal: query block i (rows ``r0:r1``) meets keys ``[0, r1)`` only; scores
    and softmax by blocks of ``BLOCK`` queries, the kept bf16 probabilities and the backward
    by blocks of ``backward_block(T)`` queries.  Query-side operands are contiguous per block
    (``block_views``), key-side ones (B*H, T, D)."""

    @staticmethod
    def forward(ctx, qkv):
        B, T, H, D3 = qkv.shape
        D, BH = D3 // 3, B * H
        scale = 1.0 / math.sqrt(D)
        small, big = BLOCK, backward_block(T)
        q16 = qkv.new_empty(BH * T * D)
        fill_blocks(block_views(q16, BH, _blocks(T, small), D), qkv[..., :D])
        q32 = block_views(q16.float().mul_(scale), BH, _blocks(T, small), D)  # exact inputs, fp32 scores
        k32 = qkv[..., D:2 * D].transpose(1, 2).contiguous().view(BH, T, D).float()
        v = qkv[..., 2 * D:].transpose(1, 2).contiguous().view(BH, T, D)
        o = qkv.new_empty(BH, T, D)
        bias = _causal_biases(T, qkv.device)
        probs, i = [], 0
        for R0, R1 in _blocks(T, big):
            p = qkv.new_empty(BH, R1 - R0, R1)
            for r0, r1 in _blocks(R1, small, R0):
                s = torch.bmm(q32[i], k32[:, :r1].transpose(1, 2))
                s[..., r0:] += bias[r1 - r0]  # the diagonal block; keys before r0 are all seen
                p[:, r0 - R0:r1 - R0, :r1] = torch.softmax(s, dim=-1)  # rounded once to bf16
                if r1 < R1:
                    p[:, r0 - R0:r1 - R0, r1:] = 0
                i += 1
            torch.bmm(p, v[:, :R1], out=o[:, R0:R1])  # oneDNN writes the strided rows in place
            probs.append(p)
        o = o.view(B, H, T, D).transpose(1, 2).contiguous()  # (B, T, H, D): the model's view to (B, T, H*D) is free
        ctx.save_for_backward(qkv, o, *probs)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, *probs = ctx.saved_tensors
        B, T, H, D3 = qkv.shape
        D, BH = D3 // 3, B * H
        scale, bf = ctx.scale, qkv.dtype
        blocks = list(_blocks(T, backward_block(T)))
        exact = scale == 2.0 ** round(math.log2(scale))  # folds into [v, 1, 1] without rounding
        s = scale if exact else 1.0
        # D = rowsum(dO * O) in fp32, (B, T, H, 1), split into two bf16 numbers
        dd = do.float().mul_(o).sum(-1, keepdim=True)
        hi = dd.to(bf)
        hilo = torch.cat((-hi, (hi.float() - dd).to(bf)), -1)  # -D_hi, -D_lo
        dob = block_views(do.new_empty(BH * T * D), BH, blocks, D)
        fill_blocks(dob, do)
        do_aug = block_views(do.new_empty(BH * T * (D + 2)), BH, blocks, D + 2)  # [dO, -D_hi, -D_lo]
        do_aug[0].as_strided((BH * T, D), (D + 2, 1)).copy_(dob[0].as_strided((BH * T, D), (D, 1)))  # same row order
        fill_blocks(do_aug, hilo, D)
        qb = block_views(do.new_empty(BH * T * D), BH, blocks, D)
        fill_blocks(qb, qkv[..., :D])
        k = qkv[..., D:2 * D].transpose(1, 2).contiguous().view(BH, T, D)
        v_aug = qkv.new_empty(B, H, T, D + 2)  # [v s, s, s]: the GEMM gives s (dP - D)
        v_aug[..., :D] = qkv[..., 2 * D:].transpose(1, 2)
        v_aug[..., D:] = 1
        v_aug = v_aug.view(BH, T, D + 2)
        if s != 1.0:
            v_aug.mul_(s)
        dqkv = torch.empty_like(qkv)
        out = [dqkv[..., c:c + D].transpose(1, 2) for c in (0, D, 2 * D)]  # (B, H, T, D) views
        parts_k, parts_v = [], []  # each query block's bf16 dK, dV over keys [0, r1), the last block's first
        for i in reversed(range(len(blocks))):  # the last block first: it spans every key
            (r0, r1), p = blocks[i], probs[i]
            parts_v.append(torch.bmm(p.transpose(1, 2), dob[i]))
            ds = torch.bmm(do_aug[i], v_aug[:, :r1].transpose(1, 2)).mul_(p)  # scale * P * (dP - D)
            if not exact:
                ds.mul_(scale)
            out[0][:, :, r0:r1] = torch.bmm(ds, k[:, :r1]).view(B, H, r1 - r0, D)
            parts_k.append(torch.bmm(ds.transpose(1, 2), qb[i]))
            for parts, o in ((parts_k, out[1]), (parts_v, out[2])):  # keys r0:r1 have all their terms now
                sum_rounded_once([t[:, r0:r1].view(B, H, r1 - r0, D) for t in parts], o[:, :, r0:r1])
        return dqkv
