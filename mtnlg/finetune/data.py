"""Fine-tuning examples: read JSONL, check each record, tokenize with a loss mask.

One example per line, either

    {"prompt": "...", "response": "..."}          prompt as context, response learned
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

A prompt/response pair becomes ``prompt + response + <|endoftext|>`` (prompt
and response tokenized separately, so the prompt's tokens at inference are
those seen in training); a conversation goes through the chat template
(``template.py``).  Only response / assistant tokens and the end marker are
trained on.

Bad records (invalid JSON or UTF-8, neither field set, wrong types, no
assistant reply) are skipped and counted; an example longer than the
context keeps its *last* ``max_tokens`` tokens (the start of the prompt is
dropped) and is counted as truncated.  ``strict=True`` turns either case into
a one-line ``UserError`` naming the file and line.  No usable example at all
is always an error.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mtnlg.data.readers import open_binary
from mtnlg.errors import UserError
from mtnlg.finetune.template import ChatTemplate, check_messages


@dataclass
class Example:
    ids: np.ndarray  # int32 token ids
    mask: np.ndarray  # bool: this token is a training target


@dataclass
class DataReport:
    path: str
    lines: int = 0
    examples: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_problem: str = ""
    sha256: str = ""

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{self.path}: {self.examples} examples, {self.tokens} tokens ({self.loss_tokens} trained on)"
        if self.truncated:
            text += f", {self.truncated} truncated to the context"
        if skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
            text += f", {skipped} lines skipped ({kinds}; first: {self.first_problem})"
        return text

    def to_json(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "lines": self.lines, "examples": self.examples,
                "truncated": self.truncated, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "skipped": dict(self.skipped)}


def parse_record(record) -> tuple[str, object] | str:
    """("pair", (prompt, response)) or ("chat", messages), or why the record is unusable."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        problem = check_messages(record["messages"])
        if problem:
            return problem
        if not any(m["role"] == "assistant" for m in record["messages"]):
            return "messages has no assistant reply to learn"
        return "chat", record["messages"]
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                what = "missing" if key not in record else f"{type(record[key]).__name__}, expected a string"
                return f"{key!r} is {what}"
        return "pair", (record["prompt"], record["response"])
    return f"no \"prompt\"/\"response\" or \"messages\" field (found {sorted(record)[:6]})"


def encode_record(kind: str, value, tokenizer, template: ChatTemplate) -> tuple[list[int], list[bool]]:
    if kind == "chat":
        return template.encode(tokenizer, value)
    prompt, response = value
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    return p + r + [tokenizer.eod_id], [False] * len(p) + [True] * (len(r) + 1)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read fine-tuning data {path}: {e.strerror}") from None
    return h.hexdigest()


def load_examples(path: str, tokenizer, template: ChatTemplate, max_tokens: int,
                  strict: bool = False) -> tuple[list[Example], DataReport]:
    """Every usable example of a JSONL file, at most ``max_tokens`` tokens each."""
    report = DataReport(path=str(path), sha256=file_sha256(path))
    examples: list[Example] = []

    def problem(line: int, kind: str, message: str) -> None:
        where = f"{path}:{line}"
        if strict:
            raise UserError(f"{where}: {message} (finetune.strict stops at the first bad line)")
        report.skipped[kind] += 1
        report.first_problem = report.first_problem or f"line {line}: {message}"

    with open_binary(str(path)) as stream:
        for line_no, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            report.lines += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problem(line_no, "invalid_utf8", f"invalid UTF-8 at byte {e.start}")
                continue
            except json.JSONDecodeError as e:
                problem(line_no, "invalid_json", f"invalid JSON ({e.msg}, column {e.colno})")
                continue
            parsed = parse_record(record)
            if isinstance(parsed, str):
                problem(line_no, "bad_record", parsed)
                continue
            ids, mask = encode_record(*parsed, tokenizer, template)
            if len(ids) > max_tokens:
                if strict:
                    raise UserError(f"{path}:{line_no}: example of {len(ids)} tokens exceeds the context "
                                    f"({max_tokens} tokens: model.seq_len + 1); shorten it or drop finetune.strict "
                                    f"to keep its last {max_tokens} tokens")
                ids, mask = ids[-max_tokens:], mask[-max_tokens:]
                report.truncated += 1
            if not any(mask[1:]):  # the first token is never predicted
                problem(line_no, "no_loss_tokens", "nothing to learn once truncated to the context")
                continue
            examples.append(Example(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)))
            report.examples += 1
            report.tokens += len(ids)
            report.loss_tokens += int(np.count_nonzero(mask[1:]))
    if not examples:
        detail = f": {report.first_problem}" if report.first_problem else ""
        raise UserError(f"{path} holds no usable fine-tuning examples ({report.lines} non-blank lines"
                        f"{', all skipped' if report.lines else ''}{detail})")
    return examples, report


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded random ``fraction`` of the examples held out (at least one, if any)."""
    if fraction <= 0:
        return examples, []
    n_valid = max(1, round(len(examples) * fraction))
    if n_valid >= len(examples):
        raise UserError(f"finetune.valid_fraction={fraction} leaves no training examples out of {len(examples)}; "
                        f"lower it or give finetune.valid")
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_valid].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])
