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
import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from mtnlg.config import (Config, absolute_data_paths, apply_overrides, check_relative_data_paths, dump_toml,
                          load_config)
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
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="profile N training steps (after one warm-up step) with torch.profiler, print where the "
                        "time goes by class and write DIR/profile/trace-rankR.json; saves no checkpoint or metrics")


def resolve_config(run_dir: Path, config: str | None, overrides: list[str]) -> tuple[Config, bool]:
    """Config for a new run, or the saved config of an existing one."""
    saved = run_dir / "config.toml"
    if saved.exists():
        from mtnlg.train.trainer import config_digest
        cfg, recorded = load_config(saved, overrides), load_config(saved)
        if config_digest(absolute_data_paths(cfg)) != config_digest(absolute_data_paths(recorded)):
            raise UserError(f"--set may not change the model, data or optimizer of the existing run {run_dir} "
                            f"(only train.steps, intervals and logging.*); start a new --run instead")
        if config and (config_digest(absolute_data_paths(load_config(config, overrides)))
                       != config_digest(absolute_data_paths(cfg))):
            raise UserError(f"run directory {run_dir} already holds a run with a different config; "
                            f"omit --config to resume it, or choose a new --run")
        cfg.data = recorded.data  # --set may respell a data path (relative/absolute), but the run keeps its own
        check_relative_data_paths(cfg, saved)
        return cfg, True
    if not config:
        raise UserError(f"{run_dir} holds no run yet: pass --config (e.g. configs/tiny.toml)")
    return absolute_data_paths(load_config(config, overrides)), False  # the run works from any directory


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


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """Deterministic CUDA kernels (``train.deterministic``) for the run, so a run and its resume
    repeat bitwise on the same GPU: PyTorch's strict deterministic mode (an op with no
    deterministic kernel raises, naming itself; warn-only mode would leave SDPA's flash and
    memory-efficient backward on their atomic-add paths and keep cuDNN attention, which has no
    deterministic one), a fixed cuBLAS workspace and no cuDNN autotuning.  The process's
    previous settings come back afterwards (``run`` is also called in-process)."""
    if not on:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call reads it
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def run(args: argparse.Namespace) -> int:
    cfg, _ = resolve_config(Path(args.run), args.config, args.overrides)
    with deterministic_kernels(cfg.train.deterministic):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from mtnlg.train.metrics import peak_tflops, precision_warning
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
    peak, peak_source = peak_tflops(device, cfg.train.precision, cfg.logging.peak_tflops)
    warning = precision_warning(device, cfg.train.precision)
    if warning and topo.is_main:
        print(warning, file=sys.stderr, flush=True)
    trainer = Trainer(cfg, model, train_ds, valid_ds, run_dir, device, topo, peak_tflops=peak)
    resumed = trainer.resume()
    if topo.is_main:
        from mtnlg.model.flops import param_count
        n_params = param_count(cfg.model, vocab)  # the whole model, whatever this rank holds
        what = f"resumed at step {trainer.step}" if resumed else "new run"
        print(f"mtnlg train: {what} in {run_dir} | {n_params / 1e6:.2f}M params | device {device} | "
              f"world {topo.world_size} (dp {topo.dp_size}{f', zero {topo.zero}' if topo.zero else ''}) | "
              f"{cfg.train.precision} | "
              f"train samples {len(train_ds)} | MFU peak {peak:.3f} TFLOP/s ({peak_source})", flush=True)
    if args.profile is not None:
        return profile_run(trainer, run_dir, args.profile)
    if trainer.step >= cfg.train.steps:
        if topo.is_main:
            print(f"mtnlg train: run already finished ({trainer.step}/{cfg.train.steps} steps)")
        return 0
    return fit_and_report(trainer, cfg, run_dir, args.stop_after)


def profile_run(trainer, run_dir: Path, steps: int) -> int:
    """``--profile N``: time N steps by class of operation (mtnlg/perf/breakdown.py) on every
    rank; rank 0 prints its table.  The steps change only the in-memory model."""
    from mtnlg.perf.breakdown import format_table, profile_steps
    if steps < 1:
        raise UserError(f"--profile needs at least 1 step, got {steps}")
    out = run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"trace-rank{trainer.topo.rank}.json"
    result = profile_steps(trainer, steps, warmup=1, trace=trace)
    if trainer.topo.is_main:
        print(f"mtnlg train --profile: {steps} steps after 1 warm-up, rank 0 of {trainer.topo.world_size} "
              f"(self time by class; idle = wall time with no op running: Python, waiting for other ranks)")
        print(format_table(result))
        print(f"trace: {trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def fit_and_report(trainer, cfg: Config, run_dir: Path, stop_after: int | None) -> int:
    """Train, then print where the run stands and how to go on; the exit code says
    whether it finished (0) or was stopped by a signal with a checkpoint (75)."""
    import time

    from mtnlg.train import checkpoint as ckpt
    from mtnlg.train.summary import end_of_training
    t0 = time.perf_counter()
    records = trainer.fit(stop_after=stop_after)
    try:
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    except Exception:  # noqa: BLE001 - the summary must not hide the run's outcome
        latest = None
    lines, code = end_of_training(records, trainer.step, cfg.train.steps, run_dir, latest, trainer.stop_reason,
                                  trainer.topo.world_size, time.perf_counter() - t0)
    if trainer.topo.is_main:
        print("\n".join(lines), flush=True)
    return code
