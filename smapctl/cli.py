"""The `smapctl` command line: one function per subcommand; each parses, loads, and calls in.

Heavy imports (torch, the models) happen inside the commands so that `smapctl --help` is instant.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import platform
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from smapctl.config import INT_LIMIT, SEED_MAX


def _a_spawned_worker() -> bool:
    """True in a process that multiprocessing's `spawn` start method (the default on macOS and Windows) is
    setting up from a smapctl command, a DataLoader worker: it runs the `smapctl` script again as its first
    step, importing this module, before it takes its work (torch first: seconds)."""
    import multiprocessing.process

    return bool(getattr(multiprocessing.process.current_process(), "_inheriting", False))


def entry() -> None:
    """The `smapctl` program (its console script, `python -m smapctl`): `main`, then the process's exit
    kept from SIGTERM and SIGINT. Once a command has ended, its files complete and its exit status decided,
    one of them in the tenth of a second the interpreter then takes to shut down (torch's modules freed)
    ended the process with it (-15) instead of that status: a job that had finished read as killed. A
    second one during the exit functions still ends the process (a shutdown that hangs); once they have run,
    both are ignored (`_deaf_as_the_modules_are_freed`). In-process callers (the tests) call `main`, which
    puts their handlers back."""
    try:
        main()
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signum) is not signal.SIG_IGN:  # (ignored: by the shell, or `main`)
                    signal.signal(signum, _the_second_ends_it)


def _the_second_ends_it(signum, frame) -> None:
    """A signal as the process exits, after its command: let go; the next one of its kind ends it."""
    signal.signal(signum, signal.SIG_DFL)


def _deaf_as_the_modules_are_freed() -> None:
    """The last exit function (registered as this module is imported, before torch is): past it the
    interpreter puts the default handlers back (`_PySignal_Fini`) and then frees its modules, for a second
    with torch's, where a SIGINT or SIGTERM ended a finished command with it (-2, -15). Ignored from here,
    unless one came since the command ended (`_the_second_ends_it` let go): the next still ends it."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is _the_second_ends_it:
            signal.signal(signum, signal.SIG_IGN)


atexit.register(_deaf_as_the_modules_are_freed)


if _a_spawned_worker():
    # A Ctrl-C (to the whole process group, as a terminal sends it; on Windows to the console) while it
    # imported torch killed it with a traceback, and a training with it, before its checkpoint. The
    # command's own process decides what a signal does and stops its workers itself; forked workers start
    # with both blocked (`data.datasets.deaf_workers`) and do not come here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _FlagsTakeNoValue:
    """`--help` shows a flag (`--overwrite`) bare: typer 0.29 writes `<bool>` beside it as if it took a
    value, and `--overwrite true` then read `true` as an input path."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


class _Command(_FlagsTakeNoValue, TyperCommand):
    def parse_args(self, ctx, args):
        """An integer option of 2^63 or more is refused as a value below its `min` is (a usage error):
        `--batch-size` or `--steps` 2^63 passed and overflowed in a DataLoader or torch, a traceback."""
        rest = super().parse_args(ctx, args)
        for param in self.get_params(ctx):
            value = ctx.params.get(param.name)
            if type(value) is int and not -INT_LIMIT <= value < INT_LIMIT:
                raise typer.BadParameter(
                    f"Input should be less than 2^63 ({INT_LIMIT})", ctx=ctx, param=param
                )
        return rest

    def invoke(self, ctx):
        """The command's own output is its own in every process (`_click_output_from_the_main_process`
        quiets what Click prints in the others)."""
        if not _QUIETED:
            return super().invoke(ctx)
        quiet = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _QUIETED[-1]
        try:
            return super().invoke(ctx)
        finally:
            sys.stdout, sys.stderr = quiet


app = typer.Typer(
    cls=_Group,
    name="smapctl",
    help="Train SMAP semantic-aware 1D image tokenizers and CARD generators; tokenize, sample, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# No emoji codes: `digits:train:` or a path with `:name:` in it must print as written.
console = Console(emoji=False, markup=False)  # results name paths, which may hold `[...]`
err_console = Console(stderr=True, emoji=False)


def _say(text: str) -> None:
    """One line of a command's result on stdout, as it is: a path in it may hold `[...]` (read as markup, it
    was cut out of the line or stopped the command with a MarkupError traceback once its work was done) or a
    line break (written as \\n, as errors write it); not wrapped at a pipe's 80 columns."""
    from smapctl.errors import one_line

    console.print(one_line(text), highlight=False, soft_wrap=True)


WORKERS_PER_CPU = 4  # tokenize --workers: image-reading processes beyond this only compete for the CPUs


def _path(value) -> Path:
    """A path option's or argument's value; an empty one is refused (`--out "$RUN"` with RUN unset): it
    read as `.`, and a run or samples went into the current folder. A `~` the shell left as typed (it
    expands one only at the start of a word: `--out=~/codes.pt`) is the home folder, as in the inputs,
    which are read from there: a token file, PNGs, a panel or a report went into a folder named `~` in
    the current folder (which `rm -r ~` then takes for the home folder)."""
    if isinstance(value, Path):  # a default
        return value
    return Path(os.path.expanduser(_named(value)))


def _named(value: str) -> str:
    """A run, checkpoint, folder or file named by a string option (`--checkpoint`, `--tokenizer`, an
    input of `tokenize`): refused empty, as `_path` is."""
    if value == "":
        raise typer.BadParameter("an empty path (an unset variable?); `.` names the current folder")
    if value.startswith("~") and os.path.expanduser(value) == value:  # (the shell left it as it was)
        # `~name/...` of no such user: pathlib's "Could not determine home directory" traceback wherever
        # the path was first expanded (`--out`, `--data`, `--samples`, `--tokenizer`, an input of tokenize).
        raise typer.BadParameter(f"{value}: no home folder for its {value.split('/')[0]} (no such user?)")
    return value


_PATH = {"parser": _path, "metavar": "<path>"}  # metavar: as Typer shows a Path without a parser
_NAMED = {"parser": _named}
_PATH_ARG = {"parser": _path}  # (an argument's metavar is its name)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file, e.g. recipes/vq_s_128.yaml.", **_PATH_ARG)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set train.batch_size=64 (repeatable).",
    ),
]

RunOutOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--out",
        help="Run folder (default: runs/<name>, the recipe file's name, after its folder's unless that "
        "is recipes/: runs/kl_b_128 for recipes/kl_b_128.yaml, runs/demo-generator for "
        "recipes/demo/generator.yaml, runs/exp-my for exp/my.yaml).",
        **_PATH,
    ),
]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-steps",
        min=1,
        help="Train to step N instead of the recipe's train.max_steps (a smoke run; the learning-rate "
        "schedule follows N). With --resume it is the total, not N more.",
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the run's newest checkpoint.")]
InitFromOpt = Annotated[
    str | None,
    typer.Option(
        "--init-from",
        help="Start from the weights of this run (its newest checkpoint) or checkpoint, of the recipe's "
        "model (fine-tuning): a new run at step 0 with its own optimizer, schedule and data order.",
        **_NAMED,
    ),
]
# None when not given: `--init-weights ema` without --init-from is refused as `model` is (a forgotten
# --init-from trained from random weights without a word).
InitWeightsOpt = Annotated[
    Literal["ema", "model"] | None,
    typer.Option(
        "--init-weights",
        help="The --init-from checkpoint's EMA weights or its raw model's (default: ema; only with"
        " --init-from).",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Build the model and print a summary and `parameters: N`; trains nothing and reads no image "
        "(a dataset that is not there is warned of).",
    ),
]


def _overrides(set_: list[str] | None, max_steps: int | None) -> list[str]:
    """The `--set` overrides, plus `--max-steps` as the override it is."""
    return [*(set_ or []), *([f"train.max_steps={max_steps}"] if max_steps is not None else [])]


def _version_line() -> str:
    """smapctl's version with torch's and Python's, for bug reports; read from the installed packages'
    metadata, without importing torch (so that `--version` is as quick as `--help`)."""
    from importlib.metadata import PackageNotFoundError, version

    from smapctl import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"smapctl {__version__} (torch {torch_version}, Python {platform.python_version()})"


