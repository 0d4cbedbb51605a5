"""The CPU bf16 attention kernel (mtnlg.model.attention) against an independent
float64 reference, next to SDPA's own bf16 error against the same reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mtnlg.model.attention as A
from mtnlg.config import ModelConfig
from mtnlg.model.gpt import build_model
from modelhelpers import loss_and_grads


def reference(q, k, v, do):
    """Causal attention and its gradients in float64, written out (no SDPA, no blocks)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ v
    o.backward(do.double())
    return [o.detach(), q.grad, k.grad, v.grad]


def bf16_run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [t.double() for t in (o.detach(), q.grad, k.grad, v.grad)]


def packed_run(q, k, v, do):
    """The kernel as the model calls it: the packed (B, T, H, 3D) projection in, its gradient out."""
    D = q.shape[-1]
    qkv = torch.cat((q, k, v), -1).transpose(1, 2).contiguous().requires_grad_()
    o = A._CausalGemmAttention.apply(qkv)  # (B, T, H, D)
    o.backward(do.transpose(1, 2))
    return [t.double() for t in (o.detach().transpose(1, 2), *qkv.grad.transpose(1, 2).split(D, dim=-1))]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q, k, v as the model makes them: strided views of one [B, T, H, 3D] projection
    qkv = (1.5 * torch.randn(B, T, H, 3 * D, generator=g)).to(torch.bfloat16).transpose(1, 2)
    q, k, v = qkv.split(D, dim=-1)
    return q, k, v, torch.randn(B, H, T, D, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("B,H,T,D,block", [(2, 3, 200, 32, 64),    # 3 full blocks and a ragged one; backward 128 + 72
                                           (2, 2, 96, 64, 128),    # one block
                                           (1, 2, 130, 16, 32),    # 5 blocks, the last one 2 rows; backward 64, 64, 2
                                           (1, 1, 520, 16, 32)])   # 17 blocks; backward 160, 160, 160, 40
def test_gemm_attention_is_as_accurate_as_sdpa(monkeypatch, B, H, T, D, block):
    monkeypatch.setattr(A, "BLOCK", block)
    q, k, v, do = inputs(B, H, T, D)
    ref = reference(q, k, v, do)
    ours = packed_run(q, k, v, do)
    sdpa = bf16_run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, do)
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref):
        e_ours, e_sdpa = rel(o, r), rel(s, r)
        # both are bf16 results of an exact computation: ~2^-9 relative per rounding.  Observed
        # ratios ours/sdpa 0.7-1.3; a wrong mask, scale or block edge is off by O(1)
        assert e_ours < 1.5 * e_sdpa and e_ours < 6e-3, (name, e_ours, e_sdpa)


def test_a_planted_answer_each_query_sees_only_its_past():
    # keys equal, so each query averages the values it may see: row t of the output is the
    # mean of v[0..t]; a kernel that let a query see its future would give the mean of all rows
    B, H, T, D = 1, 1, 150, 8
    q = torch.zeros(B, H, T, D, dtype=torch.bfloat16)
    k = torch.zeros_like(q)
    v = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1).expand(B, H, T, D).to(torch.bfloat16)
    o = A.causal_attention(q, k, v)  # bf16 on CPU: the kernel
    expect = (torch.arange(T, dtype=torch.float64) / 2).view(1, 1, T, 1).expand(B, H, T, D)
    # two bf16 roundings (the probabilities, the output), unit roundoff 2^-8 each; SDPA is exact here
    assert torch.allclose(o.double(), expect, rtol=2 ** -7, atol=0)


def test_dispatch_runs_the_kernel_only_where_it_is_meant_to(monkeypatch):
    q, k, v, _ = inputs(1, 2, 64, 16)
    assert A.uses_gemm_kernel(q)
    assert not A.uses_gemm_kernel(q.float())                       # fp32: SDPA
    assert not A.uses_gemm_kernel(q, dropout_p=0.1)                # dropout: SDPA's
    long = torch.zeros(1, 1, A.MAX_SEQ + 1, 8, dtype=torch.bfloat16)
    assert not A.uses_gemm_kernel(long)                            # memory: SDPA
    qf, kf, vf = q.float(), k.float(), v.float()                   # SDPA, the very call
    assert torch.equal(A.causal_attention(qf, kf, vf), F.scaled_dot_product_attention(qf, kf, vf, is_causal=True))
    packed = torch.cat((qf, kf, vf), -1).transpose(1, 2)                 # the model's entry point: same choice
    assert torch.equal(A.packed_causal_attention(packed),
                       F.scaled_dot_product_attention(qf, kf, vf, is_causal=True).transpose(1, 2))
    calls = []
    real = A._CausalGemmAttention.apply
    monkeypatch.setattr(A._CausalGemmAttention, "apply", lambda *a: calls.append(1) or real(*a))
    A.packed_causal_attention(packed.to(torch.bfloat16))
    A.packed_causal_attention(packed.to(torch.bfloat16), dropout_p=0.1)  # dropout: SDPA's
    assert len(calls) == 1


