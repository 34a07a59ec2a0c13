"""YAML / JSON config files for the ``heal`` subcommands, validated against a dataclass.

A subcommand declares its options as a dataclass (the *schema*) and loads a file with
:func:`load_config`; every error is a ``ValueError`` that names the offending field, e.g.
``config.yaml: field 'mix.k': expected int, got str '32x'`` or ``unknown field 'sed' (known: ...)``.

Supported field types: ``str``, ``int``, ``float`` (ints accepted), ``bool``, ``Optional[T]``,
``List[T]`` / ``Tuple[T, ...]``, ``Dict[str, T]``, ``Literal[...]``, ``Any`` and nested
dataclasses (a mapping in the file). If the schema has a ``validate()`` method it is called
after loading. Command-line values override file values with :func:`merge_args`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

__all__ = ["load_config", "config_from_dict", "merge_args", "read_config_file"]

T = TypeVar("T")


def option_style_keys(data: Dict[Any, Any], source: str) -> Dict[Any, Any]:
    """A config mapping with its keys spelled like the long options (``general-per-batch``) turned into
    the field names (``general_per_batch``); one key in both spellings is a ``ValueError``."""
    out: Dict[Any, Any] = {}
    spelled: Dict[Any, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in spelled:
            raise ValueError(f"{source}: keys {spelled[name]!r} and {key!r} name the same option; keep one")
        spelled[name] = key
        out[name] = value
    return out


def read_config_file(path) -> dict:
    """The mapping stored in a ``.yaml`` / ``.yml`` / ``.json`` file (an empty file gives ``{}``), its
    keys spelled as fields (``general_per_batch``) or as the command line's options
    (``general-per-batch``), returned as field names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if ext == ".json":
            data = json.loads(text) if text.strip() else {}
        elif ext in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
    except (json.JSONDecodeError, ImportError) as exc:
        raise ValueError(f"{path}: cannot parse: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{path}: cannot parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of field: value, got {type(data).__name__}")
    return option_style_keys(data, path)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, name: str):
    """``value`` checked against type ``tp`` (with small safe coercions); ValueError names ``name``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _convert(value, alt, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else
                         f"field '{name}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"field '{name}': must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"field '{name}': expected a mapping, got {type(value).__name__}")
        return config_from_dict(value, tp, prefix=name + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"field '{name}': expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        out = [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"field '{name}': expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"field '{name}': expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"field '{name}': expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"field '{name}': expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"field '{name}': expected str, got {type(value).__name__} {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ValueError(f"field '{name}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(data: Mapping[str, Any], schema: Type[T], *, prefix: str = "") -> T:
    """An instance of dataclass ``schema`` from ``data``, every field checked (see the module doc)."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(f"unknown field '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints.get(name, Any), prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing field '{prefix}{name}'")
    obj = schema(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def load_config(path, schema: Type[T]) -> T:
    """Read a YAML / JSON file and validate it against dataclass ``schema``.

    Errors are ``ValueError`` (prefixed with the path, naming the field) or ``FileNotFoundError``.
    """
    data = read_config_file(path)
    try:
        return config_from_dict(data, schema)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None


def merge_args(config: T, args, names: Optional[typing.Iterable[str]] = None) -> T:
    """``config`` with the argparse values that were given (not None) put over it, re-validated.

    ``names``: the fields to take from ``args`` (default: every field of the config that
    ``args`` has). Give argparse options ``default=None`` so that "not given" is visible.
    """
    fields = {f.name for f in dataclasses.fields(config)}
    names = fields if names is None else set(names)
    data = dataclasses.asdict(config)
    for name in names:
        if name not in fields:
            raise ValueError(f"unknown field '{name}'")
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    # round-trip through the schema so CLI values are type-checked like file values
    return config_from_dict(data, type(config))
