"""Where a fine-tune starts: the init model's config, tokenizer and weights.

The init is a run directory (``config.toml``, ``tokenizer.json``,
``checkpoints/``) or a Hugging Face GPT-2 directory, which is first imported
into ``RUN/init`` with ``mtnlg import`` (``mtnlg.convert``) so the fine-tune
always starts from a run directory.  Only model weights are taken over
(optimizer state, step and data position start fresh); tensors are loaded
into the already parallelized model through the topology's full-state
loader, so any tp/pp/dp/zero layout works.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from mtnlg.config import Config, ModelConfig, load_config
from mtnlg.errors import UserError


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists() and not (path / "config.toml").exists()


def import_hf(hf_dir: Path, out: Path) -> Path:
    """Import a Hugging Face GPT-2 directory into the run directory ``out``."""
    try:
        from mtnlg.convert.hf import import_hf as convert  # built by the HF import/export work
    except ImportError:
        raise UserError(f"{hf_dir} is a Hugging Face directory, but this mtnlg has no `mtnlg import --hf`; "
                        f"import it into a run directory first, or pass a run directory to --from") from None
    if not (out / "config.toml").exists():
        convert(hf_dir, out)
    return out


def init_checkpoint(run_dir: Path, step: int = 0) -> Path:
    """The init run's checkpoint directory (its latest, or ``step``)."""
    from mtnlg.train.checkpoint import latest_checkpoint, step_dir
    if not (run_dir / "config.toml").exists():
        raise UserError(f"finetune.init {run_dir} is not a run directory (no config.toml) nor a Hugging Face "
                        f"GPT-2 directory (no config.json)")
    if step:
        path = step_dir(run_dir / "checkpoints", step)
        if not path.exists():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
            raise UserError(f"{run_dir} has no checkpoint at step {step} (it has {', '.join(have) or 'none'})")
        return path
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise UserError(f"finetune.init {run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    return path


def take_model_config(cfg: Config, init_cfg: Config) -> Config:
    """``cfg`` with the init run's model section; of the model keys only
    ``model.dropout`` may be changed for fine-tuning."""
    mine, default = cfg.model, ModelConfig()
    model = copy.deepcopy(init_cfg.model)
    for f in dataclasses.fields(ModelConfig):
        value = getattr(mine, f.name)
        if value == getattr(default, f.name) or value == getattr(model, f.name):
            continue
        if f.name != "dropout":
            raise UserError(f"model.{f.name}={value!r} conflicts with the init run's {getattr(model, f.name)!r}: "
                            f"the model comes from finetune.init; only model.dropout may be set for fine-tuning")
        model.dropout = value
    cfg.model = model
    return cfg.validate()


def load_init_config(run_dir: Path) -> Config:
    return load_config(run_dir / "config.toml")


def resize_vocab(w: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding table with ``rows`` rows: the padded vocabulary depends on
    ``parallel.tp``; rows past the tokenizer's vocabulary are never looked up."""
    if w.shape[0] >= rows:
        return w[:rows]
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, topo, path: Path, device: torch.device) -> None:
    """Copy the init checkpoint's weights into this rank's part of ``model``."""
    from mtnlg.train.checkpoint import load_model_state
    state = load_model_state(path)
    own = model.state_dict()
    weights = {}
    for name, param in own.items():
        if name not in state:
            raise UserError(f"init checkpoint {path} has no weight {name!r}; was it written by mtnlg?")
        w = state[name]
        if name in ("tok_emb.weight", "lm_head.weight"):
            w = resize_vocab(w, getattr(model, "vocab_size", w.shape[0]))
        weights[name] = w.to(device)
    topo.load_full_state_dict(model, weights)
