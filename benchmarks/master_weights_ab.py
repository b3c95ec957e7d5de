"""Tokenizer training steps in bf16 as smapctl takes them (fp32 weights, autocast, fused AdamW) against
bf16 weights with fp32 master copies, alternating in one process so both see the same machine.

    python benchmarks/master_weights_ab.py                # B shape, bf16, 10 pairs
    python benchmarks/master_weights_ab.py --compile      # both models through torch.compile
    python benchmarks/master_weights_ab.py --quick        # smallest shape, 2 pairs (used by the test suite)

The master-weight step is the lever benchmarks/README.md weighs for the B bf16 target of issue 9 and did
not adopt: the model's parameters are bf16 views into one flat buffer (so autocast has no weight to cast
and the weight gradients stay bf16), their gradients views into a second one, and the update is one
`torch.compile`d elementwise function over flat fp32 masters and AdamW moments, reading the bf16
gradients and writing the bf16 weights (28 bytes per parameter, as the fused AdamW moves). The
parameters are ordered so the decayed ones (`param_groups`' rule) form one slice.

Before timing, both start from the same weights and take the same 3 steps; the script asserts that the
masters stay within a quarter of an update per step of the autocast run's weights on average (a wrong
sign or bias correction moves them by a whole update or more). Prints each variant's median step and
its share of the 2048^3 bf16 matmul rate timed before it, the median of the per-pair speed-ups, and
each phase's median time (forward, backward, update).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from run import TokenizerStep, count_flops, timed

from smapctl.train.schedule import param_groups

STEPS_COMPARED = 3


class MasterWeightStep:
    """`TokenizerStep`'s phases with bf16 weights and an fp32 master copy of each."""

    def __init__(self, shape: str, quick: bool, lr: float, betas: tuple[float, float], weight_decay: float):
        self.step = TokenizerStep(shape, "bf16", quick)  # the same seed: the same initial weights
        groups = param_groups(self.step.model, weight_decay)
        groups = sorted((g for g in groups if g["params"]), key=lambda g: -g["weight_decay"])
        params = [p for g in groups for p in g["params"]]
        total = sum(p.numel() for p in params)
        self.weights = torch.empty(total, dtype=torch.bfloat16)
        self.grads = torch.zeros(total, dtype=torch.bfloat16)
        self.master = torch.empty(total)
        self.m, self.v = torch.zeros(total), torch.zeros(total)
        self.slices, self.where, offset = [], {}, 0
        for g in groups:
            start = offset
            for p in g["params"]:
                flat = slice(offset, offset + p.numel())
                self.master[flat] = p.detach().reshape(-1)
                self.weights[flat] = p.detach().reshape(-1)
                p.data = self.weights[flat].view_as(p)
                p.grad = self.grads[flat].view_as(p)  # autograd accumulates into it in place
                self.where[p] = flat
                offset += p.numel()
            self.slices.append((slice(start, offset), g["weight_decay"]))
        self.lr, self.betas, self.t = lr, betas, 0
        self._update = torch.compile(self._adamw)

    def _adamw(self, g, master, m, v, w, lr, decay, bc1, bc2):
        b1, b2 = self.betas
        g = g.float()
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        master.mul_(1 - lr * decay).addcdiv_(m, (v / bc2).sqrt().add_(1e-8), value=-lr / bc1)
        w.copy_(master)

    def masters(self) -> torch.Tensor:
        """The fp32 masters, flat, in the order of the model's parameters."""
        return torch.cat([self.master[self.where[p]] for p in self.step.model.parameters()])

    def forward(self, net=None) -> torch.Tensor:
        return self.step.forward(net)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        lr, bc1, bc2 = (torch.tensor(x) for x in (self.lr, 1 - b1**self.t, 1 - b2**self.t))
        for s, decay in self.slices:
            self._update(
                self.grads[s],
                self.master[s],
                self.m[s],
                self.v[s],
                self.weights[s],
                lr,
                torch.tensor(decay),
                bc1,
                bc2,
            )
        self.grads.zero_()

    def __call__(self, net=None) -> None:
        self.backward(self.forward(net))
        self.update()


def check_same_training(autocast_step: TokenizerStep, master_step: MasterWeightStep, lr: float) -> float:
    """Take the same steps with both; the masters' mean distance to the autocast weights, in updates."""
    for _ in range(STEPS_COMPARED):
        autocast_step()
        master_step()
    reference = torch.cat([p.detach().reshape(-1) for p in autocast_step.model.parameters()])
    distance = (master_step.masters() - reference).abs().mean().item() / (lr * STEPS_COMPARED)
    assert distance < 0.25, f"the master-weight step moved {distance:.2f} updates per step away from AdamW's"
    return distance


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["tiny", "B"], default="B")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="run both models through torch.compile")
    parser.add_argument("--quick", action="store_true", help="smallest shape, 2 pairs")
    args = parser.parse_args()
    from smapctl.runtime import tune_host_allocator

    tune_host_allocator()  # as every `smapctl` command does
    pairs = 2 if args.quick else args.pairs

    autocast_step = TokenizerStep(args.shape, "bf16", args.quick)
    opt = autocast_step.optimizer.param_groups[0]
    decay = max(g["weight_decay"] for g in autocast_step.optimizer.param_groups)
    master_step = MasterWeightStep(args.shape, args.quick, opt["lr"], opt["betas"], decay)
    distance = check_same_training(autocast_step, master_step, opt["lr"])
    print(f"after {STEPS_COMPARED} equal steps the masters are {distance:.3f} updates per step from AdamW's")

    flops = count_flops(autocast_step)
    nets = {
        "autocast": torch.compile(autocast_step.model) if args.compile else None,
        "master": torch.compile(master_step.step.model) if args.compile else None,
    }
    steps = {"autocast": autocast_step, "master": master_step}
    n = 512 if args.quick else 2048
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(2):
        for name, step in steps.items():
            step(nets[name])
    times = {name: [] for name in steps}
    fractions = {name: [] for name in steps}
    for i in range(pairs):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            peak = statistics.median(timed(lambda: a @ b) for _ in range(3))
            t = timed(lambda name=name: steps[name](nets[name]))
            times[name].append(t)
            fractions[name].append(flops / t / (2 * n**3 / peak))
    for name in steps:
        phases = {"forward": [], "backward": [], "update": []}
        for _ in range(3):
            t0 = time.perf_counter()
            loss = steps[name].forward(nets[name])
            t1 = time.perf_counter()
            steps[name].backward(loss)
            t2 = time.perf_counter()
            steps[name].update()
            t3 = time.perf_counter()
            for phase, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                phases[phase].append(seconds)
        split = " / ".join(f"{statistics.median(s):.3f}" for s in phases.values())
        print(
            f"{name}: step {statistics.median(times[name]):.3f} s, "
            f"{100 * statistics.median(fractions[name]):.0f}% of the bf16 peak paired; "
            f"forward / backward / update {split} s"
        )
    speedup = statistics.median(x / y for x, y in zip(times["autocast"], times["master"], strict=True))
    print(f"master weights: {speedup:.3f}x paired ({pairs} pairs, {'compiled' if args.compile else 'eager'})")


if __name__ == "__main__":
    main()
