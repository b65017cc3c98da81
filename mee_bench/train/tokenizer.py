"""A small SentencePiece vocabulary of our own, saved as a Hugging Face T5 tokenizer.

The T5 vocabulary (32k) lacks characters such as Ç, œ, Ê, À, ë, ï, so ~3% of French
references hold `<unk>`, and its LM head costs about four decoder layers of a small
model. An 8k unigram vocabulary with full character coverage, trained on the training
corpora, avoids both. Ids follow T5: pad 0, eos 1, unk 2, no bos.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterable, Iterator

from mee_bench.train.data import TrainExample

SPIECE_FILE = "spiece.model"


def _sentences(examples: Iterable[TrainExample]) -> Iterator[str]:
    for example in examples:
        yield example.source
        yield example.target


def train_sentencepiece(
    examples: Iterable[TrainExample],
    output_dir: str | Path,
    vocab_size: int = 8000,
    seed: int = 0,
    max_sentences: int = 400_000,
) -> Path:
    """Train a unigram SentencePiece model on the examples' sources and targets; return its directory.

    Long SQuAD contexts are repeated per question, so sentences are de-duplicated first.
    """
    import sentencepiece as spm

    unique = list(dict.fromkeys(s for s in _sentences(examples) if s.strip()))
    random.Random(seed).shuffle(unique)
    unique = unique[:max_sentences]
    buffer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(unique),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        byte_fallback=False,
        max_sentence_length=20_000,
        num_threads=2,
        minloglevel=2,
    )
    return save_t5_tokenizer(buffer.getvalue(), output_dir)


def save_t5_tokenizer(spiece_model: bytes, output_dir: str | Path):
    """Write the SentencePiece model and a T5 tokenizer built from it, loadable offline by AutoTokenizer."""
    from transformers import AutoTokenizer

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / SPIECE_FILE).write_bytes(spiece_model)
    (output / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", '
        '"unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 512}\n'
    )
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return output
