"""smapctl cross-recon: the panel's rows are the model's own decodes, laid out as documented."""

import logging
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import fill_disk, signal_after, sigterm_caught, temp_files
from PIL import Image
from tiny_tokenizer import error_lines, run_cli
from tokenize_helpers import write_image as write_png

from smapctl.cli import main
from smapctl.data.images import eval_transform, load_image, to_uint8
from smapctl.errors import UserError
from smapctl.ops.cross_recon import PART_NAME, cross_reconstruct, parts_dir, write_cross_recon
from smapctl.ops.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


write_image = partial(write_png, size=(26, 20))  # random PNGs, 26 x 20 px


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return write_image(root / "3" / "a.png", 0), write_image(root / "7" / "b.png", 1)


def cell(result, row: int, col: int) -> torch.Tensor:
    """The panel's cell (3, c, c) at (row, col)."""
    y, x = result.layout.cell_origin(row, col)
    c = result.layout.cell
    return result.panel[:, y : y + c, x : x + c]


def upscale(image: torch.Tensor, cell: int) -> torch.Tensor:
    s = cell // image.shape[-1]
    return image.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)


def test_panel_rows_are_the_models_decodes(tiny_kl_tokenizer, pair):
    result = cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, device="cpu")
    layout = result.layout
    assert result.classes == ("3", "7") and result.prefixes == [0, 1, 2, 4, 8]
    assert layout.rows == 6 and layout.columns == 5
    assert layout.cell == 64  # 16 px images enlarged 4x
    assert result.panel.dtype == torch.uint8 and tuple(result.panel.shape) == (3, *layout.size)
    assert [len(r.images) for r in result.rows] == [2, 2, 2, 2, 5, 5]
    assert layout.labels[0].startswith("originals") and layout.labels[4].startswith("a, k = 0 1 2 4 8")

    tok = load_tokenizer(tiny_kl_tokenizer)
    m = tok.model
    x = torch.stack([eval_transform(16)(load_image(p)) for p in pair])
    y = torch.tensor([3, 7])
    with torch.inference_mode():
        z = m.encode(x, y).z
        recon = to_uint8(m.decode(z, y))
        class_only = to_uint8(m.decode(z[:, :0], y))
        swapped = to_uint8(m.decode(torch.stack([z[1], z[0]]), y))  # b's latents with class 3, a's with 7
        a_k2 = to_uint8(m.decode(z[:1, :2], y[:1]))[0]
    expected = {(0, 0): to_uint8(x[0]), (0, 1): to_uint8(x[1]), (1, 0): recon[0], (1, 1): recon[1]}
    expected |= {(2, 0): class_only[0], (2, 1): class_only[1], (3, 0): swapped[0], (3, 1): swapped[1]}
    expected |= {(4, 2): a_k2, (4, 4): recon[0], (5, 4): recon[1], (5, 0): class_only[1]}
    for (r, c), image in expected.items():
        assert torch.equal(cell(result, r, c), upscale(image, layout.cell)), (r, c)
    assert (cell(result, 0, 3) == 255).all()  # short rows leave blank cells
    for r in range(layout.rows):  # every row has its label drawn in the margin
        y0 = layout.cell_origin(r, 0)[0]
        assert (result.panel[:, y0 : y0 + layout.cell, : layout.margin] < 128).any(), r


def test_write_panel_and_parts(tiny_vq_tokenizer, pair, tmp_path):
    result = cross_reconstruct(*pair, checkpoint=tiny_vq_tokenizer, class_a="5", class_b="1")
    assert result.classes == ("5", "1")
    out = tmp_path / "fig" / "panel.png"
    files = write_cross_recon(result, out, keep_parts=True)
    assert files[0] == out and parts_dir(out) == tmp_path / "fig" / "panel_parts"
    assert len(files) == 1 + 4 * 2 + 2 * 5 and all(f.parent == parts_dir(out) for f in files[1:])
    assert all(PART_NAME.fullmatch(f.name) for f in files[1:])  # what --keep-parts may replace
    panel = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)
    assert torch.equal(panel, result.panel)
    a_k0 = torch.from_numpy(np.array(Image.open(parts_dir(out) / "a_k0.png"))).permute(2, 0, 1)
    assert torch.equal(a_k0, result.rows[2].images[0])  # class only == the sweep's k = 0
    with pytest.raises(UserError, match=r"panel\.jpg: the panel is saved as PNG"):
        write_cross_recon(result, tmp_path / "panel.jpg")


