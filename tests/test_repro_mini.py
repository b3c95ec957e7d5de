"""`smapctl reproduce mini --quick` end to end, and the pieces whose logic decides the verdicts."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import run_cli

from smapctl.errors import UserError
from smapctl.models.smap import SMAPConfig
from smapctl.repro.mini import SECTIONS, MiniOptions, _combine
from smapctl.repro.mini_report import _cmp
from smapctl.repro.report import HELD, HELD_IN_MEANS, MIXED, NOT_HELD, Comparison, fmt_delta, verdict
from smapctl.repro.runs import Runs, TokenizerRun
from smapctl.repro.schedules import SCHEDULES, Dominance, dominance, keep_profile

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "mini"
HEADINGS = (
    "## Verdicts",
    "## Table 2",
    "## Table 3",
    "## Figure 1",
    "## Figure 4",
    "## Figure 5",
    "## Issue 11",
)
PNGS = ("table2", "table3_curves", "fig1_prefixes", "fig4_swaps", "fig5_samples", "issue11_curves")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The whole pipeline in quick mode through the CLI, writing only into a temporary folder."""
    from smapctl import cli

    tmp = tmp_path_factory.mktemp("mini")
    argv = ["reproduce", "mini", "--quick", "--out", tmp / "out", "--work", tmp / "runs"]
    cli.app([str(a) for a in [*argv, "--recipes", RECIPES]], standalone_mode=False)
    return tmp


def test_quick_run_writes_every_section(quick_run):
    out = quick_run / "out"
    results = json.loads((out / "results.json").read_text())
    timing = results["timing"]
    for name in SECTIONS:
        assert name in results and results[name], name
        assert results["timing"]["sections_s"][name] >= 0
    assert list(timing["sections_s"]) == ["reference", *SECTIONS]
    assert sum(timing["sections_s"].values()) <= timing["total_s"]
    # Each verdict is the one its recorded numbers give (the numbers of a quick run mean nothing, so any
    # verdict may come out; it must be the rule's).
    for name in ("table2", "table3"):
        assert results[name]["verdict"] == _verdict_of(results[name]["fd"]), name
        assert results[name]["psnr_verdict"] == _verdict_of(results[name]["psnr"]), name
    fig1, fig4, fig5 = results["fig1"], results["fig4"], results["fig5"]
    recognised = fig1["smap"]["classes_recognised"]
    if min(recognised) >= 0.9 * fig1["num_classes"]:
        assert fig1["verdict"] == HELD
    else:
        assert fig1["verdict"] == (
            MIXED if sum(recognised) / len(recognised) >= fig1["num_classes"] / 2 else NOT_HELD
        )
    assert fig4["verdict"] == _verdict_of([fig4["class_vs_latents"]])
    parts = [fig5[claim]["verdict"] for claim in ("semantic_tokenizer", "sharing")]
    assert parts == [_verdict_of([fig5[claim]["fd"]]) for claim in ("semantic_tokenizer", "sharing")]
    assert fig5["verdict"] == _combine(*parts)
    assert set(results["issue11"]["schedules"]) == set(SCHEDULES)
    # 3 variants x 3 budgets + 3 new schedules at K = 16, two seeds each; 3 CARD settings x 2 seeds.
    assert len(results["runs"]) == 2 * (9 + 3) + 2 * 3
    assert all(
        len(c["psnr"]) == int(n.split("-K")[1].split("-")[0]) + 1 for n, c in results["curves"].items()
    )
    assert results["command"].startswith("smapctl reproduce mini") and "--quick" in results["command"]
    text = (out / "RESULTS.md").read_text()
    assert results["command"] in text and "Quick mode" in text
    for heading in HEADINGS:
        assert heading in text, heading
    # The verdicts table says the verdicts of results.json, claim by claim.
    rows = {line.split(" | ")[0][2:].split(":")[0]: line.split(" | ")[1] for line in text.splitlines()
            if line.startswith(("| Table", "| Figure"))}  # fmt: skip
    assert rows == {
        "Table 2": results["table2"]["verdict"],
        "Table 3": results["table3"]["verdict"],
        "Figure 1": fig1["verdict"],
        "Figure 4": fig4["verdict"],
        "Figure 5": fig5["verdict"],
    }
    for png in PNGS:
        path = out / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000, png


def test_a_system_without_load_averages_reports_them_unknown(quick_run, monkeypatch):
    """Windows' `os` has no `getloadavg`: the reproduction stopped at its start there."""
    from smapctl.repro.mini import _environment, _load_average
    from smapctl.repro.mini_report import _header

    monkeypatch.delattr(os, "getloadavg")
    env = _environment(_load_average())
    assert env["load_average_start"] is None and env["load_average_end"] is None
    results = json.loads((quick_run / "out" / "results.json").read_text())
    assert "load average at the start unknown;" in _header(results | {"environment": env})


def test_results_md_cells_are_the_numbers_of_results_json(quick_run):
    """RESULTS.md is rendered from results.json alone: each table cell must be the recorded number in its
    own column (PSNR in the PSNR column, accuracy in per cent, one cell per prefix k = 0..K), and the
    timing table must say how each run was obtained."""
    from smapctl.repro.mini_report import NAMES
    from smapctl.repro.report import fmt, mean

    out = quick_run / "out"
    r = json.loads((out / "results.json").read_text())
    text = (out / "RESULTS.md").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every table row has as many cells as its header
        if line.startswith("|---"):
            cells = lines[i - 1].count(" | ")
            for row in lines[i + 1 :]:
                if not row.startswith("| "):
                    break
                assert row.count(" | ") == cells, row
    for row in r["table2"]["rows"]:
        cells = [
            row["K"],
            NAMES[row["variant"]],
            fmt(row["psnr"]),
            fmt(row["fd"]),
            fmt(row["accuracy"], 1, 100),
        ]
        assert "| " + " | ".join(map(str, cells)) + " % |" in lines
    K, seeds = r["options"]["budgets"][-1], r["options"]["seeds"]
    smap = [r["curves"][f"tok-smap-K{K}-s{s}"]["accuracy"] for s in seeds]
    assert "| SMAP | " + " | ".join(fmt([c[k] for c in smap], 0, 100) for k in range(K + 1)) + " |" in lines
    lowest = min(mean([c[k] for c in r["fig1"]["smap"]["accuracy"]]) for k in range(K + 1))
    assert f"at least {100 * lowest:.0f} % (mean over seeds) at every k" in text
    assert f"SMAP K = {K}: the classifier recognises" in text  # the verdicts' figure 1 row: the largest K
    follows = list(zip(*r["fig4"]["smap"]["follows_class"], strict=True))
    assert "| SMAP | new class c | " + " | ".join(fmt(v, 0, 100) + " %" for v in follows) + " |" in lines
    assert "## Runs and timing" in text and r["timing"]["reused_runs"] == 0 and "Training all" not in text
    for name, x in r["runs"].items():
        cells = [name, x["steps"], "trained", f"{x['trained_s']:.0f}", f"{x['ms_per_step']:.0f}"]
        assert "| " + " | ".join(map(str, cells)) + " |" in lines, name


def _verdict_of(comparisons: list[dict]) -> str:
    """The verdict of comparisons as results.json records them (Comparison.to_dict)."""
    return verdict([Comparison(c["what"], c["a"], c["b"], c["higher_is_better"]) for c in comparisons])


def test_rerun_reuses_every_run(quick_run, tmp_path):
    """A second run over the same work folder (here on a subset: one seed, two budgets) trains nothing and
    measures the same curves."""
    from smapctl.repro.mini import reproduce_mini

    first = json.loads((quick_run / "out" / "results.json").read_text())
    opts = MiniOptions(
        out=tmp_path, recipes=RECIPES, work=quick_run / "runs", quick=True, seeds=(0,), budgets=(4, 16)
    )
    again = reproduce_mini(opts).results
    assert again["timing"]["trained_runs"] == 0 and again["timing"]["reused_runs"] == len(again["runs"]) == 12
    assert all(again["curves"][name] == first["curves"][name] for name in again["curves"])
    # each reused run reports how long its training took when it was trained
    assert all(again["runs"][n]["trained_s"] == first["runs"][n]["wall_s"] for n in again["runs"])
    assert again["timing"]["all_trainings_s"] is not None
    assert f"Training all {len(again['runs'])} runs took" in (tmp_path / "RESULTS.md").read_text()


