"""Typed dataclass configs: YAML in, ``key=value`` overrides, resolved YAML out, one validator, CLI options.

Every config in vlsurv is a (possibly nested) dataclass. ``load_config`` reads a YAML file,
applies dotted command-line overrides (``train.lr=1e-4``), and builds the dataclass with type
checks. Unknown keys and wrongly typed values raise ``ConfigError`` naming the dotted key and
the file, so a typo never silently falls back to a default.

Conventions of a config dataclass (litgpt style):

- every field has a one-line docstring, a string literal right under it (``field_docs`` reads them);
- a choice is a ``Literal`` type, a numeric range is declared once with ``bounded(default, ge=..., lt=...)``;
- ``__post_init__`` calls ``check_fields(self, section)``, which checks both and raises ``ConfigError`` naming
  ``section.field`` and what was expected; checks across fields follow it there;
- a command's options come from its dataclass through ``add_config_arguments``, so a default is written once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlsurv.errors import InputError
from vlsurv.files import read_yaml

T = TypeVar("T")


class ConfigError(InputError):
    """A config value or key that is not what the dataclass expects.

    ``field`` and ``expected`` are set when one field of one dataclass is wrong (``invalid``), so that
    ``from_dict`` can name it by its full dotted key and file.
    """

    def __init__(self, message: str, field: str | None = None, expected: str | None = None) -> None:
        super().__init__(message)
        self.field, self.expected = field, expected


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range of a numeric field (of each value, for a tuple); ``what`` names the value in messages."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    what: str = "a value"
    reason: str = ""

    def contains(self, value: float) -> bool:
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def describe(self) -> str:
        """``">= 1"``, ``"> 0"`` or ``"in [0, 1)"``."""
        low = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        high = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if low and high:
            opening, closing = "[" if low[0] == ">=" else "(", "]" if high[0] == "<=" else ")"
            return f"in {opening}{low[1]:g}, {high[1]:g}{closing}"
        operator, bound = low or high
        return f"{operator} {bound:g}"


BOUNDS = "bounds"


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    what: str = "a value",
    reason: str = "",
) -> Any:
    """A dataclass field with ``default`` whose value (each value, for a tuple) lies in the given range;
    ``check_fields`` enforces it. ``None`` is allowed when the field's type allows it."""
    return dataclasses.field(default=default, metadata={BOUNDS: Bounds(ge, gt, le, lt, what, reason)})


def invalid(section: str, name: str, expected: str, error: type[ConfigError] = ConfigError) -> ConfigError:
    """The error for field ``name`` of the config at dotted key ``section`` ("" at the top)."""
    key = f"{section}.{name}" if section else name
    return error(f"{key}: {expected}", field=name, expected=expected)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def check_fields(obj: Any, section: str = "", error: type[ConfigError] = ConfigError) -> None:
    """Check every field of dataclass ``obj``: a ``Literal`` field holds one of its values, a ``bounded``
    field lies in its range (``None`` passes where the type allows it). Raises ``error`` naming
    ``section.field``, what was expected and what was given. Call it first in ``__post_init__``."""
    hints = _hints(type(obj))
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        annotation, optional = _split_optional(hints[item.name])
        if optional and value is None:
            continue
        null = " or null" if optional else ""
        if typing.get_origin(annotation) is typing.Literal and value not in typing.get_args(annotation):
            allowed = list(typing.get_args(annotation))
            raise invalid(section, item.name, f"expected one of {allowed}{null}, got {value!r}", error)
        bounds: Bounds | None = item.metadata.get(BOUNDS)
        if bounds is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(bounds.contains(v) for v in values):
            reason = f" ({bounds.reason})" if bounds.reason else ""
            shown = values if isinstance(value, (list, tuple)) else value
            expected = f"expected {bounds.what} {bounds.describe()}{null}{reason}, got {shown}"
            raise invalid(section, item.name, expected, error)


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _coerce(value: Any, annotation: Any, key: str, source: str | None) -> Any:
    """Convert a YAML value to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}{_where(source)}: got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}{_where(source)}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}{_where(source)}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, source=source, prefix=key + ".")
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}{_where(source)}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}{_where(source)}: expected {len(args)} values, got {list(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or annotation is tuple) else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}{_where(source)}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}{_where(source)}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}{_where(source)}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}{_where(source)}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}{_where(source)}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}{_where(source)}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {prefix}{unknown[0]}{_where(source)} (known keys: {known})")
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError as err:
        if err.field is None:
            raise
        key = prefix + err.field
        message = f"{key}{_where(source)}: {err.expected}"
        raise type(err)(message, field=err.field, expected=err.expected) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}{_where(source)}: {err}") from err
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready structure of a dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(
    data: dict[str, Any], overrides: list[str], source: str = "command line"
) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} from the {source}: expected key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {k} is not a mapping")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {dotted} from the {source}: {raw!r} is not a YAML value "
                f"({getattr(err, 'problem', err)})"
            ) from err
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional), apply overrides, and build ``cls``."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        source = str(path)
        loaded = read_yaml(path, ConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        data = loaded or {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data, source=source)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML beside a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return path


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of dataclass ``cls``: the string literal right under it, on one line
    (none when the source is not installed)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _option_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keywords (type, choices, nargs, action) for a field of type ``annotation``."""
    annotation, _ = _split_optional(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin is tuple and args and args[-1] is not Ellipsis:
        return {"nargs": len(args), "type": args[0], "metavar": tuple(a.__name__.upper() for a in args)}
    if origin in (tuple, list):  # a list may be given empty (``--name`` alone), a tuple may not
        item = args[0] if args else str
        return {"nargs": "*" if origin is list else "+", "type": item, "metavar": item.__name__.upper()}
    return {"type": annotation}


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    required: tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One ``--field-name`` option per field of dataclass ``cls`` (``flags`` renames some), with the
    field's type, choices (``Literal``), default and docstring as help; ``required`` fields have no
    default. A bool field gives ``--name`` / ``--no-name``. ``config_from_args`` builds ``cls`` back."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for item in dataclasses.fields(cls):
        if item.name in skip or not item.init:
            continue
        flag = (flags or {}).get(item.name, "--" + item.name.replace("_", "-"))
        kwargs = _option_kwargs(hints[item.name])
        help_text = docs.get(item.name, "").replace("%", "%%")  # argparse formats help with %
        if item.name in (flags or {}) and not {"action", "choices", "metavar"} & set(kwargs):
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if item.name in required:
            kwargs["required"] = True
        else:
            default = item.default_factory() if item.default is dataclasses.MISSING else item.default
            kwargs["default"] = default
            if default is not None and "action" not in kwargs:  # BooleanOptionalAction adds its own
                help_text += f" (default: {_shown(default).replace('%', '%%')})"
        parser.add_argument(flag, dest=item.name, help=help_text, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """``cls`` from the options of ``add_config_arguments`` (plus ``values``); errors name the field."""
    names = {item.name for item in dataclasses.fields(cls) if item.init} - set(values)
    options = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return from_dict(cls, {**options, **values}, source="command line")
