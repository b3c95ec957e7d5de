"""The attention shared by CARD and LlamaGen (smapctl/models/kv_attention.py): the KV cache, causal
self-attention, rotary embeddings and the guidance schedule."""

import pytest
import torch

from smapctl.models.kv_attention import CausalSelfAttention, KVCache, RotaryEmbedding, guidance_schedule


def test_cache_fed_in_chunks_equals_one_causal_pass():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4).double()
    rope = RotaryEmbedding(4, 8).double()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    cache = KVCache(1, 2, 4, 8, 4, device=x.device, dtype=x.dtype)
    parts = []
    for lo, hi in ((0, 3), (3, 4), (4, 8)):  # prefill, one token, then a chunk after a prefix
        parts.append(attn(x[:, lo:hi], cache, 0, rope))
        cache.advance(hi - lo)
    torch.testing.assert_close(torch.cat(parts, dim=1), attn(x, None, 0, rope))


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 32).double()
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    score = lambda i, j: (rope(q, i) * rope(k, j)).sum()  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(20, 17))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_guidance_schedule():
    assert guidance_schedule(3.0, "constant", 3) == [3.0, 3.0, 3.0]
    # MAR: 1 + (s - 1) * (tokens known after the step) / K.
    assert guidance_schedule(3.0, "linear", 5) == pytest.approx([1.4, 1.8, 2.2, 2.6, 3.0])
    assert guidance_schedule(3.0, "linear", 1) == [3.0]
    with pytest.raises(ValueError, match="cfg_schedule"):
        guidance_schedule(3.0, "cosine", 5)


def test_rotary_rotates_each_pair_by_position_times_frequency():
    # RoFormer's rotation (Su et al.) in the half-split layout (LlamaGen's): channels i and i + Dh/2 form a
    # pair rotated by +p * theta_i, theta_i = base^(-2i / Dh): (a, b) -> (a cos - b sin, b cos + a sin).
    Dh, p = 4, 3
    rope = RotaryEmbedding(Dh, 8).double()
    x = torch.randn(1, 1, 1, Dh, dtype=torch.float64)
    theta = p * 10000.0 ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (Dh/2,)
    a, b = x[..., : Dh // 2], x[..., Dh // 2 :]
    want = torch.cat([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()], dim=-1)
    torch.testing.assert_close(rope(x, p), want)


def test_cache_stores_in_the_autocast_dtype():
    # Keys and values arrive in autocast's dtype (bf16): the cache holds them so, not in the weights' fp32
    # (twice the memory, and a cast at every write).
    cpu = torch.device("cpu")
    assert KVCache.storage_dtype(cpu, torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KVCache.storage_dtype(cpu, torch.float32) == torch.bfloat16