def test_a_rerun_with_a_resumed_run_gives_no_total_of_every_training(quick_run, tmp_path, monkeypatch):
    """A reused run whose training was resumed (its recorded time covers only the part after the resume):
    the total of every training's time is unknown, not the sum of those recorded. Only a rerun of runs
    trained in one go was checked, so summing them whatever they covered passed, and RESULTS.md said
    "Training all 12 runs took" an undercount."""
    from smapctl.repro import runs
    from smapctl.repro.mini import reproduce_mini

    real = runs._read_timing
    resumed = "tok-smap-K4-s0"

    def one_resumed(run_dir):
        timing = real(run_dir)
        return timing | {"resumed": True} if Path(run_dir).name == resumed else timing

    monkeypatch.setattr(runs, "_read_timing", one_resumed)
    opts = MiniOptions(
        out=tmp_path, recipes=RECIPES, work=quick_run / "runs", quick=True, seeds=(0,), budgets=(4, 16)
    )
    again = reproduce_mini(opts).results
    assert again["runs"][resumed]["resumed"] and again["timing"]["reused_runs"] == len(again["runs"])
    assert again["timing"]["all_trainings_s"] is None
    assert "Training all" not in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.parametrize("stop", ["interrupt", "disk full at RESULTS.md"])
def test_an_interrupted_run_leaves_the_previous_results_whole(quick_run, tmp_path, monkeypatch, stop):
    """The figures were written into --out as each section finished: an interrupted run left new ones
    beside the previous run's RESULTS.md and results.json (in recipes/mini, the committed results). They
    wait in a staging folder now, moved in with RESULTS.md at the end. They were moved in just before
    results.json and RESULTS.md were written, so a full disk at RESULTS.md still left new figures (and a
    new results.json) beside the old RESULTS.md: the two are written into the staging folder too."""
    import errno

    from smapctl import io
    from smapctl.repro import mini

    out = tmp_path / "out"
    shutil.copytree(quick_run / "out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if stop == "interrupt":

        def interrupted(study):
            raise KeyboardInterrupt

        monkeypatch.setitem(mini.SECTIONS, "fig1", interrupted)  # after table 2 and 3 drew their figures
        raised = pytest.raises(KeyboardInterrupt)
    else:
        fsync_path = io.fsync_path

        def full_at_results_md(path):
            if "RESULTS.md" in Path(path).name:
                raise OSError(errno.ENOSPC, "No space left on device")
            fsync_path(path)

        monkeypatch.setattr(io, "fsync_path", full_at_results_md)
        raised = pytest.raises(UserError, match=r"out/RESULTS\.md: could not write .* the disk is full")
    opts = MiniOptions(
        out=out, recipes=RECIPES, work=quick_run / "runs", quick=True, seeds=(0,), budgets=(4, 16)
    )
    with raised:
        mini.reproduce_mini(opts)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


@pytest.mark.parametrize("name", [b"out", b"out\xe9"])
def test_a_training_stopped_by_a_signal_stops_the_reproduction(tmp_path, monkeypatch, capsys, caplog, name):
    """A training takes Ctrl-C / SIGTERM as "finish the step, save, return": the reproduction went on,
    and its report measured the half-trained models as if trained to the end (8 signals did not stop it).
    The training's own stop line advised `train-tokenizer ... --resume`, which resumes that one run, not
    the reproduction: it names the reproduction's command. Its line names --out; one named in Latin-1
    (`out\xe9`) came out as `\\udce9` (stderr's backslashreplace), or stopped an in-process caller's
    stream with a UnicodeEncodeError."""
    import os
    import signal

    from smapctl.train.runner import TrainingRun
    from smapctl.train.signals import GracefulStop

    record = TrainingRun.record

    def record_then_signal(self, step, *args, **kwargs):  # SIGTERM during step 1 of 2
        record(self, step, *args, **kwargs)
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(GracefulStop, "last_signal", None)
    monkeypatch.setattr(TrainingRun, "record", record_then_signal)
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), name))
    args = ("--quick", "--seeds", "0", "--budgets", "4", "--out", out, "--work", tmp_path / "runs")
    code, _, err = run_cli(capsys, "reproduce", "mini", *args, "--recipes", RECIPES)
    assert code == 143 and "Traceback" not in err, err
    shown = os.path.join(str(tmp_path), name.decode("utf-8", "backslashreplace"))
    said = f"stopped: tok-smap-K4-s0 stopped at step 1 of 2; nothing written to {shown} (the same command"
    assert said in " ".join(err.split()), err
    assert not os.path.exists(out)  # nor the empty --out folder it made
    said = [r.getMessage() for r in caplog.records if "stopped by SIGTERM" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("(continue: the same reproduce command)"), said
    assert "--resume" not in caplog.text + err


def test_a_signal_in_a_trainings_last_step_stops_the_reproduction(tmp_path, monkeypatch, capsys, caplog):
    """A signal during a training's last step leaves that run complete, so the reproduction went on to its
    next training (and the rest of the reproduction) as if no signal had come. It stops after that run."""
    import os
    import signal

    from smapctl.train.runner import TrainingRun
    from smapctl.train.signals import GracefulStop

    record = TrainingRun.record

    def record_then_signal(self, step, *args, **kwargs):  # SIGINT during step 2 of 2
        record(self, step, *args, **kwargs)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(GracefulStop, "last_signal", None)
    monkeypatch.setattr(TrainingRun, "record", record_then_signal)
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ("--quick", "--seeds", "0", "--budgets", "4", "--out", out, "--work", runs)
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(capsys, "reproduce", "mini", *args, "--recipes", RECIPES)
    assert code == 130, err
    assert "stopped: tok-smap-K4-s0 stopped at step 2 of 2; nothing written to" in " ".join(err.split())
    assert "SIGINT during the last step: the run is complete" in caplog.text
    assert not out.exists() and [p.name for p in runs.iterdir() if p.is_dir()] == ["tok-smap-K4-s0"]


def test_a_staging_folder_is_removed_only_when_no_run_holds_it(tmp_path):
    """A second reproduction into the same --out removed the staging folder of the first, which was still
    drawing its figures there (the first then failed at its end, without RESULTS.md)."""
    import fcntl
    import os

    from smapctl.repro.mini import sweep_staging

    killed, running = tmp_path / ".figures-killed", tmp_path / ".figures-running"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "table2.png").write_bytes(b"png")
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running reproduction holds its own
        sweep_staging(tmp_path)
    finally:
        os.close(fd)
    assert not killed.exists() and (running / "table2.png").exists()


def test_changed_recipe_retrains_the_run(tmp_path):
    """A run folder from another recipe (here: another seed) is not reused."""
    from smapctl.train.tokenizer import train_tokenizer

    runs = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1)
    other = runs.tokenizer_recipe(TokenizerRun("smap", 4, 1))
    train_tokenizer(other, tmp_path / "tok-smap-K4-s0")  # a seed-1 run in the seed-0 folder
    runs.tokenizer(TokenizerRun("smap", 4, 0))
    assert not runs.records["tok-smap-K4-s0"].reused


