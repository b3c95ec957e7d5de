"""Schedule, optimiser groups, EMA, metrics logging and graceful stop."""

import logging
import math
import os
import signal
import sys
import time

import pytest
import torch
from faults import fill_disk
from torch import nn

from smapctl.errors import UserError
from smapctl.models.smap import SMAP, SMAPConfig
from smapctl.train.config import TrainConfig
from smapctl.train.ema import EMA
from smapctl.train.logging import MetricsWriter, format_postfix, read_metrics
from smapctl.train.schedule import build_optimizer, build_scheduler, lr_at
from smapctl.train.signals import GracefulStop

# ------------------------------------------------------------------------------------------ schedule


def test_lr_at_key_steps():
    cfg = TrainConfig(max_steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the middle
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # past the end: stays at the floor
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_lr_at_without_warmup_or_decay():
    assert lr_at(0, TrainConfig(max_steps=10, lr=2e-4)) == pytest.approx(2e-4)
    assert lr_at(10, TrainConfig(max_steps=10, lr=2e-4)) == pytest.approx(0.0, abs=1e-20)
    flat = TrainConfig(max_steps=10, lr=2e-4, min_lr_ratio=1.0)
    assert [lr_at(s, flat) for s in range(12)] == pytest.approx([2e-4] * 12)
    # Warm-up as long as training: constant after it, no division by zero.
    long = TrainConfig(max_steps=5, lr=1e-3, warmup_steps=8)
    assert lr_at(7, long) == pytest.approx(1e-3) and lr_at(20, long) == pytest.approx(1e-3)


def test_scheduler_follows_lr_at_for_every_group():
    cfg = TrainConfig(max_steps=20, lr=1e-3, warmup_steps=5, min_lr_ratio=0.2)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 4e-3}], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg))
        assert opt.param_groups[1]["lr"] == pytest.approx(4 * lr_at(step, cfg))
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------ optimiser


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_optimizer_decays_only_layer_weights():
    m = _Toy()
    opt = build_optimizer(m, TrainConfig(weight_decay=0.05, lr=3e-4, betas=(0.9, 0.95)))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(m.conv.weight), id(m.lin.weight)}
    expect_plain = [m.embed.weight, m.pos_embed, m.conv.bias, m.lin.bias, m.norm.weight, m.norm.bias]
    assert {id(p) for p in plain["params"]} == {id(p) for p in expect_plain}  # frozen ones left out
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert decayed["fused"]  # CPU has a fused AdamW kernel in this torch


def test_optimizer_on_smap_leaves_tokens_and_embeddings_undecayed():
    size = dict(enc_width=32, enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)
    model = SMAP(SMAPConfig(image_size=16, patch_size=8, num_latent_tokens=4, num_classes=5, **size))
    opt = build_optimizer(model, TrainConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert {"encoder.pos_embed", "encoder.queries", "decoder.mask_token", "class_embed.table.weight"} <= plain
    assert "encoder.patch_embed.proj.weight" in decayed
    assert len(decayed) + len(plain) == len(names)
    loss = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])).recon.square().mean()
    loss.backward()
    opt.step()  # the fused CPU kernel runs


def test_optimizer_from_parameter_list_uses_ndim_and_lr_override():
    w, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    opt = build_optimizer([w, b], TrainConfig(weight_decay=0.1), lr=5e-5)
    assert opt.param_groups[0]["params"] == [w] and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["params"] == [b] and opt.param_groups[1]["lr"] == 5e-5


# ------------------------------------------------------------------------------------------ EMA


def _ema_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_update_matches_manual_average():
    model = _ema_model()
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 3))  # changes the BatchNorm running statistics
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], 0.9 * start[n] + 0.1 * p.detach(), rtol=0, atol=1e-6)
    for n, b in model.named_buffers():
        assert torch.equal(ema.shadow[n], b)  # buffers copied, not averaged
    assert set(ema.state_dict()) == set(model.state_dict())


