"""Incremental detokenization with stop strings, and chat templates.

Byte-level BPE can split one character across tokens, and a stop string can
straddle tokens, so streamed text is released only once it is final: never
a trailing replacement character of an incomplete UTF-8 sequence, never a
suffix that might still grow into a stop string.
"""
from __future__ import annotations

import json
from pathlib import Path

from mtnlg.errors import UserError


class TextStream:
    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self._kept: int | None = None

    def add(self, ids: list[int]) -> str:
        """Append generated tokens; return the newly final text."""
        if self.stopped:
            return ""
        self.ids += ids
        text = self.decode(self.ids)
        for s in self.stops:
            i = text.find(s, max(0, len(self.sent) - len(s)))
            if i >= 0:
                text, self.stopped = text[:i], True
        safe = len(text)
        if not self.stopped:
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            for s in self.stops:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        new = text[len(self.sent):safe] if safe > len(self.sent) else ""
        self.sent += new
        return new

    def finish(self) -> str:
        """The rest of the text once generation ended without a stop string."""
        if self.stopped:
            return ""
        new = self.decode(self.ids)[len(self.sent):]
        self.sent += new
        return new

    def kept_tokens(self) -> int:
        """How many leading tokens make up the released text (all of them
        unless a stop string cut the text inside or before a token)."""
        if not self.stopped:
            return len(self.ids)
        if self._kept is None:  # fixed once stopped: the released text no longer changes
            self._kept = next((k for k in range(len(self.ids) + 1)
                               if len(self.decode(self.ids[:k])) >= len(self.sent)), len(self.ids))
        return self._kept


# ---------------------------------------------------------------- chat templates
# A plain-text dialogue layout for models trained without chat special tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def find_chat_template(explicit: str | None, model_dir: str | Path | None) -> tuple[object, str]:
    """(template, where it came from): --chat-template FILE (Jinja), else the
    model directory's ``chat_template.json`` (written by ``mtnlg finetune``),
    ``chat_template.jinja`` or ``tokenizer_config.json["chat_template"]``
    (Hugging Face layout), else the plain-text default.  The template is a
    Jinja source string or a :class:`FinetuneChat`."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"--chat-template {explicit!r} is not a file")
        return p.read_text(), str(p)
    if model_dir:
        d = Path(model_dir)
        if (d / "chat_template.json").is_file():
            try:
                from mtnlg.finetune.template import load_chat_template
            except ImportError:
                load_chat_template = None
            if load_chat_template is not None:
                return FinetuneChat(load_chat_template(d)), str(d / "chat_template.json")
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text(), str(d / "chat_template.jinja")
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            try:
                tpl = json.loads(cfg.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                tpl = None
            if isinstance(tpl, str):
                return tpl, str(cfg)
    return DEFAULT_CHAT_TEMPLATE, "default"


class FinetuneChat:
    """The template a model was fine-tuned with (``mtnlg.finetune.template``):
    prompts are tokenized segment by segment exactly as in training."""

    ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

    def __init__(self, template):
        self.template = template
        self.source = template.to_jinja()

    def _messages(self, messages: list[dict]) -> list[dict]:
        out = []
        for i, m in enumerate(messages):
            if m["role"] not in self.ROLES:
                raise ValueError(f"messages[{i}].role {m['role']!r} is not supported by this model's chat template "
                                 f"(system, user, assistant)")
            out.append({"role": self.ROLES[m["role"]], "content": m["content"]})
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.text(self._messages(messages), add_generation_prompt)

    def prompt_ids(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int] | None:
        return self.template.encode(tokenizer, self._messages(messages), add_generation_prompt)[0]


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox, as Hugging Face does."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateError as err:
            raise UserError(f"invalid chat template: {err}") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    def prompt_ids(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int] | None:
        return None  # tokenize the rendered text

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None


def _raise(message: str):
    from jinja2 import TemplateError
    raise TemplateError(message)
