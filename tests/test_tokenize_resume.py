"""An interrupted `tokenize` keeps its work in OUT.partial/ and `--resume` goes on from it: the token file
it then writes is the one an uninterrupted run writes, and no image is encoded twice."""

import json
import logging
import os
import re
import shutil
import signal
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from faults import add_broken_images, signal_after, sigterm_caught, sigterm_lost_as_the_command_starts
from tiny_tokenizer import run_cli
from tokenize_helpers import write_image

from smapctl.errors import UserError
from smapctl.ops import token_parts, tokenize
from smapctl.ops.codes import load_codes
from smapctl.ops.tokenize import tokenize_images

N = 10  # images, in batches of 3: 0-2, 3-5, 6-8, 9


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "digits"
    rng = np.random.default_rng(0)
    for i in range(N):
        write_image(root / ("3" if i < 4 else "7") / f"{i}.png", rng)
    return root


def interrupt_at(monkeypatch, batch: int) -> list:
    """Ctrl-C in the `batch`-th call of the encoder (1-based); returns the list of its calls."""
    real, calls = tokenize.encode_tokens, []

    def encode(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == batch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "encode_tokens", encode)
    return calls


def run(images, out, tok, **kwargs):
    return tokenize_images([images], out, checkpoint=tok, workers=0, batch_size=3, **kwargs)


def same_codes(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.labels, b.labels) and a.paths == b.paths and a.prefix == b.prefix


@pytest.mark.parametrize(
    ("tok", "name"), [("tiny_kl_tokenizer", "codes.safetensors"), ("tiny_vq_tokenizer", "codes.pt")]
)
def test_an_interrupted_tokenize_goes_on_with_resume(
    images, tmp_path, monkeypatch, caplog, request, tok, name
):
    tok = request.getfixturevalue(tok)
    expected = run(images, tmp_path / "all.pt", tok).codes
    out = tmp_path / name
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 3)
        with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
            run(images, out, tok)
    assert (
        f"interrupted: 6 of 10 images done, their tokens kept in {out}.partial; the same command with "
        "--resume goes on" in caplog.text
    )
    assert not out.exists()
    with pytest.raises(UserError, match=r"holds the work of an interrupted tokenize to .*: --resume goes on"):
        run(images, out, tok)

    calls = interrupt_at(monkeypatch, 0)
    result = run(images, out, tok, resume=True)
    assert calls == [3, 1]  # images 6-8 and 9 only
    assert result.resumed == 6 and len(result.codes.labels) == N
    same_codes(load_codes(out), expected)
    assert not (tmp_path / f"{name}.partial").exists()


def test_a_kill_without_warning_loses_at_most_the_work_since_the_last_part(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch
):
    """SIGKILL or a power cut: no last part is written; the parts written now and then are what is kept."""
    expected = run(images, tmp_path / "all.pt", tiny_kl_tokenizer).codes
    out = tmp_path / "codes.pt"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(token_parts, "SAVE_EVERY", 0.0)  # a part after every batch
        m.setattr(tokenize, "_keep", lambda *a: None)  # killed: nothing runs on the way out
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run(images, out, tiny_kl_tokenizer)
    names = sorted(p.name for p in (tmp_path / "codes.pt.partial").iterdir())
    assert names == ["0000000000-0000000003.safetensors", "0000000003-0000000006.safetensors", "plan.json"]
    calls = interrupt_at(monkeypatch, 0)
    assert run(images, out, tiny_kl_tokenizer, resume=True).resumed == 6 and calls == [3, 1]
    same_codes(load_codes(out), expected)


