"""Load a trained model from a run directory (config.toml, tokenizer.json,
checkpoints/) for generation, evaluation or serving."""
from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.config import Config, load_config
from mtnlg.errors import UserError


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
             dtype: torch.dtype = torch.float32):
    """Return (cfg, model in eval mode, tokenizer) from a run directory, or from a
    Hugging Face GPT-2 directory (config.json; see mtnlg.convert.hf.load_hf_gpt2)."""
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.model.gpt import build_model
    from mtnlg.train.checkpoint import latest_checkpoint, load_model_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists() and (run_dir / "config.json").exists() and checkpoint is None:
        from mtnlg.convert.hf import load_hf_gpt2  # a Hugging Face GPT-2 directory works too
        return load_hf_gpt2(run_dir, device, dtype)
    if not (run_dir / "config.toml").exists():
        raise UserError(f"{run_dir} is not a run directory (no config.toml); train one with `mtnlg train --run {run_dir}`")
    cfg: Config = load_config(run_dir / "config.toml")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise UserError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    state = load_model_state(path)
    vocab = state["tok_emb.weight"].shape[0]
    model = build_model(cfg.model, device, vocab_size=vocab)
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    model.to(dtype).eval()
    tok_file = run_dir / "tokenizer.json"
    if not tok_file.exists():
        raise UserError(f"{tok_file} is missing; copy the tokenizer the run was trained with there")
    return cfg, model, load_tokenizer(str(tok_file))