def test_class_errors(tiny_kl_tokenizer, pair, tmp_path):
    loose = write_image(tmp_path / "misc" / "c.png", 2)
    with pytest.raises(UserError, match=r"c\.png: cannot tell its class.*--class-b"):
        cross_reconstruct(pair[0], loose, checkpoint=tiny_kl_tokenizer)
    with pytest.raises(UserError, match="^--class-a: unknown class 'dog'"):
        cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, class_a="dog")
    assert cross_reconstruct(pair[0], loose, checkpoint=tiny_kl_tokenizer, class_b="9").classes == ("3", "9")
    # The nearest class folder it is in, not only its own folder.
    deep = write_image(tmp_path / "7" / "sub" / "deep.png", 3)
    assert cross_reconstruct(pair[0], deep, checkpoint=tiny_kl_tokenizer).classes == ("3", "7")


def test_a_builtin_datasets_images_by_their_token_file_names(tiny_kl_tokenizer, tmp_path, monkeypatch):
    """A digits user had no image files to give (the demo trains on the built-in set): its images are
    named as `tokenize` names them, and make the very panel the same images written out as PNGs make.
    A wrong class or index, or another split, is one line; a file of that name wins."""
    from smapctl.data.datasets import embedded_split

    monkeypatch.chdir(tmp_path)
    size = load_tokenizer(tiny_kl_tokenizer).model.cfg.image_size
    val = embedded_split("digits:val", size)
    i, j = 0, next(n for n, y in enumerate(val.labels.tolist()) if y != val.labels[0])
    names = [f"digits/val/{val.class_names[val.labels[n]]}/{n:05d}.png" for n in (i, j)]
    files = []
    for n, name in zip((i, j), names, strict=True):
        files.append(tmp_path / "written" / name)
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(val.images[n].permute(1, 2, 0).numpy()).save(files[-1])
    named = cross_reconstruct(*names, checkpoint=tiny_kl_tokenizer)
    written = cross_reconstruct(*files, checkpoint=tiny_kl_tokenizer)
    assert torch.equal(named.panel, written.panel) and named.classes == written.classes

    other = next(c for c in val.class_names if c != val.class_names[val.labels[j]])
    cases = [
        (
            f"digits/val/{other}/{j:05d}.png",
            f"image {j} of digits:val is of class {names[1].split('/')[2]}: ",
        ),
        (f"digits/val/3/{len(val.labels)}.png", f"digits:val has {len(val.labels)} images, 0 to "),
        (f"digits/test/3/{j:05d}.png", "digits:test: the split must be 'train' or 'val'"),
    ]
    for b, message in cases:
        with pytest.raises(UserError) as refused:
            cross_reconstruct(names[0], b, checkpoint=tiny_kl_tokenizer)
        assert str(refused.value).startswith(f"{b}: {message}"), refused.value
    (tmp_path / names[1]).parent.mkdir(parents=True)
    (tmp_path / names[1]).write_text("not a png")  # a real file of that name is read as the file
    with pytest.raises(UserError, match="not an image"):
        cross_reconstruct(*names, checkpoint=tiny_kl_tokenizer)


def test_the_builtin_image_names_the_docs_give_are_images_of_their_class(tmp_path, monkeypatch):
    """The names cross-recon's --help and the README give as examples are images of the class they name:
    `digits/val/3/00012.png`, in both, is image 12 of class 0, and the example was refused."""
    import re

    import typer

    from smapctl.cli import app
    from smapctl.ops.cross_recon import builtin_image

    monkeypatch.chdir(tmp_path)  # no file of those names
    command = typer.main.get_command(app).commands["cross-recon"]
    text = " ".join(p.help or "" for p in command.params) + (ROOT / "README.md").read_text()
    names = set(re.findall(r"\b(?:digits|photos)/(?:train|val)/[^/\s`]+/\d+\.png", text))
    assert len(names) >= 2, names
    for name in sorted(names):
        assert builtin_image(name, 16) is not None, name


