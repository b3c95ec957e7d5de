"""The generator's token cache keeps its work beside the cache as it is built (`<cache>.partial/`): a run
stopped while caching (Ctrl-C, SIGTERM, pre-emption) goes on from the batches already encoded, and the
cache it writes is the one an uninterrupted build writes."""

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import add_broken_images
from tiny_tokenizer import two_nodes
from tokenize_helpers import write_image

from smapctl.data import latents
from smapctl.data.latents import cache_path, load_or_build_latents
from smapctl.data.skipped import read_skip_list
from smapctl.errors import UserError
from smapctl.models.smap import SMAP
from smapctl.ops import token_parts
from smapctl.ops.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path) -> str:
    """Ten images in two classes and two unreadable files: 12 files, batches of 4 (skipped images give
    way to the next readable one, so every batch has its 4 rows)."""
    rng = np.random.default_rng(0)
    for i in range(10):
        write_image(tmp_path / "images" / ("3" if i < 5 else "7") / f"{i}.png", rng, size=(16, 16))
    add_broken_images(tmp_path / "images" / "3")
    return str(tmp_path / "images")


def count_encodes(monkeypatch, stop_at: int = 0) -> list:
    """The batch sizes SMAP.encode sees; Ctrl-C at its `stop_at`-th call (1-based; 0: never)."""
    calls, encode = [], SMAP.encode

    def counted(self, images, labels):
        calls.append(len(images))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return encode(self, images, labels)

    monkeypatch.setattr(SMAP, "encode", counted)
    return calls


def build(tok, folder, batch_size=4, hflip=True):
    return load_or_build_latents(tok, folder, hflip, batch_size, "cpu")


def test_a_cache_stopped_half_way_goes_on_from_its_parts(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch, caplog
):
    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "alone"))
    expected = build(tok, folder)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    path = cache_path(tok.fingerprint, folder, True)
    partial = path.with_name(f"{path.name}.partial")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(token_parts, "SAVE_EVERY", 0.0)  # a part after every batch
        count_encodes(m, stop_at=5)  # batch 3's first view (two views a batch)
        with caplog.at_level(logging.WARNING, logger="smapctl.data"), pytest.raises(KeyboardInterrupt):
            build(tok, folder)
    assert (
        f"interrupted: 2 of 3 batches of the token cache are kept in {partial}; the same command goes on from"
        " them" in caplog.text
    )
    assert not path.exists()
    assert sorted(p.name for p in partial.glob("*.safetensors")) == [
        "0000000000-0000000001.safetensors",
        "0000000001-0000000002.safetensors",
    ]
    calls = count_encodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="smapctl.data"):
        cache = build(tok, folder)
    assert calls == [4, 4]  # the third batch alone (and its mirror images)
    assert torch.equal(cache.tokens, expected.tokens) and torch.equal(cache.labels, expected.labels)
    assert cache.images == expected.images and not partial.exists()
    assert f"caching the tokens: 2 batches read back from {partial}" in caplog.text
    # The images skipped in the batches read back are still counted and listed (once each).
    listing = path.with_name(f"{path.name}.skipped.txt")
    assert "skipped 2 unreadable images" in caplog.text
    assert len(read_skip_list(listing)) == 2


def test_the_cache_is_made_in_its_own_file(tiny_kl_tokenizer, folder, tmp_path, monkeypatch):
    """The rows are made in the cache's file, filled in place (held whole in memory, an ImageNet cache
    with its mirror images took 21 GB): from the first batch on, a temp file of the cache's whole size
    is beside it; `write_latents` is not needed, and the file is byte for byte the one it writes of the
    same rows. A stopped build leaves no temp file (its parts keep the work)."""
    from smapctl.io import TEMP_NAME

    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    path = cache_path(tok.fingerprint, folder, True)
    temps, encode, real_write, wrote = [], SMAP.encode, latents.write_latents, []

    def watched(self, images, labels):
        temps.append([p.stat().st_size for p in path.parent.iterdir() if TEMP_NAME.match(p.name)])
        return encode(self, images, labels)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(SMAP, "encode", watched)
        m.setattr(latents, "write_latents", lambda *a: wrote.append(a))
        cache = build(tok, folder)
    size = path.stat().st_size
    assert not wrote and temps == [[], []] + [[size]] * 4  # 3 batches of two views; made at the first
    real_write(tmp_path / "written.safetensors", cache)
    assert path.read_bytes() == (tmp_path / "written.safetensors").read_bytes()
    path.unlink()
    with pytest.MonkeyPatch.context() as m:
        count_encodes(m, stop_at=4)
        with pytest.raises(KeyboardInterrupt):
            build(tok, folder)
    assert not path.exists() and not [p for p in path.parent.iterdir() if TEMP_NAME.match(p.name)]


