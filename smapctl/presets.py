"""The paper's model sizes in visible tables: name -> config, for the tokenizer and the generators.

## SMAP

SMAP (section 4.1): 185M / 391M / 568M parameters for S / B / L. The paper does not give the towers'
sizes; we choose ViT towers whose counts land within 1% (measured with a KL regularizer, 256 px,
patch 16, 128 tokens; VQ and SoftVQ differ by at most 0.32%):

| preset | encoder (depth x width, heads) | decoder (depth x width, heads) | parameters | paper |
|--------|--------------------------------|--------------------------------|------------|-------|
| SMAP-S | 12 x 768, 12 (ViT-B)           | 14 x 768, 12                   | 186.9M     | 185M  |
| SMAP-B | 12 x 768, 12 (ViT-B)           | 24 x 1024, 16 (ViT-L)          | 391.0M     | 391M  |
| SMAP-L | 21 x 1024, 16                  | 24 x 1024, 16 (ViT-L)          | 570.3M     | 568M  |

## Generators

CARD (paper table 1), LlamaGen (its published GPT sizes), MaskGIT-ViT (table 7).

Token shapes default to the paper's main setting: SMAP(KL)-B-128 latents (128 tokens x 16 channels) for
CARD, SMAP-VQ-128 indices (codebook 8192) for LlamaGen and MaskGIT, 1000 classes, and a class table of
width 768 (SMAP-B's encoder width; with semantic condition sharing it must match the tokenizer).

Parameter counts measured on the meta device (`with torch.device("meta"): CARD(cfg)`), including the
generator's own class table (1001 x 768 = 0.77M; with a shared table it belongs to the tokenizer):

| preset      | depth x width (heads) | head depth x width | measured | paper / published | diff  |
|-------------|-----------------------|--------------------|----------|-------------------|-------|
| CARD-B      | 24 x 768 (12)         | 6 x 1024           | 243.5M   | 234M              | +4.0% |
| CARD-L      | 32 x 1024 (16)        | 8 x 1280           | 564.5M   | 568M              | -0.6% |
| CARD-XL     | 40 x 1280 (16)        | 12 x 1536          | 1108.4M  | 1.1B              | +0.8% |
| LlamaGen-B  | 12 x 768 (12)         |                    | 98.9M    | 111M              |       |
| LlamaGen-L  | 24 x 1024 (16)        |                    | 326.7M   | 343M              |       |
| LlamaGen-XL | 36 x 1280 (20)        |                    | 754.2M   | 775M              |       |
| LlamaGen-XXL| 48 x 1536 (24)        |                    | 1386.2M  | 1.4B              |       |
| LlamaGen-3B | 24 x 3200 (32)        |                    | 3044.3M  | 3.1B              |       |
| MaskGIT-ViT | 24 x 768 (16)         |                    | 178.5M   | 177M              | +0.8% |

LlamaGen's published sizes are for a 16384-entry codebook; with SMAP-VQ's 8192 entries the input and
output embeddings hold 2 x 8192 x width fewer parameters (with vocab_size=16384 the counts come to
111.5M / 343.4M / 775.2M / 1411.4M / 3096.7M).

Reading of CARD's table 1: transformer blocks of 12 d^2 plus a 3 d^2 adaLN modulation (not DiT's 6 d^2;
the counts do not decide the block's form: `card.py` runs a parallel block, our choice), and a flow head
whose residual blocks hold 2 w^2 (two linears) plus a 2 w^2 adaLN (shift, scale). A 3 w^2 (shift, scale,
gate) head modulation as in MAR would give 249.8M / 577.6M / 1136.8M, CARD-B 6.7% over the paper.
"""

from smapctl.config import register_presets
from smapctl.models.card import CARDConfig
from smapctl.models.llamagen import LlamaGenConfig
from smapctl.models.maskgit import MaskGITConfig
from smapctl.models.smap import SMAPConfig

_VIT_B = dict(width=768, heads=12)
_VIT_L = dict(width=1024, heads=16)


def _smap(enc_depth: int, enc: dict, dec_depth: int, dec: dict) -> SMAPConfig:
    return SMAPConfig(
        enc_width=enc["width"],
        enc_depth=enc_depth,
        enc_heads=enc["heads"],
        dec_width=dec["width"],
        dec_depth=dec_depth,
        dec_heads=dec["heads"],
    )


SMAP_PRESETS: dict[str, SMAPConfig] = {
    "SMAP-S": _smap(12, _VIT_B, 14, _VIT_B),
    "SMAP-B": _smap(12, _VIT_B, 24, _VIT_L),
    "SMAP-L": _smap(21, _VIT_L, 24, _VIT_L),
}

CARD_PRESETS: dict[str, CARDConfig] = {
    "CARD-B": CARDConfig(depth=24, width=768, num_heads=12, head_depth=6, head_width=1024),
    "CARD-L": CARDConfig(depth=32, width=1024, num_heads=16, head_depth=8, head_width=1280),
    "CARD-XL": CARDConfig(depth=40, width=1280, num_heads=16, head_depth=12, head_width=1536),
}

LLAMAGEN_PRESETS: dict[str, LlamaGenConfig] = {
    "LlamaGen-B": LlamaGenConfig(depth=12, width=768, num_heads=12),
    "LlamaGen-L": LlamaGenConfig(depth=24, width=1024, num_heads=16),
    "LlamaGen-XL": LlamaGenConfig(depth=36, width=1280, num_heads=20),
    "LlamaGen-XXL": LlamaGenConfig(depth=48, width=1536, num_heads=24),
    "LlamaGen-3B": LlamaGenConfig(depth=24, width=3200, num_heads=32),
}

MASKGIT_PRESETS: dict[str, MaskGITConfig] = {
    "MaskGIT-ViT": MaskGITConfig(
        depth=24, width=768, num_heads=16, mlp_ratio=4.0
    ),  # maskgit_class_cond_config
}

# Parameter counts the paper reports, checked by the tests (within 5%).
PAPER_PARAMETERS: dict[str, float] = {
    "SMAP-S": 185e6,
    "SMAP-B": 391e6,
    "SMAP-L": 568e6,
    "CARD-B": 234e6,
    "CARD-L": 568e6,
    "CARD-XL": 1.1e9,
    "MaskGIT-ViT": 177e6,
}

register_presets(SMAPConfig, SMAP_PRESETS)
register_presets(CARDConfig, CARD_PRESETS)
register_presets(LlamaGenConfig, LLAMAGEN_PRESETS)
register_presets(MaskGITConfig, MASKGIT_PRESETS)
