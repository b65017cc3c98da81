"""The `mee` adapter on decoder-only checkpoints: scoring equals lm-eval's own `hf` model, generation
runs the early-exit decoder with stop strings and limits honoured, project tasks get causal prompts."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import SQUAD
from mee_bench.harness.lm_eval_model import MEELM

MAX_LENGTH = 24  # short, so the longest requests are cut from the left as `hf` cuts them
PAIRS = [
    ("The house is", " wonderful."),
    ("", "Hello there"),
    ("Question: Who wrote the letter? Answer: the mayor, who also wrote", " a great many other letters that year"),
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", " fifteen sixteen"),
    ("A ", "cup of coffee"),
]
TEXTS = [
    "The committee met on Tuesday and agreed to postpone the vote until the spring session of next year. "
    "Members said the delay would give them time to read the report, which runs to four hundred pages.",
    "Hi.",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="module")
def lm(family_dir) -> MEELM:
    return MEELM(pretrained=str(family_dir), measure="full", batch_size=3, device="cpu", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hf_lm(family_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install -e '.[test]')")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(family_dir), backend="causal", batch_size=3, device="cpu", max_length=MAX_LENGTH)


def test_a_decoder_only_checkpoint_loads_as_the_causal_backend(lm):
    info = lm.get_model_info()
    assert lm.backend == "causal" and info["model_kind"] == "decoder-only"
    assert info["model_type"] in ("llama", "gpt2") and info["decoder_layers"] == 4


def test_loglikelihoods_equal_lm_evals_hf_model(lm, hf_lm):
    requests = [Instance("loglikelihood", {}, pair, i, ("task_ll", i, 1)) for i, pair in enumerate(PAIRS)]
    ours = lm.loglikelihood(requests, disable_tqdm=True)
    theirs = hf_lm.loglikelihood(requests, disable_tqdm=True)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    assert [score for score, _ in ours] == pytest.approx([score for score, _ in theirs], rel=1e-5, abs=1e-4)
    assert len({round(score, 3) for score, _ in ours}) == len(PAIRS), "distinct requests must score differently"


def test_rolling_loglikelihoods_equal_lm_evals_hf_model(lm, hf_lm):
    requests = [Instance("loglikelihood_rolling", {}, (text,), i, ("task_roll", i, 1)) for i, text in enumerate(TEXTS)]
    ours = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    theirs = hf_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-4)
    assert len(lm.tok_encode(TEXTS[0])) > MAX_LENGTH, "the long text must span several rolling windows"


def generation_request(prompt: str, index: int = 0, task: str = "task_gen", doc: dict | None = None, **gen_kwargs):
    kwargs = {"until": [], "max_gen_toks": 6, "do_sample": False, **gen_kwargs}
    return Instance("generate_until", doc or {}, (prompt, kwargs), index, (task, index, 1))


def test_full_policy_generation_equals_lm_evals_hf_model(lm, hf_lm):
    """Left padding, left truncation to max_length - max_gen_toks, greedy: token for token what `hf` makes."""
    prompts = ["The house is", "one two three four five six seven eight nine ten eleven twelve thirteen fourteen", "A"]
    requests = [generation_request(prompt, i) for i, prompt in enumerate(prompts)]
    assert lm.generate_until(requests, disable_tqdm=True) == hf_lm.generate_until(requests, disable_tqdm=True)


def test_stop_strings_and_max_gen_toks_are_honoured_exactly(lm):
    lm.set_policy(ExitPolicy("softmax", threshold=0.01, min_exit_layer=1))
    try:
        lm.reset_efficiency()
        free = lm.generate_until([generation_request("The house is", max_gen_toks=12)], disable_tqdm=True)[0]
        assert lm.efficiency_report()["task_gen"]["tokens"] == 12, "the random model must not stop by itself"
        stop = free[len(free) // 2 : len(free) // 2 + 1]
        assert stop.strip(), "the free text must have a character to stop at"
        stopping = generation_request("The house is", max_gen_toks=12, until=[stop])
        [cut] = lm.generate_until([stopping], disable_tqdm=True)
        assert cut == free[: free.index(stop)]
        assert lm.efficiency_report()["task_gen"]["tokens"] < 2 * 12, "generation must end at the stop string"
    finally:
        lm.set_policy(ExitPolicy("full"))


def test_project_tasks_get_the_causal_prompt_and_stop_at_its_answer_end(lm, monkeypatch):
    record = {
        "question": "Who wrote it?",
        "context": "The letter was written by the mayor.",
        "answers": {"text": ["x"]},
    }
    seen: list[list[int]] = []
    stops: list[list[str]] = []
    original = lm.generator.decode_steps

    def spy(input_ids, attention_mask, policy, max_new_tokens, stop_strings, *timing):
        seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        stops.append(list(stop_strings))
        return original(input_ids, attention_mask, policy, max_new_tokens, stop_strings, *timing)

    monkeypatch.setattr(lm.generator, "decode_steps", spy)
    request = generation_request(SQUAD.prompt(record), task=SQUAD.name, doc=record)
    lm.generate_until([request], disable_tqdm=True)
    assert seen == [lm.tok_encode(SQUAD.causal_prompt(record))]
    assert SQUAD.causal_prompt(record).endswith("Question: Who wrote it?\nAnswer:")
    assert stops == [["\n"]]
