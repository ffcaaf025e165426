"""The one error type for bad input.

A :class:`UserError` is a setting, a file or a model folder that cannot work, with a message that
names it and says how to fix it. ``run.py`` prints it without a traceback (exit status 2). Any
other exception is a bug, and keeps its traceback and a non-zero exit: a library that validates
its arguments for Python callers raises ``ValueError``, which a job that passes on a user's
setting must have checked (and turned into a ``UserError``) first.

It derives from ``ValueError`` so that Python callers who catch ``ValueError`` keep working.
"""

from __future__ import annotations

from enum import Enum
from typing import Type, TypeVar, Union

Choice = TypeVar("Choice", bound=Enum)


class UserError(ValueError):
    """Bad input, named with its fix."""


class InputFileError(UserError, FileNotFoundError):
    """An input file or folder that is missing or cannot be read, named with its fix."""


def as_choice(choices: Type[Choice], value: Union[Choice, str], key: str) -> Choice:
    """``value`` (a member or its value) as a member of the enum ``choices``; anything else is
    a :class:`UserError` naming ``key`` and listing the choices (for callers that build configs
    in Python; OmegaConf checks the ones loaded from files)."""
    try:
        return choices(value)
    except ValueError:
        names = ", ".join(str(c.value) for c in choices)
        raise UserError(f"unknown {key} {value!r}; {key} is one of {names}") from None
