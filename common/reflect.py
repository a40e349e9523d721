"""The one reflection layer over config dataclasses: each field's help text, its value from YAML/TOML or the command
line, and its argparse flag, all read from the dataclass itself.

- Help: the string literal right under a field (`name: int = 3` then `\"\"\"What it does.\"\"\"`), read from the class
  source once per class (`field_help`).
- Values: `coerce(key, value, annotation)` checks and converts a value with pydantic's validation of the annotation
  (int, float, str, bool, `X | None`, `list[X]`, `dict`, `Literal[...]`), in lax mode plus three text forms a
  config or a flag may use: `1e5` for an int, `a,b` for a list and `none`/`null` for an optional. A bad value is a
  `UserError` naming the key.
- Flags: `add_dataclass_args` / `dataclass_from_args` build one flag per field whose values go through `coerce`.
- `with_defaults(**defaults)`: a subclass of a config dataclass that only changes some inherited defaults, without
  declaring those fields again (their type and help stay the base class's).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Callable, Sequence, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from .errors import UserError

T = TypeVar("T")
C = TypeVar("C", bound=type)


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` and its dataclass bases (a subclass's own wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in a REPL or generated: no help text, the flag still works
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved annotation (`from __future__ import annotations` leaves them as strings)."""
    return typing.get_type_hints(cls)


def split_optional(annotation: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


@functools.lru_cache(maxsize=None)
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    # Numbers may stand for text (a run name `7`); bool is not a number here, so `true` stays an error for str.
    return TypeAdapter(annotation, config=ConfigDict(coerce_numbers_to_str=True, strict=False))


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` (from YAML/TOML, or a command-line string) as the annotated type; a `UserError` naming `key` if it
    is not one."""
    inner, optional = split_optional(annotation)
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        return coerce(key, value, inner)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        for choice in choices:  # `2` from the command line is the choice 2, "2" the choice "2"
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise UserError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is list:
        # A YAML list, or from the command line YAML flow syntax ([a, b]) or comma-separated text.
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            item = (typing.get_args(annotation) or (Any,))[0]
            return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(items)]
    elif annotation is int and isinstance(value, str):
        try:  # PyYAML reads 1e5 as text; a whole number written so is still an int
            number = float(value.replace("_", ""))
        except ValueError:
            pass
        else:
            value = int(number) if number.is_integer() else value
    elif annotation in (int, float, str) and isinstance(value, bool):  # True is no number (nor text) here
        raise UserError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    elif annotation is Any:
        return value
    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError:
        raise UserError(f"{key}: expected {_type_name(annotation)}, got {value!r}") from None


def with_defaults(**defaults: Any) -> Callable[[C], C]:
    """Class decorator, applied under `@dataclass`: the decorated subclass changes these inherited fields' defaults
    only. Their types (and help) stay where they are declared, in the base class."""
    def apply(cls: C) -> C:
        base = cls.__mro__[1]
        inherited = {f.name: f for f in dataclasses.fields(base)}
        hints = field_types(base)
        own = dict(cls.__dict__.get("__annotations__", {}))
        for name, value in defaults.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}: with_defaults({name}=...) names no field of {base.__name__}")
            own[name] = hints[name]
            mutable = isinstance(value, (list, dict, set))  # each instance gets its own copy, as dataclass requires
            setattr(cls, name, dataclasses.field(default_factory=lambda v=value: copy.copy(v)) if mutable else value)
        # Inherited fields first in the annotations, as dataclass orders them anyway.
        cls.__annotations__ = {**{k: own[k] for k in defaults}, **{k: v for k, v in own.items() if k not in defaults}}
        return cls
    return apply


# --- flags ------------------------------------------------------------------------------------------------------

class BooleanFlag(argparse.Action):
    """`--name` sets True, `--no_name` sets False (underscores, like every other flag here)."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, required: bool = False,
                 help: str | None = None) -> None:
        strings = list(option_strings)
        for s in option_strings:
            if s.startswith("--"):
                strings.append(f"--no_{s[2:]}")
        super().__init__(strings, dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_dataclass_args(p: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                       required: Sequence[str] = (), aliases: dict[str, Sequence[str]] | None = None,
                       defaults: dict[str, Any] | None = None, rename: dict[str, str] | None = None) -> None:
    """Add one `--name` flag per field of dataclass `cls`, its value checked by `coerce`, its docstring as help.

    bool fields get `--name/--no_name`; list fields take several values; `Literal[...]` fields get choices.
    `required` fields have no default; `aliases` maps a field to extra flag spellings; `rename` gives a field's main
    flag another name (e.g. `inputs` -> `--input`); `defaults` overrides the dataclass defaults shown and used.
    """
    hints = field_types(cls)
    docs = field_help(cls)
    aliases = aliases or {}
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        annotation = hints[f.name]
        tp, optional = split_optional(annotation)
        flag = f"--{(rename or {}).get(f.name, f.name)}"
        kw: dict[str, Any] = {"help": docs.get(f.name, ""), "dest": f.name}
        if f.name in required:
            kw["required"] = True
        elif f.name in defaults:
            kw["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        else:
            kw["default"] = None
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = BooleanFlag
        elif origin in (list, tuple, Sequence):
            item = (typing.get_args(tp) or (str,))[0]
            kw.update(nargs="+" if f.name in required else "*", metavar=f.name.rstrip("s").upper(),
                      type=_flag_type(flag, item))
        elif origin is typing.Literal:  # argparse's own check and message: "invalid choice: 'c' (choose from ...)"
            choices = typing.get_args(tp)
            kw.update(choices=choices, type=type(choices[0]))
        else:
            kw["type"] = _flag_type(flag, annotation)
        p.add_argument(flag, *aliases.get(f.name, ()), **kw)


def _flag_type(flag: str, annotation: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return coerce(flag, text, annotation)
        except UserError as e:  # argparse prints it as `prog: error: argument --flag: ...` with the usage
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}: ")) from None
    convert.__name__ = _type_name(annotation)
    return convert


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """Build `cls` from the parsed flags that `add_dataclass_args` added (plus `extra` fields)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)
