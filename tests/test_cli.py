"""The command line as a user meets it: real processes, exit codes, one-line errors."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_tokenizer import TINY_RECIPE, error_lines, run_cli, smapctl, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


COMMANDS = {"train-tokenizer", "train-generator", "sample", "tokenize", "decode", "cross-recon", "evaluate",
            "reproduce"}  # fmt: skip


def test_help_lists_commands():
    """Every command the README names is listed in the top-level help, and nothing else."""
    r = smapctl("--help")
    assert r.returncode == 0, r.stderr
    panel = r.stdout.split("Commands")[1]
    listed = {m.group(1) for m in re.finditer(r"^│ (\S+)  ", panel, re.MULTILINE)}
    assert listed == COMMANDS, r.stdout


def test_dry_run_prints_parameter_count():
    r = smapctl("train-tokenizer", "recipes/kl_b_128.yaml", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "parameters: 391032608" in r.stdout.splitlines()


# In this process (a real one costs seconds of importing torch): the same entry point and exit codes.


def test_dry_run_with_override(capsys):
    code, out, err = run_cli(
        capsys,
        "train-tokenizer",
        ROOT / "recipes/kl_s_128.yaml",
        "--dry-run",
        "--set",
        "model.num_latent_tokens=64",
    )
    assert code == 0, err
    assert "64 tokens x 16 (kl)" in out


def test_a_dry_runs_table_gives_depth_by_width_and_how_the_tail_is_dropped(capsys):
    recipe = ROOT / "recipes/kl_s_128.yaml"
    code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", "--set", "model.enc_depth=3")
    assert code == 0, err
    assert "3 x 768 (12 heads)" in out and "uniform per sample" in out, out
    sets = ("--set", "model.tail_drop_per_sample=false")
    code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", *sets)
    assert code == 0 and "uniform per batch" in out, out


def test_a_generator_dry_runs_summary_line_is_not_broken_in_a_pipe(capsys):
    """Not on a terminal (80 columns) rich broke the summary line mid-sentence, with a trailing space."""
    code, out, err = run_cli(capsys, "train-generator", ROOT / "recipes/maskgit_b_128.yaml", "--dry-run")
    assert code == 0, err
    [line] = [x for x in out.splitlines() if x.startswith(str(ROOT / "recipes/maskgit_b_128.yaml"))]
    assert line.endswith(", class embedding independent, built on meta"), line


def test_a_dry_runs_train_line_gives_the_steps_batch_and_lr_asked_for(capsys):
    sets = ("--set", "train.batch_size=7", "--set", "train.lr=0.00025", "--max-steps", 5)
    code, out, err = run_cli(
        capsys, "train-generator", ROOT / "recipes/maskgit_b_128.yaml", "--dry-run", *sets
    )
    assert code == 0, err
    [line] = [x for x in out.splitlines() if x.startswith("train: ")]
    assert line.startswith("train: 5 steps, batch 7, lr 0.00025, "), line


@pytest.mark.parametrize("gib", [23.4, 64.0])
def test_a_dry_run_warns_of_a_model_too_large_for_the_machines_memory(capsys, monkeypatch, gib):
    """llamagen_3b on a 23.4 GiB machine without a GPU: its weights, gradients and AdamW state alone take
    45.4 GiB, and the kernel would kill the run for lack of memory without a word from smapctl."""
    import smapctl.runtime

    monkeypatch.setattr(smapctl.runtime, "machine_memory", lambda: int(gib * 2**30), raising=False)
    code, _, err = run_cli(capsys, "train-generator", ROOT / "recipes/llamagen_3b.yaml", "--dry-run")
    assert code == 0, err
    warning = (
        "WARNING training 3,044,256,768 parameters in fp32 takes at least 45.4 GiB of memory (weights,"
        " gradients, AdamW's two moments), more than this machine's 23.4 GiB: the run is likely to be killed"
        " for lack of memory\n"
    )
    assert (warning in err) == (gib < 45.4), err


def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: tokenizer\nmodel:\n  num_latent_tokns: 64\n")
    code, _, err = run_cli(capsys, "train-tokenizer", bad, "--dry-run")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(bad) in lines[0] and "model.num_latent_tokns: unknown key" in lines[0]
    assert "num_latent_tokens" in lines[0]  # the valid keys are listed


def test_bad_override_and_missing_file(capsys):
    code, _, err = run_cli(
        capsys, "train-tokenizer", ROOT / "recipes/kl_s_128.yaml", "--dry-run", "--set", "train.lr=fast"
    )
    assert code == 2 and "train.lr: expected a number, got 'fast'" in err
    code, _, err = run_cli(capsys, "train-tokenizer", "recipes/nope.yaml", "--dry-run")
    assert code == 2 and "recipe file not found" in err
    # Printed as written: no rich markup ([bold]) or emoji codes (:train: became a tram emoji).
    odd = "recipes/[bold]digits:train:x.yaml"
    code, _, err = run_cli(capsys, "train-tokenizer", odd, "--dry-run")
    assert code == 2 and odd in err, err


def test_debug_shows_traceback(tmp_path):
    r = smapctl("--debug", "train-tokenizer", "recipes/nope.yaml", "--dry-run")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_as_the_process_exits_after_its_command_keeps_its_status(signals):
    """A SIGTERM once the command has ended, as the interpreter shuts down (sent here by an exit
    function, run before smapctl's own), ended a finished command with -15; a second one still ends the
    process."""
    program = (
        "import atexit, os, signal, sys\n"
        "sys.argv = ['smapctl', '--version']\n"
        "from smapctl.cli import entry\n"
        f"atexit.register(lambda: [os.kill(os.getpid(), signal.SIGTERM) for _ in range({signals})])\n"
        "entry()\n"
    )
    r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == (0 if signals == 1 else -signal.SIGTERM), r.stderr
    assert r.stdout.startswith("smapctl ")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_as_the_modules_are_freed_after_its_command_keeps_its_status(signum):
    """Past the exit functions the interpreter puts the default handlers back and frees its modules (a
    second with torch's): a Ctrl-C there, sent here by an object freed with `__main__`, ended a tokenize
    whose token file was written, its result line printed, with -2 (-15 for a SIGTERM)."""
    program = (
        "import os, sys\n"
        "class FreedLast:\n"
        f"    def __del__(self): os.kill(os.getpid(), {int(signum)})\n"
        "freed_last = FreedLast()\n"
        "sys.argv = ['smapctl', '--version']\n"
        "from smapctl.cli import entry\n"
        "entry()\n"
    )
    r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("smapctl ")


def test_debug_environment_variable_shows_the_user_errors_traceback(monkeypatch):
    from smapctl import cli
    from smapctl.errors import UserError

    monkeypatch.setenv("SMAPCTL_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["smapctl", "train-tokenizer", "recipes/nope.yaml", "--dry-run"])
    with pytest.raises(UserError, match="recipe file not found"):  # raised on, not printed as one line
        cli.main()


def test_a_launchers_sigterm_as_the_error_is_looked_at_exits_143(monkeypatch, capsys):
    """torchrun sends SIGTERM once another process has exited; arriving while the main process looked at
    its own error (finding that process gone), before it ignored SIGTERM, it exited -2 with a traceback
    (the KeyboardInterrupt SIGTERM raises, unhandled) instead of 143."""
    import typer

    from smapctl.cli import process

    app = typer.Typer()

    @app.command()
    def work() -> None:
        raise RuntimeError("Connection closed by peer")

    def looking(e):
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    monkeypatch.delenv("SMAPCTL_DEBUG", raising=False)
    monkeypatch.setattr(process, "_lost_another_process", looking)
    monkeypatch.setattr(sys, "argv", ["smapctl"])
    try:
        with pytest.raises(SystemExit) as stopped:
            process.main(app)
    except KeyboardInterrupt:  # (left to pytest, it would end the whole run)
        pytest.fail("the SIGTERM's KeyboardInterrupt came out of main")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "stopped by SIGTERM"


def test_a_launchers_sigterm_does_not_cut_the_error_line(monkeypatch, capsys):
    """Under a launcher, another process that met the same error exits first, silently, and the launcher
    then sends SIGTERM to this one: arriving while it printed its error, it stopped it there."""
    from smapctl import cli

    printed = []

    def print_with_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        printed.append(args[0])

    monkeypatch.delenv("SMAPCTL_DEBUG", raising=False)
    monkeypatch.setattr(cli.err_console, "print", print_with_a_sigterm)
    monkeypatch.setattr(sys, "argv", ["smapctl", "train-tokenizer", "recipes/nope.yaml", "--dry-run"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2 and len(printed) == 1 and "recipe file not found" in printed[0]


def test_a_command_whose_stderr_fails_ends_with_its_own_status(monkeypatch):
    """A terminal gone (a hangup: its writes fail with EIO) or a log file on a full disk: a line the command
    printed on stderr through rich (its error, "stopped by SIGTERM") raised the OSError out of it, so a
    `tokenize` stopped by a hangup exited 1 with a traceback instead of 143. The stream now goes to
    /dev/null and the command ends as it would have."""
    from smapctl import cli

    full = open("/dev/full", "w")  # every write: ENOSPC
    monkeypatch.delenv("SMAPCTL_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stderr", full)
    monkeypatch.setattr(sys, "argv", ["smapctl", "train-tokenizer", "recipes/nope.yaml", "--dry-run"])
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main()
        assert stopped.value.code == 2  # (a recipe not found: its own status)
        assert os.path.realpath(f"/proc/self/fd/{full.fileno()}") == os.devnull
    finally:
        monkeypatch.undo()  # (before the stream is closed: pytest's teardown writes to sys.stderr)
        full.close()


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug, not the user's fault"), OSError(errno.EIO, "a bug, not the user's fault")],
)
def test_programming_errors_keep_their_traceback(monkeypatch, capsys, error):
    """An OSError is one line only when it names a path (one the system refused); one naming none is a
    fault, shown in full. No test held that: said as one line, its traceback lost, the row's test
    passed."""
    import smapctl.recipe
    from smapctl import cli

    def bug(*args, **kwargs):
        raise error

    monkeypatch.delenv("SMAPCTL_DEBUG", raising=False)
    monkeypatch.setattr(smapctl.recipe, "load_tokenizer_recipe", bug)
    monkeypatch.setattr(sys, "argv", ["smapctl", "train-tokenizer", "recipes/kl_s_128.yaml", "--dry-run"])
    with pytest.raises(type(error), match="a bug"):  # not turned into a one-line "error: ..." and exit 1
        cli.main()
    assert "error:" not in capsys.readouterr().err


def _commands(group, prefix=()):
    """(command path, click command) of every smapctl subcommand, sub-groups walked."""
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_commands_help_and_the_version_are_quick():
    """`smapctl tokenize --help` imported torch (through the launcher check): 6-10 s instead of 0.5.
    `smapctl --version`, for bug reports, names its own, torch's and Python's versions, as quick."""
    import platform

    import torch

    from smapctl import __version__

    code = (  # _commands' walk again: importing this file would import torch (through tiny_tokenizer)
        "import sys, typer; from smapctl import cli\n"
        "def walk(group, prefix=()):\n"
        "    for name, command in sorted(group.commands.items()):\n"
        "        sub = (*prefix, name)\n"
        "        yield from walk(command, sub) if hasattr(command, 'commands') else [sub]\n"
        "runs = [[*path, '--help'] for path in walk(typer.main.get_command(cli.app))] + [['--version']]\n"
        "for args in runs:\n"
        "    sys.argv = ['smapctl', *args]\n"
        "    try:\n"
        "        cli.main()\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (args, e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "False"
    assert "Usage: smapctl tokenize [OPTIONS]" in r.stdout and "Usage: smapctl reproduce mini" in r.stdout
    torch_version = torch.__version__.split("+")[0]  # the metadata's version has no local label
    assert lines[-2] == f"smapctl {__version__} (torch {torch_version}, Python {platform.python_version()})"
    # Not on a terminal (80 columns) no word of any help is cut: Typer's boxes cut `--inception-weig…`.
    assert "…" not in r.stdout
    assert re.search(r"--inception-weights <path> +torch-fidelity's weights-", r.stdout)
    for columns, boxed in (("80", False), ("120", True)):
        env = os.environ | {"COLUMNS": columns}
        r = subprocess.run(
            [sys.executable, "-m", "smapctl", "evaluate", "--help"], capture_output=True, text=True, env=env
        )
        assert r.returncode == 0 and ("╭─ Options" in r.stdout) == boxed and "…" not in r.stdout, columns


def test_no_help_cuts_a_word_at_any_width(monkeypatch, capsys):
    """Typer's boxes cut a word longer than their column (`weights-inception-2015-12-05-6726…` in
    `evaluate --help` at 100-106 columns, `SMAPCTL_DEBUG=…` in `smapctl --help` at 40): every help, at
    every width from 40 columns up, shows its words whole, boxed or plain."""
    import typer

    from smapctl import cli
    from smapctl.cli import process

    paths = [(), *(path for path, _ in _commands(typer.main.get_command(cli.app)))]
    plain_below = process.PLAIN_BELOW
    for columns in (40, 53, 67, 80, 95, plain_below - 3, plain_below - 1, plain_below, 140):
        monkeypatch.setenv("COLUMNS", str(columns))
        for path in paths:
            code, out, _ = run_cli(capsys, *path, "--help")
            assert code == 0 and "…" not in out, (path, columns)


# The least each command takes before it starts: the launcher check comes first.
ARGS = {
    ("cross-recon",): ["a.png", "b.png"],
    ("decode",): ["codes.pt", "-o", "out"],
    ("tokenize",): ["x"],
    ("evaluate",): ["--samples", "x"],  # (a tokenizer's or a generator's evaluation spreads)
}


def test_commands_that_do_not_split_their_work_refuse_every_launcher_process(monkeypatch, capsys, tmp_path):
    import typer

    from smapctl import cli
    from smapctl.launch import SPREAD_OVER_PROCESSES

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    single = [path for path, _ in _commands(typer.main.get_command(cli.app))]
    single = [p for p in single if " ".join(p) not in SPREAD_OVER_PROCESSES]
    assert ("evaluate",) in single and ("reproduce", "mini") in single
    for path in single:
        code, _, err = run_cli(capsys, *path, *ARGS.get(path, []))
        name = " ".join(path) + (" --samples" if path == ("evaluate",) else "")
        assert code == 1 and f"error: smapctl {name} runs as one process, but the launcher started 2" in err
        assert not any(tmp_path.iterdir()), name


def test_a_dry_run_says_a_batch_is_larger_than_the_training_set(tmp_path, capsys):
    """Training refuses a batch larger than its training split once it lists the images; the dry run,
    which lists a folder's classes already, said nothing of it."""
    from PIL import Image

    recipe = ROOT / "recipes/demo/tokenizer.yaml"
    for c, n in (("cat", 12), ("dog", 9)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    sets = [f"data.dataset={tmp_path / 'data'}", "model.num_classes=2", "data.val_fraction=0.25"]
    for batch, said in ((17, True), (16, False)):  # 21 images, 5 of them held out (3 cats, 2 dogs)
        args = [a for kv in [*sets, f"train.batch_size={batch}"] for a in ("--set", kv)]
        code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", *args)
        assert code == 0 and "parameters:" in out
        message = f"WARNING train.batch_size: {batch} is larger than the training set (16 images)"
        assert (message in err) == said, err
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", "--set", "train.batch_size=4096")
    assert code == 0 and "train.batch_size: 4096 is larger than the training set (1618 images)" in err


def test_missing_perceptual_weights_are_said_first(tmp_path, capsys):
    """Training said so only after listing the images and building the model (an ImageNet listing
    first), and a dry run of the paper's recipes (perceptual weight 1, no file) said nothing."""
    recipe = ROOT / "recipes/demo/tokenizer.yaml"
    code, out, err = run_cli(
        capsys, "train-tokenizer", recipe, "--dry-run", "--set", "loss.perceptual_weight=1"
    )
    assert code == 0 and "parameters:" in out
    assert "WARNING loss.perceptual_weights: not set; the perceptual loss needs a local copy" in err
    sets = ["--set", "loss.perceptual_weight=1", "--set", f"data.dataset={tmp_path / 'none'}"]
    code, _, err = run_cli(
        capsys, "train-tokenizer", recipe, "--max-steps", "2", "--out", tmp_path / "r", *sets
    )
    assert code != 0 and err.startswith("error: loss.perceptual_weights: not set") and "none" not in err
    assert not (tmp_path / "r").exists()


def test_quick_start_default_paths(tmp_path, monkeypatch, capsys):
    """The README's quick start passes no --out and no --checkpoint: `train-tokenizer
    recipes/demo/tokenizer.yaml` writes runs/demo-tokenizer under the working folder, and `tokenize` and
    `sample` (and `cross-recon`, the demo tokenizer too) then default to the demo runs there (a missing one
    is named, with how to train it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes" / "demo").mkdir(parents=True)
    (tmp_path / "recipes" / "demo" / "tokenizer.yaml").write_text(TINY_RECIPE)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{name}.png")
    code, _, err = run_cli(capsys, "cross-recon", "red.png", "blue.png", "--class-a", "3", "--class-b", "7")
    assert code == 1
    assert error_lines(err) == [
        "error: no tokenizer checkpoint given and the demo tokenizer checkpoint (runs/demo-tokenizer, from "
        f"{Path.cwd()}) is not trained yet; train it with: smapctl train-tokenizer "
        "recipes/demo/tokenizer.yaml, or pass --checkpoint"  # the recipe here
    ]
    assert not (tmp_path / "cross-recon.png").exists()
    sets = ("--set", "train.sample_every=100")
    code, out, err = run_cli(
        capsys, "train-tokenizer", "recipes/demo/tokenizer.yaml", "--max-steps", 3, *sets
    )
    assert code == 0, err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["demo-tokenizer"]
    assert [p.name for p in (tmp_path / "runs" / "demo-tokenizer" / "checkpoints").iterdir()] == [
        "step_000000003"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blue.png", "recipes", "red.png", "runs"]

    # A recipe directly in recipes/ (or the working folder) is named by its file alone.
    (tmp_path / "recipes" / "tiny.yaml").write_text(TINY_RECIPE)
    code, _, err = run_cli(capsys, "train-tokenizer", "recipes/tiny.yaml", "--max-steps", 1, *sets)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo-tokenizer", "tiny"]

    # tokenize without --checkpoint: the demo tokenizer just trained.
    code, _, err = run_cli(capsys, "tokenize", "red.png", "--label", "3", "-o", "codes.pt")
    assert code == 0, err
    from smapctl.ops.codes import load_codes

    made_by = tmp_path / "runs" / "demo-tokenizer" / "checkpoints" / "step_000000003"
    assert load_codes(tmp_path / "codes.pt").checkpoint == str(made_by.resolve())

    # cross-recon without --checkpoint: the same demo tokenizer (the only one there), its default -o.
    code, out, err = run_cli(capsys, "cross-recon", "red.png", "blue.png", "--class-a", "3", "--class-b", "7")
    assert code == 0 and out.startswith("panel: cross-recon.png"), err

    # sample without --checkpoint: the demo generator, not trained here.
    code, _, err = run_cli(capsys, "sample", "-o", "samples")
    assert code == 1
    assert error_lines(err) == [
        # where it looked: a command run from another folder did not find the demo run of the repository
        "error: no generator checkpoint given and the demo generator checkpoint (runs/demo-generator, from "
        f"{Path.cwd()}) is not trained yet; train it with: smapctl train-generator "
        f"{ROOT / 'recipes/demo/generator.yaml'}, or pass --checkpoint"  # one that is there from here
    ]
    assert not (tmp_path / "samples").exists()
    from smapctl.ops.load import demo_recipe

    monkeypatch.chdir(ROOT)
    assert demo_recipe("generator") == "recipes/demo/generator.yaml"  # as the README's commands name it


def test_cfg_schedule_reaches_the_sampler(tiny_kl_tokenizer, tmp_path, monkeypatch, capsys):
    """`sample --cfg-schedule` was never passed by a test: the value given must be the schedule CARD's
    sampler guides with (default: the recipe's), and anything else refused as the option."""
    from smapctl.models import card
    from smapctl.recipe import load_generator_recipe
    from smapctl.train.generator import train_generator

    sets = [
        f"latents.tokenizer={tiny_kl_tokenizer}",
        *("model.num_tokens=8", "model.class_dim=32", "model.width=32", "model.depth=1", "model.num_heads=2"),
        *("model.head_depth=1", "model.head_width=32", "train.batch_size=16", "train.precision='no'"),
        *("train.max_steps=1", "train.warmup_steps=0", "train.sample_every=100", "sample.cfg_scale=2.5"),
        "sample.cfg_schedule=constant",
    ]
    gen = tmp_path / "gen"
    train_generator(load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets), gen)
    seen = []
    real = card.guidance_schedule

    def guidance_schedule(cfg_scale, schedule, num_positions):
        seen.append((cfg_scale, schedule, num_positions))
        return real(cfg_scale, schedule, num_positions)

    monkeypatch.setattr(card, "guidance_schedule", guidance_schedule)
    args = ("--checkpoint", gen, "--classes", "1,2", "--per-class", 1, "--steps", 2)
    for chosen, expected in ((), "constant"), (("--cfg-schedule", "linear"), "linear"):
        seen.clear()
        code, _, err = run_cli(capsys, "sample", *args, *chosen, "-o", tmp_path / expected)
        assert code == 0, err
        assert seen == [(2.5, expected, 8)]
    code, _, err = run_cli(capsys, "sample", *args, "--cfg-schedule", "cosine", "-o", tmp_path / "bad")
    assert code == 2 and "--cfg-schedule" in err and "'cosine' is not one of" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("speedup, chosen", [(4.0, "bf16"), (0.02, "fp32")])
def test_dry_run_says_what_precision_auto_chooses_here(capsys, monkeypatch, speedup, chosen):
    import smapctl.precision

    monkeypatch.setattr(smapctl.precision, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(smapctl.precision, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for command, recipe in (("train-tokenizer", "tokenizer"), ("train-generator", "generator")):
        code, out, err = run_cli(capsys, command, ROOT / f"recipes/demo/{recipe}.yaml", "--dry-run")
        assert code == 0, err
        assert f"auto ({chosen} on this CPU)" in out, out


def test_a_dry_runs_table_folds_a_long_word_instead_of_cutting_it(capsys, monkeypatch, tmp_path):
    """The table cut a dataset's path wider than its column with "…" (at 80 columns, a path of 60
    characters), and on a narrow terminal its own row names (`class_em…`)."""
    data = tmp_path / ("imagenet-train-" + "x" * 60)
    (data / "a").mkdir(parents=True)
    for columns in ("30", "80"):
        monkeypatch.setenv("COLUMNS", columns)
        code, out, err = run_cli(
            capsys, "train-tokenizer", ROOT / "recipes/demo/tokenizer.yaml", "--dry-run",
            "--set", f"data.dataset={data}", "--set", "model.num_classes=1",
        )  # fmt: skip
        assert code == 0, err
        assert "…" not in out and "class_emb" in out and "x" * 10 in out, out


def test_a_dry_run_of_a_dataset_whose_name_is_not_utf8_prints_its_table_and_warnings(tmp_path, capsys):
    """`--dry-run` with data.dataset a folder named in Latin-1 (`data\xe9`): its table (the dataset's row)
    stopped the command with a UnicodeEncodeError traceback; so did a warning naming such a folder that is
    not there. The name's bytes are shown as \\xNN."""
    from tokenize_helpers import class_folders

    data = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"data\xe9"))
    class_folders(Path(data))
    recipe = ROOT / "recipes/demo/tokenizer.yaml"
    sets = ["--set", f"data.dataset={data}", "--set", "model.num_classes=3"]
    code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", *sets)
    assert code == 0 and "Traceback" not in err, err
    assert f"{tmp_path}/data\\xe9" in "".join(out.replace("│", "").split()) and "parameters:" in out
    missing = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"nope\xe9"))
    code, out, err = run_cli(
        capsys, "train-tokenizer", recipe, "--dry-run", "--set", f"data.dataset={missing}"
    )
    assert code == 0 and "Traceback" not in err and "parameters:" in out, err
    assert f"WARNING data.dataset: '{tmp_path}/nope\\xe9' is neither" in " ".join(err.split()), err


