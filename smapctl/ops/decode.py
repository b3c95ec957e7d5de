"""A token file -> images again (`smapctl decode`): one PNG per image, named after the relative path the
file records (`output_names`), decoded from the stored prefix or a shorter one by the tokenizer that made
the file (its fingerprint is checked). A decode that stops before its last PNG takes its PNGs away again.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from smapctl.data.images import save_png, to_uint8
from smapctl.devices import default_device
from smapctl.errors import UserError
from smapctl.io import file_identity
from smapctl.ops.codes import UNKNOWN_LABEL, Codes, first_not_finite, load_codes
from smapctl.progress import progress

DECODED_MARK = ".smapctl-decoded"  # in a folder `decode` wrote PNGs into


@dataclass
class DecodeResult:
    out_dir: Path
    files: list[Path]
    prefix: int


def decode_tokens(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """indices (B, k) or latents (B, k, C), labels (B,) -> images (B, 3, H, W) in [-1, 1] (unclamped)."""
    if tokens.is_floating_point():
        return model.decode(tokens, labels)
    return model.decode_indices(tokens, labels)


def _exists(path: str) -> bool:
    """`Path.exists`, false for a path the system cannot even look up (a name over its length limit)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def output_names(paths: list[str]) -> list[str]:
    """Relative image paths -> distinct relative PNG names: the suffix becomes .png (`3/a.jpg` ->
    `3/a.png`); when two would clash (`a.jpg`, `a.png`), those keep their suffix (`a.jpg.png`). Paths that
    would leave the output folder are refused."""
    spelled = paths
    paths, names = [], []
    for p in spelled:
        path, name = _png_name(p)
        paths.append(path)
        names.append(name)
    if len(set(paths)) < len(paths):
        first: dict[str, int] = {}
        for i, p in enumerate(paths):
            j = first.setdefault(p, i)
            if j != i:  # one image would overwrite the other
                raise UserError(f"token file paths {spelled[j]!r} and {spelled[i]!r}: the same file, twice")
    if len(set(names)) == len(names):
        return names
    count = Counter(names)
    names = [
        p + ".png" if count[n] > 1 and not p.endswith(".png") else n
        for p, n in zip(paths, names, strict=True)
    ]
    # That can still clash (`a.jpg` and a file named `a.jpg.png`): every name still shared becomes its
    # path + ".png", which is unique as the paths are; repeat while that meets another file's name.
    spelled_out: set[int] = set()
    while True:
        count = Counter(names)
        clashing = [i for i, n in enumerate(names) if count[n] > 1 and i not in spelled_out]
        if not clashing:
            return names
        for i in clashing:
            names[i] = paths[i] + ".png"
            spelled_out.add(i)


def _png_name(spelled: str) -> tuple[str, str]:
    """A token file's relative image path -> (the path as pathlib spells it, `a/./b` and `a//b` being
    `a/b`; its name with the suffix `.png`). Plain paths (no empty, `.` or `..` part; a suffix that is
    neither the whole name nor a trailing dot) are cut as strings: pathlib took 36 s for ImageNet's 1.28M
    paths before a decode started; the rest go through pathlib, which refuses paths leaving the folder."""
    name = spelled.rpartition("/")[2]
    dot = name.rfind(".")
    plain = os.name == "posix" and not (  # (on Windows pathlib also splits at `\\` and knows drives)
        "//" in spelled
        or "/./" in spelled
        or "/../" in spelled
        or spelled.startswith(("/", "./", "../"))
        or spelled.endswith(("/.", "/.."))
    )
    if plain and 0 < dot < len(name) - 1:  # (a name with a dot inside is not `.` or `..`, nor empty)
        return spelled, spelled[: len(spelled) - len(name) + dot] + ".png"
    path = Path(spelled)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UserError(f"token file path {spelled!r}: not a relative path inside the output folder")
    return path.as_posix(), path.with_suffix(".png").as_posix()


