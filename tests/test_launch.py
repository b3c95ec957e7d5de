"""Which launcher started how many processes: torchrun's variables and those of MPI launchers."""

import pytest
import torch

from smapctl.errors import UserError
from smapctl.launch import (
    cpu_processes,
    has_gpu,
    launched_processes,
    launched_rank,
    process_state,
    refuse_multi_process,
)

SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANKS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@pytest.fixture
def plain_process(monkeypatch):
    for name in SIZES + RANKS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_plain_process_is_alone(plain_process):
    assert launched_processes() == 1
    assert not cpu_processes()
    refuse_multi_process("decode")  # no error


@pytest.mark.parametrize("variable", SIZES)
def test_mpi_launchers_count_as_launchers(variable, plain_process):
    # `accelerate launch --cpu --mpirun_hostfile` and `mpirun` set OMPI_/PMI_/MV2_ sizes, not WORLD_SIZE:
    # read only WORLD_SIZE, each process trained alone into the same run folder.
    plain_process.setenv(variable, "2")
    assert launched_processes() == 2
    assert cpu_processes() == (not has_gpu())
    with pytest.raises(UserError, match="smapctl decode runs as one process, but the launcher started 2"):
        refuse_multi_process("decode")
    refuse_multi_process("train-tokenizer")  # spreads over the processes
    refuse_multi_process("tokenize")  # so does tokenize, each process encoding its share of the batches


@pytest.mark.parametrize(("size", "rank"), list(zip(SIZES, RANKS, strict=True)))
def test_the_rank_is_read_from_any_launcher(size, rank, plain_process):
    plain_process.setenv(size, "2")
    plain_process.setenv(rank, "1")
    assert launched_rank() == 1


