"""``mtnlg checkpoint``: verify checkpoints, or convert old single-file ones.

    mtnlg checkpoint verify runs/tiny            # every step_* of a run (or one step_* directory)
    mtnlg checkpoint convert runs/tiny           # old model.safetensors + optimizer.pt -> sharded DCP, in place
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mtnlg.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("verify", "convert"),
                   help="verify: check sizes and sha256 checksums against each manifest; "
                        "convert: rewrite old-format checkpoints (model.safetensors + optimizer.pt) as sharded DCP")
    p.add_argument("path", help="a run directory (all its checkpoints/step_*) or one step_* directory")


def step_dirs(path: Path) -> list[Path]:
    """The checkpoint directories ``path`` stands for."""
    if (path / "manifest.json").exists() or (path / "model.safetensors").exists():
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not steps:
        raise UserError(f"{path} holds no checkpoints (expected RUN/checkpoints/step_* or a step_* directory)")
    return steps


def run(args: argparse.Namespace) -> int:
    from mtnlg.train.checkpoint import checkpoint_problem, is_legacy
    from mtnlg.train.legacy_checkpoint import convert_legacy
    damaged = 0
    for step in step_dirs(Path(args.path)):
        if args.action == "convert":
            if is_legacy(step):
                convert_legacy(step)
                print(f"{step}: converted to sharded DCP")
            else:
                print(f"{step}: already in the current format")
            continue
        problem = checkpoint_problem(step)
        damaged += problem is not None
        legacy = " (old format: convert with `mtnlg checkpoint convert`)" if is_legacy(step) and not problem else ""
        print(f"{step}: {'DAMAGED: ' + problem if problem else 'ok'}{legacy}")
    return 1 if damaged else 0
