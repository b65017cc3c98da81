"""Session fixtures of the training tests: a tiny Tatoeba corpus and a tiny T5 trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mee_bench.train.loop import train
from tests.helpers import DATA_DIR, tiny_train_config


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """1,500 Tatoeba pairs spread over the file (it is sorted by length) and 60 validation pairs."""
    directory = tmp_path_factory.mktemp("corpus")
    lines = (DATA_DIR / "tatoeba_fra_eng" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (directory / "train.jsonl").write_text("\n".join(lines[:100_000:66]) + "\n", encoding="utf-8")
    validation = (DATA_DIR / "tatoeba_fra_eng" / "validation.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    (directory / "validation.jsonl").write_text("\n".join(validation) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def trained_tiny(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny T5 trained 20 steps with weighted CE (shared by the head-training tests)."""
    output = tmp_path_factory.mktemp("runs") / "tiny"
    torch.manual_seed(0)
    train(tiny_train_config(tiny_corpus, output))
    return output
