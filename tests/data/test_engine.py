"""`mtnlg preprocess --engine`: datatrove executors give the in-process pipeline's answer at any scale.

Every equality here is byte-for-byte on PREFIX.bin and PREFIX.idx (the index holds the
document offsets and both CRCs), so a missing, duplicated or reordered document fails it.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from datahelpers import ROOT, paragraphs, preprocess_args, sotu_texts, write_jsonl
from test_dedup import planted_corpus

from mtnlg.data.dedup import Deduplicator, MinHasher, MinHashParams, exact_hash
from mtnlg.data.engine.minhash import union_find_roots
from mtnlg.data.engine.options import partition_files
from mtnlg.data.preprocess import run
from mtnlg.errors import UserError

COUNTS = ("documents_in", "malformed", "malformed_by_kind", "removed_by_filter", "exact_duplicates",
          "fuzzy_duplicates", "documents_out", "tokens_out", "bytes_in")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four files of SOTU paragraphs: exact and near copies planted across files, short and malformed records."""
    root = tmp_path_factory.mktemp("engine-corpus")
    paras = paragraphs(sotu_texts(20), words=150)[:240]
    for f in range(4):
        records = [{"text": p} for p in paras[f * 60 : (f + 1) * 60]]
        if f:
            records += [{"text": paras[i]} for i in range(f, f + 4)]  # exact copies of file 0
            records += [{"text": paras[i].replace(" the ", " a ", 2) + " Thank you."} for i in range(10, 14)]
        records += [{"text": "too short"}, "{not json", {"title": "no text key"}]
        write_jsonl(root / f"part{f}.jsonl", records)
    return str(root)


def outputs(prefix):
    with open(prefix + ".bin", "rb") as fb, open(prefix + ".idx", "rb") as fi, open(prefix + ".report.json") as fr:
        return fb.read(), fi.read(), json.load(fr)


def run_engine(corpus, tokenizer_path, out, *extra, workers=1):
    args = preprocess_args("--input", corpus, "--output", out, "--tokenizer", tokenizer_path, *extra)
    args.workers = workers
    assert run(args) == 0
    return outputs(out)


