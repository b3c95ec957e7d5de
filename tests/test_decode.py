"""smapctl decode: a token file back to PNGs, the same images as the model's own reconstructions; a decode
that stops takes its PNGs away again; every user error is one line."""

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import (
    fill_disk,
    record_fsyncs,
    shallow_recursion_limit,
    signal_after,
    sigterm_caught,
    temp_files,
)
from PIL import Image
from tiny_tokenizer import error_lines, run_cli
from tokenize_helpers import CLASSES, write_image

from smapctl.errors import UserError
from smapctl.ops.codes import load_codes
from smapctl.ops.decode import DECODED_MARK, decode_codes
from smapctl.ops.tokenize import tokenize_images


def test_png_names_cut_as_strings_are_the_names_pathlib_gives():
    """`_png_name` cuts plain paths as strings (fast) and leaves the rest to pathlib: both agree."""
    from smapctl.ops.decode import _png_name

    def pathlibs(spelled):
        path = Path(spelled)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            return None
        return path.as_posix(), path.with_suffix(".png").as_posix()

    for spelled in [
        *("a.jpg", "b/c.JPEG", "a/b.c.jpeg", "x.tar.gz", "a..jpg", "..a.jpg", "a.b/c", "a b/é ü.png"),
        *(".hidden", "a/.hidden", "a.", "a/b.", "noext", "a/b/noext", ".a.jpg", "a/...", "a\\b.jpg"),
        *("a//b.jpg", "./a.jpg", "a/./b.jpg", "a/b.jpg/", "a/b.jpg/.", "a/b/../c.jpg", "../c.jpg"),
        *(".", "..", "", "/abs.jpg", "//abs.jpg", "a/..", "a/.", "a/../..", ".../x.jpg"),
    ]:
        try:
            got = _png_name(spelled)
        except UserError:
            got = None
        assert got == pathlibs(spelled), spelled


