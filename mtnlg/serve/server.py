"""Assemble a server from a loaded model, and run it (blocking, or in a
background thread for tests and benchmarks)."""
from __future__ import annotations

import socket
import threading
import time

import torch

from mtnlg.serve.app import ServerState, create_app
from mtnlg.serve.engine import Engine, EngineConfig
from mtnlg.serve.metrics import Metrics
from mtnlg.serve.runner import ModelRunner
from mtnlg.serve.text import ChatTemplate, DEFAULT_CHAT_TEMPLATE


def attach_model(state: ServerState, model: torch.nn.Module, tokenizer, max_len: int, device: torch.device,
                 config: EngineConfig, chat_template: str | object = DEFAULT_CHAT_TEMPLATE,
                 gather_logits=lambda x: x, group=None) -> Engine:
    """Start an engine over ``model`` and make ``state`` ready (/health turns 200)."""
    runner = ModelRunner(model, config.max_batch, max_len, device, gather_logits, group)
    vocab = min(tokenizer.vocab_size, getattr(model, "vocab_size", tokenizer.vocab_size))
    engine = Engine(runner, max_len, vocab, config, state.metrics).start()
    eos = tokenizer.hf.id_to_token(tokenizer.eod_id) or ""
    state.tokenizer, state.max_len = tokenizer, max_len
    state.max_token_chars = max(len(t) for t in tokenizer.hf.get_vocab(with_added_tokens=True))
    state.chat = (ChatTemplate(chat_template, bos_token=eos, eos_token=eos) if isinstance(chat_template, str)
                  else chat_template)  # e.g. text.FinetuneChat
    state.engine = engine
    return engine


def new_state(model_name: str, config: EngineConfig, max_body_bytes: int = 16 << 20) -> ServerState:
    return ServerState(model_name=model_name, metrics=Metrics(config.max_batch), max_body_bytes=max_body_bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``state`` on 127.0.0.1 in a daemon thread."""

    def __init__(self, state: ServerState, port: int | None = None, log_level: str = "warning"):
        import uvicorn
        self.state, self.port = state, port or free_port()
        self.app = create_app(state)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                   log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="mtnlg-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.state.engine is not None:
            self.state.engine.stop()