def _show_version(value: bool) -> None:
    if value:
        print(_version_line())
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show full tracebacks for user errors too; SMAPCTL_DEBUG=1 does the same."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print smapctl's version (with torch's and Python's) and exit.",
        ),
    ] = False,
) -> None:
    if debug:
        os.environ["SMAPCTL_DEBUG"] = "1"
    from smapctl.runtime import tune_host_allocator

    tune_host_allocator()  # keep freed activations in the process: no page faults every step


@app.command("train-tokenizer", cls=_Command)
def train_tokenizer(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: RunOutOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    init_from: InitFromOpt = None,
    init_weights: InitWeightsOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train a SMAP tokenizer from a recipe (paper section 3.2, appendix A)."""
    from smapctl.recipe import load_tokenizer_recipe

    _setup_logging()  # before the recipe's warnings, so the other processes of a launcher keep quiet
    init_weights = _check_init_options(init_from, init_weights, resume)
    # A resumed run's recipe was accepted when it started (its recipe.yaml keeps --max-steps as
    # train.max_steps, with a GAN that starts later in a paper recipe: the printed resume command).
    cut_short = max_steps is not None or resume
    cfg = load_tokenizer_recipe(recipe, _overrides(set_, max_steps), cut_short=cut_short)
    _train("tokenizer", cfg, recipe, out, max_steps, resume, init_from, init_weights, dry_run)


@app.command("train-generator", cls=_Command)
def train_generator(
    recipe: Annotated[
        Path, typer.Argument(help="Generator recipe YAML, e.g. recipes/card_b.yaml.", **_PATH_ARG)
    ],
    set_: SetOpt = None,
    out: RunOutOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    init_from: InitFromOpt = None,
    init_weights: InitWeightsOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train a generator on a tokenizer's tokens: CARD (KL/SoftVQ latents) or LlamaGen/MaskGIT (VQ)."""
    from smapctl.recipe import load_generator_recipe

    _setup_logging()  # before the recipe's warnings, so the other processes of a launcher keep quiet
    init_weights = _check_init_options(init_from, init_weights, resume)
    cfg = load_generator_recipe(recipe, _overrides(set_, max_steps))
    _train("generator", cfg, recipe, out, max_steps, resume, init_from, init_weights, dry_run)


def _train(
    kind: str, cfg, recipe: Path, out, max_steps, resume: bool, init_from, init_weights, dry_run
) -> None:
    """train-tokenizer's and train-generator's work once the recipe is loaded: its warnings, the checks,
    then the dry run, or the training in its run folder and the final checkpoint's line."""
    from smapctl.recipe import (
        run_folder,
        warn_if_the_ema_outlasts_the_run,
        warn_if_the_warmup_outlasts_the_run,
        warn_of_unusable_sampling,
    )

    if max_steps is not None and not resume:  # (said as the run started; its advice is for a new one)
        warn_if_the_ema_outlasts_the_run(cfg.train, kind)
        warn_if_the_warmup_outlasts_the_run(cfg.train)
    if kind == "generator":
        warn_of_unusable_sampling(cfg)
    _check_the_batch_splits(cfg.train)
    if dry_run:
        dry = _dry_run_tokenizer if kind == "tokenizer" else _dry_run_generator
        dry(cfg, recipe, out, resume, init_from, init_weights)
        return
    if kind == "tokenizer":
        from smapctl.train.tokenizer import train_tokenizer as run_training
    else:
        from smapctl.train.generator import train_generator as run_training

    # A run folder it made is removed again when it fails before training (`TrainingRun.close`).
    folder = run_folder(recipe, out, resume)
    with _stopping_together():  # (a generator's token cache being made)
        final = run_training(cfg, folder, resume=resume, init_from=init_from, init_weights=init_weights)
    _report_checkpoint(final)


@app.command("sample", cls=_Command)
def sample(
    out: Annotated[
        Path,
        typer.Option(
            "-o",
            "--out",
            help="Folder for the PNGs, grid.png, sampling.json (what drew them) and (with --npz) "
            "samples.npz: a new or empty one, or an earlier sampling run's with --overwrite (other images "
            "in it are refused).",
            **_PATH,
        ),
    ],
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Generator run or checkpoint (default: the demo run).", **_NAMED),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="Where the tokenizer the generator was trained on is now, if it moved (run or checkpoint "
            "folder; default: where training recorded it, or the same place beside the generator's run). "
            "Refused unless it holds the very weights the generator was trained on.",
            **_NAMED,
        ),
    ] = None,
    classes: Annotated[
        str,
        typer.Option(
            "--classes",
            help="Class names or ids, comma-separated, or 'all' (one named twice: once). A name first: "
            "'2' is the class named 2 if there is one, else id 2.",
        ),
    ] = "all",
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Images per class.")] = 4,
    cfg: Annotated[
        float | None, typer.Option("--cfg", help="Guidance scale (default: the recipe's).")
    ] = None,
    cfg_schedule: Annotated[
        Literal["constant", "linear"] | None,
        typer.Option("--cfg-schedule", help="Guidance over the token positions (default: the recipe's)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Flow-matching steps (CARD) or decoding steps (MaskGIT); default: the recipe's.",
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Sampling temperature (default: the recipe's).")
    ] = None,
    method: Annotated[
        Literal["euler", "heun"] | None,
        typer.Option("--method", help="CARD: the flow ODE solver (default: the recipe's)."),
    ] = None,
    choice_temperature: Annotated[
        float | None,
        typer.Option(
            "--choice-temperature",
            help="MaskGIT: temperature of the choice of tokens to keep at each step (default: the recipe's).",
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=0,
            help="LlamaGen: sample among the k likeliest tokens (0 = all; default: the recipe's).",
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            "--top-p",
            help="LlamaGen: sample among the likeliest tokens whose probabilities sum to p "
            "(1 = all; default: the recipe's).",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            help="0 to 2^32 - 1. Same seed, --classes (in the same order), --per-class and --batch-size: "
            "same images on the same kind of device, with 1 or N processes (the noise is drawn batch by "
            "batch; a GPU draws other images than the CPU; on the CPU, with as many threads per process: "
            "torchrun gives each one).",
        ),
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 32,
    npz: Annotated[
        bool,
        typer.Option(
            "--npz",
            help="Also write samples.npz (ADM evaluation format: images as arr_0, their classes as arr_1).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the files of an earlier run in OUT (sample PNGs, grid.png, sampling.json, "
            "samples.npz, and an evaluate metrics.json of them); without it such a folder is refused.",
        ),
    ] = False,
) -> None:
    """Sample class-conditional images from a trained generator (decoded by its tokenizer).

    Under `accelerate launch` or `torchrun` the processes share the batches (one GPU each), with the
    same images as one process."""
    from smapctl.ops.sample import sample_images
    from smapctl.recipe import sampling_value_problem

    _check_guidance(cfg)
    _check_seed(seed)
    numbers = {"temperature": temperature, "choice_temperature": choice_temperature, "top_p": top_p}
    for name, value in numbers.items():  # as a recipe's are checked, before anything is loaded
        problem = sampling_value_problem(name, value)
        if problem is not None:
            raise typer.BadParameter(problem, param_hint=f"--{name.replace('_', '-')}")
    _setup_logging()
    with _stopping_together():
        result = sample_images(
            checkpoint,
            out,
            classes=classes,
            per_class=per_class,
            seed=seed,
            batch_size=batch_size,
            npz=npz,
            overwrite=overwrite,
            tokenizer=tokenizer,
            cfg_scale=cfg,
            cfg_schedule=cfg_schedule,
            steps=steps,
            temperature=temperature,
            method=method,
            choice_temperature=choice_temperature,
            top_k=top_k,
            top_p=top_p,
        )
    if not result.main:  # another process of a launcher: the main one reports
        return
    _say(f"{_images(len(result.files))} in {result.out_dir}; grid: {result.grid}")
    if result.npz is not None:
        _say(f"npz: {result.npz}")


TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="Tokenizer run folder (its newest checkpoint) or checkpoint folder "
        "(default: the demo run, runs/demo-tokenizer).",
        **_NAMED,
    ),
]
WeightsOpt = Annotated[
    Literal["ema", "model"], typer.Option("--weights", help="The EMA weights or the raw model's.")
]
CodesOut = Annotated[
    Path,
    typer.Option(
        "-o",
        "--out",
        help="Token file: .pt or .pth (torch), or .safetensors. With --on-error skip, the images left out "
        "are listed in OUT.skipped.txt.",
        **_PATH,
    ),
]


@app.command("tokenize", cls=_Command)
def tokenize(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (recursive) or glob patterns; or, alone, a built-in dataset as "
            "evaluate --data names it: digits or photos (its val split), or with its split named, "
            "digits:train, digits:val, photos:train, photos:val (a file or folder of that name wins).",
            **_NAMED,
        ),
    ],
    out: CodesOut = Path("codes.pt"),
    checkpoint: TokenizerOpt = None,
    weights: WeightsOpt = "ema",
    label: Annotated[
        str | None,
        typer.Option(
            "--label",
            help="Class name or id of all images (default: from their folder names); a name first: '2' is "
            "the class named 2 if there is one, else id 2.",
        ),
    ] = None,
    prefix: Annotated[
        int | None,
        typer.Option("--prefix", min=0, help="Keep the first k latent tokens, 0..K (default: all K)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 64,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Image-reading processes (each launched process has its own), at most 4 per CPU. Default: "
            "none on the CPU (they would take cores from the encoder; reading inline measured fastest), "
            "min(4, CPUs) with a GPU.",
        ),
    ] = None,
    on_error: Annotated[
        Literal["fail", "skip"],
        typer.Option("--on-error", help="On an unreadable image: stop, or leave it out and report it."),
    ] = "fail",
    precision: Annotated[
        Literal["fp32", "bf16"],
        typer.Option(
            "--precision",
            help="Encoder precision. bf16 (autocast) pays on GPUs and CPUs with bf16 units; a CPU "
            "without them emulates it, many times slower (smapctl warns).",
        ),
    ] = "fp32",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a token file already at -o (without it, refused).")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Go on from the tokens an interrupted run kept in OUT.partial/ (the same images and "
            "settings) instead of encoding them again; without one, start afresh. A run without --resume "
            "refuses to start beside an interrupted one (remove the folder to start again).",
        ),
    ] = False,
) -> None:
    """Encode images to SMAP tokens (indices for VQ, latents for KL/SoftVQ) in one token file.

    A built-in dataset (digits:val) is encoded as evaluate frames it, labelled by its classes and named
    digits/val/<class>/<index>.png, so decode writes a folder per class.

    The work is kept in OUT.partial/ as it goes (every minute and when the run stops); an interrupted run
    goes on with the same command and --resume.

    Under `accelerate launch` or `torchrun` the processes share the batches (one GPU each) and the main
    one writes the token file, the same as one process writes."""
    _setup_logging()  # its progress lines in a log, the files it leaves out (INFO) were not shown
    cpus = os.cpu_count() or 1
    if workers is not None and workers > WORKERS_PER_CPU * cpus:  # 1000 forked processes stalled the host
        raise typer.BadParameter(
            f"at most {WORKERS_PER_CPU * cpus} ({WORKERS_PER_CPU} per CPU; this machine has {cpus})",
            param_hint="--workers",
        )
    from smapctl.ops.tokenize import tokenize_images

    with _stopping_together():
        result = tokenize_images(
            inputs,
            out,
            checkpoint=checkpoint,
            weights=weights,
            label=label,
            prefix=prefix,
            batch_size=batch_size,
            workers=workers,
            on_error=on_error,
            precision=precision,
            overwrite=overwrite,
            resume=resume,
            ends_command=True,
        )
    if not result.main:  # another process of a launcher: the main one reports
        return
    codes = result.codes
    shape = "x".join(map(str, codes.tokens.shape))
    skipped = f", {len(result.skipped)} unreadable skipped" if result.skipped else ""
    n = len(codes.labels)
    resumed = f" ({result.resumed} of them from the interrupted run)" if result.resumed else ""
    rate = f"; {result.images_per_second:.1f} images/s" if result.resumed < n else ""
    _say(
        f"{_images(n)}{resumed} -> {codes.tensor_key} {shape} (prefix {codes.prefix} of "
        f"{codes.num_tokens}) in {result.out}{skipped}{rate}"
    )
    _warn_skipped(result.skip_summary())


