"""`smapctl reproduce mini`: the paper's claims at mini scale on the embedded `digits` set (issue 7), and the
tail-dropping schedule study (issue 11), as one command that writes recipes/mini/RESULTS.md.

Sections (each a function below, in this order; trainings are shared between them and cached):

* table2:  SMAP (class injection + uniform tail dropping) vs the TiTok-style baseline at budgets K.
* table3:  SMAP with and without tail dropping, each decoded from every prefix k = 0..K.
* fig1:    class-only decodes (k = 0) and the prefix sweep; semantic accuracy per k.
* fig4:    latents decoded with a swapped class: does the classifier see the class or the latents?
* fig5:    CARD on (i) the reconstruction-only tokenizer, (ii) SMAP with its own class embedding,
           (iii) SMAP sharing the tokenizer's class embedding: semantic accuracy and Frechet distance.
* issue11: the tail-dropping schedules on the whole rate-quality curve.

Every measurement is on the 179 held-out digits, judged by the reference classifier (trained once on the
training split, `smapctl.eval.classifier`). Its feature Frechet distance ("clf-FD") stands in for FID and is
not comparable with it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smapctl.errors import UserError
from smapctl.io import ensure_dir, finish_file, fsync_dir, try_lock, write_error
from smapctl.repro import measure, plots, schedules
from smapctl.repro.measure import Reference
from smapctl.repro.report import HELD, HELD_IN_MEANS, MIXED, NOT_HELD, Comparison, mean, verdict
from smapctl.repro.runs import GeneratorRun, Runs, TokenizerRun
from smapctl.train.checkpoint import is_run_or_checkpoint, refuse_output_in_checkpoints
from smapctl.train.tokenizer import preview_prefixes

log = logging.getLogger("smapctl.repro")

QUICK_HELDOUT_PER_CLASS = 5
SETTINGS = ("recon_only", "independent", "shared")  # figure 5's (i), (ii), (iii)


@dataclass
class MiniOptions:
    """What `smapctl reproduce mini` runs; `quick` shrinks every model and run to seconds (for tests)."""

    # RESULTS.md, results.json and the PNGs; default the `recipes` folder, beside the recipes as in the
    # repository's recipes/mini (with quick, the `work` folder, so that a quick run never overwrites the
    # real results). A copy of the recipes named with --recipes thus has its results written beside it,
    # not to a new ./recipes/mini.
    out: Path | None = None
    recipes: Path = Path("recipes/mini")  # the mini recipes the runs start from
    work: Path | None = None  # run folders; default runs/mini (runs/mini-quick with quick)
    seeds: tuple[int, ...] = (0, 1)
    budgets: tuple[int, ...] = (4, 8, 16)
    quick: bool = False
    fresh: bool = False
    # One torch thread by default: the time estimate rests on one-thread measurements, and on a busy
    # 2-core machine two threads ran these small models ten times slower (OpenMP barriers).
    threads: int = 1
    samples_per_class: int | None = None  # figure 5; default 50 (2 with quick)

    def __post_init__(self):
        if not self.seeds or not self.budgets:
            raise ValueError("seeds and budgets must not be empty")
        self.seeds, self.budgets = tuple(self.seeds), tuple(sorted(self.budgets))
        self.work = Path(self.work or ("runs/mini-quick" if self.quick else "runs/mini"))
        self.recipes = Path(self.recipes)
        self.out = Path(self.out or (self.work if self.quick else self.recipes))
        self.samples_per_class = self.samples_per_class or (2 if self.quick else 50)

    @property
    def K(self) -> int:
        """The budget of the single-budget sections (figures 1, 4, 5, issue 11): the largest."""
        return self.budgets[-1]

    def command(self) -> str:
        parts = ["smapctl reproduce mini", f"--out {self.out}", f"--recipes {self.recipes}"]
        parts += [f"--work {self.work}", f"--seeds {','.join(map(str, self.seeds))}"]
        parts += [f"--budgets {','.join(map(str, self.budgets))}"]
        parts += ["--quick"] * self.quick + ["--fresh"] * self.fresh
        parts += [f"--threads {self.threads}"]
        return " ".join(parts)

    def plan(self) -> tuple[list[TokenizerRun], list[GeneratorRun]]:
        """Every training the sections need, in the order they need them."""
        variants = ("smap", "titok", "notrunc")
        toks = [TokenizerRun(v, K, s) for v in variants for K in self.budgets for s in self.seeds]
        issue11 = [schedules.schedule_variant(name) for name in schedules.SCHEDULES]
        toks += [TokenizerRun(v, self.K, s) for v in issue11 if v not in variants for s in self.seeds]
        gens = [GeneratorRun(setting, self.K, s) for setting in SETTINGS for s in self.seeds]
        return toks, gens


@dataclass
class MiniResult:
    results: dict
    files: list[Path] = field(default_factory=list)  # RESULTS.md, results.json, the PNGs


class Study:
    """What the sections share: the runs, the held-out reference, and the prefix curves measured so far."""

    def __init__(self, opts: MiniOptions, runs: Runs, ref: Reference, staging: Path):
        self.opts, self.runs, self.ref = opts, runs, ref
        self.staging = staging  # the figures wait here until RESULTS.md is written with them (`publish`)
        self.curve_of: dict[str, dict] = {}
        self.files: list[Path] = []
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, run: TokenizerRun):
        """The run's tokenizer (EMA weights, eval mode), trained first if the work folder lacks it."""
        from smapctl.ops.load import load_tokenizer

        if run.name not in self._models:
            self._models[run.name] = load_tokenizer(self.runs.tokenizer(run), "ema").model
        return self._models[run.name]

    def curve(self, run: TokenizerRun) -> dict:
        if run.name not in self.curve_of:
            self.curve_of[run.name] = measure.prefix_curve(self.model(run), self.ref).to_dict()
        return self.curve_of[run.name]

    def curves(self, variant: str, K: int) -> list[dict]:
        """One prefix curve per seed."""
        return [self.curve(TokenizerRun(variant, K, s)) for s in self.opts.seeds]

    def figure(self, name: str) -> Path:
        """Where a section draws the figure `name` (in the staging folder)."""
        return self.staging / name

    def plot(self, path: Path) -> None:
        self.files.append(path)

    def stage_text(self, name: str, text: str) -> None:
        """Write `name` (RESULTS.md, results.json) into the staging folder, beside the figures, for
        `publish`. A failed write (a full disk) names the file in --out, whose previous results are
        untouched."""
        path = self.staging / name
        try:
            path.write_bytes(text.encode("utf-8"))
            finish_file(path)  # fsynced before the rename, as `write_text_atomic` does
        except OSError as e:
            raise write_error(self.opts.out / name, e, "the results", kept=_KEPT) from e
        self.files.append(path)

    def publish(self) -> list[Path]:
        """Move the figures, results.json and RESULTS.md, all written, into --out (renames: a moment;
        RESULTS.md last), so that neither an interrupted run nor a failed write (a full disk at
        RESULTS.md) leaves new figures beside the previous run's RESULTS.md."""
        published = []
        for path in self.files:
            final = self.opts.out / path.name
            try:
                os.replace(path, final)
            except OSError as e:
                raise write_error(final, e, "the results", kept="") from e
            published.append(final)
        fsync_dir(self.opts.out)
        return published