def test_only_the_main_process_of_a_launcher_logs_warnings_and_dry_runs(plain_process, capsys):
    """Each process used to print the same warnings (and `--dry-run`'s summary) once per process."""
    import subprocess
    import sys
    from pathlib import Path

    from tiny_tokenizer import run_cli

    root = Path(__file__).resolve().parents[1]
    plain_process.setenv("OMPI_COMM_WORLD_SIZE", "2")
    dry = ("train-tokenizer", root / "recipes/demo/tokenizer.yaml", "--dry-run")
    for rank in (0, 1):
        plain_process.setenv("OMPI_COMM_WORLD_RANK", str(rank))
        code, out, _ = run_cli(capsys, *dry)
        assert code == 0 and ("parameters: " in out) == (rank == 0)
    # Logging is set up once per process: a process of its own.
    warn = "import logging; from smapctl import cli; cli.setup_logging(); "
    warn += "logging.getLogger('smapctl').warning('hi'); logging.getLogger('smapctl').error('bad')"
    r = subprocess.run([sys.executable, "-c", warn], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0 and "hi" not in r.stderr and "bad" in r.stderr


def test_launched_processes_wait_an_hour_for_each_other(plain_process):
    """NCCL's default of 10 minutes ended multi-GPU runs while the main process alone wrote a large
    checkpoint or checked a token cache's images on a network filesystem."""
    from datetime import timedelta

    import accelerate

    from smapctl.launch import process_state

    made = []
    plain_process.setattr(accelerate, "PartialState", lambda **kw: made.append(kw))
    process_state()
    plain_process.setenv("WORLD_SIZE", "2")
    process_state()
    assert made[0] == {"cpu": False}  # alone: nothing to wait for
    assert made[1]["timeout"] == timedelta(minutes=60)


def test_a_launcher_accelerate_did_not_join_is_one_line(plain_process):
    from smapctl.launch import check_joined

    check_joined(1, "unused")  # no launcher: one process is right
    plain_process.setenv("PMI_SIZE", "4")
    check_joined(4, "unused")
    with pytest.raises(UserError) as e:
        check_joined(1, "each would train alone")
    assert str(e.value) == "the launcher started 4 processes but accelerate set up 1; each would train alone"


def test_a_command_that_ends_well_closes_the_process_group(plain_process, tmp_path, capsys):
    """Without destroy_process_group PyTorch warns of a leaked NCCL group when a launched command exits."""
    import torch.distributed as dist
    from tiny_tokenizer import run_cli

    store = f"file://{tmp_path / 'store'}"
    try:
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        code, _, _ = run_cli(capsys, "sample", "--help")
        assert code == 0
        assert not dist.is_initialized()

        dist.init_process_group("gloo", init_method=store + "2", rank=0, world_size=1)
        code, _, _ = run_cli(capsys, "decode", tmp_path / "missing.safetensors", "-o", tmp_path / "out")
        assert code != 0
        assert dist.is_initialized()  # after an error closing could wait on stuck processes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_checkpoint_another_process_loaded_is_the_one_named():
    """`sample` compares the generator and the tokenizer each process loaded; only a differing generator
    was launched, so an error that always named the first checkpoint, or process 1, went unnoticed. The
    error names the process and the checkpoint that differ, with the main process's folder, and is
    agreed (every process raises it); the same checkpoints everywhere are no error."""
    from pathlib import Path

    from smapctl.launch import different_checkpoints

    checkpoints = {"generator": (Path("gen/checkpoints/1000"), "g0"), "tokenizer": (Path("tok"), "t0")}
    assert different_checkpoints([("g0", "t0")] * 3, checkpoints) is None
    error = different_checkpoints([("g0", "t0"), ("g0", "t0"), ("g0", "t1")], checkpoints)
    assert str(error) == (
        "process 2 of the launch loaded another tokenizer than the main process's (tok): its node's copy"
        " is of another step or training; give every node the same copy"
    )
    assert error.agreed


def test_an_error_every_process_meets_is_printed_by_the_main_one_alone(plain_process, capsys, monkeypatch):
    """Under torchrun a bad --set was printed once per process; an unreadable image that one process
    alone reads is still printed by that process."""
    from pathlib import Path

    from tiny_tokenizer import error_lines, run_cli

    from smapctl import recipe
    from smapctl.data.images import BadImageError

    root = Path(__file__).resolve().parents[1]
    plain_process.setenv("OMPI_COMM_WORLD_SIZE", "2")
    bad = ("train-tokenizer", root / "recipes/demo/tokenizer.yaml", "--set", "train.bogus=1", "--dry-run")
    for rank in (0, 1):
        plain_process.setenv("OMPI_COMM_WORLD_RANK", str(rank))
        code, _, err = run_cli(capsys, *bad)
        assert code == 2 and len(error_lines(err)) == (rank == 0), rank

    def unreadable(*args, **kwargs):
        raise BadImageError("data/cat/3.png", "not an image")

    monkeypatch.setattr(recipe, "load_tokenizer_recipe", unreadable)
    code, _, err = run_cli(capsys, *bad)  # rank 1
    assert code == 1 and error_lines(err) == ["error: data/cat/3.png: not an image"]


def test_a_path_error_or_a_lost_process_is_printed_by_the_main_one_alone(plain_process, capsys, monkeypatch):
    """The errors said in one line that are not a `UserError` (a path the system refused, which every
    process meets alike; a collective broken by another process that stopped) printed in every process
    passed the tests of an error printed once, which raise a `UserError`: each is printed by the main
    process alone, the others exiting with the same status in silence."""
    from pathlib import Path

    import torch.distributed as dist
    from tiny_tokenizer import error_lines, run_cli

    from smapctl import recipe

    root = Path(__file__).resolve().parents[1]
    plain_process.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # (a collective's error is told by its group)
    args = ("train-tokenizer", root / "recipes/demo/tokenizer.yaml", "--dry-run")
    errors = [
        (OSError(36, "File name too long", "runs/x"), "error: runs/x: file name too long"),
        (
            RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5678"),
            "error: another process of this launch stopped (its message, if it could leave one, is above);"
            " this one stopped with it",
        ),
    ]
    for error, said in errors:

        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(recipe, "load_tokenizer_recipe", failing)
        for rank in (0, 1):
            plain_process.setenv("OMPI_COMM_WORLD_RANK", str(rank))
            code, _, err = run_cli(capsys, *args)
            assert code == 1 and error_lines(err) == ([said] if rank == 0 else []), (rank, err)


def test_a_batch_that_does_not_split_is_said_before_the_processes_join(plain_process, capsys):
    """It was found after the process group's set-up, so every process printed it (and --dry-run passed)."""
    from pathlib import Path

    from tiny_tokenizer import error_lines, run_cli

    root = Path(__file__).resolve().parents[1]
    plain_process.setenv("OMPI_COMM_WORLD_SIZE", "2")
    plain_process.setenv("OMPI_COMM_WORLD_RANK", "0")
    args = (
        "train-tokenizer",
        root / "recipes/demo/tokenizer.yaml",
        "--set",
        "train.batch_size=9",
        "--dry-run",
    )
    code, out, err = run_cli(capsys, *args)
    assert code == 1 and "parameters:" not in out
    assert error_lines(err) == [
        "error: train.batch_size: 9 does not split over 2 process(es) x 1 accumulation step(s); "
        "choose a multiple of 2"
    ]


def test_a_collective_broken_by_another_process_is_told_apart(monkeypatch):
    """The process left at a collective by another's error printed a page of gloo traceback over it."""
    import torch.distributed as dist

    from smapctl.cli.process import _lost_another_process

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5678")
    assert not _lost_another_process(gone)  # no process group: not that
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert _lost_another_process(gone)
    assert not _lost_another_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# A worker of torchrun (TORCHELASTIC_RUN_ID set) under a launcher with several threads; the worker counts
# the SIGTERMs it gets after the launcher is killed.
_LAUNCHER = """\
import os, subprocess, sys, threading, time
for _ in range(4):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env, start_new_session=True)
time.sleep(60)
"""
_WORKER = """\
import signal, sys, time
from pathlib import Path
from smapctl.cli.process import _stop_with_the_launcher
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(time.time()))
_stop_with_the_launcher()
out = Path(sys.argv[1])
out.with_suffix(".ready").touch()
deadline = time.time() + 30
while time.time() < deadline and not (got and time.time() > got[0] + 2):
    time.sleep(0.05)
out.write_text(str(len(got)))
"""


def test_the_workers_of_a_killed_launcher_get_one_sigterm(tmp_path):
    """torchrun starts its workers in sessions of their own: `kill -9` of the launcher's group left them
    training beside the resumed run. They now get SIGTERM (save and stop), once: a second SIGTERM means
    "stop at once" (the kernel's parent-death notice comes once per thread of the dying launcher)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "count.txt"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _WORKER, str(out)], cwd=root)
    try:
        deadline = time.time() + 60
        while not out.with_suffix(".ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert out.with_suffix(".ready").exists()
    finally:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert out.read_text() == "1"


def test_help_and_usage_errors_are_printed_once_under_a_launcher():
    """Every process of a launcher printed Click's help and usage errors (twice with two processes); the
    others, which printed nothing, exited first, and torchrun's SIGTERM then ended the main one (-15)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        args: subprocess.run(
            [*cmd, "-m", "smapctl", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        for args in (("sample", "--bogus"), ("sample", "--help"))
    }
    bad, helped = runs.values()
    assert bad.returncode != 0 and bad.stderr.count("No such option: --bogus") == 1, bad.stderr[-3000:]
    # torchrun's summary of the processes' exit statuses, by rank: the main process exits with the usage
    # error's 2 (not torchrun's SIGTERM, -15, before it said it); the other exits with 2 too once the main one
    # has, or, when it was still starting as the main one ended (a loaded machine), torchrun's SIGTERM ends it
    pairs = r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)"
    statuses = dict(re.findall(pairs, bad.stderr))
    assert statuses.get("0") == "2" and statuses.get("1") in ("2", "-15"), bad.stderr[-3000:]
    assert helped.returncode == 0 and helped.stdout.count("Usage:") == 1, helped.stdout


