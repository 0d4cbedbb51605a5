"""``mtnlg train``: build everything from the config and hand it to the Trainer.

    mtnlg train --config configs/tiny.toml --run runs/tiny [--set optim.lr=1e-3]
    torchrun --nproc-per-node 2 -m mtnlg train --config configs/tiny.toml --run runs/tp2 --set parallel.tp=2

A run directory holds ``config.toml`` (resolved), ``tokenizer.json``,
``metrics.jsonl`` and ``checkpoints/``.  Running ``train`` again on an
existing run directory resumes from its latest checkpoint, with the saved
config (``--set`` may still change e.g. ``train.steps``).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from mtnlg.config import Config, apply_overrides, dump_toml, load_config
from mtnlg.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config (presets in configs/); omit to resume a run with its saved config.toml")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory: config.toml, tokenizer.json, metrics.jsonl, checkpoints/ "
                        "(under torchrun spell it --run-dir: torchrun reads --run as its own --run-path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable; values are TOML literals)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N steps in this invocation; run again to continue")


def resolve_config(run_dir: Path, config: str | None, overrides: list[str]) -> tuple[Config, bool]:
    """Config for a new run, or the saved config of an existing one."""
    saved = run_dir / "config.toml"
    if saved.exists():
        from mtnlg.train.trainer import config_digest
        cfg = load_config(saved, overrides)
        if config_digest(cfg) != config_digest(load_config(saved)):
            raise UserError(f"--set may not change the model, data or optimizer of the existing run {run_dir} "
                            f"(only train.steps, intervals and logging.*); start a new --run instead")
        if config and config_digest(load_config(config, overrides)) != config_digest(cfg):
            raise UserError(f"run directory {run_dir} already holds a run with a different config; "
                            f"omit --config to resume it, or choose a new --run")
        return cfg, True
    if not config:
        raise UserError(f"{run_dir} holds no run yet: pass --config (e.g. configs/tiny.toml)")
    return load_config(config, overrides), False


def data_blend(cfg: Config) -> list[tuple[float, str]]:
    if not cfg.data.blend:
        raise UserError("data.blend is empty: give [[weight, \"PREFIX\"], ...] of datasets made by `mtnlg preprocess`")
    return [(float(w), str(p)) for w, p in cfg.data.blend]


def tokenizer_path(cfg: Config) -> Path:
    path = Path(cfg.data.tokenizer or data_blend(cfg)[0][1] + ".tokenizer.json")
    if not path.exists():
        raise UserError(f"tokenizer file {path} not found (set data.tokenizer or run `mtnlg preprocess --train-tokenizer`)")
    return path


def check_data_matches_tokenizer(cfg: Config, tok_path: Path, vocab: int) -> None:
    """The model's vocabulary must cover the tokenizer, and every dataset must
    have been tokenized with it (the .idx header records its fingerprint)."""
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(tok_path))
    if tokenizer.vocab_size > vocab:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but model.vocab_size="
                        f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    for _, prefix in data_blend(cfg):
        ds = IndexedDataset(prefix, verify=False)
        if ds.fingerprint != tokenizer.fingerprint() or ds.vocab_size > vocab:
            raise UserError(f"dataset {prefix} was tokenized with a different tokenizer (vocab {ds.vocab_size}) "
                            f"than {tok_path} (vocab {tokenizer.vocab_size}); set data.tokenizer to the one used "
                            f"by `mtnlg preprocess`, or re-run it with --tokenizer {tok_path}")


def build_data(cfg: Config):
    from mtnlg.data.samples import build_datasets
    t = cfg.train
    n_train = t.steps * t.global_batch
    n_eval = max(1, t.eval_batches) * t.micro_batch
    split = tuple(float(x) for x in cfg.data.split)
    return build_datasets(data_blend(cfg), split, cfg.model.seq_len, t.seed,
                          (n_train, n_eval, n_eval), cache_dir=cfg.data.cache_dir or None)


def run(args: argparse.Namespace) -> int:
    from mtnlg.train.metrics import default_peak_tflops
    from mtnlg.train.trainer import Trainer

    run_dir = Path(args.run)
    cfg, existing = resolve_config(run_dir, args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    from mtnlg.parallel.mesh import init_distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = None
    if world > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        from mtnlg.parallel.setup import check_layout
        dims = check_layout(cfg, world)  # fails before any work
    rank, world, device = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s, device=cfg.train.device)
    # a resumed run keeps the tokenizer it was trained with; a new one copies data.tokenizer
    tok_path = run_dir / "tokenizer.json" if existing else tokenizer_path(cfg)
    if not tok_path.exists():
        raise UserError(f"{tok_path} is missing; copy the tokenizer this run was trained with there")
    vocab = cfg.model.padded_vocab(cfg.parallel.tp)
    check_data_matches_tokenizer(cfg, tok_path, vocab)
    torch.manual_seed(cfg.train.seed)
    # meta-device build: each rank allocates and initialises only its own shards (mtnlg/parallel/setup.py)
    from mtnlg.parallel.setup import build, layout_warnings
    model, topo = build(cfg, dims, device, rank)
    if dims is not None and topo.is_main:
        for line in layout_warnings(cfg, dims):
            print(f"mtnlg train: warning: {line}", flush=True)
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not existing:
            (run_dir / "config.toml").write_text(dump_toml(cfg))
            shutil.copyfile(tok_path, run_dir / "tokenizer.json")
    topo.barrier()

    train_ds, valid_ds, _ = build_data(cfg)
    peak = cfg.logging.peak_tflops or default_peak_tflops(device, cfg.train.precision)
    trainer = Trainer(cfg, model, train_ds, valid_ds, run_dir, device, topo, peak_tflops=peak)
    resumed = trainer.resume()
    if topo.is_main:
        from mtnlg.model.flops import param_count
        n_params = param_count(cfg.model, vocab)  # the whole model, whatever this rank holds
        what = f"resumed at step {trainer.step}" if resumed else "new run"
        print(f"mtnlg train: {what} in {run_dir} | {n_params / 1e6:.2f}M params | device {device} | "
              f"world {topo.world_size} (dp {topo.dp_size}{f', zero {topo.zero}' if topo.zero else ''}) | "
              f"{cfg.train.precision} | "
              f"train samples {len(train_ds)} | peak {peak:.3f} TFLOP/s", flush=True)
    if trainer.step >= cfg.train.steps:
        if topo.is_main:
            print(f"mtnlg train: run already finished ({trainer.step}/{cfg.train.steps} steps)")
        return 0
    trainer.fit(stop_after=args.stop_after)
    return 0
