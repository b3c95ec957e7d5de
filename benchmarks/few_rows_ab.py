"""The samplers with and without the few-row linears (`smapctl/models/few_rows.py`), alternating in one
process so both see the same machine.

    python benchmarks/few_rows_ab.py                  # CARD K = 128 (5 pairs) and AR tiny (31 pairs)
    python benchmarks/few_rows_ab.py --layers         # single layers: F.linear against (W x^T)^T
    python benchmarks/few_rows_ab.py --head           # CARD K = 128 only, "plain" = only its flow head plain
    python benchmarks/few_rows_ab.py --quick          # smallest shapes, one pair (used by the test suite)

The models are run.py's sampling shapes, with weights drawn from N(0, 0.03) so no layer is at its zero
initialisation. "plain" is a copy with every `FewRowsLinear` turned back into an `nn.Linear`
(`use_plain_linears`); with `--head`, a copy whose flow head alone has plain layers (the head's share of
the gain).
Prints images/s of each and the median of the per-pair speed-ups; asserts that both give the same
samples (up to float rounding for CARD, the same indices for AR). `--layers` prints the table in
few_rows.py's docstring: one layer cycling over distinct weights (so they come from the caches or memory
as in a real step), microseconds per call.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from run import ar_model, card_model
from torch import nn

from smapctl.models.few_rows import use_plain_linears


def models(kind: str, quick: bool) -> tuple[nn.Module, object]:
    labels = torch.arange(8)
    if kind == "card":
        model = card_model("K128", quick)

        def run(m):
            return m.sample(labels, cfg_scale=2.0, steps=25, generator=torch.Generator().manual_seed(0))
    else:
        model = ar_model(quick)

        def run(m):
            return m.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))

    for p in model.parameters():
        nn.init.normal_(p, std=0.03)
    return model.eval(), run


@torch.inference_mode()
def compare(kind: str, pairs: int, quick: bool, head_only: bool = False) -> dict:
    few, run = models(kind, quick)
    plain = copy.deepcopy(few)
    use_plain_linears(plain.head if head_only else plain)
    a, b = run(plain), run(few)  # also the warm-up
    if kind == "card":
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    else:
        assert torch.equal(a, b), "the AR samples differ with the few-row linears"
    times = {"plain": [], "few_rows": []}
    for _ in range(pairs):
        for name, model in (("plain", plain), ("few_rows", few)):
            t = time.perf_counter()
            run(model)
            times[name].append(time.perf_counter() - t)
    speedups = [p / f for p, f in zip(times["plain"], times["few_rows"], strict=True)]
    return {
        "plain_images_per_s": 8 / statistics.median(times["plain"]),
        "few_rows_images_per_s": 8 / statistics.median(times["few_rows"]),
        "paired_speedup": statistics.median(speedups),
    }


def _plain(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor) -> None:
    for w in weights:
        F.linear(x, w, bias)


def _transposed(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor) -> None:
    for w in weights:
        torch.addmm(bias[:, None], w, x.T)  # (out, rows): the transpose back is a free view


@torch.inference_mode()
def layer_table(quick: bool) -> None:
    shapes = [(512, 512, 8), (384, 1152, 48), (1536, 384, 48), (512, 1024, 4)]  # in, out, weights cycled
    rows = (2, 4, 16, 64, 256) if not quick else (2, 16)
    print("microseconds per call, F.linear / (W x^T)^T; rows: " + " ".join(map(str, rows)))
    for fan_in, fan_out, count in shapes[: 1 if quick else None]:
        weights = [torch.randn(fan_out, fan_in) for _ in range(count)]
        bias = torch.randn(fan_out)
        cells = []
        for m in rows:
            x = torch.randn(m, fan_in)
            t = {_plain: [], _transposed: []}
            for f in t:  # warm-up
                f(x, weights, bias)
            for _ in range(1 if quick else 7):
                for f in t:
                    start = time.perf_counter()
                    f(x, weights, bias)
                    t[f].append((time.perf_counter() - start) / count * 1e6)
            cells.append(f"{statistics.median(t[_plain]):.0f} / {statistics.median(t[_transposed]):.0f}")
        print(f"{fan_in} -> {fan_out}: " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smallest shapes, one pair")
    parser.add_argument("--layers", action="store_true", help="single layers instead of the samplers")
    parser.add_argument("--head", action="store_true", help="CARD only, against its flow head plain")
    args = parser.parse_args()
    if args.head:
        out = compare("card", 1 if args.quick else 9, args.quick, head_only=True)
        print("CARD K128, flow head: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()))
        return
    if args.layers or args.quick:
        layer_table(args.quick)
        if args.layers:
            return
    for kind, pairs in (("card", 5), ("ar", 31)):
        out = compare(kind, 1 if args.quick else pairs, args.quick)
        print(
            f"{'CARD K128' if kind == 'card' else 'AR tiny'}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in out.items())
        )


if __name__ == "__main__":
    main()
