"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

import errno
import os
import pickle
import re
from typing import TypeVar


class UserError(Exception):
    """A problem with the user's input (a file, an option, a recipe); `exit_code` is the process status."""

    exit_code = 1
    # Under a launcher, an error every process meets alike (a recipe, an option, a file they all read)
    # is printed by the main process alone; one a process meets by itself (an image only it reads) by it.
    same_in_every_process = True
    # Raised by every process of a launcher at the same point, right after a collective they all
    # completed (the main process's problem shared with the others, `agreed`): none is left inside a
    # collective, so the CLI closes the process group as after a good end.
    agreed = False


E = TypeVar("E", bound=UserError)
SURROGATE = re.compile("[\ud800-\udfff]")  # what `os.fsdecode` makes of a name's bytes that are not UTF-8


def one_line(text: str) -> str:
    """`text` with its tabs and line breaks written as \\t, \\n and \\r: a file name may hold them (both
    legal on POSIX), and an error or warning naming it is one line. A name's bytes that are not UTF-8
    (Python holds them as lone surrogates, which a UTF-8 stdout refuses: the command ended in a
    UnicodeEncodeError traceback once its work was done) are written as \\xNN."""
    return escape_surrogates(text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t"))


def escape_surrogates(text: str) -> str:
    """`text` with a name's bytes that are not UTF-8 (the lone surrogates Python holds them as) written as
    \\xNN: what a UTF-8 stream or file can take."""
    return SURROGATE.sub(_escaped_surrogate, text)


def _escaped_surrogate(match: re.Match) -> str:
    """A lone surrogate as the byte it stands for (`os.fsdecode` maps byte 0xNN to U+DCNN), else as itself."""
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def agreed(error: E) -> E:
    """`error`, marked as one every process raises at the same point after a collective (see
    `UserError.agreed`)."""
    error.agreed = True
    return error


class ConfigError(UserError):
    """A recipe or override that does not fit the config schema."""

    exit_code = 2


def describe(e: BaseException, fallback: str) -> str:
    """The first sentence of `e`'s message, for a one-line error; `fallback` when the message says
    nothing readable (torch.load raises `KeyError(<number>)` on a file of another format)."""
    text = str(e).strip().strip("'\"")
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return first if re.search(r"[A-Za-z]{3}", first) else fallback


NOT_TORCH_FILE = "not written by torch.save, or damaged"


def refused_pickle(e: BaseException) -> bool:
    """True when `torch.load(weights_only=True)` refused a pickle that would build arbitrary objects."""
    return isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e)


def torch_load_reason(e: BaseException) -> str:
    """Why `torch.load(weights_only=True)` could not read a file (other than a `refused_pickle`): the
    message of a reader's or the system's error (a zip archive without its directory), else
    `NOT_TORCH_FILE`. A text file goes through the unpickler, whose `IndexError('pop from empty list')`,
    `KeyError(101)` or `EOFError` say nothing to the user."""
    if isinstance(e, OSError) and e.errno == errno.EINVAL and e.filename is None:
        # The zip reader seeking past the end of a file cut short: "[Errno 22] Invalid argument" read as
        # a bad command-line argument.
        return "truncated or damaged: it ends before its zip archive does"
    if isinstance(e, RuntimeError) and "central directory" in str(e):  # its end cut off, or not a zip
        return f"truncated, damaged or not written by torch.save: {describe(e, NOT_TORCH_FILE)}"
    if isinstance(e, RuntimeError | OSError):
        return describe(e, NOT_TORCH_FILE)
    return NOT_TORCH_FILE


def path_error(e: OSError) -> str | None:
    """One line for an OSError about a path that no code path turned into a UserError (a file name too
    long, a folder without permission met where none was expected): the path, shortened when long, and
    the system's reason. None when `e` names no path (then it is a fault, and its traceback is shown)."""
    if not isinstance(e.filename, str | bytes) or e.strerror is None:  # (an int: a file descriptor)
        return None
    names = [_shown(f) for f in (e.filename, e.filename2) if isinstance(f, str | bytes)]
    return f"{' -> '.join(names)}: {e.strerror.lower()}"


def no_temp_folder(e: OSError) -> str | None:
    """One line for Python's `tempfile` finding no folder it may write in ($TMPDIR, /tmp, /var/tmp and
    the current folder: a container with a read-only root file system), which names no path of its own:
    torch asks for one as it is imported, so every command stopped with a traceback. None for another
    error."""
    reason = e.strerror if isinstance(e, FileNotFoundError) and e.filename is None else None
    if not isinstance(reason, str) or not reason.startswith("No usable temporary directory"):
        return None
    return f"{reason[0].lower()}{reason[1:]}: set TMPDIR to a folder you may write"


def _shown(filename: str | bytes) -> str:
    """A path for a one-line message, its middle left out when long."""
    name = os.fsdecode(filename)
    return f"{name[:60]}...{name[-40:]} ({len(name)} characters)" if len(name) > 120 else name
