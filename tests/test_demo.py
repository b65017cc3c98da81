"""`mee-bench demo`: distinct source sentences, and the policy it picks by default."""

from __future__ import annotations

import argparse
import json

from mee_bench.demo import FALLBACK_POLICY, choose_policy, demo_sentences
from mee_bench.engine.policy import POLICY_FILE, ExitPolicy
from tests.helpers import DATA_DIR


def test_demo_sentences_are_distinct_even_where_tatoeba_repeats_a_source(monkeypatch):
    monkeypatch.setenv("MEE_DATA_DIR", str(DATA_DIR))
    sentences = demo_sentences(8)
    assert len(sentences) == 8 == len(set(sentences))
    assert "I am sure of his success." in sentences  # listed three times in a row in the file


def args(pretrained, **given):
    values = {
        "pretrained": str(pretrained),
        "measure": None,
        "threshold": None,
        "min_exit_layer": None,
        "kv_strategy": None,
    }
    return argparse.Namespace(**{**values, **given})


def test_demo_prefers_the_shipped_policy_then_the_fallback(tmp_path):
    policy, source = choose_policy(args(tmp_path))
    assert policy == FALLBACK_POLICY and "fallback" in source
    shipped = ExitPolicy("lstm", 0.7, 2)
    (tmp_path / POLICY_FILE).write_text(json.dumps({"policy": shipped.as_dict()}))
    assert choose_policy(args(tmp_path)) == (shipped, f"the model's shipped policy {tmp_path / POLICY_FILE}")
    assert choose_policy(args(tmp_path, threshold=0.8))[0] == ExitPolicy("lstm", 0.8, 2)
    assert choose_policy(args(tmp_path, measure="softmax", min_exit_layer=3))[0] == ExitPolicy("softmax", 0.9, 3)
