"""The `smapctl` command line: one function per subcommand; each parses, loads, and calls in.

Heavy imports (torch, the models) happen inside the commands so that `smapctl --help` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="smapctl",
    help="Train SMAP semantic-aware 1D image tokenizers and CARD generators; tokenize, sample, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file, e.g. recipes/vq_s_128.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set model.num_latent_tokens=64 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for user errors too (or SMAPCTL_DEBUG=1).")
    ] = False,
) -> None:
    if debug:
        os.environ["SMAPCTL_DEBUG"] = "1"


@app.command("train-tokenizer")
def train_tokenizer(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: runs/<recipe name>).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after N steps (a smoke run).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's newest checkpoint.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the model, print a summary and `parameters: N`; no data.")
    ] = False,
) -> None:
    """Train a SMAP tokenizer from a recipe (paper section 3.2, appendix A)."""
    from smapctl.recipe import load_tokenizer_recipe

    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_tokenizer_recipe(recipe, overrides)
    if dry_run:
        from smapctl.models.smap import SMAP
        from smapctl.summary import summarize

        _print_summary(recipe, cfg, summarize(lambda: SMAP(cfg.model)))
        return
    from smapctl.recipe import recipe_name
    from smapctl.train.runner import default_run_dir
    from smapctl.train.tokenizer import train_tokenizer

    _setup_logging()
    run_dir = out or default_run_dir(recipe_name(recipe))
    final = train_tokenizer(cfg, run_dir, resume=resume)
    console.print(f"checkpoint: {final}")


@app.command("train-generator")
def train_generator(
    recipe: Annotated[Path, typer.Argument(help="Generator recipe YAML, e.g. recipes/card_b.yaml.")],
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: runs/<recipe name>).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after N steps (a smoke run).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's newest checkpoint.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the model, print a summary and `parameters: N`; no data.")
    ] = False,
) -> None:
    """Train a generator on a tokenizer's tokens: CARD (KL/SoftVQ latents) or LlamaGen/MaskGIT (VQ)."""
    from smapctl.recipe import load_generator_recipe

    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_generator_recipe(recipe, overrides)
    if dry_run:
        from smapctl.summary import summarize
        from smapctl.train.generator import build_generator

        summary = summarize(lambda: build_generator(cfg, None))
        m = cfg.model
        console.print(
            f"{recipe}: {summary.class_name} {m.depth} x {m.width} over {m.num_tokens} tokens, "
            f"class embedding {cfg.class_embed}, built on {summary.device}"
        )
        for name, n in summary.parts.items():
            console.print(f"  {name}: {n:,}")
        print(f"parameters: {summary.parameters}")
        return
    from smapctl.recipe import recipe_name
    from smapctl.train.generator import train_generator as run_training
    from smapctl.train.runner import default_run_dir

    _setup_logging()
    final = run_training(cfg, out or default_run_dir(recipe_name(recipe)), resume=resume)
    console.print(f"checkpoint: {final}")


@app.command("sample")
def sample(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the PNGs, grid.png and samples.npz.")],
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="Generator run or checkpoint (default: the demo run).")
    ] = None,
    classes: Annotated[
        str, typer.Option("--classes", help="Class names or ids, comma-separated, or 'all'.")
    ] = "all",
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Images per class.")] = 4,
    cfg: Annotated[
        float | None, typer.Option("--cfg", help="Guidance scale (default: the recipe's).")
    ] = None,
    cfg_schedule: Annotated[str | None, typer.Option("--cfg-schedule", help="constant or linear.")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Flow steps (CARD) / decoding steps.")
    ] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same images.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 32,
    npz: Annotated[
        bool, typer.Option("--npz", help="Also write samples.npz (ADM evaluation format).")
    ] = False,
) -> None:
    """Sample class-conditional images from a trained generator (decoded by its tokenizer)."""
    from smapctl.ops.sample import sample_images

    if cfg_schedule not in (None, "constant", "linear"):
        raise typer.BadParameter("expected 'constant' or 'linear'", param_hint="--cfg-schedule")
    result = sample_images(
        checkpoint,
        out,
        classes=classes,
        per_class=per_class,
        seed=seed,
        batch_size=batch_size,
        npz=npz,
        cfg_scale=cfg,
        cfg_schedule=cfg_schedule,
        steps=steps,
        temperature=temperature,
    )
    console.print(f"{len(result.files)} images in {result.out_dir}; grid: {result.grid}")
    if result.npz is not None:
        console.print(f"npz: {result.npz}")


def _print_summary(recipe: Path, cfg, summary) -> None:
    from rich.table import Table

    m = cfg.model
    table = Table(title=f"{recipe} ({summary.class_name}, built on {summary.device})", show_header=False)
    table.add_row("image", f"{m.image_size} px, patch {m.patch_size}, {m.num_patches} patches")
    table.add_row("encoder", f"{m.enc_depth} x {m.enc_width} ({m.enc_heads} heads)")
    table.add_row("decoder", f"{m.dec_depth} x {m.dec_width} ({m.dec_heads} heads)")
    table.add_row("latents", f"{m.num_latent_tokens} tokens x {m.token_dim} ({m.regularizer.kind})")
    table.add_row("class condition", f"{m.class_condition} ({m.num_classes} classes)")
    table.add_row("tail dropping", m.tail_drop + (" per sample" if m.tail_drop_per_sample else " per batch"))
    table.add_row("data", cfg.data.dataset)
    t = cfg.train
    table.add_row("train", f"{t.max_steps} steps, batch {t.batch_size}, lr {t.lr:g}, {t.precision}")
    for name, n in summary.parts.items():
        table.add_row(f"  {name}", f"{n:,}")
    console.print(table)
    print(f"parameters: {summary.parameters}")


def _setup_logging() -> None:
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])


def main() -> None:
    from smapctl.errors import UserError

    try:
        app()
    except UserError as e:
        if os.environ.get("SMAPCTL_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
