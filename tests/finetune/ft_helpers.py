"""Helpers for fine-tuning tests."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from trainhelpers import tiny_overrides

FT_OVERRIDES = {
    "train.steps": 6, "train.global_batch": 8, "train.micro_batch": 4, "train.eval_interval": 3,
    "train.eval_batches": 4, "train.save_interval": 3, "train.precision": "fp32",
    "optim.warmup_steps": 2, "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.weight_decay": 0.0,
    "finetune.valid_fraction": 0.25,
    "logging.log_interval": 1, "logging.peak_tflops": 1.0, "logging.progress_bar": "never",
}

NAMES = ["Washington", "Lincoln", "Congress", "the Senate", "the Union", "America", "the people", "the Treasury"]
VERBS = ["served", "protected", "taxed", "united", "governed", "defended"]


def base_overrides(prefix: str) -> list[str]:
    return tiny_overrides(prefix, **{"train.steps": 2, "train.eval_interval": 0, "train.save_interval": 2,
                                     "model.seq_len": 64})


def qa_records(n: int, seed: int = 0) -> list[dict]:
    """Small deterministic QA examples; every third is a chat conversation."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        who, verb, whom = rng.choice(NAMES), rng.choice(VERBS), rng.choice(NAMES)
        question = f"Who {verb} {whom}?"
        answer = who
        if i % 3 == 2:
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
        else:
            out.append({"prompt": f"{who} {verb} {whom}. {question}", "response": f" {answer}"})
    return out


def write_jsonl(path: Path, records: list, raw_lines: list[str] = ()) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def ft_overrides(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**FT_OVERRIDES, **extra}.items()]


def finetune(run_dir, *argv, overrides=None, stop_after=None) -> int:
    """`mtnlg finetune` in-process (the console command's code path)."""
    from mtnlg.finetune.run import add_arguments, run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--run", str(run_dir), *map(str, argv)]
    for o in (ft_overrides() if overrides is None else overrides):
        args += ["--set", o]
    if stop_after:
        args += ["--stop-after", str(stop_after)]
    return run(parser.parse_args(args))
