"""Resuming repeats an uninterrupted run bit for bit: from a middle checkpoint, after kill -9 (also
during a checkpoint write), after SIGTERM/SIGINT (to the process or to its whole group, data workers
included)."""

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import time

import pytest
import torch
from faults import lock_held_elsewhere, sigterm_lost_as_the_command_starts
from tiny_tokenizer import (
    ROOT,
    assert_same_checkpoint,
    cli_args,
    error_lines,
    load,
    metrics_by_step,
    regularizer_sets,
    run_cli,
    start_cli,
    write_recipe,
)

from smapctl.errors import UserError
from smapctl.train import checkpoint as ckpt
from smapctl.train.resume import holds_checkpoints, past_a_damaged, resume_command
from smapctl.train.run_folder import lock_folder
from smapctl.train.runner import TrainingRun
from smapctl.train.signals import NO_CHECKPOINT_YET, RESUME_FROM_NEWEST, GracefulStop
from smapctl.train.tokenizer import train_tokenizer


def _resume_from(full, tmp_path, step: int, recipe):
    """Copy a finished run, drop its checkpoints after `step` and resume the copy to the end. The copy's
    metrics still hold the rows after `step` (and a torn line): the resumed run must log each step once."""
    copy = tmp_path / "resumed"
    shutil.copytree(full, copy)
    for path in ckpt.list_checkpoints(copy):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    assert ckpt.latest_checkpoint(copy) == ckpt.checkpoint_dir(copy, step)
    with open(copy / "metrics.jsonl", "a") as f:  # the torn last line of a killed writer
        f.write('{"step": 13, "loss": 0.')
    train_tokenizer(recipe, copy, resume=True)
    return copy


# Samples/evaluation every 5 steps and checkpoints every 3: the resumed half evaluates at other
# points of its own life than the first half did, which must not touch the training RNG.
CASES = {
    "kl": [],  # posterior sampling + per-sample tail dropping
    "kl-2-workers": ["data.num_workers=2"],
    "vq-batch-tail-drop": [*regularizer_sets("vq"), "model.tail_drop_per_sample=false"],
    "softvq": regularizer_sets("softvq"),
    "kl-accumulation": ["train.grad_accum_steps=2"],
}


@pytest.mark.parametrize("case", CASES)
def test_resume_from_the_middle_is_bitwise_equal(tmp_path, case):
    recipe = load(write_recipe(tmp_path), *CASES[case])
    final = train_tokenizer(recipe, tmp_path / "full")
    resumed = _resume_from(tmp_path / "full", tmp_path, 6, recipe)
    assert_same_checkpoint(final, ckpt.latest_checkpoint(resumed))
    full_rows, resumed_rows = metrics_by_step(tmp_path / "full"), metrics_by_step(resumed)
    assert sorted(full_rows) == list(range(1, 13))
    assert resumed_rows == full_rows  # every logged number, validation PSNRs included
    rng = ckpt.load_state(final)["rng"]
    assert isinstance(rng, list) and len(rng) == 1  # one RNG state per process


def test_a_resume_with_another_number_of_processes_reseeds_the_random_streams(tmp_path, monkeypatch, caplog):
    """The checkpoint of two processes resumed by one has no random state for it: a run that said the
    random streams were reseeded but kept the state it starts with drew again, in its first step, the
    random numbers of a fresh run's first step (posterior samples, tail dropping), and passed the test of
    such a resume, which trains a VQ that draws none. They are reseeded: other numbers."""
    recipe = load(write_recipe(tmp_path), "train.max_steps=4", "train.ckpt_every=3")
    drawn: dict[str, torch.Tensor] = {}  # the random state as each run's first step starts
    real = TrainingRun._steps

    def steps(self, batches):
        for step, batch in real(self, batches):
            drawn.setdefault(self.run_dir.name, torch.get_rng_state())
            yield step, batch

    monkeypatch.setattr(TrainingRun, "_steps", steps)
    train_tokenizer(recipe, tmp_path / "run")
    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "run", 4))
    state_file = ckpt.checkpoint_dir(tmp_path / "run", 3) / ckpt.STATE
    state = torch.load(state_file, weights_only=True)
    torch.save(state | {"rng": state["rng"] * 2}, state_file)  # as two processes save it
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    with caplog.at_level("WARNING"):
        train_tokenizer(recipe, tmp_path / "resumed", resume=True)
    assert "the checkpoint holds the random states of 2 process(es) but this run has 1" in caplog.text
    assert not torch.equal(drawn["resumed"], drawn["run"])


