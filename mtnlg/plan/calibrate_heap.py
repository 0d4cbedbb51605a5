"""The heap's slack in a training step on a CPU, for ``mtnlg plan --calibrate``.

The trainer keeps freed memory in glibc's heap (``mtnlg.perf.alloc``: no trimming), so a
rank's resident memory is the heap's high-water mark, not the bytes in use.  The blocks a
step frees (the activations in backward, gradients, the optimizer's temporaries) leave holes
that later blocks of other sizes do not fill exactly, and the heap grows past the most bytes
it ever holds at once.  ``benchmarks/rank_memory.py --malloc`` measured that slack at the peak
of every layout (docs/plan.md, "Predicting our own runs"): about the same in one process and
at tp=2 for a given model, and growing with the activations the step churns through, not with
the parameters.  So it is measured here per activation element (n_layers x micro_batch x
seq_len x hidden): the main heap's resident bytes less the most bytes in use (glibc's
``mallinfo2``, sampled every millisecond) after a few training steps of the config's own
transformer body through the real ``Trainer`` in a fresh process (vocabulary 256, so that the
loss, measured apart by ``loss_bytes``, does not enter), the median over the configs.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

from mtnlg.config import ModelConfig

_SLACK = """
import sys, tempfile
from pathlib import Path
import numpy as np
import torch
from mtnlg.config import load_config
from mtnlg.model.gpt import build_model
from mtnlg.perf.alloc import MallocSampler, heap_resident_bytes
from mtnlg.train.trainer import Trainer
L, h, a, s, b, steps = (int(x) for x in sys.argv[1:7])
cfg = load_config(None, [f"model.n_layers={L}", f"model.hidden={h}", f"model.n_heads={a}", f"model.seq_len={s}",
                         "model.vocab_size=256", f"train.micro_batch={b}", f"train.global_batch={2 * b}",
                         "train.precision=bf16"])
model = build_model(cfg.model, torch.device("cpu"), seed=0).to(torch.bfloat16)
class Rows:
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return (np.arange(s + 1) * 7 + i) % 256
sampler = MallocSampler(0.001)
with tempfile.TemporaryDirectory() as d:
    trainer = Trainer(cfg, model, Rows(), Rows(), Path(d), torch.device("cpu"))
    for _ in range(steps):
        trainer.train_step()
got = sampler.stop()
print(got["samples"], heap_resident_bytes() - got["most_in_use"])
"""


def heap_slack_bytes(cfgs: list[ModelConfig], micro_batch: int, steps: int = 3) -> float:
    """Resident heap bytes beyond the most in use, per activation element (module docstring);
    0.0 where glibc's statistics are missing (not Linux/glibc)."""
    got = []
    for cfg in cfgs:
        out = subprocess.run([sys.executable, "-c", _SLACK, str(cfg.n_layers), str(cfg.hidden), str(cfg.n_heads),
                              str(cfg.seq_len), str(micro_batch), str(steps)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        samples, slack = (int(x) for x in out.stdout.split()[-2:])
        if samples:
            got.append(max(slack, 0) / (cfg.n_layers * micro_batch * cfg.seq_len * cfg.hidden))
    return float(statistics.median(got)) if got else 0.0