def test_ema_keeps_float32_shadow_of_bf16_model():
    model = _ema_model().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert ema.shadow["0.weight"].dtype == torch.float32
    before = ema.shadow["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.5 * before + 0.5)


def test_ema_of_a_model_snapshotted_across_two_devices_follows_it_to_one():
    """A snapshot taken while the first parameter was already on the training device and the others were
    not (a generator built with the tokenizer's GPU-resident class table) must follow the model when
    `prepare` moves the rest. "meta" stands in for the GPU: the shadow then has to move, tensor by tensor."""
    model = _ema_model()
    model[0].to("meta")
    ema = EMA(model, decay=0.5)
    model.to("meta")
    ema.update(model)  # mixed devices in one lerp before
    assert {t.device.type for t in ema.shadow.values() if t.is_floating_point()} == {"meta"}


def test_ema_state_round_trip():
    model = _ema_model()
    ema = EMA(model, decay=0.5)  # never updated: the shadow is the starting weights
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    averaged = _ema_model()
    averaged.load_state_dict(ema.state_dict())
    for n, t in averaged.state_dict().items():
        assert torch.equal(t, trained[n])
    assert torch.equal(model[0].weight, 3.0 * trained["0.weight"])  # the training weights are left alone
    other = EMA(_ema_model(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    fresh = _ema_model()
    with torch.no_grad():
        fresh[0].weight.zero_()
    fresh.load_state_dict(other.state_dict())
    assert torch.equal(fresh[0].weight, trained["0.weight"])
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({})


@pytest.mark.parametrize("decay", [0.5, 0.0])
def test_a_released_ema_keeps_nothing_and_refuses_to_be_read(decay):
    """A launcher's other processes keep no average (only the main one evaluates and saves it)."""
    model = _ema_model()
    ema = EMA(model, decay=decay)
    ema.release()
    assert ema.shadow == {} and ema.model is None
    ema.update(model)  # nothing to move
    assert ema.shadow == {}
    for read in (ema.state_dict, lambda: ema.load_state_dict({})):
        with pytest.raises(RuntimeError, match="this process keeps no EMA"):
            read()


def test_ema_with_decay_0_is_the_model_itself_without_a_copy():
    """`ema_decay: 0` (llamagen_3b.yaml: LlamaGen samples its raw weights) kept a float32 copy all the
    same: 12 GB per process for a 3B model."""
    model = _ema_model()
    ema = EMA(model, decay=0.0)
    assert ema.shadow == {}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model(torch.randn(8, 3))  # new BatchNorm statistics
    ema.update(model)
    state = ema.state_dict()
    assert state.keys() == model.state_dict().keys()
    for n, t in model.state_dict().items():
        assert torch.equal(state[n], t)
    fresh = _ema_model()
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh[0].weight, model[0].weight)
    ema.load_state_dict(EMA(_ema_model(), decay=0.5).state_dict())  # keys checked; the model's own stay
    assert torch.equal(model[0].weight, fresh[0].weight)
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({})


# ------------------------------------------------------------------------------------------ logging


def test_metrics_writer_appends_json_lines_on_main_only(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    with MetricsWriter(path, is_main=True) as w:
        w.log(1, {"loss": torch.tensor(0.5), "lr": 1e-4, "bad": float("nan")})
    with MetricsWriter(path, is_main=True) as w:  # a resumed run appends
        w.log(2, {"loss": 0.25})
    MetricsWriter(tmp_path / "other.jsonl", is_main=False).log(3, {"loss": 1.0})
    assert not (tmp_path / "other.jsonl").exists()
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # torn line from a killed process
    rows = read_metrics(path)
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-4, "bad": None}, {"step": 2, "loss": 0.25}]


def test_metrics_writer_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    fill_disk(monkeypatch, free=30)
    with MetricsWriter(tmp_path / "metrics.jsonl", is_main=True) as w:
        w.log(1, {"loss": 0.5})  # 25 bytes: fits
        with pytest.raises(UserError) as e:
            w.log(2, {"loss": 0.25})
    assert str(e.value) == (
        f"{tmp_path / 'metrics.jsonl'}: could not write the metrics (No space left on device): the disk is "
        "full; free some space or write elsewhere; the checkpoints written so far are intact (continue "
        "with --resume)"
    )


def test_format_postfix():
    post = format_postfix({"loss": torch.tensor(0.123456), "kimg": 12, "gn": math.inf})
    assert post == {"loss": "0.1235", "kimg": "12", "gn": "inf"}


# ------------------------------------------------------------------------------------------ signals


def _wait_for(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_graceful_stop_sets_flag_then_second_sigint_interrupts():
    # Python's own Ctrl-C handler, as in a terminal: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and then a second Ctrl-C has nothing to re-deliver to.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        prev_term = signal.getsignal(signal.SIGTERM)
        with GracefulStop(announce=False) as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert _wait_for(lambda: stop.requested)
            assert stop.signal_name == "SIGTERM"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for(lambda: False, seconds=2.0)
            # The second signal already put the previous handlers back.
            assert signal.getsignal(signal.SIGTERM) is prev_term
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is prev_term
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL])
def test_a_second_sigint_stops_a_process_that_started_with_sigint_ignored(inherited):
    """`cmd &` in a non-interactive shell starts the process with SIGINT ignored: the second Ctrl-C (or
    `kill -INT`) was re-delivered to that, said "stopping at once", and the run went on."""
    outer = signal.signal(signal.SIGINT, inherited)
    try:
        with GracefulStop(announce=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_for(lambda: stop.requested)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for(lambda: False, seconds=2.0)
    finally:
        signal.signal(signal.SIGINT, outer)


def test_graceful_stop_restores_handlers_on_exit():
    prev = signal.getsignal(signal.SIGINT)
    with GracefulStop(announce=False) as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested) and stop.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is prev


