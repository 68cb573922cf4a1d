"""Daemon configuration from YAML into frozen dataclasses, shared by clsd, mlsd and the simulator.

1. `load_daemon_config` reads a daemon's command line (`--config FILE --set KEY=YAML ...
   --log-level LEVEL`), sets up logging and calls the config class's `load(path, overrides)`.
2. `load_yaml` reads the file and applies the dotted-key overrides (`engine.dtype`).
3. `from_dict` builds the dataclass tree: unknown keys and values of the wrong type are a
   `ConfigError` that names the key (`engine.block_size`); a dataclass's own `__post_init__`
   checks values and raises `ConfigError` too.

What the daemons' configs hold is theirs (mls/config.py, cls/config.py); nothing here knows a key.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def load_yaml(path: str | Path, overrides: dict | None = None) -> dict:
    """Reads a YAML mapping and applies dotted-key overrides (`engine.dtype`) to it."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():  # dotted keys reach nested sections
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot override {key}: {part} is not a section")
        node[leaf] = value
    return data


def from_dict(cls, data: dict, prefix: str = ""):
    """Builds dataclass `cls` from a mapping, recursing into nested dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}")
    kwargs = {}
    for name, value in data.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")
        else:
            kwargs[name] = _check(key, value, hint)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _check(key: str, value, hint):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def parse_overrides(items: list[str]) -> dict:
    """`--set KEY=YAML` arguments -> {dotted key: value}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def load_daemon_config(config_cls, prog: str, description: str, argv: list[str] | None):
    """A daemon's command line: `--config FILE [--set KEY=YAML ...] [--log-level LEVEL]`; sets
    up logging to stderr and returns the loaded config, or exit code 2 after printing why."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="override a key, e.g. --set grpc_port=0 --set engine.dtype=float32")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return config_cls.load(args.config, parse_overrides(args.set))
    except (ConfigError, OSError) as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
