"""What pyproject.toml declares for installers and for lm-eval (the wheel itself: `test_packaging.py`)."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import tomllib

from tests.helpers import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_license_is_an_spdx_expression_not_the_deprecated_table():
    assert PROJECT["license"] == "Apache-2.0"  # setuptools warns on every build about the table form


def test_the_lm_eval_models_entry_point_resolves_to_the_class_registered_as_mee():
    import lm_eval.models  # noqa: F401  (lm-eval's registry, filled lazily)
    from lm_eval.api.registry import get_model

    ((name, target),) = PROJECT["entry-points"]["lm_eval.models"].items()
    loaded = EntryPoint(name, target, "lm_eval.models").load()
    assert name == "mee"
    assert loaded is get_model("mee")
    assert loaded.__module__ == "mee_bench.harness.lm_eval_model"
