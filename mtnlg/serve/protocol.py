"""Request schemas: OpenAI completions / chat completions (pydantic, strict
types, unknown fields rejected) and Megatron's ``PUT /api`` (validated by
hand so its errors read like Megatron's own)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20


class _Strict(BaseModel):
    # strict: "0.5" is not a float and true is not an int; forbid: a misspelt field is an error, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="vLLM extension: 0 or -1 = off")
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep going past the end-of-text token")
    user: Optional[str] = None
    # accepted so standard clients work, but only at their neutral values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None

    @model_validator(mode="after")
    def _supported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them at 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only meaningful with echo=true (scoring the prompt)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


# ---------------------------------------------------------------- Megatron PUT /api
@dataclass
class MegatronRequest:
    prompts: list[str]
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    add_BOS: bool = False
    random_seed: int = -1
    beam_width: int | None = None
    stop_token: int | None = None
    length_penalty: float = 1.0


_MEGATRON_FIELDS = {"prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p", "add_BOS",
                    "random_seed", "beam_width", "stop_token", "length_penalty", "no_log",
                    "stop_on_eol", "stop_on_double_eol", "prevent_newline_after_colon", "top_p_decay", "top_p_bound"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_megatron(body) -> MegatronRequest:
    """Validate a Megatron text-generation request; raise ValueError with
    Megatron's wording on the first problem."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    if "prompts" not in body:
        raise ValueError("prompts argument required")
    if "max_len" in body:
        raise ValueError("max_len is no longer used.  Replace with tokens_to_generate")
    if "sentences" in body:
        raise ValueError("sentences is no longer used.  Replace with prompts")
    unknown = sorted(set(body) - _MEGATRON_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; accepted: {sorted(_MEGATRON_FIELDS)}")
    for flag in ("stop_on_eol", "stop_on_double_eol", "prevent_newline_after_colon"):
        if body.get(flag, False) is not False:
            raise ValueError(f"{flag} is not supported by this server")
    if "top_p_decay" in body or "top_p_bound" in body:
        raise ValueError("top_p_decay and top_p_bound are not supported by this server")
    r = MegatronRequest(prompts=body["prompts"])
    if not isinstance(r.prompts, list) or not all(isinstance(p, str) for p in r.prompts):
        raise ValueError("prompts is not a list of strings")
    if not r.prompts:
        raise ValueError("prompts is empty")
    if len(r.prompts) > 128:
        raise ValueError("Maximum number of prompts is 128")
    get = body.get
    r.tokens_to_generate = get("tokens_to_generate", 64)
    if not _is_int(r.tokens_to_generate) or r.tokens_to_generate < 0:
        raise ValueError("tokens_to_generate must be an integer greater than or equal to 0")
    r.logprobs = get("logprobs", False)
    if not isinstance(r.logprobs, bool):
        raise ValueError("logprobs must be a boolean value")
    if r.tokens_to_generate == 0 and not r.logprobs:
        raise ValueError("tokens_to_generate=0 implies logprobs should be True")
    r.temperature = get("temperature", 1.0)
    if not isinstance(r.temperature, (int, float)) or isinstance(r.temperature, bool) or not 0.0 < r.temperature <= 100.0:
        raise ValueError("temperature must be a positive number less than or equal to 100.0")
    r.top_k = get("top_k", 0)
    if not _is_int(r.top_k) or not 0 <= r.top_k <= 1000:
        raise ValueError("top_k must be equal to or greater than 0 and less than or equal to 1000")
    r.top_p = get("top_p", 0.0)
    if not isinstance(r.top_p, (int, float)) or isinstance(r.top_p, bool) or not 0.0 <= r.top_p <= 1.0:
        raise ValueError("top_p must be a positive float less than or equal to 1.0")
    if r.top_p > 0.0 and r.top_k > 0:
        raise ValueError("cannot set both top-k and top-p samplings.")
    r.add_BOS = get("add_BOS", False)
    if not isinstance(r.add_BOS, bool):
        raise ValueError("add_BOS must be a boolean value")
    if any(len(p) == 0 for p in r.prompts) and not r.add_BOS:
        raise ValueError("Empty prompts require add_BOS=true")
    r.random_seed = get("random_seed", -1)
    if not _is_int(r.random_seed):
        raise ValueError("random_seed must be integer")
    if r.random_seed < -1:
        raise ValueError("random_seed must be a positive integer")
    r.beam_width = get("beam_width")
    if r.beam_width is not None:
        if not _is_int(r.beam_width) or r.beam_width < 1:
            raise ValueError("beam_width must be an integer >= 1")
        if r.beam_width > 64:
            raise ValueError("beam_width must be at most 64")
        if len(r.prompts) > 1:
            raise ValueError("When doing beam_search, batch size must be 1")
        if r.tokens_to_generate < 1:
            raise ValueError("beam search needs tokens_to_generate >= 1")
    r.stop_token = get("stop_token")
    if r.stop_token is not None and not _is_int(r.stop_token):
        raise ValueError("stop_token must be an integer")
    r.length_penalty = get("length_penalty", 1.0)
    if not isinstance(r.length_penalty, (int, float)) or isinstance(r.length_penalty, bool):
        raise ValueError("length_penalty must be a float")
    return r
