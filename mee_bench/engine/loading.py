"""Loading a checkpoint for early exit: safetensors preferred, no remote code unless asked.

Also the dtype and device names every command accepts, checked in one place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mee_bench.paths import DEFAULT_MODEL_DIR


T5_MODEL_TYPES = ("t5", "mt5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A checkpoint that cannot serve as an early-exit T5."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use cpu or cuda")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device=cpu")
    return dev


def load_model(
    pretrained: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a T5-family seq2seq checkpoint and its tokenizer from a directory or a hub id.

    Safetensors weights are preferred; `trust_remote_code` stays off unless asked for.
    """
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    pretrained = str(pretrained or DEFAULT_MODEL_DIR)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    local = Path(pretrained).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{local} has no config.json: point `pretrained` at a saved T5 checkpoint directory")
    if not local.exists() and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1):
        raise ModelLoadError(
            f"checkpoint {pretrained!r} does not exist: pass an existing directory or a hub id such as google-t5/t5-small"
        )
    try:
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot load a config from {pretrained!r}: {err}") from err
    if config.model_type not in T5_MODEL_TYPES:
        raise ModelLoadError(
            f"{pretrained!r} is a {config.model_type!r} model; mee-bench runs T5-family encoder-decoders "
            f"({', '.join(T5_MODEL_TYPES)})"
        )
    model = T5ForConditionalGeneration.from_pretrained(
        pretrained, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    return model.to(dev).eval(), tokenizer
