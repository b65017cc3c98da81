"""Shared fixtures (the offline T5 tokenizer, a saved tiny T5) and the environment every test runs in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models gain nothing from a second thread, and on a loaded 2-core machine spin-waiting
# threads made tests several times slower.
torch.set_num_threads(1)

from tests.helpers import TOKENIZER_DIR, tiny_causal_model, tiny_model  # noqa: E402 (after the thread setting)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Run a test on the CPU and, marked `cuda`, once more on the GPU (`pytest -m cuda` there)."""
    return request.param


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` are skipped, not failed, where CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m cuda` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def t5_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, t5_tokenizer) -> Path:
    """A saved tiny T5 checkpoint (safetensors + tokenizer), loadable like any local model."""
    path = tmp_path_factory.mktemp("tiny-t5")
    tiny_model(seed=0, layers=2, decoder_layers=4).save_pretrained(path)
    t5_tokenizer.save_pretrained(path)
    return path


def _save_causal(path: Path, family: str, tokenizer) -> Path:
    model = tiny_causal_model(family, seed=0, vocab_size=len(tokenizer), layers=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, t5_tokenizer) -> Path:
    """A saved tiny Llama (safetensors + the offline T5 tokenizer, whose EOS is 1 and pad 0)."""
    return _save_causal(tmp_path_factory.mktemp("tiny-llama"), "llama", t5_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, t5_tokenizer) -> Path:
    """A saved tiny GPT-2 with the offline T5 tokenizer."""
    return _save_causal(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", t5_tokenizer)


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config) -> None:
    """Leave without interpreter teardown once pytest has reported everything.

    A fresh-clone CI run passed every test and then segfaulted during interpreter teardown
    (native threads of the libraries the suite loads, not yet pinned down), which turned a
    green run red. The exit status is pytest's own, so failures still fail.
    """
    if os.environ.get("CI") and _exit_status:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