def test_a_device_asked_in_the_environment_that_is_not_there_is_one_line(monkeypatch):
    """`ACCELERATE_TORCH_DEVICE=cuda` on a machine without a GPU (a shell set up on another) was torch's
    "Found no NVIDIA driver on your system" traceback as a training or `sample` set up; one torch does
    not know, its "Expected one of cpu, cuda, ... device string" traceback."""
    asked = {"quantum": "not a device torch knows"}
    if not torch.cuda.is_available():
        asked["cuda"] = "this machine has no cuda device"
    for device, said in asked.items():
        monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", device)
        with pytest.raises(UserError) as e:
            process_state()
        assert str(e.value) == (
            f"environment variable ACCELERATE_TORCH_DEVICE={device!r}: {said}; unset it (smapctl chooses the"
            " device)"
        )


# `smapctl` as a launched process whose main process (rank 0) first sleeps argv[1] seconds: a loaded
# machine, where it is still importing torch as the others are done.
SLOW_MAIN = """\
import os
import sys
import time

pause = float(sys.argv.pop(1))
if os.environ["RANK"] == "0":
    time.sleep(pause)
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        (("sample", "--bogus"), 2, "No such option: --bogus"),
        (
            ("evaluate", "--samples", "x", "--data", "digits:val"),
            1,
            "error: smapctl evaluate --samples runs as one process, but the launcher",
        ),
    ],
    ids=["usage-error", "refused-launcher"],
)
def test_an_error_the_main_process_prints_reaches_the_screen_when_it_is_the_slower(
    tmp_path, args, status, said
):
    """The other process, which leaves such errors to the main one, exited first; torchrun's SIGTERM then
    ended the main process, still starting on a loaded machine, without its line (-15; the full suite
    failed so now and then). The others now wait for the launcher's SIGTERM, which comes once the main
    process has exited."""
    import re
    import subprocess
    import sys

    from tiny_tokenizer import ROOT, subprocess_env

    launcher = tmp_path / "launcher.py"
    launcher.write_text(SLOW_MAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if args[0] == "evaluate":  # (refused as the command starts, before its paths are looked at)
        args = (*args, "--samples", tmp_path / "none", "-o", tmp_path / "ev")
    cmd += [str(launcher), "3", *map(str, args)]
    env = subprocess_env(OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    statuses = re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.MULTILINE)
    assert sorted(statuses) == [str(status)] * 2, r.stderr[-3000:]
    assert r.stderr.count(said) == 1, r.stderr[-3000:]


# `smapctl` as a launched process in which only the process of rank 1 cannot load its tokenizer, and waits
# 8 s (not 30) for the main process to exit. (With 2 s, on a loaded machine the main process had not yet
# reached the collective where it notices that rank 1 left: torchrun's SIGTERM ended it, 143, not 1.)
ONE_PROCESS_FAILS = """\
import os
import sys

