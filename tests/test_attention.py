"""Explicit-matmul attention (CPU, reduced precision) agrees with SDPA, masks and causality included."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smapctl.models import attention
from smapctl.models.attention import Attention, attend, prefer_math


def test_the_math_path_is_chosen_only_on_cpu_in_reduced_precision():
    x = torch.zeros(2, 3)
    assert not prefer_math(x, 8, 16, 16)
    assert prefer_math(x.bfloat16(), 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prefer_math(x, 8, 16, 16)
    assert not prefer_math(x.bfloat16(), 1, attention.MAX_MATH_SCORES, 2)  # too large: SDPA's blocks


@pytest.mark.parametrize("mask", ["none", "key", "causal", "chunk"])
def test_attend_matches_sdpa(mask):
    torch.manual_seed(0)
    B, H, T, S, D = 2, 3, 5, 9 if mask == "chunk" else 5, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    attn_mask, causal = None, mask == "causal"
    if mask == "key":
        attn_mask = torch.rand(B, 1, 1, S) > 0.3
        attn_mask[..., 0] = True
    elif mask == "chunk":  # a chunk after a cached prefix, as the KV cache feeds it
        attn_mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=attn_mask, is_causal=causal)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_causal_mask_between_unequal_lengths_is_refused_on_both_paths(dtype):
    # SDPA aligns it to the top left, the explicit path aligned it to the bottom right: two answers.
    q, kv = torch.randn(1, 2, 2, 8, dtype=dtype), torch.randn(1, 2, 4, 8, dtype=dtype)
    with pytest.raises(ValueError, match="is_causal with 2 queries and 4 keys; pass attn_mask"):
        attend(q, kv, kv, is_causal=True)


def test_vit_attention_takes_the_same_path_either_way_and_keeps_timms_weights(monkeypatch):
    torch.manual_seed(0)
    layer = Attention(32, num_heads=4, qkv_bias=True)
    assert set(layer.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    x = torch.randn(2, 7, 32)
    keys = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keys[0, ..., 5:] = False
    want = layer(x, attn_mask=keys)  # fp32: SDPA
    assert len(sdpa_calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, attn_mask=keys)  # bf16 on the CPU: explicit matmuls
    assert len(sdpa_calls) == 1
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
    got.float().sum().backward()
    assert layer.qkv.weight.grad is not None and torch.isfinite(layer.qkv.weight.grad).all()


def test_vit_attention_computes_multi_head_attention_with_a_boolean_key_mask():
    """Checked against the formula itself (not timm's forward, whose explicit path read boolean masks
    as numbers before timm 1.0.26)."""
    torch.manual_seed(0)
    layer = Attention(32, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 7, 32)
    keys = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keys[0, ..., 4:] = False
    q, k, v = layer.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(~keys, float("-inf"))
    want = layer.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(layer(x, attn_mask=keys), want, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, attn_mask=keys)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [slice(0, 7), slice(-4, None)])
def test_attention_rows_equal_the_whole_output_sliced(rows, dtype):
    """`rows` skips the other rows' queries and projections; keys and values still come from every row."""
    torch.manual_seed(0)
    layer = Attention(32, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 11, 32)
    keys = torch.rand(2, 1, 1, 11) > 0.3
    keys[..., 0] = True
    for mask in (None, keys):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            want = layer(x, attn_mask=mask)[:, rows]
            got = layer(x, attn_mask=mask, rows=rows)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_refuses_attention_dropout_in_training():
    layer = Attention(32, num_heads=4, attn_drop=0.1).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        layer(torch.randn(1, 5, 32))
