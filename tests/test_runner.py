"""The training run's accelerator and optimiser step (smapctl/train/runner.py): loss scaling, refused
sharding, the launcher's settings that are not used."""

import logging

import pytest
import torch
from torch import nn

from smapctl.errors import UserError
from smapctl.train.config import TrainConfig


def _two_nets_under_a_loss_scale(tmp_path, *sets: str, **scaler_settings):
    """A training run with the loss scaler accelerate sets up for train.precision fp16 on a GPU, and two
    (network, optimizer) pairs (a tokenizer and its discriminator, say) after one backward each: weights
    0, SGD at lr 1, a gradient of 1 for every weight. -> (run, scaler, pairs)."""
    from tiny_tokenizer import load, write_recipe

    from smapctl.train.runner import TrainingRun

    run = TrainingRun(
        load(write_recipe(tmp_path), *sets), tmp_path / "run", kind="tokenizer", build_model=None
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, **scaler_settings)
    run.accelerator.scaler = scaler
    pairs = []
    for _ in range(2):
        net = nn.Linear(2, 1, bias=False)
        nn.init.zeros_(net.weight)
        pairs.append(run.prepare(net, torch.optim.SGD(net.parameters(), lr=1.0)))
    for net, _ in pairs:
        scaler.scale(net(torch.ones(1, 2)).sum()).backward()
    return run, scaler, pairs


@pytest.mark.parametrize("grad_clip", [0.0, 1e6], ids=["no-clip", "clip"])
def test_under_an_fp16_loss_scale_each_optimizer_steps_on_its_own_gradients(tmp_path, grad_clip):
    """fp16 on a GPU: a tokenizer and its discriminator step together under one loss scale. Each steps on
    its true gradients, and the scale is updated once for the step (accelerate's per-optimizer step
    updated it after the first, and the second's gradients were divided by the scale again)."""
    run, scaler, pairs = _two_nets_under_a_loss_scale(
        tmp_path, f"train.grad_clip={grad_clip}", growth_interval=1
    )
    assert run.clip_and_step(*pairs)
    for net, _ in pairs:
        assert torch.equal(net.weight.detach(), -torch.ones(1, 2))  # lr 1 x gradient 1
        assert net.weight.grad is None
    assert scaler.get_scale() == 2048.0  # grown once (growth_interval 1): one update for the step


def test_sharded_training_is_refused_and_data_parallel_is_not():
    from accelerate.utils import DistributedType

    from smapctl.train.runner import refuse_sharding

    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(UserError, match=f"accelerate is configured for {sharded.value}, which smapctl"):
            refuse_sharding(sharded)
    for plain in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        refuse_sharding(plain)


@pytest.mark.parametrize(("flag", "name"), [("FSDP", "FSDP"), ("DEEPSPEED", "DEEPSPEED")])
def test_sharding_asked_by_accelerate_launch_is_refused_before_accelerate_sets_it_up(monkeypatch, flag, name):
    """`accelerate launch --use_fsdp --num_processes 2` on the CPU stopped in accelerate's own set-up with
    a traceback from every process (FSDP cannot start there) before the refusal was reached."""
    from smapctl.train.runner import make_accelerator

    monkeypatch.setenv(f"ACCELERATE_USE_{flag}", "true")
    with pytest.raises(UserError, match=f"accelerate is configured for {name}, which smapctl does not train"):
        make_accelerator(TrainConfig(precision="no"))


def test_under_an_fp16_loss_scale_an_overflow_skips_every_optimizer_and_lowers_the_scale(tmp_path):
    """An inf in the discriminator's gradients (the scale overflowed): neither network steps (the
    tokenizer did, on its own), the scale is halved, and the step does not count towards
    train.max_nonfinite_steps (an overflow is how the scale finds its level)."""
    run, scaler, pairs = _two_nets_under_a_loss_scale(tmp_path)
    pairs[1][0].weight.grad[0, 0] = float("inf")
    assert not run.clip_and_step(*pairs)
    for net, _ in pairs:
        assert torch.equal(net.weight.detach(), torch.zeros(1, 2)) and net.weight.grad is None
    assert scaler.get_scale() == 512.0
    assert run._step_skipped is None  # not counted: the loop goes on


