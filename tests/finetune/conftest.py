"""Fixtures for fine-tuning tests: a tiny pretrained base run and small
question-answering JSONL files (prompt/response and chat lines)."""
from __future__ import annotations

import pytest

from ft_helpers import base_overrides
from trainhelpers import train


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, sotu_small):
    """A 2-layer run trained for 2 steps on the State of the Union slice."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(run_dir, base_overrides(sotu_small))
    return run_dir


@pytest.fixture
def qa_file(tmp_path):
    from ft_helpers import qa_records, write_jsonl
    return write_jsonl(tmp_path / "qa.jsonl", qa_records(48))
