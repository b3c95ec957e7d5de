"""Helpers shared by the tokenizer-training tests: a tiny recipe, in-process and real CLI runs, and
comparisons of metrics and checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from smapctl.recipe import TokenizerRecipe, load_tokenizer_recipe
from smapctl.train import checkpoint as ckpt
from smapctl.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# The demo recipe shrunk to what a 2-core CPU trains at ~15 steps/s: 16 px digits, 4 tokens, width 32.
TINY_RECIPE = """\
kind: tokenizer
model:
  image_size: 16
  patch_size: 4
  enc_width: 32
  enc_depth: 1
  enc_heads: 2
  dec_width: 32
  dec_depth: 1
  dec_heads: 2
  num_latent_tokens: 4
  num_classes: 10
  regularizer:
    kind: kl
    token_dim: 8
data:
  dataset: digits
  val_fraction: 0.1
  crop_scale: [0.85, 1.0]
  hflip: false
  num_workers: 0
loss:
  pixel: l2
train:
  max_steps: 12
  batch_size: 8
  lr: 2e-3
  warmup_steps: 2
  min_lr_ratio: 0.1
  ema_decay: 0.9
  precision: "no"
  log_every: 1
  sample_every: 5
  ckpt_every: 3
  keep_checkpoints: 10
"""

# Settings that make a codebook regularizer tiny too.
CODEBOOK = {
    "vq": ["model.regularizer.codebook_size=64"],
    "softvq": ["model.regularizer.codebook_size=64", "model.regularizer.num_codebooks=2"],
    "kl": [],
}

# The demo generator recipe's model shrunk to the tiny tokenizers (8 tokens, 10 classes, class width 32).
TINY_TRANSFORMER = (
    "vocab_size: 64, num_tokens: 8, num_classes: 10, class_dim: 32, width: 32, depth: 1, num_heads: 2"
)
TINY_CARD = [
    *("model.num_tokens=8", "model.class_dim=32", "model.width=32", "model.depth=1", "model.num_heads=2"),
    *("model.head_depth=1", "model.head_width=32"),
]

# recipes/demo/tokenizer.yaml shrunk for the tests that train generators on it, sample and evaluate (16 px,
# 8 tokens, 3 steps), and recipes/demo/generator.yaml's tiny CARD on it (3 flow steps when sampling).
DEMO_TOKENIZER_TINY = [
    *("model.image_size=16", "model.patch_size=4", "model.num_latent_tokens=8"),
    *("model.enc_width=32", "model.enc_depth=1", "model.enc_heads=2"),
    *("model.dec_width=32", "model.dec_depth=1", "model.dec_heads=2"),
    *("train.batch_size=8", "train.max_steps=3", "train.precision='no'", "train.warmup_steps=0"),
]
DEMO_GENERATOR_TINY = [
    *TINY_CARD,
    *("train.batch_size=16", "train.precision='no'", "train.warmup_steps=0"),
    *("train.sample_every=100", "train.ckpt_every=100", "sample.steps=3"),
]


def tiny_generator_model(kind: str) -> list[str]:
    """`--set` overrides of recipes/demo/generator.yaml for a tiny CARD, LlamaGen or MaskGIT."""
    return list(TINY_CARD) if kind == "card" else [f"model={{kind: {kind}, {TINY_TRANSFORMER}}}"]


# Per-step values that depend on the wall clock, not on the training.
TIMING_KEYS = ("images_per_s",)


def write_recipe(folder: Path, name: str = "tiny.yaml", text: str = TINY_RECIPE) -> Path:
    path = Path(folder) / name
    path.write_text(text)
    return path


def regularizer_sets(kind: str) -> list[str]:
    return [f"model.regularizer.kind={kind}", *CODEBOOK[kind]]


def load(path: Path, *sets: str) -> TokenizerRecipe:
    return load_tokenizer_recipe(path, list(sets))


def cli_args(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: merged row} without the timing columns; asserts each training step
    (a row with a "loss") is logged once."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in TIMING_KEYS})
    return out


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    table = metrics_by_step(run_dir)
    return [table[s][key] for s in sorted(table) if key in table[s]]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every weight file and the optimiser/scheduler states are bitwise equal (RNG states excluded:
    they are compared by the losses that follow them)."""
    names = ckpt.weight_names(a)
    assert names == ckpt.weight_names(b)
    for name in names:
        wa, wb = ckpt.load_weights(a, name), ckpt.load_weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}.{k} differs between {a} and {b}"
    sa, sb = ckpt.load_state(a), ckpt.load_state(b)
    assert sa["step"] == sb["step"]
    for key in sa:
        if key not in ("rng", "step"):
            _assert_equal_tree(sa[key], sb[key], key)