def test_a_big_endian_machine_makes_the_cache_in_memory(tmp_path, monkeypatch):
    """safetensors' bytes are little-endian and the map holds the machine's: on a big-endian machine no
    file is filled in place (its rows would be written byte-swapped, and read back wrong); the rows are
    made in memory and written by `write_latents`, whose `save_file` swaps them."""
    from smapctl.safetensors_io import MappedSafetensors

    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(NotImplementedError):
        MappedSafetensors(tmp_path / "t.safetensors", {"t": ((2,), torch.float32)}, {})
    out = latents._CacheFile(tmp_path / "cache.safetensors", {"version": "2"})
    assert out.allocate(4, (3,), torch.int64, torch.int64, parts_held=False) is None
    assert out.file is None and not list(tmp_path.iterdir())


def test_a_cache_stopped_in_a_batch_with_unreadable_images_lists_each_once(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch, caplog
):
    """Stopped after the second batch (which holds both unreadable files) was read but before its part
    was kept: the resumed build meets them again, and its list still has one line per image."""
    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    path = cache_path(tok.fingerprint, folder, True)
    listing = path.with_name(f"{path.name}.skipped.txt")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(token_parts, "SAVE_EVERY", 0.0)
        count_encodes(m, stop_at=3)  # batch 2's first view
        with pytest.raises(KeyboardInterrupt):
            build(tok, folder)
    assert listing.read_bytes().count(b"\n") == 2  # met once so far
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        build(tok, folder)
    assert "skipped 2 unreadable images" in caplog.text
    assert len(read_skip_list(listing)) == 2 and listing.read_bytes().count(b"\n") == 2


def test_a_cache_stopped_before_its_first_part_lists_only_what_the_next_build_skips(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch, caplog
):
    """Nothing kept to go on from: the next build starts afresh, its list of skipped images too. The
    unreadable files the stopped build met, mended since, were still listed and counted."""
    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    path = cache_path(tok.fingerprint, folder, False)
    listing = path.with_name(f"{path.name}.skipped.txt")
    with pytest.MonkeyPatch.context() as m:
        count_encodes(m, stop_at=1)  # its one batch (all 12 files) read, not encoded: no part
        with pytest.raises(KeyboardInterrupt):
            build(tok, folder, 12, hflip=False)
    assert len(read_skip_list(listing)) == 2 and not path.with_name(f"{path.name}.partial").exists()
    for name in ("empty.png", "notes.jpg"):
        (Path(folder) / "3" / name).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        cache = build(tok, folder, 12, hflip=False)
    assert len(cache.labels) == 10 and "unreadable" not in caplog.text
    assert not listing.exists() or read_skip_list(listing) == []


def test_parts_of_another_plan_or_damaged_are_encoded_again(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch, caplog
):
    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    path = cache_path(tok.fingerprint, folder, False)
    partial = path.with_name(f"{path.name}.partial")

    def stopped(batch_size):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(token_parts, "SAVE_EVERY", 0.0)
            count_encodes(m, stop_at=3)
            with pytest.raises(KeyboardInterrupt):
                build(tok, folder, batch_size, hflip=False)

    stopped(4)
    assert len(list(partial.glob("*.safetensors"))) == 2
    calls = count_encodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        cache = build(tok, folder, 6, hflip=False)  # another batch size: rows of other batches
    assert calls == [6, 6] and not partial.exists()
    assert (
        f"the token cache's 2 parts in {partial} were made with batch size 4, not 6 (set latents.batch_size "
        "back to go on from them): they are encoded again" in caplog.text
    )
    path.unlink()
    stopped(4)
    last = sorted(partial.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-8])  # cut short
    calls.clear()
    again = build(tok, folder, 4, hflip=False)
    assert calls == [4, 4] and torch.equal(again.tokens, cache.tokens)


