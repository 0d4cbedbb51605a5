"""Text normalization and GPT-3/Gopher/MT-NLG style quality filters.

``normalize`` repairs mojibake with ftfy, applies Unicode NFC and cleans up
whitespace. ``QualityFilter`` runs an ordered list of document-level checks
and names the first one a document fails, so every removal is attributed to
exactly one filter and counted in the report.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields
from itertools import islice

import ftfy

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\S+")
_TERMINAL = tuple(".!?\"'”’)]:;…")
_SYMBOLS = ("#", "...", "…")
# Gopher's stop-word rule: English prose contains at least two of these.
_STOPWORDS = frozenset("the be to of and that have with".split())
_ALPHA = re.compile(r"[^\W\d_]")


def normalize(text: str) -> str:
    """Repair Unicode (ftfy), NFC-normalize, and tidy whitespace."""
    text = ftfy.fix_text(text, normalization="NFC")
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    text = "\n".join(lines)
    return _BLANK_LINES.sub("\n\n", text).strip()


@dataclass
class FilterConfig:
    """Thresholds of the quality filters; a filter set to ``None`` is disabled."""

    min_words: int | None = 50  # GPT-3/Gopher: short pages are rarely useful prose
    max_words: int | None = 1_000_000
    min_mean_word_length: float | None = 3.0  # Gopher: 3..10 characters
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' and ellipses per word
    min_punctuation_line_fraction: float | None = 0.1  # lines ending in . ! ? etc.
    max_duplicate_line_fraction: float | None = 0.3  # Gopher repetition removal
    max_top_2gram_fraction: float | None = 0.2  # characters in the most frequent word 2-gram
    max_duplicate_5gram_fraction: float | None = 0.15  # characters in repeated word 5-grams
    min_alpha_fraction: float | None = 0.8  # words containing a letter
    min_stopwords: int | None = 2  # language heuristic: English stop words present

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def set(self, assignment: str) -> None:
        """Apply ``name=value`` (value ``none`` disables the filter)."""
        from mtnlg.errors import UserError

        name, sep, value = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in self.names():
            raise UserError(f"--filter expects NAME=VALUE with NAME one of {', '.join(self.names())}; "
                            f"got {assignment!r}")
        if value.strip().lower() == "none":
            setattr(self, name, None)
            return
        kind = int if name in ("min_words", "max_words", "min_stopwords") else float
        try:
            setattr(self, name, kind(value))
        except ValueError:
            raise UserError(f"--filter {name} needs a number or 'none', got {value!r}") from None

    @classmethod
    def disabled(cls) -> "FilterConfig":
        return cls(**{name: None for name in cls.names()})


def _duplicate_ngram_fraction(words: list[str], n: int) -> float:
    """Fraction of word characters inside n-grams that occur more than once."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / max(total, 1)


def _top_ngram_fraction(words: list[str], n: int) -> float:
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    return count * sum(len(w) for w in gram) / max(sum(len(w) for w in words), 1)


def _more_words_than(text: str, limit: int) -> bool:
    if len(text) <= limit:  # a word takes at least one character
        return False
    return next(islice(_WORD.finditer(text), limit, None), None) is not None


class QualityFilter:
    """Ordered document checks; ``reason(text)`` names the first failed one or None."""

    ORDER = (
        "min_words", "max_words", "mean_word_length", "symbol_word_ratio",
        "alpha_fraction", "stopwords", "punctuation_lines", "duplicate_lines",
        "top_2gram", "duplicate_5gram",
    )

    def __init__(self, config: FilterConfig | None = None):
        self.config = config or FilterConfig()

    def reason(self, text: str) -> str | None:
        c = self.config
        if c.max_words is not None and _more_words_than(text, c.max_words):
            return "max_words"  # decided before listing the words: a huge document costs no memory
        words = _WORD.findall(text)
        n = len(words)
        if c.min_words is not None and n < c.min_words:
            return "min_words"
        if c.max_words is not None and n > c.max_words:
            return "max_words"
        if n == 0:
            return "min_words"
        mean_len = sum(len(w) for w in words) / n
        if (c.min_mean_word_length is not None and mean_len < c.min_mean_word_length) or (
            c.max_mean_word_length is not None and mean_len > c.max_mean_word_length
        ):
            return "mean_word_length"
        if c.max_symbol_word_ratio is not None:
            symbols = sum(text.count(s) for s in _SYMBOLS)
            if symbols / n > c.max_symbol_word_ratio:
                return "symbol_word_ratio"
        if c.min_alpha_fraction is not None:
            alpha = sum(1 for w in words if _ALPHA.search(w))
            if alpha / n < c.min_alpha_fraction:
                return "alpha_fraction"
        lowered = [w.lower() for w in words]
        if c.min_stopwords is not None and len(_STOPWORDS.intersection(lowered)) < c.min_stopwords:
            return "stopwords"
        lines = [line for line in text.split("\n") if line.strip()]
        # Only judged on multi-line documents: one long line says nothing about layout.
        if c.min_punctuation_line_fraction is not None and len(lines) >= 3:
            ending = sum(1 for line in lines if line.endswith(_TERMINAL))
            if ending / len(lines) < c.min_punctuation_line_fraction:
                return "punctuation_lines"
        if c.max_duplicate_line_fraction is not None and len(lines) > 1:
            duplicates = len(lines) - len(set(lines))
            if duplicates / len(lines) > c.max_duplicate_line_fraction:
                return "duplicate_lines"
        if c.max_top_2gram_fraction is not None and _top_ngram_fraction(lowered, 2) > c.max_top_2gram_fraction:
            return "top_2gram"
        if (c.max_duplicate_5gram_fraction is not None
                and _duplicate_ngram_fraction(lowered, 5) > c.max_duplicate_5gram_fraction):
            return "duplicate_5gram"
        return None
