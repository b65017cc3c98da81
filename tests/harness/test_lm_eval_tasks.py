"""The `*_mee` task YAMLs (indexed and loaded by lm-eval, without its 14k built-in tasks) and their metrics."""

from __future__ import annotations

import json

import pytest

from mee_bench.harness.catalogue import GROUP_NAME, GROUP_TASK_NAMES, TASK_NAMES, TASKS_DIR, TATOEBA_ENFR, task
from mee_bench.harness.lm_eval_model import task_manager
from mee_bench.harness.tasks import utils
from mee_bench.paths import data_root


@pytest.fixture(scope="module")
def manager():
    return task_manager(include_defaults=False)


def test_the_package_holds_the_five_tasks_and_the_group(manager):
    assert sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) == sorted([*TASK_NAMES, GROUP_NAME])
    assert set(TASK_NAMES) <= set(manager.all_subtasks)
    assert GROUP_NAME in manager.all_groups


@pytest.mark.skipif(data_root() is None, reason="needs the local data slices")
def test_tasks_load_local_data_with_greedy_settings_and_their_metrics(manager):
    loaded = manager.load([GROUP_NAME, TATOEBA_ENFR.name])
    assert sorted(loaded["tasks"]) == sorted(TASK_NAMES)
    assert list(loaded["group_map"][GROUP_NAME]) == list(GROUP_TASK_NAMES)
    for name, built in loaded["tasks"].items():
        doc = built.validation_docs()[0]
        assert built.doc_to_target(doc).strip(), name
        assert set(built.aggregation()) == set(task(name).metrics), name
        assert built.config.generation_kwargs["do_sample"] is False and built.config.generation_kwargs["until"] == []


def test_squad_scores_use_the_official_normalisation():
    doc = {"answers": {"text": ["the Eiffel Tower", "Eiffel Tower in Paris"]}}
    assert utils.normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert utils.squad_results(doc, ["Eiffel Tower."]) == {"exact_match": 100.0, "f1": 100.0}
    partial = utils.squad_results(doc, ["tower"])
    assert partial["exact_match"] == 0.0
    assert partial["f1"] == pytest.approx(100 * 2 * (1 * 0.5) / 1.5)  # P=1, R=1/2 against "eiffel tower"
    assert utils.squad_results(doc, ["nothing"]) == {"exact_match": 0.0, "f1": 0.0}


def test_translation_metrics_are_corpus_sacrebleu_and_chrf():
    import sacrebleu

    pairs = [("Le chat dort.", "Le chat dort."), ("Il pleut beaucoup aujourd'hui.", "Il pleut aujourd'hui.")]
    per_doc = [utils.translation_results({"translation": {"en": "-", "fr": ref}}, [f" {hyp} "]) for ref, hyp in pairs]
    items = [d["bleu"] for d in per_doc]
    assert items == pairs
    assert utils.corpus_bleu(items) == pytest.approx(
        sacrebleu.corpus_bleu([h for _, h in pairs], [[r for r, _ in pairs]]).score
    )
    assert utils.corpus_chrf(items) == pytest.approx(
        sacrebleu.corpus_chrf([h for _, h in pairs], [[r for r, _ in pairs]]).score
    )
    assert utils.corpus_bleu([pairs[0]] * 3) == pytest.approx(100.0)


def test_multireference_bleu_scores_each_source_once_against_all_its_references():
    import sacrebleu

    docs = [("I am sure.", "Je suis sûr."), ("I am sure.", "Je suis sûre."), ("It rains.", "Il pleut.")]
    outputs = {"I am sure.": "Je suis sûre.", "It rains.": "Il pleut fort."}
    items = [
        utils.tatoeba_results({"translation": {"en": en, "fr": fr}}, [outputs[en]])["bleu_multiref"] for en, fr in docs
    ]
    expected = sacrebleu.corpus_bleu(
        ["Je suis sûre.", "Il pleut fort."], [["Je suis sûr.", "Il pleut."], ["Je suis sûre.", None]]
    ).score
    assert utils.corpus_bleu_multiref(items) == pytest.approx(expected)
    single = utils.corpus_bleu([(fr, outputs[en]) for en, fr in docs])
    assert utils.corpus_bleu_multiref(items) > single  # the "sûr" pair no longer counts against a right answer
    perfect = [(en, fr, fr) for en, fr in docs[:1]] + [("I am sure.", "Je suis sûre.", "Je suis sûr.")]
    assert utils.corpus_bleu_multiref(perfect) == pytest.approx(100.0)


def test_summary_metrics_are_rouge_fmeasures_with_sentence_lines_for_lsum():
    reference = "Police arrest two men . The car was found in a field ."
    same_sentences = "Police arrest two men .\nThe car was found in a field ."
    scores = utils.cnndm_results({"highlights": reference}, [same_sentences])
    assert scores == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0})
    swapped = utils.cnndm_results({"highlights": reference}, ["The car was found in a field . Police arrest two men ."])
    assert swapped["rouge1"] == pytest.approx(100.0)
    assert swapped["rougeL"] < 100.0 and swapped["rougeLsum"] == pytest.approx(100.0)
    assert set(utils.bigpatent_results({"abstract": "A paw cleaner."}, ["A cleaner for paws."])) == {
        "rouge1",
        "rouge2",
        "rougeL",
    }


GOOD_WMT = {"translation": {"en": "The house.", "fr": "La maison."}}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], r"wmt15/validation\.jsonl holds no records, so task wmt15_enfr_mee has nothing to evaluate"),
        (
            [GOOD_WMT, {"translation": {"fr": "Salut."}}],
            r"validation\.jsonl:2: not a wmt15_enfr_mee record \(translation\[en\] is missing\)",
        ),
        (
            [GOOD_WMT, GOOD_WMT, {"translation": {"en": None, "fr": "Salut."}}],
            r"validation\.jsonl:3: .*translation\[en\] is None, not a non-empty string",
        ),
        ([GOOD_WMT, {"translation": {"en": "Hi."}}], r"validation\.jsonl:2: .*translation\.fr is missing"),
    ],
)
def test_bad_task_data_stops_lm_eval_before_any_request_naming_file_and_line(tmp_path, monkeypatch, rows, message):
    from mee_bench.harness.catalogue import TaskDataError
    from mee_bench.paths import DATA_DIR_ENV

    (tmp_path / "wmt15").mkdir()
    (tmp_path / "wmt15" / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(TaskDataError, match=message):
        task_manager(include_defaults=False).load(["wmt15_enfr_mee"])


def test_a_record_without_its_source_is_never_prompted_as_none():
    from mee_bench.harness.catalogue import RecordError

    with pytest.raises(RecordError, match="translation\\[en\\]"):
        utils.wmt15_prompt({"translation": {"en": None, "fr": "Salut."}})
    with pytest.raises(RecordError, match="answers.text"):
        utils.squad_target({"question": "Who?", "context": "Me.", "answers": {"text": [None]}})