@pytest.mark.parametrize(
    ("recipe", "said"),
    [
        ({"model": {"regularizer": 5}}, "its recipe's model.regularizer: expected a section"),
        (None, "holds no recipe"),
    ],
)
def test_a_run_whose_meta_json_no_recipe_takes_is_one_line_naming_it(tmp_path, recipe, said):
    """A run of the --work folder whose newest checkpoint's meta.json holds a recipe value no recipe takes
    (hand-edited, damaged) was refused as `model.regularizer: expected a section ...`, as if the mini
    recipe were wrong, and one without a recipe ended in a KeyError traceback: one line naming that
    meta.json, its files untouched."""
    from smapctl.recipe import TokenizerRecipe

    runs = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1)
    meta = tmp_path / "tok" / "checkpoints" / "step_000000004" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"kind": "tokenizer", "recipe": recipe}))
    with pytest.raises(UserError, match=f"^{re.escape(str(meta))}: {said}.* \\(a broken or hand-edited meta"):
        runs._usable_checkpoint(
            tmp_path / "tok", runs.tokenizer_recipe(TokenizerRun("smap", 4, 0)), TokenizerRecipe, None
        )
    assert meta.is_file()


def test_quick_mode_never_writes_into_the_recipes_by_default():
    quick, full = MiniOptions(quick=True), MiniOptions()
    assert quick.work == quick.out == Path("runs/mini-quick")
    assert full.work == Path("runs/mini") and full.out == Path("recipes/mini")
    # A quick run's results go to its --work folder, as the help says (they went to runs/mini-quick).
    assert MiniOptions(quick=True, work=Path("elsewhere")).out == Path("elsewhere")


def test_figure_5_draws_the_published_50_samples_per_class_by_default():
    """The command passes no sample count: figure 5's comes from MiniOptions, and recipes/mini/RESULTS.md
    was made with 50 a class (2 with --quick). Only quick runs were checked, so another default passed,
    and a reproduction judged fewer samples than the published one, its clf-FD not comparable."""
    assert MiniOptions().samples_per_class == 50 and MiniOptions(quick=True).samples_per_class == 2
    assert "Guided samples (50 per class" in (RECIPES / "RESULTS.md").read_text()
    assert MiniOptions(samples_per_class=7).samples_per_class == 7


def test_the_results_go_beside_the_recipes_named_with_recipes():
    """An installed smapctl holds no recipes/mini: a user copies it and names the copy with --recipes. The
    results went to ./recipes/mini all the same, a folder made for them, away from the recipes."""
    full = MiniOptions(recipes=Path("exp/mini"))
    assert full.out == Path("exp/mini")
    assert "--out exp/mini --recipes exp/mini" in full.command()
    assert MiniOptions(recipes=Path("exp/mini"), out=Path("res")).out == Path("res")
    assert MiniOptions(quick=True, recipes=Path("exp/mini")).out == Path("runs/mini-quick")


def test_an_out_folder_whose_name_is_not_utf8_gets_its_results_md(tmp_path, capsys):
    """`--out` named in Latin-1 (`out\xe9`): every run trained and the figures and results.json written,
    then RESULTS.md (whose first lines give the command, naming the folder) stopped the command with a
    UnicodeEncodeError traceback, the figures beside no RESULTS.md. It is written, the bytes as \\xNN."""
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"out\xe9"))
    args = ["reproduce", "mini", "--quick", "--seeds", "0", "--budgets", "4", "--recipes", RECIPES]
    code, stdout, err = run_cli(capsys, *args, "--work", tmp_path / "runs", "--out", out)
    assert code == 0 and "Traceback" not in err, err
    assert f"--out {tmp_path}/out\\xe9 --recipes" in (Path(out) / "RESULTS.md").read_text()
    assert json.loads((Path(out) / "results.json").read_text())["options"]["out"] == out


def test_missing_recipes_folder_is_one_line_naming_the_option(tmp_path, monkeypatch):
    from smapctl.repro.mini import reproduce_mini

    monkeypatch.chdir(tmp_path)  # not the repository: recipes/mini is not here
    with pytest.raises(UserError, match=r"^--recipes: recipes/mini is not a folder \(the mini recipes") as e:
        reproduce_mini(MiniOptions(quick=True))
    # An installed smapctl has no repository to run from: the message says where the recipes are and that
    # a copy does (it said "run from the repository's top folder", which a pip user does not have).
    assert "not in the installed package" in str(e.value) and "a copy" in str(e.value)
    assert not (tmp_path / "runs").exists()
    toks, gens = MiniOptions().plan()
    assert len(toks) == len(set(toks)) == 24 and len(gens) == 6
    assert {t.variant for t in toks} == {"smap", "titok", "notrunc", "full_mix", "pow2", "tail_weighted"}


def test_every_mini_recipe_loads_and_the_variants_differ_as_named():
    runs = Runs(RECIPES, Path("unused"), quick=False, fresh=False, total=0)
    smap, titok, notrunc = (
        runs.tokenizer_recipe(TokenizerRun(v, 8, 1)) for v in ("smap", "titok", "notrunc")
    )
    assert smap.model.class_condition and smap.model.tail_drop == "uniform"
    assert not titok.model.class_condition and titok.model.tail_drop == "none"
    assert notrunc.model.class_condition and notrunc.model.tail_drop == "none"
    assert smap.model.num_latent_tokens == 8 and smap.train.seed == 1
    assert runs.tokenizer_recipe(TokenizerRun("pow2", 16, 0)).model.tail_drop == "pow2"


def test_each_card_setting_trains_on_its_tokenizer_with_its_class_embedding():
    """Figure 5 compares (i) a TiTok-style tokenizer with CARD's own class embedding, (ii) SMAP with its own
    and (iii) SMAP sharing the tokenizer's: each setting's recipe must say exactly that, or two of the
    three bars measure the same thing."""
    from smapctl.repro.runs import GeneratorRun

    work = Path("unused-work").absolute()
    runs = Runs(RECIPES, work, quick=False, fresh=False, total=0)
    expected = {"recon_only": ("titok", "independent"), "independent": ("smap", "independent"),
                "shared": ("smap", "shared")}  # fmt: skip
    for setting, (variant, class_embed) in expected.items():
        run = GeneratorRun(setting, 8, 1)
        assert run.tokenizer == TokenizerRun(variant, 8, 1)
        recipe = runs.generator_recipe(run)
        assert Path(recipe.latents.tokenizer) == work / f"tok-{variant}-K8-s1", setting
        assert recipe.class_embed == class_embed, setting
        assert recipe.model.num_tokens == 8 and recipe.train.seed == 1


def test_comparison_outcomes_and_verdicts():
    better = Comparison("x", [1.0, 1.2], [2.0, 2.5], higher_is_better=False)
    assert better.a_better and better.separated and "beyond" in better.outcome
    overlapping = Comparison("x", [1.0, 2.2], [2.0, 2.5], higher_is_better=False)
    assert overlapping.a_better and not overlapping.separated
    worse = Comparison("x", [3.0, 3.1], [2.0, 2.5], higher_is_better=False)
    assert verdict([better]) == HELD
    assert verdict([better, overlapping]) == HELD_IN_MEANS
    assert verdict([better, worse]) == MIXED
    assert verdict([worse]) == NOT_HELD
    assert Comparison("x", [1.0], [1.0], True).outcome == "equal"
    assert not Comparison("x", [2.0], [1.0], True).separated  # one seed: no spread to judge


def test_a_difference_never_contradicts_the_rounded_means_beside_it():
    near = Comparison("acc", [0.986, 0.986], [0.974, 0.974], higher_is_better=True)
    assert "a 99 ± 0 vs b 97 ± 0 (+1.2; better" in _cmp(near.to_dict(), "a", "b", 0, 100)  # not "+1"
    assert fmt_delta([0.99], [0.97], 0, 100) == "+2"  # agrees already: no extra digit
    assert fmt_delta([0.9861], [0.9740], 0, 100) == "+1.2"
    assert fmt_delta([3.0], [1.0]) == "+2.00"


