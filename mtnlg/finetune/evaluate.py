"""Held-out scores of a (fine-tuned) model on prompt/response or chat examples.

``response_loss`` is the mean cross-entropy over exactly the tokens that
fine-tuning trains on (response / assistant tokens and the end marker),
computed through the same encoding and rows as training, so on the held-out
file of a fine-tune it equals the trainer's ``val_loss``.  ``exact_match``
decodes greedily from the prompt (for a conversation: the messages before the
last assistant reply, plus the assistant prefix), cuts the reply at the end
token or the first newline, and compares it with the record's ``answers``
(or its response) after SQuAD-style normalisation (lower case, no
punctuation, no articles, single spaces).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch

from mtnlg.finetune.data import Example, encode_record, parse_record
from mtnlg.finetune.template import ChatTemplate


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _parsed(record: dict):
    parsed = parse_record(record)
    if isinstance(parsed, str):
        raise ValueError(f"not a fine-tuning record: {parsed}")
    return parsed


@torch.no_grad()
def response_loss(model, tokenizer, records: list[dict], template: ChatTemplate | None = None,
                  batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per trained-on token, number of such tokens); over-long
    examples keep their last seq_len + 1 tokens, as in training."""
    from mtnlg.finetune.pack import FinetuneDataset, build_rows
    template = template or ChatTemplate()
    row_len = model.cfg.seq_len + 1
    examples = []
    for r in records:
        ids, mask = encode_record(*_parsed(r), tokenizer, template)
        examples.append(Example(torch.tensor(ids[-row_len:]).numpy(), torch.tensor(mask[-row_len:]).numpy()))
    ds = FinetuneDataset(build_rows(examples, row_len, tokenizer.eod_id, pack=False), 0, shuffle=False,
                         document_mask=False)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for first in range(0, len(ds), batch_size):
        x, y = ds.batch(first, min(batch_size, len(ds) - first), device)
        logits = model(x).float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += int((y != -100).sum())
    return total / max(count, 1), count


@dataclass
class Prediction:
    prediction: str
    answers: list[str]
    correct: bool


def prompt_ids(record: dict, tokenizer, template: ChatTemplate) -> list[int]:
    kind, value = _parsed(record)
    if kind == "pair":
        return tokenizer.encode(value[0])
    last = max(i for i, m in enumerate(value) if m["role"] == "assistant")
    return template.encode(tokenizer, value[:last], add_generation_prompt=True)[0]


def reference_answers(record: dict) -> list[str]:
    if isinstance(record.get("answers"), list) and record["answers"]:
        return [str(a) for a in record["answers"]]
    kind, value = _parsed(record)
    return [value[1] if kind == "pair" else [m for m in value if m["role"] == "assistant"][-1]["content"]]


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], template: ChatTemplate | None = None,
                max_new_tokens: int = 24) -> tuple[float, list[Prediction]]:
    """(share of records whose greedy reply matches an answer, the predictions)."""
    from mtnlg.infer.generate import generate
    template = template or ChatTemplate()
    device = next(model.parameters()).device
    budget = model.cfg.seq_len - max_new_tokens
    out = []
    for r in records:
        ids = prompt_ids(r, tokenizer, template)[-budget:]
        tokens = generate(model, torch.tensor([ids], device=device), max_new_tokens, greedy=True,
                          eos_id=tokenizer.eod_id)[0, len(ids):].tolist()
        if tokenizer.eod_id in tokens:
            tokens = tokens[:tokens.index(tokenizer.eod_id)]
        text = tokenizer.decode(tokens).split("\n")[0].strip()
        answers = reference_answers(r)
        out.append(Prediction(text, answers, any(normalize_answer(text) == normalize_answer(a) for a in answers)))
    return sum(p.correct for p in out) / max(len(out), 1), out
