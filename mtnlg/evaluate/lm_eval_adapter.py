"""lm-evaluation-harness adapter: a registered ``mtnlg`` model class.

    import mtnlg.evaluate.lm_eval_adapter            # registers model "mtnlg"
    lm_eval.simple_evaluate(model="mtnlg", model_args="run=runs/tiny", tasks=["lambada_openai_local"],
                            task_manager=TaskManager(include_path=write_task_yamls(DIR)))

or from the shell (lm-eval 0.4 has no plugin discovery, so ``mtnlg lm-eval``
is lm-eval's own command line with this model registered and the offline task
YAMLs on its include path):

    mtnlg lm-eval --model mtnlg --model_args run=runs/tiny --tasks lambada_openai_local,piqa_local --limit 100

Model arguments: ``run=DIR`` (a trained run) or ``hf=DIR`` (a Hugging Face
causal LM), ``checkpoint=``, ``dtype=fp32|bf16|fp16``, ``device=cpu|cuda``,
``batch_size=``.  Scoring is our scorer (mtnlg/evaluate/scoring.py);
``generate_until`` decodes greedily.  Under ``torchrun`` the class joins the
process group, lm-eval gives each rank its share of the requests and gathers
the results through ``all_gather``/``gather_object`` below.
"""
from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mtnlg.evaluate.scoring import rolling_pairs, score_text_pairs, score_tokens


@register_model("mtnlg")
class MtnlgLM(LM):
    def __init__(self, run: str | None = None, hf: str | None = None, checkpoint: str | None = None,
                 dtype: str = "fp32", device: str | None = None, batch_size: int | str = 16,
                 max_gen_toks: int = 256, **_ignored):
        super().__init__()
        from mtnlg.errors import UserError
        if bool(run) == bool(hf):
            raise UserError("model_args needs exactly one of run=DIR or hf=DIR")
        from mtnlg.parallel.mesh import init_distributed
        self._rank, self._world_size, dev = init_distributed("auto", device=device or "auto")
        if run:
            from mtnlg.evaluate.models import load_run_lm
            self.lm = load_run_lm(run, dev, checkpoint, dtype)
        else:
            from mtnlg.evaluate.models import load_hf_lm
            self.lm = load_hf_lm(hf, dev, dtype)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "MtnlgLM":
        """model_args win over lm-eval's own options (``--device``, ``--batch_size``)."""
        merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
        merged.update(arg_dict)
        return cls(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MtnlgLM":
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return self.lm.device

    # collectives lm-eval's evaluator calls when world_size > 1 (torchrun: one process group, gloo or nccl)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        import torch.distributed as dist
        flat = tensor.reshape(-1)
        parts = [torch.empty_like(flat) for _ in range(self._world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return score_text_pairs(self.lm, [tuple(r.args[:2]) for r in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            out.append(sum(ll for ll, _ in score_tokens(self.lm, rolling_pairs(self.lm, r.args[0]), self.batch_size)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [greedy_until(self.lm, ctx, kw or {}, self.max_gen_toks) for ctx, kw in (r.args for r in requests)]


def greedy_until(lm, context: str, gen_kwargs: dict, default_max: int = 256) -> str:
    """Greedy decoding until a stop string, the end-of-text token or
    ``max_gen_toks``; the context is left-truncated to leave room."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.get("max_gen_toks", default_max))
    tokens = lm.encode(context) or [lm.eot_id]
    new: list[int] = []
    for _ in range(max_new):
        window = (tokens + new)[-lm.max_length:]
        logits = lm.logits(torch.tensor([window], device=lm.device))
        nxt = int(logits[0, -1].argmax())
        if nxt == lm.eot_id:
            break
        new.append(nxt)
        text = _decode(lm, new)
        if any(s in text for s in until):
            break
    text = _decode(lm, new)
    for s in until:
        text = text.split(s)[0]
    return text


def _decode(lm, ids: list[int]) -> str:
    return lm.tok.decode(ids)