def test_a_cell_is_the_mean_and_half_the_range_over_seeds():
    """RESULTS.md promises `mean ± spread` with spread = half the range (two seeds: mean - spread and
    mean + spread are the two values), scaled before rounding, and a single seed as its bare value."""
    from smapctl.repro.report import fmt

    assert fmt([1.0, 3.0]) == "2.00 ± 1.00"
    assert fmt([0.25, 0.75], 0, 100) == "50 ± 25"
    assert fmt([0.5]) == "0.50"
    assert fmt([0.123], 1, 100) == "12.3"


def test_an_equal_comparison_is_better_for_neither_side():
    """Equal means are no evidence for a claim: counted as "a better" they turned a claim that did not hold
    into "held in the means"."""
    equal = Comparison("x", [1.0, 2.0], [1.5, 1.5], higher_is_better=True)
    assert not equal.a_better and equal.outcome == "equal"
    assert verdict([equal]) == NOT_HELD
    better = Comparison("x", [3.0, 3.1], [1.0, 1.1], higher_is_better=True)
    assert verdict([better, equal]) == MIXED


def test_touching_ranges_over_seeds_are_not_beyond_the_spread():
    """ "Beyond the seed spread" means the ranges do not overlap: sharing an end point is an overlap."""
    touching = Comparison("x", [1.0, 2.0], [2.0, 3.0], higher_is_better=False)
    assert touching.a_better and not touching.separated
    assert touching.outcome == "better in the mean only" and verdict([touching]) == HELD_IN_MEANS


def test_touching_ranges_are_not_beyond_the_spread_on_either_side():
    """a above b sharing an end point overlaps as much as a below b sharing one."""
    touching = Comparison("x", [2.0, 3.0], [1.0, 2.0], higher_is_better=True)
    assert touching.a_better and not touching.separated and verdict([touching]) == HELD_IN_MEANS


def test_a_comparison_sentence_and_record_keep_a_and_b_apart():
    """The report's sentence, rendered from the record results.json keeps, names each side with its own
    values and the signed difference a - b (a report re-rendered from it must not flip a claim)."""
    c = Comparison("clf-FD", [1.0, 1.2], [2.0, 2.5], higher_is_better=False)
    record = c.to_dict()
    assert record["delta"] == pytest.approx(-1.15) and record["outcome"] == "better beyond the seed spread"
    assert _cmp(record, "SMAP", "TiTok") == (
        "clf-FD: SMAP 1.10 ± 0.10 vs TiTok 2.25 ± 0.25 (-1.15; better beyond the seed spread)"
    )
    assert (
        _cmp(Comparison("x", [2.0], [1.0], True).to_dict(), "a", "b")
        == "x: a 2.00 vs b 1.00 (+1.00; better in the mean only)"
    )


