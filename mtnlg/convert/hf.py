"""Hugging Face GPT-2 interop: one mapping table, used both ways.

    export_run(run_dir, out_dir)   our checkpoint  -> HF GPT-2 directory
    import_hf(hf_dir, run_dir)     HF GPT-2 directory -> our run directory
    load_hf_gpt2(hf_dir)           HF GPT-2 directory -> (cfg, model, tokenizer) in memory

Our GPT *is* GPT-2's architecture (pre-LayerNorm blocks, learned positions,
GELU MLP, tied embeddings, biases everywhere), so the conversion is a
renaming plus three layout changes, all exact (no arithmetic on values):

* ``Conv1D``: HF stores every projection as [in, out]; ours are ``nn.Linear``
  [out, in], so each projection weight is transposed;
* fused QKV: ours is per head ``[q_h | k_h | v_h]`` (Megatron's layout, so
  tensor-parallel ranks own whole heads); GPT-2 splits its output ``[Q | K | V]``
  with heads inside each.  Rows are permuted with ``view(H, 3, D, ...)``
  ``.transpose(0, 1)`` (and back on import);
* vocabulary: our embedding is padded to a multiple of
  ``make_vocab_divisible_by`` (Megatron's habit); the export keeps only the
  tokenizer's real rows (padding rows are never a target, and HF's config
  should agree with its tokenizer).  Imports keep the table as it is
  (``make_vocab_divisible_by = 1``), so import -> export is bitwise.

``lm_head.weight`` is the tied ``tok_emb.weight`` and is not written (HF GPT-2
ties ``lm_head`` to ``wte``).  The activation (``model.activation``) is
written as the very call our MLP makes: ``gelu_pytorch_tanh`` for gelu_tanh
(``F.gelu(approximate="tanh")``; ``gelu_new`` and ``gelu_fast`` are the same
function written out in Python and differ only in rounding) and ``gelu`` for
gelu (HF's ``ACT2FN["gelu"]`` is ``F.gelu``, the exact erf form;
``gelu_python`` writes it out with ``torch.erf``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError

# our block-relative name -> (HF block-relative name, layout change)
_BLOCK = {
    "ln_1.weight": ("ln_1.weight", None), "ln_1.bias": ("ln_1.bias", None),
    "attn.qkv.weight": ("attn.c_attn.weight", "qkv"), "attn.qkv.bias": ("attn.c_attn.bias", "qkv"),
    "attn.proj.weight": ("attn.c_proj.weight", "t"), "attn.proj.bias": ("attn.c_proj.bias", None),
    "ln_2.weight": ("ln_2.weight", None), "ln_2.bias": ("ln_2.bias", None),
    "mlp.fc.weight": ("mlp.c_fc.weight", "t"), "mlp.fc.bias": ("mlp.c_fc.bias", None),
    "mlp.proj.weight": ("mlp.c_proj.weight", "t"), "mlp.proj.bias": ("mlp.c_proj.bias", None),
}
_GLOBAL = {
    "tok_emb.weight": ("transformer.wte.weight", "vocab"), "pos_emb.weight": ("transformer.wpe.weight", None),
    "ln_f.weight": ("transformer.ln_f.weight", None), "ln_f.bias": ("transformer.ln_f.bias", None),
}
_BLOCK_BACK = {hf: (ours, how) for ours, (hf, how) in _BLOCK.items()}
_GLOBAL_BACK = {hf: (ours, how) for ours, (hf, how) in _GLOBAL.items()}
# HF keys that carry nothing we need: the tied head and old causal-mask buffers
_HF_IGNORED = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # one function, different roundings
ERF_GELUS = ("gelu", "gelu_python")                            # likewise, the exact erf GeLU
# model.activation -> HF activation_function written on export
HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _qkv_to_hf(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[3C(, C)] per-head [q|k|v] rows -> [Q|K|V] rows, then Conv1D's [in, out]."""
    rows = t.shape[0]
    out = t.reshape(n_heads, 3, rows // (3 * n_heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return out.t().contiguous() if t.ndim == 2 else out.contiguous()


def _qkv_from_hf(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    t = t.t() if t.ndim == 2 else t
    rows = t.shape[0]
    return t.reshape(3, n_heads, rows // (3 * n_heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def to_hf(name: str, t: torch.Tensor, n_heads: int, vocab: int) -> tuple[str, torch.Tensor] | None:
    """Our parameter -> (HF key, tensor in HF layout); None for the tied head."""
    if name == "lm_head.weight":
        return None
    if name in _GLOBAL:
        key, how = _GLOBAL[name]
    elif name.startswith("blocks.") and name.split(".", 2)[2] in _BLOCK:
        _, layer, rest = name.split(".", 2)
        key, how = _BLOCK[rest]
        key = f"transformer.h.{layer}.{key}"
    else:
        raise UserError(f"checkpoint tensor {name!r} has no GPT-2 counterpart")
    if how == "qkv":
        t = _qkv_to_hf(t, n_heads)
    elif how == "t":
        t = t.t().contiguous()
    elif how == "vocab":
        t = t[:vocab].contiguous()
    return key, t


def from_hf(key: str, t: torch.Tensor, n_heads: int) -> tuple[str, torch.Tensor] | None:
    """HF GPT-2 key (with or without the ``transformer.`` prefix) -> ours; None if ignored."""
    if key.endswith(_HF_IGNORED):
        return None
    full = key if key.startswith("transformer.") else "transformer." + key
    if full in _GLOBAL_BACK:
        name, how = _GLOBAL_BACK[full]
    else:
        parts = full.split(".", 3)  # transformer, h, i, rest
        if len(parts) != 4 or parts[1] != "h" or parts[3] not in _BLOCK_BACK:
            raise UserError(f"unexpected tensor {key!r} in the GPT-2 checkpoint")
        rest, how = _BLOCK_BACK[parts[3]]
        name = f"blocks.{parts[2]}.{rest}"
    if how == "qkv":
        t = _qkv_from_hf(t, n_heads)
    elif how == "t":
        t = t.t().contiguous()
    return name, t


# ----------------------------------------------------------------------------- configs

def hf_config(m: ModelConfig, vocab: int, eod_id: int, dtype: str) -> dict:
    """config.json of a GPT2LMHeadModel equal to our model with a ``vocab``-row table."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": m.seq_len, "n_embd": m.hidden, "n_layer": m.n_layers,
        "n_head": m.n_heads, "n_inner": m.ffn, "activation_function": HF_ACTIVATION[m.activation],
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "layer_norm_epsilon": m.layernorm_eps, "initializer_range": m.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eod_id, "eos_token_id": eod_id, "dtype": dtype,
    }


def model_config_from_hf(c: dict, where: str) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json; anything we cannot reproduce exactly is refused."""
    arch = (c.get("architectures") or ["?"])[0]
    if c.get("model_type") != "gpt2":
        raise UserError(f"{where} holds a {c.get('model_type')!r} model ({arch}); mtnlg imports only the GPT-2 "
                        f"architecture (model_type 'gpt2', e.g. gpt2, distilgpt2, gpt2-xl)")
    act = c.get("activation_function", "gelu_new")
    gelus = TANH_GELUS + ERF_GELUS
    refuse = {
        f"activation_function {act!r} (ours are the tanh GELU: {', '.join(TANH_GELUS)}; and the erf GELU: "
        f"{', '.join(ERF_GELUS)})": act not in gelus,
        "scale_attn_weights=false": c.get("scale_attn_weights", True) is False,
        "scale_attn_by_inverse_layer_idx=true": bool(c.get("scale_attn_by_inverse_layer_idx")),
        "add_cross_attention=true": bool(c.get("add_cross_attention")),
    }
    bad = [k for k, v in refuse.items() if v]
    if bad:
        raise UserError(f"{where}: GPT-2 variant with {', '.join(bad)} cannot be represented exactly by mtnlg's model")
    hidden, heads = int(c.get("n_embd", 768)), int(c.get("n_head", 12))
    if hidden % heads:
        raise UserError(f"{where}: n_head={heads} does not divide n_embd={hidden}")
    return ModelConfig(
        n_layers=int(c.get("n_layer", 12)), hidden=hidden, n_heads=heads,
        ffn_hidden=int(c.get("n_inner") or 4 * hidden), seq_len=int(c.get("n_positions", 1024)),
        vocab_size=int(c.get("vocab_size", 50257)), make_vocab_divisible_by=1,
        dropout=float(c.get("resid_pdrop", 0.1)), init_std=float(c.get("initializer_range", 0.02)),
        layernorm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        activation="gelu_tanh" if act in TANH_GELUS else "gelu")


def read_hf_config(hf_dir: Path) -> dict:
    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON: {e}") from None


def iter_hf_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time from model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors import safe_open
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (hf_dir / "pytorch_model.bin").is_file():
        state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        return
    else:
        raise UserError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot read {file}: {e}") from None


def load_hf_state(hf_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (lm_head tied) from an HF GPT-2 directory, every tensor checked."""
    from mtnlg.model.gpt import build_model
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
    state, head = {}, None
    for key, t in iter_hf_tensors(hf_dir):
        if key == "lm_head.weight":
            head = t
        mapped = from_hf(key, t, cfg.n_heads)
        if mapped is None:
            continue
        name, t = mapped
        if name not in shapes:
            raise UserError(f"{hf_dir}: tensor {key!r} does not fit a {cfg.n_layers}-layer model")
        if tuple(t.shape) != shapes[name]:
            raise UserError(f"{hf_dir}: {key} has shape {tuple(t.shape)}, config.json implies {shapes[name]}")
        state[name] = t
    missing = sorted(set(shapes) - set(state) - {"lm_head.weight"})
    if missing:
        raise UserError(f"{hf_dir}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    if head is not None and not torch.equal(head, state["tok_emb.weight"]):
        raise UserError(f"{hf_dir}: lm_head.weight differs from transformer.wte.weight (untied output "
                        f"embedding); mtnlg's model ties them and cannot represent this checkpoint exactly")
    state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def load_hf_tokenizer(hf_dir: Path):
    from mtnlg.data.tokenizer import load_tokenizer
    hf_dir = Path(hf_dir)
    if not any((hf_dir / n).is_file() for n in ("tokenizer.json", "vocab.json", "encoder.json")):
        raise UserError(f"{hf_dir} has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                        f"copy the model's tokenizer files there")
    return load_tokenizer(str(hf_dir))


def load_hf_gpt2(hf_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(Config, GPT in eval mode, Tokenizer) from a Hugging Face GPT-2 directory,
    like ``mtnlg.infer.load.load_run`` for a run directory.  ``cfg.model``
    describes the checkpoint (the table keeps exactly the HF rows:
    ``make_vocab_divisible_by = 1``); the other sections are defaults."""
    from mtnlg.config import Config
    from mtnlg.model.gpt import build_model
    hf_dir = Path(hf_dir)
    cfg = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir))
    tok = load_hf_tokenizer(hf_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    state = load_hf_state(hf_dir, cfg)
    model = build_model(cfg, "meta")
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.tok_emb.weight
    return Config(model=cfg), model.to(device=device, dtype=dtype).eval(), tok


# ----------------------------------------------------------------------------- export / import

def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    from mtnlg.train.checkpoint import latest_checkpoint, step_dir, verify_checkpoint
    root = Path(run_dir) / "checkpoints"
    if step is None:
        path = latest_checkpoint(root)
        if path is None:
            raise UserError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
        return path
    path = step_dir(root, step)
    if not path.is_dir():
        have = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())
        raise UserError(f"{run_dir} has no checkpoint for step {step} (available: {have or 'none'})")
    verify_checkpoint(path)  # an explicit choice is checked, never silently replaced
    return path


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "fp32",
               max_shard_size: str | int = "5GB") -> dict:
    """Write a Hugging Face GPT-2 directory for a run's checkpoint; returns a summary."""
    from mtnlg.config import load_config
    from mtnlg.convert.hf_files import parse_size, staged_dir, write_json, write_safetensors, write_tokenizer_files
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.train.checkpoint import iter_model_tensors
    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = load_config(run_dir / "config.toml").model
    if not (run_dir / "tokenizer.json").is_file():
        raise UserError(f"{run_dir / 'tokenizer.json'} is missing; copy the tokenizer the run was trained with there")
    tok = load_tokenizer(str(run_dir / "tokenizer.json"))
    path = find_checkpoint(run_dir, step)
    limit, seen = parse_size(max_shard_size), {}

    def tensors():
        for name, t in iter_model_tensors(path):  # one full tensor at a time, whatever the sharding
            if name == "tok_emb.weight":
                seen["padded"] = t.shape[0]
                if t.shape[0] < tok.vocab_size:
                    raise UserError(f"{path}: embedding has {t.shape[0]} rows, fewer than the tokenizer's "
                                    f"{tok.vocab_size} tokens")
            mapped = to_hf(name, t, cfg.n_heads, tok.vocab_size)
            if mapped is not None:
                seen[mapped[0]] = True
                yield mapped[0], mapped[1].to(DTYPES[dtype]).contiguous()

    with staged_dir(Path(out_dir)) as tmp:
        files = write_safetensors(tmp, tensors(), limit)
        expected = 4 + 12 * cfg.n_layers
        if len(seen) - 1 != expected:
            raise UserError(f"{path}: found {len(seen) - 1} of the {expected} GPT-2 tensors; the checkpoint is incomplete")
        write_json(tmp / "config.json", hf_config(cfg, tok.vocab_size, tok.eod_id, {"fp32": "float32",
                   "bf16": "bfloat16", "fp16": "float16"}[dtype]))
        write_json(tmp / "generation_config.json", {"bos_token_id": tok.eod_id, "eos_token_id": tok.eod_id,
                                                    "pad_token_id": tok.eod_id})
        write_tokenizer_files(tok, tmp, cfg.seq_len)
    return {"checkpoint": str(path), "out": str(out_dir), "vocab": tok.vocab_size, "padded_vocab": seen["padded"],
            "dtype": dtype, "activation_function": HF_ACTIVATION[cfg.activation], **files}


def save_initial_checkpoint(run_dir: Path, cfg, state: dict[str, torch.Tensor], step: int = 0) -> Path:
    """Write ``state`` as checkpoint ``step`` of ``run_dir`` through the 1-process
    Trainer, so the files are exactly what ``mtnlg train`` writes and resumes
    (whatever the checkpoint format); the optimizer state starts empty."""
    from mtnlg.model.gpt import build_model
    from mtnlg.train.trainer import Trainer
    model = build_model(cfg.model, "meta", vocab_size=state["tok_emb.weight"].shape[0])
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.tok_emb.weight
    trainer = Trainer(cfg, model, None, None, run_dir, torch.device("cpu"))
    trainer.step = step
    return trainer.save()


def import_hf(hf_dir: str | Path, run_dir: str | Path, config: str | None = None,
              overrides: list[str] | None = None) -> dict:
    """Make a run directory (config.toml, tokenizer.json, a step-0 checkpoint)
    from an HF GPT-2 directory.  ``config``/``overrides`` set the non-model
    sections (data, optim, train ...) for continued pretraining.

    The table keeps the HF rows (``make_vocab_divisible_by = 1``) unless the
    overrides ask for Megatron padding (``model.make_vocab_divisible_by``,
    ``parallel.tp``: the table must split evenly over tp ranks).  Padding rows
    are the mean embedding: each then scores a token the average logit, so the
    padding holds at most (rows added)/V of the probability (Jensen), ~0.1% for
    GPT-2 at tp=2; export trims them again."""
    import dataclasses

    from mtnlg.config import Config, apply_overrides, dump_toml, load_config
    from mtnlg.convert.hf_files import staged_dir
    hf_dir = Path(hf_dir)
    mcfg = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir))
    tok = load_hf_tokenizer(hf_dir)
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens but the model only {mcfg.vocab_size}")
    cfg = load_config(config) if config else Config()
    cfg.model = dataclasses.replace(mcfg)
    apply_overrides(cfg, overrides or [])
    fixed = ("n_layers", "hidden", "n_heads", "ffn", "seq_len", "vocab_size", "activation")
    changed = [k for k in fixed if getattr(cfg.model, k) != getattr(mcfg, k)]
    if changed:
        raise UserError(f"{', '.join(f'model.{k}' for k in changed)} cannot differ from the imported checkpoint's "
                        f"shape and activation")
    cfg.validate()
    state = load_hf_state(hf_dir, mcfg)
    rows = cfg.model.padded_vocab(cfg.parallel.tp)
    if rows > mcfg.vocab_size:  # Megatron padding asked for: mean-embedding rows (see above)
        emb = state["tok_emb.weight"]
        extra = emb.mean(0, keepdim=True).expand(rows - emb.shape[0], -1)
        state["tok_emb.weight"] = state["lm_head.weight"] = torch.cat([emb, extra]).contiguous()
    cfg.data.tokenizer = ""  # the run keeps its own tokenizer.json
    with staged_dir(Path(run_dir)) as tmp:
        (tmp / "config.toml").write_text(dump_toml(cfg))
        tok.save(str(tmp / "tokenizer.json"))
        save_initial_checkpoint(tmp, cfg, state)
    n = sum(t.numel() for k, t in state.items() if k != "lm_head.weight") - (rows - mcfg.vocab_size) * mcfg.hidden
    return {"run": str(run_dir), "params": n, "vocab": mcfg.vocab_size, "rows": rows, "n_layers": mcfg.n_layers,
            "hidden": mcfg.hidden, "seq_len": mcfg.seq_len, "activation": mcfg.activation}
