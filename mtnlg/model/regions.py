"""Compiled regions: small pieces of the step that eager PyTorch runs as several
passes over memory, compiled by ``torch.compile`` (Inductor's C++ backend on
CPU) into one loop each.

The whole-model ``train.compile`` gains nothing on this CPU (606 vs 608 ms per
14M bf16 step, measured): the step's time is in GEMMs, and Inductor lowers
the tanh GeLU through ``tanh``.  A region is written so that its compiled loop
is the cheap form (``mtnlg.model.bias_gelu``: the bias add and the tanh GeLU
through ``sigmoid``) and is used where it pays: bf16 activations on CPU.

Each region compiles once per process (``dynamic=True``: one kernel for every
shape; 4-7 s, less with Inductor's on-disk cache warm).  The trainer compiles
them at start (``bias_gelu.warm_up``) when its micro-batch reaches
``MIN_ELEMS`` activation elements; callers use a region for calls of at least
``MIN_ELEMS`` elements and their plain eager code below that, so small models
and tests pay no compile time.  If compiling fails (no C++ compiler, an
unsupported platform) the region warns once, returns that call's result
computed eagerly, and reports itself not ``usable`` from then on, so its
callers go back to their eager code.

``train.compiled_regions = false`` or ``MTNLG_COMPILED_REGIONS=0`` runs every
region's callers eagerly.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

MIN_ELEMS = 1 << 20  # callers run eager code below this (no compile): one 14M MLP activation is 3.1M elements
_ENV_OFF = os.environ.get("MTNLG_COMPILED_REGIONS", "1") == "0"
_state = {"enabled": not _ENV_OFF}


def set_enabled(on: bool) -> None:
    """Turn compiled regions on or off for this process (the trainer: ``train.compiled_regions``
    and not ``MTNLG_COMPILED_REGIONS=0``)."""
    _state["enabled"] = bool(on) and not _ENV_OFF


def enabled() -> bool:
    return _state["enabled"]


class Region:
    """``fn`` compiled on first use with a large enough input, eager otherwise (see the module doc)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.compiled: Callable | None = None
        self.failed: str | None = None

    def usable(self) -> bool:
        """Whether calls compile (regions on, and compiling has not failed in this process)."""
        return _state["enabled"] and self.failed is None

    def __call__(self, *args):
        """``fn(*args)``, compiled where ``usable``; callers choose it for calls of ``MIN_ELEMS`` or more."""
        if self.usable():
            try:
                if self.compiled is None:
                    import torch  # here, not at the top: the planner reads MIN_ELEMS without loading torch
                    self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 — any compile failure: fall back, once, loudly
                self.failed = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                warnings.warn(f"mtnlg: compiled region {self.name} is unavailable ({type(e).__name__}: "
                              f"{self.failed}); its callers run eager PyTorch from now on", RuntimeWarning,
                              stacklevel=2)
        return self.fn(*args)
