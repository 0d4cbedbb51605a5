"""``mtnlg preprocess``: raw text files -> PREFIX.bin / .idx / .report.json.

    mtnlg preprocess --input corpus/ --output data/corpus --train-tokenizer --dedup fuzzy
    mtnlg preprocess --input a.jsonl.zst --output out/a --tokenizer gpt2/ --shard 0/4
    mtnlg preprocess --merge out/a.shard0 out/a.shard1 --output out/a --dedup fuzzy
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mtnlg.data import decontaminate
from mtnlg.data.clean import FilterConfig, QualityFilter, normalize
from mtnlg.data.dedup import MinHashParams
from mtnlg.data.engine.options import add_engine_arguments
from mtnlg.data.indexed import IndexedDatasetWriter
from mtnlg.data.pipeline import Stats, WorkerSetup, run_pipeline
from mtnlg.data.readers import MAX_DOCUMENT_BYTES, Problem, expand_inputs, read_documents, shard_files
from mtnlg.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from mtnlg.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", metavar="PATH",
                    help="input files or folders: .jsonl/.json/.ndjson (one JSON object per line), "
                         ".txt/.md/.rst (one document per file), each optionally .gz or .zst")
    io.add_argument("--output", metavar="PREFIX", required=True,
                    help="output prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.report.json")
    io.add_argument("--text-key", default="text", help="JSON key holding the document text (default: text)")
    io.add_argument("--strict", action="store_true",
                    help="stop with an error at the first malformed record instead of counting and skipping it")
    io.add_argument("--max-document-mb", type=float, default=MAX_DOCUMENT_BYTES / 2**20, metavar="MB",
                    help="skip (and report as too_long) documents larger than this; peak memory per worker is "
                         "~25x the largest document (default 64; 0: no limit)")
    io.add_argument("--max-problems-shown", type=int, default=20, metavar="N",
                    help="print at most N malformed-record messages (all are counted; default 20)")
    tok = parser.add_argument_group("tokenizer")
    src = tok.add_mutually_exclusive_group()
    src.add_argument("--tokenizer", metavar="FILE",
                     help="tokenizer.json, or a folder/file of GPT-2 vocab.json+merges.txt or encoder.json+vocab.bpe")
    src.add_argument("--train-tokenizer", action="store_true",
                     help="train a byte-level BPE on the cleaned input first, saved to PREFIX.tokenizer.json")
    tok.add_argument("--vocab-size", type=int, default=8192,
                     help="vocabulary size for --train-tokenizer (default 8192)")
    tok.add_argument("--tokenizer-out", metavar="PATH", help="where --train-tokenizer saves the tokenizer "
                     "(default PREFIX.tokenizer.json)")
    tok.add_argument("--tokenizer-train-bytes", type=float, default=1e9, metavar="BYTES",
                     help="train the tokenizer on at most this many bytes of cleaned text (default 1e9)")
    tok.add_argument("--tokenizer-only", action="store_true",
                     help="with --train-tokenizer: save the tokenizer and stop (then pass it to every --shard run)")
    dd = parser.add_argument_group("cleaning and deduplication")
    dd.add_argument("--dedup", choices=("none", "exact", "fuzzy"), default="fuzzy",
                    help="none; exact (normalized-text hash); fuzzy (exact + MinHash LSH, the default)")
    dd.add_argument("--dedup-threshold", type=float, default=0.8,
                    help="Jaccard similarity of 5-character shingles above which documents are duplicates (0.8)")
    dd.add_argument("--minhash-bands", type=int, default=20, help="LSH bands (default 20)")
    dd.add_argument("--minhash-rows", type=int, default=5, help="signature rows per LSH band (default 5)")
    dd.add_argument("--filter", action="append", default=[], metavar="NAME=VALUE",
                    help="set a quality-filter threshold, 'none' disables it; NAME in "
                         + ", ".join(FilterConfig.names()))
    dd.add_argument("--no-filters", action="store_true", help="disable all quality filters")
    dd.add_argument("--no-normalize", action="store_true", help="skip ftfy/NFC/whitespace normalization")
    decontaminate.add_arguments(dd)
    sc = parser.add_argument_group("scale-out")
    sc.add_argument("--shard", metavar="I/N", help="process only shard I of N (0 <= I < N) of the input files")
    sc.add_argument("--merge", nargs="+", metavar="PREFIX",
                    help="instead of --input: join shard outputs into --output, deduplicating across shards")
    sc.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes for cleaning/hashing/tokenizing (default: all CPU cores)")
    sc.add_argument("--batch-size", type=int, default=32, help="documents per worker task (default 32)")
    sc.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    add_engine_arguments(parser)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard expects I/N such as 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return index, count


class ProblemLog:
    """Counts malformed records, prints the first few with file:line, or fails (--strict)."""

    def __init__(self, stats: Stats, strict: bool, max_shown: int, quiet: bool):
        self.stats, self.strict, self.max_shown, self.quiet = stats, strict, max_shown, quiet
        self.shown = 0

    def __call__(self, problem: Problem) -> None:
        if self.strict:
            raise UserError(f"{problem} (--strict stops at the first malformed record)")
        self.stats.add_problem(problem)
        if self.shown < self.max_shown and not self.quiet:
            print(f"warning: {problem}; skipped", file=sys.stderr)
        self.shown += 1

    def summary(self) -> None:
        hidden = self.shown - self.max_shown
        if hidden > 0 and not self.quiet:
            print(f"warning: {hidden} more malformed records not shown (see the report)", file=sys.stderr)


def max_document_bytes(args: argparse.Namespace) -> int | None:
    if args.max_document_mb < 0:
        raise UserError(f"--max-document-mb must be >= 0 (0: no limit), got {args.max_document_mb}")
    return int(args.max_document_mb * 2**20) or None


def filter_config(args: argparse.Namespace) -> FilterConfig:
    config = FilterConfig.disabled() if args.no_filters else FilterConfig()
    for assignment in args.filter:
        config.set(assignment)
    return config


def _training_texts(files: list[str], args: argparse.Namespace, config: FilterConfig):
    quality, budget = QualityFilter(config), args.tokenizer_train_bytes
    for doc in read_documents(files, args.text_key, lambda problem: None, max_document_bytes(args)):
        text = doc.text if args.no_normalize else normalize(doc.text)
        if text and quality.reason(text) is None:
            budget -= len(text.encode("utf-8"))
            yield text
            if budget <= 0:
                return


def get_tokenizer(files: list[str], args: argparse.Namespace, config: FilterConfig) -> Tokenizer:
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if not args.train_tokenizer:
        raise UserError("give --tokenizer FILE or --train-tokenizer")
    seen = {"texts": 0, "bytes": 0}

    def counted(texts):
        for text in texts:
            seen["texts"] += 1
            seen["bytes"] += len(text.encode("utf-8"))
            yield text
    tokenizer = train_tokenizer(counted(_training_texts(files, args, config)), args.vocab_size)
    if not seen["texts"]:
        raise UserError(f"--train-tokenizer found no text to learn from in {', '.join(files) or 'the input'}: "
                        f"every document was empty, malformed or removed by the quality filters "
                        f"(try --text-key or --no-filters); no tokenizer was written")
    path = args.tokenizer_out or args.output + ".tokenizer.json"
    tokenizer.save(path)
    if tokenizer.vocab_size < args.vocab_size:
        print(f"warning: the tokenizer has {tokenizer.vocab_size} tokens, not the {args.vocab_size} asked for: "
              f"{seen['bytes']:,} bytes of text in {seen['texts']} documents hold no more merges to learn",
              file=sys.stderr)
    if not args.quiet:
        print(f"trained a {tokenizer.vocab_size}-token byte-level BPE -> {path}", file=sys.stderr)
    return tokenizer


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def print_summary(report: dict) -> None:
    print(f"documents in      {report['documents_in']:>12,}", file=sys.stderr)
    print(f"malformed         {report['malformed']:>12,}  {report['malformed_by_kind'] or ''}", file=sys.stderr)
    for name, count in report["removed_by_filter"].items():
        if count:
            print(f"  filter {name:<18}{count:>8,}", file=sys.stderr)
    print(f"exact duplicates  {report['exact_duplicates']:>12,}", file=sys.stderr)
    print(f"fuzzy duplicates  {report['fuzzy_duplicates']:>12,}", file=sys.stderr)
    print(f"documents out     {report['documents_out']:>12,}", file=sys.stderr)
    print(f"tokens out        {report['tokens_out']:>12,}", file=sys.stderr)


def _minhash(args: argparse.Namespace) -> MinHashParams:
    if not 0 < args.dedup_threshold <= 1:
        raise UserError(f"--dedup-threshold must be in (0, 1], got {args.dedup_threshold}")
    if args.minhash_bands < 1 or args.minhash_rows < 1:
        raise UserError("--minhash-bands and --minhash-rows must be positive")
    return MinHashParams(args.dedup_threshold, args.minhash_bands, args.minhash_rows)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "engine", None):
        from mtnlg.data.engine.options import validate

        validate(args)
    if args.merge:
        if args.decontaminate:
            raise UserError("--decontaminate applies to --input runs (decontaminate each shard), not to --merge")
        if args.input:
            raise UserError("give either --input or --merge, not both")
        from mtnlg.data.shards import merge_shards

        report = merge_shards(args.merge, args.output, args.dedup, _minhash(args))
        if not args.quiet:
            print_summary(report)
        return 0
    if not args.input:
        raise UserError("give --input PATH... (or --merge SHARD_PREFIX...)")
    shard, num_shards = parse_shard(args.shard)
    files = shard_files(expand_inputs(args.input), shard, num_shards)
    config = filter_config(args)
    decon = decontaminate.build(args.decontaminate) if args.decontaminate else None
    tokenizer = get_tokenizer(files, args, config)
    if args.tokenizer_only:
        return 0
    if getattr(args, "engine", None):
        from mtnlg.data.engine import run_engine

        report = run_engine(args, files, config, tokenizer, _minhash(args))
        if report is not None and not args.quiet:
            print_summary(report)
        return 0
    stats = Stats()
    problems = ProblemLog(stats, args.strict, args.max_problems_shown, args.quiet)
    setup = WorkerSetup(tokenizer.to_json(), config, args.dedup, _minhash(args), not args.no_normalize)
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(unit=" docs", desc="preprocess", dynamic_ncols=True, disable=None)
    with IndexedDatasetWriter(args.output, tokenizer.vocab_size, tokenizer.eod_id, tokenizer.fingerprint()) as writer:
        docs = read_documents(files, args.text_key, problems, max_document_bytes(args))
        if decon:
            docs = decontaminate.decontaminate_documents(docs, decon)
        kept = run_pipeline(docs, setup, writer, stats, problems,
                            workers=max(1, args.workers), batch_size=max(1, args.batch_size), progress=progress)
        if stats.documents_out:  # an empty dataset is not written: an earlier PREFIX.bin/.idx stays as it was
            writer.finalize()
    if progress is not None:
        progress.close()
    problems.summary()
    from mtnlg.data.shards import save_dedup_keys

    if args.dedup != "none" and stats.documents_out:
        save_dedup_keys(args.output, kept, args.dedup, setup.minhash)
    report = {**stats.as_dict(), "inputs": files, "shard": f"{shard}/{num_shards}", "dedup": args.dedup,
              "dedup_threshold": args.dedup_threshold, "filters": vars(config),
              "tokenizer": {"vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                            "fingerprint": tokenizer.fingerprint().hex()}}
    if decon:
        report["decontamination"] = decon.report()
    write_json_atomic(args.output + ".report.json", report)
    if not args.quiet:
        print_summary(report)
    if not stats.documents_out:
        raise UserError(no_output_message(report, args.output))
    return 0


def no_output_message(report: dict, prefix: str) -> str:
    removed = sum(report["removed_by_filter"].values())
    dups = report["exact_duplicates"] + report["fuzzy_duplicates"]
    return (f"no document survived ({report['documents_in']} read: {report['malformed']} malformed or empty, "
            f"{removed} removed by quality filters, {dups} duplicates), so {prefix}.bin/.idx were not written; "
            f"see {prefix}.report.json, and check --text-key or loosen --filter / --no-filters")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtnlg preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
