"""Two processes on the CPU (gloo) under torchrun: one writer, processes in sync, the same training as
one process with the same global batch, and a bitwise resume with every process's RNG restored.

Each launch starts two Python processes that import torch (~5-10 s on 2 cores), hence `slow`.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import (
    ROOT,
    TINY_RECIPE,
    assert_same_checkpoint,
    before_torchrun,
    cli_args,
    image_folder,
    load,
    metrics_by_step,
    regularizer_sets,
    subprocess_env,
    two_nodes,
    write_recipe,
)

from smapctl.train import checkpoint as ckpt
from smapctl.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow

# Runs the CLI, and after every checkpoint each process saves its own weights (model, EMA,
# discriminator) as DUMP/rank{r}-step{s}.pt, so the test can see that the processes agree.
LAUNCHER = """\
import sys
from pathlib import Path

import torch

from smapctl.train import runner

dump = Path(sys.argv.pop(1))
original_save = runner.TrainingRun.save


def save(self, step):
    path = original_save(self, step)
    states = {}
    for name, obj in self.weights.items():
        if getattr(obj, "released", False):  # an EMA only the main process keeps
            states[name] = "released"
            continue
        obj = self.accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj
        states[name] = obj.state_dict()
    torch.save(states, dump / f"rank{self.accelerator.process_index}-step{step}.pt")
    return path


runner.TrainingRun.save = save
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""

SETS = ["train.max_steps=6", "train.ckpt_every=3", "train.sample_every=4"]


def _torchrun(tmp_path, recipe, run_dir, *sets, resume=False, options=()):
    """`torchrun --standalone --nproc_per_node 2 launcher.py train-tokenizer ...` (and `options`) -> the
    dump folder."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    dump = tmp_path / f"dump-{run_dir.name}{'-resumed' if resume else ''}"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), str(dump), "train-tokenizer", str(recipe), "--out", str(run_dir)]
    cmd += cli_args(*SETS, *sets) + (["--resume"] if resume else []) + list(options)
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return dump


def _assert_ranks_agree(dump, step: int, checkpoint) -> None:
    rank0 = torch.load(dump / f"rank0-step{step}.pt", weights_only=True)
    rank1 = torch.load(dump / f"rank1-step{step}.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and set(rank0) == set(ckpt.weight_names(checkpoint))
    # The average is kept by the main process alone (it evaluates and saves it): no copy elsewhere.
    assert rank1["ema"] == "released"
    for name in rank0:
        saved = ckpt.load_weights(checkpoint, name)
        for k in rank0[name]:
            if name != "ema":
                assert torch.equal(rank0[name][k], rank1[name][k]), f"{name}.{k} differs between processes"
            assert torch.equal(rank0[name][k], saved[k]), f"{name}.{k} differs from the checkpoint"


# VQ without tail dropping draws no random numbers in training: only the data decides.
VQ_SETS = [*regularizer_sets("vq"), "model.tail_drop=none"]


@pytest.fixture(scope="module")
def vq_launch(tmp_path_factory):
    """The VQ run launched on two processes, shared by the tests that only read it (a launch costs two
    processes' start-up) -> (its recipe, the launch's dump, its run folder). It also logs to TensorBoard
    where that is installed, for test_two_processes_log_to_tensorboard_once (trackers do not change the
    training)."""
    folder = tmp_path_factory.mktemp("vq-launch")
    tensorboard = ["train.log_with=[tensorboard]"] if importlib.util.find_spec("tensorboard") else []
    recipe = write_recipe(folder)
    dump = _torchrun(folder, recipe, folder / "two", *VQ_SETS, *tensorboard)
    return recipe, dump, folder / "two"


@pytest.fixture(scope="module")
def vq_single(vq_launch, tmp_path_factory):
    """vq_launch's run trained in this process -> its run folder."""
    recipe, _, _ = vq_launch
    run_dir = tmp_path_factory.mktemp("vq-single") / "one"
    train_tokenizer(load(recipe, *SETS, *VQ_SETS), run_dir)
    return run_dir


