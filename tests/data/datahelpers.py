"""Helpers shared by the data tests (imported as a top-level module by pytest's rootdir insertion)."""

from __future__ import annotations

import argparse
import gzip
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOTU = os.path.join(ROOT, "data", "sotu", "sotu.jsonl.gz")


def sotu_texts(limit: int | None = None) -> list[str]:
    texts = []
    with gzip.open(SOTU, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) == limit:
                break
    return texts


def paragraphs(texts: list[str], words: int = 120) -> list[str]:
    """Non-overlapping chunks of ``words`` words, each a valid prose document."""
    out = []
    for text in texts:
        tokens = text.split()
        out += [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record))
            f.write("\n")
    return str(path)


def preprocess_args(*argv: str) -> argparse.Namespace:
    from mtnlg.data.preprocess import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--quiet", "--workers", "1", *argv])
