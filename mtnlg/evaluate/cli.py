"""``mtnlg eval``: perplexity (mtnlg/evaluate/perplexity.py) or, with
``--tasks``, zero-/few-shot task accuracy (mtnlg/evaluate/harness.py).

    mtnlg eval --run runs/tiny --split valid                      # perplexity
    mtnlg eval --run runs/tiny --tasks lambada,piqa --limit 200   # tasks
    mtnlg eval --hf path/to/hf_model --tasks hellaswag --shots 5 --json out.json
    torchrun --nproc-per-node 4 -m mtnlg eval --run runs/tiny --tasks lambada --tp 2   # dp 2 x tp 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mtnlg.errors import UserError
from mtnlg.evaluate import perplexity


def add_arguments(p: argparse.ArgumentParser) -> None:
    perplexity.add_arguments(p)  # --run, --checkpoint, --json [OUT], --batch-size, --device shared by both modes
    g = p.add_argument_group("zero-/few-shot tasks")
    g.add_argument("--tasks", help="comma-separated tasks: lambada, hellaswag, piqa, winogrande, arc_easy, "
                                   "arc_challenge, boolq (or 'all')")
    g.add_argument("--hf", metavar="HFDIR", help="score a Hugging Face causal LM directory instead of a run")
    g.add_argument("--shots", type=int, default=0, help="few-shot demonstrations per example (default 0)")
    g.add_argument("--limit", type=int, default=0, help="score the first N examples of each task (0: all)")
    g.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the demonstration draw")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model replica under torchrun "
                                                    "(the rest is data parallel)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights and activations")
    g.add_argument("--max-length", type=int, default=0,
                   help="with --hf: context length when the model config does not state it")


def run(args: argparse.Namespace) -> int:
    if not args.tasks:
        if args.hf:
            raise UserError("--hf scores tasks; add --tasks (e.g. --tasks lambada)")
        if not args.run:
            raise UserError("--run DIR is required")
        return _perplexity(args)
    if args.text or args.data:
        raise UserError("--tasks cannot be combined with --text or --data (perplexity options)")
    if bool(args.run) == bool(args.hf):
        raise UserError("give exactly one model: --run DIR (a trained run) or --hf HFDIR")
    return run_tasks(args)


def _perplexity(args: argparse.Namespace) -> int:
    if args.json in (None, "-"):
        args.json = args.json is not None
        return perplexity.run(args)
    out_path, args.json = args.json, True
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = perplexity.run(args)
    from mtnlg.io import write_atomic
    write_atomic(out_path, buf.getvalue())
    return rc


def run_tasks(args: argparse.Namespace) -> int:
    from mtnlg.evaluate import harness
    from mtnlg.evaluate.tasks import TASKS, parse_tasks
    from mtnlg.parallel.mesh import init_distributed

    specs = parse_tasks(",".join(TASKS) if args.tasks.strip() == "all" else args.tasks)
    if args.shots < 0 or args.limit < 0 or args.batch_size < 1 or args.tp < 1:
        raise UserError("--shots and --limit must be >= 0, --batch-size and --tp >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.tp:
        raise UserError(f"--tp {args.tp} must divide the number of processes ({world})")
    if args.hf and args.tp > 1:
        raise UserError("--tp applies to runs of this project; a --hf model evaluates with data parallelism only")
    for spec in specs:  # fail on a missing package or too many shots before loading any model
        n = harness.task_items(spec, 0)
        if args.shots > n - 1:
            raise UserError(f"--shots {args.shots} exceeds the {n - 1} demonstrations {spec.name} offers "
                            f"(its {spec.split} split minus the scored example)")
    rank, world, device = init_distributed("auto", device=args.device)
    dp_rank, dp_size, dp_group, tp_mesh = 0, 1, None, None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        dp_rank, dp_size, dp_group = mesh["dp"].get_local_rank(), world // args.tp, mesh["dp"].get_group()
        tp_mesh = mesh["tp"] if args.tp > 1 else None
    if args.hf:
        from mtnlg.evaluate.models import load_hf_lm
        lm = load_hf_lm(args.hf, device, args.dtype, args.max_length or None)
        model_name = args.hf
    else:
        from mtnlg.evaluate.models import load_run_lm
        if tp_mesh is not None:
            _check_tp(args, world)
        lm = load_run_lm(args.run, device, args.checkpoint, args.dtype, tp_mesh)
        model_name = args.run
    log = harness.log_stderr if rank == 0 else None
    report = harness.evaluate(lm, specs, args.shots, args.limit, args.batch_size, args.fewshot_seed,
                              dp_rank, dp_size, dp_group, log=log)
    report.update(model=model_name, kind="hf" if args.hf else "mtnlg", tp=args.tp, dtype=args.dtype)
    if rank == 0:
        _emit(report, args.json)
    return 0


def _check_tp(args, world: int) -> None:
    from types import SimpleNamespace

    from pathlib import Path

    from mtnlg.config import load_config
    from mtnlg.parallel.mesh import ParallelDims
    cfg_file = Path(args.run) / "config.toml"
    if cfg_file.exists():
        cfg = load_config(cfg_file)
        ParallelDims.from_config(SimpleNamespace(tp=args.tp, pp=1, dp=0, sequence_parallel=False), cfg.model, world)


def _emit(report: dict, json_out: str | None) -> None:
    from mtnlg.evaluate.harness import format_table
    if json_out == "-":
        print(json.dumps(report, indent=1))
        return
    print(format_table(report))
    if json_out:
        from mtnlg.io import write_atomic
        write_atomic(json_out, json.dumps(report, indent=1) + "\n")
        print(f"wrote {json_out}", file=sys.stderr)
