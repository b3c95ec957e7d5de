"""The images that `--on-error skip` (tokenize, evaluate) or `data.on_error: skip` (training) left out:
counted, listed in a file, and summed up in one line at the end of the command (issue 8).

A list file holds one `<path>\\t<reason>` line per skipped image (tab-separated, so `cut -f1` gives the
paths). `SkipLog` is the form DataLoader workers can share: each appends its lines to one file, and the
main process reads them back at the end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from smapctl.data.images import BadImageError
from smapctl.errors import one_line

SKIPPED_FILE = "skipped_images.txt"
SHOWN = 3  # the summary line names this many of the skipped files
# A file name that is not valid UTF-8 (Python keeps its bytes as surrogates) is written back as those
# very bytes, so `cut -f1` of the list gives names that open the files.
FILE_NAMES = "surrogateescape"


def skip_summary(errors: Sequence[BadImageError], listing: str | os.PathLike | None = None) -> str:
    """'skipped 2 unreadable images (list: <listing>): <path>: <reason>; <path>: <reason>'."""
    n = len(errors)
    where = f" (list: {one_line(str(listing))})" if listing is not None else ""
    shown = "; ".join(one_line(str(e)) for e in errors[:SHOWN])  # a file name may hold a line break
    more = f"; and {n - SHOWN} more" if n > SHOWN else ""
    return f"skipped {n} unreadable image{'s' if n != 1 else ''}{where}: {shown}{more}"


def absolute(errors: Sequence[BadImageError]) -> list[BadImageError]:
    """`errors` with their paths absolute, their folders resolved (a file keeps its own name, a symlink's
    too): a list or report read later, from another folder, names files that can be found from there
    (an `evaluate --samples s` listed `s/0001_1_00003.png`)."""
    return [
        BadImageError(
            os.path.join(os.path.realpath(os.path.dirname(e.path) or "."), os.path.basename(e.path)), e.reason
        )
        for e in errors
    ]


def write_skip_list(errors: Sequence[BadImageError], path: str | os.PathLike) -> Path | None:
    """Write the list file of `errors` (atomically) and return its path; with no errors remove a list
    left by an earlier run (it would describe other images) and return None."""
    from smapctl.io import atomic_output

    path = Path(path)
    if not errors:
        path.unlink(missing_ok=True)
        return None
    with atomic_output(path, "the list of skipped images") as f:
        f.write(b"".join(_line(e) for e in errors))
    return path


def read_skip_list(path: str | os.PathLike, moved: dict[str, str] | None = None) -> list[BadImageError]:
    """The errors of a list file (each path once, first reason kept); [] when there is no file. `moved`
    ({old folder: new folder}) names the images of a folder moved since a line was written where they are
    now, so that an image met in both places is listed once."""
    path = Path(path)
    if not path.is_file():
        return []
    found: dict[str, BadImageError] = {}
    for line in path.read_bytes().decode("utf-8", FILE_NAMES).split("\n"):  # not splitlines: \f, \x1c...
        name, sep, reason = line.partition("\t")
        name = _relocate(_unescape(name), moved or {})
        if sep and name not in found:  # a torn last line (a killed writer) has no tab yet or is cut
            found[name] = BadImageError(name, reason)
    return list(found.values())


class SkipLog:
    """An append-only list file shared by processes: each `add` is one `write` of one line with
    O_APPEND, so lines from concurrent DataLoader workers do not interleave."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.moved: dict[str, str] = {}  # {old folder: new folder} of a run resumed on moved images

    def add(self, error: BadImageError) -> None:
        """Append one line; a failure to do so (disk full) loses the line, never the training run."""
        from smapctl.io import open_file_only

        try:  # (never through a symbolic link: a run folder from elsewhere may hold one to a file anywhere)
            fd = open_file_only(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, _line(error))
            finally:
                os.close(fd)
        except OSError:
            pass

    def read(self) -> list[BadImageError]:
        return read_skip_list(self.path, self.moved)

    def read_and_tidy(self) -> list[BadImageError]:
        """`read`, and the file rewritten with one line per image when it lists one more than once (a
        resumed run meets the images its earlier sessions skipped again) or names a moved folder's image
        where it was. A failed rewrite leaves the file as it was: its readers keep the first line of each
        path."""
        from smapctl.errors import UserError

        errors = self.read()
        try:
            written = self.path.read_bytes()
        except OSError:
            return errors
        if errors and written != b"".join(_line(e) for e in errors):
            try:
                write_skip_list(errors, self.path)
            except UserError:
                pass
        return errors

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def attach_skip_log(datasets, path: str | os.PathLike, *, fresh: bool) -> SkipLog | None:
    """Make every image-folder dataset among `datasets` (those with a `skip_log`) record what it skips
    in one `SkipLog` at `path`; a fresh run first clears a list an earlier one left. None when no
    dataset reads image files (the embedded ones cannot fail)."""
    folders = [d for d in datasets if hasattr(d, "skip_log")]
    if not folders:
        return None
    log = SkipLog(path)
    if fresh or os.path.islink(path):  # a link is not the run's list: a resumed run starts its own there
        log.clear()
    for d in folders:
        d.skip_log = log
    return log


def _relocate(name: str, moved: dict[str, str]) -> str:
    """`name` under the new folder of the first of `moved`'s old folders that holds it."""
    for old, new in moved.items():
        if name.startswith(old.rstrip(os.sep) + os.sep):
            return new.rstrip(os.sep) + os.sep + name[len(old.rstrip(os.sep)) + 1 :]
    return name


def _line(error: BadImageError) -> bytes:
    flat = " ".join(error.reason.split())  # one line whatever the decoder said
    return f"{_escape(str(error.path))}\t{flat}\n".encode("utf-8", FILE_NAMES)


# A file name may hold a tab or a line break (both legal on POSIX): written escaped, so that a line is one
# path and its reason; a backslash is doubled first.
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _escape(path: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in path)


def _unescape(text: str) -> str:
    out, chars = [], iter(text)
    for c in chars:
        if c == "\\":
            after = next(chars, "")
            c = _UNESCAPES.get(after, "\\" + after)  # an unknown escape (a list from before) as written
        out.append(c)
    return "".join(out)