def test_a_dry_run_on_a_mac_describes_the_precision_of_its_mps_device(capsys, monkeypatch):
    """A Mac trains on mps (accelerate picks it), where `auto` is fp32; the dry run described its CPU's
    bf16 units ("auto (bf16 on this CPU)" on an M2)."""
    import smapctl.precision

    monkeypatch.setattr(smapctl.precision, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(smapctl.precision, "cpu_bf16_speedup", lambda: 4.0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: True)
    code, out, err = run_cli(capsys, "train-tokenizer", ROOT / "recipes/demo/tokenizer.yaml", "--dry-run")
    assert code == 0, err
    assert "auto (fp32 on this mps" in out, out  # (the table may wrap the line there)


def test_a_generator_recipe_with_guidance_and_no_class_dropout_is_warned_about(capsys, caplog):
    recipe = ROOT / "recipes/demo/generator.yaml"
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(
            capsys, "train-generator", recipe, "--set", "model.class_dropout=0", "--dry-run"
        )
    assert code == 0, err
    assert (
        "guidance 3 steers away from the null class, which model.class_dropout 0 never trains" in caplog.text
    )
    assert "set model.class_dropout (e.g. 0.1) or sample.cfg_scale=1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(capsys, "train-generator", recipe, "--dry-run")
    assert code == 0 and "null class" not in caplog.text


def test_a_maskgit_recipe_with_more_steps_than_tokens_is_warned_about(capsys, caplog):
    """`sample` refuses such a recipe's steps; training took it without a word (its previews drew with it)."""
    maskgit = "model={kind: maskgit, vocab_size: 64, num_tokens: 8, num_classes: 10, class_dim: 32}"
    recipe = ROOT / "recipes/demo/generator.yaml"
    for steps, warned in ((25, True), (8, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            sets = ("--set", maskgit, "--set", f"sample.steps={steps}", "--set", "sample.cfg_scale=1")
            code, _, err = run_cli(capsys, "train-generator", recipe, *sets, "--dry-run")
        assert code == 0, err
        said = "sample.steps 25: a MaskGIT decodes at least one of its 8 tokens per step: use at most 8"
        assert (said in caplog.text) is warned, caplog.text


def test_a_dry_run_of_fp16_without_a_gpu_says_the_training_would_refuse_it(capsys, monkeypatch):
    """The dry run passed, then the training itself failed with `fp16 needs a GPU`."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    recipe = ROOT / "recipes/demo/tokenizer.yaml"
    code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--set", "train.precision=fp16", "--dry-run")
    assert code == 0, err
    cells = " ".join(out.replace("│", " ").split())  # the table may wrap its cell
    assert "fp16 (needs a GPU: training refuses it on this machine)" in cells, out


@pytest.mark.parametrize("units", [False, True, None])
def test_a_dry_run_of_bf16_on_a_cpu_without_bf16_units_says_so(capsys, monkeypatch, units):
    """The paper recipes train in bf16: on a CPU without bf16 units the training warned that bf16 runs
    many times slower, while its dry run had shown "bf16" and nothing else. A CPU with the units, or one
    that does not say, gets no note (it is not probed here)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("smapctl.precision.cpu_bf16_units", lambda: units)
    recipe = ROOT / "recipes/demo/tokenizer.yaml"
    code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--set", "train.precision=bf16", "--dry-run")
    assert code == 0, err
    cells = " ".join(out.replace("│", " ").split())
    note = "bf16 (this CPU has no bf16 units: emulated, many times slower; auto gives fp32 here)"
    assert (note in cells) is (units is False), out


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_training_stopped_by_a_signal_closes_the_launchers_group(signum, code, monkeypatch, capsys):
    """Every process of a launcher stops at the same step, after the checkpoint: the group is closed before
    the exit status 128 + the signal's number (left open, a gloo group could end the process by SIGABRT,
    "terminate called without an active exception", instead)."""
    import typer

    from smapctl import cli
    from smapctl.train.signals import GracefulStop

    left = []
    monkeypatch.setattr(cli, "leave_processes", lambda: left.append(True))
    monkeypatch.setattr(GracefulStop, "last_signal", signum)
    with pytest.raises(typer.Exit) as stopped:
        cli._report_checkpoint(Path("runs/x/checkpoints/step_000000005"))
    assert stopped.value.exit_code == code and left == [True]
    monkeypatch.setattr(GracefulStop, "last_signal", None)
    cli._report_checkpoint(Path("runs/x/checkpoints/step_000000005"))  # a run that ended: main() closes it
    assert left == [True]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_work_stopped_together_by_a_signal_closes_the_launchers_group(signum, code, monkeypatch):
    """A `sample`, `tokenize`, token cache or launched evaluation stopped in every process after the same
    round by a signal leaves as a training stopped at its checkpoint does: the group closed (once every
    process is there) before the exit status, not left open to gloo, which could end the process by
    SIGABRT instead. Left open, every test of such a launch passed (the abort comes now and then)."""
    import typer

    from smapctl.cli import process
    from smapctl.launch import StoppedTogether

    left = []
    monkeypatch.setattr(process, "leave_processes", lambda: left.append(True))
    monkeypatch.setattr(process, "_leaving", False)  # (set by the SIGTERM ignored on the way out)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(typer.Exit) as stopped, process.stopping_together():
            raise StoppedTogether(signum)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.value.exit_code == code and left == [True]


def test_a_training_stopped_earlier_in_the_process_does_not_set_the_next_ones_status(
    tiny_kl_tokenizer, tmp_path, monkeypatch, capsys
):
    """`GracefulStop.last_signal` of a training stopped by a signal earlier in this process (a script, a
    notebook, calling the command line twice) made the next training exit 130 too, trained to its end."""

    from smapctl.train.signals import GracefulStop

    run = tmp_path / "run"
    shutil.copytree(tiny_kl_tokenizer, run)
    monkeypatch.setattr(GracefulStop, "last_signal", signal.SIGINT)  # as an earlier stopped training left it
    code, stdout, err = run_cli(capsys, "train-tokenizer", run / "recipe.yaml", "--out", run, "--resume")
    assert code == 0 and "checkpoint: " in stdout, err
    assert GracefulStop.last_signal is None


def test_another_process_of_a_launcher_names_its_unreadable_images_and_nothing_else():
    """The other processes report errors only, but each names the unreadable images it meets (README):
    their level hid those too."""
    code = (
        "import logging; from smapctl import cli; cli.setup_logging()\n"
        "from smapctl.data import folder\n"
        "folder.unreadable_logger.warning('skipping data/bad.png')\n"
        "logging.getLogger('smapctl').warning('a repeat of the main process')\n"
        "folder.logger.warning('data/: class folder(s) without images: empty')\n"
        "logging.getLogger('smapctl').error('an error')\n"
    )
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "skipping data/bad.png" in r.stderr and "an error" in r.stderr
    assert "a repeat of the main process" not in r.stderr and "without images" not in r.stderr


def _logged_after_the_clis_set_up(calls: str, **env: str) -> subprocess.CompletedProcess:
    """`calls` (logging calls, Python lines) in a fresh process, after the CLI's logging set-up."""
    code = "import logging; from smapctl import cli; cli.setup_logging()\n" + calls
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}
    )
    assert r.returncode == 0, r.stderr
    return r


def test_torch_says_nothing_at_exit_after_a_stop_during_its_import():
    """A Ctrl-C while a command imported torch (its first seconds) cut the import short before torch set
    its loggers' levels: at exit its hooks printed "INFO FakeTensor cache stats:" and its counts under
    the command's stop line (a review: 5 of 61 Ctrl-Cs swept over a spawned `tokenize`'s start)."""
    r = _logged_after_the_clis_set_up(
        "logging.getLogger('torch._subclasses.fake_tensor').info('FakeTensor cache stats:')\n"
        "logging.getLogger('smapctl').info('the command says this')\n"
    )
    assert r.stderr.splitlines() == ["INFO the command says this"], r.stderr


def test_a_logged_command_stays_whole_on_a_narrow_terminal():
    """On a terminal (or with FORCE_COLOR, as CI logs often set) rich's log table cut a record at the width
    into indented pieces, paths split mid-name: the command a stopped run prints to continue it did not
    paste. It is one line now, which the terminal wraps."""
    command = (
        "smapctl train-tokenizer /tmp/x/runs/a-long-name/recipe.yaml --out /tmp/x/runs/a-long-name --resume"
    )
    r = _logged_after_the_clis_set_up(
        f"logging.getLogger('smapctl').warning('stopped by SIGINT after step 3 (continue: {command})')\n",
        FORCE_COLOR="1",
        COLUMNS="40",
    )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", r.stderr)
    assert "\x1b[" in r.stderr and plain == f"WARNING  stopped by SIGINT after step 3 (continue: {command})\n"


def test_a_warning_naming_a_folder_whose_name_is_not_utf8_shows_its_bytes(tmp_path):
    """A warning of the command's log naming a folder named in Latin-1 (`data\xe9`: images beside its class
    folders) wrote the byte as `\\udce9` (stderr's backslashreplace), where the result and error lines
    naming it write `\\xe9`; on a terminal too (rich's handler)."""
    data = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"data\xe9"))
    for name in ("a/1.png", "b/2.png", "loose.png"):
        os.makedirs(os.path.dirname(os.path.join(data, name)), exist_ok=True)
        Image.new("RGB", (8, 8)).save(os.path.join(data, name))
    calls = (
        "from smapctl.data.folder import ImageFolderDataset\n"
        f"ImageFolderDataset({data!r})\n"
        "logging.getLogger('a.library').warning('a line\\nof another library')\n"
    )
    shown = f"{tmp_path}/data\\xe9: 1 image(s) beside its class folders, in none, left out: loose.png"
    r = _logged_after_the_clis_set_up(calls)
    assert r.stderr.splitlines() == [f"WARNING {shown}", "WARNING a line", "of another library"], r.stderr
    r = _logged_after_the_clis_set_up(calls, FORCE_COLOR="1", COLUMNS="400")
    assert f"WARNING  {shown}\n" in re.sub(r"\x1b\[[0-9;]*m", "", r.stderr), r.stderr