@app.command("decode", cls=_Command)
def decode(
    codes: Annotated[Path, typer.Argument(help="Token file written by `smapctl tokenize`.", **_PATH_ARG)],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Folder for the PNGs (mirrors the stored paths).", **_PATH)
    ],
    prefix: Annotated[
        int | None,
        typer.Option("--prefix", min=0, help="Decode from the first k tokens (default: all stored)."),
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            help="The checkpoint folder that made the tokens, if it has moved (default: the one the token "
            "file names), or its run folder (its checkpoint of that name); it must be the very same weights.",
            **_NAMED,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 64,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace PNGs already in OUT (without it they are refused)."),
    ] = False,
) -> None:
    """Decode a token file back to PNG images with the tokenizer that made it."""
    _one_process("decode")
    _setup_logging()
    from smapctl.ops.decode import decode_codes

    result = decode_codes(
        codes,
        out,
        checkpoint=checkpoint,
        prefix=prefix,
        batch_size=batch_size,
        overwrite=overwrite,
        ends_command=True,
    )
    _say(f"{_images(len(result.files))} (k={result.prefix}) in {result.out_dir}")


@app.command("cross-recon", cls=_Command)
def cross_recon(
    image_a: Annotated[
        Path,
        typer.Argument(
            help="First image: a file, or a built-in dataset's image as tokenize names it"
            " (digits/val/3/00026.png; a file of that name wins).",
            **_PATH_ARG,
        ),
    ],
    image_b: Annotated[Path, typer.Argument(help="Second image (as the first).", **_PATH_ARG)],
    out: Annotated[Path, typer.Option("-o", "--out", help="The panel (.png).", **_PATH)] = Path(
        "cross-recon.png"
    ),
    checkpoint: TokenizerOpt = None,
    weights: WeightsOpt = "ema",
    class_a: Annotated[
        str | None,
        typer.Option("--class-a", help="Class name (first) or id of image a (default: its folder name)."),
    ] = None,
    class_b: Annotated[
        str | None,
        typer.Option("--class-b", help="Class name (first) or id of image b (default: its folder name)."),
    ] = None,
    keep_parts: Annotated[
        bool, typer.Option("--keep-parts", help="Also save every image of the panel into OUT_parts/.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the panel (and OUT_parts/ images) of an earlier run."),
    ] = False,
) -> None:
    """Panel of two images: reconstructions, class only (k=0), swapped classes, prefix sweeps."""
    _one_process("cross-recon")
    _setup_logging()
    from smapctl.ops.cross_recon import check_output, cross_reconstruct, write_cross_recon

    check_output(out, (image_a, image_b), keep_parts, overwrite)
    result = cross_reconstruct(
        image_a, image_b, checkpoint=checkpoint, class_a=class_a, class_b=class_b, weights=weights
    )
    files = write_cross_recon(result, out, keep_parts=keep_parts, ends_command=True)
    _say(f"panel: {files[0]}")
    if keep_parts:
        _say(f"{_images(len(files) - 1)} in {files[1].parent}")