TWO_PROCESSES = """\
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from smapctl.data import latents
from smapctl.launch import process_state
from smapctl.models.smap import SMAP
from smapctl.ops.load import load_tokenizer

out, tokenizer = Path(sys.argv[1]), sys.argv[2]
process_state()
accelerator = Accelerator(cpu=True)
calls, encode = [], SMAP.encode
SMAP.encode = lambda self, images, labels: calls.append(len(images)) or encode(self, images, labels)
tok = load_tokenizer(tokenizer)
cache = latents.load_or_build_latents(tok, "digits", True, 600, "cpu", processes=accelerator)
torch.save({"calls": calls, "tokens": cache.tokens.clone()}, out / f"rank{accelerator.process_index}.pt")
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def two_processes(script: str, out: Path, tokenizer):
    """`script` run by `torchrun --standalone --nproc_per_node 2` with OUT and the tokenizer's path, one
    thread each, the token cache in OUT/cache."""
    import subprocess

    from tiny_tokenizer import subprocess_env

    path = out / "cache.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(path), str(out), str(tokenizer)]
    env = subprocess_env(OMP_NUM_THREADS="1", SMAPCTL_CACHE=str(out / "cache"))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_go_on_from_the_parts_of_a_stopped_cache(tiny_kl_tokenizer, tmp_path, monkeypatch):
    """Under a launcher every process skips the batches the node's main process reads back."""
    tok = load_tokenizer(tiny_kl_tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: the same numbers
    try:
        monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "alone"))
        expected = load_or_build_latents(tok, "digits", True, 600, "cpu")
        monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
        with pytest.MonkeyPatch.context() as m:
            m.setattr(token_parts, "SAVE_EVERY", 0.0)
            count_encodes(m, stop_at=3)  # 1618 digits in batches of 600: the first batch kept
            with pytest.raises(KeyboardInterrupt):
                load_or_build_latents(tok, "digits", True, 600, "cpu")
    finally:
        torch.set_num_threads(threads)
    r = two_processes(TWO_PROCESSES, tmp_path, tiny_kl_tokenizer)
    assert r.returncode == 0, r.stderr[-3000:]
    shares = [[600, 600], [418, 418]]  # batches 1 and 2 (and their mirror images); batch 0 read back
    for rank, share in enumerate(shares):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["calls"] == share
        assert torch.allclose(got["tokens"], expected.tokens, atol=1e-6)
    assert not list((tmp_path / "cache").rglob("*.partial"))


