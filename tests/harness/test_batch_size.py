"""`batch_size=auto` and `auto:N` as lm-eval's `hf` model reads them: the largest batch that fits, found by
halving from `max_batch_size` on out-of-memory errors, detected again N times over the sorted requests;
on a CPU, the adapter's default batch size, said in one line."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from mee_bench.harness import batch_size as auto
from mee_bench.harness.batch_size import BatchSize, largest_fitting
from mee_bench.harness.lm_eval_model import MEELM

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def fits_up_to(limit: int, tried: list[int]):
    def try_batch(size: int) -> None:
        tried.append(size)
        if size > limit:
            raise out_of_memory()

    return try_batch


@pytest.mark.parametrize(
    ("value", "fixed", "detections", "shown"),
    [(8, 8, 1, "8"), ("8", 8, 1, "8"), ("auto", None, 1, "auto"), ("auto:3", None, 3, "auto:3")],
)
def test_batch_size_reads_lm_evals_forms(value, fixed, detections, shown):
    parsed = BatchSize.parse(value, "16")
    assert (parsed.fixed, parsed.detections, parsed.max_batch_size, parsed.describe()) == (fixed, detections, 16, shown)
    assert BatchSize.parse(value).max_batch_size == 64  # lm-eval's --max_batch_size default


def test_the_largest_fitting_batch_halves_from_the_start_on_out_of_memory_only():
    tried: list[int] = []
    assert largest_fitting(fits_up_to(5, tried), 64) == 4
    assert tried == [64, 32, 16, 8, 4]
    assert largest_fitting(fits_up_to(0, []), 64) == 1  # nothing fits: the run fails on its own error
    with pytest.raises(ValueError, match="not a memory error"):
        largest_fitting(lambda size: (_ for _ in ()).throw(ValueError("not a memory error")), 64)


def test_auto_n_detects_again_n_times_over_the_sorted_requests_with_the_longest_of_each_bucket():
    """Items are prompt lengths, longest first; a batch fits while size x length <= 64."""
    probed: list[tuple[int, int]] = []

    def probe(size: int, length: int) -> None:
        probed.append((size, length))
        if size * length > 64:
            raise out_of_memory()

    batch = BatchSize.parse("auto:2", 32)
    schedule = batch.scheduler(probe, CUDA)
    lengths = (32, 30, 20, 16, 8, 4, 2, 1)
    sizes = [schedule(pos, lengths) for pos in range(len(lengths))]
    assert sizes == [2, 2, 2, 2, 8, 8, 8, 8]  # 64 // 32 rounded down to a power of two; then 64 // 8
    assert {length for _, length in probed} == {32, 8}  # each bucket probed at its first (longest) request
    assert batch.chosen == {0: 2, 1: 8}
    reached = BatchSize.parse("auto:2", 4)
    never_probed_again = reached.scheduler(lambda size, length: probed.append((size, -1)), CUDA)
    assert [never_probed_again(pos, lengths) for pos in range(len(lengths))] == [4] * 8
    assert sum(length == -1 for _, length in probed) == 1  # the second bucket keeps max_batch_size unprobed


@pytest.fixture(scope="module")
def lm(tiny_llama_dir) -> MEELM:
    return MEELM(pretrained=str(tiny_llama_dir), measure="full", batch_size="auto:2", device="cpu")


def requests(count: int) -> list[Instance]:
    prompts = [" ".join(["word"] * (2 + 3 * i)) for i in range(count)]
    return [
        Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 4}), i, ("gen", i, 1))
        for i, p in enumerate(prompts)
    ]


def test_auto_on_a_cpu_runs_the_default_batch_size_and_says_so(lm, capsys):
    lm.batch_sizes.clear()
    texts = lm.generate_until(requests(3), disable_tqdm=True)
    assert lm.batch_size == "auto:2" and lm.batch_sizes == {0: 8, 1: 8}
    message = capsys.readouterr().err
    assert message.count("mee: batch_size=auto:2 on the CPU: running batch_size 8 (the adapter's default") == 1
    fixed = MEELM(pretrained=lm.pretrained, measure="full", batch_size=8, device="cpu")
    assert texts == fixed.generate_until(requests(3), disable_tqdm=True)


def test_auto_probes_the_adapters_own_decode_where_memory_errors_can_be_caught(lm, monkeypatch, capsys):
    """As on a GPU (the probe path made to run on the CPU): a decode of more than 2 rows runs out of memory,
    so batches of 2 run, and the texts are those of batch_size=2."""
    monkeypatch.setattr(auto, "PROBED_DEVICES", ("cuda", "cpu"))
    decode_steps = lm.generator.decode_steps
    batches: list[int] = []

    def limited(input_ids, *args, **kwargs):
        if input_ids.shape[0] > 2:
            raise out_of_memory()
        batches.append(input_ids.shape[0])
        return decode_steps(input_ids, *args, **kwargs)

    monkeypatch.setattr(lm.generator, "decode_steps", limited)
    lm.batch_sizes.clear()
    texts = lm.generate_until(requests(5), disable_tqdm=True)
    assert lm.batch_sizes == {0: 2, 1: 2}
    assert "mee: batch_size=auto:2: the largest batch that fits is 2" in capsys.readouterr().err
    monkeypatch.setattr(lm.generator, "decode_steps", decode_steps)
    fixed = MEELM(pretrained=lm.pretrained, measure="full", batch_size=2, device="cpu")
    assert texts == fixed.generate_until(requests(5), disable_tqdm=True)


def test_auto_scores_loglikelihoods_as_a_fixed_batch_does(lm):
    pairs = [("The house is", " wonderful."), ("A ", "cup of coffee"), ("one two three", " four")]
    scoring = [Instance("loglikelihood", {}, pair, i, ("ll", i, 1)) for i, pair in enumerate(pairs)]
    fixed = MEELM(pretrained=lm.pretrained, measure="full", batch_size=1, device="cpu")
    ours, theirs = lm.loglikelihood(scoring, disable_tqdm=True), fixed.loglikelihood(scoring, disable_tqdm=True)
    assert [score for score, _ in ours] == pytest.approx([score for score, _ in theirs], rel=1e-5)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
