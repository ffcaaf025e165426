"""Typed configuration: dataclass schemas, OmegaConf YAML files and dotted command-line overrides.

``load_config(schema, path, overrides)`` merges, in order, the schema's defaults, the YAML file and
``key=value`` overrides (OmegaConf dotlist syntax), and rejects unknown keys with the closest
valid ones. The result is a typed OmegaConf object whose values were checked against the schema.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .utils.runtime import atomic_write


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


def _flat_keys(cfg: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig) and node._metadata.object_type is not None:
                keys.extend(_flat_keys(node, full + "."))
    return keys


def _check_keys(valid: Sequence[str], given: Iterable[str], source: str) -> None:
    valid_set = set(valid)
    for key in given:
        if key in valid_set:
            continue
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _given_keys(cfg: DictConfig, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        if isinstance(v, DictConfig):
            sub = _given_keys(v, full + ".")
            keys.extend(sub or [full])
        else:
            keys.append(full)
    return keys


def load_config(schema: type, path: Optional[Path] = None, overrides: Sequence[str] = ()) -> Any:
    """Build a typed config from a dataclass schema, a YAML file and ``key=value`` overrides."""
    base = OmegaConf.structured(schema)
    valid = _flat_keys(base)
    layers = [base]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        file_cfg = OmegaConf.load(path)
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path} must hold a YAML mapping at the top level")
        _check_keys(valid, _given_keys(file_cfg), str(path))
        layers.append(file_cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        cli = OmegaConf.from_dotlist(list(overrides))
        _check_keys(valid, _given_keys(cli), "the command line")
        layers.append(cli)
    try:
        cfg = OmegaConf.merge(*layers)
    except Exception as err:  # type errors from OmegaConf's validation
        raise ConfigError(f"invalid config value: {err}") from err
    return cfg


def save_config(cfg: Any, path: Path) -> None:
    """Write ``cfg`` as YAML, atomically: a resumed run reads it back."""
    data = OmegaConf.to_yaml(cfg).encode()
    atomic_write(path, lambda f: f.write(data))


def to_object(cfg: Any) -> Any:
    """The config as plain dataclass instances."""
    return OmegaConf.to_object(cfg)