@torch.inference_mode()
def decode_codes(
    codes_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    prefix: int | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    ends_command: bool = False,
) -> DecodeResult:
    """Decode a token file to one PNG per image under `out_dir` (names mirror the stored relative paths),
    from the stored prefix or a shorter one. `checkpoint` defaults to the one stored in the file; a
    tokenizer with another fingerprint is refused. A file already at one of those names (an earlier
    decode, or the very images tokenized: `-o` their folder) is replaced only with `overwrite`. A decode
    stopped before its last PNG is in place takes its PNGs away again; once it is, the decode is complete
    (with `ends_command`, `smapctl decode`, up to the command's end: `signals.CommandEnd`)."""
    from smapctl.io import writing_into
    from smapctl.train.signals import completed, stop_if_unheard

    codes_path, out_dir = Path(codes_path), Path(out_dir)
    codes = load_codes(codes_path)
    k = _decode_prefix(codes, prefix, codes_path)
    names = output_names(codes.paths)
    parents = _folders_of(names)
    folders = _missing_folders(out_dir, parents)  # created by this decode
    # The folder is held from before it is looked into (otherwise two decodes at once would each find their
    # names free, and leave a mix of both: shards are decoded into one folder one after another), made now
    # and removed again if nothing was written into it.
    _refuse_decode_folder(out_dir, names, parents)
    _refuse_long_names(codes_path, out_dir, names)
    with writing_into(out_dir):
        new = _new_names(out_dir, names, parents)
        _check_decode_folder(out_dir, names, overwrite, new)
        if overwrite:
            _refuse_names_of_one_file(codes_path, out_dir, names, new)
        device = default_device()
        tok = _tokenizer_of(codes_path, codes, checkpoint, device)
        written = _Written(codes_path, out_dir, names, new)
        mark = out_dir / DECODED_MARK
        marked = not os.path.lexists(mark)  # (a dangling link there: write_text made the file it names)
        complete = f"the {len(names)} PNGs are in {out_dir}; the decode is complete"
        try:
            if marked:  # later decodes (other shards of a dataset) may add theirs
                mark.write_text("PNGs written by `smapctl decode`; other decodes may add theirs here.\n")
            with progress(len(names), "decoding", "images") as bar:
                for start in range(0, len(names), batch_size):
                    rows = slice(start, start + batch_size)
                    images = _decoded(tok, codes, rows, k, device, codes_path)
                    for image, name in zip(images, names[rows], strict=True):
                        written.save(image, name)
                    bar.update(len(images))
                    if written.done < len(names):
                        stop_if_unheard()  # (then the PNGs it wrote are taken away, as for one heard)
            _sync_folders(written.files)
            # Every PNG is in place: complete up to the command's end (otherwise a signal as the folder is let
            # go, or at the final print, would exit 130 with the decode complete).
            if ends_command:
                completed(complete)
        except BaseException:  # a full disk, Ctrl-C: the PNGs this decode added are taken away again
            interrupted = sys.exc_info()[0] is KeyboardInterrupt
            if interrupted and written.all():
                # ... but once the last one is renamed into place (a signal in its folder's fsync, or as the
                # bar closes) the decode is complete: its PNGs stay (taking every PNG away and exiting 130
                # would throw a complete decode away).
                logging.getLogger("smapctl").warning("interrupted once every PNG was written: %s", complete)
                _sync_folders(written.files)
                if ends_command:
                    completed(complete)
                return DecodeResult(out_dir, written.files, k)
            _undo_decode(written, [mark] if marked else [], folders, k, interrupted)
            raise
        return DecodeResult(out_dir, written.files, k)


class _Written:
    """The PNGs a decode has attempted, in order (`done` of them written), and the identity of the file
    the last one replaces (`earlier`, with --overwrite). `new`: whether each name was free."""

    def __init__(self, codes_path: Path, out_dir: Path, names: list[str], new: list[bool]):
        self.codes_path, self.out_dir, self.names, self.new = codes_path, out_dir, names, new
        self.files: list[Path] = []
        self.done, self.earlier = 0, None
        self.seen = _FoldersSeen(codes_path, out_dir)

    def save(self, image: torch.Tensor, name: str) -> None:
        """The next PNG, uint8 (3, H, W), at `name` inside the output folder."""
        # Listed before it is written: a Ctrl-C inside save_png, after its rename, would leave it behind.
        path = self.out_dir / name
        self.files.append(path)
        new = self.new[len(self.files) - 1]
        self.earlier = None if new else file_identity(path)  # (the file an --overwrite replaces)
        if new and os.path.lexists(path):
            _refuse_one_file(self.codes_path, self.out_dir, self.names, self.files)
        self.seen.check(name, path)  # (its folder, when it is there already)
        save_png(image, path, sync_folder=False)  # (`_sync_folders`, once the last is written)
        self.done += 1
        self.seen.check(name, path)  # (a folder save_png made)

    def all(self) -> bool:
        """Every PNG in place, the last one too (a new one is there once renamed into place; one that
        replaces a file, once that file is another)."""
        files = self.files
        if len(files) < len(self.names) or not files:
            return False
        return files[-1].is_file() if self.new[-1] else file_identity(files[-1]) != self.earlier


