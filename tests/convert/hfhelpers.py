"""Helpers for the Hugging Face interop tests: a run directory whose every
parameter (biases and LayerNorms included) is non-trivial, and real text."""
from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def sotu_texts(n: int, start: int = 200, words: int = 100) -> list[str]:
    """``n`` pieces of ``words`` words of real text from the shipped corpus,
    from documents after the slice the test tokenizer was trained on."""
    out = []
    with gzip.open(ROOT / "data" / "sotu" / "sotu.jsonl.gz", "rt") as f:
        for line in itertools.islice(f, start, None):
            ws = json.loads(line)["text"].split()
            for k in range(0, len(ws) - words + 1, words):
                out.append(" ".join(ws[k:k + words]))
                if len(out) == n:
                    return out
    raise AssertionError(f"only {len(out)} pieces after line {start}")


def make_run(run_dir: Path, tokenizer_file: str, *, seq_len: int = 128, divisible: int = 100, seed: int = 3,
             noise: float = 0.05, activation: str = "gelu_tanh") -> Path:
    """A run directory (config.toml, tokenizer.json, a checkpoint written by the
    1-process Trainer, i.e. in the format `mtnlg train` writes) whose weights are the Megatron init plus noise, so zero
    biases and unit LayerNorm gains cannot hide a wrong mapping.  The padded
    table (divisible=100 -> 600 rows for 512 tokens) makes the export trim."""
    from mtnlg.config import Config, ModelConfig, dump_toml
    from mtnlg.convert.hf import save_initial_checkpoint
    from mtnlg.model.gpt import build_model
    cfg = Config(model=ModelConfig(n_layers=2, hidden=64, n_heads=4, ffn_hidden=160, seq_len=seq_len,
                                   vocab_size=512, make_vocab_divisible_by=divisible, layernorm_eps=1e-5,
                                   activation=activation))
    cfg.train.precision = "fp32"
    model = build_model(cfg.model, "cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    shutil.copyfile(tokenizer_file, run_dir / "tokenizer.json")
    save_initial_checkpoint(run_dir, cfg, model.state_dict(), step=7)
    return run_dir


def hf_gpt2(out: Path, tokenizer_dir: Path, **over):
    """A GPT2LMHeadModel built by `transformers` with a non-default shape (n_inner != 4h,
    3 heads, 96 positions) and noise on every parameter, saved by save_pretrained."""
    import transformers
    kw = dict(vocab_size=512, n_positions=96, n_embd=48, n_layer=2, n_head=3, n_inner=200,
              bos_token_id=0, eos_token_id=0)
    kw.update(over)
    torch.manual_seed(5)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    return model.eval()