def test_two_processes_train_like_one_with_the_same_global_batch(vq_launch, vq_single):
    # VQ without tail dropping draws no random numbers in training: 2 x 4 images must give the
    # gradients of one batch of 8 (averaged by DDP), up to float summation order.
    (_, dump, two), single = vq_launch, vq_single
    final = ckpt.latest_checkpoint(two)
    assert final == ckpt.checkpoint_dir(two, 6)
    _assert_ranks_agree(dump, 6, final)
    table = metrics_by_step(two)  # one writer: each step once
    assert sorted(s for s, row in table.items() if "loss" in row) == list(range(1, 7))
    rng = ckpt.load_state(final)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    a, b = ckpt.load_weights(final), ckpt.load_weights(ckpt.latest_checkpoint(single))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    ddp_loss = [table[s]["loss"] for s in range(1, 7)]
    single_loss = [metrics_by_step(single)[s]["loss"] for s in range(1, 7)]
    torch.testing.assert_close(torch.tensor(ddp_loss), torch.tensor(single_loss), atol=1e-5, rtol=1e-4)


def _assert_close_runs(a: Path, b: Path) -> None:
    """Two runs' final weights and their losses at steps 1-6 agree up to float summation order."""
    wa, wb = ckpt.load_weights(ckpt.latest_checkpoint(a)), ckpt.load_weights(ckpt.latest_checkpoint(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=k)
    ta, tb = metrics_by_step(a), metrics_by_step(b)
    assert sorted(s for s, row in ta.items() if "loss" in row) == list(range(1, 7))
    loss_a = torch.tensor([ta[s]["loss"] for s in range(1, 7)])
    loss_b = torch.tensor([tb[s]["loss"] for s in range(1, 7)])
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-4)


def test_a_resume_with_another_number_of_processes_goes_on_where_the_data_stream_stopped(
    vq_launch, vq_single, tmp_path, caplog
):
    """A run checkpointed by two processes resumed by one, and one resumed by two (a job moved to another
    number of GPUs): the global batch stays the same, so the resumed run must read the same images in the
    same order as an uninterrupted run and reach its weights (VQ without tail dropping draws no random
    numbers, so only the data decides). The RNG states of the other process count are not restored: a
    warning says so."""
    (recipe, _, two), single = vq_launch, vq_single
    sets = VQ_SETS

    # two processes up to step 3, then one
    shutil.copytree(two, tmp_path / "two-then-one")
    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "two-then-one", 6))
    with caplog.at_level("WARNING"):
        train_tokenizer(load(recipe, *SETS, *sets), tmp_path / "two-then-one", resume=True)
    assert "the checkpoint holds the random states of 2 process(es) but this run has 1" in caplog.text
    _assert_close_runs(tmp_path / "two-then-one", single)

    # one process up to step 3, then two
    shutil.copytree(single, tmp_path / "one-then-two")
    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "one-then-two", 6))
    dump = _torchrun(tmp_path, recipe, tmp_path / "one-then-two", *sets, resume=True)
    final = ckpt.latest_checkpoint(tmp_path / "one-then-two")
    assert final == ckpt.checkpoint_dir(tmp_path / "one-then-two", 6)
    _assert_ranks_agree(dump, 6, final)
    _assert_close_runs(tmp_path / "one-then-two", single)


def test_two_processes_log_to_tensorboard_once(vq_launch):
    """train.log_with under a launcher: the main process alone writes the trackers' files, each step once."""
    pytest.importorskip("tensorboard")
    from test_trackers import scalars

    _, _, ddp = vq_launch  # launched with train.log_with=[tensorboard]
    logged = scalars(ddp)
    assert [s for s, _ in logged["loss"]] == list(range(1, 7))
    table = metrics_by_step(ddp)
    assert [v for _, v in logged["loss"]] == pytest.approx([table[s]["loss"] for s in range(1, 7)], rel=1e-6)
    assert len(list((ddp / "trackers").rglob("events.out.tfevents.*"))) == 2  # scalars, hparams


def test_two_processes_start_from_the_checkpoint_as_one_process_does(tmp_path):
    """--init-from under torchrun: every process loads the checkpoint (as --resume does), and the run
    trains as one process started from it does (VQ without tail dropping: only the data decides)."""
    recipe = write_recipe(tmp_path)
    sets = [*regularizer_sets("vq"), "model.tail_drop=none"]
    source = tmp_path / "source"
    train_tokenizer(load(recipe, *SETS, *sets, "train.max_steps=3"), source)
    dump = _torchrun(tmp_path, recipe, tmp_path / "two", *sets, options=["--init-from", str(source)])
    final = ckpt.latest_checkpoint(tmp_path / "two")
    _assert_ranks_agree(dump, 6, final)
    train_tokenizer(load(recipe, *SETS, *sets), tmp_path / "one", init_from=source)
    _assert_close_runs(tmp_path / "two", tmp_path / "one")
    assert ckpt.load_meta(final)["init_from"]["path"] == str(ckpt.latest_checkpoint(source).resolve())


