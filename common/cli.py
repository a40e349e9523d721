"""One convention for every command: `error: ...` exits, defaults shown in --help, flags generated from config
dataclasses (one docstring per field is the flag's help).

Expected errors (bad input, missing files, impossible settings) are raised as `ValueError`, `FileNotFoundError`
or another `OSError` deep inside the code, with a message that names the file, line, key or flag and what to do;
`run_main` turns them into one `error: ...` line on stderr and exit status 1. Anything else is a bug and keeps its
traceback. Ctrl-C ends with one line and status 130.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Sequence, TypeVar

from .errors import UserError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, KeyError)
"""What counts as the user's mistake rather than a bug: reported in one line, no traceback. (Being narrowed to
UserError alone: see common/errors.py.)"""

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (not for required ones) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return action.help or ""
        return super()._get_help_string(action) or ""


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


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the house formatter; `prog` is the `python -m` form of the command."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def error_message(e: BaseException) -> str:
    """The one-line text of an expected error (KeyError's repr quotes are dropped)."""
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


class ErrorExit(SystemExit):
    """The SystemExit of `fail`: `.code` is the exit status, `str()` its `error: ...` line (already on stderr)."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def fail(message: str, code: int = 1) -> typing.NoReturn:
    """Exit with `error: message` on stderr and status `code`."""
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    raise ErrorExit(line, code)


def run_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`; expected errors become one `error: ...` line and exit 1, Ctrl-C one line and exit 130."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except EXPECTED_ERRORS as e:
        fail(error_message(e))


def entry_point(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a command's `main`: see `run_main`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_main(fn, *args, **kwargs)
    return wrapper


# --- flags from dataclass fields -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal right after `name: type = ...`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(p: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                       required: Sequence[str] = (), aliases: dict[str, Sequence[str]] | None = None,
                       defaults: dict[str, Any] | None = None, rename: dict[str, str] | None = None) -> None:
    """Add one `--name` flag per field of dataclass `cls`, typed from its annotation, its docstring as help.

    bool fields get `--name/--no_name`; list fields take several values; `Literal[...]` fields get choices.
    `required` fields have no default; `aliases` maps a field to extra flag spellings; `rename` gives a field's main
    flag another name (e.g. `inputs` -> `--input`); `defaults` overrides the dataclass defaults shown and used.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    aliases = aliases or {}
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _strip_optional(hints[f.name])
        flags = [f"--{(rename or {}).get(f.name, f.name)}", *aliases.get(f.name, ())]
        kw: dict[str, Any] = {"help": docs.get(f.name, ""), "dest": f.name}
        if f.name in required:
            kw["required"] = True
        elif f.name in defaults:
            kw["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kw["default"] = f.default_factory()  # type: ignore[misc]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = BooleanFlag
        elif origin in (list, tuple, Sequence):
            (item, *_) = typing.get_args(tp) or (str,)
            kw.update(nargs="+" if f.name in required else "*", type=item, metavar=f.name.rstrip("s").upper())
        elif origin is typing.Literal:
            choices = typing.get_args(tp)
            kw.update(choices=choices, type=type(choices[0]))
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        if optional and "default" not in kw and f.name not in required:
            kw["default"] = None
        p.add_argument(*flags, **kw)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """Build `cls` from the parsed flags that `add_dataclass_args` added (plus `extra` fields)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)
