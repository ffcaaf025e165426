"""Typed configuration: dataclass schemas, OmegaConf YAML files and dotted command-line overrides.

``load_config(schema, path, overrides)`` merges, in order, the schema's defaults, the YAML file and
``key=value`` overrides, and rejects unknown keys with the closest valid ones. An override's value
is taken as written when its key holds text (a prompt such as ``a mug #2: blue`` stays whole; one
pair of surrounding quotes is dropped, and ``null`` unsets an optional text); any other value is
YAML (``7``, ``false``, ``[a.png,b.png]``). The result is a typed OmegaConf object whose values,
interpolations included, were checked against the schema; every problem is a :class:`ConfigError`
naming the file or the override it is in.
"""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

from core.errors import UserError
from core.runtime import atomic_write


class ConfigError(UserError):
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
    # nodes, not values: reading a value would resolve its interpolation, which may name a key
    # of another layer (or none; that is reported once all layers are merged)
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not (node._is_none() or node._is_interpolation()):
            sub = _given_keys(node, full + ".")
            keys.extend(sub or [full])
        else:
            keys.append(full)
    return keys


def _yaml_problem(err: yaml.YAMLError, with_position: bool) -> str:
    problem = ": ".join(x for x in (getattr(err, "context", None), getattr(err, "problem", None))
                       if x) or str(err)
    mark = getattr(err, "problem_mark", None)
    if with_position and mark is not None:
        problem += f" (line {mark.line + 1}, column {mark.column + 1})"
    return problem


def _omegaconf_problem(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without its indented key and object-type lines."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def read_yaml(path: Path) -> DictConfig:
    """A YAML config file's mapping; a :class:`ConfigError` naming the file when it is missing,
    a directory, not text, empty, not YAML, or holds something other than a mapping."""
    path = Path(path)
    if path.is_dir():
        inside = path / "config.yaml"
        held = (f" ({path} holds {inside.name}: --resume {path} continues that run, "
                f"--config {inside} starts a new one with its settings)" if inside.is_file()
                else "")
        raise ConfigError(f"config file {path} is a directory, not a YAML file: give the path "
                          f"of a .yaml config file{held}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    not_text = f"config file {path} is not a YAML text file"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{not_text} (byte {err.start} is not UTF-8 text: an image or another "
                          "binary file?): give a .yaml config file") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err})") from None
    try:
        cfg = OmegaConf.load(io.StringIO(text))
    except yaml.reader.ReaderError as err:  # characters no text file holds (NUL, controls)
        char = err.character if isinstance(err.character, int) else ord(err.character)
        raise ConfigError(f"{not_text} (it holds the control character #x{char:02x} at "
                          f"character {err.position}: a binary file?): give a .yaml config "
                          "file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err, True)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_omegaconf_problem(err)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level (key: value lines), "
                          "not a list")
    # Refused rather than warned about: a file without a single setting is almost always a
    # mistake (a copy cut short, the wrong file, an editor that did not save), and running every
    # default would hide it behind a long run of something else. ``{}`` says "all defaults" on
    # purpose and is taken.
    if len(cfg) == 0 and yaml.compose(text, Loader=yaml.SafeLoader) is None:
        raise ConfigError(f"config file {path} is empty (no settings, only blank lines or "
                          "comments), which is almost always a mistake (a copy cut short, the "
                          "wrong file): write the settings to use, or {} to run the job's "
                          "defaults on purpose")
    return cfg


def _override(base: DictConfig, valid: Sequence[str], item: str) -> Tuple[DictConfig, List[str]]:
    """One ``key=value`` override as a config layer, and the keys it sets."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    _check_keys(valid, [key], "the command line")
    node: Any = base
    for part in key.split("."):
        node = node._get_node(part)
    try:
        if not isinstance(node, StringNode):
            layer = OmegaConf.from_dotlist([item])
        else:
            # YAML would cut "a mug #2" at its comment and read "a: b" as a mapping, "yes" as
            # True, "1e3" as 1000.0 and "*x" as an alias: a text key takes the text itself
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                text: Any = value[1:-1]
            else:
                text = None if value == "null" and node._is_optional() else value
            for part in reversed(key.split(".")):
                text = {part: text}
            layer = OmegaConf.create(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"the value of override '{item}' is not valid YAML "
                          f"({_yaml_problem(err, False)}): close its brackets, and quote an item "
                          "holding YAML's special characters (: # [ ] { } , * & !), e.g. "
                          f"'{key}=[\"a: b\", c]'") from None
    except OmegaConfBaseException as err:  # an interpolation's grammar
        raise ConfigError(f"override '{item}': {_omegaconf_problem(err)} "
                          "(a literal ${ is written \\${)") from None
    given = _given_keys(layer)
    _check_keys(valid, given, "the command line")
    return layer, given


def load_config(schema: type, path: Optional[Path] = None, overrides: Sequence[str] = ()) -> Any:
    """Build a typed config from a dataclass schema, a YAML file and ``key=value`` overrides."""
    cfg = OmegaConf.structured(schema)
    valid = _flat_keys(cfg)
    layers = []  # (layer, the keys it sets, where it comes from)
    if path is not None:
        file_cfg = read_yaml(path)
        given = _given_keys(file_cfg)
        _check_keys(valid, given, str(path))
        layers.append((file_cfg, given, str(path)))
    for item in overrides:
        layers.append((*_override(cfg, valid, item), f"the override '{item}'"))
    for layer, _, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:  # a value the schema's type refuses
            raise ConfigError(f"invalid config value in {source}: "
                              f"{_omegaconf_problem(err)}") from None
    try:
        # what every job does first; here, an interpolation to no key or to a value of the
        # wrong type is an error naming where it was set, not a traceback from inside the job
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        sources = [source for _, given, source in layers
                   if any(g == key or g.startswith(key + ".") or key.startswith(g + ".")
                          for g in given)]
        where = f" of {key}" + (f" in {sources[-1]}" if sources else "") if key else ""
        raise ConfigError(f"invalid config value{where}: {_omegaconf_problem(err)}") from None
    return cfg


def save_config(cfg: Any, path: Path) -> None:
    """Write ``cfg`` as YAML, atomically: a resumed run reads it back."""
    data = OmegaConf.to_yaml(cfg).encode()
    atomic_write(path, lambda f: f.write(data))


def to_object(cfg: Any) -> Any:
    """The config as plain dataclass instances."""
    return OmegaConf.to_object(cfg)
