"""Parameter and FLOP counting: one source of truth for the trainer's MFU,
the planner and the tests.

FLOPs follow Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters"): a GEMM of (m×k)·(k×n) costs 2mkn; causal
attention is counted over the full s×s score matrix, as the paper does;
backward costs twice the forward; full activation recomputation adds one more
forward of every transformer layer (not of the output layer).  For the
standard MLP width (ffn = 4h) these reduce to the paper's

    with recompute:    96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))
    without:           72·B·s·l·h²·(1 + s/(6h)) + 6·B·s·h·V
"""
from __future__ import annotations

from mtnlg.config import ModelConfig


def param_count(cfg: ModelConfig, vocab: int | None = None) -> int:
    """Exact number of parameters of ``GPT(cfg)`` (tied embeddings counted once)."""
    h, f, V = cfg.hidden, cfg.ffn, vocab or cfg.padded_vocab()
    per_layer = (
        2 * 2 * h                 # two LayerNorms
        + 3 * h * h + 3 * h       # fused QKV
        + h * h + h               # attention output
        + h * f + f               # MLP up
        + f * h + h               # MLP down
    )
    return V * h + cfg.seq_len * h + cfg.n_layers * per_layer + 2 * h


def layer_forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward FLOPs of one transformer layer for one token."""
    h, f, s = cfg.hidden, cfg.ffn, seq_len or cfg.seq_len
    gemms = 2 * (3 * h * h + h * h + 2 * h * f)
    attention = 2 * 2 * s * h  # QK^T and AV over the full s×s matrix
    return float(gemms + attention)


def flops_per_token(cfg: ModelConfig, recompute: bool = False, vocab: int | None = None,
                    seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward [+ recompute]) per token."""
    V = vocab or cfg.padded_vocab()
    passes = 4 if recompute else 3
    layers = passes * cfg.n_layers * layer_forward_flops_per_token(cfg, seq_len)
    logits = 3 * 2 * cfg.hidden * V
    return layers + logits


def flops_per_iteration(cfg: ModelConfig, global_batch: int, recompute: bool = False,
                        vocab: int | None = None, seq_len: int | None = None) -> float:
    s = seq_len or cfg.seq_len
    return global_batch * s * flops_per_token(cfg, recompute, vocab, s)


def forward_flops_per_token(cfg: ModelConfig, vocab: int | None = None, context: int | None = None) -> float:
    """Inference FLOPs per generated token at a given context length."""
    V = vocab or cfg.padded_vocab()
    return cfg.n_layers * layer_forward_flops_per_token(cfg, context) + 2 * cfg.hidden * V
