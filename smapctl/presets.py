"""The paper's model sizes in one visible table: name -> config.

SMAP (section 4.1): 185M / 391M / 568M parameters for S / B / L. The paper does not give the towers'
sizes; we choose ViT towers whose counts land within 1% (measured with a KL regularizer, 256 px,
patch 16, 128 tokens; VQ and SoftVQ differ by at most 0.32%):

| preset | encoder (depth x width, heads) | decoder (depth x width, heads) | parameters | paper |
|--------|--------------------------------|--------------------------------|------------|-------|
| SMAP-S | 12 x 768, 12 (ViT-B)           | 14 x 768, 12                   | 186.9M     | 185M  |
| SMAP-B | 12 x 768, 12 (ViT-B)           | 24 x 1024, 16 (ViT-L)          | 391.0M     | 391M  |
| SMAP-L | 21 x 1024, 16                  | 24 x 1024, 16 (ViT-L)          | 570.3M     | 568M  |

Generator presets (CARD, LlamaGen, MaskGIT) live in `smapctl.models.generator_presets`.
"""

from smapctl.config import register_presets
from smapctl.models.card import CARDConfig
from smapctl.models.generator_presets import CARD_PRESETS, LLAMAGEN_PRESETS, MASKGIT_PRESETS, PAPER_PARAMS
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

# Parameter counts the paper reports, checked by the tests (within 5%).
PAPER_PARAMETERS = {"SMAP-S": 185e6, "SMAP-B": 391e6, "SMAP-L": 568e6, **PAPER_PARAMS}

register_presets(SMAPConfig, SMAP_PRESETS)
register_presets(CARDConfig, CARD_PRESETS)
register_presets(LlamaGenConfig, LLAMAGEN_PRESETS)
register_presets(MaskGITConfig, MASKGIT_PRESETS)
