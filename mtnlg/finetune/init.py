"""Where a fine-tune starts: the init model's config, tokenizer and weights.

The init is a run directory (``config.toml``, ``tokenizer.json``,
``checkpoints/``) or a Hugging Face GPT-2 directory, read through
``mtnlg.convert.hf`` (the mapping ``mtnlg import --hf`` uses) without writing
a copy of it.  Only model weights are taken over
(optimizer state, step and data position start fresh); tensors are loaded
into the already parallelized model through the topology's full-state
loader, so any tp/pp/dp/zero layout works.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from mtnlg.config import Config, ModelConfig, load_config
from mtnlg.errors import UserError


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists() and not (path / "config.toml").exists()


@dataclass
class InitSource:
    """The model a fine-tune starts from: its config, tokenizer and where its weights are."""
    path: Path
    hf: bool
    model: ModelConfig
    tokenizer: object
    checkpoint: Path | None = None  # run directories: the step_* directory

    def state(self) -> dict[str, torch.Tensor]:
        """Full weights under mtnlg's parameter names."""
        if self.hf:
            return _hf().load_hf_state(self.path, self.model)
        from mtnlg.train.checkpoint import load_model_state
        return load_model_state(self.checkpoint)


def _hf():
    try:
        from mtnlg.convert import hf  # the Hugging Face GPT-2 import/export
    except ImportError:
        raise UserError("this mtnlg cannot read Hugging Face directories (no mtnlg.convert); pass a run "
                        "directory to --from") from None
    return hf


def open_init(path: str | Path, step: int = 0) -> InitSource:
    """Check ``finetune.init`` and read its config and tokenizer (weights are read later, by ``state``)."""
    from mtnlg.data.tokenizer import load_tokenizer
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--from {path} does not exist or is not a directory")
    if is_hf_dir(path):
        if step:
            raise UserError(f"--step applies to run directories; {path} is a Hugging Face directory")
        hf = _hf()
        model = hf.model_config_from_hf(hf.read_hf_config(path), str(path))
        return InitSource(path, True, model, hf.load_hf_tokenizer(path))
    checkpoint = init_checkpoint(path, step)
    if not (path / "tokenizer.json").exists():
        raise UserError(f"{path}/tokenizer.json is missing; the fine-tune needs the tokenizer the model was trained with")
    return InitSource(path, False, load_config(path / "config.toml").model,
                      load_tokenizer(str(path / "tokenizer.json")), checkpoint)


def init_checkpoint(run_dir: Path, step: int = 0) -> Path:
    """The init run's checkpoint directory (its latest, or ``step``)."""
    from mtnlg.train.checkpoint import latest_checkpoint, step_dir, verify_checkpoint
    if not (run_dir / "config.toml").exists():
        raise UserError(f"finetune.init {run_dir} is not a run directory (no config.toml) nor a Hugging Face "
                        f"GPT-2 directory (no config.json)")
    if step:
        path = step_dir(run_dir / "checkpoints", step)
        if not path.exists():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
            raise UserError(f"{run_dir} has no checkpoint at step {step} (it has {', '.join(have) or 'none'})")
        verify_checkpoint(path)
        return path
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise UserError(f"finetune.init {run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    return path


def take_model_config(cfg: Config, init_model: ModelConfig) -> Config:
    """``cfg`` with the init run's model section; of the model keys only
    ``model.dropout`` may be changed for fine-tuning."""
    mine, default = cfg.model, ModelConfig()
    model = copy.deepcopy(init_model)
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


def resize_vocab(w: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding table with ``rows`` rows: the padded vocabulary depends on
    ``parallel.tp``; rows past the tokenizer's vocabulary are never looked up."""
    if w.shape[0] >= rows:
        return w[:rows]
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, topo, source: InitSource, device: torch.device) -> None:
    """Copy the init model's weights into this rank's part of ``model``."""
    state = source.state()
    path = source.checkpoint or source.path
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