def _assert_equal_tree(x, y, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_equal_tree(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list | tuple):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_equal_tree(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


def adam_steps(checkpoint: Path | dict, key: str = "optimizer") -> int:
    """How many optimiser steps AdamW took (its per-parameter step counter), read from a checkpoint folder
    or its loaded training state; `key` is the optimiser's entry ("disc_optimizer": the discriminator's)."""
    state = checkpoint if isinstance(checkpoint, dict) else ckpt.load_state(checkpoint)
    return int(next(iter(state[key]["state"].values()))["step"])


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment (its data cache included) with this process's thread count, so a CLI run
    computes bit for bit what an in-process run computes."""
    env = dict(os.environ)
    env |= {"OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1", **extra}
    return env


def smapctl(*args, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """`python -m smapctl ARGS` run to its end (5 minutes at most), in `env` (default: this process's
    environment), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "smapctl", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_cli(*args, **popen) -> subprocess.Popen:
    """`python -m smapctl ARGS` as a real process (stdout/stderr captured as text, unless `popen` gives
    them another place)."""
    return subprocess.Popen(
        [sys.executable, "-m", "smapctl", *map(str, args)],
        cwd=ROOT,
        env=subprocess_env(),
        text=True,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} | popen,
    )


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`smapctl ARGS` in this process through the real entry point -> (exit code, stdout, stderr)."""
    from smapctl import cli

    argv = sys.argv
    sys.argv = ["smapctl", *map(str, args)]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars or log records."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line.startswith("error:")]


def two_nodes(*args, cwds=(ROOT, ROOT), envs=({}, {}), script: Path | None = None, timeout: float = 120):
    """`python -m smapctl ARGS` (or `script` ARGS) as two nodes of a launch on this machine (`torchrun
    --nnodes 2 --node_rank N`, one process each, gloo), node N in `cwds[N]` (a relative path names another
    file on each, as on nodes that share nothing) with the variables `envs[N]` -> (status, stdout, stderr)
    of each; killed after `timeout` seconds."""
    import socket

    with socket.socket() as s:  # a free port for node 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank, (cwd, extra) in enumerate(zip(cwds, envs, strict=True)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        cmd += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        cmd += ["-m", "smapctl"] if script is None else [str(script)]
        env = subprocess_env(OMP_NUM_THREADS="1", **extra)
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        nodes.append(subprocess.Popen([*cmd, *map(str, args)], cwd=cwd, env=env, **pipes))
    try:
        outputs = [n.communicate(timeout=timeout) for n in nodes]
        return [(n.returncode, *output) for n, output in zip(nodes, outputs, strict=True)]
    finally:
        for n in nodes:
            n.kill()


def another_copy(run: Path, into: Path) -> Path:
    """A copy of the run `run` in `into` whose newest checkpoint reads as another one (its meta.json
    rewritten, as another step's or training's is): what a node holding a stale copy has."""
    import shutil

    copy = into / run.name
    shutil.copytree(run, copy)
    meta = ckpt.latest_checkpoint(copy) / ckpt.META
    meta.write_text(meta.read_text() + "\n")
    return copy


def image_folder(root: Path, classes: tuple[str, ...], per_class: int, seed: int = 0) -> Path:
    """`root/<class>/<i>.png`: `per_class` random 16 x 16 images in each class folder."""
    import numpy as np
    from tokenize_helpers import write_image

    rng = np.random.default_rng(seed)
    for label in classes:
        for i in range(per_class):
            write_image(root / label / f"{i}.png", rng, size=(16, 16))
    return root


def before_torchrun(stderr: str) -> str:
    """What the launched processes wrote to stderr before torchrun's own lines (its log of a failed process,
    its report and traceback)."""
    return re.split(r"^[EWI]\d{4} \d", stderr, maxsplit=1, flags=re.MULTILINE)[0]


def torchrun(*args, threads: int = 1, script: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m smapctl ARGS` on the CPU (gloo), `threads` each;
    with `script`, that file run with ARGS instead."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "smapctl"] if script is None else [str(script)]
    return subprocess.run(
        [*cmd, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