def test_resume_continues_a_finished_run_to_a_later_max_steps(tmp_path, caplog):
    # The schedule depends on max_steps, so only the sample stream and the weights carry over; the run
    # must pick up at step 12 and write checkpoints from there.
    from smapctl.train.schedule import lr_at

    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    train_tokenizer(load(path), run)
    # A finished run resumed as it is trains nothing, and says so (it exited without a word).
    final = ckpt.checkpoint_dir(run, 12)
    assert train_tokenizer(load(path), run, resume=True) == final
    assert "nothing to train: the run is at step 12 and train.max_steps is 12" in caplog.text
    assert ckpt.list_checkpoints(run)[-1] == final
    # A resume with nothing to train keeps the run's recipe.yaml (its max_steps became 5, and the
    # printed resume command reads it).
    recipe_yaml = (run / "recipe.yaml").read_text()
    train_tokenizer(load(path, "train.max_steps=5"), run, resume=True)
    assert (run / "recipe.yaml").read_text() == recipe_yaml
    # Temp files of writes a kill interrupted are removed when the run goes on.
    stale = [
        run / ".metrics.jsonl.0123456789ab.tmp",
        run / "samples" / ".step_000000005.png.0123456789ab.tmp",
    ]
    for p in stale:
        p.write_text("half")
    longer = load(path, "train.max_steps=15")
    final = train_tokenizer(longer, run, resume=True)
    assert final == ckpt.checkpoint_dir(run, 15) and not any(p.exists() for p in stale)
    rows = metrics_by_step(run)
    assert sorted(s for s, r in rows.items() if "loss" in r) == list(range(1, 16))
    # Step s trains at lr_at(s - 1): steps 13.. on the schedule of 15 steps (step 13 trained at the
    # 12-step schedule's final rate).
    for step in (1, 2, 12):
        assert rows[step]["lr"] == pytest.approx(lr_at(step - 1, load(path).train), rel=1e-6)
    for step in (13, 14, 15):
        assert rows[step]["lr"] == pytest.approx(lr_at(step - 1, longer.train), rel=1e-6)


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt", "meta.json"])
def test_a_damaged_newest_checkpoint_names_the_one_to_resume_from(tmp_path, damaged, capsys):
    """A file of the newest checkpoint truncated after it was written (a disk error, a copy cut short)
    stopped every --resume with "unreadable", saying nothing of the complete checkpoint before it."""
    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    train_tokenizer(load(path, "train.max_steps=6"), run)
    newest, before = ckpt.checkpoint_dir(run, 6), ckpt.checkpoint_dir(run, 3)
    file = newest / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(UserError) as e:
        train_tokenizer(load(path, "train.max_steps=9"), run, resume=True)
    assert str(e.value).startswith(f"{file}: unreadable") or str(e.value).startswith(f"--resume: {file}")
    assert str(e.value).endswith(
        f"; move {newest.name} out of {newest.parent} to resume from {before.name}, the newest before it"
    )
    if damaged == "meta.json":  # the one file a dry run of the resume reads
        args = ("train-tokenizer", path, "--out", run, "--resume", "--dry-run")
        code, _, err = run_cli(capsys, *args)
        assert code == 1 and " ".join(err.split()).endswith(
            f"; move {newest.name} out of {newest.parent} to resume from {before.name}, the newest before it"
        ), err
    newest.rename(tmp_path / newest.name)  # as it says
    assert train_tokenizer(load(path, "train.max_steps=9"), run, resume=True) == ckpt.checkpoint_dir(run, 9)
    # A run's only checkpoint damaged: nothing to resume from.
    only = tmp_path / "only"
    train_tokenizer(load(path, "train.max_steps=3"), only)
    file = ckpt.checkpoint_dir(only, 3) / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(UserError, match=f"; it is the run's only checkpoint: remove {only} to start the run"):
        train_tokenizer(load(path), only, resume=True)


def test_a_damaged_checkpoint_names_the_newest_of_several_before_it(tmp_path):
    """With more than one checkpoint before the damaged one (train.keep_checkpoints above 2), the advice
    names the newest of them, the one a resume then starts from. The run above keeps two, so naming the
    oldest passed."""
    run = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(run, step, kind="tokenizer", recipe={}, weights={"model": torch.nn.Linear(1, 1)})
    newest = ckpt.checkpoint_dir(run, 3)
    with pytest.raises(ckpt.DamagedCheckpoint) as e, past_a_damaged(newest):
        raise ckpt.DamagedCheckpoint(f"{newest / ckpt.STATE}: unreadable")
    assert str(e.value).endswith(
        f"; move {newest.name} out of {newest.parent} to resume from step_000000002, the newest before it"
    )


def test_an_unreadable_metrics_line_left_out_on_resume_is_said(tmp_path, caplog):
    """A damaged or hand-edited line in the middle of metrics.jsonl went silently as the run went on
    (its row lost); the torn last line of a killed writer is expected, and says nothing."""
    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    train_tokenizer(load(path, "train.max_steps=6"), run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1], lines[2] = "garbage", "5"  # (a number parses, and stopped the resume with a traceback)
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "loss": 0.')
    with caplog.at_level("WARNING", logger="smapctl.train"):
        train_tokenizer(load(path, "train.max_steps=9"), run, resume=True)
    said = [r.getMessage() for r in caplog.records if "unreadable line" in r.getMessage()]
    assert said == [
        f"{run / 'metrics.jsonl'}: 2 unreadable line(s) left out as the run goes on (line 2, 3; edited or"
        " damaged?)"
    ]


def test_a_resume_names_the_training_settings_it_changes(tmp_path, caplog):
    """A run started with --set values and resumed from the recipe file it started from went on with
    the file's values (another warm-up, another EMA decay) without a word: a warning names each one,
    and the run's own recipe.yaml, the resume command it prints, changes nothing."""
    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    train_tokenizer(load(path, "train.max_steps=2", "train.warmup_steps=1", "train.ema_decay=0.5"), run)
    ours = load(path, "train.max_steps=3")
    caplog.clear()
    train_tokenizer(ours, run, resume=True)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume: ")]
    changed = (
        f"train.warmup_steps 1 -> {ours.train.warmup_steps}, train.ema_decay 0.5 -> {ours.train.ema_decay}"
    )
    command = f"smapctl train-tokenizer {run / 'recipe.yaml'} --out {run} --resume"
    assert said == [
        f"--resume: {changed} differ from the run's own recipe; the run goes on with the recipe's values "
        f"(to keep the run's: {command})"
    ]
    caplog.clear()
    train_tokenizer(load(run / "recipe.yaml", "train.max_steps=4"), run, resume=True)
    assert not [r for r in caplog.records if r.getMessage().startswith("--resume: ")]


