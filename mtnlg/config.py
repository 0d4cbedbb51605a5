"""Typed configuration: dataclasses loaded from TOML, with dotted CLI overrides.

Every section is a dataclass whose fields carry defaults and a docstring-like
``help`` metadata entry.  ``load_config(path, overrides)`` reads a TOML file,
applies ``section.key=value`` overrides (values parsed as TOML literals, so
``optim.lr=3e-4`` and ``data.blend=[[1.0, "x"]]`` both work), rejects unknown
keys and wrong types naming the key, and validates cross-field constraints in
one place (``Config.validate``).
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtnlg.errors import UserError


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    n_layers: int = _f(4, "number of transformer blocks")
    hidden: int = _f(128, "model width (hidden size)")
    n_heads: int = _f(4, "attention heads; must divide hidden")
    ffn_hidden: int = _f(0, "MLP inner width; 0 means 4*hidden")
    seq_len: int = _f(256, "context length (learned positions)")
    vocab_size: int = _f(8192, "tokenizer vocabulary size (before padding)")
    make_vocab_divisible_by: int = _f(128, "pad the embedding table to a multiple of this (times tp), as Megatron does")
    dropout: float = _f(0.0, "dropout on attention probabilities, residual branches and embeddings")
    init_std: float = _f(0.02, "std of the normal init; output projections use init_std/sqrt(2*n_layers)")
    layernorm_eps: float = _f(1e-5, "LayerNorm epsilon")
    activation: str = _f("gelu_tanh", "MLP activation: gelu_tanh (GPT-2's tanh approximation of GeLU; Hugging Face "
                                      "gelu_new / gelu_pytorch_tanh) or gelu (the exact erf GeLU: Megatron-LM's "
                                      "default, so MT-NLG's; Hugging Face gelu). Changing it changes the model")

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def padded_vocab(self, tp: int = 1) -> int:
        m = max(1, self.make_vocab_divisible_by) * tp
        return ((self.vocab_size + m - 1) // m) * m


@dataclass
class ParallelConfig:
    tp: int = _f(1, "tensor-parallel degree (innermost mesh dimension, within a node)")
    pp: int = _f(1, "pipeline-parallel degree")
    dp: int = _f(0, "data-parallel degree; 0 means world_size / (tp*pp)")
    zero: int = _f(0, "ZeRO sharding over the dp ranks (FSDP2): 0 = plain data parallelism (gradient all-reduce), "
                      "1 = shard optimizer state, 2 = + gradients, 3 = + parameters; see docs/parallel.md")
    pp_schedule: str = _f("1f1b", "pipeline schedule: gpipe | 1f1b | interleaved (parallel.virtual_stages chunks per rank) "
                                  "| zb (zero-bubble ZB1P, virtual_stages chunks) | zbv (zero-bubble V, 2 chunks); "
                                  "steps with fewer micro-batches than stages fall back to a schedule that accepts them")
    virtual_stages: int = _f(1, "model chunks per pipeline rank for pp_schedule interleaved (>= 2) or zb")
    zero_reduce: str = _f("micro_batch", "when zero 2/3 reduce gradients inside a pipeline (pp > 1): micro_batch = "
                                         "after each micro-batch's backward, keeping gradients (and at zero 3 "
                                         "parameters) sharded between micro-batches; step = once per step after the "
                                         "last micro-batch (fewer collectives; the stage holds its unsharded "
                                         "gradients, and at zero 3 its gathered parameters, until then)")
    sequence_parallel: bool = _f(False, "shard LayerNorm/dropout regions along the sequence (needs tp > 1 to matter)")
    backend: str = _f("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo")
    timeout_s: int = _f(1800, "seconds a collective may wait (e.g. for rank 0 writing a checkpoint) before the job fails")


@dataclass
class OptimConfig:
    lr: float = _f(6e-4, "peak learning rate")
    min_lr: float = _f(6e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(100, "linear warm-up steps")
    decay_steps: int = _f(0, "steps of cosine decay after warm-up; 0 means until train.steps")
    weight_decay: float = _f(0.1, "decoupled (AdamW) weight decay on matrices; biases, norms and positions exempt")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.95, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables")


@dataclass
class DataConfig:
    blend: list = _f([], "list of [weight, PREFIX] pairs of indexed datasets (PREFIX.bin/.idx)")
    split: list = _f([0.98, 0.01, 0.01], "train/valid/test ratios by document")
    tokenizer: str = _f("", "tokenizer.json (copied into the run directory); empty means PREFIX.tokenizer.json of the first blend entry")
    cache_dir: str = _f("", "where sample/shuffle indices are cached; empty means next to the dataset")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps")
    global_batch: int = _f(32, "sequences per optimizer step (all data-parallel ranks and micro-batches)")
    micro_batch: int = _f(8, "sequences per forward/backward on one rank")
    batch_rampup: list = _f([], "Megatron-style ramp-up [start, increment, samples]: grow the global batch from start by increment over that many samples; empty disables")
    precision: str = _f("bf16-autocast", "fp32 | bf16-autocast (fp32 weights, bf16 matmuls) | bf16 (pure bf16 weights with fp32 optimizer master copy) | fp16 (autocast with dynamic loss scaling)")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in backward")
    compile: bool = _f(False, "torch.compile the model")
    compiled_regions: bool = _f(True, "bf16 on CPU: the MLP's bias + GeLU as one torch.compile'd region "
                                      "(mtnlg.model.regions, compiled once per process); false runs eager PyTorch")
    seed: int = _f(1234, "seed for weights, dropout and data order")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda")
    eval_interval: int = _f(100, "compute validation loss every N steps (0 disables; always at the end)")
    eval_batches: int = _f(10, "micro-batches per validation")
    save_interval: int = _f(500, "checkpoint every N steps (always at the end)")
    save_interval_minutes: float = _f(0.0, "also checkpoint when this many minutes have passed since the last "
                                           "checkpoint (0 disables): bounds the work a crash or kill -9 loses")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    async_save: bool = _f(False, "write checkpoints in a background thread while training continues (committed when the write completes)")
    threads: int = _f(0, "torch intra-op threads on CPU; 0 keeps torch's default")
    deterministic: bool = _f(False, "deterministic kernels on CUDA (torch.use_deterministic_algorithms, cuBLAS "
                                    "workspace, no cuDNN autotuning): bitwise-repeatable runs and resumes on a GPU, "
                                    "at some speed; CPU runs are deterministic without it")


@dataclass
class LoggingConfig:
    log_interval: int = _f(10, "log a metrics line every N steps")
    peak_tflops: float = _f(0.0, "per-device peak for MFU; 0 picks a default for the device (A100 bf16 312, H100 989, CPU measured by benchmark or 1.0)")
    tensorboard: bool = _f(False, "write TensorBoard event files under RUN/tensorboard")
    progress_bar: str = _f("auto", "auto (on a terminal), always, never")


@dataclass
class FinetuneConfig:
    init: str = _f("", "run directory (or Hugging Face GPT-2 directory) whose weights start the fine-tune; "
                       "its model section and tokenizer are taken over")
    init_step: int = _f(0, "checkpoint step of the init run to start from; 0 means its latest")
    data: str = _f("", "JSONL (.gz/.zst) of {\"prompt\", \"response\"} or {\"messages\": [{\"role\", \"content\"}, ...]}")
    valid: str = _f("", "held-out JSONL in the same format; empty holds out finetune.valid_fraction of finetune.data")
    valid_fraction: float = _f(0.05, "share of the examples held out for val_loss when finetune.valid is empty")
    pack: bool = _f(True, "pack several examples per row with attention kept inside each example; "
                          "false pads one example per row (needed for parallel.pp > 1)")
    strict: bool = _f(False, "stop at the first bad line or over-long example instead of skipping/truncating and counting")
    epochs: float = _f(0.0, "if > 0, set train.steps to cover this many passes over the packed training rows")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "Config":
        m, p, t = self.model, self.parallel, self.train
        for name in ("n_layers", "hidden", "n_heads", "seq_len", "vocab_size"):
            if getattr(m, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(m, name)}")
        if m.hidden % m.n_heads:
            raise UserError(f"model.n_heads={m.n_heads} must divide model.hidden={m.hidden}")
        gelu_approximation(m.activation)
        if not 0.0 <= m.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
        for name in ("tp", "pp"):
            if getattr(p, name) < 1:
                raise UserError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        if p.dp < 0:
            raise UserError(f"parallel.dp must be >= 0, got {p.dp}")
        if m.n_heads % p.tp:
            raise UserError(f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}")
        if m.ffn % p.tp:
            raise UserError(f"parallel.tp={p.tp} must divide the MLP width {m.ffn}")
        if p.zero_reduce not in ("micro_batch", "step"):
            raise UserError(f"parallel.zero_reduce must be micro_batch or step, got {p.zero_reduce!r}")
        if p.pp_schedule not in PP_SCHEDULES:
            raise UserError(f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {p.pp_schedule!r}")
        if p.virtual_stages < 1:
            raise UserError(f"parallel.virtual_stages must be >= 1, got {p.virtual_stages}")
        if p.virtual_stages > 1 and p.pp_schedule not in ("interleaved", "zb"):
            raise UserError(f"parallel.virtual_stages={p.virtual_stages} needs parallel.pp_schedule=interleaved or zb "
                            f"(zbv always uses 2), got {p.pp_schedule!r}")
        if p.pp_schedule == "interleaved" and p.pp > 1 and p.virtual_stages < 2:
            raise UserError("parallel.pp_schedule=interleaved needs parallel.virtual_stages >= 2")
        chunks = 2 if p.pp_schedule == "zbv" else (p.virtual_stages if p.pp_schedule in ("interleaved", "zb") else 1)
        if p.pp * (chunks if p.pp > 1 else 1) > m.n_layers:
            raise UserError(f"parallel.pp={p.pp} x {chunks} chunk(s) per rank exceeds model.n_layers={m.n_layers}; "
                            f"each pipeline stage needs at least one layer")
        if p.zero not in (0, 1, 2, 3):
            raise UserError(f"parallel.zero must be 0, 1, 2 or 3, got {p.zero!r}")
        if p.backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"parallel.backend must be auto, nccl or gloo, got {p.backend!r}")
        if t.micro_batch <= 0 or t.global_batch <= 0:
            raise UserError("train.micro_batch and train.global_batch must be positive")
        if t.global_batch % t.micro_batch:
            raise UserError(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch}")
        if t.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
        if t.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
        if t.batch_rampup and (len(t.batch_rampup) != 3 or any(type(x) is not int or x <= 0 for x in t.batch_rampup)):
            raise UserError(f"train.batch_rampup must be [start, increment, samples] of positive integers, got {t.batch_rampup}")
        if t.batch_rampup:
            start, inc, _ = (int(x) for x in t.batch_rampup)
            if start % t.micro_batch or inc % t.micro_batch:
                raise UserError("train.batch_rampup start and increment must be multiples of train.micro_batch")
            if (t.global_batch - start) % inc:
                raise UserError("train.global_batch - batch_rampup start must be a multiple of the increment")
        if (len(self.data.split) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0
                                             for x in self.data.split) or sum(self.data.split) <= 0):
            raise UserError(f"data.split must be three non-negative ratios, got {self.data.split}")
        for i, entry in enumerate(self.data.blend):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], (int, float)) and isinstance(entry[1], str)):
                raise UserError(f"data.blend[{i}] must be [weight, \"PREFIX\"], got {entry!r}")
            if entry[0] <= 0:
                raise UserError(f"data.blend[{i}] weight must be positive, got {entry[0]}")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise UserError("optim.lr must be positive and 0 <= optim.min_lr <= optim.lr")
        if self.logging.log_interval < 1:
            raise UserError(f"logging.log_interval must be >= 1, got {self.logging.log_interval}")
        for name in ("steps", "eval_interval", "save_interval", "keep_checkpoints", "eval_batches", "threads"):
            if getattr(t, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.save_interval_minutes < 0:
            raise UserError(f"train.save_interval_minutes must be >= 0, got {t.save_interval_minutes}")
        if self.optim.warmup_steps < 0 or self.optim.decay_steps < 0:
            raise UserError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if p.timeout_s <= 0:
            raise UserError(f"parallel.timeout_s must be positive, got {p.timeout_s}")
        f = self.finetune
        if not 0.0 <= f.valid_fraction < 1.0 or f.epochs < 0 or f.init_step < 0:
            raise UserError("finetune.valid_fraction must be in [0, 1), finetune.epochs and finetune.init_step >= 0")
        if self.logging.progress_bar not in ("auto", "always", "never"):
            raise UserError(f"logging.progress_bar must be auto, always or never, got {self.logging.progress_bar!r}")
        return self


PRECISIONS = ("fp32", "bf16-autocast", "bf16", "fp16")
# model.activation -> F.gelu's ``approximate`` argument
ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}


def gelu_approximation(activation: str) -> str:
    """F.gelu's ``approximate`` for a ``model.activation``; a one-line error for any other value."""
    if activation not in ACTIVATIONS:
        raise UserError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb", "zbv")


