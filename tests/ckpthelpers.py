"""A tiny Trainer on synthetic tokens for checkpoint tests (no dataset files,
no CLI): the same global batch of 16 sequences in micro-batches of 4 at every
layout, so the config digest (and the data order) match across layouts."""
from __future__ import annotations

import numpy as np
import torch


def tiny_config(tp=1, pp=1, dp=1, zero=0, precision="fp32", async_save=False, layers=2, hidden=32, keep=2,
                schedule=None):
    from mtnlg.config import Config
    cfg = Config()
    m, t, o = cfg.model, cfg.train, cfg.optim
    m.n_layers, m.hidden, m.n_heads, m.seq_len, m.vocab_size, m.make_vocab_divisible_by = layers, hidden, 4, 16, 250, 64
    m.dropout = 0.0
    t.global_batch, t.micro_batch, t.steps, t.precision, t.device = 16, 4, 10, precision, "cpu"
    t.async_save, t.keep_checkpoints = async_save, keep
    o.lr, o.warmup_steps, o.grad_clip = 3e-3, 1, 1.0
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.zero = tp, pp, dp, zero
    if schedule:
        cfg.parallel.pp_schedule = schedule
    return cfg


def dataset(cfg, n=96):
    g = np.random.default_rng(0)
    return [g.integers(0, cfg.model.vocab_size, cfg.model.seq_len + 1) for _ in range(n)]


def make_trainer(cfg, run_dir, world=1, rank=0, seed=7):
    """A Trainer on ``world`` ranks (this process is ``rank``); world=1 ignores cfg.parallel.
    The model comes from the trainer's own builder (meta device, layout-independent init)."""
    from mtnlg.parallel.setup import build, check_layout
    from mtnlg.train.trainer import Trainer
    device = torch.device("cpu")
    dims = check_layout(cfg, world) if world > 1 else None
    model, topo = build(cfg, dims, device, rank, seed=seed)
    data = dataset(cfg)
    return Trainer(cfg, model, data, data, run_dir, device, topo)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def params(trainer) -> dict[str, torch.Tensor]:
    """Full copies of the trainer's weights (collective under tp/zero)."""
    return {n: full(p).clone() for n, p in trainer.model.named_parameters()}