def test_probability_bytes_counts_the_blocks_kept():
    # 14M benchmark shapes: backward blocks of 128 queries over 256 positions keep 128 * (128 + 256) per head
    assert A.BLOCK == 64 and A.backward_block(256) == 128 and A.backward_block(1024) == 256
    assert A.probability_bytes(8, 6, 256) == 8 * 6 * 128 * (128 + 256) * 2
    assert A.probability_bytes(8, 6, 50) == 8 * 6 * 50 * 50 * 2
    assert A.probability_bytes(2, 1, 1024) == 2 * 256 * (256 + 512 + 768 + 1024) * 2
    assert A.probability_bytes(1, 1, A.MAX_SEQ + 1) == 0


def test_the_kept_probabilities_are_what_probability_bytes_counts():
    q, k, v, _ = inputs(2, 3, 200, 16)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        packed = torch.cat((q, k, v), -1).transpose(1, 2).contiguous().requires_grad_()
        A._CausalGemmAttention.apply(packed)
    probs = [t for t in kept if t.dim() == 3]  # the rest: the packed input and the output, both 4-D
    assert sum(t.numel() * t.element_size() for t in probs) == A.probability_bytes(2, 3, 200)


def test_block_views_hold_the_rows_of_each_block():
    # a ragged last block; any strides in: the model's q is a strided view of the packed projection
    B, T, H, d = 2, 150, 3, 5
    x = torch.randn(B, T, H, 3 * d)[..., d:2 * d]
    blocks = list(A._blocks(T, 64))
    buf = torch.full((B * H * T * (d + 2),), -1.0)
    views = A.block_views(buf, B * H, blocks, d + 2)
    A.fill_blocks(views, x, col=1)
    plain = x.transpose(1, 2).reshape(B * H, T, d)
    for (r0, r1), view in zip(blocks, views):
        assert view.is_contiguous() and view.shape == (B * H, r1 - r0, d + 2)
        assert torch.equal(view[..., 1:d + 1], plain[:, r0:r1])
        assert (view[..., 0] == -1).all() and (view[..., -1] == -1).all()  # the other columns untouched
    assert sum(v.numel() for v in views) == buf.numel()


def test_unpacked_entry_point_is_the_packed_kernel():
    q, k, v, do = inputs(2, 2, 100, 16)
    ours = bf16_run(A.causal_attention, q, k, v, do)
    for a, b in zip(ours, packed_run(q, k, v, do)):
        assert torch.equal(a, b)


def test_the_bf16_model_trains_through_the_kernel_and_matches_sdpa(monkeypatch):
    cfg = ModelConfig(n_layers=2, hidden=64, n_heads=4, seq_len=160, vocab_size=256)
    model = build_model(cfg, "cpu", seed=0).to(torch.bfloat16)
    x = torch.randint(0, 256, (2, 160), generator=torch.Generator().manual_seed(1))
    calls = []
    real = A._CausalGemmAttention.apply
    monkeypatch.setattr(A._CausalGemmAttention, "apply", lambda *a: calls.append(1) or real(*a))

    loss, grads = loss_and_grads(model, x)
    assert len(calls) == cfg.n_layers
    monkeypatch.setattr(A, "uses_gemm_kernel", lambda *a, **k: False)  # SDPA
    loss_sdpa, grads_sdpa = loss_and_grads(model, x)
    assert len(calls) == cfg.n_layers
    assert abs(loss - loss_sdpa) < 1e-2 * loss_sdpa
    assert rel(grads.double(), grads_sdpa.double()) < 2e-2


def test_sum_rounded_once_is_the_fp32_sum_rounded_once():
    # dK, dV terms: bf16 GEMM results over magnitudes far apart (rounding each partial sum to bf16
    # would lose the small ones); out a strided view, as the packed gradient's columns are
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 5):
        terms = [(torch.randn(4, 7, 6, generator=g) * 10.0 ** torch.randint(-3, 3, (4, 7, 6), generator=g))
                 .to(torch.bfloat16) for _ in range(n)]
        out = torch.zeros(4, 7, 3 * 6, dtype=torch.bfloat16)[..., 6:12]
        A.sum_rounded_once(terms, out)
        exact = terms[0].float()
        for t in terms[1:]:
            exact += t
        assert torch.equal(out, exact.to(torch.bfloat16)), n
        if n > 1:  # a bf16 running sum differs: the test sees a second rounding
            chained = terms[0]
            for t in terms[1:]:
                chained = chained + t
            assert n == 2 or not torch.equal(chained, out)