def test_disk_full_while_decoding_names_the_image(tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys):
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    fill_disk(monkeypatch, only="1.png")  # full at the second image, 1/1.png
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "png")
    assert code == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'png' / '1' / '1.png'}: could not write the image (No space")
    # The image finished before it is taken away again, and the folders decode made: as before the run.
    assert not (tmp_path / "png").exists(), list((tmp_path / "png").rglob("*"))
    assert temp_files(tmp_path) == []


def test_disk_full_while_decoding_over_an_earlier_decode_keeps_the_earlier_image(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """`decode --overwrite` into an earlier decode, the disk full at 1/1.png: the earlier 1/1.png, the file
    of that name, is intact (not half-written, not taken away with the PNGs the decode added)."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    assert run_cli(capsys, "decode", codes, "-o", tmp_path / "png")[0] == 0
    target = tmp_path / "png" / "1" / "1.png"
    before = target.read_bytes()
    fill_disk(monkeypatch, only="1.png")  # full at the second image, 1/1.png
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "png", "--prefix", 1, "--overwrite")
    assert code == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {target}: could not write the image (No space")
    assert target.read_bytes() == before and temp_files(tmp_path) == []


def test_an_overwrite_decode_that_stops_says_the_folder_is_mixed(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys, caplog
):
    """Stopped half-way (a full disk, Ctrl-C), `decode --overwrite` into an earlier decode took its own new
    PNGs away but could not take back those it had replaced: the folder mixed two decodes without a word."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    assert run_cli(capsys, "decode", codes, "-o", tmp_path / "png")[0] == 0
    fill_disk(monkeypatch, only="1.png")  # full at the second image, 1/1.png
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "png", "--prefix", 1, "--overwrite")
    assert code == 1 and "Traceback" not in err
    assert (
        f"{tmp_path / 'png'}: 1 of its earlier PNGs were replaced by this decode (at 1 tokens) before it "
        "stopped: the folder mixes two decodes; run again with --overwrite"
    ) in caplog.text
    [error] = err.strip().splitlines()
    assert error.startswith(f"error: {tmp_path / 'png' / '1' / '1.png'}: could not write the image")


def test_an_out_folder_that_cannot_be_written_is_said_before_decoding(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """`decode -o OUT` into a folder without write permission (or on a read-only mount): said at once, in
    one line, before the tokenizer is loaded or an image decoded (os.access simulated: tests run as root)."""
    from smapctl.ops import decode

    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    out = tmp_path / "out"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == out else real(p, m, *a, **k))
    monkeypatch.setattr(decode, "decode_tokens", lambda *a, **k: pytest.fail("decoded first"))
    code, _, err = run_cli(capsys, "decode", codes, "-o", out)
    assert code == 1 and error_lines(err) == [
        f"error: {out}: could not write the output folder (Permission denied): write somewhere you may"
    ], err
    assert not any(out.iterdir())


def test_decode_refuses_a_folder_of_other_images_and_paths_that_cannot_be_written(
    tiny_vq_tokenizer, images, tmp_path, capsys
):
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    dataset = tmp_path / "dataset"  # the tokenized images as JPEGs: decode added PNGs beside them
    Image.open(images / "3" / "0.png").save((dataset / "3").mkdir(parents=True) or dataset / "3" / "0.jpg")
    code, _, err = run_cli(capsys, "decode", codes, "-o", dataset, "--overwrite")
    assert code == 1 and err.startswith(
        f"error: {dataset}: holds images that `smapctl decode` did not write (3/0.jpg)"
    )
    assert [p.name for p in dataset.rglob("*")] == ["3", "0.jpg"]

    out = tmp_path / "out"
    (out / "7").parent.mkdir()
    (out / "7").write_text("a file where a class folder goes")
    code, _, err = run_cli(capsys, "decode", codes, "-o", out)
    assert code == 1 and f"{out / '7'} is a file, not a folder" in err
    assert sorted(p.name for p in out.rglob("*")) == ["7"]  # 1/ and 3/ used to be written first

    data = torch.load(codes, weights_only=True)
    data["paths"][0] = "1/1.png/x.png"  # 1/1.png would be an image and a folder
    torch.save(data, tmp_path / "clash.pt")
    code, _, err = run_cli(capsys, "decode", tmp_path / "clash.pt", "-o", tmp_path / "c")
    assert code == 1 and "token file paths: '1/1.png' would be both an image and a folder" in err
    assert not (tmp_path / "c").exists()


def test_class_only_codes_decode_and_shards_share_a_folder(tiny_vq_tokenizer, images, tmp_path, capsys):
    """A --prefix 0 VQ file (the class-only decode) was a traceback from the index range check; a second
    token file (another shard of a dataset) could not be decoded into the folder of the first."""
    zero = tmp_path / "zero.pt"
    tokenize_images([images / "3"], zero, checkpoint=tiny_vq_tokenizer, prefix=0, workers=0)
    code, out, err = run_cli(capsys, "decode", zero, "-o", tmp_path / "out")
    assert code == 0 and "(k=0)" in out, err
    seven = tmp_path / "seven.pt"
    tokenize_images([images / "7" / "2.png"], seven, checkpoint=tiny_vq_tokenizer, workers=0)
    code, _, err = run_cli(capsys, "decode", seven, "-o", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["0.png", "1.png", "2.png"]


def test_a_second_decode_into_a_folder_being_written_is_refused(tiny_vq_tokenizer, images, tmp_path, capsys):
    """Two decodes into one folder at once each found their PNG names free and left a mix of both
    prefixes (320 PNGs at k=4, 5,680 at k=0): the second is refused in one line and writes nothing; the
    folder is open to the next decode (another shard) once the first has ended."""
    from smapctl.io import writing_into

    codes = tmp_path / "codes.pt"
    tokenize_images([images / "3"], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    out = tmp_path / "out"
    with writing_into(out):
        code, _, err = run_cli(capsys, "decode", codes, "-o", out, "--prefix", 0)
        assert code == 1 and error_lines(err) == [
            f"error: {out}: another smapctl command (a sample, decode or evaluate) is writing into it; wait"
            " for it to end, or choose another -o"
        ], err
        assert list(out.iterdir()) == []
    code, _, err = run_cli(capsys, "decode", codes, "-o", out, "--prefix", 0)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png"]


def test_decode_with_a_run_folder_trained_on_since_uses_the_checkpoint_that_made_the_tokens(
    tiny_kl_tokenizer, images, tmp_path, capsys
):
    """`decode --checkpoint RUN` (the run moved, and trained on since the tokens were made) took the run's
    newest checkpoint and refused it as another tokenizer; it means the run's checkpoint of the name the
    token file records, as `sample --tokenizer RUN` does. A run without it still means its newest."""
    from smapctl.train import checkpoint as ckpt

    codes = tmp_path / "c.pt"
    tokenize_images([images], codes, checkpoint=tiny_kl_tokenizer, workers=0)
    made_by = ckpt.latest_checkpoint(tiny_kl_tokenizer)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_kl_tokenizer, moved)
    meta = json.loads((made_by / ckpt.META).read_text())
    later = ckpt.checkpoint_dir(moved, meta["step"] + 1)
    shutil.copytree(made_by, later)  # a later save: another meta.json, another fingerprint
    (later / ckpt.META).write_text(json.dumps({**meta, "step": meta["step"] + 1}))
    code, _, err = run_cli(capsys, "decode", codes, "--checkpoint", moved, "-o", tmp_path / "png")
    assert code == 0, err
    assert len(list((tmp_path / "png").rglob("*.png"))) == len(load_codes(codes).paths)
    shutil.rmtree(moved / ckpt.CHECKPOINTS / made_by.name)  # only the later one: its newest, refused
    code, _, err = run_cli(capsys, "decode", codes, "--checkpoint", moved, "-o", tmp_path / "png2")
    assert code == 1 and "made by another tokenizer" in err


def test_a_decode_fsyncs_each_png_once_and_each_of_its_folders_once(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch
):
    # A decode of 30,000 PNGs into 10 folders fsynced a folder after every PNG: as long as the PNGs' own
    # fsyncs on a busy disk. A decode stopped before its end takes its PNGs away, so once at the end does.
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    synced = record_fsyncs(monkeypatch)  # (is a folder, inode) of each fsync
    result = decode_codes(codes, tmp_path / "png")
    pngs = {p.stat().st_ino for p in result.files}
    folders = {p.parent.stat().st_ino for p in result.files}
    assert len(pngs) == len(result.files) == sum(CLASSES.values()) and len(folders) == len(CLASSES)
    assert sorted(ino for is_dir, ino in synced if not is_dir and ino in pngs) == sorted(pngs)
    assert sorted(ino for is_dir, ino in synced if is_dir) == sorted(folders)  # once each, after the PNGs
    assert [is_dir for is_dir, _ in synced][-len(folders) :] == [True] * len(folders)


def test_a_decode_stopped_just_after_an_image_was_written_takes_it_away(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, caplog
):
    """A Ctrl-C that lands inside save_png after its rename (during the folder's fsync) left that PNG: the
    decode listed a file only once save_png returned, and the rerun was refused for it."""
    from faults import interrupt_after_write

    from smapctl.ops import decode, tokenize

    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    decode_codes(codes, tmp_path / "earlier")  # for the --overwrite case below
    calls = interrupt_after_write(monkeypatch, decode, at=2)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        decode_codes(codes, tmp_path / "png")
    assert len(calls) == 2 and not (tmp_path / "png").exists()
    assert "interrupted: the 2 PNGs this decode had written were taken away again" in caplog.text
    # Over an earlier decode (--overwrite), the one stopped after its rename has replaced its earlier PNG:
    # counted with those replaced (it was said to be taken away, and the folder not mixed).
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        decode_codes(codes, tmp_path / "earlier", prefix=1, overwrite=True)
    assert "2 of its earlier PNGs were replaced by this decode (at 1 tokens)" in caplog.text
    assert "taken away" not in caplog.text
    # tokenize, stopped before it had encoded anything, said nothing either.
    monkeypatch.setattr(tokenize, "_encode_files", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0, overwrite=True)
    assert f"interrupted: nothing written; {codes} is as it was" in caplog.text
    assert not (tmp_path / "codes.pt.partial").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python lost
def test_a_sigterm_python_lost_before_decode_stops_it_after_its_first_batch(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys, caplog
):
    """A SIGTERM Python lost as `decode` started ("Exception ignored in ...") let it run on, to be killed by
    the scheduler's SIGKILL that follows with its PNGs half written; now it stops after its first batch,
    as one heard then would: exit 143, the PNGs it wrote taken away again."""
    from faults import sigterm_lost_as_the_command_starts

    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    sigterm_lost_as_the_command_starts(monkeypatch)
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "png", "--batch-size", "2")
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    assert "interrupted: the 2 PNGs this decode had written were taken away again" in caplog.text
    assert not (tmp_path / "png").exists()


def test_a_decode_stopped_just_after_its_last_image_was_written_is_complete(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, caplog
):
    """A Ctrl-C inside the last save_png after its rename took every PNG of the complete decode away
    and exited 130: the decode is complete, and says so."""
    from faults import interrupt_after_write

    from smapctl.ops import decode

    codes = tmp_path / "codes.pt"
    n = len(tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0).codes.paths)
    calls = interrupt_after_write(monkeypatch, decode, at=n)
    with caplog.at_level(logging.WARNING):
        try:
            result = decode_codes(codes, tmp_path / "png")
        except KeyboardInterrupt:  # (a failure, not the end of the session)
            pytest.fail(f"the complete decode stopped: {caplog.text}")
    assert len(calls) == n and all(p.is_file() for p in result.files) and len(result.files) == n
    said = f"interrupted once every PNG was written: the {n} PNGs are in {tmp_path / 'png'}; the decode is"
    assert said + " complete" in caplog.text and "taken away" not in caplog.text