def _sync_folders(files: list[Path]) -> None:
    """fsync each folder the decode wrote PNGs into, once, after the last: `save_png` left it to this, as
    a decode stopped before its end takes its PNGs away (on a busy disk each folder fsync takes as long as
    the PNG's own, and 30,000 PNGs would make 30,000 of them)."""
    from smapctl.io import fsync_dir, write_error

    for folder in dict.fromkeys(f.parent for f in files):
        try:
            fsync_dir(folder)
        except OSError as e:
            raise write_error(folder, e, "the decoded PNGs", kept="") from e


def _decode_prefix(codes, prefix: int | None, codes_path: Path) -> int:
    """The number of tokens to decode from: `prefix`, at most the file's (default: the file's)."""
    k = codes.prefix if prefix is None else prefix
    if not 0 <= k <= codes.prefix:
        raise UserError(f"--prefix {k}: out of range; {codes_path} holds {codes.prefix} tokens per image")
    return k


def _missing_folders(out_dir: Path, parents) -> list[Path]:
    """`out_dir` and the folders inside it the PNGs go to, those that do not exist yet."""
    made = {out_dir} | {out_dir / f for f in parents}
    return [p for p in made if not p.exists()]


def _decoded(tok, codes, rows: slice, k: int, device, codes_path: Path) -> torch.Tensor:
    """The images of `rows` of the token file from their first `k` tokens: uint8 (B, 3, H, W) on the CPU."""
    tokens = codes.tokens[rows, :k].to(device)
    decoded = decode_tokens(tok.model, tokens, codes.labels[rows].to(device))
    _check_finite(decoded, codes_path, codes.paths[rows])
    return to_uint8(decoded).cpu()


def _undo_decode(written: _Written, mark: list[Path], folders, k: int, interrupted: bool) -> None:
    """A decode that stopped: the PNGs it added (and `mark`, made by it) are removed with the folders it
    made, and what it did to the folder is said."""
    files, new, done = written.files, written.new, written.done
    added = [f for f, fresh in zip(files, new, strict=False) if fresh]
    removed = sum(os.path.isfile(f) for f in added)  # (False for a path the system refuses)
    _remove_new(added + mark, folders)
    replaced = sum(not fresh for fresh in new[:done])  # (a failed write keeps the earlier file) ...
    if len(files) > done and not new[done] and file_identity(files[done]) != written.earlier:
        replaced += 1  # ... but one stopped after its rename replaced it
    _say_undone(written.out_dir, removed, replaced, k, interrupted=interrupted)


def _check_finite(decoded: torch.Tensor, codes_path: Path, paths: list[str]) -> None:
    """Decoded images (B, 3, H, W) with a value that is not finite (latents edited to 1e30 overflow the
    decoder) would be written as black PNGs: a one-line error names the first such image instead."""
    bad = first_not_finite(decoded)
    if bad is not None:
        name = paths[bad]
        raise UserError(
            f"{codes_path}: the tokens of {name!r} decode to values that are not finite (edited by hand?)"
        )


