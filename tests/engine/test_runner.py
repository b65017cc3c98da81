"""The model-family seam: T5 behind the `LayerRunner` protocol, and a second family as one class plus
one registry line, driven end to end through the unchanged decoding loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import RUNNERS, HeadRows, LayerRunner, build_runner, register_runner
from mee_bench.engine.t5 import T5LayerRunner
from tests.helpers import recorded_caches, tiny_model

FAKE_TYPE = "fake-test-lm"
LAYERS, VOCAB, CONFIDENT_LAYER, START, EOS = 4, 8, 2, 1, 5


@dataclass
class FakeCache:
    written: set[tuple[int, int, int]] = field(default_factory=set)  # (layer, batch row, position)


class FakeRunner:
    """A decoder-only toy family. Layer i (0-based) sets state channel i; the state's last channel
    holds the input token. The head predicts `token + 1` with a large margin once layer
    CONFIDENT_LAYER has run and is flat (every logit 0) before it."""

    is_encoder_decoder = False
    prefills_first_step = False

    def __init__(self, model) -> None:
        self.model = model
        self.num_layers, self.hidden_size = self.config_dims(model.config)
        self.start_token_id, self.eos_token_id = model.config.start_token_id, model.config.eos_token_id
        self.device, self.dtype = torch.device("cpu"), torch.float32

    @classmethod
    def config_dims(cls, config) -> tuple[int, int]:
        return config.num_layers, config.num_layers + 1

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        return None

    def start(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int) -> tuple[FakeCache, Tensor]:
        self.batch = input_ids.shape[0]
        return FakeCache(), torch.full((self.batch,), self.start_token_id, dtype=torch.long)

    def embed(self, token_ids: Tensor) -> Tensor:
        state = torch.zeros(*token_ids.shape, self.hidden_size)
        state[..., -1] = token_ids.float()
        return state

    def layer(self, index, hidden, cache, rows, positions, last_position) -> Tensor:
        batch_rows = torch.arange(self.batch) if rows is None else rows
        if isinstance(positions, int):
            positions = torch.full((batch_rows.numel(), hidden.shape[1]), positions)
        for row, row_positions in zip(batch_rows.tolist(), positions.tolist()):
            cache.written.update((index, row, position) for position in row_positions)
        return hidden + F.one_hot(torch.tensor(index), self.hidden_size).float()

    def copy_skipped_kv(self, first_skipped, hidden, cache, rows, position) -> None:
        for layer in range(first_skipped, self.num_layers):
            cache.written.update((layer, row, position) for row in rows.tolist())

    def logits(self, hidden: Tensor) -> Tensor:
        following = F.one_hot((hidden[..., -1].long() + 1) % VOCAB, VOCAB).float()
        return 10.0 * following * hidden[..., CONFIDENT_LAYER - 1 : CONFIDENT_LAYER]

    def head_rows(self, token_ids: Tensor) -> HeadRows:
        return HeadRows(token_ids, weight=token_ids[:, None, :].float())

    def logits_for(self, hidden: Tensor, rows: HeadRows) -> Tensor:
        return self.logits(hidden).gather(-1, rows.token_ids[:, None, :].expand(-1, hidden.shape[1], -1))

    def approximate_logits(self, hidden: Tensor) -> Tensor:
        return self.logits(hidden).half()

    def final_norm(self, hidden: Tensor) -> Tensor:
        return hidden

    def head_parameters(self) -> list[Tensor]:
        return []

    def all_layer_states(self, input_ids, attention_mask, decoder_input_ids) -> list[Tensor]:
        states = [self.embed(decoder_input_ids)]
        for index in range(self.num_layers):
            states.append(states[-1] + F.one_hot(torch.tensor(index), self.hidden_size).float())
        return states


@pytest.fixture
def fake_family():
    """The second family, registered the way a new runner module registers itself, removed afterwards."""
    register_runner(FAKE_TYPE)(FakeRunner)
    config = SimpleNamespace(model_type=FAKE_TYPE, num_layers=LAYERS, start_token_id=START, eos_token_id=EOS)
    yield SimpleNamespace(config=config)
    del RUNNERS[FAKE_TYPE]


def generate(model, policy: ExitPolicy):
    generator = EarlyExitGenerator(model)
    cache_writes: list[FakeCache] = recorded_caches(generator)
    out = generator.generate(torch.ones(2, 3, dtype=torch.long), None, policy, max_new_tokens=8)
    return out, cache_writes[0].written


def test_t5_runner_satisfies_the_protocol_and_is_registered_for_t5_and_mt5():
    runner = build_runner(tiny_model())
    assert type(runner) is T5LayerRunner and isinstance(runner, LayerRunner)
    assert RUNNERS["t5"] is RUNNERS["mt5"] is T5LayerRunner
    assert (runner.num_layers, runner.hidden_size, runner.is_encoder_decoder) == (4, 32, True)
    assert T5LayerRunner.config_dims(tiny_model(decoder_layers=3).config) == (3, 32)


def test_mt5_checkpoints_run_through_the_t5_runner():
    from transformers import MT5Config, MT5ForConditionalGeneration

    from tests.helpers import tiny_config

    torch.manual_seed(0)
    values = {k: v for k, v in tiny_config(vocab_size=64).to_dict().items() if k != "model_type"}
    model = MT5ForConditionalGeneration(MT5Config(**values)).eval()
    assert model.config.model_type == "mt5"
    ids = torch.randint(2, 64, (1, 5))
    out = EarlyExitGenerator(model).generate(ids, None, ExitPolicy("full"), max_new_tokens=6)
    assert out.tokens[0] == model.generate(ids, max_new_tokens=6, do_sample=False)[0, 1:].tolist()


def test_an_unsupported_model_is_a_clear_error_listing_the_supported_types():
    supported = "gemma3_text, gpt2, granite, llama, mistral, mt5, olmo2, phi3, qwen2, qwen3, smollm3, t5"
    with pytest.raises(ValueError, match=rf"no layer runner for model type 'bart'; supported model types: {supported}"):
        build_runner(SimpleNamespace(config=SimpleNamespace(model_type="bart")))


def test_a_second_family_is_one_class_and_one_registry_line(fake_family):
    runner = build_runner(fake_family)
    assert type(runner) is FakeRunner and isinstance(runner, LayerRunner)


@pytest.mark.parametrize("kv_strategy", ["copy", "deferred"])
def test_the_decoding_loop_exits_where_the_fake_family_is_confident(fake_family, kv_strategy):
    expected = [[2, 3, 4, 5]] * 2  # START + 1, ... up to EOS
    out, written = generate(
        fake_family, ExitPolicy("softmax", threshold=0.5, min_exit_layer=1, kv_strategy=kv_strategy)
    )
    assert out.tokens == expected
    assert out.exit_layers == [[CONFIDENT_LAYER] * 4] * 2
    if kv_strategy == "copy":  # every layer's K/V at every generated position: computed or copied
        assert written == {(layer, row, pos) for layer in range(LAYERS) for row in range(2) for pos in range(4)}

    full, written = generate(fake_family, ExitPolicy("full"))
    assert full.tokens == expected and full.exit_layers == [[LAYERS] * 4] * 2
    assert written == {(layer, row, pos) for layer in range(LAYERS) for row in range(2) for pos in range(4)}


def test_measures_facts_hold_on_the_fake_family(fake_family):
    fixed, _ = generate(fake_family, ExitPolicy("fixed", min_exit_layer=3))
    assert fixed.exit_layers == [[3] * 4] * 2 and fixed.tokens == [[2, 3, 4, 5]] * 2
    oracle, _ = generate(fake_family, ExitPolicy("oracle", min_exit_layer=1))
    assert oracle.exit_layers == [[CONFIDENT_LAYER] * 4] * 2  # the first layer whose top-1 never changes
    too_early, _ = generate(fake_family, ExitPolicy("fixed", min_exit_layer=1))
    assert too_early.tokens[0][0] == 0  # a flat head at layer 1: the exit really used layer 1's logits
