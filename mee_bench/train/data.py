"""Training examples with T5 task prefixes (or a decoder-only model's prompts), a token-budget
length-bucketed batch order, collation.

The batch order of an epoch is a pure function of (seed, epoch), so a restarted run
rebuilds it and continues at the saved position: same data order, no data state to pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from mee_bench.engine.causal import continuation_ids
from mee_bench.harness.data import numbered_jsonl
from mee_bench.harness.trained_for import TRAINING_TASKS
from mee_bench.paths import data_root

# A training source's `task` names the catalogue task whose prompt and reference it is read
# with, so a model is trained on exactly the inputs it is evaluated on.
TASKS = TRAINING_TASKS
IGNORE_INDEX = -100


class DataError(ValueError):
    """A training data source that is missing or malformed."""


@dataclass(frozen=True)
class TrainExample:
    source: str
    target: str


def resolve_data_path(path: str | Path) -> Path:
    """Absolute paths stay; relative ones are under the data root (`MEE_DATA_DIR` or ../shared/data)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = data_root()
    if root is None:
        raise DataError(f"data source {path} is relative but no data root exists; set MEE_DATA_DIR")
    return root / path


def read_examples(path: str | Path, task: str, limit: int | None = None, causal: bool = False) -> list[TrainExample]:
    """Examples of one JSON Lines source, in T5's prompt format or (`causal`) a decoder-only model's;
    a missing file or a bad line raises naming file and line."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} for {path}; use one of {', '.join(TASKS)}")
    path = resolve_data_path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist")
    examples = []
    for number, row in numbered_jsonl(path, DataError):
        try:
            prompt = TASKS[task].causal_prompt(row) if causal else TASKS[task].prompt(row)
            examples.append(TrainExample(prompt, TASKS[task].target(row)))
        except (KeyError, TypeError, IndexError) as err:
            raise DataError(f"{path}:{number}: not a {task} example (missing or wrong field {err})") from err
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"training data {path} holds no examples")
    return examples


def encode_pairs(
    tokenizer, examples: Sequence[TrainExample], max_source: int, max_target: int, causal: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of sources and targets (targets end with EOS). A decoder-only model's target continues
    its prompt (`continuation_ids`), so it gets no special tokens of its own (no BOS mid-sequence)."""
    sources = tokenizer([e.source for e in examples], truncation=True, max_length=max_source)["input_ids"]
    if causal:
        return sources, continuation_ids(tokenizer, [e.target for e in examples], max_target)
    return sources, tokenizer([e.target for e in examples], truncation=True, max_length=max_target)["input_ids"]


class TokenizedSource:
    """One source's examples as token id arrays (targets end with </s>)."""

    def __init__(
        self,
        name: str,
        examples: Sequence[TrainExample],
        tokenizer,
        max_source: int,
        max_target: int,
        causal: bool = False,
    ):
        self.name = name
        sources, targets = encode_pairs(tokenizer, examples, max_source, max_target, causal)
        self.sources = [np.asarray(ids, dtype=np.int32) for ids in sources]
        self.targets = [np.asarray(ids, dtype=np.int32) for ids in targets]

    def __len__(self) -> int:
        return len(self.sources)


class MixtureBatches:
    """Epochs of token-budget batches drawn from weighted sources, bucketed by length."""

    def __init__(
        self,
        sources: Sequence[TokenizedSource],
        weights: Sequence[float],
        batch_tokens: int,
        seed: int,
        bucket_batches: int = 50,
    ) -> None:
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.sources, self.batch_tokens, self.seed, self.bucket_batches = (
            list(sources),
            batch_tokens,
            seed,
            bucket_batches,
        )
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        main = int(np.argmax(self.weights))
        epoch_size = len(self.sources[main]) / self.weights[main]
        self.counts = [max(1, round(w * epoch_size)) for w in self.weights]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.source_lengths = np.concatenate([[len(x) for x in s.sources] for s in self.sources])
        self.target_lengths = np.concatenate([[len(x) for x in s.targets] for s in self.sources])
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = index - self.offsets[source]
        return self.sources[source].sources[local], self.sources[source].targets[local]

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches (global example indices) of one epoch, deterministic in (seed, epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        picks = []
        for number, (source, count) in enumerate(zip(self.sources, self.counts)):
            local = rng.choice(len(source), size=count, replace=count > len(source))
            picks.append(local + self.offsets[number])
        order = rng.permutation(np.concatenate(picks))
        mean_tokens = float(np.mean(self.source_lengths[order] + self.target_lengths[order]))
        bucket = max(1, int(self.bucket_batches * self.batch_tokens / mean_tokens))
        batches: list[np.ndarray] = []
        for start in range(0, len(order), bucket):
            chunk = order[start : start + bucket]
            chunk = chunk[np.argsort(self.source_lengths[chunk] * 1000 + self.target_lengths[chunk], kind="stable")]
            batches.extend(self._pack(chunk))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def _pack(self, sorted_indices: np.ndarray) -> Iterator[np.ndarray]:
        batch: list[int] = []
        longest_source = longest_target = 0
        for index in sorted_indices:
            source, target = int(self.source_lengths[index]), int(self.target_lengths[index])
            new_source, new_target = max(longest_source, source), max(longest_target, target)
            if batch and (new_source + new_target) * (len(batch) + 1) > self.batch_tokens:
                yield np.asarray(batch)
                batch, new_source, new_target = [], source, target
            batch.append(int(index))
            longest_source, longest_target = new_source, new_target
        if batch:
            yield np.asarray(batch)

    def collate(self, indices: np.ndarray, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> dict[str, Tensor]:
        return collate([self.example(int(i)) for i in indices], decoder_start_token_id, pad_token_id)


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], decoder_start_token_id: int = 0, pad_token_id: int = 0
) -> dict[str, Tensor]:
    """Padded encoder inputs, shifted-right decoder inputs and labels (-100 on padding)."""
    batch = len(pairs)
    source_len = max(len(s) for s, _ in pairs)
    target_len = max(len(t) for _, t in pairs)
    input_ids = torch.full((batch, source_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, source_len), dtype=torch.long)
    labels = torch.full((batch, target_len), IGNORE_INDEX, dtype=torch.long)
    decoder_input_ids = torch.full((batch, target_len), pad_token_id, dtype=torch.long)
    for row, (source, target) in enumerate(pairs):
        input_ids[row, : len(source)] = torch.as_tensor(np.asarray(source), dtype=torch.long)
        attention_mask[row, : len(source)] = 1
        target_t = torch.as_tensor(np.asarray(target), dtype=torch.long)
        labels[row, : len(target)] = target_t
        decoder_input_ids[row, 0] = decoder_start_token_id
        decoder_input_ids[row, 1 : len(target)] = target_t[:-1]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }
