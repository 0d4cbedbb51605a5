"""Load a Hugging Face GPT-2 directory (``config.json``, weights, tokenizer)
into our GPT for serving (``mtnlg serve --hf DIR``).

If the converter ``mtnlg.convert.hf`` provides ``load_hf_gpt2`` it is used;
otherwise this module maps GPT-2's weights itself: ``Conv1D``
weights are stored [in, out] and transposed, and the fused QKV rows are
permuted from GPT-2's [Q | K | V] (each head-major) to our per-head
[q_h | k_h | v_h] layout.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.errors import UserError


def load_hf(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, tokenizer, context length)."""
    from mtnlg.data.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"--hf {str(path)!r} has no config.json (expected a Hugging Face GPT-2 directory)")
    try:
        from mtnlg.convert.hf import load_hf_gpt2  # the converter's loader (one mapping table), when present
    except ImportError:
        load_hf_gpt2 = None
    if load_hf_gpt2 is not None:
        _, model, tok = load_hf_gpt2(path, device, dtype)
        return model, tok, model.cfg.seq_len  # the GPT keeps its ModelConfig
    model = _load_gpt2(path)
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(str(path)), model.cfg.seq_len


def gpt2_config(hf_cfg):
    from mtnlg.config import ModelConfig
    act = getattr(hf_cfg, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"activation_function {act!r} is not supported (our GPT uses the tanh GeLU, gelu_new)")
    return ModelConfig(n_layers=hf_cfg.n_layer, hidden=hf_cfg.n_embd, n_heads=hf_cfg.n_head,
                       ffn_hidden=hf_cfg.n_inner or 0, seq_len=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size,
                       make_vocab_divisible_by=1, dropout=0.0, layernorm_eps=hf_cfg.layer_norm_epsilon)


@torch.no_grad()
def gpt2_state_dict(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict -> our GPT's parameter names and layouts."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}

    def qkv(w):  # rows [Q | K | V] (each heads x head_dim) -> per head [q | k | v]
        rest = w.shape[1:]
        return w.reshape(3, n_heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)

    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"], out[b + ln + ".bias"] = sd[h + ln + ".weight"], sd[h + ln + ".bias"]
        out[b + "attn.qkv.weight"] = qkv(sd[h + "attn.c_attn.weight"].t())
        out[b + "attn.qkv.bias"] = qkv(sd[h + "attn.c_attn.bias"])
        for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[b + ours + ".weight"] = sd[h + theirs + ".weight"].t()
            out[b + ours + ".bias"] = sd[h + theirs + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _load_gpt2(path: Path):
    from mtnlg.model.gpt import build_model
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError("--hf needs transformers: pip install 'mtnlg[hf]'") from None
    try:
        hf = GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a GPT-2 model from {path}: {err}") from None
    cfg = gpt2_config(hf.config)
    model = build_model(cfg, "cpu", vocab_size=hf.config.vocab_size)
    state = gpt2_state_dict(hf.state_dict(), cfg.n_layers, cfg.n_heads)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise UserError(f"GPT-2 weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model