def test_md_table_is_a_github_table_with_one_separator_cell_per_column():
    from smapctl.repro.report import md_table

    assert md_table(["a", "b"], [["1", 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_keep_profile_matches_the_schedule():
    cfg = SMAPConfig(image_size=16, patch_size=4, enc_width=8, enc_heads=1, dec_width=8, dec_heads=1,
                     num_latent_tokens=4, num_classes=3)  # fmt: skip
    uniform = keep_profile(cfg, draws=50_000)
    assert uniform.p_k == pytest.approx([0.2] * 5, abs=0.01)
    assert uniform.position_rate == pytest.approx([0.8, 0.6, 0.4, 0.2], abs=0.01)
    none = keep_profile(SMAPConfig(**{**vars(cfg), "tail_drop": "none"}), draws=100)
    assert none.p_k == [0, 0, 0, 0, 1] and none.mean_k == 4


def test_dominance_needs_no_worse_everywhere_and_better_at_full():
    def curve(psnr, fd, acc0=0.9):
        return {"psnr": psnr, "fd": fd, "accuracy": [acc0] + [1.0] * (len(psnr) - 1)}

    uniform = [curve([10, 20, 30], [9, 5, 3]), curve([10.2, 20.2, 30.2], [9, 5, 3])]
    better = [curve([10.1, 20.1, 32], [9, 5, 3]), curve([10.1, 20.1, 32.2], [9, 5, 3])]
    assert dominance("s", better, uniform).dominates
    worse_short = [curve([8, 20.1, 32], [9, 5, 3]), curve([8, 20.1, 32.2], [9, 5, 3])]
    d = dominance("s", worse_short, uniform)
    assert not d.dominates and d.worse_at["psnr"] == [0] and d.better_at_full == ["psnr"]
    lost_class = [curve([10.1, 20.1, 32], [9, 5, 3], 0.2), curve([10.1, 20.1, 32.2], [9, 5, 3], 0.2)]
    assert dominance("s", lost_class, uniform).worse_at["accuracy"] == [0]
    # One seed has no spread: a difference of any size would have passed as "beyond the tolerance".
    one = dominance("s", better[:1], uniform[:1])
    assert not one.measured and not one.dominates and not one.better_at_full
    assert one.to_dict()["measured"] is False


def test_swapped_classes_never_keep_the_label():
    from smapctl.repro.measure import swapped_classes

    labels = torch.arange(10).repeat(50)
    other = swapped_classes(labels, 10, seed=3)
    assert (other != labels).all() and other.min() >= 0 and other.max() <= 9
    assert len(other.unique()) == 10
    assert torch.equal(other, swapped_classes(labels, 10, seed=3))


@pytest.mark.parametrize(
    ("option", "value", "span"),
    [
        ("--budgets", "0,4", "from 1 to 256"),
        ("--budgets", f"4,{2**63}", "from 1 to 256"),
        ("--budgets", "4,257", "from 1 to 256"),
        ("--seeds", "0,4294967296", "from 0 to"),
    ],
)
def test_a_budget_or_seed_out_of_range_is_refused_as_an_option(tmp_path, capsys, option, value, span):
    """A seed above train.seed's range was refused by the recipe check, naming `--set train.seed`; a budget of
    2^63 overflowed in torch.zeros as the first tokenizer was built (a traceback), and one of 100000 started
    training a tokenizer far beyond the paper's largest budget (256)."""
    code, _, err = run_cli(capsys, "reproduce", "mini", "--quick", option, value, "--out", tmp_path / "m")
    flat = " ".join(err.replace("│", " ").split())
    assert code == 2 and option in err and f"expected comma-separated integers {span}" in flat, err
    assert "num_latent_tokens" not in err and "train.seed" not in err
    assert not (tmp_path / "m").exists() and not Path("runs/mini-quick").exists()


@pytest.mark.parametrize(("option", "value"), [("--seeds", "0,one"), ("--budgets", "4,1.5")])
def test_a_seed_or_budget_that_is_no_integer_is_refused_as_an_option(tmp_path, capsys, option, value):
    """A list with a value that is not an integer is a usage error naming the option (exit 2), before
    anything is made."""
    code, _, err = run_cli(capsys, "reproduce", "mini", "--quick", option, value, "--out", tmp_path / "m")
    flat = " ".join(err.replace("│", " ").split())
    assert code == 2 and f"Invalid value for {option}: expected comma-separated integers, e.g. 0,1" in flat, (
        err
    )
    assert not (tmp_path / "m").exists() and not Path("runs/mini-quick").exists()


def test_more_threads_than_cpus_are_refused(tmp_path, capsys):
    """`--threads 2147483648` overflowed in torch.set_num_threads (a traceback); a count beyond the CPUs
    only has its threads wait on each other."""
    cpus = os.cpu_count() or 1
    for value in (cpus + 1, 2**31):
        args = ("--threads", value, "--out", tmp_path / "m", "--work", tmp_path / "w")
        code, _, err = run_cli(capsys, "reproduce", "mini", "--quick", *args)
        flat = " ".join(err.replace("│", " ").split())
        assert code == 2 and f"Invalid value for --threads: at most {cpus}, this machine's CPUs" in flat, err
    assert not any(tmp_path.iterdir())


def test_a_repeated_seed_or_budget_is_refused(tmp_path, capsys):
    """--seeds 0,0 counted one run twice: a seed spread of 0 made any gap "beyond the spread"."""
    for option, value in (("--seeds", "0,0"), ("--budgets", "4,4,16")):
        code, _, err = run_cli(capsys, "reproduce", "mini", "--quick", option, value, "--out", tmp_path / "m")
        assert code == 2 and option in err and "repeated" in err
    assert not (tmp_path / "m").exists()


def test_the_threads_are_given_back_when_the_study_ends(tmp_path):
    """reproduce_mini set torch's thread count for the study and left it so: a Python caller's next work
    ran on `threads` threads (here the study stops at once, on recipes that are not there)."""
    from smapctl.repro.mini import MiniOptions, reproduce_mini

    before = torch.get_num_threads()
    opts = MiniOptions(out=tmp_path / "m", recipes=tmp_path / "none", work=tmp_path / "w", threads=before + 1)
    with pytest.raises(UserError, match="--recipes"):
        reproduce_mini(opts)
    assert torch.get_num_threads() == before


def test_a_file_as_out_is_refused_before_any_training(tmp_path):
    from smapctl.repro.mini import reproduce_mini

    (tmp_path / "out").write_text("not a folder\n")
    with pytest.raises(UserError, match=r"^--out: .* is a file, not a folder$"):
        reproduce_mini(MiniOptions(quick=True, out=tmp_path / "out", work=tmp_path / "runs", recipes=RECIPES))
    assert not (tmp_path / "runs").exists()
    # A --work file is named as such, also when it is the --out that --quick defaults to (it was "--out").
    for out in (tmp_path / "results", None):
        with pytest.raises(UserError, match=r"^--work: .*out is a file, not a folder$"):
            reproduce_mini(MiniOptions(quick=True, out=out, work=tmp_path / "out", recipes=RECIPES))
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("option", ["--out", "--work"])
def test_a_folder_inside_a_runs_checkpoints_is_refused_before_anything_is_written(tmp_path, option):
    """`--out RUN/checkpoints/step_N` wrote RESULTS.md, results.json and the figures into a checkpoint its
    run deletes as it prunes; `--work` there was refused by the first training, saying "--out", once the
    work folder's mode file had been written into the checkpoint."""
    from smapctl.repro.mini import reproduce_mini

    step = tmp_path / "run" / "checkpoints" / "step_000000003"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    where = {"out": tmp_path / "out", "work": tmp_path / "runs", option.removeprefix("--"): step}
    with pytest.raises(UserError, match=rf"a training run's checkpoints, .*; choose another {option}$"):
        reproduce_mini(MiniOptions(quick=True, recipes=RECIPES, **where))
    assert [p.name for p in step.iterdir()] == ["meta.json"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option", ["--out", "--work"])
def test_a_training_runs_folder_is_refused_before_anything_is_written(tmp_path, option):
    """`--out` or `--work` a training run's folder (`runs/demo-tokenizer`) filled it with the mini runs and
    RESULTS.md beside its checkpoints, exit 0."""
    from smapctl.repro.mini import reproduce_mini

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    where = {"out": tmp_path / "out", "work": tmp_path / "runs", option.removeprefix("--"): run}
    with pytest.raises(
        UserError, match=rf"{option}: .*run is a training run's folder; choose another {option}$"
    ):
        reproduce_mini(MiniOptions(quick=True, recipes=RECIPES, **where))
    assert [p.name for p in run.iterdir()] == ["checkpoints"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_a_work_folder_of_the_other_mode_is_refused_not_wiped(tmp_path, monkeypatch):
    """A --quick run pointed at the full runs' folder took every run for one of another recipe and deleted
    it; the folder's mode is recorded (or read from its runs' step count) and another mode refused."""
    from smapctl.repro import runs as runs_module
    from smapctl.repro.mini import reproduce_mini
    from smapctl.train import checkpoint as ckpt

    work = tmp_path / "runs"
    quick = Runs(RECIPES, work, quick=True, fresh=False, total=1)
    quick.tokenizer(TokenizerRun("smap", 4, 0))  # a quick run, from before the mode file
    assert quick._work_mode() == "quick"
    before = sorted(p.name for p in (work / "tok-smap-K4-s0" / "checkpoints").iterdir())
    with pytest.raises(
        UserError, match=r"^--work .*: holds the runs of a quick reproduction, which this full"
    ):
        reproduce_mini(MiniOptions(out=tmp_path / "out" / "mini", work=work, recipes=RECIPES))
    assert not (tmp_path / "out").exists()  # the --out folders it made, removed again
    assert sorted(p.name for p in (work / "tok-smap-K4-s0" / "checkpoints").iterdir()) == before
    (work / runs_module.MODE_FILE).write_text("full\n")
    with pytest.raises(UserError, match=r"holds the runs of a full reproduction, which this quick one"):
        Runs(RECIPES, work, quick=True, fresh=False, total=1).claim_work_folder()
    Runs(RECIPES, work, quick=True, fresh=True, total=1).claim_work_folder()  # --fresh replaces them
    assert (work / runs_module.MODE_FILE).read_text() == "quick\n"

    # A resumed run's ms/step divides by the steps trained after the resume, not by all of them.
    keep_two = ["train.ckpt_every=1", "train.keep_checkpoints=2"]
    monkeypatch.setattr(runs_module, "QUICK_TOKENIZER", [*runs_module.QUICK_TOKENIZER, *keep_two])
    runs = Runs(RECIPES, tmp_path / "resume", quick=True, fresh=False, total=1)
    run = TokenizerRun("smap", 4, 0)
    final = runs.tokenizer(run)
    assert ckpt.load_meta(final)["step"] == 2
    shutil.rmtree(final)
    resumed = Runs(RECIPES, tmp_path / "resume", quick=True, fresh=False, total=1)
    resumed.tokenizer(run)
    record = resumed.records[run.name]
    assert record.resumed and record.trained_steps == 1
    assert record.ms_per_step == pytest.approx(1000 * record.trained_s)


def test_a_reused_run_reports_how_its_training_went(tmp_path, monkeypatch, caplog):
    """A run trained now stays "trained" however often the reproduction asks for it (a generator asks for
    its tokenizer again); reused by a later reproduction, it reports the time, step count and resume its
    training recorded in its folder, and a damaged record only loses the timing, not the run."""
    import logging

    from smapctl.repro import runs as runs_module
    from smapctl.train import checkpoint as ckpt

    three_steps = ["train.max_steps=3", "train.ckpt_every=1", "train.keep_checkpoints=2"]
    monkeypatch.setattr(runs_module, "QUICK_TOKENIZER", [*runs_module.QUICK_TOKENIZER, *three_steps])
    run = TokenizerRun("smap", 4, 0)
    shutil.rmtree(Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1).tokenizer(run))  # step 2 left
    caplog.set_level(logging.INFO, logger="smapctl.repro")
    resumed = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=2)
    final = resumed.tokenizer(run)
    assert resumed.tokenizer(run) == final and not resumed.records[run.name].reused
    trained = resumed.records[run.name]
    assert trained.resumed and trained.trained_steps == 1 and trained.steps == 3
    assert f"[1/2] {run.name}: trained 1 steps in " in caplog.text and "(resumed at step 2)" in caplog.text

    caplog.clear()
    again = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1)
    assert again.tokenizer(run) == final
    record = again.records[run.name]
    assert record.reused and record.resumed and record.trained_steps == 1
    assert record.trained_s == trained.wall_s and record.ms_per_step == pytest.approx(1000 * trained.wall_s)
    assert f"[1/1] {run.name}: reused, trained earlier in" in caplog.text

    (tmp_path / run.name / runs_module.TIMING_FILE).write_text('{"wall_s": 1.')  # cut short
    damaged = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1)
    assert damaged.tokenizer(run) == final and ckpt.load_meta(final)["step"] == 3
    assert damaged.records[run.name].reused and damaged.records[run.name].trained_s is None


def test_fresh_retrains_a_run_the_work_folder_has_finished(tmp_path):
    """`--fresh` retrains every run it is asked for, even one finished with the same recipe (it is what
    one passes after a change the recipe does not show, e.g. to the code)."""
    from smapctl.train import checkpoint as ckpt

    run = TokenizerRun("smap", 4, 0)
    first = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1).tokenizer(run)
    before = (first / "model.safetensors").stat().st_mtime_ns
    fresh = Runs(RECIPES, tmp_path, quick=True, fresh=True, total=1)
    final = fresh.tokenizer(run)
    assert not fresh.records[run.name].reused and not fresh.records[run.name].resumed
    assert final == first and (final / "model.safetensors").stat().st_mtime_ns != before
    assert ckpt.load_meta(final)["step"] == 2