# --------------------------------------------------------------------------- loading

def _check_type(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool):
        if type(value) is not typ:
            raise UserError(f"config key {key!r} expects {typ.__name__}, got {type(value).__name__} {value!r}")
        return value
    if typ is list or origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key!r} expects a list, got {type(value).__name__} {value!r}")
        return value
    return value


def _apply(obj: Any, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = ", ".join(sorted(names))
            raise UserError(f"unknown config key {dotted!r} (valid keys here: {close})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key {dotted!r} is a section; expected a table, got {value!r}")
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_type(dotted, value, hints[key]))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare strings need no quotes on the command line
    return key.split("."), value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides or []:
        path, value = parse_override(text)
        nested: dict = value
        for part in reversed(path):
            nested = {part: nested}
        _apply(cfg, nested, "")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {str(p)!r} does not exist (presets live in configs/)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        _apply(cfg, data, "")
    apply_overrides(cfg, overrides or [])
    return cfg.validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def dump_toml(cfg: Config) -> str:
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def describe_options() -> str:
    """Every config key with its default and help, for `--help` output."""
    out = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  {sec.name}.{f.name} = {_toml_value(d)}\n      {f.metadata.get('help', '')}")
    return "\n".join(out)


# --------------------------------------------------------------------------- data paths

