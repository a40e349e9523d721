"""The one exception type for mistakes in the user's input.

`UserError` is raised where the cause is what the user gave: a file, a config key, a flag, a request field. Its
message names that thing and says what to do. `common.cli.run_main` prints it as one `error: ...` line with no
traceback; every other exception is a bug (or a transient failure such as a full disk) and keeps its traceback.

It subclasses ValueError so that callers (and tests) that catch ValueError keep working; `MissingFileError` is the
same for a file or folder that is not there, and is also a FileNotFoundError.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the file, line, key or field and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a named folder should hold) does not exist."""
