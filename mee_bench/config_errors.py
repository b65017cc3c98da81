"""Config mistakes named in one line, and one loader, the same way for every typed config (sweep, training,
calibration).

Each config is a dataclass schema that OmegaConf fills from a YAML file and `key=value`
overrides. OmegaConf's own errors name the dataclass, not the user's key, and do not say
what was expected; these helpers check a layer against the schema first, so a message
names the key as written (`optim.lr`, `data.sources[0].path`), the closest valid key for a
typo, and the expected type for a wrong value. Torch-free, so any config module can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what to do."""


def closest(word: str, candidates: Sequence[str]) -> str:
    """The candidate most similar to `word` (there is always one, so messages can name it)."""
    return max(candidates, key=lambda c: (difflib.SequenceMatcher(None, word, c).ratio(), -len(c)))


def describe(hint: Any) -> str:
    """A schema type as a user reads it: `int or null`, `a list of float`, `a mapping with keys ...`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " or ".join("null" if arg is type(None) else describe(arg) for arg in args)
    if origin in (list, tuple):
        if args and dataclasses.is_dataclass(args[0]):
            return f"a list of mappings with keys {', '.join(f.name for f in dataclasses.fields(args[0]))}"
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(hint))}"
    return getattr(hint, "__name__", str(hint))


def _field_hint(schema: type, key: str, prefix: str, source: str) -> Any:
    """The type of `schema.key`, or the error that names the closest valid key."""
    hints = typing.get_type_hints(schema)
    if key not in hints:
        valid = [f.name for f in dataclasses.fields(schema)]
        raise ConfigError(
            f"unknown config key {prefix + key!r} in {source}; the closest valid key is "
            f"{prefix + closest(key, valid)!r} (valid here: {', '.join(valid)})"
        )
    return hints[key]


def _strip_optional(hint: Any) -> Any:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _bad_value(key: str, source: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"bad value for {key!r} in {source}: expected {describe(hint)}, got {value!r}")


def check_layer(layer: DictConfig, schema: type, source: str, prefix: str = "") -> None:
    """Refuse an unknown key (naming the closest valid one) or a wrongly typed value anywhere in `layer`,
    a partial config read from `source` (a file or the overrides) that will be merged over `schema`."""
    for key in layer.keys():
        declared = _field_hint(schema, str(key), prefix, source)
        hint, value = _strip_optional(declared), layer._get_node(key)
        element = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint) and not value._is_none():
            if not isinstance(value, DictConfig):
                raise _bad_value(f"{prefix}{key}", source, declared, _plain(value._value()))
            check_layer(value, hint, source, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(element) and isinstance(value, ListConfig) and not value._is_none():
            for index, item in enumerate(value):
                if isinstance(item, DictConfig):
                    check_layer(item, element, source, f"{prefix}{key}[{index}].")
    try:
        OmegaConf.merge(OmegaConf.structured(schema), layer)
    except OmegaConfBaseException as err:
        key = str(err.full_key or "").replace("[", ".").split(".")[0]
        hints = typing.get_type_hints(schema)
        if key not in hints:  # not a field's value: OmegaConf's own words are the best we have
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"bad value under {where} in {source}: {str(err).splitlines()[0]}") from None
        raise _bad_value(prefix + key, source, hints[key], _plain(layer.get(key))) from None


def key_hint(schema: type, dotted_key: str, source: str) -> Any:
    """The type at a dotted key (`optim.lr`, `data.sources.0.path`), or the error naming the closest valid key."""
    hint: Any = schema
    walked = ""
    for part in dotted_key.split("."):
        hint = _strip_optional(hint)
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            hint = _field_hint(hint, part, walked, source)
        elif origin is list and part.isdigit():
            hint = typing.get_args(hint)[0]
        elif origin is dict:
            hint = typing.get_args(hint)[1]
        else:
            raise ConfigError(
                f"config key {dotted_key!r} in {source} goes inside {walked.rstrip('.')!r}, which is {describe(hint)}"
            )
        walked += f"{part}."
    return hint


def apply_overrides(
    config: DictConfig, overrides: Sequence[str], schema: type, example: str, source: str = "the command-line overrides"
) -> None:
    """Apply `key=value` overrides (OmegaConf dotlist; `list.0.key` reaches into lists) to a config of `schema`,
    each key checked against the schema first; `example` shows a valid override in the error."""
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"override {item!r} is not key=value (e.g. {example})")
        hint = key_hint(schema, key, source)
        try:
            config.merge_with_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError, ValueError):
            raise _bad_value(key, source, hint, value) from None


def instantiate(config: DictConfig) -> Any:
    """The dataclass instance of a complete structured config, or the error naming a required key left unset."""
    try:
        return OmegaConf.to_object(config)
    except MissingMandatoryValue as err:
        raise ConfigError(f"config key {err.full_key!r} is required and missing") from None


def merge_checked(base: DictConfig, layer: DictConfig, schema: type, source: str) -> DictConfig:
    """`layer` merged onto `base` after every key and value of it was checked against `schema`."""
    check_layer(layer, schema, source)
    return OmegaConf.merge(base, layer)


def to_typed(schema: type, node: DictConfig | dict, validate: Callable[[Any], None]) -> Any:
    """A (possibly partial) mapping as a validated instance of `schema`."""
    if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is not schema:
        node = merge_checked(OmegaConf.structured(schema), OmegaConf.create(node), schema, "the config")
    config = instantiate(node)
    validate(config)
    return config


def load_typed(
    schema: type,
    path: str | Path,
    overrides: Sequence[str],
    validate: Callable[[Any], None],
    *,
    what: str,
    example_file: str,
    example_override: str,
) -> Any:
    """Read a YAML into `schema` with closest-key errors, apply dotlist overrides, name the config
    after its file when it names itself nothing, and validate: what `sweep` and `calibrate` share."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} config {path} does not exist; see {example_file} for an example")
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} config {path}: {str(err).splitlines()[0]}") from None
    merged = merge_checked(OmegaConf.structured(schema), loaded, schema, str(path))
    if "name" in {f.name for f in dataclasses.fields(schema)} and OmegaConf.is_missing(merged, "name"):
        merged.name = path.stem
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. {example_override})")
    if overrides:
        merged = merge_checked(merged, OmegaConf.from_dotlist(list(overrides)), schema, "the command-line overrides")
    return to_typed(schema, merged, validate)
