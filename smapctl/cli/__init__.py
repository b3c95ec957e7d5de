"""The `smapctl` command line: one function per subcommand; each parses, loads, and calls in.

Heavy imports (torch, the models) happen inside the commands so that `smapctl --help` is instant. How a
command lives as a process (its output, signals, a launcher's processes, errors and exit statuses) is
`cli/process.py`; what a training's `--dry-run` checks and prints, `cli/dry_run.py`.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from typer.core import TyperCommand, TyperGroup

from smapctl.cli import process
from smapctl.cli.dry_run import dry_run_generator, dry_run_tokenizer
from smapctl.cli.process import (
    QUIETED,
    a_spawned_worker,
    console,
    err_console,
    leave_processes,
    not_main_process,
    say,
    setup_logging,
    stopping_together,
)
from smapctl.config import INT_LIMIT, SEED_MAX


class _FlagsTakeNoValue:
    """`--help` shows a flag (`--overwrite`) bare: typer 0.29 writes `<bool>` beside it as if it took a
    value, and `--overwrite true` would then read `true` as an input path."""

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
        if not QUIETED:
            return super().invoke(ctx)
        quiet = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = QUIETED[-1]
        try:
            return super().invoke(ctx)
        finally:
            sys.stdout, sys.stderr = quiet


app = typer.Typer(
    cls=_Group,
    name="smapctl",
    help="Train SMAP semantic-aware 1D image tokenizers and generators on their tokens (CARD, LlamaGen,"
    " MaskGIT); tokenize, sample, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


WORKERS_PER_CPU = 4  # tokenize --workers: image-reading processes beyond this only compete for the CPUs


def _path(value) -> Path:
    """A path option's or argument's value; an empty one is refused (`--out "$RUN"` with RUN unset): it
    would read as `.`, and a run or samples would go into the current folder. A `~` the shell left as typed
    (it expands one only at the start of a word: `--out=~/codes.pt`) is the home folder, as in the inputs,
    which are read from there: otherwise a token file, PNGs, a panel or a report would go into a folder
    named `~` in the current folder (which `rm -r ~` would then take for the home folder)."""
    if isinstance(value, Path):  # a default
        return value
    return Path(os.path.expanduser(_named(value)))


def _named(value: str) -> str:
    """A run, checkpoint, folder or file named by a string option (`--checkpoint`, `--tokenizer`, an
    input of `tokenize`): refused empty, as `_path` is."""
    if value == "":
        raise typer.BadParameter("an empty path (an unset variable?); `.` names the current folder")
    if value.startswith("~") and os.path.expanduser(value) == value:  # (the shell left it as it was)
        # `~name/...` of no such user: said here, not as pathlib's "Could not determine home directory"
        # traceback wherever the path is first expanded (`--out`, `--data`, `--samples`, `--tokenizer`, an
        # input of tokenize).
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
# --init-from would train from random weights without a word).
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

    setup_logging()  # before the recipe's warnings, so the other processes of a launcher keep quiet
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

    setup_logging()  # before the recipe's warnings, so the other processes of a launcher keep quiet
    init_weights = _check_init_options(init_from, init_weights, resume)
    cfg = load_generator_recipe(recipe, _overrides(set_, max_steps))
    _train("generator", cfg, recipe, out, max_steps, resume, init_from, init_weights, dry_run)


def _train(
    kind: str, cfg, recipe: Path, out, max_steps, resume: bool, init_from, init_weights, dry_run
) -> None:
    """train-tokenizer's and train-generator's work once the recipe is loaded: its warnings, the checks,
    then the dry run, or the training in its run folder and the final checkpoint's line."""
    from smapctl.recipe import (
        training_run_dir,
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
        dry = dry_run_tokenizer if kind == "tokenizer" else dry_run_generator
        dry(cfg, recipe, out, resume, init_from, init_weights)
        return
    if kind == "tokenizer":
        from smapctl.train.tokenizer import train_tokenizer as run_training
    else:
        from smapctl.train.generator import train_generator as run_training

    # A run folder it made is removed again when it fails before training (`TrainingRun.close`).
    folder = training_run_dir(recipe, out, resume)
    with stopping_together():  # (a generator's token cache being made)
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
    cfg_scale: Annotated[
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

    _check_guidance(cfg_scale)
    _check_seed(seed)
    numbers = {"temperature": temperature, "choice_temperature": choice_temperature, "top_p": top_p}
    for name, value in numbers.items():  # as a recipe's are checked, before anything is loaded
        problem = sampling_value_problem(name, value)
        if problem is not None:
            raise typer.BadParameter(problem, param_hint=f"--{name.replace('_', '-')}")
    setup_logging()
    with stopping_together():
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
            cfg_scale=cfg_scale,
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
    say(f"{_images(len(result.files))} in {result.out_dir}; grid: {result.grid}")
    if result.npz is not None:
        say(f"npz: {result.npz}")


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
    setup_logging()  # its progress lines in a log; without it the files it leaves out (INFO) go unshown
    cpus = os.cpu_count() or 1
    if workers is not None and workers > WORKERS_PER_CPU * cpus:  # 1000 forked processes stall the host
        raise typer.BadParameter(
            f"at most {WORKERS_PER_CPU * cpus} ({WORKERS_PER_CPU} per CPU; this machine has {cpus})",
            param_hint="--workers",
        )
    from smapctl.ops.tokenize import tokenize_images

    with stopping_together():
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
    say(
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
    setup_logging()
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
    say(f"{_images(len(result.files))} (k={result.prefix}) in {result.out_dir}")


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
    setup_logging()
    from smapctl.ops.cross_recon import check_output, cross_reconstruct, write_cross_recon

    check_output(out, (image_a, image_b), keep_parts, overwrite)
    result = cross_reconstruct(
        image_a, image_b, checkpoint=checkpoint, class_a=class_a, class_b=class_b, weights=weights
    )
    files = write_cross_recon(result, out, keep_parts=keep_parts, ends_command=True)
    say(f"panel: {files[0]}")
    if keep_parts:
        say(f"{_images(len(files) - 1)} in {files[1].parent}")


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
            "--num-samples",
            min=1,
            help="With --generator: samples, default 1000 (rounded up to whole classes); "
            "the paper's gFID protocol uses 50000. Under torchrun: --num-samples (torchrun reads --num as "
            "an abbreviation of its own --numa-binding).",
        ),
    ] = None,
    cfg_scale: Annotated[
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

    Both with semantic accuracy; writes metrics.json and, for several prefixes, a rate-quality plot.
    Under `accelerate launch` or `torchrun` the processes share the reconstructions (of a tokenizer) or the
    drawing (--generator, as `sample`'s do) and the main one scores; --samples runs as one process."""
    if samples is not None:
        _one_process("evaluate --samples")
    from smapctl.eval.evaluate import evaluate_images

    _check_guidance(cfg_scale)
    _check_seed(seed)
    setup_logging()
    with stopping_together():  # (a launched evaluation's batches: each leaves with the signal's status)
        result = evaluate_images(
            checkpoint=checkpoint,
            data=data,
            prefix=prefix,
            weights=weights,
            samples=samples,
            generator=generator,
            tokenizer=tokenizer,
            num=num,
            cfg_scale=cfg_scale,
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
    if not result.main:  # another process of a launcher: the main one scores and reports
        return
    try:
        _show_evaluation(result)
    except KeyboardInterrupt:  # a second Ctrl-C as the table is shown (the first is held to the end)
        # The report is on disk, complete: the evaluation succeeded (exit 0), whatever the table got to show
        # (as a signal while it is written: `eval.common.report_written`).
        from smapctl.errors import one_line  # (a report's path that is not UTF-8: its bytes as \xNN)

        err_console.print(
            f"\n{'SIGTERM' if process.terminated else 'SIGINT'} as the scores were shown: they are complete"
            f" in {one_line(str(result.files[0]))}",
            style="yellow",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _show_evaluation(result) -> None:
    """An evaluation's scores as a table, its notes, the files written and the images skipped."""
    from smapctl.eval.report import report_notes, report_table

    # Not cropped at the terminal's edge: on one narrower than its scores the table's last column would be
    # cut off (`141.4` of 141.412, read as a score); the terminal wraps the line instead.
    console.print(report_table(result.report), crop=False)
    for note in report_notes(result.report):
        say(note)
    say(f"metrics: {', '.join(map(str, result.files))}")
    if result.report.get("generator"):  # samples drawn now: say where they are kept
        drawn = [result.report["samples"], *([result.report["npz"]] if result.report.get("npz") else [])]
        say(f"samples: {', '.join(drawn)}")
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
    setup_logging()
    from smapctl.errors import one_line
    from smapctl.repro.runs import RunStopped
    from smapctl.train.signals import GracefulStop

    try:
        result = run(opts)
    except RunStopped as e:
        # A training took the signal (finished its step, saved a checkpoint): the reproduction stops too,
        # writing nothing, and exits as an interrupted program (not going on, measuring the stopped run).
        # Through `one_line`, as an error line: an --out whose name is not UTF-8 is shown by its bytes.
        err_console.print(
            one_line(
                f"stopped: {e}; nothing written to {opts.out}"
                " (the same command continues from the checkpoint)"
            ),
            style="red",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(128 + (GracefulStop.last_signal or signal.SIGINT)) from None
    plots = len(result.files) - 2
    say(f"results: {result.files[0]} ({plots} plots in {opts.out})")


def _report_checkpoint(final) -> None:
    """The run's final checkpoint, printed once (by the main process under torchrun/accelerate). A run
    stopped by SIGINT/SIGTERM (checkpoint saved) then exits with 128 + the signal's number, as the shell
    expects of an interrupted program, so that commands chained after it with `&&` do not run."""
    from smapctl.train.signals import GracefulStop

    if not not_main_process():
        say(f"checkpoint: {final}")
    if GracefulStop.last_signal is not None:
        leave_processes()  # every process stopped at the same step, after the checkpoint
        raise typer.Exit(128 + GracefulStop.last_signal)


def _warn_skipped(summary: str | None) -> None:
    """The one-line account of the images `--on-error skip` left out (on stderr, after the result)."""
    if summary:
        err_console.print(summary, style="yellow", markup=False, highlight=False, soft_wrap=True)


def _check_guidance(cfg_scale: float | None) -> None:
    """--cfg of `sample` and `evaluate --generator`, as a recipe's sample.cfg_scale is checked."""
    from smapctl.recipe import sampling_value_problem

    problem = sampling_value_problem("cfg_scale", cfg_scale)
    if problem is not None:
        raise typer.BadParameter(f"{problem} (1 = no guidance)", param_hint="--cfg")


def _check_seed(seed: int | None) -> None:
    """--seed of `sample` and `evaluate --generator`: torch takes seeds below 2^32. Checked here rather
    than with the option's `max`, which `--help` showed as `[0<=x<=4294967295]`, squeezing every help
    text of the command into a narrow column."""
    if seed is not None and seed > SEED_MAX:
        raise typer.BadParameter(f"must be from 0 to {SEED_MAX} (2^32 - 1)", param_hint="--seed")


def _check_init_options(init_from: str | None, init_weights: str | None, resume: bool) -> str:
    """--init-from with --resume, and --init-weights without --init-from (either value: it would be taken
    without a word) are refused; -> the weights to start from (`ema` unless given)."""
    from smapctl.errors import UserError
    from smapctl.train.init import refuse_with_resume

    refuse_with_resume(init_from, resume)
    if init_from is None and init_weights is not None:
        raise UserError(
            f"--init-weights {init_weights}: only with --init-from (the checkpoint to start from)"
        )
    return init_weights or "ema"


def _images(n: int) -> str:
    """`1 image`, `7 images`: a command's closing line."""
    return f"{n} image{'' if n == 1 else 's'}"


def _one_process(command: str) -> None:
    """Refuse a launcher's processes for a command that does not split its work (each would do the whole
    job and write the same files). Called by the command itself, after its options are parsed: from the
    group callback it imported torch (through accelerate) for `--help` too, 6-10 s instead of 0.5."""
    from smapctl.launch import refuse_multi_process

    refuse_multi_process(command)


def _check_the_batch_splits(train) -> None:
    """`train.batch_size` must split over the launcher's processes: checked before they join, so that the
    main process alone says it (not every process, after the process group's set-up)."""
    from smapctl.launch import launched_processes
    from smapctl.train.runner import micro_batch_size

    micro_batch_size(train, launched_processes())


def main() -> None:
    """The command line of `sys.argv`, run in this process (`process.main`: its signals, errors and exit
    status); the tests call it in-process."""
    process.main(app)


def entry() -> None:
    """The `smapctl` program (its console script, `python -m smapctl`): `process.entry`."""
    process.entry(app)


if a_spawned_worker():
    # What it logs (the unreadable images it meets, named as met) is then written as the command's own
    # lines are, as in a forked worker, which has the command's handler: otherwise it would go to logging's
    # last resort, without its level and past the progress bar.
    setup_logging()
