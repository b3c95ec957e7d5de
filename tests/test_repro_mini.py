"""`smapctl reproduce mini --quick` end to end, and the pieces whose logic decides the verdicts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import run_cli

from smapctl.errors import UserError
from smapctl.models.smap import SMAPConfig
from smapctl.repro.mini import SECTIONS, MiniOptions
from smapctl.repro.report import HELD, HELD_IN_MEANS, MIXED, NOT_HELD, Comparison, verdict
from smapctl.repro.runs import Runs, TokenizerRun
from smapctl.repro.schedules import SCHEDULES, dominance, keep_profile

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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMAPCTL_CACHE", str(tmp_path_factory.getbasetemp() / "smapctl-cache"))
        argv = ["reproduce", "mini", "--quick", "--out", tmp / "out", "--work", tmp / "runs"]
        cli.app([str(a) for a in [*argv, "--recipes", RECIPES]], standalone_mode=False)
    return tmp


def test_quick_run_writes_every_section(quick_run):
    out = quick_run / "out"
    results = json.loads((out / "results.json").read_text())
    for name in SECTIONS:
        assert name in results and results[name], name
        assert results["timing"]["sections_s"][name] >= 0
    for name in ("table2", "table3", "fig1", "fig4", "fig5"):
        assert results[name]["verdict"] in (HELD, HELD_IN_MEANS, MIXED, NOT_HELD)
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
    for png in PNGS:
        path = out / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000, png


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
    assert (tmp_path / "RESULTS.md").is_file()


def test_an_interrupted_run_leaves_the_previous_results_whole(quick_run, tmp_path, monkeypatch):
    """The figures were written into --out as each section finished: an interrupted run left new ones
    beside the previous run's RESULTS.md and results.json (in recipes/mini, the committed results). They
    wait in a staging folder now, moved in with RESULTS.md at the end."""
    from smapctl.repro import mini

    out = tmp_path / "out"
    shutil.copytree(quick_run / "out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(study):
        raise KeyboardInterrupt

    monkeypatch.setitem(mini.SECTIONS, "fig1", interrupted)  # after table 2 and 3 drew their figures
    opts = MiniOptions(
        out=out, recipes=RECIPES, work=quick_run / "runs", quick=True, seeds=(0,), budgets=(4, 16)
    )
    with pytest.raises(KeyboardInterrupt):
        mini.reproduce_mini(opts)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


def test_changed_recipe_retrains_the_run(tmp_path):
    """A run folder from another recipe (here: another seed) is not reused."""
    from smapctl.train.tokenizer import train_tokenizer

    runs = Runs(RECIPES, tmp_path, quick=True, fresh=False, total=1)
    other = runs.tokenizer_recipe(TokenizerRun("smap", 4, 1))
    train_tokenizer(other, tmp_path / "tok-smap-K4-s0")  # a seed-1 run in the seed-0 folder
    runs.tokenizer(TokenizerRun("smap", 4, 0))
    assert not runs.records["tok-smap-K4-s0"].reused


def test_quick_mode_never_writes_into_the_recipes_by_default():
    quick, full = MiniOptions(quick=True), MiniOptions()
    assert quick.work == quick.out == Path("runs/mini-quick")
    assert full.work == Path("runs/mini") and full.out == Path("recipes/mini")
    # A quick run's results go to its --work folder, as the help says (they went to runs/mini-quick).
    assert MiniOptions(quick=True, work=Path("elsewhere")).out == Path("elsewhere")


def test_missing_recipes_folder_is_one_line_naming_the_option(tmp_path, monkeypatch):
    from smapctl.repro.mini import reproduce_mini

    monkeypatch.chdir(tmp_path)  # not the repository: recipes/mini is not here
    with pytest.raises(UserError, match=r"^--recipes: recipes/mini is not a folder \(the mini recipes"):
        reproduce_mini(MiniOptions(quick=True))
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


def test_a_zero_budget_is_refused_as_an_option(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "reproduce", "mini", "--quick", "--budgets", "0,4", "--out", tmp_path / "m"
    )
    assert code == 2 and "--budgets" in err and "num_latent_tokens" not in err
    assert not (tmp_path / "m").exists()


def test_a_repeated_seed_or_budget_is_refused(tmp_path, capsys):
    """--seeds 0,0 counted one run twice: a seed spread of 0 made any gap "beyond the spread"."""
    for option, value in (("--seeds", "0,0"), ("--budgets", "4,4,16")):
        code, _, err = run_cli(capsys, "reproduce", "mini", "--quick", option, value, "--out", tmp_path / "m")
        assert code == 2 and option in err and "repeated" in err
    assert not (tmp_path / "m").exists()


def test_a_file_as_out_is_refused_before_any_training(tmp_path):
    from smapctl.repro.mini import reproduce_mini

    (tmp_path / "out").write_text("not a folder\n")
    with pytest.raises(UserError, match=r"^--out: .* is a file, not a folder$"):
        reproduce_mini(MiniOptions(quick=True, out=tmp_path / "out", work=tmp_path / "runs", recipes=RECIPES))
    assert not (tmp_path / "runs").exists()


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
        reproduce_mini(MiniOptions(out=tmp_path / "out", work=work, recipes=RECIPES))
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


def test_a_run_folder_another_training_holds_is_not_cleared(tmp_path):
    """Two reproductions in one --work: a run of another recipe is removed for this one's only when no
    training holds its folder; held, it is refused with its files untouched."""
    from faults import lock_held_elsewhere

    from smapctl.repro.runs import _clear_for_a_new_run
    from smapctl.train.runner import LOCK_FILE, lock_folder

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
