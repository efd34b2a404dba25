"""YAML run configurations that map 1:1 onto a function's options (e.g. ``compress``).

A config file is a mapping ``option_name: value`` with the library parameter names (the CLI's
``--option-name`` with ``_`` for ``-``). Unknown keys are an error that names the key and suggests
the nearest valid one. Values are coerced and checked by :func:`coerce` from the field's type, the
same way for YAML values and for the CLI's strings, so both paths give the same errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from impq_onnx.errors import ConfigError
from impq_onnx.files import read_input
from impq_onnx.files import shown as printable

__all__ = ["read_config", "check_keys", "coerce", "suggest", "field_types", "load_yaml", "parse_yaml",
           "read_yaml_mapping", "MAX_INT_DIGITS"]

_NONE_WORDS = ("none", "null", "~")


def suggest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or a list of the valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"


def check_keys(mapping: Mapping[str, Any], valid: Iterable[str], source: str) -> None:
    valid = list(valid)
    for key in mapping:
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{key}'{suggest(str(key).replace('-', '_'), valid)}")


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in YAML file ``path`` (safe loader; an empty file is an empty mapping)."""
    path = Path(path)
    shown = printable(path)
    raw = read_input(path, MAX_YAML_BYTES, what, ConfigError)  # never blocks on a FIFO, never reads /dev/zero
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from exc
    data = parse_yaml(text, shown, what, ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values in the {what}, "
                          f"got {type(data).__name__}")
    return data


MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # counted with every alias expanded: an "alias bomb" of 370 bytes stops here
MAX_INT_DIGITS = 64  # no option, bit width or clip needs more; Python refuses to convert past 4300
_SIZE_CAP = 10**12  # expanded sizes are counted up to here (nested aliases multiply without bound)


def parse_yaml(text: str, source: str, what: str, error: type[Exception]) -> Any:
    """:func:`load_yaml` of the text of ``source`` (the file as shown), every refusal one line as ``error``."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    except ValueError as exc:
        raise error(f"{source}: {exc}") from exc
    except RecursionError as exc:
        raise error(f"{source}: the {what} is nested too deeply to be a {what}") from exc


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing (ValueError, before anything is built) a document whose aliases expand
    it past MAX_YAML_NODES values and past twice the values it writes out (an alias bomb; a large document
    without aliases, a big model's plan, is bounded by its file size instead), a key given twice in one mapping
    (YAML forbids it; PyYAML would keep the last silently) and integers of more than MAX_INT_DIGITS
    characters."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:  # the expanded size; aliases share the node they point to
            if id(n) not in sizes:
                sizes[id(n)] = 1  # a recursive alias counts once instead of looping
                _check_node(n)
                children = (n.value if isinstance(n, yaml.SequenceNode) else
                            [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else [])
                sizes[id(n)] = min(1 + sum(size(c) for c in children), _SIZE_CAP)
            return sizes[id(n)]

        expanded = size(node)
        if expanded > MAX_YAML_NODES and expanded > 2 * len(sizes):
            raise ValueError(f"more than {MAX_YAML_NODES} values once its aliases are expanded (an alias bomb?); "
                             "write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_node(n: yaml.Node) -> None:
    line = n.start_mark.line + 1
    if isinstance(n, yaml.ScalarNode) and n.tag == "tag:yaml.org,2002:int":
        digits = len(n.value.lstrip("+-").replace("_", ""))  # hex and octal too: 0xfff... is a long int
        if digits > MAX_INT_DIGITS:
            raise ValueError(f"line {line}: a number of {digits} digits; write one of at most {MAX_INT_DIGITS}")
    elif isinstance(n, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, _ in n.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                at = key.start_mark.line + 1
                if key.value in first:
                    raise ValueError(f"line {at}: the key {key.value[:80]!r} is given twice (first at line "
                                     f"{first[key.value]}); keep one")
                first[key.value] = at


def read_config(path: str | Path, valid: Iterable[str]) -> dict[str, Any]:
    """The mapping in YAML file ``path``, its keys checked against ``valid`` (``-`` read as ``_``)."""
    data: dict[str, Any] = {}
    for key, value in read_yaml_mapping(path).items():
        name = str(key).replace("-", "_")
        if name in data:  # target_bits and target-bits: one option given twice
            raise ConfigError(f"{printable(Path(path))}: the option '{name}' is given twice ('{key}' and its "
                              f"{'_' if '-' in str(key) else '-'} spelling); keep one")
        data[name] = value
    check_keys(data, valid, str(path))
    return data


def field_types(cls) -> dict[str, Any]:
    """``{field name: resolved type}`` of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def coerce(name: str, value: Any, tp, source: str = "option") -> Any:
    """``value`` (a YAML value or a CLI string) as type ``tp``; a one-line ConfigError otherwise."""
    base, optional = _optional(tp)
    if isinstance(value, str) and not value.strip():
        # ``--output "$OUT"`` with OUT unset: refused, not read as "not given" (an optional path would fall
        # back to its default and write where the user did not say)
        raise ConfigError(f"{source} '{name}': the value is empty; give a value"
                          f"{', or none to leave it unset' if optional else ''}")
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{source} '{name}': a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError) as exc:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, str(base))
        extra = " or none" if optional else ""
        raise ConfigError(f"{source} '{name}': {value!r} is not {kind}{extra}") from exc
    return value