def _tokenizer_of(codes_path: Path, codes, checkpoint, device):
    """The tokenizer that made `codes` (`checkpoint`, else the one the file names), loaded on `device`
    once the file is known to be its: same fingerprint, labels and token shapes it takes."""
    from smapctl.ops.load import load_tokenizer
    from smapctl.train import checkpoint as ckpt

    if checkpoint is None and not _exists(codes.checkpoint):
        raise UserError(
            f"{codes_path}: made by the tokenizer {codes.checkpoint}, which is not there (moved, or removed"
            " by its run's train.keep_checkpoints); pass that checkpoint's new place as --checkpoint, or"
            " tokenize the images again (another checkpoint is another tokenizer)"
        )
    if checkpoint is not None:  # a run folder: its checkpoint of the recorded name (as sample's --tokenizer)
        checkpoint = ckpt.same_step(Path(checkpoint).expanduser(), Path(codes.checkpoint))
    made_with = f"; {codes_path} was made with the {codes.weights} weights: name the checkpoint folder"
    tok = load_tokenizer(checkpoint or codes.checkpoint, codes.weights, device, weights_hint=made_with)
    if tok.fingerprint != codes.fingerprint:
        raise UserError(
            f"{codes_path}: made by another tokenizer ({codes.checkpoint}, fingerprint {codes.fingerprint}) "
            f"than {tok.path} ({codes.weights} weights, fingerprint {tok.fingerprint})"
        )
    if tok.model.cfg.class_condition and len(codes.labels) and int(codes.labels.min()) < 0:
        raise UserError(
            f"{codes_path}: inconsistent token file (images without a class, label {UNKNOWN_LABEL}, for a"
            f" class-conditioned tokenizer)"
        )
    _check_tokens_fit(codes_path, codes, tok)
    return tok


def _say_undone(out_dir: Path, removed: int, replaced: int, k: int, interrupted: bool) -> None:
    """What a decode that stopped half-way left: its new PNGs are gone; those it wrote over cannot be
    taken back."""
    logger = logging.getLogger("smapctl")
    if interrupted and not replaced:  # said: Ctrl-C would end it without a word
        logger.warning("interrupted: the %d PNGs this decode had written were taken away again", removed)
    if replaced:
        logger.warning(
            "%s: %d of its earlier PNGs were replaced by this decode (at %d tokens) before it stopped: the "
            "folder mixes two decodes; run again with --overwrite",
            out_dir, replaced, k,
        )  # fmt: skip


def _refuse_decode_folder(out_dir: Path, names: list[str], parents: set[str]) -> None:
    """Before the folder is made: the PNGs can all be written into `out_dir` (not inside a run's
    checkpoints, no file where a folder goes)."""
    from smapctl.io import file_in_the_way
    from smapctl.train.checkpoint import refuse_output_in_checkpoints

    refuse_output_in_checkpoints(out_dir)
    clash = next((n for n in names if n in parents), None)
    if clash is not None:
        raise UserError(f"token file paths: {clash!r} would be both an image and a folder of images")
    missing: set[Path] = set()  # folders not there yet: nothing under them is either, nor in the way
    for folder in sorted({out_dir} | {out_dir / f for f in parents}):  # (every folder, parents first)
        if folder.parent in missing:  # (walking each folder up instead took 50 s for one 2,000 deep)
            missing.add(folder)
            continue
        blocker = file_in_the_way(folder)
        if blocker is not None:
            raise UserError(f"{out_dir}: cannot write {folder}: {blocker} is a file, not a folder")
        if not folder.is_dir():
            missing.add(folder)


def _refuse_long_names(codes_path: Path, out_dir: Path, names: list[str]) -> None:
    """Before the folder is made: every PNG's path and each name in it, with the temp file's it is written
    to first, fit the file system's limits. Otherwise a token file naming an image over them would fail
    only once the PNGs before it are written (an hour of ImageNet's), and so would the clean-up that takes
    them away."""
    from smapctl.io import TEMP_NAME_EXTRA

    root = os.fsencode(os.fspath(out_dir) + "/")
    name_max, path_max = _limit(out_dir, "PC_NAME_MAX", 255), _limit(out_dir, "PC_PATH_MAX", 4096)
    for name in names:
        most = len(name) * 4 + TEMP_NAME_EXTRA  # (UTF-8: 4 bytes a character at most; most names stop here)
        if most <= name_max and len(root) + most < path_max:
            continue
        *folders, file = (len(os.fsencode(part)) for part in name.split("/"))
        longest = max([*folders, file + TEMP_NAME_EXTRA])
        size = len(root) + len(os.fsencode(name)) + TEMP_NAME_EXTRA
        if longest > name_max or size >= path_max:  # (PATH_MAX counts the closing NUL)
            shown = f"{name[:50]}...{name[-20:]}" if len(name) > 80 else name
            what = f"a name of {longest} bytes" if longest > name_max else f"a path of {size} bytes"
            limit = name_max if longest > name_max else path_max - 1
            raise UserError(
                f"{codes_path}: the image {shown!r} would be written in {out_dir} as {what} (with its temp"
                f" file's), over the system's limit of {limit}"
            )