# One node of a two-node launch (one process each): what it encoded, whether it wrote the cache or a part,
# and the tokens it read, to OUT/rank{r}.pt.
NODE = """\
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from smapctl.data import latents
from smapctl.launch import process_state
from smapctl.models.smap import SMAP
from smapctl.ops import token_parts
from smapctl.ops.load import load_tokenizer

out, tokenizer = Path(sys.argv[1]), sys.argv[2]
process_state()
accelerator = Accelerator(cpu=True)
calls, wrote, encode = [], [], SMAP.encode
SMAP.encode = lambda self, images, labels: calls.append(len(images)) or encode(self, images, labels)
write_cache, write_part = latents._CacheFile.write, token_parts.PartFolder.write
latents._CacheFile.write = lambda *a: wrote.append("cache") or write_cache(*a)
token_parts.PartFolder.write = lambda *a: wrote.append("part") or write_part(*a)
token_parts.SAVE_EVERY = 0.0  # a part after every round
tok = load_tokenizer(tokenizer)
cache = latents.load_or_build_latents(tok, "digits", True, 600, "cpu", processes=accelerator)
result = {"calls": calls, "wrote": wrote, "tokens": cache.tokens.clone()}
torch.save(result, out / f"rank{accelerator.process_index}.pt")
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared-folder", "folder-per-node"])
def test_two_nodes_go_on_from_the_parts_of_a_stopped_cache(tiny_kl_tokenizer, tmp_path, monkeypatch, shared):
    """Two nodes (two `torchrun --nnodes 2 --node_rank N` on this machine, one process each). With one
    cache folder on a file system both nodes share, both node main processes wrote the cache; the second
    could not claim the parts and kept none, so the build went on from batch 0 (every batch encoded again,
    the parts lost). The first node now writes the cache and its parts, the other neither, and both go on
    from the parts. With a folder per node (nothing shared) each node writes its own, as before."""
    tok = load_tokenizer(tiny_kl_tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: the same numbers
    folders = [tmp_path / "cache"] * 2 if shared else [tmp_path / "node0", tmp_path / "node1"]
    try:
        monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "alone"))
        expected = load_or_build_latents(tok, "digits", True, 600, "cpu")
        for folder in set(folders):  # a build stopped in its second batch: the first one kept
            monkeypatch.setenv("SMAPCTL_CACHE", str(folder))
            with pytest.MonkeyPatch.context() as m:
                m.setattr(token_parts, "SAVE_EVERY", 0.0)
                count_encodes(m, stop_at=3)
                with pytest.raises(KeyboardInterrupt):
                    load_or_build_latents(tok, "digits", True, 600, "cpu")
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "node.py"
    script.write_text(NODE)
    envs = [{"SMAPCTL_CACHE": str(folder)} for folder in folders]
    for status, _, err in two_nodes(tmp_path, tiny_kl_tokenizer, envs=envs, script=script, timeout=300):
        assert status == 0, err[-3000:]
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # Batch 0 read back from the parts: batches 1 and 2 encoded (and their mirror images), one per node.
    assert [g["calls"] for g in got] == [[600, 600], [418, 418]], [g["wrote"] for g in got]
    for g in got:
        assert torch.allclose(g["tokens"], expected.tokens, atol=1e-6)
    # Its last part (batches 1 and 2), then the cache; on a shared folder by the first node alone.
    assert [g["wrote"] for g in got] == [["part", "cache"], [] if shared else ["part", "cache"]]
    for folder in set(folders):
        assert [p.name for p in (folder / "latents").iterdir()] == [
            cache_path(tok.fingerprint, "digits", True).name
        ]


def test_a_second_run_making_the_same_cache_keeps_no_parts(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch, caplog
):
    """Two runs of a sweep start on one tokenizer's cache at once: the one that does not hold its lock
    makes the cache as before, without parts (it would remove or overwrite the other's); a part that
    cannot be written is said once and the cache is made without them."""
    from smapctl.io import try_lock

    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(token_parts, "SAVE_EVERY", 0.0)
    path = cache_path(tok.fingerprint, folder, False)
    partial = path.with_name(f"{path.name}.partial")
    lock = path.with_name(f"{path.name}.partial.lock")
    lock.parent.mkdir(parents=True)
    lock.touch()
    held = try_lock(lock)  # the other run
    try:
        with pytest.MonkeyPatch.context() as m:
            count_encodes(m, stop_at=3)
            with caplog.at_level(logging.INFO, logger="smapctl.data"), pytest.raises(KeyboardInterrupt):
                build(tok, folder, hflip=False)
        assert "another process is making this cache too; this one keeps no parts" in caplog.text
        assert not partial.exists()
    finally:
        os.close(held)
    caplog.clear()
    calls = count_encodes(monkeypatch)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(token_parts.PartFolder, "write", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
        with caplog.at_level(logging.WARNING, logger="smapctl.data"):
            cache = build(tok, folder, hflip=False)
    assert calls == [4, 4, 4] and len(cache.labels) == 12 and path.is_file()
    assert caplog.text.count("the token cache's parts could not be kept ([Errno 28] No space)") == 1


def test_a_run_that_finds_the_cache_made_removes_a_killed_builds_temp_file(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch
):
    """Two runs of a sweep make one cache; one is killed (SIGKILL) and started again at once, and finds the
    cache the other made meanwhile: it only reads it, and the killed build's temp file (the cache's size)
    was left in the cache folder for good. Reading the cache removes it; a live build's (locked) stays."""
    from smapctl import io
    from smapctl.io import try_lock

    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    path = cache_path(tok.fingerprint, folder, False)
    build(tok, folder, hflip=False)
    killed = path.with_name(f".{path.name}.0123456789ab.tmp")
    live = path.with_name(f".{path.name}.ba9876543210.tmp")
    for temp in (killed, live):
        temp.write_bytes(path.read_bytes()[:64])
    held = try_lock(live)  # a third run still making it
    monkeypatch.setattr(io, "_SWEPT", set())  # the restarted run: a new process
    try:
        calls = count_encodes(monkeypatch)
        cache = build(tok, folder, hflip=False)
        assert calls == [] and len(cache.labels) == 12
        assert sorted(p.name for p in path.parent.iterdir() if io.TEMP_NAME.match(p.name)) == [live.name]
    finally:
        os.close(held)