@app.command("evaluate", cls=_Command)
def evaluate(
    checkpoint: TokenizerOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Images to reconstruct: digits, photos, digits:train, or an image folder (ImageNet layout); "
            "default: the checkpoint's validation data. With --samples/--generator: the real dataset the "
            "samples imitate: default --ref and semantic classifier (a generator's: its training data).",
            **_NAMED,
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            "--prefix", help="Prefix lengths k, comma-separated, or 'all' (0..K); default 0,1,2,4,..,K."
        ),
    ] = None,
    weights: WeightsOpt = "ema",
    samples: Annotated[
        Path | None,
        typer.Option(
            "--samples",
            help="Score generated images instead: a `smapctl sample` folder or an ADM .npz.",
            **_PATH,
        ),
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option("--generator", help="Score samples drawn now from this generator run.", **_NAMED),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="With --generator: where the tokenizer it was trained on is now, if it moved (as for "
            "`smapctl sample`).",
            **_NAMED,
        ),
    ] = None,
    num: Annotated[
        int | None,
        typer.Option(
            "--num",
            min=1,
            help="With --generator: samples, default 1000 (rounded up to whole classes); "
            "the paper's gFID protocol uses 50000.",
        ),
    ] = None,
    cfg: Annotated[
        float | None, typer.Option("--cfg", help="With --generator: guidance scale (default: the recipe's).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            min=0,
            help="With --generator: sampling seed, 0 to 2^32 - 1 (default 0); with --batch-size 32, the "
            "images `smapctl sample` draws for it (its --per-class: --num over the classes).",
        ),
    ] = None,
    save_npz: Annotated[
        bool, typer.Option("--save-npz", help="With --generator: also write samples.npz (ADM format).")
    ] = False,
    ref: Annotated[
        str | None,
        typer.Option(
            "--ref",
            help="Reference for gFID: a folder, an ADM .npz (its mu and sigma when it has them, as in "
            "guided-diffusion's reference batches, else its arr_0 images; mu and sigma alone do for "
            "gFID, and the semantic scores then compare with --data's images) or a dataset like "
            "digits:train; images are resized to the samples' size. Default: --data.",
            **_NAMED,
        ),
    ] = None,
    fid: Annotated[
        bool,
        typer.Option("--fid", help="rFID vs the originals, or gFID vs --ref (torch-fidelity Inception)."),
    ] = False,
    isc: Annotated[
        bool, typer.Option("--is", help="Inception Score of the reconstructions or samples.")
    ] = False,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            "--inception-weights",
            help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or SMAPCTL_INCEPTION_WEIGHTS); "
            "never downloaded.",
            **_PATH,
        ),
    ] = None,
    semantic: Annotated[
        bool | None,
        typer.Option(
            "--semantic/--no-semantic",
            help="Class accuracy and clf-FD from smapctl's reference classifier (default: digits/photos).",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="At most N images per set (a fixed random subset); with --generator, of the reference "
            "(--num sets how many samples are drawn).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 64,
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            help="Folder for metrics.json, with several prefixes rate_quality.png, with --generator the "
            "samples, and skipped_images.txt when unreadable images were left out (default: <run>/eval; "
            "./eval for --samples).",
            **_PATH,
        ),
    ] = None,
    on_error: Annotated[
        Literal["skip", "fail"],
        typer.Option("--on-error", help="On an unreadable image file: leave it out and report it, or stop."),
    ] = "skip",
) -> None:
    """Score a tokenizer's reconstructions (PSNR, SSIM, rFID, IS per prefix) or generated images (gFID, IS).

    Both with semantic accuracy; writes metrics.json and, for several prefixes, a rate-quality plot."""
    _one_process("evaluate")
    from smapctl.eval.evaluate import evaluate_images

    _check_guidance(cfg)
    _check_seed(seed)
    _setup_logging()
    result = evaluate_images(
        checkpoint=checkpoint,
        data=data,
        prefix=prefix,
        weights=weights,
        samples=samples,
        generator=generator,
        tokenizer=tokenizer,
        num=num,
        cfg_scale=cfg,
        seed=seed,
        save_npz=save_npz,
        ref=ref,
        fid=fid,
        isc=isc,
        inception_weights=inception_weights,
        semantic=semantic,
        limit=limit,
        batch_size=batch_size,
        out=out,
        on_error=on_error,
        ends_command=True,  # a signal from the report on lets the command end as complete
    )
    try:
        _show_evaluation(result)
    except KeyboardInterrupt:  # a second Ctrl-C as the table is shown (the first is held to the end)
        # The report is on disk, complete: the evaluation succeeded (exit 0), whatever the table got to show
        # (as a signal while it is written: `eval.common.report_written`).
        err_console.print(
            f"\n{'SIGTERM' if _terminated else 'SIGINT'} as the scores were shown: they are complete in "
            f"{result.files[0]}",
            style="yellow",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _show_evaluation(result) -> None:
    """An evaluation's scores as a table, its notes, the files written and the images skipped."""
    from smapctl.eval.report import report_notes, report_table

    # Not cropped at the terminal's edge: on one narrower than its scores the table's last column was cut
    # off (`141.4` of 141.412, read as a score); the terminal wraps the line instead.
    console.print(report_table(result.report), crop=False)
    for note in report_notes(result.report):
        _say(note)
    _say(f"metrics: {', '.join(map(str, result.files))}")
    if result.report.get("generator"):  # samples drawn now: say where they are kept
        drawn = [result.report["samples"], *([result.report["npz"]] if result.report.get("npz") else [])]
        _say(f"samples: {', '.join(drawn)}")
    _warn_skipped(result.skip_summary())


reproduce_app = typer.Typer(
    cls=_Group, help="Reproduce the paper's claims at scales this machine can run.", no_args_is_help=True
)
app.add_typer(reproduce_app, name="reproduce")


# reproduce mini's largest budget: the paper's largest (256 KL tokens). 100000 built a tokenizer whose
# attention over some 100,000 tokens would have run for days on 16 px digits (64 pixel values each).
BUDGET_MAX = 256


def _int_list(text: str, option: str, low: int = 0, high: int | None = None) -> tuple[int, ...]:
    """Comma-separated integers, each in low..high (below 2^63 without a `high`: torch holds them)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter("expected comma-separated integers, e.g. 0,1", param_hint=option) from None
    if not values or min(values) < low or max(values) >= (INT_LIMIT if high is None else high + 1):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}, below 2^63"
        raise typer.BadParameter(f"expected comma-separated integers {span}", param_hint=option)
    if len(set(values)) < len(values):  # a seed counted twice would shrink the seed spread to nothing
        raise typer.BadParameter("a value is repeated; each counts once", param_hint=option)
    return values


@reproduce_app.command("mini", cls=_Command)
def reproduce_mini(
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            help="Folder for RESULTS.md, results.json, PNGs (default: the --recipes folder; quick: --work).",
            **_PATH,
        ),
    ] = None,
    recipes: Annotated[
        Path, typer.Option("--recipes", help="Folder of the mini recipes the runs start from.", **_PATH)
    ] = Path("recipes/mini"),
    work: Annotated[
        Path | None,
        typer.Option(
            "--work", help="Run folders, reused by a re-run (default runs/mini, runs/mini-quick).", **_PATH
        ),
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Training seeds, comma-separated.")] = "0,1",
    budgets: Annotated[
        str, typer.Option("--budgets", help=f"Token budgets K, comma-separated, 1 to {BUDGET_MAX}.")
    ] = "4,8,16",
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny 2-step runs to test the pipeline (numbers mean nothing).")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain every run instead of reusing it.")] = False,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="Torch threads (2 may be faster on an idle machine).")
    ] = 1,
) -> None:
    """Tables 2-3 and figures 1, 4, 5 on the digits set, and the tail-drop schedule study."""
    _one_process("reproduce mini")
    cpus = os.cpu_count() or 1
    if threads > cpus:  # more only wait on each other (2^31 or more overflowed torch.set_num_threads)
        raise typer.BadParameter(f"at most {cpus}, this machine's CPUs", param_hint="--threads")
    from smapctl.repro.mini import MiniOptions
    from smapctl.repro.mini import reproduce_mini as run

    opts = MiniOptions(
        out=out,
        recipes=recipes,
        work=work,
        seeds=_int_list(seeds, "--seeds", high=SEED_MAX),  # train.seed's range
        budgets=_int_list(budgets, "--budgets", low=1, high=BUDGET_MAX),  # at least one latent token
        quick=quick,
        fresh=fresh,
        threads=threads,
    )
    _setup_logging()
    from smapctl.repro.runs import RunStopped
    from smapctl.train.signals import GracefulStop

    try:
        result = run(opts)
    except RunStopped as e:
        # A training took the signal (finished its step, saved a checkpoint): the reproduction stops too,
        # writing nothing, and exits as an interrupted program (it went on before, measuring the stopped run).
        err_console.print(
            f"stopped: {e}; nothing written to {opts.out} (the same command continues from the checkpoint)",
            style="red",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(128 + (GracefulStop.last_signal or signal.SIGINT)) from None
    plots = len(result.files) - 2
    _say(f"results: {result.files[0]} ({plots} plots in {opts.out})")


def _train_line(t) -> str:
    """Steps, batch, lr and precision for a dry run; `auto` with what it chooses on this machine, fp16
    flagged on a machine without a GPU (the training would refuse it; a dry run of a GPU recipe on a
    laptop is fine)."""

    from smapctl.devices import training_device
    from smapctl.precision import bf16_units, precision_name, resolve_train_precision

    precision = precision_name(t.precision)
    device = training_device().type  # a Mac trains on mps: its CPU's bf16 units were described
    where = {"cuda": "GPU", "cpu": "CPU"}.get(device, f"{device} device")
    if t.precision == "auto":
        chosen = resolve_train_precision("auto", device, announce=False)
        precision = f"auto ({precision_name(chosen)} on this {where})"
    elif t.precision == "fp16" and device == "cpu":
        precision = "fp16 (needs a GPU: training refuses it on this machine)"
    elif t.precision == "bf16" and bf16_units(device) is False:  # the run warns of it: so does its dry run
        precision = (
            f"bf16 (this {where} has no bf16 units: emulated, many times slower; auto gives fp32 here)"
        )
    return f"{t.max_steps} steps, batch {t.batch_size}, lr {t.lr:g}, {precision}"


def _print_summary(recipe: Path, cfg, summary) -> None:
    from rich.table import Table

    m = cfg.model
    table = Table(title=f"{recipe} ({summary.class_name}, built on {summary.device})", show_header=False)
    for _ in range(2):  # a word wider than its column (a dataset's path) folds instead of being cut with "…"
        table.add_column(overflow="fold")
    table.add_row("image", f"{m.image_size} px, patch {m.patch_size}, {m.num_patches} patches")
    table.add_row("encoder", f"{m.enc_depth} x {m.enc_width} ({m.enc_heads} heads)")
    table.add_row("decoder", f"{m.dec_depth} x {m.dec_width} ({m.dec_heads} heads)")
    table.add_row("latents", f"{m.num_latent_tokens} tokens x {m.token_dim} ({m.regularizer.kind})")
    table.add_row("class condition", f"{m.class_condition} ({m.num_classes} classes)")
    table.add_row("tail dropping", m.tail_drop + (" per sample" if m.tail_drop_per_sample else " per batch"))
    table.add_row("data", cfg.data.dataset)
    t = cfg.train
    table.add_row("train", _train_line(t))
    for name, n in summary.parts.items():
        table.add_row(f"  {name}", f"{n:,}")
    console.print(table)
    print(f"parameters: {summary.parameters}")  # for scripts: plain, unwrapped, no separators


def _report_checkpoint(final) -> None:
    """The run's final checkpoint, printed once (by the main process under torchrun/accelerate). A run
    stopped by SIGINT/SIGTERM (checkpoint saved) then exits with 128 + the signal's number, as the shell
    expects of an interrupted program, so that commands chained after it with `&&` do not run."""
    from smapctl.train.signals import GracefulStop

    if os.environ.get("RANK", "0") == "0":
        _say(f"checkpoint: {final}")
    if GracefulStop.last_signal is not None:
        _leave_processes()  # every process stopped at the same step, after the checkpoint
        raise typer.Exit(128 + GracefulStop.last_signal)


def _warn_skipped(summary: str | None) -> None:
    """The one-line account of the images `--on-error skip` left out (on stderr, after the result)."""
    if summary:
        err_console.print(summary, style="yellow", markup=False, highlight=False, soft_wrap=True)


def _check_guidance(cfg: float | None) -> None:
    """--cfg of `sample` and `evaluate --generator`, as a recipe's sample.cfg_scale is checked."""
    from smapctl.recipe import sampling_value_problem

    problem = sampling_value_problem("cfg_scale", cfg)
    if problem is not None:
        raise typer.BadParameter(f"{problem} (1 = no guidance)", param_hint="--cfg")


def _check_seed(seed: int | None) -> None:
    """--seed of `sample` and `evaluate --generator`: torch takes seeds below 2^32. Checked here rather
    than with the option's `max`, which `--help` showed as `[0<=x<=4294967295]`, squeezing every help
    text of the command into a narrow column."""
    if seed is not None and seed > SEED_MAX:
        raise typer.BadParameter(f"must be from 0 to {SEED_MAX} (2^32 - 1)", param_hint="--seed")


def _dry_run_tokenizer(
    cfg, recipe: Path, out: Path | None, resume: bool, init_from: str | None, init_weights: str
) -> None:
    """`train-tokenizer --dry-run`: the model's summary, then what would stop the training (the data,
    the perceptual network's weights, the run folder, the checkpoint resumed or started from)."""
    from smapctl.models.smap import SMAP
    from smapctl.summary import summarize
    from smapctl.train.runner import tracker_problem

    if _not_main_process():  # under a launcher the summary is printed once
        return
    summary = summarize(lambda: SMAP(cfg.model))
    _print_summary(recipe, cfg, summary)
    from smapctl.data.datasets import class_count_problem, missing_data, training_set_problem
    from smapctl.train.losses import perceptual_weights_problem

    # The images are listed for the training set's checks and again for the resume's.
    with _each_warning_once():
        missing = missing_data(cfg.data)
        classes = class_count_problem(cfg.data, cfg.model.num_classes)  # what training checks first
        listed = None  # the images listed, as training lists them (none read), when the data is there
        if not missing and classes is None:
            listed = training_set_problem(cfg.data, cfg.model.image_size, cfg.train.batch_size)
        folders = {"data.dataset": cfg.data.dataset, "data.val_dataset": cfg.data.val_dataset}
        out_problem = _run_folder_problem(recipe, out, resume, folders)
        problems = (*missing, classes, listed, perceptual_weights_problem(cfg.loss), out_problem)
        problems += (_memory_problem(summary.parameters, cfg.train), tracker_problem(cfg.train.log_with))
        _dry_run_notes(problems=problems)
        if resume:
            _check_the_resume(cfg, "tokenizer", recipe, out)
        if init_from is not None:
            _check_the_init(cfg, "tokenizer", init_from, init_weights, listed=not missing and not classes)


def _dry_run_generator(
    cfg, recipe: Path, out: Path | None, resume: bool, init_from: str | None, init_weights: str
) -> None:
    """`train-generator --dry-run`: the model's summary, then what would stop the training (the
    tokenizer, the latents' images, the run folder, the checkpoint resumed or started from)."""
    from smapctl.summary import summarize
    from smapctl.train.generator import build_generator
    from smapctl.train.runner import tracker_problem

    if _not_main_process():  # under a launcher the summary is printed once
        return
    summary = summarize(lambda: build_generator(cfg, None))
    if resume:  # on the tokenizer the run was trained on, found as training would find it
        from smapctl.recipe import run_folder
        from smapctl.train.generator import tokenizer_of_the_resumed_run

        cfg = tokenizer_of_the_resumed_run(cfg, run_folder(recipe, out, resume))
    unchecked, classes = _check_against_its_tokenizer(cfg)
    m = cfg.model
    _say(
        f"{recipe}: {summary.class_name} {m.depth} x {m.width} over {m.num_tokens} tokens, "
        f"class embedding {cfg.class_embed}, built on {summary.device}"
    )
    for name, n in summary.parts.items():
        console.print(f"  {name}: {n:,}")
    _say(f"train: {_train_line(cfg.train)}")
    print(f"parameters: {summary.parameters}")  # for scripts: plain, unwrapped, no separators
    from smapctl.data.datasets import missing_images

    out_problem = _run_folder_problem(recipe, out, resume, {"latents.dataset": cfg.latents.dataset})
    missing = missing_images("latents.dataset", cfg.latents.dataset)
    memory = _memory_problem(summary.parameters, cfg.train)
    trackers = tracker_problem(cfg.train.log_with)
    _dry_run_notes(problems=(missing, classes, out_problem, memory, trackers), notes=(unchecked,))
    if resume:
        _check_the_resume(cfg, "generator", recipe, out)
    if init_from is not None:
        _check_the_init(cfg, "generator", init_from, init_weights)


def _memory_problem(parameters: int, train) -> str | None:
    """A dry run on a machine without a GPU: what training would warn of a model too large for its memory
    (`runtime.training_memory_problem`)."""
    import torch

    from smapctl.runtime import training_memory_problem

    if torch.cuda.is_available():
        return None
    return training_memory_problem(parameters, train.ema_decay > 0)


def _dry_run_notes(problems=(), notes=()) -> None:
    """A dry run's findings on stderr, one line each (as printed, no markup): `problems` (what training
    would stop at) as warnings (`WARNING ...`, as the log spells them), `notes` as they are; None
    entries are skipped."""
    lines = [f"WARNING {p}" for p in problems if p is not None] + [n for n in notes if n is not None]
    for line in lines:
        err_console.print(line, highlight=False, markup=False, soft_wrap=True)


def _run_folder_problem(recipe: Path, out: Path | None, resume: bool, data: dict) -> str | None:
    """For a dry run of a new run: what the training would refuse of its run folder, which the dry run
    does not make (it passed --out FILE, say): a file or a path under one, a broken symbolic link, a folder
    inside the images it reads (`data`: recipe key -> folder) or inside a run's checkpoints, checkpoints
    there already. (A --resume's folder is `_check_the_resume`'s.)"""
    from smapctl.errors import UserError
    from smapctl.recipe import run_folder
    from smapctl.train import checkpoint as ckpt
    from smapctl.train.resume import holds_checkpoints
    from smapctl.train.run_folder import refuse_run_in_data

    if resume:
        return None
    run_dir = run_folder(recipe, out, resume)
    try:
        refuse_run_in_data(run_dir, data)
    except UserError as e:
        return str(e)
    for there in (run_dir, *run_dir.parents):  # the nearest path that is there must be a folder
        if os.path.lexists(there):
            if not there.is_dir():
                what = "a file, not a folder" if there.exists() else "a broken symbolic link"
                inside = "" if there == run_dir else f"{run_dir}: "
                return f"{inside}{there} is {what}: the run folder cannot be made there (--out)"
            break
    if run_dir.is_dir() and ckpt.latest_checkpoint(run_dir) is not None:
        return holds_checkpoints(run_dir)
    return None


@contextlib.contextmanager
def _each_warning_once():
    """Within: a log message said before (the same level and text) is left out: work repeated to check
    one more thing (a dry run lists the images twice) said its warnings twice."""
    first: dict[tuple[int, str], logging.LogRecord] = {}

    def first_time(record: logging.LogRecord) -> bool:  # asked by each handler of the same record
        return first.setdefault((record.levelno, record.getMessage()), record) is record

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(first_time)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(first_time)


def _check_the_resume(cfg, kind: str, recipe: Path, out: Path | None) -> None:
    """`--dry-run --resume`: the checks the resumed run makes of its checkpoint before anything else (its
    model, seed and optimizer settings), without taking the run folder."""
    from smapctl.errors import UserError
    from smapctl.recipe import run_folder
    from smapctl.train import checkpoint as ckpt
    from smapctl.train.resume import (
        check_resumable,
        nothing_to_resume,
        past_a_damaged,
        resume_command,
        warn_of_changed_settings,
    )

    run_dir = run_folder(recipe, out, resume=True)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(nothing_to_resume(run_dir))
    with past_a_damaged(latest):
        meta = ckpt.load_meta(latest)
    command = resume_command(kind, run_dir)
    check_resumable(cfg, kind, latest, meta, command)
    warn_of_changed_settings(cfg, meta, command)
    if kind == "tokenizer":  # its data too (a generator's tokens are checked as they are made)
        from smapctl.train.tokenizer import check_resumed_data

        check_resumed_data(cfg, latest)
    _say(f"resumes from {latest}")


def _check_init_options(init_from: str | None, init_weights: str | None, resume: bool) -> str:
    """--init-from with --resume, and --init-weights without --init-from (either value: it was taken
    without a word) are refused; -> the weights to start from (`ema` unless given)."""
    from smapctl.errors import UserError
    from smapctl.train.init import refuse_with_resume

    refuse_with_resume(init_from, resume)
    if init_from is None and init_weights is not None:
        raise UserError(
            f"--init-weights {init_weights}: only with --init-from (the checkpoint to start from)"
        )
    return init_weights or "ema"


def _check_the_init(cfg, kind: str, init_from: str, weights: str, listed: bool = True) -> None:
    """`--dry-run --init-from`: the checks of the checkpoint the run would start from (its model; a
    generator's tokenizer; a tokenizer's classes, when its images are there: listed, none read)."""
    from smapctl.train import init

    start = init.open_init(init_from, cfg, kind, weights)
    if kind == "generator":
        from smapctl.ops.load import fingerprint
        from smapctl.train import checkpoint as ckpt

        tokenizer = ckpt.resolve_checkpoint(cfg.latents.tokenizer)
        weights = cfg.latents.tokenizer_weights
        init.check_init_tokenizer(start, tokenizer, fingerprint(tokenizer, weights), weights)
    elif listed:
        import torch

        from smapctl.data.datasets import build_datasets
        from smapctl.models.smap import SMAP

        with torch.device("meta"):
            model = SMAP(cfg.model)
        init.fresh_class_keys(start, model, build_datasets(cfg.data, cfg.model.image_size).class_names)
    _say(init.describe(start))


def _check_against_its_tokenizer(cfg) -> tuple[str | None, str | None]:
    """`train-generator --dry-run`: the recipe against its tokenizer when that is trained already (the
    real run's first check, so a dry run finds what training would refuse) -> (a note saying it was not
    checked, or None; what training would refuse of latents.dataset's classes or of the number of images
    to tokenize, or None)."""
    from smapctl.data.datasets import missing_images
    from smapctl.errors import UserError
    from smapctl.train import checkpoint as ckpt

    where = Path(cfg.latents.tokenizer)
    try:  # as training finds it: a run folder, its checkpoints/, or a checkpoint (under any name)
        ckpt.resolve_checkpoint(where)
    except UserError:
        return (
            f"note: latents.tokenizer {where} holds no trained tokenizer yet; the recipe is checked against"
            " it once it does"
        ), None
    from smapctl.ops.load import load_tokenizer
    from smapctl.train.generator import SET_WEIGHTS, check_compatible, check_token_classes, images_to_tokenize

    tok = load_tokenizer(where, cfg.latents.tokenizer_weights, weights_hint=SET_WEIGHTS)
    check_compatible(cfg, tok)  # (its images: warned of)
    if missing_images("latents.dataset", cfg.latents.dataset) is None:  # (a missing one: warned of)
        try:  # other classes than the tokenizer's (`--set latents.dataset=photos`): training's next check
            check_token_classes(cfg.latents.dataset, tok)
        except UserError as e:
            return None, str(e)
    dataset, held_out = images_to_tokenize(cfg, tok)
    if held_out == 0 and missing_images("latents.dataset", dataset) is not None:  # (warned of)
        return None, None
    from smapctl.data.datasets import batch_size_problem
    from smapctl.data.latents import token_images

    # Listed, no image read (the tokenizer's folder less its held-out split: refused if it has changed); a
    # batch larger than the images was refused by training once it had tokenized them all.
    listed = token_images(tok, dataset, held_out, contents=False)
    return None, batch_size_problem(cfg.train.batch_size, len(listed.data))


def _images(n: int) -> str:
    """`1 image`, `7 images`: a command's closing line."""
    return f"{n} image{'' if n == 1 else 's'}"


def _one_process(command: str) -> None:
    """Refuse a launcher's processes for a command that does not split its work (each would do the whole
    job and write the same files). Called by the command itself, after its options are parsed: from the
    group callback it imported torch (through accelerate) for `--help` too, 6-10 s instead of 0.5."""
    from smapctl.launch import refuse_multi_process

    refuse_multi_process(command)


# Where launchers put a process's rank (torchrun and accelerate; the MPI launchers accelerate reads).
_RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "MV2_COMM_WORLD_RANK",
)


