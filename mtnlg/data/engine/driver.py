"""Builds the stages, hands them to datatrove's executors, checks they completed, prints the report.

Local and Ray run the stages one after another from this process and stop at
the first stage with an incomplete task (naming its logs); SLURM submits all
four stages at once as job arrays chained by ``afterok`` dependencies and
returns. Every executor writes a completion marker per task under
``WORK/logs/STAGE/completions``; a rerun of the same command skips the tasks
that have one, so a run that lost a worker is finished by running it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from mtnlg.data.clean import FilterConfig
from mtnlg.data.dedup import MinHashParams
from mtnlg.data.engine.options import EngineSettings, partition_files, validate
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import UserError

MAX_DEFAULT_TASKS = 1024


def make_settings(args: argparse.Namespace, files: list[str], filters: FilterConfig, tokenizer: Tokenizer,
                  minhash: MinHashParams) -> EngineSettings:
    validate(args)
    tasks = args.tasks or min(len(files), MAX_DEFAULT_TASKS)
    return EngineSettings(
        files=[os.path.abspath(f) for f in files], partition=partition_files(files, tasks),
        output=os.path.abspath(args.output), work_dir=os.path.abspath(args.work_dir or args.output + ".work"),
        tokenizer_json=tokenizer.to_json(), filters=filters, dedup=args.dedup, minhash=minhash,
        normalize=not args.no_normalize, text_key=args.text_key, strict=args.strict,
        max_problems_shown=args.max_problems_shown, dedup_tasks=args.dedup_tasks or tasks,
        fault=os.environ.get("MTNLG_ENGINE_FAULT") or None)


def check_work_dir(s: EngineSettings) -> None:
    """A work dir belongs to one set of settings: resuming with other ones would mix incompatible parts."""
    from mtnlg.io import write_atomic

    current = s.fingerprint()
    current["tokenizer"] = hashlib.blake2b(current["tokenizer"].encode(), digest_size=16).hexdigest()
    path = os.path.join(s.work_dir, "settings.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if changed:
            raise UserError(f"work dir {s.work_dir} holds a run with other settings ({', '.join(changed)} differ); "
                            "rerun with the same options to resume, or pass a new --work-dir")
        return
    os.makedirs(s.work_dir, exist_ok=True)
    write_atomic(path, json.dumps(current, indent=1) + "\n")


def stages(s: EngineSettings) -> list[tuple[str, list, int]]:
    from mtnlg.data.engine.concat import WriteStep
    from mtnlg.data.engine.minhash import BucketStep, ClusterStep
    from mtnlg.data.engine.steps import prepare_pipeline

    out = [("prepare", prepare_pipeline(s), s.tasks)]
    if s.dedup != "none":
        out += [("buckets", [BucketStep(s)], s.dedup_tasks), ("cluster", [ClusterStep(s)], 1)]
    return out + [("write", [WriteStep(s)], 1)]


def _ray_init(args: argparse.Namespace) -> None:
    import ray

    if ray.is_initialized():
        return
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, num_cpus=max(1, args.workers) * args.cpus_per_task)


def make_executors(args: argparse.Namespace, s: EngineSettings) -> list[tuple[str, object]]:
    executors, previous = [], None
    for name, pipeline, tasks in stages(s):
        logs = os.path.join(s.work_dir, "logs", name)
        if args.engine == "local":
            from datatrove.executor import LocalPipelineExecutor

            ex = LocalPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(args.workers, tasks)),
                                       logging_dir=logs)
        elif args.engine == "ray":
            from datatrove.executor import RayPipelineExecutor

            ex = RayPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(args.workers, tasks)),
                                     logging_dir=logs, cpus_per_task=args.cpus_per_task,
                                     mem_per_cpu_gb=args.mem_per_cpu_gb)
        else:
            from datatrove.executor import SlurmPipelineExecutor

            env = args.slurm_env or (f"source {sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else "")
            ex = SlurmPipelineExecutor(pipeline, tasks=tasks, time=args.slurm_time, partition=args.slurm_partition,
                                       cpus_per_task=args.cpus_per_task, mem_per_cpu_gb=args.mem_per_cpu_gb,
                                       job_name=f"mtnlg-{name}", logging_dir=logs, env_command=env,
                                       sbatch_args=dict(a.split("=", 1) for a in args.slurm_arg), depends=previous,
                                       workers=args.workers)
        executors.append((name, ex))
        previous = ex
    return executors


def run_stages(executors: list[tuple[str, object]], work_dir: str) -> dict[str, float]:
    """Runs the stages in order; returns each one's wall seconds."""
    import time

    walls = {}
    for name, ex in executors:
        start = time.perf_counter()
        try:
            ex.run()
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"stage {name} failed ({type(err).__name__}: {err}); task logs in "
                            f"{work_dir}/logs/{name}/logs; rerun the same command to resume") from err
        incomplete = ex.get_incomplete_ranks(skip_completed=True)
        if incomplete:
            raise UserError(f"stage {name}: {len(incomplete)} of {ex.world_size} tasks did not complete "
                            f"(first: {incomplete[0]}); task logs in {work_dir}/logs/{name}/logs; "
                            "rerun the same command to resume (completed tasks are skipped)")
        walls[name] = round(time.perf_counter() - start, 3)
    return walls


def run_engine(args: argparse.Namespace, files: list[str], filters: FilterConfig, tokenizer: Tokenizer,
               minhash: MinHashParams) -> dict | None:
    """Run (local, Ray) or submit (SLURM) the whole job; returns the report when it ran here."""
    s = make_settings(args, files, filters, tokenizer, minhash)
    check_work_dir(s)
    if args.engine == "ray":
        _ray_init(args)
    executors = make_executors(args, s)
    if args.engine == "slurm":
        executors[-1][1].run()  # launches its dependencies first: four job arrays chained by afterok
        if not args.quiet:
            print(f"submitted {len(executors)} SLURM stages (logs under {s.work_dir}/logs); the dataset and "
                  f"{args.output}.report.json appear when the write stage ends; rerun the same command to resume "
                  "after failures", file=sys.stderr)
        return None
    walls = run_stages(executors, s.work_dir)
    with open(s.output + ".report.json", encoding="utf-8") as f:
        report = json.load(f)
    if report["engine"].get("stage_wall_seconds") is None:  # a rerun that had nothing left to do keeps the first
        from mtnlg.io import write_atomic

        report["engine"]["stage_wall_seconds"] = walls
        write_atomic(s.output + ".report.json", json.dumps(report, indent=2) + "\n")
    return report