def test_matplotlib_says_nothing_of_its_font_cache():
    """The first `evaluate` or `cross-recon` on a machine (each CI run) printed matplotlib's "INFO generated
    new fontManager" among its own lines."""
    r = _logged_after_the_clis_set_up(
        "logging.getLogger('matplotlib.font_manager').info('generated new fontManager')\n"
        "logging.getLogger('matplotlib.font_manager').warning('a font it cannot read')\n"
    )
    assert r.stderr.splitlines() == ["WARNING a font it cannot read"], r.stderr


def test_sample_help_lists_the_choices(capsys):
    """`--method` and `--cfg-schedule` showed `<str>`; their values were in the prose only."""
    code, out, _ = run_cli(capsys, "sample", "--help")
    assert code == 0
    assert "<euler|heun>" in out and "<constant|linear>" in out


def test_a_dry_run_warns_of_a_dataset_that_is_not_there(tmp_path, capsys):
    """`--dry-run` of a recipe whose data.dataset (or data.val_dataset) is missing said nothing; the run
    then stopped at it."""
    recipe = ROOT / "recipes/demo/tokenizer.yaml"
    code, out, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run")
    assert code == 0 and "parameters:" in out and "WARNING" not in err  # digits: embedded
    (tmp_path / "train").mkdir()
    for sets, key, missing in (
        ([f"data.dataset={tmp_path / 'nope'}"], "data.dataset", tmp_path / "nope"),
        (
            [f"data.dataset={tmp_path / 'train'}", f"data.val_dataset={tmp_path / 'v'}"],
            "data.val_dataset",
            tmp_path / "v",
        ),
    ):
        code, out, err = run_cli(
            capsys, "train-tokenizer", recipe, "--dry-run", *(f"--set={s}" for s in sets)
        )
        assert code == 0 and "parameters:" in out
        assert f"WARNING {key}: '{missing}' is neither an embedded dataset" in " ".join(err.split())
    # Both missing: both said (it said the first only).
    sets = [f"--set=data.dataset={tmp_path / 'nope'}", f"--set=data.val_dataset={tmp_path / 'v'}"]
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", *sets)
    said = " ".join(err.split())
    assert code == 0 and "WARNING data.dataset: " in said and "WARNING data.val_dataset: " in said
    # What training checks of the classes before any image is read: the ImageNet layout, and as many
    # classes as the model has (a dry run passed both, the run stopped at them in seconds).
    train = f"--set=data.dataset={tmp_path / 'train'}"
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", train)
    assert code == 0 and "WARNING data.dataset: " in err and "no class sub-folders" in err
    for c in range(4):
        (tmp_path / "train" / f"c{c}").mkdir()
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", train)
    said = " ".join(err.split())
    assert (
        code == 0 and f"WARNING model.num_classes: the recipe says 10 but {tmp_path / 'train'} has 4" in said
    )
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", train, "--set=model.num_classes=4")
    # The classes fit; the images are listed as training lists them: there are none yet.
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert code == 0 and warnings == [
        f"WARNING data.dataset: {tmp_path / 'train'}: no image files in its class folders"
    ]
    for c in range(4):  # the run stops at it with the same words (before any training)
        Image.new("RGB", (8, 8), (c, c, c)).save(tmp_path / "train" / f"c{c}" / "0.png")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, train, "-o", tmp_path / "run")
    assert code == 1 and "error: model.num_classes: the recipe says 10 but" in " ".join(err.split())
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--dry-run", "--set=data.dataset=photos")
    assert code == 0 and "the recipe says 10 but photos has" in " ".join(err.split())
    # A generator's latents.dataset (the images it tokenizes), embedded with its split or a folder.
    generator = ROOT / "recipes/demo/generator.yaml"
    for spec, warned in (("digits:val", False), (tmp_path / "train", False), (tmp_path / "nope", True)):
        code, out, err = run_cli(
            capsys, "train-generator", generator, "--dry-run", f"--set=latents.dataset={spec}"
        )
        assert code == 0 and "parameters:" in out
        said = f"WARNING latents.dataset: '{spec}' is neither an embedded dataset" in " ".join(err.split())
        assert said == warned and (warned or "WARNING" not in err), spec


