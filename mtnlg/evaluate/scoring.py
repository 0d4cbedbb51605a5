"""Log-likelihood scoring of (context, continuation) pairs, batched, for any
causal LM behind a small adapter: our GPT (plain or tensor-parallel) or a
Hugging Face ``AutoModelForCausalLM``.

Tokenization and truncation follow lm-evaluation-harness (HFLM):

* spaces at the end of the context move to the front of the continuation;
  context + continuation is tokenized whole and the continuation's tokens are
  those after the context's own tokenization (BPE merges across the seam are
  kept as the model would see the text);
* an empty context is replaced by the end-of-text token;
* a pair longer than the model's context + 1 keeps its last tokens (left
  truncation), and is counted.

A pair's score is the summed log-probability of its continuation tokens and
whether every one of them is the model's greedy (argmax) choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class CausalLM(Protocol):
    """What the scorer needs from a model."""

    max_length: int          # tokens the model attends to
    eot_id: int              # end-of-text token (context of an empty prompt)
    device: torch.device

    def encode(self, text: str) -> list[int]: ...

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) next-token logits over the whole vocabulary."""
        ...


@dataclass
class ScoreStats:
    requests: int = 0
    truncated: int = 0           # pairs whose context was cut on the left
    continuation_cut: int = 0    # pairs whose continuation alone exceeded the model's context

    def add(self, other: "ScoreStats") -> None:
        self.requests += other.requests
        self.truncated += other.truncated
        self.continuation_cut += other.continuation_cut


def encode_pair(lm: CausalLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [lm.eot_id], lm.encode(continuation)
    whole = lm.encode(context + continuation)
    n_ctx = len(lm.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


@torch.no_grad()
def score_tokens(lm: CausalLM, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16,
                 stats: ScoreStats | None = None) -> list[tuple[float, bool]]:
    """(summed log-prob, all-greedy) of each continuation given its context.
    Pairs are sorted longest first and right-padded per batch (causal
    attention never lets a real position see padding); results come back in
    input order."""
    stats = stats if stats is not None else ScoreStats()
    L = lm.max_length
    rows = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation: nothing to score")
        stats.requests += 1
        full = ctx + cont
        if len(full) > L + 1:
            stats.truncated += 1
            stats.continuation_cut += len(cont) > L
        full = full[-(L + 1):]
        rows.append((full[:-1], full[1:], min(len(cont), L)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = len(rows[idx[0]][0])
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for b, i in enumerate(idx):
            batch[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
        logits = lm.logits(batch.to(lm.device))
        # the continuation positions of every row, softmaxed together in one call
        row_of, pos_of, targets, owner = [], [], [], []
        for b, i in enumerate(idx):
            inp, tgt, n = rows[i]
            row_of += [b] * n
            pos_of += range(len(inp) - n, len(inp))
            targets += tgt[-n:]
            owner += [b] * n
        dev = logits.device
        span = logits[torch.tensor(row_of, device=dev), torch.tensor(pos_of, device=dev)].float().log_softmax(-1)
        target = torch.tensor(targets, device=dev)
        owner_t = torch.tensor(owner, device=dev)
        token_ll = span.gather(-1, target[:, None])[:, 0]
        hit = (span.argmax(-1) == target).float()
        ll = torch.zeros(len(idx), dtype=torch.float64, device=dev).index_add_(0, owner_t, token_ll.double())
        misses = torch.zeros(len(idx), device=dev).index_add_(0, owner_t, 1.0 - hit)
        for b, i in enumerate(idx):
            out[i] = (float(ll[b]), bool(misses[b] == 0))
    return out  # type: ignore[return-value]


def score_text_pairs(lm: CausalLM, pairs: list[tuple[str, str]], batch_size: int = 16,
                     stats: ScoreStats | None = None) -> list[tuple[float, bool]]:
    return score_tokens(lm, [encode_pair(lm, c, x) for c, x in pairs], batch_size, stats)


def rolling_pairs(lm: CausalLM, text: str) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows that predict every token of ``text`` once (the first
    from the end-of-text token), each with as much preceding context as fits:
    the sum of their scores is the text's log-likelihood."""
    toks = lm.encode(text)
    full = [lm.eot_id] + toks
    L, pairs = lm.max_length, []
    for s in range(1, len(full), L):       # targets full[s:e], inputs full[s-1:e-1]
        e = min(s + L, len(full))
        lo = max(0, e - 1 - L)
        pairs.append((full[lo:s], full[s:e]))
    return pairs


class GPTAdapter:
    """Our GPT (plain, or with tensor parallelism applied: logits gathered)."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, vocab_size: int | None = None):
        self.model, self.tok, self.device = model, tokenizer, device
        self.max_length = model.cfg.seq_len
        self.eot_id = tokenizer.eod_id
        self.vocab_size = vocab_size  # drop rows padded for tensor parallelism

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        from mtnlg.parallel.tensor import gather_logits
        out = gather_logits(self.model(tokens))
        return out[..., :self.vocab_size] if self.vocab_size else out


class HFAdapter:
    """A Hugging Face causal LM and its tokenizer (``--hf DIR``)."""

    def __init__(self, model, tokenizer, device: torch.device, max_length: int | None = None):
        self.model, self.tok, self.device = model, tokenizer, device
        cfg = model.config
        self.max_length = max_length or next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings",
                                                                        "n_ctx", "seq_length")
                                              if getattr(cfg, k, None)), 2048)
        eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if eot is None:
            from mtnlg.errors import UserError
            raise UserError("the Hugging Face tokenizer has neither an eos nor a bos token to start an empty context")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits
