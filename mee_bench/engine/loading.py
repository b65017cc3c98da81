"""Loading a checkpoint for early exit: safetensors preferred, no remote code unless asked.

Also the one builder every entry point uses (`load_generator`: model, heads found beside
it and checked against it, generator), and the dtype, device and checkpoint-path checks
every command shares.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.heads import HEADS_FILE, ExitHeads, find_heads
from mee_bench.engine.runner import REFUSED, RUNNERS, runner_class, supported_model_types
from mee_bench.paths import DEFAULT_MODEL_DIR

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What FREE (Bae et al. 2023, `util/additional_args.py`) writes into the configs of its T5 checkpoints
# to drive its forked `modeling_t5.py`; transformers keeps them as plain attributes and nothing reads them.
FREE_CONFIG_KEYS = (
    "use_synchronize",
    "output_hidden_states_decoder",
    "intermediate_loss_fn",
    "distill_layer_alpha",
    "do_layer_transformation",
    "static_exit_layer",
    "use_early_exit",
    "exit_conf_type",
    "exit_conf_threshold",
    "exit_position_temp",
    "exit_min_layer",
    "train_meta_cm_head",
    "max_answer_length",
    "use_shallow_deep",
    "shallow_exit_layer",
    "shallow2deep_conf_type",
    "shallow2deep_conf_threshold",
    "parallel_gen_token",
    "copy_skipped_hidden_states",
    "rollback_conf_threshold",
    "parallel_causal_mask",
    "use_adapt_threshold",
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)
DEVICE_TYPES = ("cpu", "cuda")


class ModelLoadError(ValueError):
    """A checkpoint (or its exit heads) that cannot serve for early exit."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_device_name(device: str) -> None:
    """A device name we can run on, checked without asking whether this machine has it (a sweep
    driver checks the device of workers elsewhere)."""
    if str(device).split(":")[0] not in DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not supported; use cpu or cuda")


def resolve_device(device: str | None, cpu_fallback: bool = False) -> torch.device:
    """The device to run on; None picks CUDA when present. CUDA asked for where there is none is
    an error, or with `cpu_fallback` the CPU with a warning (the stock `lm_eval` command passes
    `--device cuda:0` unless told otherwise)."""
    cuda = torch.cuda.is_available()
    if device is None:
        return torch.device("cuda" if cuda else "cpu")
    check_device_name(device)
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device name; use cpu or cuda") from err
    if dev.type == "cuda" and not cuda:
        if not cpu_fallback:
            raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device=cpu")
        log.warning("device=%s was asked for but CUDA is not available; running on the CPU", device)
        return torch.device("cpu")
    return dev


def check_checkpoint_path(pretrained: str | Path) -> Path | None:
    """The local checkpoint directory `pretrained` names, or None for a hub id; a local path
    that is missing or holds no config.json is an error before anything loads."""
    text = str(pretrained)
    local = Path(text).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{local} has no config.json: point `pretrained` at a saved checkpoint directory")
    if not local.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise ModelLoadError(
            f"checkpoint {text!r} does not exist: pass an existing directory or a hub id such as google-t5/t5-small"
        )
    return local if local.exists() else None


def check_heads(heads: ExitHeads, num_layers: int, hidden_size: int, source: str | Path) -> None:
    """Heads trained for another model are refused: their width must match and, when the heads
    file records it, their depth too."""
    if heads.d_model != hidden_size:
        raise ModelLoadError(
            f"exit heads {source} were trained for d_model={heads.d_model}, but the model has d_model={hidden_size}; "
            "train heads for this model with `mee-bench train-heads MODEL`"
        )
    trained_layers = heads.metadata.get("num_layers")
    if trained_layers is not None and trained_layers != num_layers:
        raise ModelLoadError(
            f"exit heads {source} were trained for {trained_layers} decoder layers, but the model has {num_layers}; "
            "train heads for this model with `mee-bench train-heads MODEL`"
        )


def check_safetensors(path: str | Path, fix: str) -> None:
    """Refuse a safetensors file that cannot be read whole (a half-written download or save), naming
    it and `fix`; only the header is read, which is enough to see a file cut short."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # SafetensorError derives from Exception only, and OSError comes with it
        raise ModelLoadError(f"{path} is damaged or incomplete ({one_line(err)}): {fix}") from None


def read_heads(path: str | Path, num_layers: int, hidden_size: int) -> ExitHeads:
    """The exit heads file at `path`, refused with the fix when it is damaged or made for another model."""
    fix = f"retrain the heads with `mee-bench train-heads MODEL --force`, or delete {path}"
    check_safetensors(path, fix)
    try:
        heads = ExitHeads.load(path)
    except Exception as err:  # a header without our metadata, or tensors that do not fit it
        raise ModelLoadError(f"{path} is not an exit heads file mee-bench can read ({one_line(err)}): {fix}") from None
    check_heads(heads, num_layers, hidden_size, path)
    return heads


def load_heads(
    pretrained: str | Path, heads: str | Path | None, num_layers: int, hidden_size: int, required: bool = False
) -> tuple[ExitHeads | None, Path | None]:
    """The exit heads at `heads`, else those saved beside the model, checked against its shape."""
    path = find_heads(pretrained, heads)
    if path is None:
        if required:
            raise ModelLoadError(
                f"no exit heads beside {pretrained}: train them with `mee-bench train-heads MODEL` or pass heads=PATH"
            )
        return None, None
    return read_heads(path, num_layers, hidden_size), path


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_model(
    pretrained: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a checkpoint of a family with a layer runner, and its tokenizer, from a directory or a hub id.

    Safetensors weights are preferred; `trust_remote_code` stays off unless asked for.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    pretrained = str(pretrained or DEFAULT_MODEL_DIR)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    local = check_checkpoint_path(pretrained)
    try:
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # a config.json cut short is a JSONDecodeError, a ValueError
        raise ModelLoadError(
            f"cannot load a config from {pretrained!r} ({one_line(err)}): re-download or re-save the checkpoint"
        ) from None
    runner = runner_for_config(config, pretrained)
    log_ignored_config_keys(config, pretrained)
    fix = "re-download or re-save the checkpoint"
    for weights in sorted(local.glob("*.safetensors")) if local else ():
        if weights.name != HEADS_FILE:  # heads are checked when a policy needs them
            check_safetensors(weights, fix)
    # Safetensors only (no pickled weights); a decoder-only runner's explicit 4D masks need sdpa attention.
    auto = AutoModelForSeq2SeqLM if runner.is_encoder_decoder else AutoModelForCausalLM
    extra = {} if runner.is_encoder_decoder else {"attn_implementation": "sdpa"}
    try:
        model = auto.from_pretrained(
            pretrained, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **extra
        )
    except OSError as err:
        raise ModelLoadError(
            f"cannot load safetensors weights of {pretrained!r} ({one_line(err)}); mee-bench loads safetensors "
            f"only: {fix}, or re-save it with model.save_pretrained(path)"
        ) from None
    except (ValueError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load the weights of {pretrained!r} ({one_line(err)}): {fix}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers' own exception types share no base but Exception
        raise ModelLoadError(
            f"cannot load the tokenizer of {pretrained!r} ({one_line(err)}): re-download or re-save the tokenizer "
            "files (tokenizer.json / spiece.model, tokenizer_config.json) into that directory"
        ) from None
    log.info("loaded %s: a %s %s model (%s)", pretrained, model_kind(config), config.model_type, runner.__name__)
    return model.to(dev).eval(), tokenizer


def ignored_config_keys(config) -> dict:
    """The early-exit settings another framework left in a checkpoint's config (FREE's T5s), which
    mee-bench ignores: its exits follow its own policy, so a user should not think these apply."""
    return {key: getattr(config, key) for key in FREE_CONFIG_KEYS if hasattr(config, key)}


def log_ignored_config_keys(config, source: str | Path) -> None:
    ignored = ignored_config_keys(config)
    if ignored:
        log.warning(
            "%s carries FREE's early-exit config keys, which mee-bench ignores (its exit policy comes from "
            "model_args, a calibration or exit_policy.json): %s",
            source,
            ", ".join(f"{key}={value!r}" for key, value in ignored.items()),
        )


def model_kind(config) -> str:
    """'encoder-decoder' or 'decoder-only', as the registered runner treats `config`."""
    return "encoder-decoder" if runner_class(config.model_type).is_encoder_decoder else "decoder-only"


def runner_for_config(config, source: str | Path) -> type:
    """The runner class for a checkpoint's config, or one line naming what is supported."""
    families = _families()
    if config.model_type in RUNNERS:
        runner = runner_class(config.model_type)
        reason = getattr(runner, "refusal", lambda _: None)(config)
        if reason:
            raise ModelLoadError(f"{str(source)!r} is a {config.model_type!r} model mee-bench cannot run: {reason}")
        return runner
    if config.model_type in REFUSED:
        raise ModelLoadError(
            f"{str(source)!r} is a {config.model_type!r} model, which mee-bench does not run: "
            f"{REFUSED[config.model_type]}; supported: encoder-decoder {families['encoder-decoder']}; "
            f"decoder-only {families['decoder-only']}"
        )
    if _is_encoder_only(config):
        raise ModelLoadError(
            f"{str(source)!r} is an encoder-only {config.model_type!r} model, which cannot generate text; use an "
            f"encoder-decoder ({families['encoder-decoder']}) or decoder-only ({families['decoder-only']}) checkpoint"
        )
    raise ModelLoadError(
        f"{str(source)!r} is a {config.model_type!r} model, which mee-bench has no layer runner for; supported: "
        f"encoder-decoder {families['encoder-decoder']}; decoder-only {families['decoder-only']}"
    )


def _families() -> dict[str, str]:
    kinds: dict[str, list[str]] = {"encoder-decoder": [], "decoder-only": []}
    for model_type in supported_model_types():
        kinds["encoder-decoder" if runner_class(model_type).is_encoder_decoder else "decoder-only"].append(model_type)
    return {kind: ", ".join(types) for kind, types in kinds.items()}


def _is_encoder_only(config) -> bool:
    """A model with no generating head: saved as a masked-LM / classifier, or of a type that has
    neither a causal-LM nor a seq2seq class in transformers."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    encoder_heads = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
    if any(name.endswith(encoder_heads) for name in getattr(config, "architectures", None) or []):
        return True
    return config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        config.model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    )


def load_generator(
    pretrained: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    heads: str | Path | None = None,
    require_heads: bool = False,
    trust_remote_code: bool = False,
) -> EarlyExitGenerator:
    """Model, tokenizer and exit heads (at `heads`, else beside the model; checked against it) as one
    generator: what the demo, the lm-eval adapter and the benchmarks all start from.

    Heads are read when first needed (a policy with a learned measure), so `full` and the
    parameter-free measures run even beside a damaged heads file; `require_heads` reads them now.
    """
    pretrained = pretrained or DEFAULT_MODEL_DIR
    model, tokenizer = load_model(pretrained, dtype, device, trust_remote_code)
    dims = runner_class(model.config.model_type).config_dims(model.config)
    if require_heads:
        exit_heads, path = load_heads(pretrained, heads, *dims, required=True)
        return EarlyExitGenerator(model, tokenizer, exit_heads, path)
    path = find_heads(pretrained, heads)
    loader = functools.partial(read_heads, path, *dims) if path is not None else None
    return EarlyExitGenerator(model, tokenizer, heads_path=path, heads_loader=loader)
