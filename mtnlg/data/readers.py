"""Streaming corpus readers with line-accurate problem reporting.

Every reader yields one :class:`Document` at a time and never holds more than
one document in memory, so memory stays constant however large the corpus is.
Records that cannot be used (malformed JSON, a missing or non-string text key,
invalid UTF-8, empty text) are not raised: they are handed to an ``on_problem``
callback as a :class:`Problem` with file and line, and skipped. The caller
decides whether to count them or to stop (``--strict``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")
PROBLEM_KINDS = ("invalid_json", "missing_key", "not_text", "invalid_utf8", "empty", "unreadable", "too_long")
# Cleaning, hashing and tokenizing a document costs ~25x its size in memory at peak: larger ones are
# skipped and reported (``too_long``) unless --max-document-mb is raised.
MAX_DOCUMENT_BYTES = 64 * 2**20


def _too_long(size: int, limit: int | None, path: str, line: int, on_problem: "ProblemHandler") -> bool:
    if limit is None or size <= limit:
        return False
    on_problem(Problem("too_long", path, line, f"{size / 2**20:,.1f} MB exceeds --max-document-mb "
                                               f"{limit / 2**20:g} (peak memory is ~25x a document's size)"))
    return True


@dataclass(frozen=True)
class Document:
    text: str
    path: str
    line: int  # 1-based line of the record; 1 for a whole plain-text file


@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.message}"


ProblemHandler = Callable[[Problem], None]


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_json_lines(path: str) -> bool:
    return _strip_compression(path.lower()).endswith(JSON_SUFFIXES)


def is_supported(path: str) -> bool:
    return _strip_compression(path.lower()).endswith(JSON_SUFFIXES + TEXT_SUFFIXES)


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Files named directly plus supported files found under folders, sorted."""
    from mtnlg.errors import UserError

    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if is_supported(name)
            )
            if not found:
                raise UserError(
                    f"input folder {path!r} holds no supported files "
                    "(.jsonl/.json/.ndjson/.txt/.md/.rst, optionally .gz/.zst)"
                )
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"input {path!r} does not exist")
    return files


def open_binary(path: str) -> io.BufferedIOBase:
    """Open a possibly compressed file as a binary stream (decompressed on the fly)."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _decode(raw: bytes, path: str, line: int, on_problem: ProblemHandler) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        on_problem(Problem("invalid_utf8", path, line, f"invalid UTF-8 at byte {err.start}"))
        return None


def read_jsonl(path: str, text_key: str, on_problem: ProblemHandler,
               max_bytes: int | None = MAX_DOCUMENT_BYTES) -> Iterator[Document]:
    """One document per line: ``{"<text_key>": "..."}``. Blank lines are ignored."""
    with open_binary(path) as stream:
        for line_no, raw in enumerate(stream, start=1):
            if not raw.strip() or _too_long(len(raw), max_bytes, path, line_no, on_problem):
                continue
            line = _decode(raw, path, line_no, on_problem)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                on_problem(Problem("invalid_json", path, line_no, f"{err.msg} (column {err.colno})"))
                continue
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
                on_problem(Problem("missing_key", path, line_no, f"no key {text_key!r} (found {keys})"))
                continue
            text = record[text_key]
            if not isinstance(text, str):
                on_problem(Problem("not_text", path, line_no,
                                   f"{text_key!r} is {type(text).__name__}, expected a string"))
                continue
            if not text.strip():
                on_problem(Problem("empty", path, line_no, "empty document"))
                continue
            yield Document(text, path, line_no)


def read_text_file(path: str, on_problem: ProblemHandler,
                   max_bytes: int | None = MAX_DOCUMENT_BYTES) -> Iterator[Document]:
    """A plain-text file is one document (its size bounds the memory used)."""
    with open_binary(path) as stream:
        raw = stream.read(max_bytes + 1) if max_bytes is not None else stream.read()
    if _too_long(len(raw), max_bytes, path, 1, on_problem):
        return
    text = _decode(raw, path, 1, on_problem)
    if text is None:
        return
    if not text.strip():
        on_problem(Problem("empty", path, 1, "empty document"))
        return
    yield Document(text, path, 1)


def read_documents(files: Iterable[str], text_key: str, on_problem: ProblemHandler,
                   max_bytes: int | None = MAX_DOCUMENT_BYTES) -> Iterator[Document]:
    """Stream documents from every file in order.

    A file that cannot be read or decompressed (corrupt gzip/zstd, permission)
    is reported as ``unreadable`` at the last line reached, and reading goes on
    with the next file.
    """
    for path in files:
        last_line = 0
        try:
            if is_json_lines(path):
                for doc in read_jsonl(path, text_key, on_problem, max_bytes):
                    last_line = doc.line
                    yield doc
            else:
                yield from read_text_file(path, on_problem, max_bytes)
        except Exception as err:
            if not _is_read_error(err):
                raise
            on_problem(Problem("unreadable", path, last_line + 1, f"{type(err).__name__}: {err}"))


def _is_read_error(err: Exception) -> bool:
    """I/O and decompression failures (gzip: OSError/EOFError/zlib.error; zstandard: ZstdError)."""
    return isinstance(err, (OSError, EOFError, zlib.error)) or type(err).__name__ == "ZstdError"


def shard_files(files: list[str], shard: int, num_shards: int) -> list[str]:
    """The files shard ``shard`` of ``num_shards`` processes.

    Files are dealt out largest first to the shard with the fewest bytes so far
    (deterministic: ties broken by name), which balances shards without
    reading the files. Order within a shard follows the input order.
    """
    sizes = {path: os.path.getsize(path) for path in files}
    load = [0] * num_shards
    owner: dict[str, int] = {}
    for path in sorted(files, key=lambda p: (-sizes[p], p)):
        target = min(range(num_shards), key=lambda s: (load[s], s))
        owner[path] = target
        load[target] += sizes[path]
    return [path for path in files if owner[path] == shard]
