"""How often a training step makes the host wait for the device.

On a GPU every conversion of a device tensor to a Python value (`.item()`, `float(t)`, `int(t)`,
`bool(t)`, `.tolist()`) and every boolean-mask index waits for all queued work to finish, so the host
stops feeding the GPU. smapctl's steps made 4 to 20 such waits. On the CPU they can be seen two ways:
- the models' training forward and backward run on the meta device, where any read of a value fails;
- the training loop's own reads are counted in a step that does not log: they must be only what a step
  needs (the loss is finite on every process before the backward, the gradients are before the update,
  and no process was asked to stop); the loss terms are read once per logged row.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from tiny_tokenizer import ROOT, load, regularizer_sets, tiny_generator_model, write_recipe
from torch.overrides import TorchFunctionMode

from smapctl.models.smap import SMAP
from smapctl.recipe import load_generator_recipe
from smapctl.train import runner
from smapctl.train.generator import build_generator, train_generator
from smapctl.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow

SYNCS = {"item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__"}
STEPS = 4
# What a step needs (runner.py): the loss is finite, the gradients are, nobody was asked to stop.
NEEDED = {"is_finite", "clip_and_step", "_stop_requested"}


class _CountSyncs(TorchFunctionMode):
    """Counts the syncing calls made from smapctl's code, by function, for each step (`step` is set by
    the wrapper around the run's step loop; None outside it)."""

    def __init__(self):
        super().__init__()
        self.step: int | None = None
        self.calls: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        syncs = name in SYNCS
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            syncs = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if syncs and self.step is not None:
            for frame in reversed(traceback.extract_stack()[:-1]):
                if "/smapctl/" in frame.filename:
                    where = frame.filename.split("/smapctl/")[-1]
                    # The training loop's code; the models are checked on the meta device, and the data
                    # are read on the host (in loader processes on a GPU machine).
                    if where.startswith("train/"):
                        self.calls[self.step][f"{where}:{frame.lineno} {frame.name}"] += 1
                    break
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """A sync counter over the steps of the next training run."""
    counter = _CountSyncs()
    steps = runner.TrainingRun._steps

    def counted_steps(self, batches):
        for index, item in enumerate(steps(self, batches)):
            counter.step = index  # also covers the loop's own work after the step, up to the next one
            yield item
        counter.step = None

    monkeypatch.setattr(runner.TrainingRun, "_steps", counted_steps)
    return counter


def _assert_only_needed_syncs(counter: _CountSyncs) -> None:
    # The last step logs its row (one read of the window); the ones before must not wait otherwise.
    assert sorted(counter.calls) == list(range(STEPS)), counter.calls
    for step in range(STEPS - 1):
        calls = counter.calls[step]
        unneeded = {where: n for where, n in calls.items() if where.rsplit(" ", 1)[1] not in NEEDED}
        assert not unneeded, f"step {step}: syncs beyond the needed ones: {unneeded}"
        assert sum(calls.values()) <= 4, f"step {step}: {dict(calls)}"


QUIET = [
    f"train.max_steps={STEPS}",
    f"train.log_every={STEPS}",
    "train.sample_every=100",
    "train.ckpt_every=100",
]
DROPPING = {
    "uniform per sample": [],
    "pow2 per batch": ["model.tail_drop=pow2", "model.tail_drop_per_sample=false"],
}


@pytest.mark.parametrize("kind", ["kl", "vq", "softvq"])
def test_a_tokenizer_step_waits_for_the_device_only_where_it_must(tmp_path, counted, kind):
    sets = [*regularizer_sets(kind), *QUIET]
    if kind == "vq":  # the GAN's second optimizer and gradient accumulation as well
        sets += ["loss.gan_weight=0.1", "loss.gan_start_step=0", "loss.disc_width=8", "loss.disc_layers=2"]
        sets += ["train.grad_accum_steps=2"]
    else:  # per-batch prefix lengths, drawn from non-uniform weights
        sets += DROPPING["pow2 per batch"]
    with counted:
        train_tokenizer(load(write_recipe(tmp_path), *sets), tmp_path / "run")
    _assert_only_needed_syncs(counted)
    if kind == "vq":  # one read of both optimizers' gradient norms, not one per optimizer
        calls = counted.calls[0]
        assert sum(n for where, n in calls.items() if where.endswith(" clip_and_step")) == 1, calls


@pytest.mark.parametrize("kind", ["card", "maskgit"])
def test_a_generator_step_waits_for_the_device_only_where_it_must(
    tmp_path, counted, kind, tiny_kl_tokenizer, tiny_vq_tokenizer
):
    tokenizer = tiny_kl_tokenizer if kind == "card" else tiny_vq_tokenizer
    sets = [
        f"latents.tokenizer={tokenizer}",
        *tiny_generator_model(kind),
        *QUIET,
        "train.batch_size=8",
        "train.precision='no'",
    ]
    recipe = load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets)
    with counted:
        train_generator(recipe, tmp_path / "run")
    _assert_only_needed_syncs(counted)


@pytest.mark.parametrize("dropping", DROPPING)
@pytest.mark.parametrize("kind", ["kl", "vq", "softvq"])
def test_the_tokenizer_trains_on_the_meta_device(tmp_path, kind, dropping):
    """The prefix lengths are drawn on the host and the codebook statistics need no histogram size:
    nothing in the forward or backward reads a value."""
    recipe = load(write_recipe(tmp_path), *regularizer_sets(kind), *DROPPING[dropping])
    with torch.device("meta"):
        model = SMAP(recipe.model).train()
        images, labels = torch.empty(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    out = model(images, labels)
    (out.recon.float().square().mean() + out.reg.loss).backward()
    assert out.recon.shape == (4, 3, 16, 16) and out.keep.device.type == "meta"
    assert all(v.device.type == "meta" for v in out.reg.stats.values())


@pytest.mark.parametrize("kind", ["card", "llamagen", "maskgit"])
def test_the_generators_train_on_the_meta_device(kind):
    """MaskGIT's loss ignores the unmasked positions instead of indexing the masked ones out."""
    recipe = load_generator_recipe(
        ROOT / "recipes/demo/generator.yaml", ["class_embed=independent", *tiny_generator_model(kind)]
    )
    with torch.device("meta"):
        generator = build_generator(recipe, None).train()
        tokens = torch.empty(4, 8, 16) if kind == "card" else torch.zeros(4, 8, dtype=torch.long)
        labels = torch.zeros(4, dtype=torch.long)
    loss = generator(tokens, labels).loss
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == ()
