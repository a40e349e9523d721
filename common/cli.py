"""One convention for every command: `error: ...` exits and defaults shown in --help.
(Flags generated from config dataclasses live in common/reflect.py, with the config files' key checking.)

A mistake in the user's input (a file, a config key, a flag) is raised as `common.errors.UserError` (or
`MissingFileError`) with a message that names the file, line, key or flag and what to do; `run_main` turns it into
one `error: ...` line on stderr and exit status 1. Anything else, a KeyError from a bug as much as a full disk, is
not the user's input and keeps its traceback. Ctrl-C ends with one line and status 130.
"""
from __future__ import annotations

import argparse
import copy
import functools
import re
import sys
import typing
from typing import Any, Callable, TypeVar

from .errors import UserError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UserError,)
"""What counts as the user's mistake rather than a bug: reported in one line, no traceback."""

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every optional flag's default, once, and keeps the description's line breaks.

    argparse shows nothing, not even the default, for a flag without help text, and appends `(default: ...)` even
    when the help already says what the default means (`checkpoint tag (default: latest)`): both are handled here.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return (bool(action.option_strings) and not action.required and action.default is not argparse.SUPPRESS
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or re.search(r"[(\[]default[:s ]|%\(default\)", text):
            return text
        return super()._get_help_string(action) or ""


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the house formatter; `prog` is the `python -m` form of the command."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def error_message(e: BaseException) -> str:
    """The one-line text of a user error (a MissingFileError made like an OSError: `file: reason`)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).splitlines())


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
