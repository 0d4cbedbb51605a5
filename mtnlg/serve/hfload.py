"""Load a Hugging Face GPT-2 directory (``config.json``, weights, tokenizer)
for serving (``mtnlg serve --hf DIR``) through the converter's one mapping
table (``mtnlg.convert.hf.load_hf_gpt2``: Conv1D transposes, QKV order,
tied head, the GeLU form (tanh or erf) and LayerNorm epsilon)."""
from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.errors import UserError


def load_hf(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, tokenizer, context length)."""
    from mtnlg.convert.hf import load_hf_gpt2

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"--hf {str(path)!r} has no config.json (expected a Hugging Face GPT-2 directory)")
    cfg, model, tok = load_hf_gpt2(path, device, dtype)
    return model, tok, cfg.model.seq_len
