"""Run-folder checkpoints: round trip, bitwise resume, atomicity, pruning, resolving, safe loading."""

import errno
import gc
import json
import logging
import os
import pickle
import random
import re
import shutil
import stat
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import fill_disk
from safetensors import SafetensorError
from torch import nn

import smapctl
from smapctl.config import to_dict
from smapctl.errors import UserError
from smapctl.train import checkpoint as ckpt_mod
from smapctl.train.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_meta,
    load_state,
    load_weights,
    prune_checkpoints,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from smapctl.train.config import TrainConfig
from smapctl.train.ema import EMA
from smapctl.train.schedule import build_optimizer, build_scheduler


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


def _save(run, step, model=None, **kw):
    model = model or Tiny()
    kw.setdefault("recipe", {"train": {"lr": 1e-3}})
    return save_checkpoint(run, step, kind="tokenizer", weights={"model": model}, **kw)


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_weights_meta_and_state(tmp_path):
    torch.manual_seed(0)
    model, disc = Tiny(), nn.Conv2d(3, 1, 3)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, max_steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    ema = EMA(model, 0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    ema.update(model)
    path = save_checkpoint(
        tmp_path / "run",
        7,
        kind="tokenizer",
        recipe=cfg,
        weights={"model": model, "ema": ema, "discriminator": disc},
        state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        meta={"latent_stats": {"mean": torch.tensor(0.25), "std": 2.0}},
    )
    assert path == tmp_path / "run" / "checkpoints" / "step_000000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "discriminator.safetensors",
        "ema.safetensors",
        "meta.json",
        "model.safetensors",
        "state.pt",
    ]
    for name, sd in [
        ("model", model.state_dict()),
        ("ema", ema.state_dict()),
        ("discriminator", disc.state_dict()),
    ]:
        loaded = load_weights(path, name)
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    meta = load_meta(path)
    assert meta["smapctl_version"] == smapctl.__version__
    assert meta["threads"] == torch.get_num_threads()  # on the CPU, a run repeats bit for bit at one count
    assert (meta["kind"], meta["model_class"], meta["step"]) == ("tokenizer", "Tiny", 7)
    assert meta["classes"] == {"model": "Tiny", "discriminator": "Conv2d"}
    # Every file of the checkpoint is listed, the state too (a copy can be checked for completeness).
    assert sorted(meta["files"]) == sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert meta["recipe"] == to_dict(cfg)
    assert meta["latent_stats"] == {"mean": 0.25, "std": 2.0}
    state = load_state(path)
    assert state["step"] == 7
    opt2 = build_optimizer(Tiny(), cfg)
    opt2.load_state_dict(state["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"], opt.state_dict()["state"])
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 1


def test_checkpoint_files_get_the_mode_of_a_new_file(tmp_path):
    """Weights (safetensors creates its files 0600) are as readable as meta.json: 0o666 minus the umask."""
    saved = os.umask(0o022)
    try:
        path = save_checkpoint(
            tmp_path, 1, kind="tokenizer", recipe={}, weights={"model": Tiny(), "ema": EMA(Tiny(), 0.9)}
        )
    finally:
        os.umask(saved)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "ema.safetensors", "state.pt", "meta.json"], 0o644)


def _train_steps(model, opt, sched, n):
    """A loop that draws from torch, numpy and python RNGs, so a resume must restore all three."""
    for _ in range(n):
        x = torch.randn(4, 4) * (1 + np.random.rand()) + random.random()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_continues_bitwise_identically(tmp_path):
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=20)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model = Tiny()
    opt, sched = build_optimizer(model, cfg), None
    sched = build_scheduler(opt, cfg)
    _train_steps(model, opt, sched, 3)
    path = save_checkpoint(
        tmp_path,
        3,
        kind="tokenizer",
        recipe=cfg,
        weights={"model": model},
        state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
    )
    _train_steps(model, opt, sched, 4)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # a new process: other RNG states
    resumed = Tiny()
    resumed.load_state_dict(load_weights(path))
    opt2 = build_optimizer(resumed, cfg)
    sched2 = build_scheduler(opt2, cfg)
    state = load_state(path)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    _train_steps(resumed, opt2, sched2, 4)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_rng_restore_repeats_random_numbers():
    state = capture_rng()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3), np.random.randn())
    restore_rng(state)
    second = (random.random(), np.random.rand(3).tolist(), torch.rand(3), np.random.randn())
    assert first[0] == second[0] and first[1] == second[1] and first[3] == second[3]
    assert torch.equal(first[2], second[2])