def test_a_second_sigterm_ends_the_process_at_once(monkeypatch):
    """smapctl's own SIGTERM handler (outside training loops) raises an exception, which a process stuck
    in a long call would not see; the second SIGTERM of a loop goes to the system's default: the end."""

    def raising(*_):
        raise KeyboardInterrupt

    sent = []
    before = signal.signal(signal.SIGTERM, raising)
    try:
        with GracefulStop(announce=False) as stop:
            monkeypatch.setattr(signal, "raise_signal", sent.append)
            stop._handle(signal.SIGTERM, None)
            assert stop.requested and sent == []
            stop._handle(signal.SIGTERM, None)
            assert sent == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_signal_line_ends_a_terminals_progress_bar_first(monkeypatch, capsys):
    """On a terminal the line "SIGINT: finishing this step..." begins on a line of its own, below the bar
    being drawn; in a log file (no bar) it left a blank line before it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with GracefulStop(announce=True) as stop:
        stop._handle(signal.SIGINT, None)
    assert capsys.readouterr().err.startswith("\nSIGINT: finishing this step")


def test_a_second_signal_says_the_run_stops_at_once(monkeypatch, capsys):
    """After the first signal's line ("finishing this step...") a second Ctrl-C ended the run silently."""
    sent = []
    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(announce=True) as stop:
            monkeypatch.setattr(signal, "raise_signal", sent.append)
            stop._handle(signal.SIGINT, None)
            stop._handle(signal.SIGINT, None)
            assert sent == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, before)
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("SIGINT: finishing this step and saving a checkpoint")  # no blank line before
    assert second == (
        "SIGINT again: stopping at once, without this step's checkpoint; --resume goes on from the newest one"
    )


def test_a_caught_signal_is_remembered_for_the_exit_status(monkeypatch):
    """The command exits with 128 + the signal that stopped its loop (130 for Ctrl-C), so a chained
    `train-tokenizer && train-generator` does not go on: the handler must record it, not only set the flag."""
    monkeypatch.setattr(GracefulStop, "last_signal", None)
    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(announce=False) as stop:
            stop._handle(signal.SIGINT, None)
            assert stop.requested and stop.signal_name == "SIGINT"
    finally:
        signal.signal(signal.SIGINT, before)
    assert GracefulStop.last_signal == signal.SIGINT


def test_a_signal_still_stops_the_loop_when_stderr_is_closed(monkeypatch):
    """Writing the "finishing this step" line to a closed stderr raises ValueError (a reentrant write:
    RuntimeError): raised from the handler, it would end the run mid-step instead of asking it to stop."""
    import io

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(announce=True) as stop:
            stop._handle(signal.SIGINT, None)
            assert stop.requested
    finally:
        signal.signal(signal.SIGINT, before)
        GracefulStop.last_signal = None


def test_a_signal_another_process_received_leaves_this_ones_own_as_its_first(monkeypatch):
    """A launcher signals each of its processes, not at once: a process that stopped for another's SIGTERM
    took its own, arriving next, for a second one and ended at once, in the middle of the checkpoint."""
    sent = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        with GracefulStop(announce=False) as stop:
            monkeypatch.setattr(signal, "raise_signal", sent.append)
            stop.take("SIGTERM")
            assert stop.signal_name == "SIGTERM" and GracefulStop.last_signal == signal.SIGTERM
            stop._handle(signal.SIGTERM, None)  # its own
            assert stop.requested and sent == []
            stop.take("SIGINT")  # a signal of its own stays
            assert stop.signal_name == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, before)
        GracefulStop.last_signal = None


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
    # 1024 halved 10 times reaches the floor of 1: the 11th to 13th steps count.
    assert skipped == [None] * 10 + ["gradients"] * 3


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