from smapctl import cli
from smapctl.cli import process
from smapctl.errors import UserError
from smapctl.ops import load

process.MAIN_PROCESS_GRACE = 8.0
if os.environ["RANK"] == "1":

    def refused(*args, **kwargs):
        raise UserError("a problem only this process meets")

    load.load_tokenizer = refused
sys.argv[0] = "smapctl"
cli.main()
"""


@pytest.mark.slow
def test_an_error_only_another_process_meets_is_printed_by_it(tiny_kl_tokenizer, tmp_path):
    """Such an error was left to the main process to print, as one every process meets: the main process,
    which did not meet it, said only that another process had stopped ("its message ... is above"), and
    nothing was above. When the main process has not exited within the grace time, the process prints
    it, naming itself."""
    import re
    import subprocess
    import sys

    from tiny_tokenizer import ROOT, before_torchrun, subprocess_env

    launcher = tmp_path / "launcher.py"
    launcher.write_text(ONE_PROCESS_FAILS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), "tokenize", "digits:val", "-o", str(tmp_path / "codes.pt")]
    cmd += ["--checkpoint", str(tiny_kl_tokenizer)]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    # By rank: the process that met the error exits 1; the main one exits 1 too when it has noticed that
    # process stop, or, still busy then on a loaded machine, is ended by torchrun's SIGTERM once that process
    # has exited (143: "stopped by SIGTERM")
    pairs = r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)"
    statuses = dict(re.findall(pairs, r.stderr))
    assert statuses.get("1") == "1" and statuses.get("0") in ("1", "143"), r.stderr[-3000:]
    ours = before_torchrun(r.stderr)
    assert ours.count("error: process 1 of the launch: a problem only this process meets") == 1, ours


def _launcher_parsers():
    """(name, argparse parser, its arguments before `-m smapctl`) of torchrun and `accelerate launch`."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    return [
        ("torchrun", get_args_parser(), ["--nproc_per_node", "2"]),
        ("accelerate launch", launch_command_parser(), ["--cpu", "--num_processes", "2"]),
    ]