# The --init-from source run saves a newer checkpoint right after the main process's look-up (a run still
# training), and the other process looks only once it is there; each process writes the checkpoint folder
# it loads weights from as DUMP/rank{r}-init (a line each load).
NEWER_LAUNCHER = """\
import json
import os
import shutil
import sys
import time
from pathlib import Path

from smapctl.train import checkpoint as ckpt

dump, source = Path(sys.argv.pop(1)), Path(sys.argv.pop(1)).resolve()
rank, saved = os.environ["RANK"], dump / "newer-saved"
latest_checkpoint, load_weights_into = ckpt.latest_checkpoint, ckpt.load_weights_into


def looked_up(run_dir):
    if Path(run_dir).resolve() != source:
        return latest_checkpoint(run_dir)
    deadline = time.monotonic() + 120  # (a guard against a hang, not a timing)
    while rank != "0" and not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    found = latest_checkpoint(run_dir)
    if rank == "0" and not saved.exists():
        newer = ckpt.checkpoint_dir(source, 4)
        shutil.copytree(found, newer)
        meta = json.loads((newer / ckpt.META).read_text()) | {"step": 4}
        (newer / ckpt.META).write_text(json.dumps(meta))
        saved.touch()
    return found


def loaded(module, path, *args, **kwargs):
    with open(dump / f"rank{rank}-init", "a") as f:
        f.write(f"{Path(path).resolve()}\\n")
    return load_weights_into(module, path, *args, **kwargs)


ckpt.latest_checkpoint, ckpt.load_weights_into = looked_up, loaded
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


def test_every_process_starts_from_the_checkpoint_the_main_process_found(tmp_path):
    """--init-from a run still training: it saves a newer checkpoint between the processes' look-ups, and
    each process started from the checkpoint it found itself (its EMA, the checks, the record of another
    file). The main process finds it once; every process loads that one."""
    recipe = write_recipe(tmp_path)
    source = tmp_path / "source"
    train_tokenizer(load(recipe, "train.max_steps=3"), source)
    launcher, dump, run_dir = tmp_path / "launcher.py", tmp_path / "dump", tmp_path / "two"
    launcher.write_text(NEWER_LAUNCHER)
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), str(dump), str(source), "train-tokenizer", str(recipe), "--out", str(run_dir)]
    cmd += cli_args("train.max_steps=1", "train.sample_every=5") + ["--init-from", str(source)]
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    first = ckpt.checkpoint_dir(source, 3).resolve()
    assert ckpt.latest_checkpoint(source) == ckpt.checkpoint_dir(source, 4)  # the newer one was saved
    assert (dump / "rank0-init").read_text() == f"{first}\n"
    assert (dump / "rank1-init").read_text() == f"{first}\n"
    record = ckpt.load_meta(ckpt.latest_checkpoint(run_dir))["init_from"]
    assert (record["path"], record["step"]) == (str(first), 3)


GAN_SETS = ["loss.gan_weight=0.1", "loss.gan_start_step=2", "loss.disc_width=8", "loss.disc_layers=2"]


def test_two_process_resume_is_bitwise_equal(tmp_path):
    # KL sampling and per-sample tail dropping draw from each process's own RNG: resuming needs both.
    # With the GAN: a DDP discriminator, and the adaptive weight's autograd.grad through DDP.
    recipe = write_recipe(tmp_path)
    _torchrun(tmp_path, recipe, tmp_path / "full", *GAN_SETS)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "resumed", 6))
    dump = _torchrun(tmp_path, recipe, tmp_path / "resumed", *GAN_SETS, resume=True)
    final = ckpt.latest_checkpoint(tmp_path / "resumed")
    _assert_ranks_agree(dump, 6, final)
    assert_same_checkpoint(ckpt.latest_checkpoint(tmp_path / "full"), final)
    table = metrics_by_step(tmp_path / "resumed")
    assert table == metrics_by_step(tmp_path / "full")
    assert {"g_loss", "d_loss", "gan_adaptive_weight"} <= table[6].keys()


PRECISION_LAUNCHER = """\
import os

