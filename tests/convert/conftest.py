"""Fixtures for the Hugging Face interop tests."""
from __future__ import annotations

from pathlib import Path

import pytest
from hfhelpers import make_run


@pytest.fixture(scope="session")
def noisy_run(sotu_small, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hfrun") / "run", sotu_small + ".tokenizer.json")


@pytest.fixture(scope="session")
def exported(noisy_run, tmp_path_factory) -> Path:
    from mtnlg.convert.hf import export_run
    out = tmp_path_factory.mktemp("hfexport") / "hf"
    export_run(noisy_run, out)
    return out