def test_a_resume_names_the_augmentation_and_sampling_settings_it_changes(tmp_path, caplog):
    """A tokenizer's data.* (its augmentation) and a generator's sample.* (its previews, and the
    sampling settings its checkpoints keep for `sample`) changed on resume without a word, as train.*
    did: a run started with --set data.hflip=true and resumed from the recipe file stopped flipping.
    The data loader's workers change no image, and go unsaid."""
    from smapctl.config import to_dict
    from smapctl.recipe import load_generator_recipe
    from smapctl.train.resume import warn_of_changed_settings

    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    train_tokenizer(load(path, "train.max_steps=2", "data.hflip=true", "data.crop_scale=[0.5, 1.0]"), run)
    ours = load(path, "train.max_steps=3", "data.num_workers=1")
    caplog.clear()
    train_tokenizer(ours, run, resume=True)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume: ")]
    assert len(said) == 1 and said[0].startswith(
        "--resume: data.crop_scale [0.5, 1.0] -> [0.85, 1.0], data.hflip True -> False"
        " differ from the run's own recipe"
    )
    demo = ROOT / "recipes/demo/generator.yaml"
    then = {"recipe": to_dict(load_generator_recipe(demo, ["sample.cfg_scale=1.5"]))}
    caplog.clear()
    warn_of_changed_settings(load_generator_recipe(demo), then, "the command")
    assert [r.getMessage() for r in caplog.records] == [
        "--resume: sample.cfg_scale 1.5 -> 3.0 differ from the run's own recipe; the run goes on with the"
        " recipe's values (to keep the run's: the command)"
    ]


def test_resume_refuses_optimizer_settings_its_state_would_override(tmp_path):
    """The optimizer's and scheduler's saved states carry lr, weight decay and betas: a resume with new
    values trained on with the old ones without a word."""
    path = write_recipe(tmp_path)
    train_tokenizer(load(path, "train.max_steps=3"), tmp_path / "run")
    for change in ("train.lr=0.05", "train.weight_decay=0.3", "train.betas=[0.8, 0.9]"):
        key = change.split("=")[0]
        with pytest.raises(UserError, match=rf"--resume: {key} was .* start a new run with --out"):
            train_tokenizer(load(path, "train.max_steps=6", change), tmp_path / "run", resume=True)
    train_tokenizer(load(path, "train.max_steps=6"), tmp_path / "run", resume=True)  # the same: resumes
    # A state.pt without an entry (edited by hand) was a KeyError traceback.
    state_file = ckpt.latest_checkpoint(tmp_path / "run") / ckpt.STATE
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("optimizer", "rng")}, state_file)
    with pytest.raises(UserError, match=r"--resume: .*state\.pt lacks optimizer, rng \(a broken or hand-edi"):
        train_tokenizer(load(path, "train.max_steps=7"), tmp_path / "run", resume=True)
    torch.save(state, state_file)
    # Weights edited by hand (a tensor missing): one line, as the recipe checks above cover no such thing.
    from safetensors.torch import load_file, save_file

    weights = state_file.parent / "model.safetensors"
    tensors = load_file(weights)
    save_file(dict(list(tensors.items())[1:]), weights)
    with pytest.raises(
        UserError, match=r"^--resume: .*model\.safetensors: does not fit this run \(Missing key"
    ):
        train_tokenizer(load(path, "train.max_steps=7"), tmp_path / "run", resume=True)
    # The discriminator's optimizer likewise keeps loss.disc_lr (a new one was ignored, and recipe.yaml lied).
    gan = ["loss.gan_weight=0.1", "loss.disc_width=8", "loss.disc_layers=2"]
    train_tokenizer(load(path, "train.max_steps=2", *gan), tmp_path / "gan")
    with pytest.raises(UserError, match=r"--resume: loss.disc_lr was 0.0001 .* start a new run with --out"):
        train_tokenizer(
            load(path, "train.max_steps=3", *gan, "loss.disc_lr=5e-4"), tmp_path / "gan", resume=True
        )
    # Its saved weights have a shape (a traceback from load_state_dict), the data order follows the
    # seed, and a resumed run goes on over its images.
    for change, message in [
        ("loss.disc_width=16", "loss.disc_width was 8 .* the saved discriminator has the old shape"),
        ("loss.disc_layers=1", "loss.disc_layers was 2 .* the saved discriminator has the old shape"),
        ("train.seed=1", "train.seed was 0 .* the data order"),
        (
            "data.dataset=photos",
            "data.dataset was 'digits' .* the recipe says 'photos'; a resumed run goes on",
        ),
    ]:
        with pytest.raises(UserError, match=rf"^--resume: {message}"):
            train_tokenizer(load(path, "train.max_steps=3", *gan, change), tmp_path / "gan", resume=True)


def _loader_starts(monkeypatch) -> list[int]:
    """Record where each training run starts its sample stream (`make_loader(start=...)`)."""
    from smapctl.data import datasets

    starts, real = [], datasets.make_loader

    def make_loader(*args, start=0, **kwargs):
        starts.append(start)
        return real(*args, start=start, **kwargs)

    monkeypatch.setattr(datasets, "make_loader", make_loader)
    return starts


def test_resume_with_another_batch_size_continues_the_sample_stream(tmp_path, monkeypatch):
    """4 steps of 8 samples, then steps of 4: the resumed run starts at sample 32 (not 4 x 4 = 16, which
    would repeat 16 samples; a larger batch would skip some), and its checkpoints count on from there."""
    path = write_recipe(tmp_path)
    starts = _loader_starts(monkeypatch)
    first = ["train.max_steps=4", "train.ckpt_every=2", "train.sample_every=100"]
    train_tokenizer(load(path, *first), tmp_path / "run")
    assert ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "run"))["samples"] == 32
    later = ["train.max_steps=6", "train.batch_size=4", "train.ckpt_every=2", "train.sample_every=100"]
    final = train_tokenizer(load(path, *later), tmp_path / "run", resume=True)
    assert starts == [0, 32]
    assert ckpt.load_state(final)["samples"] == 32 + 2 * 4