def _limit(folder: Path, name: str, default: int) -> int:
    """The file system's limit `name` (os.pathconf) for `folder`, or for its nearest existing parent;
    `default` where the system does not say."""
    for p in (folder, *folder.parents):
        try:
            return os.pathconf(p, name)
        except (OSError, ValueError, AttributeError):  # missing; no such setting (Windows: no pathconf)
            continue
    return default


def _check_decode_folder(out_dir: Path, names: list[str], overwrite: bool, new: list[bool]) -> None:
    """Before the tokenizer is loaded, the folder held: `out_dir` holds no image the PNGs would be mixed
    with (a dataset folder of JPEGs would get the reconstructions added beside them), and none of their names
    unless `overwrite` (`new`: whether each is free, `_new_names`)."""
    from smapctl.data.images import first_other_image

    writing = set(names)
    if not (out_dir / DECODED_MARK).exists():  # not a folder decode wrote into
        other = first_other_image(out_dir, lambda folder, name: (folder / name).as_posix() in writing)
        if other is not None:
            raise UserError(
                f"{out_dir}: holds images that `smapctl decode` did not write ({other.relative_to(out_dir)});"
                " the decoded images would be mixed with them: choose another -o"
            )
    there = next((n for n, fresh in zip(names, new, strict=True) if not fresh), None)
    if there is not None and not overwrite:
        raise UserError(
            f"{out_dir}: {there} (one of the {len(names)} PNGs to write) exists already (an earlier decode,"
            " or the very images that were tokenized); pass --overwrite to replace them, or choose another -o"
        )


def _one_file(a: str, b: str, codes_path: Path, out_dir: Path) -> UserError:
    return UserError(
        f"{codes_path}: its images {a!r} and {b!r} are one file in {out_dir} (names that differ only in"
        " case or Unicode form, on a file system that does not tell such names apart, or a folder there"
        " linked to another): the second PNG would replace the first; choose another -o"
    )


def _refuse_one_file(codes_path: Path, out_dir: Path, names: list[str], files: list[Path]) -> None:
    """The PNG `files[-1]`, free as the decode started, is there now: the file system takes its name for
    one this decode wrote (`Cat/a.png` for `cat/a.png` on macOS or Windows, `café` composed for `café`
    decomposed on macOS; `y/a.png` for `x/a.png` through a link `y -> x`), where the second PNG would
    replace the first in silence: N PNGs said written, fewer there. Raised before it is written (the decode's
    clean-up then takes its PNGs away again); the other name is looked for only then."""
    other = next((i for i, f in enumerate(files[:-1]) if _same_file(f, files[-1])), None)
    first = names[other] if other is not None else "an earlier one"
    raise _one_file(first, names[len(files) - 1], codes_path, out_dir)


def _refuse_names_of_one_file(codes_path: Path, out_dir: Path, names: list[str], new: list[bool]) -> None:
    """--overwrite: two of the PNG names that are one file there already (as `_refuse_one_file` says; an
    earlier decode left it) are refused before the tokenizer is loaded. The file's identity of each name
    there, kept in numpy arrays (16 bytes a name, not a Python set of ImageNet's 1.28M)."""
    import numpy as np

    there = np.flatnonzero(~np.asarray(new, dtype=bool))
    ids = np.zeros((len(there), 2), dtype=np.uint64)
    for row, i in enumerate(there):
        try:
            st = os.lstat(os.path.join(out_dir, names[i]))
        except OSError:  # gone meanwhile: written as a new file
            continue
        ids[row] = st.st_dev, st.st_ino
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    same = np.flatnonzero((ids[order[1:]] == ids[order[:-1]]).all(axis=1) & (ids[order[1:]] != 0).any(axis=1))
    if len(same):
        a, b = sorted((int(there[order[same[0]]]), int(there[order[same[0] + 1]])))
        raise _one_file(names[a], names[b], codes_path, out_dir)


