"""Malformed requests every route must refuse with a 4xx while the server
stays healthy (used by the tests and by ``benchmarks/serve_load.py``)."""
from __future__ import annotations

import httpx

# (method, path, body: JSON-able, raw bytes or None, what is wrong)
CASES: list[tuple[str, str, object, str]] = [
    ("POST", "/v1/completions", b"{not json", "bad JSON"),
    ("POST", "/v1/completions", b"", "empty body"),
    ("POST", "/v1/completions", [], "a list, not an object"),
    ("POST", "/v1/completions", {"max_tokens": 3}, "missing prompt"),
    ("POST", "/v1/completions", {"prompt": 5, "max_tokens": 3}, "prompt of the wrong type"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "3"}, "max_tokens as a string"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens as a boolean"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, "negative max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 12}, "huge max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature < 0"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p = 0"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "bogus_field": 1}, "unknown field"),
    ("POST", "/v1/completions", {"prompt": "x " * 500_000, "max_tokens": 2}, "1 MB prompt"),
    ("POST", "/v1/completions", {"prompt": [[1, 2], "mixed"]}, "mixed prompt list"),
    ("POST", "/v1/completions", {"prompt": [10 ** 9]}, "token id outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": []}, "empty prompt list"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 0}, "n = 0"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 99}, "too many logprobs"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "five stop strings"),
    ("POST", "/v1/completions", {"prompt": "hi", "presence_penalty": 1.0}, "unsupported penalty"),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "unknown model"),
    ("POST", "/v1/chat/completions", {"messages": []}, "no messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, "messages as a string"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs without logprobs"),
    ("PUT", "/api", b"\xff\xfe", "not UTF-8"),
    ("PUT", "/api", {"prompts": "not a list"}, "prompts as a string"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": -3}, "negative tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 0}, "0 tokens without logprobs"),
    ("PUT", "/api", {"prompts": ["a"], "temperature": 0}, "temperature 0 (Megatron wants > 0)"),
    ("PUT", "/api", {"prompts": ["a"] * 129}, "129 prompts"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 10 ** 9}, "huge tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["a"], "surprise": True}, "unknown field"),
    ("PUT", "/api", {"prompts": ["a", "b"], "beam_width": 2}, "beam search over two prompts"),
    ("POST", "/detokenize", {"tokens": [-1]}, "negative token id"),
    ("POST", "/tokenize", {"text": "hi"}, "tokenize without prompt"),
    ("GET", "/v1/nothing", None, "unknown route"),
    ("DELETE", "/v1/completions", None, "wrong method"),
]


def run_fuzz(base_url: str, timeout: float = 60.0) -> list[dict]:
    """Send every case; after each, check /health.  Returns one record per
    case: description, status, whether it was a 4xx, whether still healthy."""
    results = []
    with httpx.Client(base_url=base_url, timeout=timeout) as c:
        for method, path, body, what in CASES:
            kw = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes)
                  else {"json": body} if body is not None else {})
            r = c.request(method, path, **kw)
            healthy = c.get("/health").status_code == 200
            results.append({"case": what, "route": f"{method} {path}", "status": r.status_code,
                            "ok": 400 <= r.status_code < 500, "healthy": healthy, "message": _message(r)})
    return results


def _message(r: httpx.Response) -> str:
    """The error text: OpenAI's {"error": {"message"}}, or Megatron's JSON string."""
    try:
        body = r.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return body if isinstance(body, str) else ""
