"""`mtnlg serve` as a command (a run directory, in a subprocess) and the
--hf loader against transformers' own GPT-2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from mtnlg.config import Config, dump_toml
from mtnlg.serve.server import free_port
from servehelpers import TINY, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _make_run(run: Path) -> None:
    """A run directory as `mtnlg train` leaves it: config.toml, tokenizer.json, checkpoints/."""
    from mtnlg.convert.hf import save_initial_checkpoint
    tok = tiny_tokenizer()
    cfg, model = tiny_model(vocab_size=tok.vocab_size)
    full = Config()
    full.model = cfg
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(full))
    tok.save(str(run / "tokenizer.json"))
    save_initial_checkpoint(run, full, model.state_dict())


def test_serve_command_on_a_run_directory(tmp_path):
    run = tmp_path / "myrun"
    _make_run(run)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtnlg", "serve", "--run", str(run), "--port", str(port),
                             "--max-batch", "4", "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "myrun", "prompt": "We", "max_tokens": 4,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "myrun"
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "myrun ready on http://127.0.0.1" in out


@pytest.mark.parametrize("argv, message", [
    (["--run", "{tmp}/nope"], "is not a directory"),
    (["--run", "{tmp}", "--max-batch", "8", "--max-batch-tokens", "4"], "--max-batch-tokens (4) must be >= --max-batch (8)"),
    (["--run", "{tmp}", "--port", "0"], "--port must be in 1..65535"),
    (["--run", "{tmp}", "--threads", "1"], "is not a run directory (no config.toml)"),
])
def test_serve_command_errors_are_one_line(tmp_path, capsys, argv, message):
    from mtnlg.cli import main
    assert main(["serve"] + [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtnlg serve: error:") and message in err and err.count("\n") == 1


def test_hf_gpt2_directory_loads_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mtnlg.serve.hfload import load_hf
    tok = tiny_tokenizer()
    hf_cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    model, tok2, max_len = load_hf(tmp_path, torch.device("cpu"), torch.float32)
    ids = torch.tensor([tok.encode("The state of the Union is strong")])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert max_len == 64 and tok2.vocab_size == tok.vocab_size
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def _wait_healthy(url: str, proc, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("server never became healthy")


@pytest.mark.slow
def test_torchrun_tensor_parallel_serve_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m mtnlg serve` (gloo, tp=2): the HTTP
    answers equal the single-process server's greedy completions."""
    run = tmp_path / "tprun"
    _make_run(run)
    body = {"prompt": ["The state of the Union is", "We must"], "max_tokens": 16, "temperature": 0,
            "logprobs": 1}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    answers = []
    for launcher in ([sys.executable, "-m", "mtnlg"],
                     [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "--master-port", str(free_port()), "-m", "mtnlg"]):
        port = free_port()
        proc = subprocess.Popen(launcher + ["serve", "--run-dir", str(run), "--port", str(port), "--device", "cpu",
                                            "--log-level", "warning"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120).json()
            answers.append(r["choices"])
        finally:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=120)[0]
        assert "ready on" in out and "mtnlg serve: stopped" in out, out
    assert "(tp=2," in out
    one, tp2 = answers
    assert [c["text"] for c in one] == [c["text"] for c in tp2]
    for a, b in zip(one, tp2):
        assert b["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)


def test_chat_template_sources(tmp_path):
    from mtnlg.serve.text import DEFAULT_CHAT_TEMPLATE, ChatTemplate, find_chat_template
    assert find_chat_template(None, tmp_path) == (DEFAULT_CHAT_TEMPLATE, "default")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0].content }}!"}')
    src, where = find_chat_template(None, tmp_path)
    assert ChatTemplate(src).render([{"role": "user", "content": "hi"}]) == "hi!" and where.endswith("config.json")
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_chat_template(None, tmp_path)[0] == "J"
    finetune = pytest.importorskip("mtnlg.finetune.template")  # the fine-tuning helper's template, when present
    template = finetune.ChatTemplate()
    template.save(tmp_path)
    chat, where = find_chat_template(None, tmp_path)
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "Hello there"}]
    assert where.endswith("chat_template.json")
    assert chat.prompt_ids(tok, msgs) == template.encode(tok, msgs, add_generation_prompt=True)[0]
