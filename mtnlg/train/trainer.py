"""The training loop.  It only orchestrates: the ``train`` command hands it a
built (possibly parallelized) model, datasets, a ``Topology`` and the
config; it runs micro-batches with gradient accumulation, precision policy,
clipping, the LR schedule and batch ramp-up, validation, logging and
checkpoints.

Data order is a pure function of ``consumed_samples``: the global batch of a
step is samples ``[consumed, consumed + global_batch)`` of the (already
shuffled, blended) training dataset, and data-parallel rank r takes the r-th
contiguous slice of it.  Resuming therefore needs only the step and the
sample count, and replays nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ModelConfig, to_dict
from mtnlg.errors import UserError
from mtnlg.model.flops import flops_per_token
from mtnlg.config import gelu_approximation
from mtnlg.model import bias_gelu, regions
from mtnlg.perf.alloc import keep_freed_memory
from mtnlg.train import checkpoint as ckpt
from mtnlg.train.loss import IGNORE_INDEX, cross_entropy_fp32  # noqa: F401 (IGNORE_INDEX: re-exported)
from mtnlg.train.metrics import MetricsLogger
from mtnlg.train.precision import MasterWeights, autocast, param_dtype
from mtnlg.train.schedule import global_batch_at, lr_at
from mtnlg.parallel.topology import Topology
from mtnlg.train.signals import StopRequest


def config_digest(cfg: Config) -> str:
    d = to_dict(cfg)
    d.pop("logging")
    d.pop("parallel")  # checkpoints are resharded on load: a run may resume under another layout...
    d["padded_vocab"] = cfg.model.padded_vocab(cfg.parallel.tp)  # ...with the same table size
    d["train"] = {k: v for k, v in d["train"].items()
                  if k not in ("steps", "eval_interval", "save_interval", "save_interval_minutes", "keep_checkpoints",
                               "threads", "compile", "compiled_regions", "async_save", "deterministic")}
    if d.get("finetune") == to_dict(Config())["finetune"]:
        d.pop("finetune")  # pretraining runs keep the digest they had before fine-tuning existed
    if d["model"]["activation"] == ModelConfig().activation:
        d["model"].pop("activation")  # runs keep the digest they had before model.activation existed
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; exempt biases and LayerNorm gains."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_implementation(params: list[torch.Tensor]) -> dict:
    """AdamW's kernel choice: the fused one (one pass over each parameter and
    its moments; 6x faster than foreach on the 2-core CPU, equal to foreach
    within 1 ulp, see tests/train/test_loss.py) for plain tensors, the
    per-parameter loop for DTensors (tensor-parallel or ZeRO shards), which
    the fused and foreach kernels do not take on every device."""
    if any(isinstance(p, DTensor) for p in params):
        return {"foreach": False}
    return {"fused": True}


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, train_data, valid_data, run_dir: Path,
                 device: torch.device, topo: Topology | None = None, peak_tflops: float = 0.0):
        self.cfg, self.model, self.device = cfg, model, device
        self.train_data, self.valid_data = train_data, valid_data
        self.run_dir = Path(run_dir)
        self.topo = topo or Topology()
        self.precision = cfg.train.precision
        self.peak_tflops = peak_tflops
        self.params = [p for p in model.parameters() if p.requires_grad]
        regions.set_enabled(cfg.train.compiled_regions)
        if (device.type == "cpu" and regions.enabled() and cfg.parallel.tp == 1
                and any(p.dtype == torch.bfloat16 for p in self.params)):
            # compile the MLP's bias + GeLU region before the allocator settings below (mtnlg.model.regions)
            bias_gelu.warm_up(gelu_approximation(cfg.model.activation),
                              cfg.train.micro_batch * cfg.model.seq_len * cfg.model.ffn)
        if device.type == "cpu":  # reuse the step's freed memory instead of faulting in fresh pages
            keep_freed_memory()
        # bf16 parameters get an fp32 master copy; under ZeRO (FSDP) the parameters stay fp32 shards and
        # the FSDP mixed-precision policy computes in bf16, so the shards are the master copy
        low = any(p.dtype != torch.float32 for p in self.params)
        self.master = MasterWeights(self.params) if param_dtype(self.precision) != torch.float32 and low else None
        opt_params = self.master.params if self.master else self.params
        groups = parameter_groups(model, cfg.optim.weight_decay)
        if self.master:  # same grouping, over the fp32 master copies
            index = {id(p): m for p, m in zip(self.params, self.master.params)}
            groups = [{**g, "params": [index[id(p)] for p in g["params"]]} for g in groups]
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
            **adamw_implementation(opt_params))
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.step = 0
        self.consumed_samples = 0
        # The cosine length is fixed when the run starts: extending a run with more
        # train.steps continues at min_lr instead of jumping back up the curve.
        self.schedule_steps = cfg.train.steps
        self.seq_len = cfg.model.seq_len
        vocab = getattr(model, "vocab_size", None)
        self.flops_per_token = flops_per_token(cfg.model, recompute=False, vocab=vocab)
        self._denom: float | None = None  # loss denominator of the current micro-batches (fine-tuning)

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "schedule_steps": self.schedule_steps,
                "config_digest": config_digest(self.cfg),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def _opt_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _opt_names(self) -> list[str]:
        """Parameter names in optimizer order (the optimizer was built from parameter_groups)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for g in parameter_groups(self.model, 0.0) for p in g["params"]]

    # ------------------------------------------------------------------ checkpoints
    def _checkpointer(self):
        if getattr(self, "_ckpt", None) is None:
            from mtnlg.train.dcp import Checkpointer
            self._ckpt = Checkpointer(self.run_dir / "checkpoints", self.topo.rank, self.topo.world_size,
                                      keep=self.cfg.train.keep_checkpoints, async_save=self.cfg.train.async_save)
        return self._ckpt

    def _named_opt_params(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor the optimizer steps: fp32 master copy or parameter), in optimizer order."""
        for m in self.model.modules():  # FSDP2: an evaluation forward may leave parameters gathered
            if hasattr(m, "reshard") and hasattr(m, "unshard"):
                m.reshard()
        return list(zip(self._opt_names(), self._opt_params()))

    def _tied_copy_names(self) -> dict[str, str]:
        """The last pipeline stage's copy of the tied embedding: its name -> the name it is stored under."""
        tied = {id(p) for p in self.topo.tied_copies}
        return {n: ckpt.TIED_ALIASES.get(n, n) for n, p in self.model.named_parameters() if id(p) in tied}

    def save(self) -> Path:
        """Sharded checkpoint (see mtnlg/train/dcp.py): each rank writes its own
        shards of the weights (fp32 master copies where kept) and optimizer
        state, keyed by parameter name, so it loads into any layout.  With
        ``train.async_save`` this returns once the state is staged in memory;
        ``finish_checkpoint`` commits it."""
        from mtnlg.train.dcp import flat_state
        state = flat_state(self._named_opt_params(), self.optimizer, skip=self._tied_copy_names())
        return self._checkpointer().save(self.step, state, self.state())

    def finish_checkpoint(self, wait: bool = True) -> Path | None:
        """Commit a pending asynchronous save: block for it (``wait``) or only if
        every rank has finished writing.  Collective; a no-op when none is pending."""
        return self._checkpointer().wait() if wait else self._checkpointer().poll()

    def resume(self) -> bool:
        """Load the newest intact checkpoint (any layout, or the old format) into
        this layout; False when the run has none."""
        from mtnlg.train.dcp import load_targets
        cp = self._checkpointer()
        path = cp.find_latest()
        if path is None:
            return False
        trainer_state = ckpt.read_trainer_state(path)
        if trainer_state.get("config_digest") != config_digest(self.cfg):
            raise UserError(f"checkpoint {path} was written with a different model/data/optimizer config; "
                            f"start a new --run directory or restore the original config.toml")
        targets, install = load_targets(self._named_opt_params(), self.optimizer, self._tied_copy_names(),
                                        ckpt.tensor_metadata(path))
        cp.load(path, targets)
        install()
        if self.master:  # the checkpoint holds the fp32 master weights; the bf16 ones are their rounding
            self.master.master_to_model()
        if self.scaler and trainer_state.get("scaler"):
            self.scaler.load_state_dict(trainer_state["scaler"])
        self.step = trainer_state["step"]
        self.schedule_steps = trainer_state.get("schedule_steps", self.schedule_steps)
        self.consumed_samples = trainer_state["consumed_samples"]
        rng = ckpt.rng_file(path, self.topo.rank)
        if rng.exists():  # a rank that did not exist in the saved layout keeps its seeded state
            ckpt.set_rng_state(torch.load(rng, weights_only=False))
        return True

    # ------------------------------------------------------------------ data
    def _batch(self, dataset, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(dataset, "batch"):  # fine-tuning rows: (tokens or model kwargs, targets with IGNORE_INDEX)
            return dataset.batch(first, count, self.device)
        rows = np.stack([dataset[i] for i in range(first, first + count)])
        tokens = torch.from_numpy(rows.astype(np.int64)).to(self.device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def _loss(self, x: torch.Tensor, y: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """Mean next-token cross-entropy divided by ``parts`` (the micro-batches of a step);
        call inside ``topo.loss_context()``."""
        with autocast(self.precision, self.device):
            logits = self._forward(x)
        return cross_entropy_fp32(logits.flatten(0, 1), y.flatten(), denom=self._denom, parts=parts)

    def _forward(self, x):
        """Logits of tokens ``x``, or of fine-tuning's dict: tokens under "x" and
        further ``GPT.forward`` keyword arguments (positions, attention mask)."""
        if isinstance(x, dict):
            return self.model(x["x"], **{k: v for k, v in x.items() if k != "x"})
        return self.model(x)

    def _loss_scale(self, dataset, first: int, count: int, parts: float) -> float | None:
        """Loss denominator for one of ``parts`` equal shares of samples
        ``[first, first + count)`` when the dataset masks targets (fine-tuning):
        the shares' losses then add up to the mean over *all* their loss
        tokens, whatever the micro-batching or dp/pp layout.  None otherwise."""
        if not hasattr(dataset, "loss_tokens"):
            return None
        return max(dataset.loss_tokens(first, count), 1) / parts

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        cfg, topo = self.cfg, self.topo
        mb = cfg.train.micro_batch
        gb = global_batch_at(self.consumed_samples, cfg.train, unit=mb * topo.dp_size)
        if gb % (mb * topo.dp_size):
            raise UserError(f"global batch {gb} is not a multiple of micro_batch {mb} x dp {topo.dp_size}")
        n_micro = gb // (mb * topo.dp_size)
        lr = lr_at(self.step, cfg.optim, self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first = self.consumed_samples + topo.dp_rank * (gb // topo.dp_size)
        self._denom = self._loss_scale(self.train_data, self.consumed_samples, gb, n_micro * topo.dp_size)
        total = torch.zeros((), device=self.device)
        record: dict = {}
        pipeline_info: dict = {}
        if topo.pp_size > 1:  # the schedule runs every micro-batch; the losses come back on the last stage
            x, y = self._batch(self.train_data, first, n_micro * mb)
            pipe = self._pipeline(n_micro, n_micro * mb)
            losses = pipe.step(x, y)
            # idle fraction of the step, measured (mean over the pp ranks) and predicted for this schedule
            pipeline_info = dict(bubble=pipe.bubble, bubble_analytic=pipe.bubble_analytic, pp_schedule=pipe.name)
            if self.master:
                self.master.accumulate_grads()
            if losses is not None:
                total = losses.mean().to(self.device)
            total = topo.broadcast_from_last_stage(total)
        else:
            for i in range(n_micro):
                x, y = self._batch(self.train_data, first + i * mb, mb)
                topo.before_micro_batch(i == n_micro - 1)
                with topo.loss_context():  # vocab-parallel loss needs its backward inside too
                    loss = self._loss(x, y, parts=n_micro)  # 1/n_micro in the loss: its gradient needs no rescaling
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                if self.master:
                    self.master.accumulate_grads()
                total += self.topo.local_value(loss.detach())
        params = self.master.params if self.master else self.params
        topo.all_reduce_grads(params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        tied = {id(p) for p in topo.tied_copies}  # the shared embedding counts once, on the first stage
        grad_norm = topo.clip_grad_norm(params, clip, [q for p, q in zip(self.params, params) if id(p) in tied])
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if not self.scaler and not torch.isfinite(grad_norm):  # fp16: the scaler skips such steps
            raise UserError(f"gradient norm became {float(grad_norm)} at step {self.step + 1} (nothing was "
                            f"applied or saved); lower optim.lr or use train.precision=bf16-autocast")
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            record["loss_scale"] = scale
            record["skipped"] = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            self.master.master_to_model()
        self.step += 1
        self.consumed_samples += gb
        loss = topo.mean_over_dp(total)
        record.update(step=self.step, loss=loss.item(), lr=lr, grad_norm=float(grad_norm),
                      consumed_samples=self.consumed_samples, global_batch=gb, **pipeline_info)
        if self._denom is not None:
            record["loss_tokens"] = self.train_data.loss_tokens(self.consumed_samples - gb, gb)
        return record

    def _pipeline(self, n_micro: int, rows: int, mode: str = "train"):
        """This rank's pipeline schedule (``parallel.pp_schedule``; forward-only
        for ``mode="eval"``) for batches of ``rows`` in ``n_micro`` micro-batches."""
        def loss_fn(logits, targets):
            return cross_entropy_fp32(logits.flatten(0, 1), targets.flatten(), denom=self._denom)
        return self.topo.pipeline(n_micro, rows, loss_fn, lambda: autocast(self.precision, self.device), mode)

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean loss over the first ``eval_batches * micro_batch`` validation
        samples: the same samples whatever the data-parallel degree (each dp
        rank takes a contiguous share, possibly uneven)."""
        mb, topo = self.cfg.train.micro_batch, self.topo
        total_samples = min((batches or self.cfg.train.eval_batches) * mb, len(self.valid_data))
        if total_samples == 0:
            return float("nan")
        lo = topo.dp_rank * total_samples // topo.dp_size
        hi = (topo.dp_rank + 1) * total_samples // topo.dp_size
        self.model.eval()
        total = torch.zeros((), device=self.device)
        # Every dp rank runs the same forwards: under ZeRO/replicate a forward is collective over dp, and
        # shares differ by one sample when dp does not divide the count (ranks short of it pad with
        # sample 0, weighted 0).
        share = -(-total_samples // topo.dp_size)
        if topo.pp_size > 1:  # forward-only pipeline over the share, micro-batches of mb rows (or 1)
            rows = mb if share % mb == 0 and total_samples % topo.dp_size == 0 else 1  # same on every dp rank
            self._denom = self._loss_scale(self.valid_data, 0, total_samples, total_samples / rows)
            x, y = self._batch(self.valid_data, lo, hi - lo) if hi > lo else (None, None)
            if hi - lo < share:
                px, py = self._batch(self.valid_data, 0, share - (hi - lo))
                x, y = (px, py) if x is None else (torch.cat([x, px]), torch.cat([y, py]))
            losses = self._pipeline(share // rows, share, "eval").eval(x, y)
            if losses is not None:
                total = losses[:(hi - lo) // rows].sum().to(self.device) * rows
            total = topo.broadcast_from_last_stage(total)
        for i in range(-(-share // mb)) if topo.pp_size == 1 else ():
            start = lo + i * mb
            n = min(mb, hi - start)
            self._denom = self._loss_scale(self.valid_data, 0, total_samples, total_samples / max(n, 1))
            x, y = self._batch(self.valid_data, start if n > 0 else 0, max(n, 1))
            with topo.loss_context():
                loss = topo.local_value(self._loss(x, y))
            if n > 0:
                total += loss * n
        self.model.train()
        return (topo.mean_over_dp(total) * topo.dp_size / total_samples).item()

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None, logger: MetricsLogger | None = None) -> list[dict]:
        """Train until ``train.steps`` (or ``stop_after`` more steps); returns the logged records."""
        cfg = self.cfg
        logger = logger or MetricsLogger(self.run_dir, cfg.train.steps, self.step, enabled=self.topo.is_main,
                                         progress_bar=cfg.logging.progress_bar,
                                         tensorboard=cfg.logging.tensorboard)
        end = cfg.train.steps if stop_after is None else min(cfg.train.steps, self.step + stop_after)
        records: list[dict] = []
        self.model.train()
        busy, tokens = 0.0, 0  # seconds spent in train steps since the last log, and their tokens
        stop = StopRequest(self.topo.rank)  # SIGTERM/SIGINT: finish the step, save, stop (mtnlg/train/signals.py)
        self.stop_reason, self._last_save = "", time.monotonic()
        try:
            stop.__enter__()
            while self.step < end:
                t0 = time.perf_counter()
                record = self.train_step()
                if not math.isfinite(record["loss"]) and not record.get("skipped"):
                    raise UserError(f"loss became {record['loss']} at step {self.step}; "
                                    f"lower optim.lr or use train.precision=bf16-autocast")
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                busy += time.perf_counter() - t0
                tokens += record["global_batch"] * self.seq_len
                logger.advance()
                last = self.step == end
                evaluate = cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0
                if evaluate or self.step == cfg.train.steps:
                    record["val_loss"] = self.evaluate()
                if self.step % cfg.logging.log_interval == 0 or last or "val_loss" in record:
                    tps = tokens / busy
                    record["tokens_per_s"] = tps
                    record["tflops"] = tps * self.flops_per_token / 1e12 / self.topo.world_size
                    if self.peak_tflops > 0:
                        record["mfu"] = record["tflops"] / self.peak_tflops
                        record["peak_tflops"] = self.peak_tflops
                    if self.device.type == "cuda":
                        record["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    logger.log(record)
                    records.append(record)
                    busy, tokens = 0.0, 0
                saved = bool(cfg.train.save_interval and self.step % cfg.train.save_interval == 0) or last
                if saved:
                    self.save()
                self.finish_checkpoint(wait=last)  # commits a finished asynchronous save
                if not last and self._stop_or_save(stop, saved):
                    break
        finally:
            stop.__exit__()
            logger.close()
        return records

    def _stop_or_save(self, stop: StopRequest, saved: bool) -> bool:
        """After each step, every rank agrees on preemption and time-based saves;
        True means: a signal arrived, the checkpoint of this step is written, stop."""
        now = time.monotonic()
        if saved:
            self._last_save = now
        minutes = self.cfg.train.save_interval_minutes
        due = bool(minutes) and self.topo.is_main and now - self._last_save >= 60 * minutes
        decision = stop.poll(self.device, save_due=due and not saved)
        if decision.stop:
            stop.abort_on_next_signal()  # a second signal during the save aborts at once
            if not saved:
                self.save()
            self.finish_checkpoint(wait=True)  # an asynchronous save must be on disk before the exit
            self.stop_reason = decision.signal_name
            return True
        if decision.save:
            self.save()
            self._last_save = time.monotonic()
        return False
