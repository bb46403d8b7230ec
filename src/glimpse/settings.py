"""A setting is declared once: a dataclass field whose metadata carries its help, its allowed values and
how a flag's text becomes its value. From that one declaration come

- the check (`check_settings`, called by each configuration's `__post_init__`): a ValueError naming the
  field and what is allowed;
- the flat keyword arguments (`from_flat`, `to_flat`): vLLM-style names routed to nested sub-configs,
  an unknown name a TypeError that suggests the closest one;
- the command-line flags (`add_flags`, `from_namespace`): `name` -> `--kebab-name`, the type from the
  annotation, bools as `--x/--no-x`, defaults from the dataclass, one argument group per sub-config
  (vLLM's `EngineArgs` pattern); a setting without a default is given as a positional argument or as
  its flag (`glimpse serve M` is `glimpse serve --model M`, as vLLM accepts both).

It knows no particular configuration, so every layer may declare settings with it; it sits at the
bottom beside `glimpse.config` and is used by the engine, processing, server, bench and CLI alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What a value must be, in words for the error message ("> 0", "in [0, 1)"), and the test."""

    allowed: str
    test: Callable[[Any], bool]

    def holds(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):  # a value of the wrong type does not hold
            return False


POSITIVE = Rule("> 0", lambda v: v > 0 and not isinstance(v, bool))


def setting(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    choices: tuple[Any, ...] | None = None,
    rule: Rule | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    nargs: str | None = None,
) -> Any:
    """A dataclass field declared with everything its check and its flag need.

    `choices`: the allowed values; `rule`: a test for the others (None always passes, for optional
    fields); `parse`: flag text -> value where the annotation's type is not enough (e.g. JSON); `nargs`:
    argparse's, for a flag that takes several words (each is parsed and checked on its own)."""
    meta = {"help": help, "choices": choices, "rule": rule, "parse": parse, "metavar": metavar,
            "nargs": nargs}  # fmt: skip
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is not allowed for the field `f`, or None."""
    if value is None:
        return None
    choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
    if choices is not None and value not in choices:
        return f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
    if rule is not None and not rule.holds(value):
        return f"{f.name} must be {rule.allowed}, got {value!r}"
    return None


def check_settings(obj: Any) -> None:
    """Raise ValueError for the first field of a settings dataclass whose value is not allowed."""
    for f in dataclasses.fields(obj):
        problem = _problem(f, getattr(obj, f.name))
        if problem:
            raise ValueError(problem)


# ---------------------------------------------------------------------------------------- flat names


def _sub_config(f: dataclasses.Field, hints: dict[str, Any]) -> type | None:
    """The dataclass type of a field that holds a sub-config, else None."""
    kind = hints[f.name]
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def leaf_fields(cls: type) -> Iterator[tuple[tuple[str, ...], type, dataclasses.Field, Any]]:
    """(path of sub-config names, the class declaring it, field, its type) for every setting of `cls`,
    sub-configs opened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _sub_config(f, hints)
        if sub is None:
            yield (), cls, f, hints[f.name]
        else:
            for path, owner, leaf, kind in leaf_fields(sub):
                yield (f.name, *path), owner, leaf, kind


def setting_names(cls: type) -> list[str]:
    """The flat names of every setting of `cls`."""
    return [f.name for _, _, f, _ in leaf_fields(cls)]


def from_flat(cls: type, **values: Any) -> Any:
    """`cls` built from flat setting names, each routed to the sub-config that declares it."""
    leaves = {f.name: path for path, _, f, _ in leaf_fields(cls)}
    for name in values:
        if name not in leaves:
            close = difflib.get_close_matches(name, leaves, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{cls.__name__} got an unexpected setting {name!r}{hint}")
    return _build(cls, values, leaves, ())


def _build(cls: type, values: dict[str, Any], leaves: dict[str, tuple[str, ...]], at: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = _sub_config(f, hints)
        if sub is not None:
            kwargs[f.name] = _build(sub, values, leaves, (*at, f.name))
        elif f.name in values and leaves[f.name] == at:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def to_flat(obj: Any) -> dict[str, Any]:
    """Every setting of `obj` by its flat name (`from_flat(type(obj), **to_flat(obj))` rebuilds it)."""
    out: dict[str, Any] = {}
    for path, _, f, _ in leaf_fields(type(obj)):
        holder = obj
        for name in path:
            holder = getattr(holder, name)
        out[f.name] = getattr(holder, f.name)
    return out


# ---------------------------------------------------------------------------------------- flags


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _converter(f: dataclasses.Field, kind: Any) -> Callable[[str], Any]:
    """Flag text -> a checked value; argparse reports an ArgumentTypeError as a usage error."""
    parse = f.metadata.get("parse") or kind

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"invalid value {text!r}") from None
        problem = _problem(f, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    only: tuple[str, ...] | None = None,
) -> None:
    """One flag per setting of `cls`, in one argument group per sub-config. A field without a default is
    required, as a positional argument or as its flag (either, not both). `defaults` overrides the
    dataclass's for this parser (a setting given one is always a flag; `argparse.SUPPRESS` leaves flags
    not given out of the namespace); `only` keeps the named settings."""
    defaults = defaults or {}
    groups: dict[tuple[str, ...], Any] = {}
    for path, owner, f, annotation in leaf_fields(cls):
        if only is not None and f.name not in only:
            continue
        if path not in groups:
            about = (owner.__doc__ or "").strip().splitlines()
            groups[path] = parser.add_argument_group(owner.__name__, about[0] if about else None)
        group = groups[path]
        help_text = f.metadata.get("help")
        if f.default is MISSING and f.default_factory is MISSING and f.name not in defaults:
            metavar = f.metadata.get("metavar") or f.name.upper()
            either = group.add_mutually_exclusive_group(required=True)
            either.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text, metavar=metavar)
            either.add_argument(flag_name(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                                help=f"the same as {metavar}")  # fmt: skip
            continue
        default = defaults.get(f.name, _default(f))
        if default not in (None, argparse.SUPPRESS) and help_text and "default" not in help_text:
            help_text += " (default: %(default)s)"
        kind = _base_type(annotation)
        if kind is bool:
            group.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)  # fmt: skip
            continue
        group.add_argument(
            flag_name(f.name), dest=f.name, type=_converter(f, kind), default=default, help=help_text,
            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
            nargs=f.metadata.get("nargs"),
        )  # fmt: skip


def setting_values(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings of `cls` that parsed flags hold, by flat name (e.g. `LLM(**setting_values(...))`)."""
    names = set(setting_names(cls))
    return {k: v for k, v in vars(namespace).items() if k in names}


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """`cls` from parsed flags (settings the namespace lacks keep the dataclass's defaults)."""
    return from_flat(cls, **setting_values(cls, namespace))


__all__ = [
    "Rule",
    "POSITIVE",
    "setting",
    "check_settings",
    "leaf_fields",
    "setting_names",
    "from_flat",
    "to_flat",
    "add_flags",
    "setting_values",
    "from_namespace",
    "flag_name",
]