def test_train_and_reproduce_take_o_for_out(capsys):
    """`-o` is `--out` in every command that writes (train-tokenizer, train-generator and reproduce mini
    took only `--out`)."""
    for command in (("train-tokenizer",), ("train-generator",), ("reproduce", "mini")):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and re.search(r"--out +-o |-o, --out ", out), command  # boxed, or plain (narrow)


def test_help_shows_flags_without_a_value(capsys):
    """typer 0.29 wrote `--overwrite <bool>` as if the flag took a value (`--overwrite true` then read
    `true` as an input); options that take one keep their type."""
    commands = [(), ("reproduce", "mini")] + [
        (c,) for c in ("train-tokenizer", "train-generator", "sample", "tokenize", "decode", "cross-recon")
    ]
    for command in [*commands, ("evaluate",)]:
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and "<bool>" not in out, command
    code, out, _ = run_cli(capsys, "sample", "--help")
    assert re.search(r"--overwrite +Replace", out) and re.search(r"--per-class +<int", out)


def test_set_shows_what_it_takes(capsys):
    """`--set` showed Python's `<list[str]>` as what it takes."""
    for command in ("train-tokenizer", "train-generator"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and "list[str]" not in out and re.search(r"--set +KEY=VALUE", out), command


def test_a_path_too_long_for_the_system_is_one_line(tmp_path, capsys):
    """A file name over the system's limit was an OSError traceback wherever a path is first looked at
    (`sample --checkpoint`, `evaluate --samples`, a recipe), and nothing may be left behind."""
    long = "x" * 5000
    for args in (
        ("sample", "-o", tmp_path / "s", "--checkpoint", long),
        ("evaluate", "--samples", long, "--out", tmp_path / "e"),
        ("train-tokenizer", tmp_path / long),
    ):
        code, _, err = run_cli(capsys, *args)
        assert code == 1 and "Traceback" not in err, args
        [line] = error_lines(err)
        assert re.search(r"\.\.\.x{40} \(50\d\d characters\): file name too long$", line) and len(line) < 200
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ("tokenize", "{image}", "--checkpoint", "{tok}", "-o", "{tmp}/c.pt", "--batch-size"),
        ("evaluate", "--checkpoint", "{tok}", "--no-semantic", "-o", "{tmp}/e", "--batch-size"),
        ("sample", "--checkpoint", "{tmp}/gen", "-o", "{tmp}/s", "--steps"),
        ("train-tokenizer", "{tok}/recipe.yaml", "-o", "{tmp}/run", "--dry-run", "--max-steps"),
        ("reproduce", "mini", "--quick", "--work", "{tmp}/w", "--threads"),
    ],
)
def test_an_integer_option_of_2_to_the_63_is_a_usage_error(args, tiny_kl_tokenizer, tmp_path, capsys):
    """`--batch-size 9223372036854775808` (2^63) passed the option's range and overflowed in a DataLoader
    (tokenize, evaluate), `--steps` in torch.linspace, `--threads` in torch.set_num_threads: tracebacks."""
    image = tmp_path / "3" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (16, 16), "white").save(image)
    given = [a.format(image=image, tok=tiny_kl_tokenizer, tmp=tmp_path) for a in args]
    for value in (2**63, 10**30):
        code, _, err = run_cli(capsys, *given, value)
        flat = " ".join(err.replace("│", " ").split())
        assert code == 2 and "Traceback" not in err, err
        assert f"Invalid value for '{args[-1]}': Input should be less than 2^63 (9223372036854775808)" in flat
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_a_generator_dry_run_checks_a_tokenizer_given_as_training_finds_it(
    tiny_kl_tokenizer, tmp_path, capsys
):
    """A copied checkpoint (any name) or a run's checkpoints/ folder was "no trained tokenizer yet" to the
    dry run, which skipped the check that training then failed."""
    from smapctl.train import checkpoint as ckpt

    kept = tmp_path / "kept"
    shutil.copytree(ckpt.latest_checkpoint(tiny_kl_tokenizer), kept)
    recipe = ROOT / "recipes/demo/generator.yaml"
    for where in (kept, tiny_kl_tokenizer / "checkpoints", tiny_kl_tokenizer):
        code, _, err = run_cli(
            capsys, "train-generator", recipe, "--dry-run", "--set", f"latents.tokenizer={where}"
        )
        assert code == 1, where
        [line] = error_lines(err)
        assert "model.num_tokens: is 16 but the tokenizer has 8" in line and "no trained tokenizer" not in err