def test_skipped_images_stay_skipped_across_a_resume(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, caplog
):
    """The unreadable images of the parts are listed again, and a run stopped by one (--on-error fail)
    goes on with --on-error skip."""
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(images, folder)
    broken = add_broken_images(folder / "3")  # 3/empty.png and 3/notes.jpg: inputs 4 and 5 of 12
    expected = run(folder, tmp_path / "all.pt", tiny_vq_tokenizer, on_error="skip")
    assert sorted(e.path for e in expected.skipped) == sorted(map(str, broken))

    out = tmp_path / "codes.pt"
    with caplog.at_level(logging.WARNING), pytest.raises(tokenize.BadImageError):
        run(folder, out, tiny_vq_tokenizer)  # stops at batch 2 (inputs 3-5): batch 1 kept
    assert (  # not "the same command with --resume goes on": it would stop there again
        f"stopped: 3 of 12 images done, their tokens kept in {out}.partial; once that image is mended or "
        "removed (or with --on-error skip), --resume goes on" in caplog.text
    )
    assert [p.name for p in (tmp_path / "codes.pt.partial").glob("*.safetensors")] == [
        "0000000000-0000000003.safetensors"
    ]
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 3)  # inputs 3-5 (of which 4 and 5 are skipped), 6-8, then 9-11
        with pytest.raises(KeyboardInterrupt):
            run(folder, out, tiny_vq_tokenizer, on_error="skip", resume=True)
    assert sorted(p.name for p in (tmp_path / "codes.pt.partial").glob("*.safetensors")) == [
        "0000000000-0000000003.safetensors",
        "0000000003-0000000009.safetensors",
    ]
    calls = interrupt_at(monkeypatch, 0)
    result = run(folder, out, tiny_vq_tokenizer, on_error="skip", resume=True)
    assert calls == [3] and result.resumed == 7  # 0-3 and 6-8
    assert [e.path for e in result.skipped] == [e.path for e in expected.skipped]
    assert result.skipped_list.read_text() == expected.skipped_list.read_text().replace("all.pt", "codes.pt")
    same_codes(load_codes(out), expected.codes)


def test_resume_refuses_another_run(
    tiny_kl_tokenizer, tiny_vq_tokenizer, images, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "codes.pt"
    folder = tmp_path / "codes.pt.partial"
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(images, out, tiny_kl_tokenizer)

    def refused(message, **kwargs):
        with pytest.raises(UserError) as e:
            run(
                kwargs.pop("inputs", images), out, kwargs.pop("tok", tiny_kl_tokenizer), resume=True, **kwargs
            )
        assert str(e.value) == (
            f"--resume: {message} (the interrupted run in {folder}); run it as it was, or remove {folder} "
            "to start again"
        )

    refused("its --prefix was 8, not 4", prefix=4)
    refused("its --precision was 'fp32', not 'bf16'", precision="bf16")
    refused("its --weights was 'ema', not 'model'", weights="model")
    refused("its tokenizer differs from this run's", tok=tiny_vq_tokenizer)
    refused("its images (their paths, order or labels) differ from this run's", inputs=images / "7")
    refused("its images (their paths, order or labels) differ from this run's", label="3")
    # Another folder of the same names, sizes and times (all 1528 bytes here), two of them swapped: the
    # parts hold the tokens of the other folder's images.
    copy = tmp_path / "copy" / "digits"
    shutil.copytree(images, copy)  # (with the files' times)
    a, b = copy / "3" / "0.png", copy / "3" / "1.png"
    times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    data = a.read_bytes(), b.read_bytes()
    assert len(data[0]) == len(data[1]) and data[0] != data[1]
    a.write_bytes(data[1])
    b.write_bytes(data[0])
    for p, ns in zip((a, b), times, strict=True):
        os.utime(p, ns=ns)
    refused("its images (their paths, order or labels) differ from this run's", inputs=copy)
    # An image rewritten since (same path, other contents): its tokens would be another image's.
    image = images / "7" / "9.png"
    before, stat = image.read_bytes(), image.stat()
    try:
        image.write_bytes(before + b"\0")
        refused("some of its images were rewritten since (their sizes or modification times differ)")
        image.write_bytes(before)  # the same size again, but written since
        refused("some of its images were rewritten since (their sizes or modification times differ)")
    finally:
        image.write_bytes(before)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # --overwrite is about the token file: the interrupted run's folder is not removed by it.
    with pytest.raises(UserError, match="--resume goes on from it; to start again, remove that folder"):
        run(images, out, tiny_kl_tokenizer, overwrite=True)
    # A damaged part, or one renamed to cover more images than it holds: one line naming the way out.
    part = next(folder.glob("*.safetensors"))
    way_out = f"remove it (its images and those after it are encoded again), or {folder} to start again"
    renamed = part.with_name("0000000000-0000000004.safetensors")
    part.rename(renamed)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as e:
        run(images, out, tiny_kl_tokenizer, resume=True)
    assert str(e.value) == f"--resume: {renamed} is not a part of this run; {way_out}"
    renamed.write_bytes(b"not a part")
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(
            UserError, match=rf"^--resume: {renamed} could not be read \(.*\); {re.escape(way_out)}$"
        ),
    ):
        run(images, out, tiny_kl_tokenizer, resume=True)
    # The error is the advice: it said "stopped: 3 of 10 images done, their tokens kept in ...; the same
    # command with --resume goes on", which stops there again.
    assert "tokens kept" not in caplog.text and "goes on" not in caplog.text
    assert folder.is_dir() and renamed.is_file()
    renamed.unlink()
    assert run(images, out, tiny_kl_tokenizer, resume=True).resumed == 0 and not folder.exists()