from smapctl import precision
from smapctl.train.config import TrainConfig
from smapctl.train.runner import make_accelerator

# The bf16 probe landing on either side of 1.0 in the two processes, as timings on a shared host can.
precision.cpu_bf16_units = lambda: True
precision.cpu_bf16_speedup = lambda: 1.1 if os.environ["RANK"] == "0" else 0.9
accelerator = make_accelerator(TrainConfig(precision="auto"))
print(f"rank {accelerator.process_index}: {accelerator.mixed_precision}", flush=True)
"""


def test_auto_precision_is_the_main_processs_choice_in_every_process(tmp_path):
    """`train.precision: auto` times a matmul per process; the processes used to decide each for itself
    and could train in different precisions."""
    launcher = tmp_path / "precision.py"
    launcher.write_text(PRECISION_LAUNCHER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(launcher),
    ]
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # (the two processes print at the same moment: their lines may run into each other)
    assert sorted(re.findall(r"rank (\d): (bf16|no)", r.stdout)) == [("0", "bf16"), ("1", "bf16")], r.stdout


# Each process writes how it left to STATUS/rank{r}: its exit status, the error that made it exit and
# whether it left the process group open (a gloo group left open at exit could end the process by SIGABRT,
# "terminate called without an active exception", instead of its exit status).
STATUS_LAUNCHER = """\
import os
import sys
from pathlib import Path

import torch.distributed as dist

status = Path(sys.argv.pop(1))
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
try:
    main()
except SystemExit as e:
    why = type(e.__context__).__name__
    group = "open" if dist.is_initialized() else "closed"
    (status / f"rank{os.environ['RANK']}").write_text(f"{e.code} {why} {group}")
    raise
"""


def test_a_run_folder_the_main_process_cannot_make_stops_every_process_with_its_error(tmp_path):
    """The main process makes the run folder and takes its lock; its error reaches the others, which
    would otherwise wait at the next collective: under gloo it fails when the main process has gone,
    under NCCL it waits until the launcher kills them (an hour under launchers that do not)."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(STATUS_LAUNCHER)
    status = tmp_path / "status"
    status.mkdir()
    (tmp_path / "a-file").write_text("in the way\n")
    run_dir = tmp_path / "a-file" / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), str(status), "train-tokenizer", str(write_recipe(tmp_path)), "--out", str(run_dir)]
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0
    message = (
        f"error: {run_dir}: could not write the run folder: {tmp_path / 'a-file'} is a file, not a folder"
    )
    assert r.stderr.count(message) == 1, r.stderr[-3000:]
    assert {p.name: p.read_text() for p in status.iterdir()} == {
        "rank0": "1 UserError closed",
        "rank1": "1 UserError closed",
    }


# STATUS_LAUNCHER with a slow main process (a loaded machine): it lets go of the run folder only once the
# other process has exited (torchrun then sends it SIGTERM), or waits for it at a barrier, and takes a
# second to shut down.
SLOW_MAIN_LAUNCHER = """\
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from smapctl.train import runner

status = Path(sys.argv.pop(1))
rank = os.environ["RANK"]
(status / f"pid{rank}").write_text(str(os.getpid()))
close, barrier = runner.TrainingRun.close, dist.barrier


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def slow_close(self, failed=False):
    if rank == "0":
        while not (status / "pid1").exists():
            time.sleep(0.05)
        other, deadline = int((status / "pid1").read_text()), time.time() + 60
        while not gone(other) and not (status / "barrier1").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # torchrun's SIGTERM, if the other process has gone
    close(self, failed)


def waiting_barrier(*args, **kwargs):
    (status / f"barrier{rank}").touch()
    return barrier(*args, **kwargs)


runner.TrainingRun.close, dist.barrier = slow_close, waiting_barrier
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
try:
    main()
except SystemExit as e:
    why = type(e.__context__).__name__
    group = "open" if dist.is_initialized() else "closed"
    (status / f"rank{rank}").write_text(f"{e.code} {why} {group}")
    if rank == "0":
        time.sleep(1.0)  # the interpreter's shutdown
    raise
"""


