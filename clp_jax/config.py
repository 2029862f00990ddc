"""Typed run configs: a YAML file plus `key.sub=value` overrides, validated into pydantic models.

Every mistake (unknown key, wrong type, bad YAML, bad override) becomes one `ClpError` line naming the
file or the command line, and the resolved config can be saved next to the run and loaded back.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import ConfigDict

from clp_jax.errors import ClpError
from clp_jax.files import atomic_open

CLI = "command line"


class ConfigModel(pydantic.BaseModel):
    """Base class of every config section: unknown keys are errors and assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


T = TypeVar("T", bound=ConfigModel)


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _section(annotation: Any) -> type[ConfigModel] | None:
    """The ConfigModel a field holds (also through `Section | None`), or None for a plain value."""
    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, ConfigModel):
            return arg
    return None


def _is_free_mapping(annotation: Any) -> bool:
    """A `dict[...]` field: overrides may set its keys, which no schema constrains."""
    return any(typing.get_origin(arg) in (dict, Mapping) or arg is dict for arg in _union_args(annotation))


def _unknown_key(schema: type[ConfigModel], key: str, dotted: str, source: str) -> ClpError:
    names = list(schema.model_fields)
    close = difflib.get_close_matches(key, names, n=1)
    prefix = dotted[: len(dotted) - len(key)]
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names) or 'none'}"
    return ClpError(f"{source}: unknown key '{dotted}' ({hint})")


def _check_keys(schema: type[ConfigModel], data: dict, prefix: str, source: str) -> None:
    """Fail on the first key of `data` (recursively, through sections) that `schema` does not define."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = schema.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            raise _unknown_key(schema, str(key), dotted, source)
        section = _section(field.annotation)
        if section is not None and isinstance(value, dict):
            _check_keys(section, value, f"{dotted}.", source)


def _read_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClpError(f"{path}: config file not found") from None
    except OSError as e:
        raise ClpError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ClpError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClpError(f"{path}: expected a mapping of config keys at top level, found {type(data).__name__}")
    return data


def _apply_override(schema: type[ConfigModel], data: dict, override: str) -> tuple[str, ...]:
    """Set one `a.b.c=value` in `data` (in place), checking each key against `schema`; returns its path."""
    key, sep, raw = override.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise ClpError(f"{CLI}: override '{override}' must look like 'section.key=value'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ClpError(
            f"{CLI}: override '{override}': value is not valid YAML ({type(e).__name__})"
        ) from None
    node: dict = data
    current: type[ConfigModel] | None = schema
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        annotation: Any = None
        if current is not None:
            field = current.model_fields.get(part)
            if field is None:
                raise _unknown_key(current, part, dotted, CLI)
            annotation = field.annotation
        if last:
            accepts_str = any(arg is str for arg in _union_args(annotation))
            if accepts_str and value is not None and not isinstance(value, str):
                value = raw.strip()  # `name=123` for a str field means the string "123"
            section = _section(annotation)
            if section is not None and isinstance(value, dict):
                _check_keys(section, value, f"{dotted}.", CLI)
            node[part] = value
            break
        if current is not None:
            section = _section(annotation)
            if section is None and not _is_free_mapping(annotation):
                raise ClpError(f"{CLI}: override '{override}': '{dotted}' is a value, not a section")
            current = section
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    return parts


def _error_line(err: Any, data: dict, source_of: Callable[[tuple], str]) -> str:
    """One line for a pydantic error: where, which dotted key, what was expected, what was found."""
    path: list[Any] = []
    node: Any = data
    for item in err["loc"]:  # stop at union-member tags and similar, which are not keys in the data
        if isinstance(node, dict) or (isinstance(node, list) and isinstance(item, int)):
            path.append(item)
            node = node.get(item) if isinstance(node, dict) else node[item]
        else:
            break
    dotted = ".".join(str(p) for p in path)
    where = source_of(tuple(path))
    if err["type"] == "missing":
        return f"{where}: missing required key '{dotted}'"
    found = repr(err.get("input"))
    found = found if len(found) <= 80 else found[:77] + "..."
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"{where}: bad value for '{dotted}': {msg} (found {found})"


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read the YAML file at `path` (if any), apply `overrides` in order, and validate into `schema`.

    An override replaces the whole value at its key; `section.key=value` creates absent sections.
    """
    source = str(path) if path is not None else "config"
    data = _read_yaml(path) if path is not None else {}
    _check_keys(schema, data, "", source)
    from_cli = [_apply_override(schema, data, o) for o in overrides]

    def source_of(loc: tuple) -> str:
        return CLI if any(loc[: len(p)] == p for p in from_cli) else source

    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise ClpError(_error_line(errors[0], data, source_of) + more) from None


def config_to_dict(cfg: ConfigModel) -> dict:
    """The resolved config as plain YAML-able data, in the schema's field order (defaults included)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: ConfigModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically: a temp file in the same folder, then `os.replace`."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    with atomic_open(path) as f:
        f.write(text)