def test_an_overwrite_decode_stopped_before_its_last_image_replaced_the_earlier_one_is_not_complete(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, caplog
):
    """`decode --overwrite` over an earlier decode, a Ctrl-C in its last save_png before the rename: the
    earlier decode's file at that name is still there. Only a file there at all was unchecked (not that it
    is another than the one it replaces): the decode was said complete with its last PNG the earlier
    decode's. It is stopped, and says that the folder mixes two decodes."""
    from smapctl.ops import decode

    codes = tmp_path / "codes.pt"
    n = len(tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0).codes.paths)
    decode_codes(codes, tmp_path / "png")
    real, calls = decode.save_png, []

    def interrupted_before_the_last(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt
        real(image, path, *args, **kwargs)

    monkeypatch.setattr(decode, "save_png", interrupted_before_the_last)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        decode_codes(codes, tmp_path / "png", prefix=1, overwrite=True)
    assert "the decode is complete" not in caplog.text
    assert f"{n - 1} of its earlier PNGs were replaced by this decode (at 1 tokens)" in caplog.text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_command_ends_leaves_the_decode_complete(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys, caplog, signum
):
    """A signal as `decode` let go of its folder or printed its last line, every PNG in place, exited 130
    (143) without a word. Up to the command's end the decode ends as complete: exit 0, one line saying
    so, every PNG kept. A signal before its last PNG is in place still stops it and takes them away."""
    from faults import interrupt_after_write

    from smapctl import cli
    from smapctl.ops import decode

    name, codes, png = signal.Signals(signum).name, tmp_path / "codes.pt", tmp_path / "png"
    n = len(tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0).codes.paths)
    with sigterm_caught() as caught, caplog.at_level(logging.WARNING):
        signal_after(monkeypatch, cli.console, "print", signums := [signum])
        code, stdout, err = run_cli(capsys, "decode", codes, "-o", png)
    assert (code, signums, caught) == (0, [], []), err
    said = f"{name} as the command ended: the {n} PNGs are in {png}; the decode is complete"
    assert said in caplog.text and caplog.text.count(name) == 1 and f"{n} images (k=" in stdout
    assert len(list(png.rglob("*.png"))) == n
    interrupt_after_write(monkeypatch, decode, at=n - 1)  # (Ctrl-C, as the last but one is renamed)
    code, stdout, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "stopped")
    assert code == 130 and not (tmp_path / "stopped").exists()


