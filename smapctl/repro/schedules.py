"""Issue 11: the tail-dropping schedules compared, what each makes the decoder see, and the rule by which one
schedule is said to dominate the paper's uniform one.

The schedules themselves are drawn by `SMAP.sample_keep` (`model.tail_drop`); here they are only measured:
`keep_profile` draws many prefix lengths from the model's own sampler, so the reported P(k) is exactly what
training used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from smapctl.models.smap import SMAP, SMAPConfig
from smapctl.repro.report import mean, spread

# The issue-11 comparison, paper default first; "none" (no dropping, table 3's ablation) is the reference.
SCHEDULES = ("uniform", "full_mix", "pow2", "tail_weighted", "none")
# The tokenizer variant (see runs.py) that trains each schedule: uniform and none are table 2/3's runs.
SCHEDULE_VARIANT = {"uniform": "smap", "none": "notrunc"}


def schedule_variant(schedule: str) -> str:
    return SCHEDULE_VARIANT.get(schedule, schedule)


@dataclass
class KeepProfile:
    """What a schedule trains: P(k) for k = 0..K and how often each token position is kept."""

    schedule: str
    p_k: list[float]  # empirical P(kept prefix = k), k = 0..K
    position_rate: list[float]  # P(token j is kept) = P(k > j), j = 0..K-1

    @property
    def mean_k(self) -> float:
        return sum(k * p for k, p in enumerate(self.p_k))

    def to_dict(self) -> dict:
        return {"p_k": self.p_k, "position_rate": self.position_rate, "mean_k": self.mean_k}


def keep_profile(cfg: SMAPConfig, draws: int = 200_000, seed: int = 0) -> KeepProfile:
    """Draw `draws` prefix lengths from `SMAP.sample_keep` under `cfg` (per-sample) and tabulate them."""
    cfg = replace(cfg, tail_drop_per_sample=True)
    with torch.device("meta"):  # only the sampler is used: no weights are allocated
        model = SMAP(cfg)
    g = torch.Generator().manual_seed(seed)
    keeps = model.sample_keep(draws, torch.device("cpu"), generator=g)
    K = cfg.num_latent_tokens
    p_k = (torch.bincount(keeps, minlength=K + 1).double() / draws).tolist()
    rate = [sum(p_k[j + 1 :]) for j in range(K)]
    return KeepProfile(cfg.tail_drop, p_k, rate)


@dataclass
class Dominance:
    """Does schedule s dominate uniform on the whole rate-quality curve?

    At each k, s is "no worse" on a metric when its mean is within the seed tolerance of uniform's or
    better; the tolerance is the larger of the two spreads at that k. s dominates uniform when it is no
    worse on PSNR and on clf-FD at every k = 0..K (class-only accuracy at k = 0 included) and better
    beyond the tolerance on at least one of them at k = K. With one seed on either side there is no
    tolerance to measure, so nothing is decided (`measured` is False).
    """

    schedule: str
    worse_at: dict[str, list[int]]  # metric -> the k where s is worse beyond the tolerance
    better_at_full: list[str]  # metrics on which s beats uniform beyond the tolerance at k = K
    measured: bool = True  # at least two seeds on each side

    @property
    def dominates(self) -> bool:
        return self.measured and not any(self.worse_at.values()) and bool(self.better_at_full)

    def to_dict(self) -> dict:
        return {
            "worse_at": self.worse_at,
            "better_at_full": self.better_at_full,
            "dominates": self.dominates,
            "measured": self.measured,
        }


# metric -> higher is better
CURVE_METRICS = {"psnr": True, "fd": False, "accuracy": True}


def dominance(schedule: str, curves: list[dict], uniform: list[dict]) -> Dominance:
    """`curves`, `uniform`: per-seed prefix curves ({"psnr": [...], "fd": [...], "accuracy": [...]})."""
    if min(len(curves), len(uniform)) < 2:  # a spread of one value is 0: every difference would count
        return Dominance(schedule, {m: [] for m in CURVE_METRICS}, [], measured=False)
    worse_at: dict[str, list[int]] = {}
    better: list[str] = []
    K = len(uniform[0]["psnr"]) - 1
    for metric, higher in CURVE_METRICS.items():
        ks = [0] if metric == "accuracy" else range(K + 1)  # accuracy: the class-only decode
        worse_at[metric] = []
        for k in ks:
            s_vals, u_vals = [c[metric][k] for c in curves], [c[metric][k] for c in uniform]
            tol = max(spread(s_vals), spread(u_vals))
            gain = (mean(s_vals) - mean(u_vals)) * (1 if higher else -1)
            if gain < -tol:
                worse_at[metric].append(k)
            if k == K and metric != "accuracy" and gain > tol:
                better.append(metric)
    return Dominance(schedule, worse_at, better)


def summary(curves: list[dict]) -> dict[str, list[float]]:
    """Per-seed scalars of a schedule's curves: the value at k = K, the mean over k = 0..K (the area under
    the rate-quality curve over K + 1) and the class-only accuracy."""
    out: dict[str, list[float]] = {}
    for metric in ("psnr", "fd"):
        out[f"{metric}_full"] = [c[metric][-1] for c in curves]
        out[f"{metric}_mean"] = [mean(c[metric]) for c in curves]
    out["class_only_accuracy"] = [c["accuracy"][0] for c in curves]
    return out