def test_an_error_line_is_one_line_with_its_brackets_as_written(capsys):
    """A path error naming a file with a line break in its name (legal on POSIX) is one line."""
    from smapctl.cli.process import _print_error

    _print_error("a\nb [x]: no such file")
    assert capsys.readouterr().err == "error: a\\nb [x]: no such file\n"


def test_a_result_line_is_one_line_with_its_brackets_as_written(capsys):
    """A result naming a path with a line break in it stays one line, as error lines do."""
    from smapctl.cli.process import say

    say("panel: a\nb [c].png")
    assert capsys.readouterr().out == "panel: a\\nb [c].png\n"


def test_the_path_error_line_names_both_paths_and_skips_descriptors():
    """An OSError of a file descriptor (an int) broke the handler itself; os.replace's destination was
    not named."""
    from smapctl.errors import path_error

    assert path_error(OSError(9, "Bad file descriptor", 5)) is None
    assert (
        path_error(OSError(13, "Permission denied", "a.tmp", None, "b.png"))
        == "a.tmp -> b.png: permission denied"
    )
    assert path_error(OSError(2, "No such file or directory", b"x")) == "x: no such file or directory"
    assert path_error(OSError("no errno")) is None


def test_columns_0_is_no_width_and_errors_are_said(tmp_path):
    """COLUMNS=0 (no width to Python's shutil) was a width of 0 to rich, which printed nothing: a missing
    token file exited 1 and a missing recipe 2, both without a word (results went missing too)."""
    env = subprocess_env() | {"COLUMNS": "0"}
    missing = smapctl("decode", tmp_path / "missing.pt", "-o", tmp_path / "out", env=env)
    assert missing.returncode == 1 and "missing.pt" in " ".join(error_lines(missing.stderr)), missing.stderr
    usage = smapctl("train-tokenizer", tmp_path / "missing.yaml", env=env)
    assert usage.returncode == 2 and "missing.yaml" in usage.stderr, usage.stderr