def test_a_generator_trained_on_another_tokenizer_is_trained_again(tmp_path):
    """A generator's tokens come from one tokenizer's weights: a run made over another tokenizer (one
    retrained since, same recipe) would sample garbage, so its folder is not reused."""
    from smapctl.repro.runs import GeneratorRun
    from smapctl.train import checkpoint as ckpt

    run = GeneratorRun("shared", 4, 0)
    final = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=2).generator(run)
    meta = ckpt.load_meta(final)
    assert meta["tokenizer"]["fingerprint"]
    reused = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=2)
    reused.generator(run)
    assert reused.records[run.name].reused
    meta["tokenizer"]["fingerprint"] = "another tokenizer"
    (final / ckpt.META).write_text(json.dumps(meta))
    again = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=2)
    again.generator(run)
    assert not again.records[run.name].reused and not again.records[run.name].resumed


def test_a_run_folder_another_training_holds_is_not_cleared(tmp_path):
    """Two reproductions in one --work: a run of another recipe is removed for this one's only when no
    training holds its folder; held, it is refused with its files untouched."""
    from faults import lock_held_elsewhere

    from smapctl.repro.runs import _clear_for_a_new_run
    from smapctl.train.run_folder import LOCK_FILE, lock_folder

    run = tmp_path / "tok"
    (run / "checkpoints" / "step_000000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with lock_held_elsewhere(run) as holder:
        with pytest.raises(
            UserError, match=f"is in use by another training \\(process {holder.pid} .*--work\\)$"
        ):
            _clear_for_a_new_run(run, "")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "checkpoints", "metrics.jsonl"]
    _clear_for_a_new_run(run, "")
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    handle, held_by = lock_folder(run)
    assert held_by is None
    handle.close()


def test_a_run_another_reproduction_finishes_as_it_is_looked_at_is_reused_not_cleared(tmp_path, monkeypatch):
    """Two reproductions in one --work: the second looked for a run's checkpoint while the first trained
    it (none yet) and took the folder's lock to clear it just as that training ended (2 quick steps take
    a fraction of a second): the finished run was removed, and the first reproduction stopped with
    "ema.safetensors: not found". Looked at again under the lock, it is reused."""
    from smapctl.train import run_folder
    from smapctl.train.tokenizer import train_tokenizer

    runs = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1)
    run = TokenizerRun("smap", 4, 0)
    run_dir = tmp_path / run.name
    run_dir.mkdir()  # the other reproduction's training has made its folder, no checkpoint yet
    take = run_folder.lock_folder

    def the_other_training_ends_first(folder):
        monkeypatch.setattr(run_folder, "lock_folder", take)
        train_tokenizer(runs.tokenizer_recipe(run), run_dir)
        return take(folder)

    monkeypatch.setattr(run_folder, "lock_folder", the_other_training_ends_first)
    final = runs.tokenizer(run)
    assert runs.records[run.name].reused
    assert (final / "ema.safetensors").is_file()


# ------------------------------------------------------------------------------------------ verdict logic


def _fig1_study(monkeypatch, recognised: dict[str, list[int]], num_classes: int = 10):
    """fig1 over made-up class-only results: `recognised` gives, per variant, how many classes each seed's
    class-only decodes got right (no model is trained or measured)."""
    from types import SimpleNamespace

    from smapctl.repro import mini

    def class_only(model, ref):
        ok = [True] * recognised[model.variant][model.seed]
        return None, ok + [False] * (ref.num_classes - len(ok))

    monkeypatch.setattr(mini.measure, "class_only", class_only)
    monkeypatch.setattr(mini, "_panel_fig1", lambda study: None)
    curve = {"psnr": [10.0, 20.0], "fd": [5.0, 2.0], "accuracy": [0.5, 0.9]}
    return SimpleNamespace(
        opts=SimpleNamespace(K=1, seeds=(0, 1)),
        ref=SimpleNamespace(num_classes=num_classes),
        model=lambda run: run,
        curves=lambda variant, K: [curve, curve],
    )


@pytest.mark.parametrize(
    ("smap", "expected"),
    [
        ([9, 10], HELD),  # every seed at the 90 % line
        ([8, 10], MIXED),  # one seed under it, the mean (9) over half
        ([4, 6], MIXED),  # the mean exactly half
        ([3, 6], NOT_HELD),  # the mean (4.5) under half
        ([0, 0], NOT_HELD),
    ],
)
def test_fig1_verdict_follows_the_class_only_rule(smap, expected, monkeypatch):
    """Figure 1 is held when every seed's class-only decodes are recognised for >= 90 % of the classes,
    mixed when the mean over seeds is >= 50 %; only SMAP's counts decide, the other tokenizers are context."""
    from smapctl.repro.mini import fig1

    others = [10, 10] if expected != HELD else [0, 0]  # the baselines must not move the verdict
    study = _fig1_study(monkeypatch, {"smap": smap, "notrunc": others, "titok": others})
    out = fig1(study)
    assert out["verdict"] == expected
    assert out["smap"]["classes_recognised"] == smap and out["titok"]["classes_recognised"] == others
    assert out["num_classes"] == 10
    assert out["smap"]["psnr"] == [[10.0, 20.0], [10.0, 20.0]]


def test_combine_needs_every_part_for_held_and_none_for_not_held():
    """Figure 5's verdict combines its two claims (semantic tokenizer, sharing)."""
    from smapctl.repro.mini import _combine

    assert _combine(HELD, HELD) == HELD
    assert _combine(HELD, HELD_IN_MEANS) == HELD_IN_MEANS
    assert _combine(HELD_IN_MEANS, HELD_IN_MEANS) == HELD_IN_MEANS
    assert _combine(NOT_HELD, NOT_HELD) == NOT_HELD
    assert _combine(HELD, NOT_HELD) == MIXED
    assert _combine(HELD_IN_MEANS, NOT_HELD) == MIXED
    assert _combine(MIXED, MIXED) == MIXED
    assert _combine(HELD, MIXED) == MIXED


def test_ranges_joins_consecutive_prefixes():
    from smapctl.repro.mini_report import _ranges

    assert _ranges([0, 2, 3, 4, 7]) == "0, 2-4, 7"
    assert _ranges([3]) == "3"
    assert _ranges([0, 1]) == "0-1"
    assert _ranges([1, 3, 5]) == "1, 3, 5"
    assert _ranges([]) == ""


def test_dominance_text_says_what_the_rule_found():
    """The "vs uniform" column of issue 11: the reference, no verdict from one seed, dominates, or where it
    is better and worse."""
    from smapctl.repro.mini_report import _dominance_text

    def d(worse_at, better, measured=True):
        return Dominance("s", worse_at, better, measured).to_dict()

    assert _dominance_text(None) == "(reference)"
    assert _dominance_text(d({"psnr": [], "fd": [], "accuracy": []}, [], False)) == (
        "no verdict from one seed (its tolerance needs two)"
    )
    assert _dominance_text(d({"psnr": [], "fd": [], "accuracy": []}, ["psnr", "fd"])) == (
        "dominates (better at K on psnr, fd)"
    )
    worse = {"psnr": [0, 1, 2, 5], "fd": [], "accuracy": [0]}
    assert (
        _dominance_text(d(worse, ["fd"])) == "better at K on fd; worse: psnr at k = 0-2, 5; accuracy at k = 0"
    )
    assert _dominance_text(d({"psnr": [], "fd": [], "accuracy": []}, [])) == (
        "better at K on nothing; nowhere worse"
    )