def _not_main_process() -> bool:
    """True in the processes of a launcher other than the main one (without a launcher, torch and
    accelerate are not imported to find out)."""
    if not any(name in os.environ for name in _RANK_VARIABLES):
        return False
    from smapctl.launch import launched_rank

    return launched_rank() != 0


def _check_the_batch_splits(train) -> None:
    """`train.batch_size` must split over the launcher's processes: checked before they join, so that the
    main process alone says it (every process used to print it, after the process group's set-up)."""
    from smapctl.launch import launched_processes
    from smapctl.train.runner import micro_batch_size

    micro_batch_size(train, launched_processes())


class _StderrHandler(logging.Handler):
    """One line per message on the sys.stderr of the moment (as rich's console writes: a command run
    in-process may replace sys.stderr later), through tqdm, so that a progress bar being drawn on it is
    moved below the message instead of running into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _terminal_handler() -> logging.Handler:
    """On a terminal (or with FORCE_COLOR): rich's coloured level and message, on one line that the
    terminal wraps, not rich. Its log table cut a line at the width into indented pieces, paths split
    mid-name, so the command a stopped run prints to continue it no longer pasted whole. Through tqdm's
    write mode, as `_StderrHandler`: a bar being drawn is moved below the message."""
    from rich.logging import RichHandler
    from rich.text import Text

    class TerminalHandler(RichHandler):
        def emit(self, record: logging.LogRecord) -> None:
            from tqdm import tqdm

            line = Text.assemble(
                self.get_level_text(record), " ", self.render_message(record, self.format(record))
            )
            try:
                with tqdm.external_write_mode(file=sys.stderr):
                    self.console.print(line, soft_wrap=True)
            except Exception:
                self.handleError(record)

    return TerminalHandler(console=err_console, show_time=False, show_path=False)


def _setup_logging() -> None:
    if err_console.is_terminal:
        handler = _terminal_handler()
    else:
        # A job's log file (or a pipe): one line per message. Rich wrapped them at 80 columns there, so
        # the command a stopped run prints to continue it came out split over two indented lines.
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    # The other processes of a launcher report errors only: their warnings would repeat the main one's
    # (what they skip or find is summed up by the main process). The unreadable images each one meets
    # are its own, and named by it as met (the first `data.folder.WARNED_AS_MET`), as README says;
    # the logger's name is spelled here, not imported (`--help` imports nothing heavy).
    other = _not_main_process()
    logging.basicConfig(
        level=logging.ERROR if other else logging.INFO, format="%(message)s", handlers=[handler]
    )
    if other:
        logging.getLogger("smapctl.data.unreadable").setLevel(logging.WARNING)
    if "torch" not in sys.modules:
        # torch sets its loggers' levels (WARNING, or what TORCH_LOGS asks) as its import ends: a Ctrl-C
        # during that import left them at INFO, and torch's exit hooks printed "INFO FakeTensor cache
        # stats:" and its counts under the command's stop line.
        logging.getLogger("torch").setLevel(logging.WARNING)
    # matplotlib's INFO is its own bookkeeping: "INFO generated new fontManager" came among a first
    # `evaluate`'s (or `cross-recon`'s) lines on each new machine or CI container, as if smapctl said it.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _leave_processes() -> None:
    """Close a launcher's process group when a command ends well, or stops in every process at once (a
    `UserError.agreed`, a training stopped by a signal after its checkpoint): PyTorch warns of a leaked
    NCCL group at exit otherwise, and a gloo group left open could end the process by SIGABRT
    ("terminate called without an active exception") instead of its exit status. After any other error
    it stays open, as closing may wait on processes that are stuck. Read from sys.modules: a command that
    never imported torch has no group (and `--help` stays instant)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _leave_together() -> None:
    """`_leave_processes` after an error every process of a launcher raised at the same point (a
    `UserError.agreed`), once all of them are there. torchrun sends SIGTERM to the others as soon as one
    has exited: the first out (often not the main process, which prints the error) got the slower ones
    killed before they ignored SIGTERM, exiting 143 or -15 instead of the error's status, without its
    line, their gloo group left open (which can end a process by SIGABRT). Each process ignores SIGTERM
    before it gets here (`_ignore_sigterm`), so none is left to be killed once the barrier is passed."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with contextlib.suppress(RuntimeError):  # another process left anyway: this one goes on out
            dist.barrier()
    _leave_processes()


def _lost_another_process(e: RuntimeError) -> bool:
    """True for the error a collective raises when another process of the group has gone (gloo: the peer
    closed its connection; NCCL: a remote error or an abort)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(e, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(e)
    markers = (
        "Connection closed by peer",
        "Connection reset by peer",
        "Broken pipe",
        "NCCL communicator was aborted",
    )
    return any(marker in text for marker in markers)


_terminated = False  # set when SIGTERM stopped the command
_leaving = False  # set when the command is on its way out with an error (`_ignore_sigterm`)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (`kill`, a cluster's pre-emption or time limit) raised where the command is, as Ctrl-C
    is: its `finally` blocks run, so no half-written temporary file is left behind."""
    global _terminated
    _terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    # Where Python cannot raise it (a callback for an import's module lock, a `__del__`) the interrupt is
    # lost, "Exception ignored in ...": a training loop begun after it stops at its first step. (`main`
    # imported the module before it set this handler: no import here.)
    sys.modules["smapctl.train.signals"].GracefulStop.unheard = signal.SIGTERM
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopping_together():
    """A signal stopped every process of a launcher after the same round of work (`launch.RoundStops`:
    the main process said how far they got): each leaves with the signal's status, as a stopped training
    does."""
    from smapctl.launch import StoppedTogether

    try:
        yield
    except StoppedTogether as e:
        _ignore_sigterm()
        _leave_together()
        raise typer.Exit(128 + e.signum) from None


def _ignore_sigterm() -> None:
    """SIGTERM ignored from here on (in the main thread), by a process on its way out with an error: a
    launcher sends SIGTERM to every process once one has exited (often another one that met the same
    error and said nothing), and it must not cut the error line short, or leave none. `main` puts the
    earlier handler back as it returns, except under torchrun (see `main`)."""
    global _leaving
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _leaving = True


PLAIN_BELOW = 110  # columns (`_plain_help_when_narrow`)


@contextlib.contextmanager
def _plain_help_when_narrow(argv: list[str]):
    """Typer's boxed help cuts a word longer than its column with an ellipsis (`--inception-weig…`;
    `evaluate`'s `weights-inception-2015-12-05-6726825d.pth` needs 107 columns): below `PLAIN_BELOW`
    columns, and when help goes to a file or a pipe (80 columns), Click's plain help, which wraps them,
    is shown instead: for a command's options (the list of commands reads better boxed, where Click
    shortens each line; its words fit 40 columns). Usage errors keep Typer's box."""
    import shutil

    import typer.core

    before = typer.core.HAS_RICH  # read when help is formatted (from TYPER_USE_RICH at import)
    if any(a in ("-h", "--help") for a in argv[1:]) and shutil.get_terminal_size().columns < PLAIN_BELOW:
        words = [a for a in argv[1:] if not a.startswith("-")]
        groups = {group.name for group in app.registered_groups}  # `reproduce`: a list of commands
        if words and words[-1] not in groups:
            typer.core.HAS_RICH = False
    try:
        yield
    finally:
        typer.core.HAS_RICH = before  # the Python API or the tests may run another command after


