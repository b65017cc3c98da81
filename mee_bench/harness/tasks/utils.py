"""Data loading, prompts and metrics for the `*_mee` task YAMLs.

Prompts, references and metric names come from the task catalogue
(`mee_bench.harness.catalogue`); this module only adapts them to lm-eval's hooks.

Scores come from the reference implementations: sacreBLEU for BLEU/chrF, rouge-score for
ROUGE, and the official SQuAD v1.1 answer normalisation for exact match / F1. Every metric
is on a 0-100 scale, as the papers report them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable

from mee_bench.harness.catalogue import BIGPATENT, CNNDM, SQUAD, TATOEBA_ENFR, WMT15_ENFR, tasks_reading
from mee_bench.harness.data import load_split

if TYPE_CHECKING:
    import datasets

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")  # all that any task asks the scorer for
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def load_docs(data_name: str, data_split: str, **_task_metadata: Any) -> "datasets.DatasetDict":
    """lm-eval `custom_dataset`: the split from the local data root, else the hub, checked whole
    against every catalogue task that reads it before lm-eval builds a single request.

    lm-eval also passes the task metadata (model_args, version) as keywords; they do not
    change which data is read.
    """
    import datasets

    specs = tasks_reading(data_name, data_split)

    def check(located: Iterable[tuple[str, dict]], source: str) -> None:
        located = list(located)
        for spec in specs:
            spec.check_records(located, source)

    return datasets.DatasetDict({data_split: load_split(data_name, data_split, check if specs else None)})


# The YAMLs' `doc_to_text` and `doc_to_target`: each task's prompt and reference, from the catalogue.
squad_prompt, squad_target = SQUAD.prompt, SQUAD.target
cnndm_prompt, cnndm_target = CNNDM.prompt, CNNDM.target
wmt15_prompt, wmt15_target = WMT15_ENFR.prompt, WMT15_ENFR.target
bigpatent_prompt, bigpatent_target = BIGPATENT.prompt, BIGPATENT.target
tatoeba_prompt, tatoeba_target = TATOEBA_ENFR.prompt, TATOEBA_ENFR.target


def _prediction(results: list[str]) -> str:
    return results[0].strip()


# SQuAD: the official v1.1 evaluation script's normalisation and token F1.


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised answers (0-1), as the official script computes it."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match and F1 against the best of the annotators' answers."""
    prediction, truths = _prediction(results), SQUAD.references(doc)
    exact = max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)
    f1 = max(squad_f1(prediction, t) for t in truths)
    return {"exact_match": 100.0 * exact, "f1": 100.0 * f1}


# Summaries: rouge-score F-measures with the Porter stemmer (the CNN/DM standard).


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _sentence_lines(text: str) -> str:
    """One sentence per line, as ROUGE-Lsum expects; applied to prediction and reference alike
    (some CNN/DM references join their highlights with spaces instead of newlines)."""
    return "\n".join(s for line in text.splitlines() for s in _SENTENCE_END.split(line.strip()) if s)


def rouge(reference: str, prediction: str, types: tuple[str, ...]) -> dict[str, float]:
    """rouge-score F-measures (0-100) of one prediction against its reference."""
    scores = _rouge_scorer().score(_sentence_lines(reference), _sentence_lines(prediction))
    return {name: 100.0 * scores[name].fmeasure for name in types}


def cnndm_results(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum against the highlights."""
    return rouge(CNNDM.target(doc), _prediction(results), CNNDM.metrics)


def bigpatent_results(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L against the abstract."""
    return rouge(BIGPATENT.target(doc), _prediction(results), BIGPATENT.metrics)


# Translation: corpus-level sacreBLEU and chrF over (reference, prediction) pairs.


def translation_results(doc: dict, results: list[str]) -> dict[str, tuple[str, str]]:
    """(French reference, prediction) pairs: BLEU and chrF are corpus-level, scored at aggregation."""
    pair = (WMT15_ENFR.target(doc), _prediction(results))
    return {"bleu": pair, "chrf": pair}


def corpus_bleu(items: list[tuple[str, str]]) -> float:
    """sacreBLEU corpus BLEU (default 13a tokenisation, as WMT reports it)."""
    import sacrebleu

    references, predictions = zip(*items)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def tatoeba_results(doc: dict, results: list[str]) -> dict[str, tuple]:
    """As `translation_results`, plus (source prompt, reference, prediction) for multi-reference BLEU."""
    reference, prediction = TATOEBA_ENFR.target(doc), _prediction(results)
    return {
        "bleu": (reference, prediction),
        "chrf": (reference, prediction),
        "bleu_multiref": (TATOEBA_ENFR.prompt(doc), reference, prediction),
    }


def corpus_bleu_multiref(items: list[tuple[str, str, str]]) -> float:
    """Corpus BLEU over distinct sources (prompts), each against all of its references.

    Tatoeba lists every valid translation of a sentence as its own pair (the 2001 validation
    pairs hold 1369 distinct English sentences, up to 8 references each), so single-reference
    BLEU scores a correct translation against the other variants too. Here each source
    counts once, with its first prediction (greedy decoding gives the same one every time).
    """
    import sacrebleu

    references: dict[str, list[str]] = {}
    predictions: dict[str, str] = {}
    for source, reference, prediction in items:
        references.setdefault(source, []).append(reference)
        predictions.setdefault(source, prediction)
    sources = list(references)
    width = max(len(refs) for refs in references.values())
    streams = [[references[s][i] if i < len(references[s]) else None for s in sources] for i in range(width)]
    return sacrebleu.corpus_bleu([predictions[s] for s in sources], streams).score


def corpus_chrf(items: list[tuple[str, str]]) -> float:
    """sacreBLEU corpus chrF."""
    import sacrebleu

    references, predictions = zip(*items)
    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score
