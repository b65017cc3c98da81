"""Chat templates under `--model mee` are lm-eval's `hf` model's: the same prompts, the same tokens fed to
the model, and under `measure=full` the same generated text, with a system instruction and few-shot
turns as a multi-turn chat (lm-eval's `apply_chat_template`, `system_instruction`, `fewshot_as_multiturn`)."""

from __future__ import annotations

import pytest

from mee_bench.harness.catalogue import TATOEBA_ENFR
from mee_bench.harness.lm_eval_model import MEELM, task_manager
from mee_bench.paths import data_root
from tests.helpers import TOKENIZER_DIR, tiny_causal_model

pytestmark = pytest.mark.skipif(data_root() is None, reason="needs the local data slices")

# A ChatML-like template that renders a system turn (lm-eval's `hf` drops the system turn only where
# a template refuses it)
TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
SYSTEM = "You translate English into French."
MAX_GEN_TOKS = 12


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.chat_template = TEMPLATE
    tiny_causal_model("llama", seed=0, vocab_size=len(tokenizer), layers=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def evaluate_with_chat(lm) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=[TATOEBA_ENFR.name],
        limit=3,
        num_fewshot=2,
        apply_chat_template=True,
        system_instruction=SYSTEM,
        fewshot_as_multiturn=True,
        log_samples=True,
        gen_kwargs=f"max_gen_toks={MAX_GEN_TOKS}",
        task_manager=task_manager(include_defaults=False),
    )


def samples(results: dict) -> list[tuple[str, str]]:
    """(prompt, generated text) of every request, in document order."""
    rows = sorted(results["samples"][TATOEBA_ENFR.name], key=lambda sample: sample["doc_id"])
    return [(row["arguments"][0][0], row["resps"][0][0]) for row in rows]


@pytest.fixture(scope="module")
def runs(chat_llama_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install -e '.[test]')")
    from lm_eval.models.huggingface import HFLM

    ours = MEELM(pretrained=str(chat_llama_dir), measure="full", batch_size=2, device="cpu")
    theirs = HFLM(pretrained=str(chat_llama_dir), backend="causal", batch_size=2, device="cpu")
    fed = {"mee": [], "hf": []}
    decode_steps = ours.generator.decode_steps

    def recording_decode_steps(input_ids, attention_mask, *args, **kwargs):
        fed["mee"] += [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        return decode_steps(input_ids, attention_mask, *args, **kwargs)

    model_generate = theirs._model_generate

    def recording_model_generate(context, max_length, stop, **kwargs):
        mask = kwargs["attention_mask"]
        fed["hf"] += [tuple(ids[row_mask.bool()].tolist()) for ids, row_mask in zip(context, mask)]
        return model_generate(context, max_length, stop, **kwargs)

    ours.generator.decode_steps = recording_decode_steps
    theirs._model_generate = recording_model_generate
    return {"mee": evaluate_with_chat(ours), "hf": evaluate_with_chat(theirs)}, fed, (ours, theirs)


def test_the_prompts_are_lm_evals_multiturn_chat_with_the_system_instruction(runs):
    results, _, lms = runs
    ours, theirs = samples(results["mee"]), samples(results["hf"])
    assert [prompt for prompt, _ in ours] == [prompt for prompt, _ in theirs]
    for prompt, _ in ours:
        assert prompt.startswith(f"<|system|> {SYSTEM} <|end|> <|user|> ")
        assert prompt.count("<|user|>") == 3 and prompt.count("<|assistant|>") == 3  # two shots, then the question
        assert prompt.endswith("<|assistant|> ")
    assert [lm.chat_template(True) for lm in lms] == [TEMPLATE, TEMPLATE]  # what lm-eval records with the results


def test_the_model_is_fed_the_same_tokens_as_by_lm_evals_hf_model(runs):
    _, fed, _ = runs
    assert len(fed["mee"]) == 3 and sorted(fed["mee"]) == sorted(fed["hf"])


def test_full_generates_the_same_text_as_lm_evals_hf_model(runs):
    results, _, _ = runs
    ours, theirs = samples(results["mee"]), samples(results["hf"])
    assert [text for _, text in ours] == [text for _, text in theirs]
    assert any(text.strip() for _, text in ours), (
        "the tiny model must write something for the comparison to mean anything"
    )


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_fix(tiny_llama_dir):
    lm = MEELM(pretrained=str(tiny_llama_dir), measure="full", device="cpu")
    with pytest.raises(
        ValueError,
        match=r"has no chat template, so --apply_chat_template cannot render the prompts; "
        r"drop --apply_chat_template",
    ):
        lm.apply_chat_template([{"role": "user", "content": "Hi"}])


@pytest.mark.slow
def test_the_lm_eval_cli_chat_flags_give_mee_the_prompts_and_text_of_hf(chat_llama_dir, tmp_path):
    """`lm_eval run --apply_chat_template --system_instruction ... --fewshot_as_multiturn`, once with
    `--model mee` and once with `--model hf`, side by side: the logged prompts and outputs are equal."""
    import json
    import subprocess
    import sys

    from mee_bench.harness.lm_eval_hook import DISABLE_ENV
    from tests.harness.test_lm_eval_cli_errors import CONSOLE_SCRIPT, TIMEOUT_S
    from tests.helpers import subprocess_env

    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install -e '.[test]')")
    model_args = {
        "mee": f"pretrained={chat_llama_dir},measure=full",
        "hf": f"pretrained={chat_llama_dir},backend=causal",
    }
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONSOLE_SCRIPT,
                "run",
                "--model",
                name,
                "--model_args",
                args,
                "--device",
                "cpu",
                "--tasks",
                TATOEBA_ENFR.name,
                "--limit",
                "2",
                "--num_fewshot",
                "1",
                "--apply_chat_template",
                "--system_instruction",
                SYSTEM,
                "--fewshot_as_multiturn",
                "--gen_kwargs",
                f"max_gen_toks={MAX_GEN_TOKS}",
                "--batch_size",
                "2",
                "--log_samples",
                "--output_path",
                str(tmp_path / name),
            ],
            cwd=tmp_path,
            env=subprocess_env(**{DISABLE_ENV: "1"}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in model_args.items()
    }
    logged = {}
    for name, process in processes.items():
        log = process.communicate(timeout=TIMEOUT_S)[0]
        assert process.returncode == 0, log[-4000:]
        (path,) = (tmp_path / name).rglob(f"samples_{TATOEBA_ENFR.name}_*.jsonl")
        rows = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda row: row["doc_id"])
        logged[name] = [(row["arguments"]["gen_args_0"]["arg_0"], row["resps"][0][0]) for row in rows]
    assert logged["mee"] == logged["hf"]
    assert all(prompt.startswith(f"<|system|> {SYSTEM} <|end|> <|user|> ") for prompt, _ in logged["mee"])
