"""The `mee` adapter in-process on a tiny random T5: batching, stop strings, scoring, policies, errors.

A random model scores near zero on every task, so these tests check structure and exact
properties (order, equality with unbatched runs, equality with a direct computation).
"""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from mee_bench.engine.loading import ModelLoadError
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.lm_eval_model import (
    MEELM,
    TRAIN_DEFAULT_COMMAND,
    ModelArgsError,
    attach_efficiency,
    efficiency_table,
    task_manager,
)
from mee_bench.timing.statistics import speedup_interval

FULL = ExitPolicy(measure="full")
PROMPTS = [
    "translate English to French: The house is wonderful.",
    "translate English to French: Hi.",
    "summarize: The committee met on Tuesday and agreed to postpone the vote until the spring session.",
    "question: Who wrote it? context: The letter was written by the mayor of the town in 1901.",
    "translate English to French: I would like a cup of coffee, please.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two busy cores make torch's thread pool spin; one thread keeps the timings sane."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> MEELM:
    return MEELM(pretrained=str(tiny_model_dir), measure="full", batch_size=2, device="cpu")


@pytest.fixture(autouse=True)
def fresh_state(lm):
    lm.set_policy(FULL)
    lm.reset_efficiency()


def generation_request(prompt: str, task: str = "task_a", index: int = 0, **gen_kwargs) -> Instance:
    kwargs = {"until": [], "max_gen_toks": 8, "do_sample": False, **gen_kwargs}
    return Instance("generate_until", {}, (prompt, kwargs), index, (task, index, 1))


def test_batches_are_sorted_by_length_per_task_and_results_come_back_in_request_order(lm, monkeypatch):
    requests = [generation_request(p, task="task_a" if i % 2 else "task_b", index=i) for i, p in enumerate(PROMPTS)]
    alone = []
    for request in requests:
        alone += lm.generate_until([request], disable_tqdm=True)
    tokens_alone = {task: figures["tokens"] for task, figures in lm.efficiency_report().items()}
    lm.reset_efficiency()

    batches = []
    generate_batch = lm._generate_batch

    def recording(encoded, until, max_gen_toks):
        batches.append([len(ids) for ids in encoded])
        return generate_batch(encoded, until, max_gen_toks)

    monkeypatch.setattr(lm, "_generate_batch", recording)
    together = lm.generate_until(requests, disable_tqdm=True)

    assert together == alone
    report = lm.efficiency_report()
    assert {task: figures["requests"] for task, figures in report.items()} == {"task_a": 2, "task_b": 3}
    assert {task: figures["tokens"] for task, figures in report.items()} == tokens_alone
    assert [len(batch) for batch in batches] == [2, 1, 2]  # task_b (3 requests) then task_a (2), batch_size 2
    lengths = [n for batch in batches[:2] for n in batch]
    assert lengths == sorted(lengths, reverse=True)


def test_until_ends_generation_and_is_cut_from_the_text(lm):
    prompt = PROMPTS[0]
    (text,) = lm.generate_until([generation_request(prompt, max_gen_toks=12)], disable_tqdm=True)
    tokens_without_stop = lm.efficiency_report()["task_a"]["tokens"]
    assert len(text) > 6, "the tiny model should produce some text"
    cut = next(k for k in range(2, len(text) // 2) if not text[k].isspace() and text.find(text[k : k + 2]) == k)
    stop = text[cut : cut + 2]

    lm.reset_efficiency()
    (stopped,) = lm.generate_until([generation_request(prompt, max_gen_toks=12, until=[stop])], disable_tqdm=True)
    assert stopped == text[:cut]
    assert lm.efficiency_report()["task_a"]["tokens"] < tokens_without_stop
    (as_string,) = lm.generate_until([generation_request(prompt, max_gen_toks=12, until=stop)], disable_tqdm=True)
    assert as_string == stopped


@pytest.mark.parametrize(
    "gen_kwargs", [{"do_sample": True, "temperature": 0.7}, {"temperature": 0.5}, {"num_beams": 2}]
)
def test_anything_but_greedy_is_refused(lm, gen_kwargs):
    request = generation_request(PROMPTS[0])
    request.arguments[1].pop("do_sample")
    request.arguments[1].update(gen_kwargs)
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([request], disable_tqdm=True)


def direct_log_likelihood(lm: MEELM, encoder_ids: list[int], target_ids: list[int]) -> tuple[float, bool]:
    """Teacher forcing the plain Hugging Face way: the model shifts `labels` itself."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([encoder_ids]), labels=torch.tensor([target_ids])).logits[0]
    log_probs = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(target_ids)
    return log_probs.gather(-1, target[:, None]).sum().item(), bool((log_probs.argmax(-1) == target).all())


def test_loglikelihood_matches_a_direct_computation_with_the_model(lm):
    pairs = [
        (PROMPTS[0], " La maison est merveilleuse."),
        (PROMPTS[3], " the mayor"),
        (PROMPTS[2], " The vote is postponed until spring."),
    ]
    requests = [Instance("loglikelihood", {}, pair, i, ("task_ll", i, 1)) for i, pair in enumerate(pairs)]
    scored = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (log_prob, greedy) in zip(pairs, scored):
        encoder_ids = lm.tokenizer(context).input_ids
        target_ids = lm.tokenizer(continuation, add_special_tokens=False).input_ids
        expected, expected_greedy = direct_log_likelihood(lm, encoder_ids, target_ids)
        assert log_prob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    assert lm.efficiency_report() == {}, "scoring is not generation: no efficiency figures"


def test_the_greedy_continuation_is_greedy_and_rolling_scores_the_decoder_from_eos(lm):
    encoder_ids = lm.tokenizer(PROMPTS[4]).input_ids
    output = lm.generator.generate(torch.tensor([encoder_ids]), None, FULL, max_new_tokens=6)
    greedy_tokens = [t for t in output.tokens[0] if t != lm.eot_token_id]
    ((_, greedy),) = lm._loglikelihood_tokens([(None, encoder_ids, greedy_tokens)], disable_tqdm=True)
    assert greedy is True

    text = "Le chat dort sur le canapé."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    expected, _ = direct_log_likelihood(lm, [lm.eot_token_id], lm.tokenizer(text).input_ids)
    assert rolling == pytest.approx(expected, abs=1e-4)


def test_set_policy_switches_exits_on_the_same_loaded_model(lm):
    model = lm.model
    requests = [generation_request(p, index=i) for i, p in enumerate(PROMPTS[:3])]

    lm.set_policy(ExitPolicy(measure="softmax", threshold=0.0, min_exit_layer=1))
    lm.generate_until(requests, disable_tqdm=True)
    early = lm.efficiency_report()["task_a"]
    assert early["avg_exit_layer"] == 1.0 and early["exit_histogram"] == {"1": early["tokens"]}

    lm.reset_efficiency()
    lm.set_policy(FULL)
    lm.generate_until(requests, disable_tqdm=True)
    full = lm.efficiency_report()["task_a"]
    assert full["avg_exit_layer"] == 4.0 and full["exit_histogram"] == {"4": full["tokens"]}
    assert full["num_layers"] == 4 and full["requests"] == 3
    assert lm.model is model
    assert lm.get_model_info()["mee_policy"]["measure"] == "full"

    with pytest.raises(ValueError, match="exit heads"):
        lm.set_policy(ExitPolicy(measure="lstm"))
    with pytest.raises(ValueError, match="exceeds the model's 4 decoder layers"):
        lm.set_policy(ExitPolicy(measure="softmax", min_exit_layer=5))
    assert lm.policy == FULL


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ({"foo": 1}, "unknown model_args for --model mee: foo"),
        ({"measure": "nope"}, "unknown measure 'nope'"),
        ({"measure": "softmax", "threshold": 1.5}, "threshold=1.5 is outside"),
        ({"batch_size": "lots"}, "batch_size='lots' must be a positive integer, auto or auto:N"),
        ({"batch_size": "auto:0"}, "batch_size='auto:0' must be a positive integer, auto or auto:N"),
        ({"max_batch_size": 0}, "max_batch_size=0 must be a positive integer"),
        ({"max_gen_toks": 0}, "max_gen_toks=0 must be a positive integer"),
        ({"dtype": "float16"}, "dtype='float16' is not supported"),
        ({"paired_timing": "maybe"}, "paired_timing='maybe' is not a boolean"),
        ({"timing_precision": 0}, "timing_precision=0 must be a number > 0"),
        ({"timing_allowance_s": "soon"}, "timing_allowance_s='soon' must be a number > 0"),
        ({"timing_min_repeats": 1}, "timing_min_repeats=1 must be at least 2"),
    ],
)
def test_bad_model_args_fail_before_the_model_loads(tmp_path, model_args, message):
    with pytest.raises(ValueError, match=message):
        MEELM(pretrained=str(tmp_path / "no-such-model"), **model_args)


def test_bad_model_args_fail_before_any_data_loads(tiny_model_dir, monkeypatch):
    import lm_eval

    import mee_bench.harness.tasks.utils

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the model_args were checked")

    monkeypatch.setattr(mee_bench.harness.tasks.utils, "load_split", no_data)
    manager = task_manager(include_defaults=False)
    for model_args, message in (
        ("measure=nope", "unknown measure"),
        ("measure=full,min_exit_layers=2", "unknown model_args"),
    ):
        with pytest.raises(ValueError, match=message):
            lm_eval.simple_evaluate(
                model="mee",
                model_args=f"pretrained={tiny_model_dir},{model_args}",
                tasks=["squad_mee"],
                task_manager=manager,
                limit=1,
            )


def test_model_args_win_over_lm_evals_own_device_and_batch_size_flags_and_the_log_says_so(tiny_model_dir, caplog):
    flags = {"device": "cuda:0", "batch_size": 1, "max_batch_size": 64}
    with caplog.at_level("INFO", logger="mee_bench.harness.lm_eval_model"):
        lm = MEELM.create_from_arg_string(f"pretrained={tiny_model_dir},device=cpu,batch_size=3", flags)
    assert lm.batch_size == 3 and lm.device.type == "cpu"
    assert "model_args device=cpu wins over lm-eval's --device cuda:0" in caplog.text
    assert "model_args batch_size=3 wins over lm-eval's --batch_size 1" in caplog.text
    from_flags = MEELM.create_from_arg_obj({"pretrained": str(tiny_model_dir)}, {"device": "cpu", "batch_size": 5})
    assert from_flags.batch_size == 5


def test_a_bad_model_arg_through_lm_evals_constructor_is_a_model_args_error(tmp_path):
    with pytest.raises(ModelArgsError, match=r"^--model mee: threshold=2.0 is outside"):
        MEELM.create_from_arg_string(f"pretrained={tmp_path},measure=softmax,threshold=2.0", {"device": "cpu"})


def test_a_missing_default_model_names_pretrained_and_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr("mee_bench.harness.lm_eval_model.DEFAULT_MODEL_DIR", tmp_path / "mee-t5-default")
    with pytest.raises(ModelLoadError) as error:
        MEELM()
    assert "pretrained=" in str(error.value) and TRAIN_DEFAULT_COMMAND in str(error.value)
    assert TRAIN_DEFAULT_COMMAND == "mee-bench train configs/train/default.yaml"


def test_simple_evaluate_with_a_loaded_model_reports_efficiency_per_task(lm):
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["tatoeba_enfr_mee"],
        task_manager=task_manager(include_defaults=False),
        limit=3,
        bootstrap_iters=0,
        log_samples=False,
    )
    metrics = results["results"]["tatoeba_enfr_mee"]
    assert {"bleu,none", "chrf,none"} <= set(metrics)
    report = lm.efficiency_report()
    figures = report["tatoeba_enfr_mee"]
    assert figures["requests"] == 3 and figures["avg_exit_layer"] == 4.0
    assert sum(figures["exit_histogram"].values()) == figures["tokens"] > 0
    assert attach_efficiency(results, lm)["mee"] == report
    table = efficiency_table(results["mee"])
    assert "tatoeba_enfr_mee" in table and "Avg exit layer" in table and f"4:{figures['tokens']}" in table


@pytest.fixture
def paired(lm):
    lm.paired_timing, lm.timing_allowance_s = True, 0.0
    yield lm
    lm.paired_timing = False


def test_paired_timing_keeps_the_outputs_and_times_every_batch_against_full(paired, monkeypatch):
    requests = [generation_request(p, index=i) for i, p in enumerate(PROMPTS)]
    early = ExitPolicy(measure="softmax", threshold=0.0, min_exit_layer=1)
    paired.set_policy(early)
    paired.paired_timing = False
    unpaired = paired.generate_until(requests, disable_tqdm=True)
    paired.paired_timing = True
    paired.reset_efficiency()

    policies = []
    decode_steps = paired.generator.decode_steps

    def recording(input_ids, attention_mask, policy, *args):
        policies.append(policy.measure)
        return decode_steps(input_ids, attention_mask, policy, *args)

    monkeypatch.setattr(paired.generator, "decode_steps", recording)
    assert paired.generate_until(requests, disable_tqdm=True) == unpaired
    figures = paired.efficiency_report()["task_a"]
    speedup = figures["paired_speedup"]
    assert speedup["blocks"] == 13  # 3 batches, then the 10 re-timed blocks the noise estimate needs (allowance 0 s)
    assert speedup["low"] <= speedup["ratio"] <= speedup["high"] and speedup["target_half_width"] == 0.05
    timings = figures["paired_timings"]
    assert timings["interleaved"] == "per step"  # the two decodes took turns token by token
    assert timings["baseline_truncated"]  # `full` stopped where the policy did
    assert timings["groups"][:3] == [0, 1, 2] and set(timings["groups"][3:]) == {0, 1, 2}  # the same batches again
    units = timings["baseline_units"], timings["candidate_units"]  # generated tokens: the ratio is of ms/token
    assert sum(units[1][:3]) == figures["tokens"]  # the first pass is the decode that was scored
    recomputed = speedup_interval(
        timings["baseline_s"], timings["candidate_s"], timings["groups"], target_half_width=0.05, units=units
    )
    assert recomputed.as_dict() == speedup  # the record holds what it takes to check its figure
    assert speedup["verdict"] in {"faster", "slower", "no measurable difference"}
    assert figures["requests"] == 5 and figures["avg_exit_layer"] == 1.0  # quality and exits from one decode
    assert policies[:2] == ["full", "softmax"]  # the untimed warm-up of both
    timed = policies[2:]
    assert timed.count("full") == timed.count("softmax") == 13
    assert timed[:4] == ["full", "softmax", "softmax", "full"]  # alternating order
    assert set(figures["load"]) == {"load_avg_1m", "cpus", "cpu_mhz", "other_processes_cpu_cores", "busy"}
    assert "[" in efficiency_table(paired.efficiency_report())


def test_fewer_repeats_when_asked(paired):
    paired.set_policy(ExitPolicy(measure="softmax", threshold=0.0, min_exit_layer=1))
    paired.timing_min_repeats = 4
    paired.generate_until([generation_request(p, index=i) for i, p in enumerate(PROMPTS)], disable_tqdm=True)
    assert paired.efficiency_report()["task_a"]["paired_speedup"]["blocks"] == 3 + 4


def test_model_args_reach_self_speculation_and_pruned_checks(tiny_model_dir, lm):
    requests = [generation_request(p, index=i) for i, p in enumerate(PROMPTS[:3])]
    lm.set_policy(FULL)
    full = lm.generate_until(requests, disable_tqdm=True)
    speculative = MEELM(
        pretrained=str(tiny_model_dir),
        measure="fixed",
        min_exit_layer=2,
        decoding="self_speculative",
        max_draft=3,
        batch_size=2,
        device="cpu",
    )
    assert speculative.generate_until(requests, disable_tqdm=True) == full
    assert speculative.efficiency_report()["task_a"]["acceptance_rate"] is not None
    pruned = MEELM(pretrained=str(tiny_model_dir), measure="softmax", vocab_top_k=16, batch_size=2, device="cpu")
    assert pruned.get_model_info()["mee_policy"]["vocab_top_k"] == 16
