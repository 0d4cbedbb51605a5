"""Python API: load a model and use it in three lines.

    import mtnlg
    lm = mtnlg.from_pretrained("runs/tiny")            # a run directory or a HF GPT-2 directory
    lm.generate("The state of the Union is", max_new_tokens=20)
    lm.score(["The economy grew.", "Grew economy the."])  # log-likelihoods

Argument names follow Hugging Face ``generate``.  Prompts of different lengths
are decoded together, left-padded (the model hides the pads and starts each
row's positions at its first real token).  Logits are restricted to the
tokenizer's real vocabulary: rows of the padded embedding table beyond it are
never sampled nor counted, which is also what the exported HF model computes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mtnlg.errors import UserError


def from_pretrained(path: str | Path, *, device: str = "auto", dtype: str | torch.dtype = "fp32",
                    checkpoint: str | Path | None = None) -> "LanguageModel":
    """Load a run directory (``config.toml``, latest or given checkpoint) or a
    Hugging Face GPT-2 directory (``config.json``)."""
    from mtnlg.convert.hf import DTYPES, load_hf_gpt2
    from mtnlg.infer.load import load_run
    from mtnlg.parallel.mesh import pick_device
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dev = pick_device(device, 0)
    path = Path(path)
    if (path / "config.toml").is_file():
        _, model, tok = load_run(path, dev, checkpoint, dtype)
    elif (path / "config.json").is_file():
        _, model, tok = load_hf_gpt2(path, dev, dtype)
    else:
        raise UserError(f"{path} is neither a run directory (config.toml) nor a Hugging Face model (config.json)")
    lm = LanguageModel(model, tok, dev)
    from mtnlg.finetune.template import load_chat_template
    lm.chat_template = load_chat_template(path)  # written by `mtnlg finetune`; None otherwise
    return lm


class LanguageModel:
    """A loaded model with its tokenizer: ``generate`` and ``score``."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.context_length: int = model.cfg.seq_len
        self.vocab_size: int = tokenizer.vocab_size  # the real vocabulary (the table may be padded)
        self.chat_template = None  # a mtnlg.finetune.template.ChatTemplate, for ``chat``

    def __repr__(self) -> str:
        c = self.model.cfg
        return (f"LanguageModel({c.n_layers} layers, hidden {c.hidden}, vocab {self.vocab_size}, "
                f"context {self.context_length}, {c.activation}, {next(self.model.parameters()).dtype}, "
                f"{self.device})")

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :self.vocab_size]

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, num_beams: int = 1,
                 num_return_sequences: int = 1, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, batch_size: int = 16):
        """Continue each prompt; returns the new text only (without the prompt).

        One prompt gives a string (a list of ``num_return_sequences`` strings if
        that is > 1); a list of prompts gives a list of those.  Greedy unless
        ``do_sample``; ``num_beams > 1`` is beam search (deterministic).
        Generation ends at the end-of-document token, after ``max_new_tokens``,
        or at the first of the ``stop`` strings (cut from the returned text)."""
        single = isinstance(prompts, str)
        plist = [prompts] if single else list(prompts)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._check_generate_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                                  num_return_sequences, stops)
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()  # fresh entropy, leaving torch's global RNG alone
        else:
            gen.manual_seed(seed)
        encoded = [self.tokenizer.encode(p) or [self.tokenizer.eod_id] for p in plist]
        if num_beams > 1:
            outs = [self._beam(ids, max_new_tokens, num_beams, num_return_sequences) for ids in encoded]
        else:
            rows = [ids for ids in encoded for _ in range(num_return_sequences)]
            flat = []
            for i in range(0, len(rows), batch_size):
                flat += self._decode_batch(rows[i:i + batch_size], max_new_tokens, do_sample, temperature,
                                           top_k, top_p, gen, stops)
            outs = [flat[i:i + num_return_sequences] for i in range(0, len(flat), num_return_sequences)]
        texts = [[self._finish(ids, stops) for ids in group] for group in outs]
        texts = [g[0] if num_return_sequences == 1 else g for g in texts]
        return texts[0] if single else texts

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]], max_new_tokens: int = 64, **kwargs):
        """The assistant's reply to a conversation ``[{"role", "content"}, ...]``
        (or a list of conversations), rendered with the chat template the
        model was fine-tuned with; keyword arguments as for ``generate``."""
        from mtnlg.finetune.template import check_messages
        if self.chat_template is None:
            raise UserError("this model has no chat template (chat_template.json); fine-tune it with `mtnlg finetune`")
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        for conv in conversations:
            problem = check_messages(list(conv))
            if problem:
                raise UserError(problem)
        prompts = [self.chat_template.text(list(c), add_generation_prompt=True) for c in conversations]
        out = self.generate(prompts, max_new_tokens, **kwargs)
        return out[0] if single else out

    def _check_generate_args(self, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, n, stops):
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_beams < 1 or n < 1:
            raise UserError("num_beams and num_return_sequences must be >= 1")
        if num_beams > 1 and do_sample:
            raise UserError("beam search with sampling is not supported: use num_beams > 1 or do_sample=True")
        if num_beams > 1 and n > num_beams:
            raise UserError(f"num_return_sequences={n} exceeds num_beams={num_beams}")
        if num_beams == 1 and not do_sample and n > 1:
            raise UserError("greedy decoding gives one sequence: set do_sample=True or num_beams >= "
                            "num_return_sequences")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise UserError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if any(not s for s in stops):
            raise UserError("stop strings must be non-empty")

    def _decode_batch(self, rows, max_new_tokens, do_sample, temperature, top_k, top_p, gen, stops):
        from mtnlg.infer.generate import generate
        eod = self.tokenizer.eod_id
        width = max(len(r) for r in rows)
        x = torch.tensor([[eod] * (width - len(r)) + r for r in rows], device=self.device)
        pad = torch.tensor([width - len(r) for r in rows], device=self.device)
        stop_fn = None
        if stops:
            def stop_fn(tokens):
                new = tokens[:, width:].tolist()
                return torch.tensor([any(s in self.tokenizer.decode(t) for s in stops) for t in new],
                                    device=self.device)
        out = generate(self.model, x, max_new_tokens, greedy=not do_sample, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_id=eod, generator=gen, gather_logits=self._logits,
                       pad=pad if bool(pad.any()) else None, stop_fn=stop_fn)
        return [r[width:] for r in out.tolist()]

    def _beam(self, ids, max_new_tokens, num_beams, n):
        from mtnlg.infer.generate import beam_candidates
        x = torch.tensor([ids], device=self.device)
        found = beam_candidates(self.model, x, max_new_tokens, num_beams, self.tokenizer.eod_id,
                                gather_logits=self._logits)
        return [seq[len(ids):].tolist() for seq, _ in found[:n]]

    def _finish(self, ids: list[int], stops: list[str]) -> str:
        eod = self.tokenizer.eod_id
        if eod in ids:
            ids = ids[:ids.index(eod)]
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        return text[:cut]

    # ------------------------------------------------------------------ score
    @torch.no_grad()
    def score(self, texts: str | Sequence[str], contexts: str | Sequence[str] | None = None,
              batch_size: int = 16):
        """Log-likelihood (natural log, summed over tokens) of each text.

        Without ``contexts`` every token of the text is scored after an
        end-of-document token (as lm-eval's rolling log-likelihood); with them,
        ``log p(text | context)``.  Texts longer than the context window are
        scored in consecutive windows of ``context_length`` predictions, the
        last one given as much earlier text as fits (the windows of lm-eval's
        ``loglikelihood_rolling``); a context is cut from the left to fit."""
        single = isinstance(texts, str)
        tlist = [texts] if single else list(texts)
        if contexts is None:
            clist = [""] * len(tlist)
        else:
            clist = [contexts] if isinstance(contexts, str) else list(contexts)
            if len(clist) != len(tlist):
                raise UserError(f"score got {len(tlist)} texts but {len(clist)} contexts")
        windows = []  # (request index, input ids, first scored input position, target ids)
        for i, (ctx, text) in enumerate(zip(clist, tlist)):
            full = [self.tokenizer.eod_id] + self.tokenizer.encode(ctx)
            first = len(full)
            full += self.tokenizer.encode(text)
            windows += self._windows(i, full, first)
        totals = [0.0] * len(tlist)
        windows.sort(key=lambda w: -len(w[1]))  # similar lengths batch together
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            width = max(len(w[1]) for w in chunk)
            x = torch.tensor([w[1] + [0] * (width - len(w[1])) for w in chunk], device=self.device)
            logp = self._logits(self.model(x)).float().log_softmax(-1)  # right padding: causal, no mask needed
            for row, (i, ids, start, targets) in enumerate(chunk):
                pos = torch.arange(start, start + len(targets), device=self.device)
                tgt = torch.tensor(targets, device=self.device)
                totals[i] += logp[row, pos - 1, tgt].sum().item()
        return totals[0] if single else totals

    def _windows(self, i: int, full: list[int], first: int) -> list:
        """Split the prediction of full[first:] into model-sized windows."""
        L = self.context_length
        out = []
        for a in range(first, len(full), L):
            b = min(len(full), a + L)
            s = max(0, b - 1 - L)  # inputs full[s:b-1] predict full[s+1:b]
            out.append((i, full[s:b - 1], a - s, full[a:b]))
        return out
