"""Fixtures: a slice of the shipped SOTU corpus and a small trained tokenizer."""

import pytest
from datahelpers import sotu_texts

from mtnlg.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def sotu_docs() -> list[str]:
    return sotu_texts(12)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, sotu_docs) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(sotu_docs, 1024).save(path)
    return path