@pytest.fixture(scope="module")
def inline(corpus, tokenizer_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inline") / "inline")
    run(preprocess_args("--input", corpus, "--output", out, "--tokenizer", tokenizer_path))
    return outputs(out)


def assert_same(result, reference):
    assert result[0] == reference[0] and result[1] == reference[1]  # .bin and .idx byte-identical
    assert {k: result[2][k] for k in COUNTS} == {k: reference[2][k] for k in COUNTS}


def test_local_engine_equals_the_in_process_pipeline_at_any_task_and_worker_count(corpus, tokenizer_path,
                                                                                    inline, tmp_path):
    one = run_engine(corpus, tokenizer_path, str(tmp_path / "one"), "--engine", "local", "--tasks", "1")
    two = run_engine(corpus, tokenizer_path, str(tmp_path / "two"), "--engine", "local", "--tasks", "3",
                     "--dedup-tasks", "2", workers=2)
    report = two[2]
    assert report["exact_duplicates"] == 12 and report["fuzzy_duplicates"] == 12  # as planted
    assert report["malformed_by_kind"] == {"invalid_json": 4, "missing_key": 4}
    assert sorted(report["engine"]["malformed_by_task"]) == [2, 2, 4]  # counted per task, summed in the report
    assert report["engine"]["dedup"]["bucket_candidates"] > 0
    assert_same(one, inline)
    assert_same(two, inline)
    # a rerun finds every task complete and leaves the dataset alone
    before = os.stat(str(tmp_path / "two.bin")).st_mtime_ns
    run_engine(corpus, tokenizer_path, str(tmp_path / "two"), "--engine", "local", "--tasks", "3",
               "--dedup-tasks", "2", workers=2)
    assert os.stat(str(tmp_path / "two.bin")).st_mtime_ns == before


def test_ray_engine_equals_the_local_one(corpus, tokenizer_path, inline, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_engine(corpus, tokenizer_path, str(tmp_path / "ray"), "--engine", "ray", "--tasks", "2",
                            "--dedup-tasks", "1", workers=2)
    finally:
        ray.shutdown()
    assert_same(result, inline)


def cli(tmp_path, *argv, env=None):
    """The CLI in its own session; afterwards the session is killed, so a helper process orphaned by a
    SIGKILLed driver (multiprocess's manager) does not outlive the test."""
    log = tmp_path / "cli.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mtnlg.data.preprocess", "--quiet", "--workers", "1", *argv],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode, log.read_text()


def test_a_killed_worker_then_a_rerun_equals_an_uninterrupted_run(corpus, tokenizer_path, inline, tmp_path):
    out = str(tmp_path / "killed")
    argv = ["--input", corpus, "--output", out, "--tokenizer", tokenizer_path, "--engine", "local", "--tasks", "3"]
    # with one worker the tasks run inside the CLI process: SIGKILL mid-task 1 takes the whole run down,
    # as losing a machine would
    code, log = cli(tmp_path, *argv, env={"MTNLG_ENGINE_FAULT": "prepare:1:20"})
    assert code == -signal.SIGKILL, log[-2000:]
    work = out + ".work"
    assert sorted(os.listdir(os.path.join(work, "logs", "prepare", "completions"))) == ["00000"]
    assert not os.path.exists(out + ".bin")
    part0 = os.stat(os.path.join(work, "prepare", "00000", "tokens.bin"))
    code, log = cli(tmp_path, *argv)
    assert code == 0, log[-2000:]
    assert "Skipping 1 already completed tasks" in log
    assert os.stat(os.path.join(work, "prepare", "00000", "tokens.bin")).st_ino == part0.st_ino  # not redone
    assert not [name for name in os.listdir(os.path.join(work, "prepare")) if "tmp" in name]
    assert_same(outputs(out), inline)


def test_distributed_dedup_flags_exactly_what_the_local_deduplicator_flags(tmp_path, tokenizer_path):
    originals, copies, negatives = planted_corpus()
    docs = originals + [c for _, c in copies] + [n for _, n in negatives]
    for f, lo in enumerate(range(0, len(docs), 180)):  # 4 files -> 4 prepare tasks
        write_jsonl(tmp_path / f"p{f}.jsonl", [{"text": d} for d in docs[lo : lo + 180]])
    hasher, local = MinHasher(MinHashParams()), Deduplicator("fuzzy")
    flagged_local = {k for k, d in enumerate(docs) if local.check(exact_hash(d), hasher.signature(d))}
    out = str(tmp_path / "planted")
    args = preprocess_args("--input", *[str(tmp_path / f"p{f}.jsonl") for f in range(4)], "--output", out,
                           "--tokenizer", tokenizer_path, "--no-filters", "--no-normalize", "--engine", "local",
                           "--dedup-tasks", "3")
    run(args)
    removed = np.concatenate([np.load(os.path.join(out + ".work", "cluster", f"removed-{t:05d}.npy"))
                              for t in range(4)])
    flagged = {int(g >> 32) * 180 + int(g & 0xFFFFFFFF) - 1 for g in removed}  # gid = file << 32 | line
    planted = set(range(len(originals), len(originals) + len(copies)))
    assert flagged == flagged_local
    assert len(flagged & planted) / len(planted) >= 0.95 and flagged <= planted  # recall, precision 1.0


def test_union_find_roots_match_a_reference():
    rng = np.random.default_rng(0)
    n = 300
    u, v = rng.integers(0, n, 250), rng.integers(0, n, 250)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(u, v):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert union_find_roots(u, v, n).tolist() == [find(x) for x in range(n)]


def test_partition_is_contiguous_and_balanced(tmp_path):
    files = []
    for i, size in enumerate([10, 10, 50, 10, 10, 10, 1]):
        files.append(str(tmp_path / f"f{i}"))
        open(files[-1], "w").write("x" * size)
    groups = partition_files(files, 3)
    assert sum(groups, []) == list(range(7))  # every file once, in input order
    assert groups == [[0, 1], [2], [3, 4, 5, 6]]
    assert sum(partition_files(files[:1], 3), []) == [0]  # more tasks than files: some are empty


@pytest.mark.parametrize("extra, message", [
    (["--engine", "slurm"], "--slurm-partition"),
    (["--engine", "local", "--shard", "0/2"], "--shard"),
    (["--engine", "local", "--tasks", "0"], "--tasks"),
])
def test_bad_engine_arguments_are_user_errors(extra, message, corpus, tokenizer_path, tmp_path):
    with pytest.raises(UserError, match=message):
        run(preprocess_args("--input", corpus, "--output", str(tmp_path / "x"), "--tokenizer", tokenizer_path,
                            *extra))


def test_resuming_with_other_settings_is_refused(corpus, tokenizer_path, tmp_path):
    from mtnlg.data.engine.driver import check_work_dir, make_settings
    from mtnlg.data.preprocess import _minhash, expand_inputs, filter_config
    from mtnlg.data.tokenizer import load_tokenizer

    def settings(*extra):
        args = preprocess_args("--input", corpus, "--output", str(tmp_path / "o"), "--tokenizer", tokenizer_path,
                               "--engine", "local", *extra)
        return make_settings(args, expand_inputs(args.input), filter_config(args), load_tokenizer(tokenizer_path),
                             _minhash(args))

    check_work_dir(settings("--dedup", "exact"))
    check_work_dir(settings("--dedup", "exact"))  # same settings: resumes
    with pytest.raises(UserError, match="dedup differ"):
        check_work_dir(settings("--dedup", "fuzzy"))
    with pytest.raises(UserError, match="partition differ"):
        check_work_dir(settings("--dedup", "exact", "--tasks", "2"))


FAKE_SBATCH = """#!/usr/bin/env python3
# Stand-in for SLURM's sbatch: runs every array task of the script now, in order, and prints a job id.
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
env = dict(os.environ, SLURM_NODELIST="localhost", SLURM_JOB_ID="1")
for arg in sys.argv[1:-1]:
    if arg.startswith("--export=ALL,"):
        env.update(kv.split("=", 1) for kv in arg[len("--export=ALL,"):].split(","))
low, high = map(int, re.search(r"#SBATCH --array=(\\d+)-(\\d+)", text).groups())
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    for task in range(low, high + 1):
        log.write(f"== {script} task {task} {sys.argv[1:-1]}\\n")
        log.flush()
        rc = subprocess.call(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID=str(task)), stdout=log, stderr=log)
        if rc:
            sys.exit(f"array task {task} failed")
n = int(open(os.environ["FAKE_SLURM_IDS"]).read() or 0) + 1 if os.path.exists(os.environ["FAKE_SLURM_IDS"]) else 1
open(os.environ["FAKE_SLURM_IDS"], "w").write(str(n))
print(f"Submitted batch job {n}")
"""

FAKE_SCONTROL = """#!/bin/bash
# Stand-in for `scontrol show hostnames NODELIST`.
echo localhost
"""

FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: drop its options, run the command.
while [ "$1" != "launch_pickled_pipeline" ]; do shift; done
exec "$@"
"""


@pytest.mark.slow
def test_slurm_engine_through_a_stand_in_sbatch(corpus, tokenizer_path, inline, tmp_path, monkeypatch):
    """The real SlurmPipelineExecutor writes the sbatch scripts and pickled executors; a stand-in sbatch runs
    the array tasks, as a cluster would, with SLURM_ARRAY_TASK_ID set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "slurm.log"))
    monkeypatch.setenv("FAKE_SLURM_IDS", str(tmp_path / "ids"))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = str(tmp_path / "slurm")
    args = preprocess_args("--input", corpus, "--output", out, "--tokenizer", tokenizer_path, "--engine", "slurm",
                           "--slurm-partition", "cpu", "--tasks", "2", "--slurm-arg", "account=test")
    assert run(args) == 0
    log = (tmp_path / "slurm.log").read_text()
    script = open(out + ".work/logs/prepare/launch_script.slurm").read()
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --account=test" in script
    assert "--dependency=afterok:" in log  # stages chained
    assert_same(outputs(out), inline)


@pytest.mark.slow
def test_a_task_that_raises_in_the_bucket_stage_is_redone_by_the_rerun(corpus, tokenizer_path, inline, tmp_path,
                                                                      monkeypatch):
    out = str(tmp_path / "raised")
    argv = ("--engine", "local", "--tasks", "3", "--dedup-tasks", "3")
    monkeypatch.setenv("MTNLG_ENGINE_FAULT", "buckets:1:0:raise")
    with pytest.raises(UserError, match="stage buckets failed .*rerun the same command to resume"):
        run_engine(corpus, tokenizer_path, out, *argv, workers=2)
    done = out + ".work/logs/buckets/completions"
    assert "00001" not in (os.listdir(done) if os.path.isdir(done) else [])  # the pool may stop the others too
    assert len(os.listdir(out + ".work/logs/prepare/completions")) == 3
    monkeypatch.delenv("MTNLG_ENGINE_FAULT")
    assert_same(run_engine(corpus, tokenizer_path, out, *argv, workers=2), inline)
