"""CLI flags of ``--engine`` and the typed settings every stage receives.

Kept free of datatrove/Ray imports so ``mtnlg preprocess --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from mtnlg.data.clean import FilterConfig
from mtnlg.data.dedup import MinHashParams
from mtnlg.errors import UserError

ENGINES = ("local", "ray", "slurm")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    eng = parser.add_argument_group("distributed engine (datatrove executors; docs/data.md)")
    eng.add_argument("--engine", choices=ENGINES, default=None,
                     help="run the stages as tasks of datatrove's local, Ray or SLURM executor (resumable: "
                          "a rerun skips completed tasks); without it, the in-process pipeline runs")
    eng.add_argument("--tasks", type=int, default=None, metavar="N",
                     help="prepare tasks (input files are cut into N contiguous groups of about equal bytes; "
                          "default: one per input file, at most 1024)")
    eng.add_argument("--dedup-tasks", type=int, default=None, metavar="N",
                     help="band-bucket tasks, each owning 1/N of the bucket space (default: --workers)")
    eng.add_argument("--work-dir", metavar="DIR",
                     help="intermediate files, completion markers and task logs (default PREFIX.work); "
                          "rerun with the same one to resume")
    eng.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    eng.add_argument("--cpus-per-task", type=int, default=1, help="Ray/SLURM: CPUs reserved per task (default 1)")
    eng.add_argument("--mem-per-cpu-gb", type=float, default=2, help="Ray/SLURM: memory per CPU in GB (default 2)")
    eng.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition (required with --engine slurm)")
    eng.add_argument("--slurm-time", default="12:00:00", help="SLURM time limit per task (default 12:00:00)")
    eng.add_argument("--slurm-env", metavar="COMMAND",
                     help="shell line run before each SLURM task, e.g. 'source /shared/venv/bin/activate'")
    eng.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="extra #SBATCH directive, e.g. --slurm-arg account=myproj (repeatable)")


@dataclass
class EngineSettings:
    """Everything a task needs; pickled into the executors (so plain data only)."""

    files: list[str]
    partition: list[list[int]]  # file indices per prepare task, contiguous and in input order
    output: str
    work_dir: str
    tokenizer_json: str
    filters: FilterConfig
    dedup: str
    minhash: MinHashParams
    normalize: bool = True
    text_key: str = "text"
    strict: bool = False
    max_problems_shown: int = 20
    dedup_tasks: int = 1
    fault: str | None = field(default=None)  # test hook, see steps.maybe_fail

    @property
    def tasks(self) -> int:
        return len(self.partition)

    def task_of_file(self) -> list[int]:
        owner = [0] * len(self.files)
        for task, indices in enumerate(self.partition):
            for i in indices:
                owner[i] = task
        return owner

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption."""
        return {"files": self.files, "partition": self.partition, "output": os.path.abspath(self.output),
                "tokenizer": self.tokenizer_json, "filters": vars(self.filters), "dedup": self.dedup,
                "minhash": [self.minhash.threshold, self.minhash.bands, self.minhash.rows, self.minhash.seed],
                "normalize": self.normalize, "text_key": self.text_key, "dedup_tasks": self.dedup_tasks}


def partition_files(files: list[str], tasks: int) -> list[list[int]]:
    """Cut the files, in input order, into ``tasks`` contiguous groups of about equal bytes.

    Contiguity keeps the global document order (file, line) equal to the order
    of the task parts, so the final concatenation needs no sort.
    """
    if tasks < 1:
        raise UserError(f"--tasks must be >= 1, got {tasks}")
    sizes = [max(os.path.getsize(f), 1) for f in files]
    total, groups, acc = sum(sizes), [[] for _ in range(tasks)], 0
    for i, size in enumerate(sizes):
        # the task whose byte range holds this file's midpoint
        task = min(tasks - 1, int((acc + size / 2) * tasks / total))
        groups[task].append(i)
        acc += size
    return groups


def validate(args: argparse.Namespace) -> None:
    if args.merge:
        raise UserError("--engine builds the whole dataset with distributed dedup; it does not take --merge")
    if args.shard:
        raise UserError("--engine splits the input into tasks itself; drop --shard (or use --tasks)")
    if args.engine == "slurm" and not args.slurm_partition:
        raise UserError("--engine slurm needs --slurm-partition NAME")
    for name in ("tasks", "dedup_tasks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for item in args.slurm_arg:
        if "=" not in item:
            raise UserError(f"--slurm-arg expects KEY=VALUE, got {item!r}")
