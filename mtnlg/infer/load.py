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
    from mtnlg.train.checkpoint import iter_model_tensors, latest_checkpoint, model_shapes, verify_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists() and (run_dir / "config.json").exists() and checkpoint is None:
        from mtnlg.convert.hf import load_hf_gpt2  # a Hugging Face GPT-2 directory works too
        return load_hf_gpt2(run_dir, device, dtype)
    if not (run_dir / "config.toml").exists():
        raise UserError(f"{run_dir} is not a run directory (no config.toml); train one with `mtnlg train --run {run_dir}`")
    cfg: Config = load_config(run_dir / "config.toml")
    if checkpoint:  # an explicit choice is verified, never silently replaced
        path = Path(checkpoint)
        verify_checkpoint(path)
    else:  # the newest intact one (a damaged newest is skipped with a warning)
        path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise UserError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    shapes = model_shapes(path)
    if "tok_emb.weight" not in shapes:
        raise UserError(f"checkpoint {path} has no tok_emb.weight: it does not hold an mtnlg GPT")
    model = build_model(cfg.model, "meta", vocab_size=shapes["tok_emb.weight"][0])
    model.to_empty(device=device)
    model.lm_head.weight = model.tok_emb.weight  # to_empty breaks the tie
    own = model.state_dict()
    missing = sorted(set(own) - set(shapes))
    if missing:
        raise UserError(f"checkpoint {path} lacks {missing[0]!r} (and {len(missing) - 1} more) of the model in "
                        f"{run_dir / 'config.toml'}: it was written for a different model")
    with torch.no_grad():
        for name, t in iter_model_tensors(path):  # one tensor in memory at a time
            if name in own:
                if tuple(t.shape) != tuple(own[name].shape):
                    raise UserError(f"checkpoint {path} stores {name!r} with shape {tuple(t.shape)}, the model in "
                                    f"{run_dir / 'config.toml'} has {tuple(own[name].shape)}: it was written for a different model")
                own[name].copy_(t)
    model.to(dtype).eval()
    tok_file = run_dir / "tokenizer.json"
    if not tok_file.exists():
        raise UserError(f"{tok_file} is missing; copy the tokenizer the run was trained with there")
    return cfg, model, load_tokenizer(str(tok_file))