def absolute_data_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """A copy of ``cfg`` whose data paths (blend prefixes, tokenizer, cache dir)
    are absolute, resolved against ``base`` (default: the current directory).
    A run records these, so it works from any directory afterwards."""
    import copy
    import os

    base = Path(base or os.getcwd())
    out = copy.deepcopy(cfg)
    absolute = lambda p: p if not p or os.path.isabs(p) else os.path.normpath(base / p)  # noqa: E731
    out.data.blend = [[w, absolute(p)] for w, p in out.data.blend]
    out.data.tokenizer = absolute(out.data.tokenizer)
    out.data.cache_dir = absolute(out.data.cache_dir)
    return out


def check_relative_data_paths(cfg: Config, config_file: str | Path) -> None:
    """Runs made before paths were recorded absolutely hold paths relative to the
    directory they were created in: say so when they are not found from here."""
    import os

    for p in [p for _, p in cfg.data.blend] + [cfg.data.tokenizer]:
        found = os.path.exists(p) or os.path.exists(p + ".idx")
        if p and not os.path.isabs(p) and not found:
            raise UserError(f"{config_file} names the data path {p!r} relative to the directory the run was "
                            f"created in, and it is not found from {os.getcwd()}: run the command from that "
                            f"directory (runs created now record absolute paths)")