def test_a_current_folder_removed_is_one_line_and_help_still_works(monkeypatch, tmp_path, capsys):
    """Run in a folder removed after the shell went into it, a command died in torch's import with "Intel
    oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" and status 2; --help needs no folder."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    code, _, err = run_cli(capsys, "decode", tmp_path / "codes.pt", "-o", tmp_path / "out")
    assert code == 1 and error_lines(err) == [
        "error: the current folder no longer exists (removed after the shell went into it): cd into a"
        " folder that exists and run the command again"
    ], err
    code, out, _ = run_cli(capsys, "decode", "--help")
    assert code == 0 and "Usage" in out


def test_no_folder_for_temporary_files_is_one_line_naming_tmpdir(monkeypatch, tmp_path, capsys):
    """In a container with a read-only root file system (no writable $TMPDIR, /tmp, /var/tmp or current
    folder) torch's import asks `tempfile` for a folder: every command but --help stopped with a
    FileNotFoundError traceback that named no path and nothing to set."""
    import tempfile

    import smapctl.recipe

    monkeypatch.setattr(tempfile, "tempdir", None)  # (found once, then kept: found again here)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "read-only")])

    def imports_torch_compile(*args, **kwargs):  # as `import torchvision` does, torch._dynamo's cache dir
        return tempfile.gettempdir()

    monkeypatch.setattr(smapctl.recipe, "load_tokenizer_recipe", imports_torch_compile)
    code, _, err = run_cli(capsys, "train-tokenizer", tmp_path / "r.yaml", "--dry-run")
    assert code == 1 and "Traceback" not in err, err
    [line] = error_lines(err)
    assert line.startswith("error: no usable temporary directory found in [")
    assert str(tmp_path / "read-only") in line and line.endswith("set TMPDIR to a folder you may write")


def test_another_process_of_a_launcher_speaks_on_a_line_of_its_own(monkeypatch, capsys):
    """Under a launcher: a process other than the main one starts its error on a new line (it was glued to
    the main process's progress bar) and leaves torch's DataLoader worker-count warning to the main one
    (every process printed it); the command an interrupted launched run prints says to launch it again."""
    import warnings
    from types import SimpleNamespace

    from smapctl import cli
    from smapctl.cli import process
    from smapctl.data.images import BadImageError
    from smapctl.train.runner import TrainingRun

    def meets_a_bad_image():  # an error of this process's own (another's images are others)
        raise BadImageError("data/3/bad.png", "not an image")

    monkeypatch.setattr(cli, "app", meets_a_bad_image)
    for other, lead, action in ((True, "\nerror: ", "ignore"), (False, "error: ", "once")):
        monkeypatch.setattr(process, "not_main_process", lambda other=other: other)
        with warnings.catch_warnings():
            with pytest.raises(SystemExit):
                cli.main()
            said = [f[0] for f in warnings.filters if f[1] is not None and "This DataLoader" in f[1].pattern]
        assert said[0] == action
        assert capsys.readouterr().err.startswith(f"{lead}data/3/bad.png: not an image")
    run = SimpleNamespace(
        kind="tokenizer", run_dir=Path("runs/x"), accelerator=SimpleNamespace(num_processes=2)
    )
    assert TrainingRun.resume_command(run).endswith("--resume, launched again with 2 processes")
    run.accelerator.num_processes = 1
    assert TrainingRun.resume_command(run).endswith("--out runs/x --resume")


EMPTY_PATHS = {
    "train --out": ("train-tokenizer", ROOT / "recipes/demo/tokenizer.yaml", "--out", "", "--dry-run"),
    "train recipe": ("train-generator", ""),
    "sample -o": ("sample", "-o", "", "--checkpoint", "gen"),
    "sample --checkpoint": ("sample", "-o", "out", "--checkpoint", ""),
    "sample --tokenizer": ("sample", "-o", "out", "--tokenizer", ""),
    "tokenize input": ("tokenize", "a.png", "", "-o", "codes.pt"),
    "tokenize -o": ("tokenize", "a.png", "-o", ""),
    "decode": ("decode", "codes.pt", "-o", ""),
    "cross-recon": ("cross-recon", "a.png", ""),
    "evaluate --samples": ("evaluate", "--samples", ""),
    "evaluate --out": ("evaluate", "--samples", "s", "--out", ""),
    "evaluate --ref": ("evaluate", "--samples", "s", "--ref", ""),
    "reproduce --work": ("reproduce", "mini", "--work", ""),
}


@pytest.mark.parametrize("args", EMPTY_PATHS.values(), ids=EMPTY_PATHS)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args, tmp_path, capsys, monkeypatch):
    """`--out "$RUN"` with RUN unset: an empty path read as `.`, and a run or samples went into the
    current folder (or an error spoke of `.`)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "an empty path (an unset variable?)" in err, err
    assert not any(tmp_path.iterdir())


def test_a_tilde_the_shell_left_is_the_home_folder(tiny_vq_tokenizer, tmp_path, capsys, monkeypatch):
    """`--out=~/codes.pt` (the shell expands `~` only at a word's start): the inputs were read from the
    home folder, but the token file, the PNGs and the panel went into a folder named `~` in the current
    folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    (home / "3").mkdir(parents=True)
    work.mkdir()
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        Image.new("RGB", (16, 16), colour).save(home / "3" / f"{name}.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    checkpoint = ("--checkpoint", tiny_vq_tokenizer)
    for args in (
        ("tokenize", "~/3", "--out=~/codes.pt", *checkpoint),
        ("decode", "~/codes.pt", "--out=~/decoded"),
        ("cross-recon", "~/3/a.png", "~/3/b.png", "--out=~/panel.png", *checkpoint),
    ):
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
    assert (home / "codes.pt").is_file() and (home / "panel.png").is_file()
    assert sorted(p.name for p in (home / "decoded").glob("*.png")) == ["a.png", "b.png"]
    assert not any(work.iterdir())


def test_ctrl_c_while_a_launched_process_imports_torch_is_a_quiet_exit(capsys, monkeypatch):
    """Under a launcher the first thing a command does is import torch (to learn its rank: seconds); a
    Ctrl-C then gave a traceback from every process, where one process exits quietly with 130."""
    from smapctl.cli import process

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(process, "not_main_process", interrupted)
    code, out, err = run_cli(capsys, "sample", "-o", "x")
    assert code == 130 and "Traceback" not in err and not out


def test_an_environment_variable_accelerate_cannot_read_is_one_line_naming_it(
    monkeypatch, capsys, tmp_path, tmp_path_factory
):
    """accelerate's ValueError at a variable of its own or a launcher's ("invalid truth value maybe", "invalid
    literal for int() with base 10: 'two'") was a traceback that named the value, not the variable."""
    monkeypatch.delenv("SMAPCTL_DEBUG", raising=False)
    image = tmp_path_factory.mktemp("input") / "a.png"  # tokenize joins the launch once it has images
    Image.new("RGB", (8, 8)).save(image)
    for name, value, args in (
        ("RANK", "x", ("sample", "-o", tmp_path / "s")),  # read before the command, to quiet the others
        ("WORLD_SIZE", "two", ("tokenize", image, "-o", tmp_path / "c.pt")),
    ):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            code, _, err = run_cli(capsys, *args)
        assert code == 1 and "Traceback" not in err, name
        assert error_lines(err) == [
            f"error: environment variable {name}={value!r}: accelerate reads it and takes an integer; unset "
            "it or set it so"
        ]
    from accelerate.utils.environment import parse_flag_from_env

    from smapctl.launch import environment_problem

    monkeypatch.setenv("ACCELERATE_USE_CPU", "Maybe")  # read as training's Accelerator is made
    with pytest.raises(ValueError) as raised:
        parse_flag_from_env("ACCELERATE_USE_CPU")
    assert environment_problem(raised.value) == (
        "environment variable ACCELERATE_USE_CPU='Maybe': accelerate reads it and takes true or false "
        "(1 or 0, yes or no); unset it or set it so"
    )
    assert environment_problem(ValueError("invalid truth value maybe")) is None  # not raised in accelerate
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args", EMPTY_PATHS.values(), ids=EMPTY_PATHS)
def test_a_path_under_the_home_of_no_such_user_is_a_usage_error(args, tmp_path, capsys, monkeypatch):
    """`~name/...` of a user that is not there (the shell leaves it as typed) was pathlib's RuntimeError
    traceback, "Could not determine home directory", where the path was first expanded (`--out`, `--data`,
    `--samples`, `--tokenizer`, an input of tokenize), and elsewhere an error of a file not found."""
    monkeypatch.chdir(tmp_path)
    path = "~no-such-user-of-smapctl/x"
    code, _, err = run_cli(capsys, *(path if a == "" else a for a in args))
    assert code == 2 and "Traceback" not in err
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", err).split())  # Typer's usage box, its lines joined
    assert f"{path}: no home folder for its ~no-such-user-of-smapctl (no such user?)" in said, err
    assert not any(tmp_path.iterdir())


# A KeyboardInterrupt that ended an exec() of a string (as a SIGTERM raised while a dataclass was being made)
# and was caught, left as the last such exec of the command.
INTERRUPTED_EXEC = """\
import smapctl.cli as cli

command = cli.entry


def entry():
    try:
        command()
    finally:
        try:
            exec("raise KeyboardInterrupt")
        except KeyboardInterrupt:
            pass


cli.entry = entry
"""


def test_an_interrupt_caught_in_an_exec_leaves_the_exit_status_of_python_m_smapctl(tmp_path):
    """Under `python -m` (as torchrun runs it) CPython killed the process with SIGINT after such an
    exec: a command stopped by SIGTERM in its first seconds said so and exited 130, not 143."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPTED_EXEC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "smapctl", "sample", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0
