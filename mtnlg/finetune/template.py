"""The chat template: how a conversation becomes text, and which of it is learned.

A conversation is a list of ``{"role": "system"|"user"|"assistant",
"content": str}`` messages (an optional system message first).  Each turn is
rendered as ``prefix + content + end``; the assistant's content and its end
marker are the *trainable* part (fine-tuning puts loss on them only), the
rest is context.  The assistant's end marker is the tokenizer's end-of-document
token, so generation stops where a reply ends.

``render`` returns the rendered text as ``(text, trainable)`` segments and
``encode`` tokenizes them one segment at a time, so a prompt encoded at
inference (``encode(messages, add_generation_prompt=True)``) is token for
token the prefix the model saw in training.  The template is stored with the
model as ``RUN/chat_template.json``; ``to_jinja`` gives the same rendering as
a Hugging Face ``chat_template`` string for exported tokenizers (the tests
compare the two through ``transformers``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mtnlg.errors import UserError

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    system_prefix: str = "<|system|>\n"
    user_prefix: str = "<|user|>\n"
    assistant_prefix: str = "<|assistant|>\n"
    turn_end: str = "\n"  # after system and user turns
    assistant_end: str = "<|endoftext|>"  # after assistant turns: learned, and where generation stops
    version: int = 1

    def prefix(self, role: str) -> str:
        return {"system": self.system_prefix, "user": self.user_prefix, "assistant": self.assistant_prefix}[role]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """``(text, trainable)`` segments of a validated conversation; with
        ``add_generation_prompt`` the assistant prefix that starts a reply is appended."""
        out: list[tuple[str, bool]] = []
        for m in messages:
            role, content = m["role"], m["content"]
            out.append((self.prefix(role), False))
            if role == "assistant":
                out += [(content, True), (self.assistant_end, True)]
            else:
                out.append((content + self.turn_end, False))
        if add_generation_prompt:
            out.append((self.assistant_prefix, False))
        return [(t, train) for t, train in out if t]

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(t for t, _ in self.render(messages, add_generation_prompt))

    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it is trained on."""
        ids: list[int] = []
        mask: list[bool] = []
        for text, train in self.render(messages, add_generation_prompt):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [train] * len(piece)
        return ids, mask

    def to_jinja(self) -> str:
        """The same rendering as a Hugging Face ``chat_template`` (Jinja) string."""
        j = json.dumps  # JSON string literals are valid Jinja string literals
        return ("{% for m in messages %}"
                f"{{% if m['role'] == 'system' %}}{{{{ {j(self.system_prefix)} + m['content'] + {j(self.turn_end)} }}}}"
                f"{{% elif m['role'] == 'user' %}}{{{{ {j(self.user_prefix)} + m['content'] + {j(self.turn_end)} }}}}"
                f"{{% else %}}{{{{ {j(self.assistant_prefix)} + m['content'] + {j(self.assistant_end)} }}}}"
                "{% endif %}{% endfor %}"
                f"{{% if add_generation_prompt %}}{{{{ {j(self.assistant_prefix)} }}}}{{% endif %}}")

    def save(self, run_dir: str | Path) -> None:
        from mtnlg.io import write_atomic
        write_atomic(Path(run_dir) / TEMPLATE_FILE, json.dumps(asdict(self), indent=2) + "\n")


def load_chat_template(run_dir: str | Path) -> ChatTemplate | None:
    """The template stored with a model, or None if it has none."""
    path = Path(run_dir) / TEMPLATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); restore it from the fine-tune run")
    known = {f.name for f in fields(ChatTemplate)}
    if not isinstance(data, dict) or set(data) - known or not all(isinstance(data[k], (str, int)) for k in data):
        raise UserError(f"{path} is not a chat template (expected keys {sorted(known)})")
    return ChatTemplate(**data)


def check_messages(messages, where: str = "messages") -> str | None:
    """Why ``messages`` is not a usable conversation, or None if it is: a
    non-empty list of {role, content} objects, roles system/user/assistant, a
    system message only first, and at least one assistant reply."""
    if not isinstance(messages, list) or not messages:
        return f"{where} must be a non-empty list of {{\"role\", \"content\"}} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{where}[{i}] must be an object with \"role\" and \"content\""
        if m["role"] not in ROLES:
            return f"{where}[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"{where}[{i}].content is {type(m['content']).__name__}, expected a string"
        if m["role"] == "system" and i:
            return f"{where}[{i}] is a system message; only the first message may be one"
    return None


def chat_prompt_ids(run_dir: str | Path, tokenizer, message: str, system: str | None = None) -> list[int]:
    """Token ids that ask the model of ``run_dir`` to reply to ``message``
    (the stored template, up to and including the assistant prefix)."""
    template = load_chat_template(run_dir)
    if template is None:
        raise UserError(f"{run_dir} has no {TEMPLATE_FILE}: chat needs a model fine-tuned with `mtnlg finetune`")
    eod = tokenizer.encode(template.assistant_end)
    if eod != [tokenizer.eod_id]:
        raise UserError(f"{run_dir}/{TEMPLATE_FILE}: assistant_end {template.assistant_end!r} must be the "
                        f"tokenizer's end-of-document token, where generation stops")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    return template.encode(tokenizer, messages, add_generation_prompt=True)[0]