def test_a_failed_decode_into_an_earlier_decodes_folder_keeps_it_usable(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """A decode that stops (a full disk) in a folder an earlier decode wrote takes away its own PNGs only:
    the folder stays one that decode wrote into, so that decode can be run again there."""
    three, seven = tmp_path / "three.pt", tmp_path / "seven.pt"
    tokenize_images([images / "3"], three, checkpoint=tiny_vq_tokenizer, workers=0)
    tokenize_images([images / "7" / "2.png"], seven, checkpoint=tiny_vq_tokenizer, workers=0)
    out = tmp_path / "out"
    assert run_cli(capsys, "decode", three, "-o", out)[0] == 0
    earlier = sorted(p.name for p in out.glob("*.png"))
    with monkeypatch.context() as m:
        fill_disk(m, only="2.png")
        assert run_cli(capsys, "decode", seven, "-o", out)[0] == 1
    assert sorted(p.name for p in out.glob("*.png")) == earlier
    code, _, err = run_cli(capsys, "decode", seven, "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == sorted([*earlier, "2.png"])


def test_decoding_again_into_the_same_folder_needs_overwrite(tiny_vq_tokenizer, images, tmp_path, capsys):
    """PNGs at the top of the output folder (a token file of one class folder) are not replaced without
    --overwrite, as those in sub-folders are not."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images / "3"], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    out = tmp_path / "out"
    assert run_cli(capsys, "decode", codes, "-o", out)[0] == 0
    [first, *_] = sorted(out.glob("*.png"))
    before = first.read_bytes()
    code, _, err = run_cli(capsys, "decode", codes, "-o", out, "--prefix", 0)
    assert code == 1 and f"{out}: {first.name} (one of the" in err and "pass --overwrite" in err
    assert first.read_bytes() == before
    code, _, err = run_cli(capsys, "decode", codes, "-o", out, "--prefix", 0, "--overwrite")
    assert code == 0, err


def test_a_failed_decode_takes_away_every_folder_it_made(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """Images two folders deep (`x/y/1.png`): a decode that stops removes `x/y`, then `x`, then the output
    folder it made, leaving nothing behind."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images / "3"], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    data = torch.load(codes, weights_only=True)
    data["paths"] = [f"x/y/{i}.png" for i in range(len(data["paths"]))]
    torch.save(data, codes)
    fill_disk(monkeypatch, only="1.png")
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "png")
    assert code == 1 and f"{tmp_path / 'png' / 'x' / 'y' / '1.png'}: could not write the image" in err
    assert not (tmp_path / "png").exists(), list((tmp_path / "png").rglob("*"))


def test_a_decode_writes_nothing_through_a_link_in_its_folder(tiny_vq_tokenizer, images, tmp_path, capsys):
    """A dangling symbolic link in -o named as decode's mark (`.smapctl-decoded`): writing the mark
    created the file it names, outside the folder."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / DECODED_MARK).symlink_to(tmp_path / "elsewhere.txt")
    code, _, err = run_cli(capsys, "decode", codes, "-o", out)
    assert code == 0, err
    assert not (tmp_path / "elsewhere.txt").exists() and (out / DECODED_MARK).is_symlink()
    assert len(list(out.rglob("*.png"))) == sum(CLASSES.values())


def _path_of_bytes(out: Path, size: int) -> str:
    """A relative image path (`7/d/d/.../x.png`) whose PNG's temp file in `out` has a path of `size` bytes."""
    from smapctl.io import TEMP_NAME_EXTRA

    length = size - len(os.fsencode(f"{out}/")) - TEMP_NAME_EXTRA  # of the relative PNG name
    folders = (length - len("7/x.png")) // 2
    return "7/" + "d/" * folders + "x" * (length - len("7/.png") - 2 * folders) + ".png"


@pytest.mark.parametrize(
    ("last", "said"),
    [
        (lambda out: "7/" + "x" * 245 + ".png", "as a name of 267 bytes (with its temp file's), over the"),
        (lambda out: "7/" + "d" * 300 + "/1.png", "as a name of 300 bytes"),  # a folder's name
        # its folders within the limit, its temp file's path over it
        (lambda out: "7/" + "d/" * ((4085 - len(str(out))) // 2) + "1.png", "as a path of "),
        # the path one byte short of fitting: 4096 bytes with the temp file's, PATH_MAX's NUL not counted
        (lambda out: _path_of_bytes(out, 4096), "as a path of 4096 bytes (with its temp file's), over the"),
    ],
)
def test_a_token_file_path_too_long_to_write_is_refused_before_any_png(
    tiny_vq_tokenizer, images, tmp_path, capsys, last, said
):
    """A token file from elsewhere naming an image too long for the file system (a name over its 255 bytes
    with the temp file's, or a path over 4095) failed at that image once the PNGs before it were written
    (an hour of ImageNet's), and its clean-up failed too, leaving them (for the path, with a traceback).
    A folder's name over 255 bytes is one too (no test failed with its check gone)."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    data = torch.load(codes, weights_only=True)
    data["paths"][-1] = last(tmp_path / "out")
    torch.save(data, codes)
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out")
    assert code == 1 and error_lines(err) == [err.strip()] and err.startswith(f"error: {codes}: the image ")
    assert said in err
    assert not (tmp_path / "out").exists()


def test_a_decode_into_folders_deeper_than_the_recursion_limit(tiny_vq_tokenizer, images, tmp_path, capsys):
    """A token file naming an image 1,000 folders deep (within the system's path limit): its decode ended
    with a RecursionError traceback making the folders (pathlib's `mkdir(parents=True)` recurses once per
    folder), after the PNGs before it."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    data = torch.load(codes, weights_only=True)
    data["paths"][-1] = "7/" + "d/" * 300 + "1.png"
    torch.save(data, codes)
    with shallow_recursion_limit(250):
        code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / data["paths"][-1]).is_file()


def test_two_images_that_would_be_one_file_are_refused(tiny_vq_tokenizer, tmp_path, capsys, monkeypatch):
    """Two PNG names the output's file system takes for one file (`A.png` and `a.png` on macOS or
    Windows, simulated here; `x/a.png` and `y/a.png` through a link `y -> x`), or two folders it takes
    for one (`Cat/` and `cat/`, `y -> x`): the second PNG replaced the first in silence (decode said 2
    images written, with 1 there), or two classes' PNGs were mixed in one folder. Refused, the PNGs
    written taken away; with --overwrite, before any is written."""
    rng = np.random.default_rng(0)
    for name in ("x/a.png", "y/a.png", "y/b.png", "z/A.png", "z/a.png"):
        write_image(tmp_path / "in" / name, rng, size=(16, 16))
    inputs = {"folders": ["x/a.png", "y/b.png"], "same": ["x/a.png", "y/a.png"], "folding": ["z"]}
    codes = {}
    for what, names in inputs.items():
        codes[what] = tmp_path / f"{what}.pt"
        tokenize_images(
            [tmp_path / "in" / n for n in names], codes[what], checkpoint=tiny_vq_tokenizer, label="3"
        )
    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)
    (out / "y").symlink_to("x")
    for what, said in (
        ("folders", "folders 'x' and 'y' are one folder"),
        ("same", "images 'x/a.png' and 'y/a.png' are one file"),
    ):
        code, _, err = run_cli(capsys, "decode", codes[what], "-o", out)
        assert code == 1 and error_lines(err) == [err.strip()], err
        assert err.startswith(f"error: {codes[what]}: its {said} in {out} ("), err
        assert sorted(p.name for p in out.rglob("*")) == ["x", "y"]  # the PNG written first taken away
    (out / "y").unlink()
    assert run_cli(capsys, "decode", codes["same"], "-o", out)[0] == 0
    shutil.rmtree(out / "y")  # an earlier decode's folder, then linked
    (out / "y").symlink_to("x")
    (out / "x" / "a.png").write_bytes(b"an earlier decode's PNG")
    code, _, err = run_cli(capsys, "decode", codes["same"], "-o", out, "--overwrite")
    said = f"error: {codes['same']}: its images 'x/a.png' and 'y/a.png' are one file in {out} ("
    assert code == 1 and err.startswith(said), err
    assert (out / "x" / "a.png").read_bytes() == b"an earlier decode's PNG"

    def fold(path):  # a file system that does not tell upper from lower case: `a.png` is `A.png`
        path = Path(path)
        return path.with_name(path.stem.upper() + path.suffix) if path.suffix == ".png" else path

    from smapctl.ops import decode as ops

    real_save, real_lexists, real_samefile = ops.save_png, os.path.lexists, os.path.samefile
    monkeypatch.setattr(ops, "save_png", lambda image, path, **k: real_save(image, fold(path), **k))
    monkeypatch.setattr(os.path, "lexists", lambda p: real_lexists(fold(p)))
    monkeypatch.setattr(os.path, "samefile", lambda a, b: real_samefile(fold(a), fold(b)))
    code, _, err = run_cli(capsys, "decode", codes["folding"], "-o", tmp_path / "folded")
    said = (
        f"error: {codes['folding']}: its images 'A.png' and 'a.png' are one file in {tmp_path / 'folded'} ("
    )
    assert code == 1 and err.startswith(said), err
    assert not (tmp_path / "folded").exists()
