import pytest
import torch
import torch.nn.functional as F
from test_card import tiny_card
from torch import nn

from smapctl.models import few_rows
from smapctl.models.card import CARD
from smapctl.models.few_rows import FEW_ROWS, FewRowsLinear, use_few_rows_linears, use_plain_linears
from smapctl.models.llamagen import LlamaGen, LlamaGenConfig


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (5, 24), (2, 3, 24), (FEW_ROWS, 24), (FEW_ROWS + 1, 24)])
def test_few_rows_linear_equals_f_linear(bias, shape):
    torch.manual_seed(0)
    layer = FewRowsLinear(24, 40, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-12, rtol=1e-12)
    rows = x.numel() // 24
    # The transposed route returns a transposed view; above FEW_ROWS rows it is plain F.linear.
    assert out.is_contiguous() == (rows == 1 or rows > FEW_ROWS)


def test_linear_without_the_module_call_takes_the_layers_own_route():
    # `few_rows.linear(layer, x)` is `layer(x)` minus the module call: the transposed route for a
    # FewRowsLinear on few rows, F.linear for a plain layer (so use_plain_linears turns both off).
    torch.manual_seed(0)
    few = FewRowsLinear(24, 40).double()
    plain = nn.Linear(24, 40).double()
    plain.load_state_dict(few.state_dict())
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.inference_mode():
        fast, slow = few_rows.linear(few, x), few_rows.linear(plain, x)
    assert not fast.is_contiguous() and slow.is_contiguous()
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(slow, F.linear(x, plain.weight, plain.bias), atol=0, rtol=0)


def test_few_rows_linear_trains_through_f_linear():
    torch.manual_seed(0)
    few, plain = FewRowsLinear(8, 4), nn.Linear(8, 4)
    plain.load_state_dict(few.state_dict())
    x = torch.randn(3, 8)
    few(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert few(x).is_contiguous()  # grad mode: the plain route
    torch.testing.assert_close(few.weight.grad, plain.weight.grad)
    torch.testing.assert_close(few.bias.grad, plain.bias.grad)


def test_conversion_keeps_parameters_and_state_dict_keys():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    keys, weight = list(mlp.state_dict()), mlp[0].weight
    assert use_few_rows_linears(mlp) is mlp
    assert all(type(m) is FewRowsLinear for m in (mlp[0], mlp[2]))
    assert list(mlp.state_dict()) == keys and mlp[0].weight is weight
    assert isinstance(mlp[0], nn.Linear)
    assert use_plain_linears(mlp) is mlp and all(type(m) is nn.Linear for m in (mlp[0], mlp[2]))
    assert list(mlp.state_dict()) == keys and mlp[0].weight is weight


def test_samplers_give_the_same_results_as_with_plain_linears():
    # Both generators' decode steps go through FewRowsLinear; the plain layers must give the same samples.
    card = tiny_card(torch.float64)
    assert any(type(m) is FewRowsLinear for m in card.blocks.modules())
    # The flow head's 25 steps per token run its blocks' and final linears on a few rows too.
    head = [card.head.final.linear] + [m for b in card.head.blocks for m in (b.mlp.fc1, b.mlp.fc2)]
    assert all(type(m) is FewRowsLinear for m in head)
    labels = torch.tensor([0, 2, 1])

    def card_sample(model: CARD):
        return model.sample(labels, cfg_scale=2.0, steps=4, generator=torch.Generator().manual_seed(0))

    fast = card_sample(card)
    torch.testing.assert_close(fast, card_sample(use_plain_linears(card)), atol=1e-10, rtol=1e-10)

    torch.manual_seed(0)
    cfg = LlamaGenConfig(
        vocab_size=16, num_tokens=6, num_classes=3, class_dim=8, width=32, depth=2, num_heads=4
    )
    ar = LlamaGen(cfg).double().eval()
    with torch.no_grad():
        for p in ar.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert any(type(m) is FewRowsLinear for m in ar.blocks.modules())

    def ar_indices(model: LlamaGen):
        with torch.inference_mode():
            return [
                model.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(s))
                for s in range(3)
            ]

    fast = ar_indices(ar)
    for a, b in zip(fast, ar_indices(use_plain_linears(ar)), strict=True):
        assert torch.equal(a, b)


def test_cached_decode_step_gives_attention_unit_stride_heads(monkeypatch):
    # A few-row qkv output is a transposed view; SDPA's CPU flash kernel needs q, k and v with unit stride
    # in their last dim and otherwise falls back to its slower math path. The decode step must hand
    # attention such tensors.
    from smapctl.models import kv_attention

    seen = []

    def recording_attend(q, k, v, **kw):
        seen.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return F.scaled_dot_product_attention(q, k, v, **kw)

    monkeypatch.setattr(kv_attention, "attend", recording_attend)
    model = tiny_card().eval()
    with torch.inference_mode():
        model.sample(torch.arange(3), cfg_scale=2.0, steps=2, num_tokens=3)
    assert seen and all(strides == (1, 1, 1) for strides in seen)


def test_flow_head_sampling_runs_its_blocks_and_final_linears_on_the_few_row_route(monkeypatch):
    # The head evaluates its velocity `steps` times per token on the batch's rows: each of those runs
    # must reach FewRowsLinear.forward (the module call is skipped: `few_rows.linear`).
    card = tiny_card().eval()
    head = card.head
    linears = [head.final.linear] + [m for b in head.blocks for m in (b.mlp.fc1, b.mlp.fc2)]
    calls = []
    forward = FewRowsLinear.forward

    def counted(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(FewRowsLinear, "forward", counted)
    z = torch.randn(6, card.cfg.width)
    with torch.inference_mode():
        head.sample(z, steps=3, cfg_scale=2.0)
    assert len(calls) == 3 * len(linears) and {id(m) for m in calls} == {id(m) for m in linears}
