"""Remove evaluation-set text from training documents, as MT-NLG did.

``mtnlg preprocess --decontaminate lambada,piqa,...|FILE`` (or ``all``):

* n-grams are 13 consecutive words, lower-cased, punctuation ignored
  (words are ``\\w+`` runs), built from every task example (each option's
  context + continuation) or every document of the given files;
* each match in a training document is cut out together with 200 characters
  on each side (overlapping cuts merge);
* the remaining pieces under 200 characters are dropped, the others become
  separate documents; a document cut into more than 10 pieces is dropped
  whole.

The counts go to ``PREFIX.report.json`` under ``decontamination``.  Runs in
the reading process, before cleaning and tokenization.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mtnlg.errors import UserError

WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class DecontamConfig:
    n: int = 13                 # words per n-gram
    margin: int = 200           # characters removed on each side of a match
    min_piece: int = 200        # shorter leftover pieces are dropped
    max_pieces: int = 10        # documents split into more pieces are dropped


def add_arguments(group) -> None:
    group.add_argument("--decontaminate", metavar="TASKS|FILES",
                       help="remove 13-gram overlaps with evaluation sets: comma-separated task names "
                            "(lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, boolq, or all) "
                            "and/or text/jsonl files (MT-NLG: 200 chars cut each side, pieces < 200 chars "
                            "dropped, documents in > 10 pieces dropped)")


def ngram_keys(text: str, n: int) -> Iterator[tuple[int, int, int]]:
    """(hash, start char, end char) of every n-word window of ``text``."""
    words = [(m.group().lower(), m.start(), m.end()) for m in WORD.finditer(text)]
    for i in range(len(words) - n + 1):
        yield hash(" ".join(w for w, _, _ in words[i:i + n])), words[i][1], words[i + n - 1][2]


@dataclass
class Decontaminator:
    """Holds the evaluation n-grams (hash -> source) and rewrites documents."""

    config: DecontamConfig = field(default_factory=DecontamConfig)
    index: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: dict(documents_checked=0, documents_contaminated=0,
                                                      documents_dropped_too_many_pieces=0,
                                                      documents_dropped_no_piece_left=0, matches=0,
                                                      pieces_out=0, pieces_dropped_short=0,
                                                      chars_in=0, chars_removed=0))
    matches_by_source: dict = field(default_factory=dict)

    def add_texts(self, source: str, texts: Iterable[str]) -> None:
        sid = len(self.sources)
        self.sources.append(source)
        self.matches_by_source[source] = 0
        for text in texts:
            for key, _, _ in ngram_keys(text, self.config.n):
                self.index.setdefault(key, sid)

    def pieces(self, text: str) -> list[str]:
        """The kept pieces of one document (``[text]`` when it is clean, ``[]`` when dropped)."""
        c, counts = self.config, self.counts
        counts["documents_checked"] += 1
        counts["chars_in"] += len(text)
        cuts: list[list[int]] = []
        for key, start, end in ngram_keys(text, c.n):
            sid = self.index.get(key)
            if sid is None:
                continue
            counts["matches"] += 1
            self.matches_by_source[self.sources[sid]] += 1
            lo, hi = max(0, start - c.margin), min(len(text), end + c.margin)
            if cuts and lo <= cuts[-1][1]:
                cuts[-1][1] = max(cuts[-1][1], hi)
            else:
                cuts.append([lo, hi])
        if not cuts:
            counts["pieces_out"] += 1
            return [text]
        counts["documents_contaminated"] += 1
        counts["chars_removed"] += sum(hi - lo for lo, hi in cuts)
        bounds = [0] + [x for cut in cuts for x in cut] + [len(text)]
        raw = [text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
        raw = [p for p in raw if p.strip()]
        if len(raw) > c.max_pieces:
            counts["documents_dropped_too_many_pieces"] += 1
            return []
        kept = [p for p in raw if len(p) >= c.min_piece]
        counts["pieces_dropped_short"] += len(raw) - len(kept)
        counts["documents_dropped_no_piece_left"] += not kept
        counts["pieces_out"] += len(kept)
        return kept

    def report(self) -> dict:
        return {**self.counts, "matches_by_source": dict(self.matches_by_source), "sources": list(self.sources),
                "ngram": self.config.n, "margin_chars": self.config.margin,
                "min_piece_chars": self.config.min_piece, "max_pieces": self.config.max_pieces,
                "eval_ngrams": len(self.index)}


def task_texts(name: str) -> Iterator[str]:
    from mtnlg.evaluate.tasks import load_docs
    for doc in load_docs(name):
        for o in range(doc.n_options):
            ctx, cont = doc.pair(o)
            yield ctx + cont


def build(spec: str, config: DecontamConfig | None = None) -> Decontaminator:
    """A Decontaminator over ``spec``: comma-separated task names, ``all``, or files."""
    from mtnlg.evaluate.tasks import TASKS
    d = Decontaminator(config or DecontamConfig())
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UserError("--decontaminate needs task names or files")
    for item in items:
        if item == "all":
            for name in TASKS:
                d.add_texts(name, task_texts(name))
        elif item in TASKS:
            d.add_texts(item, task_texts(item))
        elif Path(item).is_file():
            from mtnlg.data.readers import read_documents
            d.add_texts(item, (doc.text for doc in read_documents([item], "text", lambda problem: None)))
        else:
            raise UserError(f"--decontaminate {item!r} is neither a file nor a known task "
                            f"({', '.join(TASKS)}, all)")
    return d


def decontaminate_documents(docs: Iterable, d: Decontaminator) -> Iterator:
    """Documents (readers.Document) rewritten into their kept pieces."""
    from dataclasses import replace
    for doc in docs:
        for piece in d.pieces(doc.text):
            yield doc if piece is doc.text else replace(doc, text=piece)