def test_the_rng_state_of_apples_mps_is_kept_and_restored(monkeypatch):
    """On a Mac training runs on mps (accelerate picks it), where its posterior samples and a generator's
    noise are drawn: a resumed run went on from another mps random state than the interrupted one's.
    (This machine has no mps: its generator is stood in for by a CPU one.)"""
    mps = torch.Generator().manual_seed(7)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", mps.get_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", mps.set_state)
    state = capture_rng()
    first = torch.rand(3, generator=mps)
    restore_rng(state)
    assert torch.equal(torch.rand(3, generator=mps), first)


# ------------------------------------------------------------------------------------------ atomicity


def test_crash_mid_write_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)
    real = ckpt_mod.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # a file is half the checkpoint, then the crash
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]
    assert load_state(good)["step"] == 1


def test_latest_ignores_temp_and_incomplete_folders(tmp_path):
    good = _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    killed = root / ".tmp-step_000000009-deadbeef"  # a writer killed before the rename
    killed.mkdir()
    (killed / "meta.json").write_text("{}")
    (root / "step_000000005").mkdir()  # no meta.json: incomplete
    (root / "step_000000005" / "model.safetensors").write_bytes(b"partial")
    (root / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    _save(tmp_path, 3)
    assert not killed.exists()  # the next save clears temp folders left by a killed writer


def test_disk_full_in_weights_is_a_user_error(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 10)
        raise SafetensorError(
            'Error while serializing: I/O error: No space left on device (os error 28) at "x"'
        )

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(
        UserError, match=r"step_000000002: could not write checkpoint \(No space left on device\)"
    ):
        _save(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_disk_full_in_state_is_a_user_error(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good
    assert load_state(good)["step"] == 1


def test_disk_full_inside_torch_save_is_a_user_error(tmp_path, monkeypatch):
    """A real failed write: torch.save reports it as a RuntimeError ("unexpected pos"), not an OSError."""
    good = _save(tmp_path, 1)
    hits = fill_disk(monkeypatch, free=300, only="state.pt")
    with pytest.raises(UserError) as e:
        _save(tmp_path, 2)
    assert hits == [tmp_path / "checkpoints" / hits[0].parent.name / "state.pt"]
    assert str(e.value) == (
        f"{ckpt_mod.checkpoint_dir(tmp_path, 2)}: could not write checkpoint (No space left on device): the "
        "disk is full; free some space or write elsewhere; earlier checkpoints are unchanged"
    )
    assert list_checkpoints(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_a_failed_checkpoint_write_keeps_nothing_it_was_given(tmp_path, monkeypatch):
    """Once its error is let go, the model of a checkpoint that could not be written is freed, at once:
    the error's frames were kept by the file torch.save's C++ writer holds, where Python's collector cannot
    see them (a training's model stayed in memory to the end of the process, and under a launcher, through
    the model's wrapper, the process group: see `launch._collect_before_shutdown`), and, that mended, by
    torch.save's exit, which holds the error, until the collector's next full pass."""
    fill_disk(monkeypatch, free=300, only="state.pt")
    _assert_a_full_disk_keeps_nothing(tmp_path)


def test_a_failed_weights_write_keeps_nothing_it_was_given(tmp_path, monkeypatch):
    """As for state.pt (above), for a weights file that could not be written (safetensors' error, its
    errno given back): the model was freed only by Python's next full collection, `_write_weights` holding
    the OSError it raised in a local, and that error's traceback its frame (the model among its locals)."""

    def full(tensors, filename, metadata=None):
        raise SafetensorError(
            'Error while serializing: I/O error: No space left on device (os error 28) at "x"'
        )

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    _assert_a_full_disk_keeps_nothing(tmp_path)


def _assert_a_full_disk_keeps_nothing(tmp_path) -> None:
    """A checkpoint of a model, which the full disk stops: once its error is let go, the model is freed
    by reference counting alone (no collection)."""
    model = Tiny()
    gone = weakref.ref(model)
    gc.disable()
    try:
        with pytest.raises(UserError, match="No space left on device"):
            _save(tmp_path, 1, model=model)
        del model
        assert gone() is None
    finally:
        gc.enable()


def test_unloadable_state_is_refused_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"state\.extra\.where: PosixPath cannot be loaded"):
        _save(tmp_path, 1, state={"extra": {"where": Path("x")}})
    assert latest_checkpoint(tmp_path) is None


def test_meta_may_not_override_core_keys(tmp_path):
    with pytest.raises(ValueError, match=r"may not override \['step'\]"):
        _save(tmp_path, 1, meta={"step": 5})
    assert not (tmp_path / "checkpoints").exists()


def test_tied_weights_are_saved(tmp_path):
    model = Tiny()
    model.head = nn.Linear(8, 4)
    model.head.weight = model.net[3].weight  # two state-dict names, one storage
    loaded = load_weights(_save(tmp_path, 1, model=model))
    assert torch.equal(loaded["head.weight"], loaded["net.3.weight"])
    fresh = Tiny()
    fresh.head = nn.Linear(8, 4)
    fresh.load_state_dict(loaded)


def test_same_step_is_replaced(tmp_path):
    _save(tmp_path, 4, recipe={"v": 1})
    path = _save(tmp_path, 4, recipe={"v": 2})
    assert load_meta(path)["recipe"] == {"v": 2}
    assert list_checkpoints(tmp_path) == [path]


# ------------------------------------------------------------------------------------------ prune / resolve


def test_prune_keeps_newest(tmp_path):
    for step in (10, 2, 30, 4):
        _save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_000000002", "step_000000004"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000010", "step_000000030"]
    _save(tmp_path, 40, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000040"]


def test_prune_keeps_pinned_checkpoints_and_says_when_their_run_is_not_there(tmp_path, caplog):
    """A pin of a run that is not where it was is kept: a generator run moved or renamed cannot be told
    from one deleted, and it samples only with that checkpoint (pruned, it was unusable)."""
    from smapctl.train.checkpoint import pin_checkpoint, unpin_checkpoint

    for step in (1, 2, 3, 4):
        _save(tmp_path / "tok", step)
    first, second, third, _ = list_checkpoints(tmp_path / "tok")
    (tmp_path / "gen").mkdir()
    pin_checkpoint(first, tmp_path / "gen")
    pin_checkpoint(first, tmp_path / "gen")  # once
    pin_checkpoint(second, tmp_path / "moved-away")  # a generator run that is not there any more
    assert pin_checkpoint(third, tmp_path / "failed")  # one that failed at its start takes its pin back
    unpin_checkpoint(third, tmp_path / "failed")
    assert not (third / "pinned_by.txt").exists()
    # A folder pinned already (an earlier run there, since renamed): a new run's pin adds nothing, so a
    # failure of the new run must not take the earlier run's line (only the adding call may undo).
    assert not pin_checkpoint(first, tmp_path / "gen")
    assert (first / "pinned_by.txt").read_text() == f"{(tmp_path / 'gen').resolve()}\n"
    caplog.clear()
    assert prune_checkpoints(tmp_path / "tok", keep=1) == [third]
    [record] = [r for r in caplog.records if r.name.startswith("smapctl")]  # a log line, not `warnings`
    assert record.levelname == "WARNING"
    assert re.search(r"step_000000002: kept for the generator run .*moved-away, which is not", record.message)
    assert [p.name for p in list_checkpoints(tmp_path / "tok")] == [
        "step_000000001", "step_000000002", "step_000000004"
    ]  # fmt: skip


def test_a_pin_that_cannot_be_written_is_a_log_warning(tmp_path, caplog):
    from smapctl.train.checkpoint import PINNED, pin_checkpoint

    step = _save(tmp_path / "tok", 1)
    (step / PINNED).mkdir()  # cannot be opened for appending: as a read-only folder would refuse it
    assert not pin_checkpoint(step, tmp_path / "gen")
    [record] = [r for r in caplog.records if r.name.startswith("smapctl")]
    assert record.levelname == "WARNING" and record.message.startswith(f"could not mark {step} as used by")


def test_a_pin_list_that_is_a_symbolic_link_is_not_followed(tmp_path, caplog):
    """A tokenizer checkpoint shared by another team (a tarball keeps links) whose pin list is a link to a
    file elsewhere: a generator run trained on it appended its line to that file, or created the file a
    dangling link names. Neither is written now; the pin is left undone with a warning, as where the
    checkpoint cannot be written."""
    from smapctl.train.checkpoint import PINNED, pin_checkpoint, pinned

    step = _save(tmp_path / "tok", 1)
    decoy = tmp_path / "elsewhere.txt"
    decoy.write_text("someone else's file\n")
    (step / PINNED).symlink_to(decoy)
    assert not pin_checkpoint(step, tmp_path / "gen")
    assert decoy.read_text() == "someone else's file\n" and not pinned(step)
    [record] = [r for r in caplog.records if r.name.startswith("smapctl")]
    assert record.levelname == "WARNING" and "a symbolic link, which is not followed" in record.message
    (step / PINNED).unlink()
    (step / PINNED).symlink_to(tmp_path / "made.txt")
    assert not pin_checkpoint(step, tmp_path / "gen")
    assert not (tmp_path / "made.txt").exists()


def test_a_meta_json_nested_too_deep_is_one_line(tmp_path):
    """A checkpoint from elsewhere whose meta.json nests past Python's recursion limit (`[[[[...`, 400 kB)
    ended every command that loaded it in a RecursionError traceback."""
    step = _save(tmp_path / "run", 1)
    (step / "meta.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError, match=r"meta.json: unreadable \(JSON nested too deep to read\)$"):
        load_meta(step)


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save(run, 1)
    newest = _save(run, 2)
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(run / "checkpoints") == newest
    assert resolve_checkpoint(run / "checkpoints" / "step_000000001").name == "step_000000001"
    assert resolve_checkpoint(newest / "model.safetensors") == newest
    # Copied out of its run to keep it, under any name (only `step_N` was a checkpoint: "no complete
    # checkpoint here (looked for kept/meta.json ...)", which was there).
    shutil.copytree(newest, tmp_path / "kept")
    assert resolve_checkpoint(tmp_path / "kept") == tmp_path / "kept"
    assert resolve_checkpoint(tmp_path / "kept" / "meta.json") == tmp_path / "kept"
    with pytest.raises(UserError, match="no such checkpoint or run folder"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UserError, match=r"no complete checkpoint here \(looked for .*checkpoints/step_\*/meta\.json"
    ):
        resolve_checkpoint(tmp_path / "empty")
    # A file elsewhere (a token file given as --checkpoint) is named, not its folder.
    (tmp_path / "codes.pt").write_bytes(b"")
    with pytest.raises(
        UserError, match=rf"^{tmp_path / 'codes.pt'}: a file, not a checkpoint or run folder$"
    ):
        resolve_checkpoint(tmp_path / "codes.pt")


def test_a_checkpoint_copied_out_of_its_run_has_no_run(tmp_path):
    """`run_of` gives a run's checkpoint its run, and one copied out of its run to keep it none: evaluate's
    default --out is `(run_of(checkpoint) or checkpoint) / "eval"`. Only checkpoints inside runs were
    asked, so taking any checkpoint's grandparent for its run passed (and evaluate of `keep/best` wrote
    its eval/ beside `keep`, in a folder it has nothing to do with)."""
    newest = _save(tmp_path / "run", 2)
    assert ckpt_mod.run_of(newest) == tmp_path / "run"
    shutil.copytree(newest, tmp_path / "keep" / "best")
    assert ckpt_mod.run_of(tmp_path / "keep" / "best") is None


def test_missing_files_are_user_errors(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(
        UserError, match=r"ema\.safetensors: not found \(this checkpoint has weights: model\)"
    ):
        load_weights(path, "ema")
    (path / "ema.safetensors").mkdir()  # a folder of its name is not its weights (it was named as one)
    with pytest.raises(
        UserError, match=r"ema\.safetensors: not a file \(this checkpoint has weights: model\)$"
    ):
        load_weights(path, "ema")
    (path / "state.pt").unlink()
    with pytest.raises(UserError, match=r"state\.pt: not found"):
        load_state(path)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable safetensors"):
        load_weights(path)


# ------------------------------------------------------------------------------------------ security


class Evil:
    """Unpickling this creates a file: the kind of payload a shared checkpoint could carry."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_malicious_state_is_refused(tmp_path, fmt):
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    if fmt == "torch":
        torch.save({"step": 1, "x": Evil(marker)}, path / "state.pt")
    else:
        (path / "state.pt").write_bytes(pickle.dumps({"step": 1, "x": Evil(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"state\.pt: refused to load"):
        load_state(path)
    assert not marker.exists()
    # The payload is real: a plain unpickle would have created the file.
    pickle.loads(pickle.dumps(Evil(marker))).close()
    assert marker.exists()


def test_a_prune_killed_half_way_leaves_nothing_for_good(tmp_path, monkeypatch):
    """Deleted in place, a checkpoint whose meta.json went first (a kill during the delete) was no longer
    listed, so never pruned: found twice in 28 random kill -9s of a real run."""
    import shutil

    for step in (1, 2, 3):
        _save(tmp_path, step)
    first = list_checkpoints(tmp_path)[0]
    (first / "meta.json").unlink()  # what a kill in the middle of shutil.rmtree(first) left
    real, calls = shutil.rmtree, []

    def killed(path, *args, **kwargs):  # the kill comes during the next delete, after the rename
        calls.append(Path(path).name)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=1)
    assert calls and calls[0].startswith(".tmp-pruned-")  # renamed away first: a temp folder
    monkeypatch.setattr(shutil, "rmtree", real)
    _save(tmp_path, 4, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000004"]


def test_old_checkpoints_that_cannot_be_pruned_are_a_warning_not_a_stop(tmp_path, monkeypatch, caplog):
    """A folder the prune cannot delete (no permission, a file held open on Windows) does not stop the
    training whose checkpoint was just written: one warning naming the checkpoints folder, the new
    checkpoint complete, the next save prunes them."""
    for step in (1, 2):
        _save(tmp_path, step)
    real = shutil.rmtree

    def refused(path, *args, **kwargs):
        if "pruned-" in Path(path).name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refused)
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        path = _save(tmp_path, 3, keep=1)
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    root = tmp_path / "checkpoints"
    assert record.getMessage().startswith(f"could not prune old checkpoints in {root}: [Errno 13]"), record
    assert list_checkpoints(tmp_path)[-1] == path and load_meta(path)["step"] == 3
    monkeypatch.setattr(shutil, "rmtree", real)
    _save(tmp_path, 4, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_000000004"]


def test_a_damaged_state_or_meta_is_one_line(tmp_path):
    path = _save(tmp_path, 1)
    data = (path / "state.pt").read_bytes()
    for cut in range(200, len(data), max(1, len(data) // 60)):  # some lengths were OSError tracebacks
        (path / "state.pt").write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"state\.pt: unreadable \("):
            load_state(path)
    torch.save([1, 2], path / "state.pt")
    with pytest.raises(UserError, match=r"state\.pt: not a checkpoint's state \(a list, not a dict\)$"):
        load_state(path)
    (path / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"meta\.json: not a checkpoint's meta\.json \(a JSON list"):
        load_meta(path)


def test_a_checkpoint_of_a_newer_format_is_refused_and_an_older_one_read(tmp_path, capsys):
    """A checkpoint a newer smapctl wrote (its meta.json's `format` above this one's) is refused in one line
    saying to upgrade, by every command that reads it (here `tokenize`); one of the format this smapctl
    writes, or without a format, is read."""
    from tiny_tokenizer import error_lines, run_cli

    path = _save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == ckpt_mod.FORMAT_VERSION
    for older in ({**meta}, {k: v for k, v in meta.items() if k != "format"}):
        (path / "meta.json").write_text(json.dumps(older))
        assert load_meta(path) == older
    (path / "meta.json").write_text(json.dumps({**meta, "format": ckpt_mod.FORMAT_VERSION + 1}))
    newer = rf"checkpoint format {ckpt_mod.FORMAT_VERSION + 1}; this smapctl reads {ckpt_mod.FORMAT_VERSION}"
    with pytest.raises(UserError, match=re.escape(newer) + r" \(a newer smapctl wrote it: upgrade smapctl"):
        load_meta(path)
    (tmp_path / "a.png").write_bytes(b"")  # never read: the checkpoint is refused first
    code, _, err = run_cli(
        capsys, "tokenize", tmp_path / "a.png", "--checkpoint", path, "-o", tmp_path / "c.pt"
    )
    assert code == 1 and error_lines(err) == [
        f"error: {path / 'meta.json'}: {newer} (a newer smapctl wrote it: upgrade smapctl to read it)"
    ], err
    assert not (tmp_path / "c.pt").exists()


# ------------------------------------------------------------------------------------ pins, refusals


def test_an_output_is_refused_only_inside_a_runs_checkpoints_folder(tmp_path):
    """`--out RUN/checkpoints` itself is the pruned folder too; a folder merely named `checkpoints` that
    holds no run's checkpoints (a user's own ~/checkpoints) is a fine place for an output."""
    from smapctl.train.checkpoint import refuse_output_in_checkpoints

    step = _save(tmp_path / "run", 1)
    for out in (tmp_path / "run" / "checkpoints", step, step / "samples" / "x.png"):
        with pytest.raises(UserError, match="a training run's checkpoints"):
            refuse_output_in_checkpoints(out)
    (tmp_path / "mine" / "checkpoints").mkdir(parents=True)
    refuse_output_in_checkpoints(tmp_path / "mine" / "checkpoints" / "samples")
    refuse_output_in_checkpoints(tmp_path / "run" / "eval")


def test_prune_refuses_to_keep_nothing(tmp_path):
    """keep=0 would mean "delete every checkpoint" (and `complete[:-0]` silently deleted none): refused."""
    _save(tmp_path, 1)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(tmp_path, keep=0)
    assert len(list_checkpoints(tmp_path)) == 1


def test_a_pin_list_naming_a_present_run_keeps_quietly_and_an_empty_one_keeps_nothing(tmp_path, caplog):
    """The "not there any more" warning is for a checkpoint whose every pinning run is gone: one run moved
    beside one still present is no reason to warn. A pin list left empty (every line blank) pins nothing."""
    from smapctl.train.checkpoint import PINNED, pin_checkpoint

    for step in (1, 2, 3):
        _save(tmp_path / "tok", step)
    first, second, _ = list_checkpoints(tmp_path / "tok")
    (tmp_path / "gen").mkdir()
    pin_checkpoint(first, tmp_path / "gen")
    pin_checkpoint(first, tmp_path / "moved-away")
    (second / PINNED).write_text("\n\n")
    caplog.clear()
    assert prune_checkpoints(tmp_path / "tok", keep=1) == [second]
    assert [r for r in caplog.records if r.name.startswith("smapctl")] == []
    assert [p.name for p in list_checkpoints(tmp_path / "tok")] == ["step_000000001", "step_000000003"]


def test_a_second_generator_run_adds_its_pin_beside_the_first(tmp_path):
    """Two generator runs trained on one tokenizer checkpoint both need it: the second pin must add its
    line, not replace the first, or the first run's checkpoint is pruned once the second one's start
    failed and took its own line back."""
    from smapctl.train.checkpoint import PINNED, pin_checkpoint, unpin_checkpoint

    for step in (1, 2):
        _save(tmp_path / "tok", step)
    first, _ = list_checkpoints(tmp_path / "tok")
    for gen in ("gen-a", "gen-b"):
        (tmp_path / gen).mkdir()
        assert pin_checkpoint(first, tmp_path / gen)
    assert (first / PINNED).read_text().splitlines() == [
        str((tmp_path / "gen-a").resolve()), str((tmp_path / "gen-b").resolve())
    ]  # fmt: skip
    unpin_checkpoint(first, tmp_path / "gen-b")
    assert prune_checkpoints(tmp_path / "tok", keep=1) == []
    assert first.is_dir()


def test_an_rng_state_given_to_save_is_kept_not_replaced(tmp_path):
    """The training loop captures the RNG states itself (of every process, gathered, at the step's end)
    and passes them in `state`: save adds its own `rng` only when none is given."""
    given = {"rank0": capture_rng(), "rank1": capture_rng()}
    torch.rand(3)  # the RNG moves on before the save
    path = _save(tmp_path, 2, state={"rng": given, "samples": 8})
    state = load_state(path)
    assert set(state["rng"]) == {"rank0", "rank1"} and state["samples"] == 8 and state["step"] == 2
    assert torch.equal(state["rng"]["rank0"]["torch"], given["rank0"]["torch"])


def test_replacing_a_checkpoint_leaves_no_copy_of_the_old_one(tmp_path):
    """Saving a step again moves the old folder aside and deletes it: left, a whole model-sized copy sat in
    checkpoints/ until some later save (never, after a run's last one)."""
    _save(tmp_path, 4)
    _save(tmp_path, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000004"]


def test_weights_of_another_dtype_are_refused_not_cast(tmp_path):
    """load_state_dict casts silently: a float16 file loaded into a float32 model would train or sample
    with rounded weights and say nothing. It is a one-line UserError naming the tensor."""
    from smapctl.train.checkpoint import load_weights_into

    path = _save(tmp_path, 1, model=Tiny().half())
    with pytest.raises(
        UserError, match=r"model\.safetensors: net\.\d\.\w+ is torch\.float16, the model's is torch\.float32"
    ):
        load_weights_into(Tiny(), path)


def test_paths_in_a_recipe_or_meta_are_stored_as_strings(tmp_path):
    """A recipe's data paths (and extras such as a tokenizer's path) are `Path`s; json cannot write them."""
    path = _save(
        tmp_path, 1, recipe={"data": {"root": tmp_path / "data"}}, meta={"tokenizer": {"path": tmp_path}}
    )
    meta = load_meta(path)
    assert meta["recipe"] == {"data": {"root": str(tmp_path / "data")}}
    assert meta["tokenizer"] == {"path": str(tmp_path)}


def test_a_checkpoint_its_training_pruned_while_a_command_loaded_it_is_said_so(tmp_path, monkeypatch):
    """`sample` or `evaluate` on a run still training takes its newest checkpoint so far, which the
    training prunes (train.keep_checkpoints) as it saves newer ones: one loading it then was told "not
    found (this checkpoint has weights: none)", as if it were broken. It is told the training removed it,
    and to run again, also when the prune comes between the look for the weights or meta.json and their
    read (said as "not found" there, no test failed; meta.json's as "no such file or directory"); without
    a training holding the run, the errors are as before."""
    from faults import lock_held_elsewhere

    run = tmp_path / "gen"

    def save(step):
        folder = run / "checkpoints" / f"step_{step:09d}"
        folder.mkdir(parents=True)
        (folder / "ema.safetensors").write_bytes(b"")
        (folder / "meta.json").write_text("{}")  # (written last: the checkpoint is complete)

    save(4)
    save(8)
    with lock_held_elsewhere(run) as holder:
        chosen = resolve_checkpoint(run)
        save(12)
        prune_checkpoints(run, 1)
        said = f"^{re.escape(str(chosen))}: removed by the training still running in {re.escape(str(run))} "
        said += f"\\(process {holder.pid} .*\\) as it saved newer checkpoints .*; run the command again"
        for load in (load_meta, lambda p: load_weights(p, "ema"), resolve_checkpoint):
            with pytest.raises(UserError, match=said):
                load(chosen)
        with monkeypatch.context() as m:  # the weights were there as it looked, gone as it read them
            m.setattr(ckpt_mod, "missing_weights", lambda ckpt, name: None)
            with pytest.raises(UserError, match=said):
                load_weights(chosen, "ema")
        is_file = Path.is_file
        with monkeypatch.context() as m:  # so was its meta.json (an OSError: "no such file or directory")
            m.setattr(Path, "is_file", lambda p: p == chosen / "meta.json" or is_file(p))
            with pytest.raises(UserError, match=said):
                load_meta(chosen)
    with pytest.raises(UserError, match="this checkpoint has weights: none"):
        load_weights(chosen, "ema")
    with pytest.raises(UserError, match="no such checkpoint or run folder"):
        resolve_checkpoint(chosen)


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    """Past step 999,999,999 the name has ten digits: `step_1000000000` sorts before `step_999999999` as a
    string, and would be taken for the oldest (resumed from the wrong one, pruned first)."""
    for step in (1_000_000_000, 999_999_999, 5):
        _save(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_000000005",
        "step_999999999",
        "step_1000000000",
    ]
    assert latest_checkpoint(tmp_path).name == "step_1000000000"
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["step_000000005", "step_999999999"]


def test_meta_records_the_thread_count_the_checkpoint_was_made_at(tmp_path):
    """On the CPU float rounding follows the thread count: meta.json keeps the count in use, not a constant
    (the tests run at one thread, which a constant 1 would pass)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = _save(tmp_path, 1)
    finally:
        torch.set_num_threads(before)
    assert load_meta(path)["threads"] == 2


def test_a_missing_folder_of_another_name_beside_a_running_trainings_checkpoints_is_not_said_pruned(tmp_path):
    """Pruning removes `step_N` folders only: a missing `checkpoints/best` of a run still training is not
    there, not "removed by the training"."""
    from faults import lock_held_elsewhere

    run = tmp_path / "gen"
    (run / "checkpoints").mkdir(parents=True)
    with lock_held_elsewhere(run):
        with pytest.raises(UserError, match="no such checkpoint or run folder"):
            resolve_checkpoint(run / "checkpoints" / "best")
        with pytest.raises(UserError, match=r"meta.json: not found"):
            load_meta(run / "checkpoints" / "best")


def test_a_generator_run_whose_folder_is_not_utf8_pins_and_unpins_by_its_bytes(tmp_path):
    """A generator run folder named in Latin-1 (its bytes held as lone surrogates) stopped its training
    with a UnicodeEncodeError as it pinned the tokenizer checkpoint (`train-generator --out`, `reproduce
    mini --work`); its line holds the folder's own bytes, keeps the checkpoint, and is taken back."""
    from smapctl.train.checkpoint import PINNED, pin_checkpoint, pinned, unpin_checkpoint

    for step in (1, 2):
        _save(tmp_path / "tok", step)
    first, _ = list_checkpoints(tmp_path / "tok")
    here = os.fsencode(tmp_path)
    latin, other = (os.fsdecode(os.path.join(here, name)) for name in (b"gen\xe9", b"gen-b"))
    for run in (latin, other):
        os.mkdir(run)
        assert pin_checkpoint(first, run)
    assert (first / PINNED).read_bytes().splitlines()[0] == os.path.join(here, b"gen\xe9")
    assert pinned(first) and not pin_checkpoint(first, latin)  # (there already: read back as written)
    unpin_checkpoint(first, other)
    assert (first / PINNED).read_bytes() == os.path.join(here, b"gen\xe9") + b"\n"
    assert prune_checkpoints(tmp_path / "tok", keep=1) == [] and first.is_dir()
    unpin_checkpoint(first, latin)
    assert not (first / PINNED).exists()