def test_a_refusal_every_process_meets_ends_each_with_its_status_however_slow_the_main_one(tmp_path):
    """A run folder in use by another training is refused in every process. The other process exited
    first and torchrun's SIGTERM then ended the main one: 143 with its group open and no error line
    (gloo could then abort it, SIGABRT), or -15 as it shut down."""
    from smapctl.train.run_folder import lock_folder

    launcher = tmp_path / "launcher.py"
    launcher.write_text(SLOW_MAIN_LAUNCHER)
    status, run_dir = tmp_path / "status", tmp_path / "run"
    status.mkdir()
    run_dir.mkdir()
    held, holder = lock_folder(run_dir)  # another training, as far as the launched ones can tell
    assert holder is None
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += [
            str(launcher),
            str(status),
            "train-tokenizer",
            str(write_recipe(tmp_path)),
            "--out",
            str(run_dir),
        ]
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            env=subprocess_env(OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        held.close()
    assert r.returncode == 1
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1, r.stderr[-3000:]
    assert f"error: {run_dir} is in use by another training (process {os.getpid()} on" in r.stderr
    assert {p.name: p.read_text() for p in status.glob("rank*")} == {
        "rank0": "1 UserError closed",
        "rank1": "1 UserError closed",
    }, r.stderr[-3000:]
    # torchrun's summary of the processes' exit statuses
    assert sorted(re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.MULTILINE)) == ["1", "1"], r.stderr[
        -3000:
    ]


# Trains once per file name given: each time the main process's writes to files with that name in theirs
# find the disk full (faults.fill_disk); every process writes how that training ended to
# STATUS/{name}-rank{r}.
FULL_DISK_LAUNCHER = """\
import atexit
import gc
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, sys.argv.pop(1))  # tests/, for faults
from faults import fill_disk, free_disk  # noqa: E402

import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from smapctl import cli  # noqa: E402
from smapctl.cli import process  # noqa: E402
from smapctl.train.runner import TrainingRun  # noqa: E402

# main() closes the group after an error every process stopped at (the status says whether it did); a
# group cannot be joined again in the same process, so the next training here keeps it open.
closing = []
process.leave_processes = lambda: closing.append(dist.is_initialized())

status, recipe, out = (Path(a) for a in sys.argv[1:4])
names = sys.argv[4:]
rank = os.environ["RANK"]


def left() -> int:
    \"\"\"What is left of the trainings (their runs and models; through its wrapper a model holds the
    process group, which a gloo group must not outlive into the interpreter's shutdown).\"\"\"
    return sum(type(o) in (TrainingRun, DistributedDataParallel) for o in gc.get_objects())


# Registered before smapctl's own: called after them, as the interpreter is about to shut down.
atexit.register(lambda: (status / f"at-exit-rank{rank}").write_text(f"{left()} left"))
disk = pytest.MonkeyPatch()
for name in names:
    if rank == "0":
        fill_disk(disk, only=name)
    sys.argv = ["smapctl", "train-tokenizer", str(recipe), "--out", str(out / name)]
    try:
        cli.main()
        code, why = 0, None
    except SystemExit as e:
        code, why = e.code, type(e.__context__).__name__
    free_disk(disk)
    group = "closed" if closing == [True] else f"open {closing}"
    closing.clear()
    # Collected, nothing is left (but the last training's cycles, for the check at exit).
    if name != names[-1]:
        gc.collect()
        group += f" {left()} left"
    (status / f"{name}-rank{rank}").write_text(f"{code} {why} {group}")
dist.destroy_process_group()
"""