def test_cli(tiny_kl_tokenizer, pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.png"
    args = ["cross-recon", *pair, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--keep-parts"]
    monkeypatch.setattr(sys, "argv", ["smapctl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None) and f"panel: {out}" in capsys.readouterr().out
    assert out.is_file() and len(list(parts_dir(out).glob("*.png"))) == 18

    r = subprocess.run(
        [sys.executable, "-m", "smapctl", "cross-recon", tmp_path / "nope.png", pair[1]]
        + ["--checkpoint", tiny_kl_tokenizer, "-o", tmp_path / "q.png"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path / 'nope.png'}: no such file" in lines[0]
    assert not (tmp_path / "q.png").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python lost
def test_a_sigterm_python_lost_before_cross_recon_stops_it_after_its_first_pass(
    tiny_kl_tokenizer, pair, tmp_path, monkeypatch, capsys
):
    """A SIGTERM Python lost as `cross-recon` started ("Exception ignored in ...") let it run its passes
    to the end (1 min 45 s for a ViT-B SMAP on a CPU), to be killed by the scheduler's SIGKILL; now it
    stops after its first pass (the encoder's), as one heard then would: exit 143, nothing written."""
    from faults import sigterm_lost_as_the_command_starts

    import smapctl.ops.cross_recon as cross_recon

    decoded = []
    monkeypatch.setattr(cross_recon, "to_uint8", lambda x, real=to_uint8: decoded.append(1) or real(x))
    sigterm_lost_as_the_command_starts(monkeypatch)
    out = tmp_path / "p.png"
    code, _, err = run_cli(capsys, "cross-recon", *pair, "-o", out, "--checkpoint", tiny_kl_tokenizer)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    assert decoded == [] and not any(tmp_path.iterdir())


def test_disk_full_keeps_the_earlier_panel(tiny_kl_tokenizer, pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.png"
    args = ["cross-recon", *pair, "-o", out, "--checkpoint", tiny_kl_tokenizer]
    monkeypatch.setattr(sys, "argv", ["smapctl", *map(str, args)])
    with pytest.raises(SystemExit):
        main()
    before = out.read_bytes()

    fill_disk(monkeypatch, free=500)  # some of the panel fits, not all
    monkeypatch.setattr(
        sys, "argv", ["smapctl", *map(str, [*args, "--class-a", "5", "--keep-parts", "--overwrite"])]
    )
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    # the images go first, the panel last: the first image found the disk full, and nothing of the run
    # is left (the panel is the earlier one)
    assert err.strip().splitlines() == [
        f"error: {parts_dir(out) / 'a.png'}: could not write the image (No space left on device): the disk"
        " is full; free some space or write elsewhere; any earlier a.png is unchanged"
    ]
    assert out.read_bytes() == before and not parts_dir(out).exists() and temp_files(tmp_path) == []


def test_the_panel_is_not_written_over_an_input_image(tiny_kl_tokenizer, tmp_path, monkeypatch, capsys):
    """`cross-recon a.png b.png -o a.png` replaced image a with the panel."""
    a, b = write_image(tmp_path / "3" / "a.png", 0), write_image(tmp_path / "7" / "b.png", 1)
    original = a.read_bytes()
    for out in (a, tmp_path / "3" / ".." / "3" / "a.png"):
        args = ["cross-recon", a, b, "-o", out, "--checkpoint", tiny_kl_tokenizer]
        monkeypatch.setattr(sys, "argv", ["smapctl", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 1
        assert (
            capsys.readouterr().err.strip()
            == f"error: -o {out}: that is the input image {a}; choose another file name"
        )
    assert a.read_bytes() == original


def test_earlier_panels_and_the_inputs_are_kept_unless_asked(tiny_kl_tokenizer, tmp_path, capsys):
    """An existing -o (a dataset image, say) was replaced without a word; an input inside OUT_parts/ was
    replaced by its crop; a second --keep-parts run into the same -o left the first one's other images."""
    from tiny_tokenizer import run_cli

    a, b = write_image(tmp_path / "3" / "a.png", 0), write_image(tmp_path / "7" / "b.png", 1)
    out = tmp_path / "p.png"
    args = ["cross-recon", a, b, "--checkpoint", tiny_kl_tokenizer, "--keep-parts"]
    code, _, err = run_cli(capsys, *args, "-o", out)
    assert code == 0, err
    written = sorted(p.name for p in parts_dir(out).iterdir())
    stale = parts_dir(out) / "a_k99.png"  # as a tokenizer of another K left it
    stale.write_bytes((parts_dir(out) / "a_k0.png").read_bytes())
    panel = out.read_bytes()
    code, _, err = run_cli(capsys, *args, "-o", out)
    assert code == 1 and err.strip() == (
        f"error: -o {out}: exists already; pass --overwrite to replace it, or choose another -o"
    )
    out.unlink()
    code, _, err = run_cli(capsys, *args, "-o", out)
    assert code == 1 and err.startswith(f"error: {parts_dir(out)}: holds the images of an earlier panel")
    code, _, err = run_cli(capsys, *args, "-o", out, "--overwrite")
    assert code == 0 and out.read_bytes() == panel, err
    assert sorted(p.name for p in parts_dir(out).iterdir()) == written  # a_k99.png gone
    # --overwrite without --keep-parts left the earlier panel's images beside a panel of others.
    plain = ["cross-recon", b, a, "--checkpoint", tiny_kl_tokenizer, "-o", out, "--overwrite"]
    code, _, err = run_cli(capsys, *plain)
    assert code == 1 and err.strip() == (
        f"error: {parts_dir(out)}: holds the images of the panel --overwrite replaces; pass --keep-parts to"
        " replace them too, or remove that folder"
    )
    assert out.read_bytes() == panel

    # A parts folder holding the user's own files: refused, --overwrite or not (its PNGs were deleted as
    # an earlier panel's, after a message that said there was one).
    own = write_image(tmp_path / "r_parts" / "my_figure.png", 2)
    (tmp_path / "r_parts" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, *args, "-o", tmp_path / "r.png", *extra)
        assert code == 1 and err.strip() == (
            f"error: {tmp_path / 'r_parts'}: holds files that are not a panel's images (my_figure.png and 1"
            " more), where --keep-parts writes them; choose another -o, or move those files"
        )
    assert own.is_file() and not (tmp_path / "r.png").exists()

    inside = write_image(tmp_path / "q_parts" / "a.png", 2)  # an input in the folder of the parts
    before = inside.read_bytes()
    again = ["cross-recon", inside, b, "--checkpoint", tiny_kl_tokenizer, "--class-a", "3"]
    code, _, err = run_cli(capsys, *again, "-o", tmp_path / "q.png", "--keep-parts", "--overwrite")
    assert code == 1 and err.startswith(f"error: {inside}: inside {tmp_path / 'q_parts'}, where --keep-parts")
    assert inside.read_bytes() == before and not (tmp_path / "q.png").exists()
    # A folder as -o is named as one (it was told to "use a .png file name").
    folder = tmp_path / "7"
    code, _, err = run_cli(capsys, *args, "-o", folder)
    assert code == 1 and err.strip() == (
        f"error: -o {folder}: a folder; give the panel's file name (e.g. {folder / 'cross-recon.png'})"
    )


def test_parts_that_cannot_be_written_leave_no_panel_to_block_a_rerun(
    tiny_vq_tokenizer, pair, tmp_path, capsys
):
    """The panel was written before its images: a failed image left it, and the rerun was refused for it."""
    out = tmp_path / "p.png"
    (tmp_path / "p_parts").write_text("a file where the images go")
    args = ["cross-recon", *pair, "-o", out, "--checkpoint", tiny_vq_tokenizer, "--keep-parts"]
    code, _, err = run_cli(capsys, *args)
    parts = tmp_path / "p_parts"
    assert code == 1 and error_lines(err) == [
        f"error: {parts}: could not write the panel's images there: {parts} is a file, not a folder"
    ]
    assert not out.exists()
    # found only while writing (a folder named as one of the images): nothing of this run is left
    (tmp_path / "p_parts").unlink()
    (tmp_path / "p_parts" / "b_k4.png").mkdir(parents=True)
    result = cross_reconstruct(*pair, checkpoint=tiny_vq_tokenizer)
    with pytest.raises(UserError):
        write_cross_recon(result, out, keep_parts=True)
    assert not out.exists() and [p.name for p in (tmp_path / "p_parts").iterdir()] == ["b_k4.png"]


def test_parts_stopped_just_after_one_was_written_are_taken_away(
    tiny_vq_tokenizer, pair, tmp_path, monkeypatch
):
    """A Ctrl-C inside save_png after its rename left that image: it was listed only once written."""
    from faults import interrupt_after_write

    from smapctl.ops import cross_recon

    result = cross_reconstruct(*pair, checkpoint=tiny_vq_tokenizer)
    calls = interrupt_after_write(monkeypatch, cross_recon, at=2)
    with pytest.raises(KeyboardInterrupt):
        write_cross_recon(result, tmp_path / "p.png", keep_parts=True)
    assert (
        len(calls) == 2 and not parts_dir(tmp_path / "p.png").exists() and not (tmp_path / "p.png").exists()
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_the_panel_is_in_place_leaves_cross_recon_complete(
    tiny_kl_tokenizer, pair, tmp_path, monkeypatch, capsys, caplog, signum
):
    """A signal once the panel was renamed into place (in its folder's fsync) or as `cross-recon` printed
    its last lines exited 130 (143), every file written. From the panel's rename to the command's end it
    ends as complete: exit 0, one line saying so. Before the rename it still stops, leaving no panel."""
    import smapctl.io
    from smapctl import cli

    name, args = signal.Signals(signum).name, ["cross-recon", *pair, "--checkpoint", tiny_kl_tokenizer]
    with sigterm_caught() as caught, caplog.at_level(logging.WARNING):
        with monkeypatch.context() as m:
            signal_after(m, smapctl.io, "fsync_dir", signums := [signum])  # (the panel's: no parts)
            code, stdout, err = run_cli(capsys, *args, "-o", tmp_path / "a.png")
        assert (code, signums) == (0, []), err
        said = f"interrupted once the panel was written: the panel {tmp_path / 'a.png'} is written; cross"
        assert said + "-recon is complete" in caplog.text and f"panel: {tmp_path / 'a.png'}" in stdout
        caplog.clear()
        with monkeypatch.context() as m:
            signal_after(m, cli.console, "print", signums := [signum])
            code, stdout, err = run_cli(capsys, *args, "-o", tmp_path / "b.png", "--keep-parts")
        assert (code, signums) == (0, []), err
        said = f"{name} as the command ended: the panel {tmp_path / 'b.png'} and its 18 images in"
        assert f"{said} {tmp_path / 'b_parts'} are written; cross-recon is complete" in caplog.text
        assert caplog.text.count(name) == 1 and len(list((tmp_path / "b_parts").glob("*.png"))) == 18
        with monkeypatch.context() as m:
            signal_after(
                m, smapctl.io, "finish_file", signums := [signum]
            )  # (the panel's, before its rename)
            code, stdout, err = run_cli(capsys, *args, "-o", tmp_path / "c.png")
        assert (code, signums) == (128 + signum, []), err
        assert not (tmp_path / "c.png").exists() and not temp_files(tmp_path)
    assert caught == []


def test_class_names_beyond_ascii_are_drawn_not_boxed():
    """PIL's built-in font drew every non-ASCII letter as the same box: 'café' and 'cafè' looked alike."""
    from smapctl.ops.cross_recon import label_font

    font = label_font()
    for a, b in [("café", "cafè"), ("Ж", "Ч"), ("α", "β")]:
        assert bytes(font.getmask(a)) != bytes(font.getmask(b)), (a, b)


def test_writing_the_parts_replaces_only_a_panels_image_names(tiny_kl_tokenizer, pair, tmp_path):
    """`write_cross_recon` removes the PNGs of an earlier panel beside the ones it writes, and only those:
    the command refuses a parts folder holding other files before the tokenizer is loaded, but one put
    there since (or by the Python API) went with the earlier panel's if every PNG did; no test failed."""
    result = cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, device="cpu")
    out = tmp_path / "p.png"
    own = write_image(parts_dir(out) / "my_figure.png", 2)
    stale = write_image(parts_dir(out) / "a_k99.png", 2)  # as a tokenizer of another K left it
    write_cross_recon(result, out, keep_parts=True)
    assert own.is_file() and not stale.exists()


def test_class_names_from_elsewhere_are_shown_short_and_printable(tiny_kl_tokenizer, pair, tmp_path):
    """A tokenizer checkpoint from elsewhere naming a class with a line break ended cross-recon in a
    traceback from the font's layout; one named with 100,000 characters made a panel 700,000 pixels wide
    (23 s; a longer one, more memory than the machine has)."""
    import json
    import shutil

    from smapctl.train.checkpoint import latest_checkpoint

    run = shutil.copytree(tiny_kl_tokenizer, tmp_path / "run")
    meta_file = latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["class_names"][1], meta["class_names"][2] = "one\n\x1b[2J", "two" * 33_000
    meta_file.write_text(json.dumps(meta))
    result = cross_reconstruct(*pair, checkpoint=run, class_a="1", class_b="2")
    assert result.panel.shape[-1] < 2000
    assert result.rows[0].label == f"originals (one??[2J | {'two' * 12}t...)"
    with pytest.raises(UserError) as e:  # the messages that list the classes too
        cross_reconstruct(*pair, checkpoint=run, class_a="ten")
    assert "classes are: 0, one??[2J, twotwo" in str(e.value) and len(str(e.value)) < 300


def test_two_images_of_one_class_are_said_to_swap_nothing(tiny_kl_tokenizer, pair, caplog):
    """The panel's swapped row of two images of one class repeats the reconstructions, without a word."""
    with caplog.at_level("WARNING", logger="smapctl"):
        cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer)
        assert "swaps no class" not in caplog.text
        cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, class_a="7")
    assert "both images are of class 7: the swapped row swaps no class; --class-a / --class-b" in caplog.text


def test_the_parts_are_named_by_what_they_show(tiny_kl_tokenizer, pair, tmp_path):
    """`a_k{k}.png` is a's prefix of k tokens (a_k8 is the reconstruction, for K = 8) and
    `swap_class_a_latents_b.png` decodes b's latents with a's class (the swapped row's first image)."""
    result = cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, device="cpu")
    write_cross_recon(result, tmp_path / "p.png", keep_parts=True)
    parts = parts_dir(tmp_path / "p.png")

    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(parts / f"{name}.png"))).permute(2, 0, 1)

    assert sorted(p.stem for p in parts.iterdir()) == sorted(
        ["a", "b", "a_recon", "b_recon", "a_class_only", "b_class_only", "swap_class_a_latents_b"]
        + ["swap_class_b_latents_a", *(f"{x}_k{k}" for x in "ab" for k in (0, 1, 2, 4, 8))]
    )
    assert torch.equal(read("a_k8"), read("a_recon")) and torch.equal(read("b_k0"), read("b_class_only"))
    assert torch.equal(read("a_k2"), result.rows[4].images[2])
    assert torch.equal(read("swap_class_a_latents_b"), result.rows[3].images[0])
    assert torch.equal(read("swap_class_b_latents_a"), result.rows[3].images[1])


def test_two_images_without_classes_are_not_said_to_share_one(tiny_unconditioned_tokenizer, tmp_path, caplog):
    """A tokenizer without class conditioning gives both images no class (-1): not "both of class 9"."""
    a, b = write_image(tmp_path / "misc" / "a.png", 0), write_image(tmp_path / "misc" / "b.png", 1)
    with caplog.at_level("WARNING", logger="smapctl"):
        result = cross_reconstruct(a, b, checkpoint=tiny_unconditioned_tokenizer, device="cpu")
    assert result.classes == ("-", "-") and "swaps no class" not in caplog.text


def test_the_passes_are_shown_as_they_go(tiny_kl_tokenizer, pair, monkeypatch, caplog):
    """A ViT-B SMAP at 256 px took 1 min 45 s on a CPU without a word: the encode, a decode a prefix and
    the swap's go through the progress helper (its lines without a terminal), the panel as before."""
    quiet = cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, device="cpu")
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "0")
    with caplog.at_level("INFO", logger="smapctl"):
        result = cross_reconstruct(*pair, checkpoint=tiny_kl_tokenizer, device="cpu")
    said = [r.getMessage().split(" passes")[0] for r in caplog.records if r.getMessage().startswith("cross")]
    assert said == [f"cross-recon: {i} of 7" for i in range(1, 8)]  # 1 encode, k = 0 1 2 4 8, the swap
    assert torch.equal(result.panel, quiet.panel)


def test_the_cli_gives_each_image_its_own_class_and_the_weights_asked_for(tmp_path, capsys, monkeypatch):
    """`--class-a` is image a's class and `--class-b` image b's: swapped, the panel would be mislabelled."""
    import smapctl.ops.cross_recon

    got = {}

    def record(image_a, image_b, **kwargs):
        got.update(kwargs, images=(image_a, image_b))
        raise UserError("recorded")

    monkeypatch.setattr(smapctl.ops.cross_recon, "cross_reconstruct", record)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = ["cross-recon", a, b, "-o", tmp_path / "panel.png", "--class-a", "3", "--class-b", "7"]
    code, _, err = run_cli(capsys, *args, "--weights", "model", "--checkpoint", tmp_path / "ck")
    assert code == 1 and "recorded" in err, err
    assert got["images"] == (a, b) and (got["class_a"], got["class_b"]) == ("3", "7")
    assert got["weights"] == "model" and got["checkpoint"] == str(tmp_path / "ck")