def test_resume_without_an_interrupted_run_starts_afresh(tiny_kl_tokenizer, images, tmp_path, caplog):
    """So a job script can always pass --resume (a run pre-empted before its first part left nothing)."""
    out = tmp_path / "codes.pt"
    with caplog.at_level(logging.WARNING):
        result = run(images, out, tiny_kl_tokenizer, resume=True)
    assert f"--resume: no interrupted tokenize in {out}.partial; starting from the first image" in caplog.text
    assert result.resumed == 0 and len(result.codes.labels) == N and out.is_file()


def test_two_runs_to_one_output_are_refused(tiny_kl_tokenizer, images, tmp_path):
    """Both would write parts into one folder, and the file would mix their tokens."""
    from smapctl.io import try_lock

    out = tmp_path / "codes.pt"
    lock = tmp_path / "codes.pt.partial.lock"
    lock.touch()
    held = try_lock(lock)  # the other run
    try:
        with pytest.raises(UserError) as e:
            run(images, out, tiny_kl_tokenizer)
        assert (
            str(e.value)
            == f"another tokenize is writing {out} (it holds {lock}); wait for it, or use another -o"
        )
    finally:
        os.close(held)
    run(images, out, tiny_kl_tokenizer)
    assert out.is_file() and not lock.exists()  # the lock's file goes with the run