def test_recommendation_names_the_best_and_the_dominating_schedules():
    from smapctl.repro.mini_report import _recommendation

    best = {
        "psnr_full": ["pow2"],
        "fd_full": ["uniform", "full_mix"],
        "psnr_mean": ["tail_weighted"],
        "fd_mean": ["uniform"],
        "class_only_accuracy": ["pow2", "none"],
    }
    text = _recommendation({"best": best, "dominating": ["pow2", "full_mix"]})
    assert text.splitlines() == [
        "Recommendation, from the means above:",
        "- decoding from the full budget only: **pow2** has the best PSNR at k = K, "
        "**uniform, full_mix** (tied) have the best clf-FD;",
        "- variable-length use (any prefix): **tail_weighted** has the best PSNR averaged over k, "
        "**uniform** has the best clf-FD averaged over k;",
        "- class-only semantics (k = 0): **pow2, none** (tied) have the best class-only accuracy.",
        "- **pow2, full_mix** dominates uniform under the rule above: a candidate for a documented option.",
    ]
    text = _recommendation({"best": best, "dominating": []})
    assert text.splitlines()[-1] == "- no schedule dominates uniform under the rule above."
    assert "candidate" not in text


def test_best_schedules_keeps_ties_and_lowest_distances():
    from smapctl.repro.mini import _best_schedules

    def entry(psnr_full, fd_full):
        return {"summary": {"psnr_full": psnr_full, "psnr_mean": [1.0], "fd_full": fd_full,
                            "fd_mean": [1.0], "class_only_accuracy": [0.5]}}  # fmt: skip

    best = _best_schedules({"uniform": entry([20.0, 22.0], [3.0]), "pow2": entry([21.0], [2.0]),
                            "none": entry([19.0], [4.0])})  # fmt: skip
    assert best["psnr_full"] == ["uniform", "pow2"]  # means 21 and 21: tied
    assert best["fd_full"] == ["pow2"]  # lower is better
    assert best["fd_mean"] == best["class_only_accuracy"] == ["uniform", "pow2", "none"]


def test_the_figure_1_sentence_gives_the_lowest_mean_accuracy_over_k():
    """ "at least X % at every k" is the lowest of SMAP's per-k accuracies (means over seeds): the quick
    runs' curves are flat, so a `max` there passed every other test."""
    from smapctl.repro.mini_report import _fig1

    K, seeds = 2, [0, 1]
    accuracy = [[0.9, 0.5, 0.8], [0.7, 0.3, 1.0]]  # per seed, k = 0..2: means 0.8, 0.4, 0.9
    psnr = [[10.0, 12.0, 14.0], [11.0, 13.0, 15.0]]
    fig1 = {"num_classes": 3}
    curves = {}
    for v in ("smap", "notrunc", "titok"):
        fig1[v] = {"accuracy": accuracy, "psnr": psnr, "classes_recognised": [3, 2]}
        for s, (acc, p) in enumerate(zip(accuracy, psnr, strict=True)):
            curves[f"tok-{v}-K{K}-s{s}"] = {"accuracy": acc, "psnr": p}
    text = _fig1({"fig1": fig1, "curves": curves, "options": {"budgets": [K], "seeds": seeds}})
    assert "the semantic accuracy of its decodes is at least 40 % (mean over seeds) at every k" in text
    assert "SMAP's PSNR goes from 10.50 ± 0.50 dB at k = 0 to 14.50 ± 0.50 dB at k = 2" in text


def test_reproduce_mini_and_evaluate_share_the_cached_digits_classifier(monkeypatch):
    # At the same size, both ask for one cached classifier: its step count and folder are part of the cache
    # key, and typed in each module they could drift apart (a second classifier, minutes of training).
    from smapctl.eval import classifier, semantic
    from smapctl.repro.mini import build_reference

    class Asked(Exception):
        pass

    asked = []

    def record(dataset, size, images, labels, num_classes, cache_dir, **options):
        asked.append((dataset, size, images.shape, num_classes, Path(cache_dir), options))
        raise Asked

    monkeypatch.setattr(semantic, "load_or_train_classifier", record)
    monkeypatch.setattr(classifier, "load_or_train_classifier", record)  # (mini imports it as it runs)
    with pytest.raises(Asked):
        semantic.reference_classifier("digits")
    with pytest.raises(Asked):
        build_reference(semantic.CLASSIFIER_SIZES["digits"], MiniOptions())
    assert asked[0] == asked[1] and asked[0][-1] == {"steps": classifier.CLASSIFIER_STEPS}


# ------------------------------------------------------------------------- measurements (repro/measure.py)


class _BrightnessJudge(torch.nn.Module):
    """A stand-in reference classifier: its features are the channel means, class 1 is "brighter than
    mid-grey"."""

    num_classes = 2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (N, 3)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        m = f.mean(dim=1)
        return torch.stack([-m, m], dim=1)


class _GreyTokenizer:
    """A stand-in SMAP: every latent token holds its image's mean; a prefix decodes to a flat image of the
    tokens' mean (black-ish 0 with none), or, with class 1 asked for, to a bright image whatever the
    tokens say when `class_wins`."""

    K = 4

    def __init__(self, class_wins: bool = False):
        self.class_wins = class_wins

    def encode(self, x, y):
        from types import SimpleNamespace

        return SimpleNamespace(z=x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, self.K, 2).clone())

    def decode(self, z, y):
        level = z.mean(dim=(1, 2)) if z.shape[1] else torch.zeros(z.shape[0])
        if self.class_wins:
            level = torch.where(y == 1, 0.75, -0.75)
        return level[:, None, None, None].expand(-1, 3, 8, 8).clone()


def _grey_reference():
    from smapctl.repro.measure import Reference

    levels = torch.tensor([-0.5, 0.25, 0.5, -0.75, 0.9, -0.25])
    images = levels[:, None, None, None].expand(-1, 3, 8, 8).clone()
    return Reference.of(_BrightnessJudge(), images, (levels > 0).long())


def test_the_prefix_curve_decodes_the_first_k_tokens_and_averages_psnr_over_images():
    from smapctl.eval.metrics import psnr
    from smapctl.repro.measure import prefix_curve, quantise

    ref = _grey_reference()
    curve = prefix_curve(_GreyTokenizer(), ref)
    assert curve.k == [0, 1, 2, 3, 4]
    # No tokens: flat 0 images; every prefix of these tokens holds the image's level.
    zeros = quantise(torch.zeros_like(ref.images))
    assert curve.psnr[0] == pytest.approx(psnr(zeros, ref.images).mean().item())
    assert curve.psnr[-1] > curve.psnr[0] + 10
    assert curve.accuracy[0] == 0.5 and curve.accuracy[-1] == 1.0  # 0 is class 0: half of them


def test_a_class_swap_counts_the_class_asked_for_and_the_images_own_apart():
    from smapctl.repro.measure import class_swap

    ref = _grey_reference()
    (swap,) = class_swap(_GreyTokenizer(class_wins=True), ref, [2])
    assert (swap.k, swap.follows_class, swap.follows_latents) == (2, 1.0, 0.0)
    (swap,) = class_swap(_GreyTokenizer(), ref, [2])  # the tokens win
    assert (swap.follows_class, swap.follows_latents) == (0.0, 1.0)


def test_samples_are_judged_rounded_to_8_bits():
    from smapctl.repro.measure import quantise, sample_quality

    ref = _grey_reference()
    samples = ref.images + 0.003  # between two 8-bit levels
    labels = torch.tensor([0, 1, 1, 0, 0, 1])
    quality = sample_quality(samples, labels, ref)
    accuracy, fd = ref.judge(quantise(samples), labels)
    assert (quality.accuracy, quality.fd, quality.n) == (accuracy, fd, 6)
    assert quality.fd != ref.judge(samples, labels)[1]
    assert accuracy == pytest.approx(4 / 6)  # the 0s and 1s of the last three swapped