def _reaches_smapctl(parser, before: list[str], argv: list[str]) -> bool:
    """Whether `launcher BEFORE -m smapctl ARGV` passes ARGV to smapctl as it is: argparse reads every
    argument as a possible option of the launcher's first, and stops at an ambiguous abbreviation."""
    try:
        args = parser.parse_args([*before, "-m", "smapctl", *argv])
    except SystemExit:
        return False
    return [args.training_script, *args.training_script_args] == ["smapctl", *argv]


def test_every_option_reaches_smapctl_through_the_launchers(capsys):
    """torchrun reads `--num` (evaluate's) as an abbreviation of its `--numa-binding`, and stopped
    `torchrun ... -m smapctl evaluate --generator RUN --num 50000` with "ambiguous option": every option
    of every command has a name that both launchers pass on (that one `--num-samples`), and no other
    clashes. The commands of a group (`reproduce mini`) are walked too: only the top level's were, and an
    option of `reproduce mini` that torchrun stopped at (its refusal of a launcher never said) passed."""
    import typer

    from smapctl.cli import app

    def walk(path: tuple[str, ...], command) -> list:
        """(the command's path, an option or argument of it) of `command` and of every command below it."""
        options = [(path, p) for p in command.params]
        for name, sub in getattr(command, "commands", {}).items():
            options += walk((*path, name), sub)
        return options

    options = walk((), typer.main.get_command(app))
    assert ("reproduce", "mini") in {path for path, _ in options}
    blocked = set()
    for launcher, parser, before in _launcher_parsers():
        for command, param in options:
            names = [n for n in param.opts + param.secondary_opts if n.startswith("-")]
            if not names:  # an argument
                continue
            passed = []
            for name in names:
                argv = [*command, name] if param.is_flag else [*command, name, "1"]
                if _reaches_smapctl(parser, before, argv):
                    passed.append(name)
                else:
                    blocked.add((launcher, *command, name))
            assert passed, f"{launcher}: no name of {command} {names} reaches smapctl"
    capsys.readouterr()  # (argparse's usage lines)
    assert blocked == {("torchrun", "evaluate", "--num")}


@pytest.mark.parametrize(
    ("value", "asked"),
    [(None, None), ("", None), ("no", None), ("NO", None), ("bf16", "bf16"), (" FP16 ", "fp16")],
)
def test_the_launchers_precision_is_read_case_blind_and_its_default_counts_as_none(monkeypatch, value, asked):
    from smapctl.launch import launcher_precision

    if value is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", value)
    assert launcher_precision() == asked


@pytest.mark.parametrize(("processes", "gpu", "cpu"), [(1, False, False), (2, False, True), (2, True, False)])
def test_cpu_processes_are_several_processes_without_a_gpu(monkeypatch, processes, gpu, cpu):
    from smapctl import launch

    monkeypatch.setattr(launch, "launched_processes", lambda: processes)
    monkeypatch.setattr(launch, "has_gpu", lambda: gpu)
    assert launch.cpu_processes() is cpu
