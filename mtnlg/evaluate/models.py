"""Load the model an evaluation scores: a trained run (optionally tensor
parallel over a tp mesh) or any Hugging Face causal LM directory."""
from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.errors import UserError
from mtnlg.evaluate.scoring import GPTAdapter, HFAdapter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_run_lm(run_dir: str, device: torch.device, checkpoint: str | None = None, dtype: str = "fp32",
                tp_mesh=None) -> GPTAdapter:
    """A run's model behind the scorer.  With a tp mesh of size > 1 the model
    is sharded by mtnlg.parallel.tensor (the training engine's plan); the
    vocabulary is zero-padded to a multiple of tp when needed and the padded
    logits are dropped before the softmax, so scores equal the plain model's."""
    from mtnlg.infer.load import load_run
    cfg, model, tok = load_run(run_dir, device, checkpoint, DTYPES[dtype])
    vocab = model.vocab_size
    tp = tp_mesh.size() if tp_mesh is not None else 1
    if tp > 1:
        from mtnlg.model.gpt import build_model
        from mtnlg.parallel.tensor import apply_tensor_parallel
        padded = -(-vocab // tp) * tp
        if padded != vocab:
            state = model.state_dict()
            emb = state["tok_emb.weight"]
            state["tok_emb.weight"] = torch.cat([emb, emb.new_zeros(padded - vocab, emb.shape[1])])
            state["lm_head.weight"] = state["tok_emb.weight"]
            model = build_model(cfg.model, device, vocab_size=padded)
            model.load_state_dict(state)
            model.to(DTYPES[dtype]).eval()
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=False)
    return GPTAdapter(model, tok, device, vocab_size=vocab)


def load_hf_lm(path: str, device: torch.device, dtype: str = "fp32", max_length: int | None = None) -> HFAdapter:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory (no hub access)."""
    if not Path(path).is_dir():
        raise UserError(f"--hf {path} is not a directory holding a Hugging Face model (config.json + weights)")
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--hf {path} has no config.json; save the model with `model.save_pretrained({path!r})`")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("--hf needs transformers; install it with `pip install 'mtnlg[hf]'`") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype])
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0]}") from None
    if not tok("The answer is", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer in {path} encodes text to no tokens (an empty vocabulary?)")
    model.to(device).eval()
    return HFAdapter(model, tok, device, max_length)