def test_under_an_fp16_loss_scale_gradients_non_finite_at_any_scale_stop_the_run(tmp_path):
    """NaN gradients from a finite loss are no overflow: halving the scale cannot help, and each step was
    skipped in silence for ever (the scale went to 0). Once the scale is down to 1 they count towards
    train.max_nonfinite_steps, as without a scaler, and stop the run."""
    run, scaler, pairs = _two_nets_under_a_loss_scale(tmp_path, "train.max_nonfinite_steps=3")
    skipped = []
    with pytest.raises(UserError, match="the gradients were not finite 3 steps in a row"):
        for _ in range(40):
            for net, _ in pairs:
                net.weight.grad = torch.full((1, 2), float("nan"))
            assert not run.clip_and_step(*pairs)
            skipped.append(run._step_skipped)
            run._count_skipped_step()
    # 1024 halved 10 times reaches the floor of 1: the 11th to 13th steps count, and the scale stays there
    # (halved on, it would start the next finite steps below 1, where fp16 gradients underflow).
    assert skipped == [None] * 10 + ["gradients"] * 3 and scaler.get_scale() == 1


def test_a_dynamo_backend_of_accelerate_launch_is_said_and_not_used(monkeypatch, caplog):
    """`accelerate launch` with a config that names a dynamo backend compiled every network, past
    train.compile and the settings the GAN's adaptive weight needs under compilation (and turned TF32 on
    for fp32 on a GPU)."""
    from accelerate.state import AcceleratorState

    from smapctl.train.runner import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=False)  # a state made earlier keeps its backend
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        accelerator = make_accelerator(TrainConfig(precision="no"))
    assert "accelerate's dynamo backend INDUCTOR is not used: smapctl compiles" in caplog.text
    assert type(accelerator.prepare(nn.Linear(2, 2))) is nn.Linear
    AcceleratorState._reset_state(reset_partial_state=False)


def test_a_mixed_precision_of_accelerate_launch_is_said_and_not_used(monkeypatch, caplog):
    """`accelerate launch --mixed_precision bf16` (or its config file's) passes the precision on in the
    environment; the recipe's train.precision is what trains, and the launcher's was dropped without a
    word (a run launched with bf16 trained in fp32)."""
    from accelerate.state import AcceleratorState

    from smapctl.train.runner import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        accelerator = make_accelerator(TrainConfig(precision="no"))
    assert accelerator.mixed_precision == "no"
    assert (
        "accelerate's mixed precision bf16 is not used: the recipe's train.precision (no) decides, fp32 "
        "here; --set train.precision=bf16 trains in bf16"
    ) in caplog.text
    caplog.clear()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # a GPU's: not offered on the CPU
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        make_accelerator(TrainConfig(precision="no"))
    assert caplog.text.rstrip().endswith("the recipe's train.precision (no) decides, fp32 here")
    caplog.clear()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default: not said
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        make_accelerator(TrainConfig(precision="no"))
    assert "mixed precision" not in caplog.text
    AcceleratorState._reset_state(reset_partial_state=False)


def test_prepared_loaders_copy_pinned_batches_to_the_gpu_without_blocking():
    """The training loaders pin their batches on a GPU machine; accelerate copies them with
    `non_blocking` only when told to (otherwise each copy waits and pinning buys nothing)."""
    from smapctl.train.runner import make_accelerator

    assert make_accelerator(TrainConfig(precision="no")).dataloader_config.non_blocking


def test_under_an_fp16_loss_scale_intermittent_non_finite_gradients_keep_the_scale_at_1(tmp_path):
    """NaN gradients every other step never reach max_nonfinite_steps in a row; halving on each of them
    took the scale towards 0 (1e-9 after 80 steps), training nothing. Counted steps keep it at 1."""
    run, scaler, pairs = _two_nets_under_a_loss_scale(tmp_path, growth_interval=1000)
    for step in range(40):
        for net, _ in pairs:
            net.weight.grad = torch.full((1, 2), float("nan") if step % 2 else 1.0)
        run.clip_and_step(*pairs)
        run._count_skipped_step()
    assert scaler.get_scale() == 1.0