def reproduce_mini(opts: MiniOptions) -> MiniResult:
    """Run every section (training what the work folder lacks) and write RESULTS.md, results.json, PNGs."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()  # given back: a notebook's next cells ran on the study's threads
    torch.set_num_threads(opts.threads)
    try:
        # numpy's BLAS too (the Frechet distances' eigh and SVD): its default of all cores ran ~30x slower
        # on a busy 2-core machine.
        with threadpool_limits(limits=opts.threads):
            return _reproduce(opts)
    finally:
        torch.set_num_threads(before)


def _reproduce(opts: MiniOptions) -> MiniResult:

    if not opts.recipes.is_dir():
        raise UserError(
            f"--recipes: {opts.recipes} is not a folder (the mini recipes are recipes/mini in smapctl's"
            " repository, not in the installed package: run from the folder holding the repository's"
            " recipes/ or a copy of it, or name a copy of recipes/mini with --recipes)"
        )
    # Found now, not after the first 25 minutes of training; --work first: with --quick it is also the --out
    # not given (otherwise `--quick --work FILE` would be said to be "--out: FILE is a file").
    for option, folder in (("--work", opts.work), ("--out", opts.out)):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option}: {folder} is a file, not a folder")
        # Nor inside a run's checkpoints, which it deletes as it goes (the results with them; the work
        # folder's trainings would refuse it, saying --out, after its mode file is written there), nor a
        # run's folder, which it would fill with 30 runs and RESULTS.md.
        refuse_output_in_checkpoints(folder, option)
        if is_run_or_checkpoint(folder):
            raise UserError(f"{option}: {folder} is a training run's folder; choose another {option}")
    created = _missing_folders(opts.out)
    ensure_dir(opts.out, "the --out folder")
    sweep_staging(opts.out)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=opts.out))
    held = try_lock(staging)  # `sweep_staging` of another run leaves it
    try:
        return _reproduce_in(opts, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if held is not None:
            os.close(held)
        for folder in created:  # a refused or stopped run leaves no empty --out behind
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break


def _missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


_KEPT = "the previous RESULTS.md, results.json and figures are unchanged"  # a failed `stage_text`
_STAGING = ".figures-"  # + a random part: the figures and results of a run in progress, in --out


def sweep_staging(out: Path) -> None:
    """Remove the staging folders in `out` of runs killed outright; one a run in progress holds (a
    second reproduction into the same --out) is left."""
    for stale in out.glob(f"{_STAGING}*"):
        fd = try_lock(stale)
        if fd is not None:
            try:
                shutil.rmtree(stale, ignore_errors=True)
            finally:
                os.close(fd)


def _reproduce_in(opts: MiniOptions, staging: Path) -> MiniResult:
    from smapctl.repro.mini_report import render

    started, load_before = time.perf_counter(), _load_average()
    toks, gens = opts.plan()
    runs = Runs(opts.recipes, opts.work, quick=opts.quick, fresh=opts.fresh, total=len(toks) + len(gens))
    runs.claim_work_folder()
    image_size = runs.tokenizer_recipe(toks[0]).model.image_size
    ref, reference_info = build_reference(image_size, opts)
    study = Study(opts, runs, ref, staging)
    results = {"command": opts.command(), "options": _options_dict(opts), "reference": reference_info}
    timing = {"reference": time.perf_counter() - started}  # held-out set and reference classifier
    for name, section in SECTIONS.items():
        log.info("section %s", name)
        t = time.perf_counter()
        results[name] = section(study)
        timing[name] = time.perf_counter() - t
    results["runs"] = {n: r.to_dict() for n, r in runs.records.items()}
    results["curves"] = study.curve_of
    trained = [r for r in runs.records.values() if not r.reused]
    recorded = [r.trained_s for r in runs.records.values() if r.trained_s is not None and not r.resumed]
    results["timing"] = {
        "sections_s": timing,
        "total_s": time.perf_counter() - started,
        "training_s": sum(r.wall_s for r in trained),
        "trained_runs": len(trained),
        "reused_runs": len(runs.records) - len(trained),
        # the training times of every run, whenever it was trained (None if some were not recorded)
        "all_trainings_s": sum(recorded) if len(recorded) == len(runs.records) else None,
    }
    results["environment"] = _environment(load_before)
    text = render(results)
    study.stage_text("results.json", json.dumps(results, indent=1) + "\n")
    study.stage_text("RESULTS.md", text)
    *figures, json_path, md_path = study.publish()
    return MiniResult(results, [md_path, json_path, *figures])


def build_reference(image_size: int, opts: MiniOptions) -> tuple[Reference, dict]:
    """The held-out digits, the reference classifier (trained once and cached) and its sanity numbers:
    held-out accuracy and the Frechet distance of as many real training digits as figure 5 samples."""
    from smapctl.data.embedded import load_embedded
    from smapctl.data.images import to_signed_float
    from smapctl.eval.classifier import CLASSIFIER_STEPS, classifier_cache, load_or_train_classifier

    data = load_embedded("digits", image_size)
    steps = 20 if opts.quick else CLASSIFIER_STEPS
    clf = load_or_train_classifier(
        "digits", image_size, data.train_images, data.train_labels, len(data.class_names),
        classifier_cache(), steps=steps,
    )  # fmt: skip
    images, labels = data.val_images, data.val_labels
    if opts.quick:  # a few held-out images per class: quick runs test the pipeline, not the numbers
        keep = torch.cat([(labels == c).nonzero()[:QUICK_HELDOUT_PER_CLASS, 0] for c in labels.unique()])
        images, labels = images[keep], labels[keep]
    ref = Reference.of(clf, images, labels)
    n = min(opts.samples_per_class * ref.num_classes, len(data.train_labels))
    pick = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[:n]
    real = to_signed_float(data.train_images[pick])
    info = {
        "image_size": image_size,
        "heldout_images": len(ref.labels),
        "classifier_heldout_images": len(data.val_labels),
        "classifier_steps": steps,
        "classifier_heldout_accuracy": ref.accuracy(to_signed_float(data.val_images), data.val_labels),
        "real_train_fd": ref.frechet(real),
        "real_train_accuracy": ref.accuracy(real, data.train_labels[pick]),
        "real_train_n": n,
    }
    return ref, info


# ------------------------------------------------------------------------------------------- sections


def table2(study: Study) -> dict:
    """SMAP vs the TiTok-style baseline at each budget, decoded from all K tokens."""
    rows, fd_cmp, psnr_cmp = [], [], []
    for K in study.opts.budgets:
        full = {v: _at(study.curves(v, K), -1) for v in ("smap", "titok")}
        rows += [{"K": K, "variant": v, **full[v]} for v in full]
        fd_cmp.append(Comparison(f"K={K}", full["smap"]["fd"], full["titok"]["fd"], higher_is_better=False))
        psnr_cmp.append(
            Comparison(f"K={K}", full["smap"]["psnr"], full["titok"]["psnr"], higher_is_better=True)
        )
    _plot_table2(study, rows)
    return {
        "rows": rows,
        "fd": [c.to_dict() for c in fd_cmp],
        "psnr": [c.to_dict() for c in psnr_cmp],
        "verdict": verdict(fd_cmp),
        "psnr_verdict": verdict(psnr_cmp),
    }


def table3(study: Study) -> dict:
    """SMAP with vs without tail dropping: the full-budget numbers (the paper's table) and every prefix."""
    fd_cmp, psnr_cmp, prefix = [], [], []
    for K in study.opts.budgets:
        smap, notrunc = study.curves("smap", K), study.curves("notrunc", K)
        a, b = _at(smap, -1), _at(notrunc, -1)
        fd_cmp.append(Comparison(f"K={K}", a["fd"], b["fd"], higher_is_better=False))
        psnr_cmp.append(Comparison(f"K={K}", a["psnr"], b["psnr"], higher_is_better=True))
        better = {m: [k for k in range(K) if _mean_at(smap, m, k, hi) > _mean_at(notrunc, m, k, hi)]
                  for m, hi in (("psnr", True), ("fd", False))}  # fmt: skip
        prefix.append({"K": K, "smap_better_at": better, "prefixes": K})
    _plot_table3(study)
    return {
        "fd": [c.to_dict() for c in fd_cmp],
        "psnr": [c.to_dict() for c in psnr_cmp],
        "prefix": prefix,
        "verdict": verdict(fd_cmp),
        "psnr_verdict": verdict(psnr_cmp),
    }


def fig1(study: Study) -> dict:
    """Class-only decodes of every class and the semantic accuracy of each prefix k."""
    K, ref, out = study.opts.K, study.ref, {}
    for variant in ("smap", "notrunc", "titok"):
        recognised = []
        for seed in study.opts.seeds:
            _, ok = measure.class_only(study.model(TokenizerRun(variant, K, seed)), ref)
            recognised.append(sum(ok))
        curves = study.curves(variant, K)
        out[variant] = {
            "classes_recognised": recognised,
            "accuracy": [c["accuracy"] for c in curves],
            "psnr": [c["psnr"] for c in curves],
        }
    smap = out["smap"]
    least = min(smap["classes_recognised"])
    if least >= 0.9 * ref.num_classes:
        status = HELD
    elif mean(smap["classes_recognised"]) >= 0.5 * ref.num_classes:
        status = MIXED
    else:
        status = NOT_HELD
    out |= {"num_classes": ref.num_classes, "verdict": status}
    _panel_fig1(study)
    return out


def fig4(study: Study) -> dict:
    """Image a's latents decoded with another class c: how often the classifier says c, by prefix k."""
    K = study.opts.K
    ks = sorted({0, 1, K // 4, K // 2, K})
    out = {"k": ks}
    for variant in ("smap", "notrunc"):
        swaps = [
            measure.class_swap(study.model(TokenizerRun(variant, K, s)), study.ref, ks)
            for s in study.opts.seeds
        ]
        out[variant] = {
            "follows_class": [[w.follows_class for w in seed] for seed in swaps],
            "follows_latents": [[w.follows_latents for w in seed] for seed in swaps],
        }
    at_full = {v: {m: [seed[-1] for seed in out[v][m]] for m in out[v]} for v in ("smap", "notrunc")}
    decides = Comparison(
        f"k={K}", at_full["smap"]["follows_class"], at_full["smap"]["follows_latents"], higher_is_better=True
    )
    versus = Comparison(
        f"k={K}", at_full["smap"]["follows_class"], at_full["notrunc"]["follows_class"], higher_is_better=True
    )
    out |= {
        "class_vs_latents": decides.to_dict(),
        "smap_vs_notrunc": versus.to_dict(),
        "verdict": verdict([decides]),
    }
    _panel_fig4(study)
    return out


def fig5(study: Study) -> dict:
    """CARD's guided samples on each tokenizer setting, judged against the held-out digits."""
    K, out, images = study.opts.K, {}, {}
    for setting in SETTINGS:
        quality = []
        for seed in study.opts.seeds:
            checkpoint = study.runs.generator(GeneratorRun(setting, K, seed))
            samples, labels = generate_samples(checkpoint, study.opts.samples_per_class, seed)
            quality.append(measure.sample_quality(samples, labels, study.ref))
            images.setdefault(setting, (samples, labels))
        out[setting] = {m: [getattr(q, m) for q in quality] for m in ("accuracy", "fd")}
    cmp = {
        "semantic_tokenizer": ("independent", "recon_only"),
        "sharing": ("shared", "independent"),
    }
    for name, (a, b) in cmp.items():
        fd = Comparison("clf-FD", out[a]["fd"], out[b]["fd"], higher_is_better=False)
        acc = Comparison("accuracy", out[a]["accuracy"], out[b]["accuracy"], higher_is_better=True)
        out[name] = {"fd": fd.to_dict(), "accuracy": acc.to_dict(), "verdict": verdict([fd])}
    out["verdict"] = _combine(out["semantic_tokenizer"]["verdict"], out["sharing"]["verdict"])
    _panel_fig5(study, images)
    return out


def issue11(study: Study) -> dict:
    """The tail-dropping schedules at the largest budget, compared on the whole rate-quality curve."""
    K = study.opts.K
    out = {"K": K, "schedules": {}}
    uniform = study.curves("smap", K)
    for name in schedules.SCHEDULES:
        variant = schedules.schedule_variant(name)
        curves = study.curves(variant, K)
        cfg = study.runs.tokenizer_recipe(TokenizerRun(variant, K, study.opts.seeds[0])).model
        entry = {"profile": schedules.keep_profile(cfg).to_dict(), "summary": schedules.summary(curves)}
        if name != "uniform":
            entry["vs_uniform"] = schedules.dominance(name, curves, uniform).to_dict()
        out["schedules"][name] = entry
    out["best"] = _best_schedules(out["schedules"])
    out["dominating"] = [n for n, e in out["schedules"].items() if e.get("vs_uniform", {}).get("dominates")]
    _plot_issue11(study)
    return out


SECTIONS = {"table2": table2, "table3": table3, "fig1": fig1, "fig4": fig4, "fig5": fig5, "issue11": issue11}


# -------------------------------------------------------------------------------------------- helpers


def _at(curves: list[dict], k: int) -> dict[str, list[float]]:
    """Per-seed values of every metric at prefix k (-1: the full budget)."""
    return {m: [c[m][k] for c in curves] for m in ("psnr", "fd", "accuracy")}


def _mean_at(curves: list[dict], metric: str, k: int, higher_is_better: bool) -> float:
    """The mean over seeds at k, signed so that larger is better."""
    return mean([c[metric][k] for c in curves]) * (1 if higher_is_better else -1)


def _combine(*statuses: str) -> str:
    if all(s == HELD for s in statuses):
        return HELD
    if all(s in (HELD, HELD_IN_MEANS) for s in statuses):
        return HELD_IN_MEANS
    if all(s == NOT_HELD for s in statuses):
        return NOT_HELD
    return MIXED


def _best_schedules(entries: dict) -> dict[str, list[str]]:
    """The schedules with the best mean of each summary number (several when tied; lower is better for
    the distances)."""
    best = {}
    for key in ("psnr_full", "psnr_mean", "fd_full", "fd_mean", "class_only_accuracy"):
        sign = -1 if key.startswith("fd") else 1
        score = {n: sign * mean(e["summary"][key]) for n, e in entries.items()}
        best[key] = [n for n in entries if score[n] == max(score.values())]
    return best


@torch.no_grad()
def generate_samples(checkpoint: Path, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` guided samples of every class from a generator checkpoint, decoded by its tokenizer
    -> images (N, 3, S, S) in [-1, 1] and their classes (N,)."""
    from smapctl.train.generator import decode_samples, generate, load_generator

    loaded = load_generator(checkpoint)
    model, recipe, tok, stats = loaded.model, loaded.recipe, loaded.tokenizer, loaded.stats
    labels = torch.arange(recipe.model.num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    images = [
        decode_samples(tok, generate(model, recipe, part, generator=g), part, stats)
        for part in labels.split(250)
    ]
    return torch.cat(images), labels


def _options_dict(opts: MiniOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}


def _load_average() -> list[float] | None:
    """The system's load averages over 1, 5 and 15 minutes; None where there are none (Windows, whose `os`
    has no `getloadavg`: calling it there would stop the reproduction at its start)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _environment(load_before: list[float] | None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": load_before,
        "load_average_end": _load_average(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# --------------------------------------------------------------------------------------------- plots

COLORS = {
    "smap": "tab:blue",
    "titok": "tab:gray",
    "notrunc": "tab:red",
    "full_mix": "tab:green",
    "pow2": "tab:purple",
    "tail_weighted": "tab:orange",
}
LABELS = {
    "smap": "SMAP (uniform drop)",
    "titok": "TiTok-style",
    "notrunc": "SMAP w/o tail drop",
}


def _plot_table2(study: Study, rows: list[dict]) -> None:
    budgets = list(study.opts.budgets)
    axes = []
    for metric, title in (
        ("psnr", "PSNR (dB), k = K"),
        ("fd", "clf-FD, k = K"),
        ("accuracy", "accuracy, k = K"),
    ):
        series = [
            plots.Series(
                LABELS[v],
                budgets,
                [list(vals) for vals in zip(*[r[metric] for r in rows if r["variant"] == v], strict=True)],
                {"color": COLORS[v], "marker": "o"},
            )
            for v in ("smap", "titok")
        ]
        axes.append(plots.Axis(title, metric, series))
    path = study.figure("table2.png")
    study.plot(plots.line_grid(path, axes, "tokens K", ncols=3, title="Table 2 analogue (held-out digits)"))


def _plot_table3(study: Study) -> None:
    axes = []
    for metric, name in (("psnr", "PSNR (dB)"), ("fd", "clf-FD"), ("accuracy", "accuracy")):
        for K in study.opts.budgets:
            series = [
                plots.Series(LABELS[v], list(range(K + 1)), [c[metric] for c in study.curves(v, K)],
                             {"color": COLORS[v]})
                for v in ("smap", "notrunc", "titok")
            ]  # fmt: skip
            axes.append(plots.Axis(f"{name}, K = {K}", name, series))
    path = study.figure("table3_curves.png")
    title = "Table 3 analogue: rate-quality curves (decode from the first k tokens)"
    study.plot(plots.line_grid(path, axes, "prefix k", ncols=len(study.opts.budgets), title=title))


def _plot_issue11(study: Study) -> None:
    K, axes = study.opts.K, []
    for metric, name in (("psnr", "PSNR (dB)"), ("fd", "clf-FD"), ("accuracy", "accuracy")):
        series = []
        for s in schedules.SCHEDULES:
            v = schedules.schedule_variant(s)
            series.append(plots.Series(s, list(range(K + 1)), [c[metric] for c in study.curves(v, K)],
                                       {"color": COLORS[v]}))  # fmt: skip
        axes.append(plots.Axis(f"{name}, K = {K}", name, series))
    path = study.figure("issue11_curves.png")
    study.plot(plots.line_grid(path, axes, "prefix k", ncols=3, title="Issue 11: tail-dropping schedules"))


def _one_per_class(ref: Reference, n: int) -> torch.Tensor:
    """Indices of the first held-out image of each class (up to n)."""
    return torch.tensor([int((ref.labels == c).nonzero()[0]) for c in range(min(n, ref.num_classes))])


def _panel_fig1(study: Study) -> None:
    K, ref, seed = study.opts.K, study.ref, study.opts.seeds[0]
    pick = _one_per_class(ref, ref.num_classes)
    images, labels = ref.images[pick], ref.labels[pick]
    rows = [("original", images)]
    for variant in ("smap", "notrunc"):
        model = study.model(TokenizerRun(variant, K, seed))
        z = measure.encode(model, images, labels)
        short = "SMAP" if variant == "smap" else "no drop"
        rows += [(f"{short} k={k}", measure.decode(model, z[:, :k], labels)) for k in preview_prefixes(K)]
    path = study.figure("fig1_prefixes.png")
    title = f"Figure 1 analogue (seed {seed}): decode from the class + first k of {K} tokens"
    study.plot(plots.image_panel(path, rows, title))


def _panel_fig4(study: Study) -> None:
    K, ref, seed = study.opts.K, study.ref, study.opts.seeds[0]
    pick = _one_per_class(ref, ref.num_classes)
    images, labels = ref.images[pick], ref.labels[pick]
    other = measure.swapped_classes(labels, ref.num_classes)
    rows = [("original a", images)]
    for variant in ("smap", "notrunc"):
        model = study.model(TokenizerRun(variant, K, seed))
        z = measure.encode(model, images, labels)
        short = "SMAP" if variant == "smap" else "no drop"
        rows += [
            (f"{short} D(z_a, y_a)", measure.decode(model, z, labels)),
            (f"{short} D([], c)", measure.decode(model, z[:, :0], other)),
            (f"{short} D(z_a, c)", measure.decode(model, z, other)),
        ]
    path = study.figure("fig4_swaps.png")
    swapped = " ".join(str(int(c)) for c in other)
    title = f"Figure 4 analogue (seed {seed}, K = {K}): swapped classes c = {swapped}"
    study.plot(plots.image_panel(path, rows, title))


def _panel_fig5(study: Study, images: dict) -> None:
    rows = []
    for setting in SETTINGS:
        samples, _ = images[setting]
        per_class = study.opts.samples_per_class  # samples are ordered class by class
        rows += [(f"{setting} #{i + 1}", samples[i::per_class]) for i in range(min(2, per_class))]
    path = study.figure("fig5_samples.png")
    title = f"Figure 5 analogue (seed {study.opts.seeds[0]}): CARD samples, one column per class"
    study.plot(plots.image_panel(path, rows, title))