class _FoldersSeen:
    """The folders a decode writes PNGs into, each known by its identity on the file system: two of its
    folders that are one there (`Cat` and `cat` on macOS or Windows, `y` linked to `x`) would put two
    classes' PNGs into one folder in silence, the class of each lost. Refused at the first PNG of the
    second (a folder there already is looked at before it is written into, one save_png makes after)."""

    def __init__(self, codes_path: Path, out_dir: Path):
        self.codes_path, self.out_dir = codes_path, out_dir
        self.named: dict[str, tuple[int, int]] = {}  # relative folder -> (device, inode)
        self.by_id: dict[tuple[int, int], str] = {}

    def check(self, name: str, path: Path) -> None:
        folder = name.rpartition("/")[0]
        if folder in self.named:
            return
        try:
            st = os.stat(path.parent)
        except OSError:  # not made yet
            return
        key = self.named[folder] = (st.st_dev, st.st_ino)
        other = self.by_id.setdefault(key, folder)
        if other != folder:
            raise UserError(
                f"{self.codes_path}: its folders {other or '.'!r} and {folder or '.'!r} are one folder in"
                f" {self.out_dir} (names that differ only in case or Unicode form, on a file system that does"
                " not tell such names apart, or a folder there linked to another): their images would be"
                " mixed in it; choose another -o"
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _new_names(out_dir: Path, names: list[str], parents: set[str]) -> list[bool]:
    """For each relative PNG name, whether no file is at it in `out_dir`: looked up only in folders that
    exist, as strings (a Path per name took 10 s for ImageNet's 1.28M names before a decode started)."""
    root = os.fspath(out_dir)
    existing = {f for f in parents if os.path.isdir(os.path.join(root, f))}
    existing |= {""} if os.path.isdir(root) else set()
    return [n.rpartition("/")[0] not in existing or not os.path.lexists(f"{root}/{n}") for n in names]


def _folders_of(names: list[str]) -> set[str]:
    """Every folder (`a`, `a/b`, ...) the relative PNG names (`/`-separated, `output_names`) lie in."""
    folders: set[str] = set()
    for name in names:
        folder = name.rpartition("/")[0]
        while folder and folder not in folders:  # its parents are in already when it is
            folders.add(folder)
            folder = folder.rpartition("/")[0]
    return folders


def _check_tokens_fit(codes_path: Path, codes: Codes, tok) -> None:
    """The tokens are ones `tok` can decode (a file edited by hand would fail in the model with a
    traceback)."""
    cfg = tok.model.cfg
    if codes.num_tokens != cfg.num_latent_tokens or codes.discrete != cfg.discrete:
        raise UserError(
            f"{codes_path}: inconsistent token file ({codes.num_tokens} {codes.tensor_key} per image; the"
            f" tokenizer has {cfg.num_latent_tokens} {'indices' if cfg.discrete else 'latents'})"
        )
    if codes.discrete and codes.tokens.numel():  # none with --prefix 0
        size = cfg.regularizer.codebook_size
        low, high = int(codes.tokens.min()), int(codes.tokens.max())
        if low < 0 or high >= size:
            raise UserError(
                f"{codes_path}: inconsistent token file (indices {low}..{high}, codebook of {size})"
            )
    if not codes.discrete and codes.tokens.shape[-1] != cfg.token_dim:
        raise UserError(
            f"{codes_path}: inconsistent token file (latents of {codes.tokens.shape[-1]} channels; the"
            f" tokenizer's have {cfg.token_dim})"
        )


def _remove_new(files: list[Path], folders: list[Path]) -> None:
    """Remove `files` (those a failed decode added) and then the `folders` made for them, deepest first
    (one that holds anything else is kept)."""
    import contextlib

    for file in files:
        with contextlib.suppress(OSError):
            file.unlink()
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
