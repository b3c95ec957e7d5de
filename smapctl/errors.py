"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

import re


class UserError(Exception):
    """A problem with the user's input (a file, an option, a recipe); `exit_code` is the process status."""

    exit_code = 1


class ConfigError(UserError):
    """A recipe or override that does not fit the config schema."""

    exit_code = 2


def describe(e: BaseException, fallback: str) -> str:
    """The first sentence of `e`'s message, for a one-line error; `fallback` when the message says
    nothing readable (torch.load raises `KeyError(<number>)` on a file of another format)."""
    text = str(e).strip().strip("'\"")
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return first if re.search(r"[A-Za-z]{3}", first) else fallback
