"""Typed configs: a dataclass per job, YAML merged onto it with omegaconf, then ``key=value`` overrides.

A misspelt key fails at start-up naming the key and the closest valid one; a wrong type names the key
and the expected type. Each job's schema lives beside its code (e.g. ``hi3d.data.render.RenderConfig``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from hi3d.errors import ConfigError

T = TypeVar("T")


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    import typing

    keys = []
    hints = typing.get_type_hints(schema)  # resolves string annotations (``from __future__ import annotations``)
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        t = hints.get(f.name, f.type)
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            keys += _valid_keys(t, prefix + f.name + ".")
    return keys


def _resolved_type(schema: type, key: str) -> str:
    import typing

    node: Any = schema
    for part in key.split("."):
        hints = typing.get_type_hints(node)
        if part not in hints:
            return "?"
        node = hints[part]
    return getattr(node, "__name__", str(node))


def _explain(schema: type, err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(schema)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        if not close:  # compare the last component only, within the same parent
            parent, _, leaf = key.rpartition(".")
            siblings = [k for k in valid if k.rpartition(".")[0] == parent]
            close = difflib.get_close_matches(leaf, [s.rpartition(".")[2] for s in siblings], n=1, cutoff=0.4)
            close = [(parent + "." if parent else "") + c for c in close]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    if isinstance(err, ValidationError):
        value = getattr(err, "msg", str(err)).split("\n")[0]
        return ConfigError(f"config key '{key}' in {source} expects {_resolved_type(schema, key)}: {value}")
    return ConfigError(f"bad config in {source}: {str(err).splitlines()[0]}")


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Schema defaults <- YAML file <- ``key=value`` overrides, checked against the dataclass ``schema``."""
    cfg = OmegaConf.structured(schema)
    layers: list[tuple[Any, str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((OmegaConf.load(path), str(path)))
        except Exception as e:  # yaml syntax errors
            raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        layers.append((OmegaConf.from_dotlist([item]), f"override '{item}'"))
    for layer, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _explain(schema, e, source) from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(schema, e, "config") from None


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config dataclass (for ``run.json``)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