def test_a_file_system_without_locks_or_a_lock_file_that_cannot_be_made(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, caplog
):
    """A mount without locks (flock: ENOLCK, as some network file systems): every tokenize into it was
    refused as "another tokenize is writing"; it goes on unguarded with a warning, as a training does. A
    lock file that cannot be made (no permission, here simulated) was that same wrong line too."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    out, lock = tmp_path / "codes.pt", tmp_path / "codes.pt.partial.lock"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with caplog.at_level(logging.WARNING):
            run(images, out, tiny_kl_tokenizer)
    said = (
        f"{lock}: could not lock it ([Errno {errno.ENOLCK}] No locks available); nothing keeps a second run"
    )
    assert said in caplog.text
    assert out.is_file() and not lock.exists()
    real_open = os.open

    def no_permission(path, *args, **kwargs):
        if os.fspath(path) == str(lock):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    with pytest.raises(UserError) as e:
        run(images, out, tiny_kl_tokenizer, overwrite=True)
    assert str(e.value) == (
        f"{lock}: could not write the lock file of the tokens (Permission denied): write somewhere you may"
    )


def test_a_resume_that_fails_on_unreadable_images_says_so(tiny_vq_tokenizer, images, tmp_path, monkeypatch):
    """The interrupted run skipped them (--on-error skip); resumed with the default (fail), the run stops
    at the first, as an uninterrupted one would have."""
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(images, folder)
    add_broken_images(folder / "3")  # inputs 4 and 5
    out = tmp_path / "codes.pt"
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run(folder, out, tiny_vq_tokenizer, on_error="skip")
    with pytest.raises(tokenize.BadImageError, match=r"empty\.png: empty file.*--on-error skip leaves such"):
        run(folder, out, tiny_vq_tokenizer, resume=True)
    assert run(folder, out, tiny_vq_tokenizer, resume=True, on_error="skip").resumed == 4  # 0-3 of 0-5


def test_a_partial_folder_holding_other_files_is_not_touched(tiny_kl_tokenizer, images, tmp_path):
    folder = tmp_path / "codes.pt.partial"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep\n")
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(
            UserError, match="codes.pt.partial, where tokenize keeps its work, holds other files"
        ):
            run(images, tmp_path / "codes.pt", tiny_kl_tokenizer, **kwargs)
    assert (folder / "mine.txt").read_text() == "keep\n"
    # A link to a folder (empty, here) is not written into either: the parts would go to its target.
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "linked.pt.partial"
    link.symlink_to(target)
    for kwargs in ({}, {"resume": True}):
        with pytest.raises(
            UserError, match="linked.pt.partial, where tokenize keeps its work, is not a folder"
        ):
            run(images, tmp_path / "linked.pt", tiny_kl_tokenizer, **kwargs)
    assert link.is_symlink() and not any(target.iterdir()) and not (tmp_path / "linked.pt").exists()


def test_the_plan_names_the_run(tiny_kl_tokenizer, images, tmp_path, monkeypatch):
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run(images, tmp_path / "codes.pt", tiny_kl_tokenizer, prefix=2)
    # Stopped before a batch was encoded: nothing kept, no folder.
    assert not (tmp_path / "codes.pt.partial").exists()
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(images, tmp_path / "codes.pt", tiny_kl_tokenizer, prefix=2)
    plan = json.loads((tmp_path / "codes.pt.partial" / "plan.json").read_text())
    assert plan["prefix"] == 2 and plan["weights"] == "ema" and plan["precision"] == "fp32"
    assert len(plan["images"]) == 64 and plan["version"] == 1


def _cli_args(images, out: Path, checkpoint) -> list:
    """`smapctl tokenize` of `images` to `out`, in batches of 3, reading inline."""
    return ["tokenize", images, "-o", out, "--checkpoint", checkpoint, "--batch-size", "3", "--workers", "0"]


def test_cli_resume(tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "codes.pt"
    args = _cli_args(images, out, tiny_kl_tokenizer)
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 2)
        code, _, _ = run_cli(capsys, *args)
    assert code == 130
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert err.strip() == (
        f"error: {out}.partial holds the work of an interrupted tokenize to {out}: --resume goes on from it; "
        "to start again, remove that folder"
    )
    code, stdout, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert stdout.startswith("10 images (3 of them from the interrupted run) -> latents 10x8x16 (prefix 8")
    assert stdout.rstrip().endswith("images/s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_every_image_is_encoded_lets_the_token_file_be_written(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, caplog, signum
):
    """A signal just after the token file was renamed into place kept OUT.partial/, said "--resume goes
    on" and exited 130 (143), with the token file complete. Once every image is encoded a signal lets
    the file be written: exit 0, one line saying so, no partial folder. A second one stops at once; after
    the rename it says the token file is written, and keeps no partial folder either."""
    name, out = signal.Signals(signum).name, tmp_path / "codes.pt"
    args = _cli_args(images, out, tiny_kl_tokenizer)
    real, sent, caught = tokenize.save_codes, [], []

    def signalled(codes, path, before=(), after=()):
        for s in before:
            os.kill(os.getpid(), s)
        written = real(codes, path)
        sent.append(path)
        for s in after:
            os.kill(os.getpid(), s)
        return written

    previous = signal.signal(signal.SIGTERM, lambda *_: caught.append(1))  # (else pytest is ended)
    try:
        with caplog.at_level(logging.WARNING):
            monkeypatch.setattr(tokenize, "save_codes", partial(signalled, after=[signum]))
            code, stdout, err = run_cli(capsys, *args)
            assert (code, caught, sent) == (0, [], [out]), err
            said = (
                f"{name} once every image was encoded: the token file {out} is written; tokenize is complete"
            )
            assert said in caplog.text and "--resume" not in caplog.text and "10 images" in stdout
            assert len(load_codes(out).paths) == N and not Path(f"{out}.partial").exists()
            caplog.clear()
            # The first signal as it is written, the second after the rename.
            monkeypatch.setattr(
                tokenize, "save_codes", partial(signalled, before=[signum], after=[signal.SIGINT])
            )
            code, stdout, err = run_cli(capsys, *args, "--overwrite")
        assert (code, caught) == (130, []), err
        assert (
            f"interrupted: the token file {out} is written" in caplog.text and "--resume" not in caplog.text
        )
        assert len(load_codes(out).paths) == N and not Path(f"{out}.partial").exists()
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_command_ends_leaves_tokenize_complete(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, caplog, signum
):
    """A signal as `tokenize` printed its last line (the token file written, OUT.partial/ removed, the
    lock file let go) exited 130 (143) without a word, the token file complete. Up to the command's end
    it ends as complete: exit 0, one line saying so. A signal before every image is encoded still stops
    it (held from the first batch on as well, it would run to its end)."""
    from smapctl import cli

    name, out = signal.Signals(signum).name, tmp_path / "codes.pt"
    with sigterm_caught() as caught, caplog.at_level(logging.WARNING):
        signal_after(monkeypatch, cli.console, "print", signums := [signum])
        code, stdout, err = run_cli(capsys, *_cli_args(images, out, tiny_kl_tokenizer))
    assert (code, signums, caught) == (0, [], []), err
    said = f"{name} as the command ended: the token file {out} is written; tokenize is complete"
    assert said in caplog.text and caplog.text.count(name) == 1 and "10 images" in stdout
    assert len(load_codes(out).paths) == N and sorted(p.name for p in tmp_path.iterdir()) == ["codes.pt"]
    stopped = tmp_path / "stopped" / "codes.pt"
    with sigterm_caught() as caught, monkeypatch.context() as m:
        # (as its first batch is encoded, before it is kept)
        signal_after(m, tokenize, "encode_tokens", signums := [signum])
        code, _, err = run_cli(capsys, *_cli_args(images, stopped, tiny_kl_tokenizer))
    assert (code, signums, caught) == (128 + signum, [], []), err
    assert "interrupted: nothing written" in caplog.text and not stopped.exists()


def test_a_run_that_is_not_stopped_writes_no_part(tiny_kl_tokenizer, images, tmp_path, monkeypatch):
    """Parts come once a minute or when a run stops: a short run writes its token file and nothing else."""
    real, seen = tokenize.save_codes, []

    def save_codes(codes, path):
        seen.append((tmp_path / "codes.pt.partial").exists())
        return real(codes, path)

    monkeypatch.setattr(tokenize, "save_codes", save_codes)
    run(images, tmp_path / "codes.pt", tiny_kl_tokenizer)
    assert seen == [False] and sorted(p.name for p in tmp_path.iterdir()) == ["codes.pt"]


def test_a_part_that_cannot_be_written_stops_the_run_in_one_line(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, caplog
):
    from faults import fill_disk
    from tiny_tokenizer import run_cli

    out = tmp_path / "codes.pt"
    monkeypatch.setattr(token_parts, "SAVE_EVERY", 0.0)
    fill_disk(monkeypatch, only=".safetensors")  # the parts' files, not the plan
    args = ["tokenize", images, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--batch-size", "3"]
    code, _, err = run_cli(capsys, *args, "--workers", "0")
    assert code == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {out}.partial/0000000000-0000000003.safetensors: could not write a part")
    assert "could not be kept" not in caplog.text  # the same error, not said twice
    assert not (tmp_path / "codes.pt.partial").exists() and not out.exists()


def test_an_output_in_new_folders_works_and_a_failed_run_leaves_none(tiny_kl_tokenizer, images, tmp_path):
    """The lock file beside the token file needs its folder first; a run that fails with nothing to keep
    takes the folders it made away again."""
    out = tmp_path / "new" / "sub" / "codes.pt"
    run(images, out, tiny_kl_tokenizer)
    assert sorted(p.name for p in out.parent.iterdir()) == ["codes.pt"]
    broken = tmp_path / "broken"
    add_broken_images(broken / "3")
    with pytest.raises(UserError, match="none of the 2 images could be read"):
        run(broken, tmp_path / "other" / "sub" / "codes.pt", tiny_kl_tokenizer, on_error="skip")
    assert not (tmp_path / "other").exists()


def test_a_partial_folder_left_before_its_plan_is_no_interrupted_run(tiny_kl_tokenizer, images, tmp_path):
    """Killed while it wrote its plan, a run leaves the folder with the plan's temp file and nothing else:
    a run without --resume starts (there is nothing to go on from), and takes the folder away."""
    folder = tmp_path / "codes.pt.partial"
    folder.mkdir()
    (folder / ".plan.json.0123456789ab.tmp").write_text("{")  # as `smapctl.io.atomic_path` names it
    result = run(images, tmp_path / "codes.pt", tiny_kl_tokenizer)
    assert len(result.codes.labels) == N and not folder.exists()


def test_only_the_parts_that_follow_on_from_the_first_image_are_kept(tmp_path, caplog):
    """A part after a gap (one removed by hand) or overlapping the ones before it (left by a node of a
    launch that had got further) is removed, and its work done again: never read into the wrong rows."""
    folder = tmp_path / "codes.pt.partial"
    folder.mkdir()
    names = [
        f"{start:010d}-{end:010d}.safetensors" for start, end in [(0, 3), (2, 5), (3, 6), (4, 9), (7, 9)]
    ]
    for name in names:
        (folder / name).write_bytes(b"")
    parts = token_parts.PartFolder(folder, {}, "the tokens")
    with caplog.at_level(logging.WARNING):
        chain = parts.following_on()
    assert [(start, end) for start, end, _ in chain] == [(0, 3), (3, 6)] and parts.saved == 6
    assert sorted(p.name for p in folder.iterdir()) == [names[0], names[2]]
    assert f"{folder}: 3 parts after a gap removed (their work is done again)" in caplog.text


def test_a_part_is_kept_about_once_a_minute(tiny_kl_tokenizer, images, tmp_path, monkeypatch):
    """Not after every batch once the first minute has passed (here each batch takes 40 s): a kill
    without warning after the third batch finds the part of the first two only."""
    clock = [0.0]
    monkeypatch.setattr(token_parts, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    real, calls = tokenize.encode_tokens, []

    def encode(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 4:
            raise KeyboardInterrupt
        clock[0] += 40.0
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "encode_tokens", encode)
    monkeypatch.setattr(tokenize, "_keep", lambda *a: None)  # killed: nothing runs on the way out
    with pytest.raises(KeyboardInterrupt):
        run(images, tmp_path / "codes.pt", tiny_kl_tokenizer)
    names = sorted(p.name for p in (tmp_path / "codes.pt.partial").iterdir())
    assert calls == [3, 3, 3, 1] and names == ["0000000000-0000000006.safetensors", "plan.json"]


def test_unreadable_images_at_the_edges_of_a_part_are_kept_with_it(tiny_vq_tokenizer, images, tmp_path):
    """An unreadable image that begins a part is listed in it, and those of a batch stopped while it was
    encoded are left to the part that holds that batch: the resumed run reads the parts back (they were
    refused as "not a part of this run") and writes the file an uninterrupted run writes."""
    folder = tmp_path / "digits"
    shutil.copytree(images, folder)
    add_broken_images(folder / "3")  # inputs 4 and 5 of 12
    expected = run(folder, tmp_path / "all.pt", tiny_vq_tokenizer, on_error="skip")

    def stopped(out, batch_size, at, save_every):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(token_parts, "SAVE_EVERY", save_every)
            interrupt_at(m, at)
            with pytest.raises(KeyboardInterrupt):
                tokenize_images([folder], out, checkpoint=tiny_vq_tokenizer, workers=0, batch_size=batch_size,
                                on_error="skip")  # fmt: skip
        with pytest.MonkeyPatch.context() as m:
            calls = interrupt_at(m, 0)
            result = tokenize_images([folder], out, checkpoint=tiny_vq_tokenizer, workers=0,
                                     batch_size=batch_size, on_error="skip", resume=True)  # fmt: skip
        assert [e.path for e in result.skipped] == [e.path for e in expected.skipped]
        same_codes(load_codes(out), expected.codes)
        return calls, result.resumed

    # Batches of 2 and a part after each: that of inputs 4-5 holds no tokens, only the two skipped images.
    assert stopped(tmp_path / "a.pt", 2, 4, save_every=0.0) == ([2, 2], 6)
    # Batches of 3: stopped while encoding input 3, after inputs 4 and 5 were found unreadable; its last
    # part (inputs 0-2) is written then.
    assert stopped(tmp_path / "b.pt", 3, 2, save_every=60.0) == ([1, 3, 3], 3)


def test_an_image_that_cannot_be_looked_at_does_not_stop_its_parts(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch
):
    """A broken symbolic link among the images (or one removed since the listing): the plan's `stat` of
    each file ended a --on-error skip run at its first part (a minute in) with "no such file", and a run
    it stopped (--on-error fail) kept nothing for --resume."""
    folder = tmp_path / "digits"
    shutil.copytree(images, folder)
    link = folder / "3" / "1b.png"  # input 2 of 11
    link.symlink_to(tmp_path / "no-such-image.png")
    monkeypatch.setattr(token_parts, "SAVE_EVERY", 0.0)  # a part after every batch
    out = tmp_path / "codes.pt"
    with pytest.raises(tokenize.BadImageError, match="a broken symbolic link"):
        run(folder, out, tiny_vq_tokenizer)  # stops in batch 1 (inputs 0-2): nothing to keep yet
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run(folder, out, tiny_vq_tokenizer, on_error="skip", resume=True)
    assert len(list((tmp_path / "codes.pt.partial").glob("*.safetensors"))) == 2
    result = run(folder, out, tiny_vq_tokenizer, on_error="skip", resume=True)
    assert result.resumed == 5 and [e.path for e in result.skipped] == [str(link)]  # inputs 0-5, one skipped
    assert len(result.codes.labels) == N


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python lost
def test_a_sigterm_python_lost_before_tokenize_stops_it_after_its_first_batch(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, caplog
):
    """A SIGTERM Python lost as the command started ("Exception ignored in ...") let `tokenize` run to its
    end, to be killed by the scheduler's SIGKILL that follows; now it stops after its first batch, as one
    that came then would: exit 143, that batch kept for --resume."""
    out = tmp_path / "codes.pt"
    sigterm_lost_as_the_command_starts(monkeypatch)
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, *_cli_args(images, out, tiny_kl_tokenizer))
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    assert f"interrupted: 3 of 10 images done, their tokens kept in {out}.partial" in caplog.text
    monkeypatch.undo()
    calls = interrupt_at(monkeypatch, 0)
    assert run(images, out, tiny_kl_tokenizer, resume=True).resumed == 3 and calls == [3, 3, 1]


def test_a_sigterm_that_stopped_a_command_does_not_stop_the_next_run_in_the_process(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """A SIGTERM that stopped a command run in this process (`cli.main`: a test, a notebook) stayed noted
    as one Python had lost (`GracefulStop.unheard`): the next tokenize of the Python API in the process
    stopped after its first batch, with a KeyboardInterrupt no signal had sent."""
    from smapctl import cli

    real = cli.setup_logging

    def setting_up():
        real()
        os.kill(os.getpid(), signal.SIGTERM)  # heard: the command stops with it

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cli, "setup_logging", setting_up)
        code, _, err = run_cli(capsys, *_cli_args(images, tmp_path / "stopped.pt", tiny_kl_tokenizer))
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    try:
        result = run(images, tmp_path / "codes.pt", tiny_kl_tokenizer)
    except KeyboardInterrupt:
        pytest.fail("the run stopped for the earlier command's SIGTERM")
    assert len(result.codes.labels) == N


def test_a_part_whose_images_are_out_of_order_is_not_read_into_the_rows(tmp_path):
    """A part lists its kept images in input order; one listing them in another order (edited, or of
    another run) would put each image's tokens in another image's row: refused, not read."""
    from smapctl.safetensors_io import write_safetensors

    folder = tmp_path / "codes.pt.partial"
    writer = token_parts.Parts(folder, {}, files=[])
    rows = torch.arange(4 * 2, dtype=torch.int64).reshape(4, 2)  # (N, k) indices
    writer.save(rows, [0, 1, 2, 3], [], 4)

    def read() -> tuple[torch.Tensor, list[int]]:
        reader = token_parts.Parts(folder, {}, files=[])
        reader.resumed = True
        tokens, kept = torch.zeros(4, 2, dtype=torch.int64), []
        assert reader.load(tokens, kept, []) == 4
        return tokens, kept

    tokens, kept = read()
    assert torch.equal(tokens, rows) and kept == [0, 1, 2, 3]
    part = folder / "0000000000-0000000004.safetensors"
    write_safetensors(part, {"tokens": rows, "index": torch.tensor([1, 0, 2, 3])}, {"skipped": "[]"})
    with pytest.raises(UserError, match=r"is not a part of this run"):
        read()