def test_resume_from_a_checkpoint_without_a_sample_count(tmp_path, monkeypatch):
    """Checkpoints written before the sample count was saved resume at step x batch size."""
    path = write_recipe(tmp_path)
    sets = ["train.max_steps=2", "train.ckpt_every=2", "train.sample_every=100"]
    last = train_tokenizer(load(path, *sets), tmp_path / "run")
    state = ckpt.load_state(last)
    del state["samples"]
    torch.save(state, last / ckpt.STATE)
    starts = _loader_starts(monkeypatch)
    train_tokenizer(load(path, "train.max_steps=3", "train.sample_every=100"), tmp_path / "run", resume=True)
    assert starts == [2 * 8]


# ------------------------------------------------------------------------------------------ real processes

# Long enough that a signal lands mid-run; checkpoints at every other step so a kill often hits a write.
PROCESS_SETS = [
    "train.max_steps=40",
    "train.ckpt_every=2",
    "train.keep_checkpoints=3",
    "train.sample_every=7",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(recipe file, uninterrupted in-process run folder) shared by the process tests."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_recipe(folder)
    train_tokenizer(load(path, *PROCESS_SETS), folder / "run")
    return path, folder / "run"


def _start(reference, run_dir, *sets, **popen):
    path, _ = reference
    return start_cli("train-tokenizer", path, "--out", run_dir, *cli_args(*PROCESS_SETS, *sets), **popen)


def _wait_for_checkpoint(proc, run_dir, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ckpt.is_complete(ckpt.checkpoint_dir(run_dir, step)):
        assert proc.poll() is None, f"the run ended before checkpoint {step}: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def _assert_matches_reference(reference, run_dir) -> None:
    _, ref = reference
    assert_same_checkpoint(ckpt.latest_checkpoint(ref), ckpt.latest_checkpoint(run_dir))
    assert metrics_by_step(run_dir) == metrics_by_step(ref)


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(reference, run)
    _wait_for_checkpoint(proc, run, 4)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # What a kill during a checkpoint write leaves behind, whether or not this one hit a write: a temp
    # folder, and a step folder whose meta.json (written last) is missing. Neither may be picked up.
    newest = ckpt.latest_checkpoint(run)
    (run / "checkpoints" / ".tmp-step_000000098-0123abcd").mkdir()
    (run / "checkpoints" / ".tmp-step_000000098-0123abcd" / "model.safetensors").write_bytes(b"\0" * 10)
    (run / "checkpoints" / "step_000000099").mkdir()
    shutil.copy(newest / "model.safetensors", run / "checkpoints" / "step_000000099")
    assert ckpt.latest_checkpoint(run) == newest
    path, _ = reference
    train_tokenizer(load(path, *PROCESS_SETS), run, resume=True)
    _assert_matches_reference(reference, run)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # cleared by the next write


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python lost
def test_a_sigterm_python_lost_before_training_stops_it_at_its_first_step(tmp_path, capsys, monkeypatch):
    """The SIGTERM was lost and the training ran to its end, to be killed by the scheduler's SIGKILL that
    follows without a checkpoint; now it stops after its first step with one, exit 143."""
    sigterm_lost_as_the_command_starts(monkeypatch)
    sets = ["train.max_steps=6", "train.ckpt_every=6", "train.sample_every=100"]
    code, _, err = run_cli(
        capsys, "train-tokenizer", write_recipe(tmp_path), "--out", tmp_path / "run", *cli_args(*sets)
    )
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing this step and saving a checkpoint" in err
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000000001"


@pytest.mark.parametrize(
    ("signum", "to_group", "workers"),
    [(signal.SIGTERM, True, 2), (signal.SIGINT, False, 0)],
    ids=["sigterm-to-group-with-workers", "sigint"],
)
def test_signal_stops_with_a_checkpoint_and_resume_continues(tmp_path, reference, signum, to_group, workers):
    run = tmp_path / "run"
    proc = _start(reference, run, f"data.num_workers={workers}", start_new_session=True)
    _wait_for_checkpoint(proc, run, 2)
    if to_group:  # as Ctrl-C in a terminal or a cluster scheduler does: the data workers get it too
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err  # as an interrupted program: `a && b` stops here
    assert "Traceback" not in err
    stopped = ckpt.latest_checkpoint(run)
    step = int(stopped.name.removeprefix("step_"))
    assert 2 <= step < 40
    name = signal.Signals(signum).name
    assert f"{name}: finishing this step and saving a checkpoint" in err
    # One line in a log file (rich wrapped it at 80 columns there): the command to continue pastes whole.
    said = f"WARNING stopped by {name} after step {step}; checkpoint {stopped}"
    go_on = f"(continue: smapctl train-tokenizer {run / 'recipe.yaml'} --out {run} --resume)"
    assert f"{said} {go_on}" in err.splitlines(), err
    assert f"checkpoint: {stopped}" in "".join(out.split("\n"))
    path, _ = reference
    train_tokenizer(load(path, *PROCESS_SETS, f"data.num_workers={workers}"), run, resume=True)
    _assert_matches_reference(reference, run)


def _ignoring_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts a command


@pytest.mark.parametrize("where", ["log file", "terminal gone", "nohup"])
def test_a_hangup_stops_a_training_with_a_checkpoint_as_sigterm_does(tmp_path, reference, where):
    """The terminal or ssh session a training was started in closed (SIGHUP to its process group, data
    workers included; sent twice here, as it may come): it ended at once, the steps since its newest
    checkpoint lost. It is taken as SIGTERM, once: the step finishes, a checkpoint is written (on a
    terminal gone, whose writes fail, too), exit 143, and --resume goes on as after SIGTERM. A training
    started under `nohup` (SIGHUP ignored) trains on to its end."""
    run = tmp_path / "run"
    popen: dict = {"start_new_session": True}
    if where == "terminal gone":
        master, slave = os.openpty()
        popen |= {"stdin": slave, "stdout": slave, "stderr": slave}
    elif where == "nohup":
        popen["preexec_fn"] = _ignoring_sighup
    proc = _start(reference, run, "data.num_workers=2", **popen)
    if where == "terminal gone":
        os.close(slave)
        while not ckpt.is_complete(ckpt.checkpoint_dir(run, 2)):  # what it writes read, as a terminal does
            assert proc.poll() is None, "the run ended before checkpoint 2"
            if select.select([master], [], [], 0.01)[0]:
                os.read(master, 1 << 16)
        os.close(master)  # the terminal goes away: its writes fail (EIO) from here
    else:
        _wait_for_checkpoint(proc, run, 2)
    os.killpg(proc.pid, signal.SIGHUP)
    time.sleep(0.05)  # (two signals sent at once are one)
    os.killpg(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    stopped = ckpt.latest_checkpoint(run)
    step = int(stopped.name.removeprefix("step_"))
    if where == "nohup":
        assert proc.returncode == 0 and step == 40, err
        return
    assert proc.returncode == 128 + signal.SIGTERM and 2 <= step < 40, (proc.returncode, step, err)
    if where == "log file":
        assert "Traceback" not in err and "SIGTERM again" not in err, err
        assert err.count("SIGHUP (the terminal went away): stopping as for SIGTERM") == 1, err
        assert "SIGTERM: finishing this step and saving a checkpoint" in err
        assert f"WARNING stopped by SIGTERM after step {step}; checkpoint {stopped}" in err, err
    path, _ = reference
    train_tokenizer(load(path, *PROCESS_SETS, "data.num_workers=2"), run, resume=True)
    _assert_matches_reference(reference, run)


def test_a_signal_during_the_last_step_says_the_run_is_complete(tmp_path, monkeypatch, caplog):
    """Ctrl-C during the last step: the step finishes and writes the final checkpoint, so nothing is left
    to continue. The warning says the run is complete (it said "stopped by SIGINT" with a --resume hint
    for a finished run); the command still exits as interrupted, so `a && b` stops."""
    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    record = TrainingRun.record

    def record_then_signal(self, step, *args, **kwargs):
        record(self, step, *args, **kwargs)
        if step == 2:  # the last of 3
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainingRun, "record", record_then_signal)
    monkeypatch.setattr(GracefulStop, "last_signal", None)
    final = train_tokenizer(load(path, "train.max_steps=3"), run)
    assert final == ckpt.checkpoint_dir(run, 3) and ckpt.is_complete(final)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"SIGINT during the last step: the run is complete; checkpoint {final}" in said, said
    assert not any("--resume" in line or "stopped by" in line for line in said), said
    assert GracefulStop.last_signal == signal.SIGINT  # the command exits with 130


@pytest.mark.parametrize(("signal_at", "hint"), [(0, NO_CHECKPOINT_YET), (1, RESUME_FROM_NEWEST)])
def test_a_second_signal_says_whether_resume_can_go_on(tmp_path, monkeypatch, capsys, signal_at, hint):
    """A second Ctrl-C stops at once. Before the run's first checkpoint it advised --resume, which then
    failed for want of a checkpoint: it says to start again. (The re-delivered signal is held back here,
    so the run goes on to its first signal's checkpoint.)"""
    path = write_recipe(tmp_path)
    record, send = TrainingRun.record, signal.raise_signal

    def record_then_signal_twice(self, step, *args, **kwargs):
        record(self, step, *args, **kwargs)
        if step == signal_at:
            send(signal.SIGINT)
            send(signal.SIGINT)

    monkeypatch.setattr(TrainingRun, "record", record_then_signal_twice)
    monkeypatch.setattr(signal, "raise_signal", lambda signum: None)  # the handler's re-delivery
    monkeypatch.setattr(GracefulStop, "last_signal", None)
    train_tokenizer(load(path, "train.ckpt_every=1"), tmp_path / "run")
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith("SIGINT again")]
    assert again == [f"SIGINT again: stopping at once, without this step's checkpoint; {hint}"]


def test_a_fresh_start_in_a_folder_without_checkpoints_says_it_replaces_the_metrics(tmp_path, caplog):
    """A run stopped before its first checkpoint (here: its checkpoints removed) is started again without
    --resume: its metrics.jsonl starts afresh, which it did without a word."""
    path = write_recipe(tmp_path)
    run = tmp_path / "run"
    train_tokenizer(load(path, "train.max_steps=2"), run)
    shutil.rmtree(run / "checkpoints")
    caplog.clear()
    train_tokenizer(load(path, "train.max_steps=1"), run)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{run}: a fresh start (no checkpoint to resume): its metrics.jsonl of 2 steps is replaced" in said
    assert sorted(metrics_by_step(run)) == [1]


def test_a_run_folder_in_use_is_refused_until_its_training_ends(tmp_path, reference, capsys):
    """A second training started by hand in a running one's folder (a fresh start before the first
    checkpoint, or a --resume) would interleave checkpoints and metrics with it: refused in one line
    naming the process, which trains on undisturbed; once it has stopped, --resume continues it."""
    path, _ = reference
    run = tmp_path / "run"
    proc = _start(reference, run, "train.max_steps=100000")
    try:
        _wait_for_checkpoint(proc, run, 2)
        for extra in ([], ["--resume"]):
            code, _, err = run_cli(
                capsys, "train-tokenizer", path, "--out", run, *cli_args(*PROCESS_SETS), *extra
            )
            assert code == 1 and "Traceback" not in err
            [line] = error_lines(err)
            holder = f"process {proc.pid} on {socket.gethostname()} since "
            assert line.startswith(f"error: {run} is in use by another training ({holder}"), line
            assert line.endswith("or train in another folder (--out; for `reproduce`, --work)")
        assert proc.poll() is None  # still training
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    stopped = int(ckpt.latest_checkpoint(run).name.removeprefix("step_"))
    train_tokenizer(load(path, *PROCESS_SETS, f"train.max_steps={stopped + 2}"), run, resume=True)
    assert sorted(metrics_by_step(run)) == list(range(1, stopped + 3))  # each step logged once


def test_a_failed_start_lets_go_of_the_run_folder(tmp_path, reference):
    """An error after the run folder was taken (here: the data has other classes than the model) leaves
    it free for the next training in the same process (`reproduce`, a notebook)."""
    path, _ = reference
    run = tmp_path / "run"
    run.mkdir()  # the user's: kept (a folder the run made would be removed, holding nothing)
    with pytest.raises(UserError, match="model.num_classes") as failed:
        train_tokenizer(load(path, "model.num_classes=3"), run)
    handle, holder = lock_folder(run)
    assert holder is None, f"still held after: {failed.value}"
    handle.close()
    train_tokenizer(load(path, "train.max_steps=2"), run)
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 2)


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(
    tmp_path, reference, monkeypatch, caplog, capsys
):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="smapctl.train"):
        assert lock_folder(tmp_path) == (None, None)
    assert "could not lock the run folder (" in caplog.text
    assert "nothing keeps a second training out" in caplog.text
    # A failed start still removes the run folder it made.
    path, _ = reference
    code, _, err = run_cli(
        capsys, "train-tokenizer", path, "--out", tmp_path / "new", "--set", "data.dataset=nothere"
    )
    assert code == 1 and "nothere" in err and not (tmp_path / "new").exists()