def test_summaries_read_each_seed_at_the_prefix_asked_for_signed_so_larger_is_better():
    from smapctl.repro.mini import _at, _mean_at

    curves = [{"psnr": [10.0, 20.0, 30.0], "fd": [9.0, 5.0, 1.0], "accuracy": [0.1, 0.5, 0.9]}] * 2
    assert _at(curves, 1) == {"psnr": [20.0, 20.0], "fd": [5.0, 5.0], "accuracy": [0.5, 0.5]}
    assert _at(curves, -1)["fd"] == [1.0, 1.0]
    assert _mean_at(curves, "psnr", 0, higher_is_better=True) == 10.0
    assert _mean_at(curves, "fd", 1, higher_is_better=False) == -5.0


def test_a_schedules_summary_is_per_seed_full_mean_and_class_only():
    from smapctl.repro.schedules import summary

    curves = [
        {"psnr": [10.0, 20.0, 30.0], "fd": [9.0, 6.0, 3.0], "accuracy": [0.25, 0.5, 1.0]},
        {"psnr": [12.0, 21.0, 33.0], "fd": [8.0, 5.0, 2.0], "accuracy": [0.75, 0.5, 1.0]},
    ]
    assert summary(curves) == {
        "psnr_full": [30.0, 33.0],
        "psnr_mean": [20.0, 22.0],
        "fd_full": [3.0, 2.0],
        "fd_mean": [6.0, 5.0],
        "class_only_accuracy": [0.25, 0.75],
    }


def test_dominance_tolerates_the_wider_spread_and_counts_a_gain_only_at_full():
    def curve(psnr, fd):
        return {"psnr": psnr, "fd": fd, "accuracy": [0.9] * len(psnr)}

    # PSNR at k=0 lower by 1 in the mean; uniform's seeds spread by 2 (tolerance), the schedule's by 0.
    uniform = [curve([10, 20, 30], [9, 5, 3]), curve([14, 20, 30], [9, 5, 3])]
    s = [curve([11, 20, 30], [9, 5, 3]), curve([11, 20, 30], [9, 5, 3])]
    d = dominance("s", s, uniform)
    assert d.worse_at["psnr"] == [] and d.better_at_full == []
    # Far better at k=1 only: no gain at the full budget.
    s = [curve([12, 25, 30], [9, 5, 3]), curve([12, 25, 30], [9, 5, 3])]
    assert dominance("s", s, uniform).better_at_full == []


def test_a_curve_is_the_mean_over_seeds_on_its_own_axis_labels(tmp_path, monkeypatch):
    """Each series is drawn as its mean over seeds with a min..max band, under its axis's own labels."""
    from smapctl.repro import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    series = plots.Series("a", [0, 1, 2], [[1.0, 2.0, 6.0], [3.0, 4.0, 2.0]])
    axes = [plots.Axis("PSNR", "dB", [series]), plots.Axis("clf-FD", "distance", [series])]
    plots.line_grid(tmp_path / "x.png", axes, "k", ncols=2)
    first, second = figures[0].axes
    assert (first.get_title(), first.get_ylabel(), first.get_xlabel()) == ("PSNR", "dB", "k")
    assert second.get_ylabel() == "distance"
    assert list(first.lines[0].get_ydata()) == [2.0, 3.0, 4.0]
    [band] = first.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == 1.0 and max(ys) == 6.0


def _comparison(what: str, a: list[float], b: list[float]) -> dict:
    return Comparison(what, a, b, higher_is_better=False).to_dict()


def test_the_figure_5_table_gives_each_setting_its_accuracy_and_its_clf_fd():
    from smapctl.repro.mini_report import NAMES, _fig5

    fig5 = {s: {"accuracy": [0.5 + i / 10, 0.6 + i / 10], "fd": [10.0 + i, 12.0 + i]}
            for i, s in enumerate(("recon_only", "independent", "shared"))}  # fmt: skip
    for claim in ("semantic_tokenizer", "sharing"):
        fig5[claim] = {"fd": _comparison("fd", [1.0], [2.0]), "accuracy": _comparison("acc", [0.5], [0.4])}
        fig5[claim]["verdict"] = HELD
    reference = {"real_train_n": 100, "real_train_accuracy": 0.987, "real_train_fd": 0.5}
    text = _fig5({"fig5": fig5, "reference": reference, "options": {"samples_per_class": 4}})
    lines = text.splitlines()
    assert f"| {NAMES['recon_only']} | 55.0 ± 5.0 % | 11.00 ± 1.00 |" in lines, text
    assert f"| {NAMES['shared']} | 75.0 ± 5.0 % | 13.00 ± 1.00 |" in lines, text
    assert "| real training digits (100) | 98.7 % | 0.50 |" in lines, text


def test_the_issue_11_tables_read_each_column_from_its_own_number():
    from smapctl.repro.mini_report import SCHEDULE_TEXT, _issue11
    from smapctl.repro.schedules import schedule_variant

    K, seeds = 2, [0, 1]
    schedules = {
        n: {
            "profile": {"p_k": [0.25, 0.5, 0.125], "mean_k": 1.5, "position_rate": [1.0, 0.75, 0.375]},
            "summary": {"psnr_full": [20.0, 22.0], "psnr_mean": [15.0, 17.0], "fd_full": [3.0, 5.0],
                        "fd_mean": [7.0, 9.0], "class_only_accuracy": [0.5, 0.7]},
            "vs_uniform": None,
        }
        for n in SCHEDULES
    }  # fmt: skip
    best = dict.fromkeys(("psnr_full", "fd_full", "psnr_mean", "fd_mean", "class_only_accuracy"), ["uniform"])
    curve = {"psnr": [1.0, 2.0, 3.0], "fd": [4.0, 5.0, 6.0], "accuracy": [0.1, 0.2, 0.3]}
    curves = {f"tok-{schedule_variant(n)}-K{K}-s{s}": curve for n in SCHEDULES for s in seeds}
    r = {"issue11": {"K": K, "schedules": schedules, "best": best, "dominating": []}, "curves": curves}
    lines = _issue11(r | {"options": {"seeds": seeds}}).splitlines()
    assert f"| uniform | {SCHEDULE_TEXT['uniform']} | 0.250 | 0.125 | 1.50 | 0.375 |" in lines
    row = "| uniform | 21.00 ± 1.00 | 16.00 ± 1.00 | 4.00 ± 1.00 | 8.00 ± 1.00 | 60 ± 10 % | (reference) |"
    assert row in lines, lines


def test_the_timing_table_says_which_runs_were_reused_and_which_resumed():
    from smapctl.repro.mini_report import _timing

    run = {"steps": 10, "trained_s": 30.0, "ms_per_step": 3000.0}
    runs = {
        "a": run | {"reused": True, "resumed": False},
        "b": run | {"reused": False, "resumed": True, "trained_s": None, "ms_per_step": None},
    }
    lines = _timing({"timing": {"sections_s": {"reference": 1.4}}, "runs": runs}).splitlines()
    assert "| a | 10 | reused | 30 | 3000 |" in lines and "| b | 10 | trained (resumed) | ? | ? |" in lines
    assert "| reference | 1 |" in lines


def test_a_panels_row_labels_sit_beside_their_own_rows(tmp_path, monkeypatch):
    from smapctl.repro import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    rows = [("original", torch.zeros(2, 3, 4, 4)), ("k = 0", torch.ones(1, 3, 4, 4))]
    plots.image_panel(tmp_path / "x.png", rows, scale=2)
    [ax] = figures[0].axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["original", "k = 0"]
    assert list(ax.get_yticks()) == [4.0, 14.0]  # 8 px rows (4 px x 2) with a 2 px gap: their middles
