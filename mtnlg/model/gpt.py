"""A decoder-only GPT in plain PyTorch (the MT-NLG architecture).

Pre-LayerNorm blocks, learned absolute positions, GeLU MLP (GPT-2's tanh form
or the exact erf form, ``model.activation``), input and output embeddings
tied, causal attention (``mtnlg.model.attention``: SDPA, or a GEMM kernel
for bf16 on CPU) and Megatron's scaled initialisation.  This file knows nothing about parallelism:
tensor, pipeline and data parallelism are applied to it from outside
(``mtnlg.parallel``).  Two habits make that possible:

* the fused QKV projection stores its output per head as ``[q_h | k_h | v_h]``
  (Megatron's layout), so splitting its rows into contiguous chunks hands each
  tensor-parallel rank whole heads, and attention reshapes with ``view(B, T,
  -1, ...)`` so it works on whatever number of heads is local;
* blocks live in an ``nn.ModuleDict`` keyed by layer number, so a pipeline
  stage is the same model with some entries deleted, and parameter names
  match the full model's.

Batches of prompts of different lengths are left-padded: ``forward(x, pad=p)``
takes each row's count of leading pad tokens, starts that row's positions at
its first real token and hides the pads from every real query.

Shapes: B batch, T time, C hidden, H heads, D head_dim, V padded vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtnlg.config import ModelConfig, gelu_approximation
from mtnlg.model.bias_gelu import linear_gelu
from mtnlg.model.attention import packed_causal_attention


@dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    Buffers are allocated lazily by each attention layer on first use with
    shape (B, H_local, max_len, D), so the same cache works whether the layer
    holds all heads or a tensor-parallel slice of them.  ``pos`` counts the
    tokens already written.
    """

    max_len: int
    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    pos: int = 0

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if start + T > self.max_len:
            raise ValueError(f"KV cache overflow: {start + T} tokens > max_len {self.max_len}")
        if layer not in self.keys or self.keys[layer].shape[0] != B:
            self.keys[layer] = k.new_zeros(B, H, self.max_len, D)
            self.values[layer] = v.new_zeros(B, H, self.max_len, D)
        self.keys[layer][:, :, start:start + T] = k
        self.values[layer][:, :, start:start + T] = v
        return self.keys[layer][:, :, :start + T], self.values[layer][:, :, :start + T]

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Store the new keys/values, then attention of the new queries
        (positions start..start+T-1) over every cached key up to their own
        position (or as ``mask`` says: left padding, see ``GPT.padding_mask``).
        Attention layers call this whenever a cache is given, so another cache
        (the serving engine's ``SlotKVCache``) can lay out sequences its own way."""
        T = q.shape[2]
        k, v = self.update(layer, k, v, start)
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        for name in self.keys:
            self.keys[name] = self.keys[name].index_select(0, index)
            self.values[name] = self.values[name].index_select(0, index)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: str):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.layer_id = layer_id
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache=None, start: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3 * self.head_dim)  # B, T, H, 3D
        if cache is None and mask is None:  # B, T, H, D
            y = packed_causal_attention(qkv, dropout_p=self.dropout if self.training else 0.0)
            return self.resid_drop(self.proj(y.reshape(B, T, -1)))
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        if cache is not None:  # incremental decoding: the cache knows which earlier keys each query sees
            y = (cache.attend(self.layer_id, q, k, v, start) if mask is None
                 else cache.attend(self.layer_id, q, k, v, start, mask))
        else:  # (B, 1, T, T) boolean, from GPT.padding_mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn)
        self.proj = nn.Linear(cfg.ffn, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = gelu_approximation(cfg.activation)  # "tanh" (GPT-2) or "none" (erf, Megatron)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(linear_gelu(x, self.fc, self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.attn = CausalSelfAttention(cfg, layer_id)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache=None, start: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT language model.  ``forward(tokens) -> logits`` of shape (B, T, V).

    Any of ``tok_emb``, ``blocks`` entries, ``ln_f`` or ``lm_head`` may be
    absent (set to None / deleted) on a pipeline stage; forward then skips it
    and accepts or returns hidden states instead of tokens or logits.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size or cfg.padded_vocab()
        self.tok_emb = nn.Embedding(self.vocab_size, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, str(i)) for i in range(cfg.n_layers)})
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.lm_head = nn.Linear(cfg.hidden, self.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied input/output embeddings

    def forward(self, x: torch.Tensor, cache=None, start: int | torch.Tensor = 0,
                pad: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``start`` is the position of the first token (all rows alike), or a
        (B, T) tensor of every token's position, for tokens of sequences at
        different lengths (the serving engine packs a step's tokens into one
        row; its ``cache`` then understands that layout, see
        ``mtnlg.serve.cache.SlotKVCache``).  ``pad`` (B,) counts each row's
        leading pad tokens (left padding, integer ``start``); the columns
        ``start..start+T-1`` of row b then sit at positions ``col - pad[b]``.
        ``mask`` (B, 1, T, T) boolean replaces the causal mask (True where query
        t may see key s): fine-tuning packs several examples into one row, each
        with its own positions (``start`` as a tensor) and seeing only itself
        (``mtnlg.finetune.pack.document_attention`` builds both)."""
        T = x.shape[1]
        if pad is not None:
            mask = self.padding_mask(pad, start, T)
        if self.tok_emb is not None:
            if isinstance(start, torch.Tensor):
                pos = start
            else:
                if start + T > self.cfg.seq_len:
                    raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.cfg.seq_len}")
                pos = torch.arange(start, start + T, device=x.device)
                if pad is not None:
                    pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T); pads take position 0
            x = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks.values():
            x = block(x, cache, start, mask)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def init_rule(self, name: str) -> tuple[str, float, str]:
        """How parameter ``name`` starts: ("ones" | "zeros" | "normal", std, key).
        Megatron init: N(0, std) everywhere, N(0, std/sqrt(2L)) on the
        projections that write into the residual stream, zero biases, unit
        LayerNorm gains.  ``key`` names the random stream: the output head
        shares the input embedding's (the two are one tied weight)."""
        if name.endswith(".bias"):
            return "zeros", 0.0, name
        if ".ln_" in name or name.startswith("ln_f"):
            return "ones", 0.0, name
        std = self.cfg.init_std
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            std = std / math.sqrt(2.0 * self.cfg.n_layers)
        return "normal", std, "tok_emb.weight" if name == "lm_head.weight" else name

    @staticmethod
    def padding_mask(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
        """(B, 1, T, start+T) attention mask for left-padded rows: the query in
        column j sees key column k when k <= j and k is not a pad.  A pad query
        sees itself only, so no softmax row is empty (an empty row would give
        NaN, and 0 * NaN poisons later layers even through a masked weight)."""
        q = torch.arange(start, start + T, device=pad.device)[:, None]
        k = torch.arange(start + T, device=pad.device)[None, :]
        real = k[None] >= pad[:, None, None]
        return ((k <= q)[None] & real | (k == q)[None])[:, None]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every (whole, non-meta) parameter by ``init_rule``.  With
        a seed, values depend only on (seed, parameter name, element index)
        (``mtnlg.model.init``), so any shard of any layout can be initialised
        to the same numbers on its own; without one, from the global RNG."""
        from mtnlg.model.init import fill_normal_slice
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            kind, std, key = self.init_rule(name)
            if kind != "normal":
                p.fill_(1.0 if kind == "ones" else 0.0)
            elif seed is None:
                p.normal_(0.0, std)
            else:
                fill_normal_slice(p, seed, key, std, tuple(p.shape), (0,) * p.ndim)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None,
                vocab_size: int | None = None) -> GPT:
    """Build on the meta device, then materialise on ``device`` and initialise.
    With device='meta' the model stays shapes-only (any preset, 530B included)."""
    with torch.device("meta"):
        model = GPT(cfg, vocab_size)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.lm_head.weight = model.tok_emb.weight  # to_empty breaks the tie
    model.init_weights(seed)
    return model