def test_a_write_the_main_process_cannot_make_stops_every_process_with_its_error(tmp_path):
    """Only the main process writes the run's files; when one of its writes fails (here a full disk: the
    recipe as the run starts, a metrics row, a preview, a checkpoint), every process stops with its error,
    and the launch goes on to the next training in step: the others would otherwise have gone on to their
    next collective and waited there (under NCCL, until the launcher killed them)."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FULL_DISK_LAUNCHER)
    status, out = tmp_path / "status", tmp_path / "runs"
    status.mkdir()
    recipe = write_recipe(tmp_path, text=TINY_RECIPE.replace("log_every: 1", "log_every: 4"))
    failing = {
        "state.pt": "could not write checkpoint",  # at step 3
        "recipe.yaml": "could not write the run's recipe",  # as the run starts
        "metrics.jsonl": "could not write the metrics",  # the row of step 4
        "step_000000005.png": "could not write the image",  # the preview of step 5
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), str(ROOT / "tests"), str(status), str(recipe), str(out), *failing]
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=150
    )  # ~25 s; before the fix the processes waited for each other until the timeout
    assert r.returncode == 0, r.stderr[-3000:]
    ended = {f"{name}-rank{rank}": "1 UserError closed 0 left" for name in failing for rank in (0, 1)}
    ended |= {f"step_000000005.png-rank{rank}": "1 UserError closed" for rank in (0, 1)}  # the last
    ended |= {f"at-exit-rank{rank}": "0 left" for rank in (0, 1)}
    assert {p.name: p.read_text() for p in status.iterdir()} == ended, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(failing), r.stderr[-3000:]  # each said once, by the main process
    for line, (name, said) in zip(errors, failing.items(), strict=True):
        assert str(out / name) in line and said in line and "No space left on device" in line, line


def test_each_unreadable_image_is_named_by_the_process_that_reads_it_once(tmp_path):
    """The other processes named no unreadable image (their log level was errors only), and once they
    did, every process named the held-out ones its sample-grid preview read, which only the main
    process draws."""
    from PIL import Image

    for split, count in (("train", 4), ("val", 1)):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.full((16, 16, 3), 60 * c + 10 * i, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / name / f"img{i}.png")
    bad = tmp_path / "val" / "cat" / "a-broken.png"  # sorted first: the preview's first image
    bad.write_text("not a picture\n")
    recipe = write_recipe(tmp_path)
    sets = [
        f"data.dataset={tmp_path / 'train'}",
        f"data.val_dataset={tmp_path / 'val'}",
        "model.num_classes=2",
    ]
    sets += ["train.max_steps=2", "train.sample_every=2", "train.ckpt_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "smapctl", "train-tokenizer", str(recipe), "--out", str(tmp_path / "run"), *cli_args(*sets)]
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count(f"skipping unreadable image {bad}:") == 1, r.stderr[-3000:]


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_a_run_folder_only_another_node_sees_as_refused_is_said_naming_that_process(tmp_path, resume):
    """Two nodes (two `torchrun --nnodes 2 --node_rank N` on this machine, one process each), each with its
    own folder for the relative `--out run`, node 1's holding a run (node 0's: none). A new run, refused by
    node 1 alone (its old checkpoints), stopped that process silently (an error every process meets is
    printed by the main one), and the main process said only that another had stopped. Now the refusal is
    agreed and said once, naming the process; a resume, refused by the main process alone (nothing to
    resume), is said as before, once, as its own."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        write_recipe(folder.mkdir() or folder)
    train_tokenizer(load(folders[1] / "tiny.yaml", "train.max_steps=1"), folders[1] / "run")
    args = [
        "train-tokenizer",
        "tiny.yaml",
        "--out",
        "run",
        "--max-steps",
        "2",
        *cli_args("train.batch_size=8"),
    ]
    outputs = two_nodes(*args, *(["--resume"] if resume else []), cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = (
        "error: --resume: no complete checkpoint in run/checkpoints"
        if resume
        else "error: process 1 of the launch: run already holds checkpoints; pass --resume to continue it"
    )
    assert ours[0].count(said) == 1 and "error" not in ours[1], outputs
    assert not (folders[0] / "run").exists()


def test_nodes_whose_copies_of_the_image_folder_differ_stop_before_training(tmp_path):
    """Two nodes (two `torchrun --nnodes 2 --node_rank N` on this machine, one process each), each with its
    own copy of the relative `data.dataset: images`, node 1's with fewer images: each process read its
    share by index into its own listing, and the run trained to the end on other images than its shares,
    without a word. Now every process stops before training, in one line."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder, n in zip(folders, (10, 8), strict=True):
        image_folder(folder / "images", ("0", "1"), n)
        write_recipe(folder)
    sets = cli_args("data.dataset=images", "model.num_classes=2", "train.batch_size=8")
    outputs = two_nodes(
        "train-tokenizer", "tiny.yaml", "--out", "run", "--max-steps", "2", *sets, cwds=folders
    )
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = "error: process 1 of the launch lists 14 training images in "
    assert (
        ours[0].count(said) == 1 and "the main process 18: every process must read the same images" in ours[0]
    )
    assert "error" not in ours[1], outputs
    assert not (folders[0] / "run").exists()
