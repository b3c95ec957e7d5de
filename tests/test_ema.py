"""The exponential moving average of the weights (smapctl/train/ema.py)."""

import pytest
import torch
from torch import nn

from smapctl.train.ema import EMA


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


def test_a_tied_parameter_is_averaged_under_each_of_its_names():
    """The shadow is keyed like `model.state_dict()`, which names a tied parameter once per module: every
    name must be there (and averaged), or the saved EMA does not load into a fresh model."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    ema = EMA(model, decay=0.5)
    start = a.weight.detach().clone()
    with torch.no_grad():
        a.weight.add_(1.0)
    ema.update(model)
    state = ema.state_dict()
    assert set(state) == set(model.state_dict())
    for name in ("0.weight", "1.weight"):
        torch.testing.assert_close(state[name], start + 0.5)
    fresh = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    fresh.load_state_dict(state)  # strict


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_a_decay_outside_0_to_1_is_refused(decay):
    """decay 1 would keep the starting weights for ever (the average never moves)."""
    with pytest.raises(ValueError, match="EMA decay must be in \\[0, 1\\)"):
        EMA(_ema_model(), decay)