def test_a_training_refused_for_the_lock_leaves_the_folder_alone(tmp_path, reference, capsys, monkeypatch):
    """Two trainings started together into one new folder: the one refused must not remove what the
    other has made so far, its lock and recipe (it did, as a run folder it had seen missing at its start:
    the other trained on in a deleted folder, and a third training got in beside it)."""
    path, _ = reference
    run = tmp_path / "run"
    holding, holders = contextlib.ExitStack(), []
    start = TrainingRun.__init__

    def another_takes_the_folder_meanwhile(self, *args, **kwargs):
        start(self, *args, **kwargs)
        holders.append(holding.enter_context(lock_held_elsewhere(run, starting=True)))

    monkeypatch.setattr(TrainingRun, "__init__", another_takes_the_folder_meanwhile)
    with holding:
        code, _, err = run_cli(capsys, "train-tokenizer", path, "--out", run)
        assert code == 1 and f"{run} is in use by another training (process {holders[0].pid} " in err
        assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl", "recipe.yaml"]
        assert lock_folder(run)[1] is not None  # still held


def test_a_command_looking_for_a_training_does_not_keep_one_from_starting(tmp_path, monkeypatch):
    """`training_holder` (`sample --checkpoint RUN` asking whether RUN still trains) holds the lock shared
    for a moment: a training starting then was refused, naming the training before it as the holder."""
    import fcntl

    from smapctl.train.run_folder import LOCK_FILE, training_holder

    handle, _ = lock_folder(tmp_path)  # an earlier training, ended
    handle.close()
    assert training_holder(tmp_path) is None
    reader = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)  # the command, inside its check
    fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
    monkeypatch.setattr(time, "sleep", lambda _: os.close(reader))  # its check ends as the training waits
    handle, holder = lock_folder(tmp_path)
    assert holder is None and handle is not None
    assert training_holder(tmp_path).startswith(f"process {os.getpid()} on ")  # (another open file)
    monkeypatch.setattr(time, "sleep", lambda _: None)
    assert lock_folder(tmp_path)[1] is not None  # a training holds it: still refused
    handle.close()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked: the lock goes with the training's own process (after its kill -9,
    its workers held it for seconds more)."""
    handle, _ = lock_folder(tmp_path)
    read, write = os.pipe()
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # the child says it runs, then waits until the parent has let go of its own copy
        os.write(ready, b"x")
        os.read(read, 1)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"x"  # the child runs (its fork handlers have run)
        handle.close()
        again, holder = lock_folder(tmp_path)
        assert holder is None, "the forked child still holds the lock"
        again.close()
    finally:
        os.write(write, b"x")
        os.waitpid(child, 0)
        for fd in (read, write, started, ready):
            os.close(fd)


def test_a_lock_file_removed_as_it_was_taken_is_not_taken(tmp_path, monkeypatch):
    """A training that fails as it starts removes the folder it made, lock file and all, then lets go:
    one that opened the lock file just before took a lock on a file no longer the folder's (a fourth
    training could then lock a new one beside it)."""
    import fcntl

    from smapctl.train.run_folder import LOCK_FILE

    first, _ = lock_folder(tmp_path)
    real = fcntl.flock

    def the_first_ends_meanwhile(fd, operation):
        monkeypatch.setattr(fcntl, "flock", real)
        (tmp_path / LOCK_FILE).unlink()
        first.close()
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", the_first_ends_meanwhile)
    handle, holder = lock_folder(tmp_path)
    assert handle is None and holder == "a training that was ending as this one started; try again"


def test_a_full_disk_for_the_lock_file_is_one_line_and_leaves_nothing(
    tmp_path, reference, capsys, monkeypatch
):
    from faults import fill_disk

    path, _ = reference
    fill_disk(monkeypatch, only=".lock")
    code, _, err = run_cli(capsys, "train-tokenizer", path, "--out", tmp_path / "run")
    assert code == 1 and "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith(f"error: {tmp_path / 'run' / '.lock'}: could not write the run folder's lock file")
    assert "the disk is full" in line
    assert not (tmp_path / "run").exists()


def test_a_resume_in_another_precision_than_the_checkpoint_says_so(tmp_path, monkeypatch, caplog):
    """`train.precision: auto` is resolved at each start: a run resumed on a machine whose bf16 support
    differs goes on in the other precision, which must be said (it no longer repeats the run bit for
    bit). The checkpoint records the precision it trained in."""
    import smapctl.precision

    path = write_recipe(tmp_path)
    sets = ["train.max_steps=2", "train.ckpt_every=2", "train.sample_every=100"]
    last = train_tokenizer(load(path, *sets), tmp_path / "run")
    assert ckpt.load_meta(last)["trained_precision"] == "no"
    later = ["train.max_steps=3", "train.sample_every=100", "train.precision=auto"]
    monkeypatch.setattr(smapctl.precision, "cpu_bf16_speedup", lambda: 0.02)  # auto: fp32 here
    train_tokenizer(load(path, *later), tmp_path / "run", resume=True)
    assert "trained in" not in caplog.text  # fp32 then, fp32 now

    # As if its first steps had run on a machine with bf16 units.
    meta = ckpt.load_meta(last) | {"trained_precision": "bf16"}
    (last / ckpt.META).write_text(json.dumps(meta))
    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "run", 3))
    train_tokenizer(load(path, *later), tmp_path / "run", resume=True)
    warning = [r.getMessage() for r in caplog.records if "trained in" in r.getMessage()]
    assert len(warning) == 1
    assert "trained in bf16, this run goes on in fp32 (auto on this machine)" in warning[0]
    assert "--set train.precision=bf16 keeps bf16" in warning[0]


def test_a_resume_cannot_add_a_discriminator_and_says_so_when_it_drops_one(tmp_path, caplog):
    """Turning the GAN on at a resume stopped with "discriminator.safetensors: not found", read as a damaged
    checkpoint; turning it off dropped the discriminator from every later checkpoint without a word."""
    path = write_recipe(tmp_path)
    train_tokenizer(load(path, "train.max_steps=2"), tmp_path / "plain")
    gan = ["loss.gan_weight=0.1", "loss.gan_start_step=0", "loss.disc_width=8", "loss.disc_layers=2"]
    with pytest.raises(
        UserError, match=r"^--resume: .* was trained without a discriminator \(loss.gan_weight 0"
    ):
        train_tokenizer(load(path, "train.max_steps=4", *gan), tmp_path / "plain", resume=True)
    train_tokenizer(load(path, "train.max_steps=2", *gan), tmp_path / "gan")
    with caplog.at_level("WARNING"):
        train_tokenizer(load(path, "train.max_steps=3", "loss.gan_weight=0"), tmp_path / "gan", resume=True)
    assert "the run's discriminator is left out from now on" in caplog.text
    assert "discriminator" not in ckpt.weight_names(ckpt.latest_checkpoint(tmp_path / "gan"))


def test_a_dry_run_says_what_training_would_refuse_of_its_run_folder(tiny_kl_tokenizer, tmp_path, capsys):
    """`--dry-run --out README.md` (or a folder of checkpoints, without --resume) passed, and the
    training then refused it: the dry run warns as of its data, and makes nothing."""
    a_file = tmp_path / "notes.md"
    a_file.write_text("mine\n")
    recipe = tiny_kl_tokenizer / "recipe.yaml"
    for command, path in (
        ("train-tokenizer", recipe),
        ("train-generator", ROOT / "recipes/demo/generator.yaml"),
    ):
        code, _, err = run_cli(capsys, command, path, "--out", a_file, "--dry-run")
        said = f"WARNING {a_file} is a file, not a folder: the run folder cannot be made there (--out)"
        assert code == 0 and said in err.splitlines(), err
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--out", tiny_kl_tokenizer, "--dry-run")
    assert code == 0 and f"WARNING {holds_checkpoints(tiny_kl_tokenizer)}" in err.splitlines(), err
    code, _, err = run_cli(
        capsys, "train-tokenizer", recipe, "--out", tiny_kl_tokenizer / "checkpoints" / "x", "--dry-run"
    )
    assert "a training run's checkpoints" in err and not (tiny_kl_tokenizer / "checkpoints" / "x").exists()
    assert a_file.read_text() == "mine\n"


@pytest.mark.parametrize(
    ("out", "said"),
    [
        ("notes.md/run", "{out}: {tmp}/notes.md is a file, not a folder"),
        ("loop", "{out} is a broken symbolic link"),
        ("loop/run", "{out}: {tmp}/loop is a broken symbolic link"),
    ],
)
def test_a_dry_run_warns_of_a_run_folder_that_cannot_be_made(tiny_kl_tokenizer, tmp_path, capsys, out, said):
    """`--dry-run --out FILE/run` (or a symbolic link in a loop) passed without a word, and the training
    then refused the folder ("could not write the run folder")."""
    (tmp_path / "notes.md").write_text("mine\n")
    (tmp_path / "loop").symlink_to("loop")
    out, recipe = tmp_path / out, tiny_kl_tokenizer / "recipe.yaml"
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--out", out, "--dry-run")
    warning = f"WARNING {said.format(out=out, tmp=tmp_path)}: the run folder cannot be made there (--out)"
    assert code == 0 and warning in err.splitlines(), err
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--out", out)
    assert code == 1 and f"error: {out}: could not write the run folder" in err, err
    assert (tmp_path / "notes.md").read_text() == "mine\n"


def test_a_dry_run_of_a_resume_makes_the_resumes_checks(tiny_kl_tokenizer, tmp_path, capsys):
    """`--resume --dry-run` with another model or learning rate printed a summary and passed; the resume
    itself refused both."""
    run = tmp_path / "run"
    shutil.copytree(tiny_kl_tokenizer, run)
    args = ["train-tokenizer", run / "recipe.yaml", "--out", run, "--resume", "--dry-run"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert f"resumes from {ckpt.latest_checkpoint(run)}" in " ".join(out.split())
    for change, said in (
        ("model.enc_depth=3", "was trained with another model"),
        ("train.lr=5", "train.lr was"),
        ("data.dataset=photos", "data.dataset was 'digits'"),  # its data: the dry run passed other data
    ):
        code, _, err = run_cli(capsys, *args, "--set", change)
        assert code == 1, change
        [line] = error_lines(err)
        assert line.startswith("error: --resume: ") and said in line, line
    code, _, err = run_cli(capsys, *args[:3], tmp_path / "none", "--resume", "--dry-run")
    assert code == 1 and error_lines(err) == [
        f"error: --resume: no complete checkpoint in {tmp_path / 'none' / 'checkpoints'}"
    ]
    assert not (tmp_path / "none").exists()


def test_a_dry_run_of_a_resume_does_not_warn_that_its_folder_holds_checkpoints(
    tiny_kl_tokenizer, tmp_path, capsys
):
    """The checkpoints are what a resume continues: only a new run is refused a folder holding them."""
    run = tmp_path / "run"
    shutil.copytree(tiny_kl_tokenizer, run)
    code, _, err = run_cli(
        capsys, "train-tokenizer", run / "recipe.yaml", "--out", run, "--resume", "--dry-run"
    )
    assert code == 0 and "already holds checkpoints" not in err, err


def test_a_resume_refused_for_an_edited_own_recipe_does_not_advise_it_again(
    tiny_kl_tokenizer, tmp_path, capsys
):
    """The refusal of another model advises the run's own recipe.yaml; when that file itself was edited
    (or removed), the advice repeated the very command that failed: it names the checkpoint's meta.json,
    which holds the recipe the run was trained with."""
    run = tmp_path / "run"
    shutil.copytree(tiny_kl_tokenizer, run)
    own, latest = run / "recipe.yaml", ckpt.latest_checkpoint(run)
    args = ["train-tokenizer", own, "--out", run, "--resume", "--dry-run"]
    code, _, err = run_cli(capsys, *args, "--set", "model.enc_depth=3")  # the run's own recipe is right
    assert code == 1 and error_lines(err)[0].endswith(
        f"go on with the run's own recipe: {resume_command('tokenizer', run)}"
    )
    text = own.read_text()
    assert "enc_depth: 1\n" in text
    own.write_text(text.replace("enc_depth: 1\n", "enc_depth: 3\n"))
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and error_lines(err) == [
        f"error: --resume: {latest} was trained with another model (model.enc_depth was 1, the recipe says"
        f" 3), and the run's own {own} no longer says which (edited or removed since): the recipe it was"
        f' trained with is under "recipe" in {latest / "meta.json"}; put that model back, or use another'
        " --out"
    ]
    own.unlink()  # the printed resume command then
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and error_lines(err) == [
        f"error: {own}: recipe file not found; the run's checkpoints hold the recipe they were trained with,"
        ' under "recipe" in their meta.json'
    ]


def test_a_checkpoint_listing_more_classes_than_its_model_is_refused_on_resume(
    tiny_kl_tokenizer, tmp_path, capsys
):
    """A resume cannot change the number of classes (`model.num_classes` is the checkpoint's, and the data
    must have that many), so the count differs only when the checkpoint's meta.json lists more or fewer
    names than its model has classes (hand-edited, or from elsewhere): said by count, in one line, by the
    run and by its dry run, with nothing trained."""
    from smapctl.recipe import load_tokenizer_recipe

    run = tmp_path / "run"
    shutil.copytree(tiny_kl_tokenizer, run, ignore=shutil.ignore_patterns("*.lock", ".lock*"))
    latest = ckpt.latest_checkpoint(run)
    meta = json.loads((latest / ckpt.META).read_text())
    meta["class_names"] = [*meta["class_names"], "10"]
    (latest / ckpt.META).write_text(json.dumps(meta))
    said = f"--resume: {latest} was trained on other classes (11 classes, the data now gives 10)"
    said += "; use another --out"
    args = ("train-tokenizer", run / "recipe.yaml", "--out", run, "--resume")
    code, _, err = run_cli(capsys, *args, "--dry-run")
    assert code == 1 and error_lines(err) == [f"error: {said}"], err
    with pytest.raises(UserError) as e:
        train_tokenizer(load_tokenizer_recipe(run / "recipe.yaml", ["train.max_steps=4"]), run, resume=True)
    assert str(e.value) == said
    assert ckpt.latest_checkpoint(run) == latest
