"""Distributed preprocessing on datatrove's executors (local, Ray, SLURM).

``mtnlg preprocess --engine local|ray|slurm`` runs the same stages as the
in-process pipeline (read, clean, filter, MinHash, deduplicate, tokenize,
write) as tasks of datatrove's ``LocalPipelineExecutor``,
``RayPipelineExecutor`` or ``SlurmPipelineExecutor``:

    prepare  (--tasks tasks)        read -> clean -> filter -> dedup keys -> tokenize -> part writer
    buckets  (--dedup-tasks tasks)  each owns a range of band buckets; candidates verified by Jaccard
    cluster  (1 task)               union-find over the verified edges; first seen of each cluster kept
    write    (1 task)               concatenates the kept documents of every part into PREFIX.bin/.idx

Modules: ``options`` (CLI flags and the typed settings, no heavy imports),
``steps`` (our cleaning/filters/tokenizer/writer as datatrove steps),
``minhash`` (band buckets, verification, union-find), ``concat`` (streaming
.bin/.idx concatenation), ``driver`` (stages, executors, report).
"""

from mtnlg.data.engine.options import add_engine_arguments

__all__ = ["add_engine_arguments", "run_engine"]


def run_engine(*args, **kwargs):
    from mtnlg.data.engine.driver import run_engine as _run

    return _run(*args, **kwargs)
