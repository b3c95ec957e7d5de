"""Linear layers that stay fast when they see only a few rows: the decode steps of the samplers.

Autoregressive sampling feeds its transformer one position at a time: with a batch of 8 and guidance, a
KV-cached step runs every linear layer on 16 rows. For such shapes the CPU BLAS behind `F.linear`
(x W^T) spends much of its time re-packing the whole weight matrix on every call; computing the same
product the other way round, (W x^T)^T, lets it pack only the few rows of x and stream the weight as it
is stored. Measured on the 2-core Zen 3 host (`python benchmarks/few_rows_ab.py --layers`), one layer
cycling over 8-48 distinct weights (so they come from the caches or memory as in a real step),
microseconds per call, `F.linear` / (W x^T)^T:

    rows                 2           4           16          64           256
    512 -> 512          96 / 91     138 / 97    160 / 123   387 / 366    1107 / 1084
    384 -> 1152        481 / 187    507 / 188   444 / 343   767 / 646    1840 / 1819
    1536 -> 384        320 / 220    430 / 230   574 / 365  1062 / 807    2808 / 2729
    512 -> 1024        425 / 201    528 / 233   628 / 436  1270 / 989    2920 / 2534

A later run of the same command, 16 rows: 205 / 167, 410 / 320, 411 / 358, 342 / 268. From 256 rows on the
two are level. In whole samplers (`python benchmarks/few_rows_ab.py`: plain and few-row layers alternating
in one process; same samples up to float rounding, as the sums run in another order) the gain is smaller:
paired 1.06 for CARD at K = 128 with the KV cache and 1.15 for the discrete AR model (benchmarks/README.md
has the earlier runs, 0-9%, which `CausalSelfAttention` slowed by handing SDPA this layer's transposed
output). In CARD's flow head, whose weights stay in the cache between its 25 steps, it made no measurable
difference on that host; on an Intel Xeon (2026-12-07) a 16-row 512 -> 512 layer took 80 us plain against
46-48 transposed, and the head's blocks and final layer take the route (`linear`, without the module call):
the head alone 1.05-1.09x, CARD's cached sampler at K = 128 1.03-1.07x (benchmarks/README.md). The route is
taken only on the CPU, without autograd and outside autocast, for at most `FEW_ROWS` rows; everything else
(training, GPUs, large batches, bf16 autocast, which the Zen 3 host could not measure) goes through
`F.linear` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 64  # the largest number of rows that takes the transposed route (measured above)


class FewRowsLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict keys) computed as (W x^T)^T for few-row inputs
    in CPU inference, where that is faster; see the module docstring. The output then is a transposed
    view (`.contiguous()` it before a `.view`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or torch.is_grad_enabled()
            or x.numel() > FEW_ROWS * self.in_features
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features).T  # (in, M)
        if self.bias is None:
            out = torch.mm(self.weight, rows)
        else:
            out = torch.addmm(self.bias[:, None], self.weight, rows)  # (out, M)
        return out.T.reshape(*x.shape[:-1], self.out_features)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` without the module call (hooks and all), for code that runs a layer many times on a few
    rows (the flow head's 25 steps per token): a `FewRowsLinear` takes its route, a plain `nn.Linear`
    `F.linear`, so `use_plain_linears` turns both off alike."""
    if type(layer) is FewRowsLinear:
        return layer.forward(x)
    return F.linear(x, layer.weight, layer.bias)


def use_few_rows_linears(module: nn.Module) -> nn.Module:
    """Turn every plain `nn.Linear` inside `module` into a `FewRowsLinear`, in place (parameters, hooks
    and state-dict keys are untouched; `isinstance(m, nn.Linear)` still holds). Returns `module`."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = FewRowsLinear
    return module


def use_plain_linears(module: nn.Module) -> nn.Module:
    """The inverse of `use_few_rows_linears`: every `FewRowsLinear` inside `module` back to an `nn.Linear`,
    in place (for comparisons: `benchmarks/few_rows_ab.py`, the tests). Returns `module`."""
    for m in module.modules():
        if type(m) is FewRowsLinear:
            m.__class__ = nn.Linear
    return module
