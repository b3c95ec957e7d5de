"""`smapctl evaluate`: how well a tokenizer reconstructs, and how good a generator's samples are.

Reconstruction (a tokenizer checkpoint): each image is encoded once (eq. 3) and decoded from every
evaluated prefix k of its latents (eq. 4-5; k = 0 is the class embedding alone). Per k: PSNR and SSIM
(`eval/metrics.py`) on the uint8 reconstructions, i.e. on what a saved PNG holds, and on request rFID and
IS with torch-fidelity's Inception v3 against the originals. Generation (a folder or `.npz` of samples, or
a generator sampled now): gFID against a reference set, and IS.

Semantic scores answer section 4.2's question, does the class meaning survive tokenization, with a small
reference classifier that smapctl trains on the dataset's training split (`eval/semantic.py`): accuracy of
the intended class at every prefix, for class-only decoding and for cross-reconstructions (image a decoded
with another class c = (label + 1) mod C: is the output classified as c?), accuracy of samples against the
class they were drawn for, and clf-FD, a Frechet distance in that classifier's feature space, which is not
comparable with Inception FID.

The two modes live in `eval/reconstruction.py` and `eval/generation.py`, what they share (the Inception
weights, the reference classifier, the report's blocks) in `eval/common.py`; this module takes a command's
options to one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from smapctl.errors import UserError
from smapctl.eval.common import EvalOutput
from smapctl.eval.generation import evaluate_generation
from smapctl.eval.reconstruction import evaluate_tokenizer

logger = logging.getLogger("smapctl.eval")


def evaluate_images(
    *,
    checkpoint=None,
    prefix: str | None = None,
    weights: str = "ema",
    samples=None,
    generator=None,
    tokenizer=None,
    num: int | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
    save_npz: bool = False,
    ref=None,
    **common,
) -> EvalOutput:
    """`smapctl evaluate`: generation metrics with `samples` or `generator`, else reconstruction metrics
    of the tokenizer `checkpoint`. Options of the other mode are refused (one line each); `common` are the
    keyword arguments of both modes (data, fid, isc, inception_weights, semantic, limit, batch_size, out)."""
    if samples is not None or generator is not None:
        # --weights picks a tokenizer's weights; a generator is sampled with its EMA weights (it would be
        # ignored).
        given = {
            "--checkpoint": checkpoint,
            "--prefix": prefix,
            "--weights": None if weights == "ema" else weights,
        }
        if samples is not None:
            given |= {
                "--generator": generator,
                "--tokenizer": tokenizer,
                "--num": num,
                "--cfg": cfg_scale,
                "--seed": seed,
                "--save-npz": save_npz or None,
            }
        clash = next((opt for opt, value in given.items() if value is not None), None)
        if clash is not None:
            mode = "--samples" if samples is not None else "--generator"
            raise UserError(f"{clash}: not with {mode}")
        with _said_if_interrupted():  # (unless `sample_images` said how far its drawing got)
            return evaluate_generation(
                samples,
                generator=generator,
                tokenizer=tokenizer,
                num=num,
                cfg_scale=cfg_scale,
                seed=0 if seed is None else seed,
                save_npz=save_npz,
                ref=ref,
                **common,
            )
    if ref is not None:
        raise UserError("--ref: only with --samples or --generator (generated images)")
    given = {
        "--tokenizer": tokenizer,
        "--num": num,
        "--cfg": cfg_scale,
        "--seed": seed,
        "--save-npz": save_npz or None,
    }
    clash = next((opt for opt, value in given.items() if value is not None), None)
    if clash is not None:  # --samples refuses them too: they are about drawing samples
        # `--tokenizer RUN` alone reads as "evaluate this tokenizer": say which option that is.
        alone = clash == "--tokenizer" and checkpoint is None
        hint = f"; to score a tokenizer's reconstructions: --checkpoint {tokenizer}" if alone else ""
        raise UserError(f"{clash}: only with --generator (samples drawn now){hint}")
    with _said_if_interrupted():
        return evaluate_tokenizer(checkpoint, prefix=prefix, weights=weights, **common)


@contextmanager
def _said_if_interrupted() -> Iterator[None]:
    """Ctrl-C would end an evaluation without a word: one line that no scores were written (unless
    `report_written`, `sample_images` or `_kept_if_interrupted` said what it left)."""
    try:
        yield
    except KeyboardInterrupt as e:
        if not getattr(e, "said", False):
            logger.warning("interrupted: no scores written (metrics.json is written once all are computed)")
        raise