def test_a_full_disk_for_the_cache_beside_its_parts_and_stale_parts(
    tiny_kl_tokenizer, folder, tmp_path, monkeypatch, caplog
):
    """No room for the cache: said when its file is made, after the first batch. Room for it but not
    beside the parts of a stopped build (the file made in place finds no room, so its rows are made in
    memory): the parts go and the cache is written (a rerun would have read them back and failed again,
    every time). Parts left beside a cache another run finished go when the cache is next used."""
    import errno
    import shutil

    from smapctl import io
    from smapctl.io import write_error

    tok = load_tokenizer(tiny_kl_tokenizer)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(token_parts, "SAVE_EVERY", 0.0)

    def no_room(fd, size, start=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = cache_path(tok.fingerprint, folder, False)
    partial = path.with_name(f"{path.name}.partial")
    real, tries = latents.write_latents, []

    def full_the_first_time(where, cache):
        tries.append(partial.exists())
        if len(tries) == 1:
            cause = OSError(errno.ENOSPC, "No space left on device")
            raise write_error(where, cause, "the token cache") from cause
        real(where, cache)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(io, "reserve", no_room)
        calls = count_encodes(m)
        with pytest.raises(UserError, match="could not write the token cache .* the disk is full"):
            build(tok, folder, hflip=False)
    assert calls == [4] and not path.exists()  # said at the first batch (the parts keep it)
    assert not [p for p in path.parent.iterdir() if io.TEMP_NAME.match(p.name)]
    with pytest.MonkeyPatch.context() as m:
        count_encodes(m, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            build(tok, folder, hflip=False)  # keeps a part: batch 0
    with pytest.MonkeyPatch.context() as m:
        m.setattr(latents, "write_latents", full_the_first_time)
        m.setattr(io, "reserve", no_room)
        with caplog.at_level(logging.WARNING, logger="smapctl.data"):
            cache = build(tok, folder, hflip=False)
    assert tries == [True, False] and path.is_file() and not partial.exists()
    assert f"{path}: no room for the token cache on its disk now (No space left on device)" in caplog.text
    assert not [p for p in path.parent.iterdir() if io.TEMP_NAME.match(p.name)]
    assert f"{path}: no room beside its parts; they are removed and the cache written again" in caplog.text
    # Parts of a stopped build beside the finished cache (another run made it meanwhile).
    path.unlink()
    with pytest.MonkeyPatch.context() as m:
        count_encodes(m, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            build(tok, folder, hflip=False)
    shutil.copytree(partial, tmp_path / "kept")
    build(tok, folder, hflip=False)
    shutil.copytree(tmp_path / "kept", partial)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smapctl.data"):
        again = build(tok, folder, hflip=False)
    assert torch.equal(again.tokens, cache.tokens) and not partial.exists()
    assert f"{partial}: removed the parts of an earlier build (the cache is made)" in caplog.text


# Two processes making the cache, the second sending itself SIGTERM as it encodes its first batch: each
# writes the signal it stopped with and the batch sizes it encoded to OUT/rank{r}.pt.
SIGNALLED = """\
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from smapctl.data import latents
from smapctl.launch import StoppedTogether, process_state
from smapctl.models.smap import SMAP
from smapctl.ops import token_parts
from smapctl.ops.load import load_tokenizer

out, tokenizer = Path(sys.argv[1]), sys.argv[2]
process_state()
accelerator = Accelerator(cpu=True)
calls, encode = [], SMAP.encode


def encoded(self, images, labels):
    calls.append(len(images))
    if accelerator.process_index == 1 and len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return encode(self, images, labels)


SMAP.encode = encoded
token_parts.SAVE_EVERY = 1e9  # no part but the one a stop writes
tok = load_tokenizer(tokenizer)
try:
    latents.load_or_build_latents(tok, "digits", True, 600, "cpu", processes=accelerator)
    stopped = None
except StoppedTogether as e:
    stopped = e.signum
torch.save({"calls": calls, "stopped": stopped}, out / f"rank{accelerator.process_index}.pt")
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_a_signal_stops_every_process_after_the_same_round_and_the_parts_hold_it(
    tiny_kl_tokenizer, tmp_path, monkeypatch
):
    """The process that received SIGTERM stopped at once, where it was, and the main process met a broken
    collective (with NCCL it waited until torchrun killed it, losing the rounds since its last part). Now
    both finish the round and stop with the signal, the main process keeping the round in a part: the
    next run encodes only the last batch. (1618 digits in batches of 600: rounds (0, 1) and (2,).)"""
    import signal

    tok = load_tokenizer(tiny_kl_tokenizer)
    r = two_processes(SIGNALLED, tmp_path, tiny_kl_tokenizer)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["stopped"] == signal.SIGTERM and got["calls"] == [600, 600]  # one batch and its mirror
    assert "interrupted: 2 of 3 batches of the token cache are kept in" in r.stderr, r.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: the same numbers
    try:
        monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
        calls = count_encodes(monkeypatch)
        cache = load_or_build_latents(tok, "digits", True, 600, "cpu")
        assert calls == [418, 418]  # the last batch and its mirror images; the first two read back
        monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "alone"))
        expected = load_or_build_latents(tok, "digits", True, 600, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(cache.tokens, expected.tokens, atol=1e-6)
