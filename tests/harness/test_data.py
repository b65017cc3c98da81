"""Data root resolution and the local-then-hub loading path (the hub itself is faked: no network here)."""

from __future__ import annotations

import json

import pytest

from mee_bench.harness import data
from mee_bench.harness.data import DataUnavailableError, load_split
from mee_bench.paths import DATA_DIR_ENV, SHARED_DATA_DIR, data_root


def write_split(root, dataset: str, split: str, rows: list[dict]) -> None:
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def no_hub(monkeypatch):
    """`datasets.load_dataset` as it behaves offline; records what it was asked for."""
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    return calls


def test_mee_data_dir_wins_and_rows_keep_the_hub_field_names(tmp_path, monkeypatch, no_hub):
    rows = [{"translation": {"en": "Hi.", "fr": "Salut."}}, {"translation": {"en": "Go.", "fr": "Va !"}}]
    write_split(tmp_path, "wmt15", "validation", rows)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_root() == tmp_path.resolve()
    assert load_split("wmt15", "validation").to_list() == rows
    assert no_hub == []


def test_a_relative_mee_data_dir_does_not_depend_on_a_later_working_directory(tmp_path, monkeypatch):
    write_split(tmp_path / "root", "squad", "validation", [{"id": "1"}])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, "root")
    root = data_root()
    monkeypatch.chdir(tmp_path / "root" / "squad")
    assert root.is_absolute() and (root / "squad" / "validation.jsonl").is_file()


def test_without_mee_data_dir_the_shared_data_beside_the_repo_is_used_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_root() == (SHARED_DATA_DIR if SHARED_DATA_DIR.is_dir() else None)


def test_a_mee_data_dir_that_is_not_a_directory_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        data_root()


@pytest.mark.parametrize(
    ("dataset", "hub_args"),
    [
        ("squad", (("rajpurkar/squad", "plain_text"), {"split": "validation"})),
        ("cnn_dailymail", (("abisee/cnn_dailymail", "3.0.0"), {"split": "test"})),
        ("wmt15", (("wmt/wmt15", "fr-en"), {"split": "test"})),
        ("big_patent", (("NortheasternUniversity/big_patent", "all"), {"split": "test"})),
    ],
)
def test_a_missing_local_file_falls_back_to_the_hub_ids_and_offline_names_mee_data_dir(
    tmp_path, monkeypatch, no_hub, dataset, hub_args
):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match=DATA_DIR_ENV) as error:
        load_split(dataset, "validation")
    assert no_hub == [hub_args]
    assert f"{dataset}/validation.jsonl" in str(error.value) and "ConnectionError" in str(error.value)


def test_no_local_root_at_all_goes_to_the_hub(monkeypatch, no_hub):
    monkeypatch.setattr(data, "data_root", lambda: None)
    with pytest.raises(DataUnavailableError, match=f"no local data root was found.*{DATA_DIR_ENV}"):
        load_split("squad", "validation")
    assert len(no_hub) == 1


def test_local_only_data_never_tries_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match=f"only available locally.*{DATA_DIR_ENV}"):
        load_split("tatoeba_fra_eng", "validation")
    assert no_hub == []


def test_the_hub_answer_is_returned_when_there_is_a_network(tmp_path, monkeypatch):
    import datasets

    fake = datasets.Dataset.from_list([{"article": "a", "highlights": "b", "id": "x"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_split("cnn_dailymail", "validation") is fake


def test_a_malformed_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        list(data.read_jsonl(path))
