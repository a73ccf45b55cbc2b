"""The error contract of every command (moe-train, moe-plan, moe-export, moe-analyze-routing, moe-train-tokenizer).

Input the recipe refuses (a setting, a data or tokenizer file, the run directory, a checkpoint, an export target)
raises a ValueError whose message names the setting or file and says what to change; Hydra and OmegaConf refuse a
config they cannot compose or type with their own errors. `refuse_bad_input` turns either into one line on stderr and
exit status 2, printed by one rank, before anything is written. Any other exception is a bug in the recipe or a
library and keeps its traceback (exit status 1).
"""

import contextlib
import difflib
import os
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

EXIT_INVALID_INPUT = 2
CONFIG_ERRORS = (HydraException, OmegaConfBaseException)


@contextlib.contextmanager
def refuse_bad_input(prefix: str, speak: bool = True, config_only: bool = False) -> Iterator[None]:
    """Exit with status 2 and one line `prefix: message` on stderr for refused input.

    `speak=False` on every rank but one, where all ranks check the same input before any process group exists: the
    others exit quietly, a little later, so that a launcher that tears the job down when one rank exits lets the
    speaking rank print first. `config_only=True` around code whose ValueErrors are not the recipe's checks (a
    whole training run): only Hydra's and OmegaConf's refusals are turned into the message there.
    """
    try:
        yield
    except (*CONFIG_ERRORS, ValueError) as err:
        if config_only and not isinstance(err, CONFIG_ERRORS):
            raise
        _refuse(prefix, input_error_message(err), speak)


def input_error_message(err: Exception) -> str:
    """The one line for refused input: a check's ValueError, or Hydra's / OmegaConf's error in the recipe's words."""
    return config_error_message(err) if isinstance(err, CONFIG_ERRORS) else " ".join(str(err).split())


def _refuse(prefix: str, message: str, speak: bool) -> None:
    if speak:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    sys.exit(EXIT_INVALID_INPUT)


def check_output_folder(path: Path, setting: str) -> None:
    """A folder a command will create or write into: refuse a file in its place (or in the place of a folder above
    it) and a folder this user cannot write, before anything is written.

    Writability is os.access's answer, the kernel's permission check for this user: a read-only file system is
    refused for everyone, a folder without write permission for everyone but root.
    """
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ValueError(f"{setting}={str(path)!r}: {existing} is a broken symbolic link; remove it or point "
                             f"{setting} elsewhere.")
        existing = existing.parent
    if not existing.is_dir():
        where = "it is" if existing == path else f"{existing} is"
        raise ValueError(f"{setting}={str(path)!r}: {where} a file, not a folder; point {setting} at a folder (it "
                         "is created if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{setting}={str(path)!r}: this user cannot write into {existing}; point {setting} at a "
                         "folder you can write, or fix its permissions.")


# ---------------------------------------------------------------------------------------------------------------
# Hydra's and OmegaConf's refusals, in the recipe's words: one line that names the setting and what to do
# ---------------------------------------------------------------------------------------------------------------

_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _is_schema(section: object) -> bool:
    return isinstance(section, type) and hasattr(section, "__dataclass_fields__")


def _expected(section: type, key: str) -> str | None:
    """What the schema expects for `key` of the dataclass `section`, in words ("an integer", "a number or null")."""
    hint = typing.get_type_hints(section).get(key)
    if hint is None:
        return None
    optional = type(None) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin, items = typing.get_origin(hint), [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
    if origin in (list, tuple):
        count = f" {len(items)}" if origin is tuple and Ellipsis not in typing.get_args(hint) else ""
        words = f"a list of{count} {_PLURALS.get(items[0], 'values')}" if items else "a list"
    else:
        words = _KINDS.get(hint, getattr(hint, "__name__", str(hint)))
    return f"{words} or null" if optional else words


def unknown_key_message(key: str, section: type) -> str:
    known = [f.name for f in fields(section)]
    where, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean {where + '.' if where else ''}{close[0]}? " if close else ""
    return (f"{key} is not a setting ({where or 'the top level'} has no key {leaf!r}); {hint}"
            f"valid keys there: {', '.join(known)}.")


def config_error_message(err: BaseException) -> str:
    """One line for a config Hydra or OmegaConf refused: which setting, what is wrong, what to do."""
    cause = err
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if not isinstance(cause, OmegaConfBaseException):
        # Hydra's own (an unknown config group option, a malformed override): its message already says which.
        return " ".join(str(err).split("Config search path")[0].split())
    key = cause.full_key or ""
    section = cause.object_type if _is_schema(cause.object_type) else None
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and section is not None:
        if leaf not in {f.name for f in fields(section)}:
            return unknown_key_message(key, section)
    if isinstance(cause, MissingMandatoryValue):
        return f"{key} is required (it is ??? in the config); set it, e.g. {key}=..."
    if isinstance(cause, ValidationError) and section is not None:
        expected = _expected(section, leaf)
        if expected is not None:
            return f"{key}={cause.value!r} is not {expected}; set {key} to {expected}."
    if isinstance(cause, InterpolationResolutionError):
        return f"{key}: {str(cause.msg).splitlines()[0]}; fix the ${{...}} reference."
    first = str(cause.msg).splitlines()[0] if cause.msg else type(cause).__name__
    return f"{key}: {first}" if key else first


__all__ = ["CONFIG_ERRORS", "EXIT_INVALID_INPUT", "check_output_folder", "config_error_message", "input_error_message",
           "refuse_bad_input", "unknown_key_message"]