_QUIETED: list[tuple] = []  # the streams (stdout, stderr) that Click's own output does not reach


@contextlib.contextmanager
def _click_output_from_the_main_process(other: bool):
    """In the processes of a launcher other than the main one (`other`), what Click prints itself goes
    nowhere: help, `--version` and usage errors (an unknown option, a missing argument, a bad value) come
    from the command line, which every process reads alike, and each printed them. They still exit with
    the same status. The commands' own output is theirs (`_Command.invoke`)."""
    if not other:
        yield
        return
    import io

    streams = sys.stdout, sys.stderr
    _QUIETED.append(streams)
    sys.stdout = sys.stderr = io.StringIO()
    try:
        yield
    finally:
        _QUIETED.pop()
        sys.stdout, sys.stderr = streams


def _stop_with_the_launcher() -> None:
    """Under torchrun (and `accelerate launch`, which uses it) each worker gets one SIGTERM when the
    launcher dies: torchrun starts its workers in sessions of their own, so `kill -9` of the launcher's
    group left them training, writing checkpoints beside a resumed run. A daemon thread looks at the
    parent once a second. (The kernel's parent-death signal comes once per thread of the dying launcher,
    and a second SIGTERM means "stop at once"; a handler turning it into one SIGTERM can be re-entered.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="smapctl-launcher-watch", daemon=True).start()


def _debug() -> bool:
    """Tracebacks instead of one-line errors: `--debug` (which sets it as the command line is read) or
    SMAPCTL_DEBUG."""
    return bool(os.environ.get("SMAPCTL_DEBUG"))


def _said_once(message: str) -> int:
    """An error every process of a launcher meets alike (a path, another process gone), printed by the
    main process alone: the status to exit with."""

    _ignore_sigterm()
    if not _not_main_process():
        _print_error(message)
    return 1


def _print_error(message: str) -> None:
    """`error: MESSAGE` on stderr, one line."""
    from smapctl.errors import one_line

    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def _said_user_error(e) -> int:
    """A `UserError`, printed once under a launcher when every process met it alike, else by each (its
    own); the processes that agreed on it leave together. The status to exit with."""
    from smapctl.errors import one_line

    held = _hold_sigterm() if e.same_in_every_process and _not_main_process() and not e.agreed else None
    _ignore_sigterm()
    if not (e.same_in_every_process and _not_main_process()):
        # Another process of a launcher starts a line of its own: the main one's progress bar may be
        # drawn on the current one (its error was read as part of the bar).
        lead = "\n" if _not_main_process() else ""
        err_console.print(
            f"{lead}[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True
        )
    if e.agreed:
        _leave_together()
    if held is not None and not _outlive_the_main_process(held):
        # The main process did not exit with it: it did not meet this error, and nobody printed it (the
        # main one said only that another process had stopped, "its message ... above").
        from smapctl.launch import launched_rank

        err_console.print(
            f"\n[bold red]error:[/] process {launched_rank()} of the launch: {escape(one_line(str(e)))}",
            highlight=False,
            soft_wrap=True,
        )
    return e.exit_code


# How long a process of a launcher that leaves an error to the main process waits for the main one to exit.
MAIN_PROCESS_GRACE = 30.0


def _hold_sigterm() -> set | None:
    """Under torchrun (`accelerate launch` too), SIGTERM blocked, kept pending for
    `_outlive_the_main_process` (on Linux a blocked signal is not discarded though ignored) -> the signal
    mask before; None elsewhere (another launcher, a test's emulated rank), where nothing is waited for."""
    if (
        "TORCHELASTIC_RUN_ID" in os.environ
        and hasattr(signal, "sigtimedwait")
        and threading.current_thread() is threading.main_thread()
    ):
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return None


def _outlive_the_main_process(held: set) -> bool:
    """In a process of a launcher other than the main one, leaving with an error that the main process
    prints (a usage error, a refused launcher, any error every process meets alike): wait for torchrun's
    SIGTERM, which comes once the main process has exited, or MAIN_PROCESS_GRACE seconds -> whether it
    came. It exited first, and torchrun's SIGTERM then ended the main process, on a loaded machine still
    importing torch, without its line and with -15. `held`: the signal mask `_hold_sigterm` replaced, put
    back (SIGTERM is ignored by then)."""
    try:
        return signal.sigtimedwait({signal.SIGTERM}, MAIN_PROCESS_GRACE) is not None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _on_exit(e: SystemExit) -> None:
    """Click's own exit (0 when a command ends well, 2 for a usage error, 130 for Ctrl-C): a SIGTERM that
    stopped the command exits as one (143)."""
    if not e.code:
        _leave_processes()
    elif e.code == 2 and _not_main_process() and (held := _hold_sigterm()) is not None:
        _ignore_sigterm()  # (a usage error, which the main process prints)
        _outlive_the_main_process(held)
    else:
        _ignore_sigterm()
    if e.code == 130 and _terminated:  # Typer's code for Ctrl-C
        if not _not_main_process():
            err_console.print("stopped by SIGTERM", style="red", highlight=False)
        sys.exit(128 + signal.SIGTERM)


def main() -> None:
    from smapctl.errors import UserError, path_error
    from smapctl.train.signals import CommandEnd, GracefulStop

    # Training loops catch SIGTERM themselves (to save a checkpoint) and put this handler back after.
    global _terminated, _leaving
    _terminated, _leaving, previous = False, False, None
    # The signal that stopped a training earlier in this process (the Python API, a test) is not this
    # command's: a training run next exited 130 as if stopped by it.
    GracefulStop.last_signal = GracefulStop.unheard = None
    # More DataLoader workers than CPUs: torch says so as the loader is made and again as it is iterated.
    # Under a launcher the main process says it (once; each process's loaders are alike).
    try:
        other = _not_main_process()
    except KeyboardInterrupt:  # under a launcher that imported torch (seconds): each printed a traceback
        sys.exit(128 + signal.SIGINT)
    except ValueError as e:  # a rank accelerate cannot read (`RANK=x`): which process this is is unknown
        from smapctl.launch import environment_problem  # (it imports torch: not for --help)

        message = environment_problem(e)
        if _debug() or message is None:
            raise
        _print_error(message)
        sys.exit(1)
    warnings.filterwarnings(
        "ignore" if other else "once", message="This DataLoader will create", category=UserWarning
    )
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Once a command's files are complete, the signals its last work caught stay caught to the very end
    # (its final print, its process group left): one there exited 130 with every file written.
    end = CommandEnd()
    try:
        _stop_with_the_launcher()
        with _plain_help_when_narrow(sys.argv), _click_output_from_the_main_process(other):
            app()
        end.ended_well = True
    except UserError as e:
        if _debug():
            raise
        sys.exit(_said_user_error(e))
    except OSError as e:
        # A path the system refused where no code expected it (a file name over the system's limit): one
        # line naming it, not a traceback. An OSError naming no path is a fault, shown in full.
        message = path_error(e)
        if _debug() or message is None:
            raise
        sys.exit(_said_once(message))
    except ValueError as e:
        # An environment variable accelerate reads holds a value it cannot (`ACCELERATE_USE_CPU=maybe`,
        # `WORLD_SIZE=two`): one line naming it, not accelerate's traceback, which did not.
        from smapctl.launch import environment_problem

        message = environment_problem(e)
        if _debug() or message is None:
            raise
        sys.exit(_said_once(message))
    except RuntimeError as e:
        # Another process of a launcher stopped (its own error is printed above): this one's collective
        # failed after it. One line, from the main process, instead of a page of gloo or NCCL traceback.
        if _debug() or not _lost_another_process(e):
            raise
        sys.exit(
            _said_once(
                "another process of this launch stopped (its message, if it could leave one, is above);"
                " this one stopped with it"
            )
        )
    except SystemExit as e:
        end.ended_well = not e.code
        _on_exit(e)
        raise
    finally:
        end.close()  # before SIGTERM's handler is put back: the command's, held, was installed after it
        # A torchrun worker on its way out with an error keeps ignoring SIGTERM until the process ends:
        # the launcher sends it once another process has exited, and the default handler put back here
        # killed this one as the interpreter shut down (-15 instead of the error's status).
        if previous is not None and not (_leaving and "TORCHELASTIC_RUN_ID" in os.environ):
            signal.signal(signal.SIGTERM, previous)
        # The command's SIGTERM (heard or lost) is over with it, its handler gone: noted as lost, it stopped
        # the next tokenize, sampling, token cache or training of the Python API in this process after its
        # first batch or step (`signals.stop_if_unheard`).
        GracefulStop.unheard = None
    _leave_processes()


if _a_spawned_worker():
    # What it logs (the unreadable images it meets, named as met) is then written as the command's own
    # lines are, as in a forked worker, which has the command's handler: it went to logging's last resort,
    # without its level and past the progress bar.
    _setup_logging()

if __name__ == "__main__":
    entry()
