"""``mtnlg finetune``: supervised fine-tuning on prompt/response or chat JSONL.

    mtnlg finetune --from runs/tiny --data qa.jsonl --run runs/tiny-qa --config configs/finetune/tiny.toml
    torchrun --nproc-per-node 2 -m mtnlg finetune --from runs/tiny --data qa.jsonl --run-dir runs/qa-tp2 \\
        --config configs/finetune/tiny.toml --set parallel.tp=2

The fine-tune is a training run like any other: the same ``Trainer``
(tp/pp/dp/zero, precision, checkpoints, metrics), fed by
``mtnlg.finetune.pack.FinetuneDataset`` whose targets are masked to the
response tokens.  The run directory holds what ``train`` writes
(``config.toml`` with a ``[finetune]`` section, ``tokenizer.json``,
``metrics.jsonl``, ``checkpoints/``) plus ``chat_template.json`` (used by
``mtnlg generate --chat``) and ``finetune_data.json`` (what was read, skipped
and truncated, with the data files' SHA-256).  Running the command again on
the run directory resumes it, bitwise as ``train`` does; changed data files
are refused.  Bad input fails before anything is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from mtnlg.config import Config, DataConfig, dump_toml, load_config
from mtnlg.errors import UserError

DATA_FILE = "finetune_data.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory of the fine-tune (an existing one resumes; under torchrun say --run-dir)")
    p.add_argument("--from", dest="init", help="run directory or Hugging Face GPT-2 directory to start from "
                                               "(finetune.init)")
    p.add_argument("--step", type=int, help="checkpoint step of --from to start from (finetune.init_step; default latest)")
    p.add_argument("--data", help="training JSONL of {prompt, response} or {messages} lines (finetune.data)")
    p.add_argument("--valid", help="held-out JSONL (finetune.valid; default: finetune.valid_fraction of --data)")
    p.add_argument("--config", help="TOML with optim/train/parallel/finetune settings, e.g. configs/finetune/tiny.toml "
                                    "(the model section comes from --from)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad line or over-long example "
                                                         "instead of skipping/truncating and counting (finetune.strict)")
    p.add_argument("--no-pack", action="store_true", help="one example per row, padded (finetune.pack=false)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N steps in this invocation; run again to continue")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("init", "finetune.init"), ("data", "finetune.data"), ("valid", "finetune.valid")):
        value = getattr(args, flag)
        if value:
            out.append(f"{key}={json.dumps(str(Path(value).resolve()))}")
    if args.step is not None:
        out.append(f"finetune.init_step={args.step}")
    if args.strict:
        out.append("finetune.strict=true")
    if args.no_pack:
        out.append("finetune.pack=false")
    return out + list(args.overrides)


def resolve_config(args: argparse.Namespace):
    """(config, existing run?, the init model's InitSource for a new run, else None)."""
    from mtnlg.finetune import init
    from mtnlg.train.trainer import config_digest
    run_dir = Path(args.run)
    overrides = _flag_overrides(args)
    saved = run_dir / "config.toml"
    if saved.exists():
        if not (run_dir / DATA_FILE).exists():
            raise UserError(f"{run_dir} holds a pretraining run, not a fine-tune; choose a new --run "
                            f"(and pass --from {run_dir} to fine-tune it)")
        cfg = load_config(saved, overrides)
        if config_digest(cfg) != config_digest(load_config(saved)):
            raise UserError(f"--from/--data/--valid/--set may not change the model, data or optimizer of the "
                            f"existing fine-tune {run_dir} (only train.steps, intervals and logging.*)")
        return cfg, True, None
    cfg = load_config(args.config, overrides)
    f = cfg.finetune
    if not f.init or not f.data:
        raise UserError(f"{run_dir} holds no fine-tune yet: pass --from RUN_OR_HF_DIR and --data FILE.jsonl")
    for what, path in (("--data", f.data), ("--valid", f.valid)):
        if path and not Path(path).is_file():
            raise UserError(f"{what} {path} does not exist")
    source = init.open_init(f.init, f.init_step)
    cfg = init.take_model_config(cfg, source.model)
    cfg.data = DataConfig()  # the init run's pretraining blend plays no part
    return cfg, False, source


def build_datasets(cfg: Config, tokenizer, template, report_out: dict | None = None):
    """(train, valid) FinetuneDatasets and the data report, from cfg.finetune."""
    from mtnlg.finetune.data import load_examples, split_examples
    from mtnlg.finetune.pack import FinetuneDataset, build_rows
    f, row_len = cfg.finetune, cfg.model.seq_len + 1
    train_ex, train_rep = load_examples(f.data, tokenizer, template, row_len, f.strict)
    if f.valid:
        valid_ex, valid_rep = load_examples(f.valid, tokenizer, template, row_len, f.strict)
    else:
        train_ex, valid_ex = split_examples(train_ex, f.valid_fraction, cfg.train.seed)
        valid_rep = None
    train_rows = build_rows(train_ex, row_len, tokenizer.eod_id, f.pack)
    valid_rows = build_rows(valid_ex, row_len, tokenizer.eod_id, f.pack)
    report = {"train": train_rep.to_json(), "valid": valid_rep.to_json() if valid_rep else None,
              "train_examples": len(train_ex), "valid_examples": len(valid_ex),
              "train_rows": len(train_rows), "valid_rows": len(valid_rows), "pack": f.pack,
              "row_fill": round(float((train_rows.doc != -1).mean()), 4)}
    train = FinetuneDataset(train_rows, cfg.train.seed, shuffle=True, document_mask=f.pack)
    valid = FinetuneDataset(valid_rows, cfg.train.seed, shuffle=False, document_mask=f.pack)
    lines = [train_rep.summary()] + ([valid_rep.summary()] if valid_rep else [])
    return train, valid, report, lines


def _check_unchanged(run_dir: Path, report: dict) -> None:
    saved = json.loads((run_dir / DATA_FILE).read_text())
    for split in ("train", "valid"):
        old, new = saved.get(split), report.get(split)
        if old and new and old["sha256"] != new["sha256"]:
            raise UserError(f"{new['path']} changed since this fine-tune started (SHA-256 differs); restore it "
                            f"or start a new --run")


def run(args: argparse.Namespace) -> int:
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.finetune.init import load_init_weights, open_init
    from mtnlg.finetune.template import ChatTemplate, load_chat_template
    from mtnlg.io import write_atomic
    from mtnlg.parallel.mesh import init_distributed
    from mtnlg.train.checkpoint import latest_checkpoint
    from mtnlg.train.trainer import Trainer

    run_dir = Path(args.run)
    cfg, existing, source = resolve_config(args)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.parallel.pp > 1 and cfg.finetune.pack:
        raise UserError(f"parallel.pp={cfg.parallel.pp} cannot pass per-example attention masks between pipeline "
                        f"stages; fine-tune with padding instead (--no-pack, finetune.pack=false)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = None
    if world > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        from mtnlg.parallel.setup import check_layout
        dims = check_layout(cfg, world)
    if existing:
        tok_path = run_dir / "tokenizer.json"
        if not tok_path.exists():
            raise UserError(f"{tok_path} is missing; restore the tokenizer this fine-tune was started with")
        tokenizer = load_tokenizer(str(tok_path))
    else:
        tokenizer, tok_path = source.tokenizer, source.path
    template = (load_chat_template(run_dir) if existing else None) or ChatTemplate()
    vocab = cfg.model.padded_vocab(cfg.parallel.tp)
    if tokenizer.vocab_size > vocab:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens, more than the model's {vocab}")
    train_ds, valid_ds, report, lines = build_datasets(cfg, tokenizer, template)
    if existing:
        _check_unchanged(run_dir, report)
    elif cfg.finetune.epochs > 0:
        cfg.train.steps = max(1, math.ceil(cfg.finetune.epochs * len(train_ds) / cfg.train.global_batch))

    rank, world, device = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s, device=cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    from mtnlg.parallel.setup import build
    model, topo = build(cfg, dims, device, rank)  # as `mtnlg train` builds it (meta device, local shards)
    fresh = latest_checkpoint(run_dir / "checkpoints") is None
    if fresh:  # before the Trainer exists, so bf16 master copies start from these weights too
        load_init_weights(model, topo, source or open_init(cfg.finetune.init, cfg.finetune.init_step), device)
    if topo.is_main and not existing:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(run_dir / "tokenizer.json"))
        template.save(run_dir)
        write_atomic(run_dir / DATA_FILE, json.dumps(report, indent=2) + "\n")
        write_atomic(run_dir / "config.toml", dump_toml(cfg))  # last: its presence marks a complete run directory
    topo.barrier()
    trainer = Trainer(cfg, model, train_ds, valid_ds, run_dir, device, topo, peak_tflops=_peak(cfg, device))
    resumed = trainer.resume()
    if topo.is_main:
        what = f"resumed at step {trainer.step}" if resumed else f"new fine-tune of {cfg.finetune.init}"
        print(f"mtnlg finetune: {what} in {run_dir} | {len(train_ds)} train rows, {len(valid_ds)} valid rows "
              f"({'packed' if cfg.finetune.pack else 'padded'}, {report['row_fill']:.0%} filled) | "
              f"{cfg.train.steps} steps | world {topo.world_size} | {cfg.train.precision}", flush=True)
        for line in lines:
            print(f"mtnlg finetune: {line}", flush=True)
    if trainer.step >= cfg.train.steps:
        if topo.is_main:
            print(f"mtnlg finetune: run already finished ({trainer.step}/{cfg.train.steps} steps)")
        return 0
    trainer.fit(stop_after=args.stop_after)
    return 0


def _peak(cfg: Config, device: torch.device) -> float:
    from mtnlg.train.metrics import default_peak_tflops
    return cfg.logging.peak_tflops or default_peak_tflops(device, cfg.train.precision)
