"""Models with known answers for the scorer and harness tests.  All use a
byte-level tokenizer (token = UTF-8 byte, 256 = end of text) so
tokenization is trivially checkable."""
from __future__ import annotations

import math

import torch

EOT = 256


class ByteLM:
    """Base: bytes as tokens; subclasses define ``logits``."""

    vocab = 257
    eot_id = EOT
    device = torch.device("cpu")

    def __init__(self, max_length: int = 4096):
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class UniformLM(ByteLM):
    """Every token has probability 1/257: log-likelihood = -n_tokens * log(257)."""

    def logits(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab)


class RandomLM(ByteLM):
    """Random next-byte preferences by previous byte and by position: knows
    nothing about any task, and (unlike a pure bigram) has no fixed bias
    between two answers that always read the same (BoolQ's " no"/" yes"),
    because their positions vary with the passage.  Scores chance."""

    def __init__(self, seed: int = 0, scale: float = 3.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(self.vocab, self.vocab, generator=gen) * scale
        self.pos = torch.randn(self.max_length, self.vocab, generator=gen) * scale

    def logits(self, tokens):
        return self.table[tokens] + self.pos[:tokens.shape[1]]


class PlantedLM(ByteLM):
    """Knows the answers: memorises the next byte after every ``key`` bytes of
    the given gold texts and puts almost all probability on it there (uniform
    elsewhere), so each gold continuation is the greedy choice and the most
    likely option."""

    def __init__(self, gold_texts: list[str], key: int = 48, confidence: float = 30.0):
        super().__init__()
        self.key, self.confidence = key, confidence
        self.next: dict[tuple, int] = {}
        for text in gold_texts:
            seq = self.encode(text)
            for t in range(1, len(seq)):
                self.next[tuple(seq[max(0, t - key):t])] = seq[t]

    def logits(self, tokens):
        out = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                hit = self.next.get(tuple(row[max(0, t + 1 - self.key):t + 1]))
                if hit is not None:
                    out[b, t, hit] = self.confidence
        return out


class TableLM:
    """Three-token vocabulary {a: 0, b: 1, c: 2}; the next-token distribution
    depends on the previous token only (a bigram table given as probabilities)."""

    eot_id = 2  # 'c' doubles as the start token
    device = torch.device("cpu")

    def __init__(self, probs: dict[str, list[float]], max_length: int = 16):
        self.max_length = max_length
        self.table = torch.tensor([[math.log(p) for p in probs[ch]] for ch in "abc"])

    def encode(self, text: str) -> list[int]:
        return ["abc".index(ch) for ch in text]

    def logits(self, tokens):
        return self.table[tokens]
