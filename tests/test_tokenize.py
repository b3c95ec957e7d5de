"""smapctl tokenize: images to token files that decode to the model's own reconstructions (decode and the
files themselves: test_decode.py, test_codes.py); every user error is one line."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import (
    add_broken_images,
    fill_disk,
    temp_files,
    windows_file_rules,
)
from PIL import Image
from safetensors import safe_open
from tiny_tokenizer import error_lines, run_cli, smapctl, subprocess_env
from tokenize_helpers import CLASSES, ROOT, direct, one_line_error, read_png, write_image

from smapctl.data.folder import ImageFolderDataset
from smapctl.data.images import BadImageError, eval_transform, load_image
from smapctl.errors import UserError
from smapctl.ops.codes import load_codes
from smapctl.ops.decode import decode_codes, output_names
from smapctl.ops.inputs import folder_class, list_inputs
from smapctl.ops.load import load_tokenizer
from smapctl.ops.tokenize import tokenize_images

# -------------------------------------------------------------------------------------------- round trip


def test_kl_round_trip_equals_direct_reconstruction(tiny_kl_tokenizer, images, tmp_path):
    out = tmp_path / "codes.pt"
    result = tokenize_images([images], out, checkpoint=tiny_kl_tokenizer, workers=0)
    data = torch.load(out, weights_only=True)  # a plain dict of tensors, lists, strings, numbers
    tok = load_tokenizer(tiny_kl_tokenizer)
    N = sum(CLASSES.values())
    assert data["format"] == "smapctl-codes" and data["version"] == 1
    assert data["latents"].shape == (N, 8, 16) and data["latents"].dtype == torch.float32
    assert "indices" not in data
    assert data["paths"] == [f"{c}/{i}.png" for c, n in CLASSES.items() for i in range(n)]
    assert data["labels"].tolist() == [int(c) for c, n in CLASSES.items() for _ in range(n)]
    assert data["prefix"] == data["num_tokens"] == 8 and data["regularizer"] == "kl"
    assert data["fingerprint"] == tok.fingerprint and data["weights"] == "ema"
    assert data["class_names"] == [str(i) for i in range(10)]
    assert Path(data["checkpoint"]) == tok.path.resolve()
    assert result.skipped == [] and len(result.codes.labels) == N

    paths = [images / p for p in data["paths"]]
    z, expected = direct(tok, paths, data["labels"], 8)
    torch.testing.assert_close(data["latents"], z)
    decoded = decode_codes(out, tmp_path / "png")
    assert [f.relative_to(tmp_path / "png").as_posix() for f in decoded.files] == data["paths"]
    assert torch.equal(torch.stack([read_png(f) for f in decoded.files]), expected)

    # ... and at tokenize time: the first 3 latent tokens
    first3 = tokenize_images([images], tmp_path / "k3.pt", checkpoint=tiny_kl_tokenizer, prefix=3, workers=0)
    torch.testing.assert_close(first3.codes.tokens, z[:, :3])

    # a shorter prefix at decode time == decoding the model's z[:, :3]
    _, expected3 = direct(tok, paths, data["labels"], 3)
    short = decode_codes(out, tmp_path / "png3", prefix=3)
    assert torch.equal(torch.stack([read_png(f) for f in short.files]), expected3)

    # Decoding over existing files needs --overwrite: `-o` the tokenized folder replaced its originals.
    originals = {p: p.read_bytes() for p in paths}
    with pytest.raises(
        UserError, match=r"\d/0.png \(one of the \d+ PNGs to write\) exists already .*--overwrite"
    ):
        decode_codes(out, images)
    assert {p: p.read_bytes() for p in paths} == originals
    with pytest.raises(UserError, match="exists already"):
        decode_codes(out, tmp_path / "png3")  # an earlier decode
    again = decode_codes(out, tmp_path / "png3", overwrite=True)
    assert torch.equal(torch.stack([read_png(f) for f in again.files]), expected)


def test_each_image_keeps_its_class_across_batches_and_a_skipped_image(tiny_kl_tokenizer, images, tmp_path):
    """Batches of 2, and an unreadable image just before a class's first: every token row is its own
    image encoded with its own class, and every PNG that row decoded with it. Labels taken by position
    after a skip moved onto the next image, and a decode that kept its first batch's labels, went through
    the one-batch round trip above."""
    folder = shutil.copytree(images, tmp_path / "digits")
    first = sorted((folder / list(CLASSES)[1]).iterdir())[0]
    (first.parent / "0-broken.png").write_bytes(b"not an image")  # listed before `first`
    out = tmp_path / "codes.pt"
    tokenize_images([folder], out, checkpoint=tiny_kl_tokenizer, batch_size=2, workers=0, on_error="skip")
    data = torch.load(out, weights_only=True)
    assert len(data["paths"]) == sum(CLASSES.values()) and "0-broken.png" not in str(data["paths"])
    tok = load_tokenizer(tiny_kl_tokenizer)
    paths = [folder / p for p in data["paths"]]
    labels = torch.tensor([int(Path(p).parent.name) for p in data["paths"]])
    assert torch.equal(data["labels"], labels)
    z, expected = direct(tok, paths, labels, 8)
    torch.testing.assert_close(data["latents"], z)
    decoded = decode_codes(out, tmp_path / "png", batch_size=2)
    assert torch.equal(torch.stack([read_png(f) for f in decoded.files]), expected)


def test_vq_prefix_round_trip_and_safetensors(tiny_vq_tokenizer, images, tmp_path):
    pt = tokenize_images([images], tmp_path / "codes.pt", checkpoint=tiny_vq_tokenizer, prefix=4, workers=0)
    st = tokenize_images(
        [images], tmp_path / "codes.safetensors", checkpoint=tiny_vq_tokenizer, prefix=4, workers=0
    )
    tok = load_tokenizer(tiny_vq_tokenizer)
    indices = pt.codes.tokens
    assert indices.dtype == torch.int64 and indices.shape == (sum(CLASSES.values()), 4)
    paths = [images / p for p in pt.codes.paths]
    expected_indices, expected = direct(tok, paths, pt.codes.labels, 2)
    with torch.inference_mode():
        full = tok.model.encode(
            torch.stack([eval_transform(16)(load_image(p)) for p in paths]), pt.codes.labels
        )
    assert torch.equal(indices, full.indices[:, :4])

    # safetensors: tensors in the file, everything else JSON in the metadata; reads back the same
    with safe_open(str(tmp_path / "codes.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["indices", "labels"]
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["prefix"] == 4 and meta["paths"] == pt.codes.paths and meta["fingerprint"] == tok.fingerprint
    again = load_codes(tmp_path / "codes.safetensors")
    assert torch.equal(again.tokens, indices) and again.paths == pt.codes.paths
    assert again.to_dict().keys() == st.codes.to_dict().keys()

    decoded = decode_codes(tmp_path / "codes.safetensors", tmp_path / "png", prefix=2)
    assert torch.equal(torch.stack([read_png(f) for f in decoded.files]), expected)
    assert torch.equal(indices[:, :2], expected_indices)


def test_the_same_tokens_make_the_same_file(tiny_kl_tokenizer, images, tmp_path):
    """safetensors writes its metadata in a hash map's order, which differs between runs: two token files
    of the same tokens had other bytes (a checksum told them apart)."""
    from smapctl.ops.codes import save_codes

    codes = tokenize_images(
        [images], tmp_path / "a.safetensors", checkpoint=tiny_kl_tokenizer, workers=0
    ).codes
    files = [save_codes(codes, tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)]
    assert all(f == files[0] for f in files)
    again = load_codes(tmp_path / "0.safetensors")
    assert torch.equal(again.tokens, codes.tokens) and again.to_dict().keys() == codes.to_dict().keys()
    header = files[0][8 : 8 + int.from_bytes(files[0][:8], "little")]
    assert list(json.loads(header)["__metadata__"]) == sorted(codes.to_dict().keys() - {"latents", "labels"})


def test_workers_and_batches_give_the_same_codes(tiny_vq_tokenizer, images, tmp_path):
    a = tokenize_images([images], tmp_path / "a.pt", checkpoint=tiny_vq_tokenizer, workers=0)
    b = tokenize_images([images], tmp_path / "b.pt", checkpoint=tiny_vq_tokenizer, workers=2, batch_size=3)
    assert torch.equal(a.codes.tokens, b.codes.tokens) and a.codes.paths == b.codes.paths


def test_bf16_encoder_is_close_to_fp32(tiny_kl_tokenizer, images, tmp_path, monkeypatch, caplog):
    fp32 = tokenize_images([images], tmp_path / "a.pt", checkpoint=tiny_kl_tokenizer, workers=0)
    # A CPU without bf16 units, whatever this host has (on one with AMX the warning named the probe's ratio)
    monkeypatch.setattr("smapctl.precision.cpu_bf16_units", lambda: False)
    monkeypatch.setattr("smapctl.precision.cpu_bf16_speedup", lambda: 0.02)
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        bf16 = tokenize_images(
            [images], tmp_path / "b.pt", checkpoint=tiny_kl_tokenizer, workers=0, precision="bf16"
        )
    assert "--precision bf16: this CPU has no bf16 units" in caplog.text and "--precision fp32" in caplog.text
    assert bf16.codes.tokens.dtype == torch.float32  # stored as float32 whatever the compute precision
    torch.testing.assert_close(bf16.codes.tokens, fp32.codes.tokens, atol=0.05, rtol=0.05)
    assert not torch.equal(bf16.codes.tokens, fp32.codes.tokens)  # autocast did run


def test_the_file_records_the_encoders_precision(tiny_kl_tokenizer, images, tmp_path):
    """bf16 latents are not fp32's: a token file says which it holds, so that it can be made again."""
    fp32 = tokenize_images([images], tmp_path / "a.pt", checkpoint=tiny_kl_tokenizer, workers=0)
    bf16 = tokenize_images(
        [images], tmp_path / "b.safetensors", checkpoint=tiny_kl_tokenizer, workers=0, precision="bf16"
    )
    assert torch.load(tmp_path / "a.pt", weights_only=True)["precision"] == "fp32"
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["precision"]) == "bf16"
    assert load_codes(tmp_path / "a.pt").precision == fp32.codes.precision == "fp32"
    assert load_codes(tmp_path / "b.safetensors").precision == bf16.codes.precision == "bf16"

    # A file of an earlier smapctl, without the field, still reads; a value edited by hand does not.
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    torch.save({k: v for k, v in data.items() if k != "precision"}, tmp_path / "old.pt")
    assert load_codes(tmp_path / "old.pt").precision is None
    torch.save({**data, "precision": "fp16"}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad\.pt: inconsistent token file \(precision: 'fp16'\)$"):
        load_codes(tmp_path / "bad.pt")


def test_label_option_and_raw_weights(tiny_kl_tokenizer, images, tmp_path):
    r = tokenize_images(
        [images / "3", images / "7" / "0.png"],
        tmp_path / "c.pt",
        checkpoint=tiny_kl_tokenizer,
        label="5",
        weights="model",
        workers=0,
    )
    assert r.codes.labels.tolist() == [5, 5, 5] and r.codes.weights == "model"
    assert r.codes.paths == ["3/0.png", "3/1.png", "7/0.png"]  # relative to the inputs' common folder
    assert r.codes.fingerprint == load_tokenizer(tiny_kl_tokenizer, "model").fingerprint
    assert r.codes.fingerprint != load_tokenizer(tiny_kl_tokenizer).fingerprint
    assert len(decode_codes(tmp_path / "c.pt", tmp_path / "png").files) == 3  # loads the stored weights
    with pytest.raises(UserError, match="^--label: unknown class 'five'"):
        tokenize_images([images], tmp_path / "d.pt", checkpoint=tiny_kl_tokenizer, label="five", workers=0)
    with pytest.raises(
        UserError, match=r"^--label: class id 10 is out of range: the tokenizer has 10 classes, ids 0 to 9$"
    ):
        tokenize_images([images], tmp_path / "d.pt", checkpoint=tiny_kl_tokenizer, label="10", workers=0)
    with pytest.raises(UserError, match=r"^--label: class id -1 is out of range: .* ids 0 to 9$"):
        tokenize_images([images], tmp_path / "d.pt", checkpoint=tiny_kl_tokenizer, label="-1", workers=0)


def test_inputs_classes_and_names(images, monkeypatch):
    one = list_inputs([images / "3" / "1.png"])
    assert one.relative == ["1.png"] and one.base.name == "3"
    assert folder_class(one.paths[0], ["1", "3"]) == 1  # the folder of a single file
    glob = list_inputs([str(images / "*" / "0.png")])
    assert glob.relative == ["1/0.png", "3/0.png", "7/0.png"] and glob.base == images
    folder = list_inputs([images / "3"])
    assert folder.relative == ["0.png", "1.png"] and folder.base == images / "3"  # a folder is its own base
    monkeypatch.setenv("HOME", str(images))
    home = list_inputs(["~/3"])  # `~` expands for the base as for the files
    assert home.relative == ["0.png", "1.png"] and home.base == images / "3"
    assert folder_class("/data/digits/x/3/sub/a.png", ["3", "7"]) == 0  # the nearest class folder
    assert folder_class("/data/7/x/3/a.png", ["3", "7"]) == 0


def test_inputs_on_two_drives_are_one_line(images, monkeypatch):
    """On Windows, inputs on two drives have no common folder: `commonpath` raised its ValueError, a
    traceback (simulated here, as Windows raises it)."""

    def commonpath(paths):
        raise ValueError("Paths don't have the same drive")

    monkeypatch.setattr(os.path, "commonpath", commonpath)
    with pytest.raises(UserError) as e:
        list_inputs([images / "1", images / "3"])
    assert str(e.value) == (
        f"{images / '1'}, {images / '3'}: the inputs are on different drives, and a token file names its"
        " images from one folder that holds them all; tokenize the images of each drive in a run of its own"
        " (`decode` writes their token files into one folder)"
    )


def test_images_of_a_tokenizer_without_classes_need_none_and_decode(tiny_unconditioned_tokenizer, tmp_path):
    """A TiTok-style tokenizer takes images from any folder: their label is -1, and they decode."""
    for i in range(3):
        write_image(tmp_path / "misc" / f"{i}.png", i)
    r = tokenize_images(
        [tmp_path / "misc"], tmp_path / "c.pt", checkpoint=tiny_unconditioned_tokenizer, workers=0
    )
    assert r.codes.labels.tolist() == [-1, -1, -1]
    assert len(decode_codes(tmp_path / "c.pt", tmp_path / "png").files) == 3


def test_labels_are_asked_once_per_folder_and_are_each_images_own(tmp_path, monkeypatch):
    """`resolve_labels` asks `folder_class` once per folder (one `relpath` per image was 15 s of listing
    ImageNet), and every image still gets what `folder_class` gives it."""
    from types import SimpleNamespace

    from smapctl.ops import inputs as listing
    from smapctl.ops.inputs import resolve_labels

    for rel in ("cat/fox/a.png", "cat/fox/b.png", "cat/b.png", "cat/c.png", "fox/c.png", "misc/d.png"):
        (tmp_path / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / rel)
    names = ["cat", "dog", "fox"]
    tok = SimpleNamespace(
        class_names=names, model=SimpleNamespace(cfg=SimpleNamespace(class_condition=False))
    )
    asked = []
    real = listing.folder_class
    monkeypatch.setattr(listing, "folder_class", lambda path, *a: asked.append(path) or real(path, *a))
    for inputs in ([tmp_path / "train"], [tmp_path / "train" / "cat", tmp_path / "train" / "misc"]):
        images = list_inputs(inputs)
        asked.clear()
        labels = resolve_labels(images, tok, None)
        expected = [real(p, names, images.folders) for p in images.paths]
        assert labels == [-1 if y is None else y for y in expected]
        assert len(asked) == len({os.path.dirname(p) for p in images.paths}) < len(images.paths)


def test_a_folder_in_the_training_layout_labels_as_training_does(tmp_path):
    """`tokenize data/train` (or `data/train/cat`) labels `train/cat/fox/a.png` a cat, as training does;
    it used to take the nearest folder named after a class (fox). A file or a glob keeps that rule."""
    from types import SimpleNamespace

    from smapctl.ops.inputs import resolve_labels

    for rel in ("cat/fox/a.png", "cat/b.png", "fox/c.png"):
        (tmp_path / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / rel)
    tok = SimpleNamespace(class_names=["cat", "dog", "fox"], model=SimpleNamespace(cfg=SimpleNamespace()))
    root = list_inputs([tmp_path / "train"])
    assert root.relative == ["cat/b.png", "cat/fox/a.png", "fox/c.png"]
    assert resolve_labels(root, tok, None) == [0, 0, 2]
    assert resolve_labels(list_inputs([tmp_path / "train" / "cat"]), tok, None) == [0, 0]
    files = list_inputs(
        [tmp_path / "train" / "cat" / "fox" / "a.png", str(tmp_path / "train" / "*" / "c.png")]
    )
    assert resolve_labels(files, tok, None) == [2, 2]  # the nearest class folder
    other = list_inputs([tmp_path / "train" / "cat" / "fox"])  # an input named after a class is one
    assert resolve_labels(other, tok, None) == [2]
    assert folder_class("/data/7/sub/a.png", ["3", "7"]) == 1  # at any depth, whatever the other inputs
    assert folder_class("/data/digits/misc/a.png", ["3", "7"]) is None
    assert output_names(["a.jpg", "b/c.JPEG", "d.png"]) == ["a.png", "b/c.png", "d.png"]
    assert output_names(["a.jpg", "a.png"]) == ["a.jpg.png", "a.png"]  # would clash: keep the suffix
    # ... which can meet a file of that very name: every name stays distinct, nothing is overwritten.
    paths = ["c/a.jpg", "c/a.jpg.png", "c/a.png", "c/a.PNG"]
    names = output_names(paths)
    assert len(set(names)) == 4 and all(n.endswith(".png") for n in names), names
    assert names[2] == "c/a.png"
    with pytest.raises(UserError, match="not a relative path"):
        output_names(["../evil.png"])
    # Two spellings of one file (a hand-edited token file): one decoded image overwrote the other.
    with pytest.raises(
        UserError, match=r"^token file paths 'a/b.jpg' and 'a/./b.jpg': the same file, twice$"
    ):
        output_names(["a/b.jpg", "c.jpg", "a/./b.jpg"])
    assert output_names(["a//b.jpg", "./c.jpg"]) == ["a/b.png", "c.png"]


def test_an_image_linked_into_another_class_is_tokenized_as_both(images, tmp_path):
    """As training lists it (`ImageFolderDataset`): the link is a sample of its own folder's class. It
    used to be dropped as a duplicate, so which class the image got depended on the sort order."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "7" / "also-a-three.png").symlink_to(data / "3" / "0.png")
    listed = list_inputs([data])
    assert "7/also-a-three.png" in listed.relative and "3/0.png" in listed.relative
    classes = ["1", "3", "7"]
    assert folder_class(listed.paths[listed.relative.index("7/also-a-three.png")], classes) == 2
    assert len(listed.paths) == len(ImageFolderDataset(data))


# ------------------------------------------------------------------------------------------- bad inputs


def test_skip_reports_unreadable_and_fail_writes_nothing(tiny_kl_tokenizer, images, tmp_path):
    folder = tmp_path / "mixed"
    write_image(folder / "3" / "good.png", 1)
    (folder / "3" / "empty.png").write_bytes(b"")
    good = (images / "7" / "0.png").read_bytes()
    (folder / "7" / "cut.png").parent.mkdir()
    (folder / "7" / "cut.png").write_bytes(good[: len(good) // 2])
    r = tokenize_images([folder], tmp_path / "s.pt", checkpoint=tiny_kl_tokenizer, on_error="skip", workers=0)
    assert r.codes.paths == ["3/good.png"]
    assert sorted(Path(e.path).name for e in r.skipped) == ["cut.png", "empty.png"]
    assert torch.load(tmp_path / "s.pt", weights_only=True)["paths"] == ["3/good.png"]

    with pytest.raises(BadImageError, match="empty.png: empty file"):
        tokenize_images([folder], tmp_path / "f.pt", checkpoint=tiny_kl_tokenizer, workers=0)
    assert list(tmp_path.glob("*f.pt*")) == []  # no output, no temp file


def test_tokens_are_kept_compact_as_they_are_encoded(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, caplog
):
    """Each batch's tokens were kept as views of the regularizer's whole output (KL: the (B, K, 2C) mean
    and log-variance), 2x to 32x the tokens' bytes by prefix, until the end: 31 GB for ImageNet. Now
    they are copied into one tensor as they come, and each batch's output is let go."""
    import gc
    import weakref

    import smapctl.ops.tokenize as tokenize

    real, outputs, alive = tokenize.encode_tokens, [], []

    def watched(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in outputs))  # earlier batches' outputs still held
        out = real(*args, **kwargs)
        outputs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(tokenize, "encode_tokens", watched)
    monkeypatch.setattr("smapctl.progress.LOG_EVERY", 0.0)  # a line per batch (no terminal here)
    caplog.set_level(logging.INFO, logger="smapctl")
    folder = shutil.copytree(images, tmp_path / "digits")
    (folder / "3" / "broken.png").write_bytes(b"")  # skipped: the kept rows are copied out at the end
    r = tokenize_images([folder], tmp_path / "c.pt", checkpoint=tiny_kl_tokenizer, prefix=2, batch_size=2,
                        on_error="skip", workers=0)  # fmt: skip
    assert len(alive) > 2 and alive == [0] * len(alive)
    n = len(r.codes.paths) + 1
    assert f"tokenizing: {n:,} of {n:,} images (100.0%)" in caplog.text  # said in a log, too
    tokens = r.codes.tokens
    assert tokens.shape[1:] == (2, 16) and tokens.untyped_storage().nbytes() == tokens.numel() * 4


def test_library_errors(tiny_kl_tokenizer, tiny_vq_tokenizer, images, tmp_path):
    out = tmp_path / "codes.pt"
    with pytest.raises(UserError, match=r"codes\.npz: a token file is named \.pt"):
        tokenize_images([images], tmp_path / "codes.npz", checkpoint=tiny_kl_tokenizer)
    tokenize_images([images], out, checkpoint=tiny_kl_tokenizer, prefix=5, workers=0)
    with pytest.raises(UserError, match="--prefix 6: out of range; .* holds 5 tokens"):
        decode_codes(out, tmp_path / "png", prefix=6)
    with pytest.raises(UserError, match="made by another tokenizer"):
        decode_codes(out, tmp_path / "png", checkpoint=tiny_vq_tokenizer)
    # Its checkpoint gone (a resumed run's keep_checkpoints removes it): "pass --checkpoint" alone sent the
    # user to the run's newer checkpoints, which are other tokenizers.
    data = torch.load(out, weights_only=True)
    torch.save(data | {"checkpoint": str(tmp_path / "gone" / "step_000000003")}, tmp_path / "gone.pt")
    with pytest.raises(
        UserError, match=r"gone.pt: made by the tokenizer .*step_000000003, which is not there \(mov"
    ):
        decode_codes(tmp_path / "gone.pt", tmp_path / "png")
    with pytest.raises(
        UserError, match=r"keep_checkpoints\); pass that checkpoint's new place as --checkpoint, or"
    ):
        decode_codes(tmp_path / "gone.pt", tmp_path / "png")
    # Text goes through the unpickler, whose own errors (IndexError "pop from empty list", KeyError 101,
    # EOFError) used to be the reason given.
    for junk in (b"not a torch file", b"Some notes\n", b"a note", b"hello there", b"(", b"}", b""):
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(UserError) as e:
            load_codes(tmp_path / "junk.pt")
        assert (
            str(e.value)
            == f"{tmp_path / 'junk.pt'}: not a readable token file (not written by torch.save, or damaged)"
        )
    # Cut short (a copy that stopped, a full disk elsewhere): the zip reader's "[Errno 22] Invalid
    # argument" read as a wrong command-line argument.
    whole = out.read_bytes()
    reasons = set()
    for n in range(64, len(whole), max(1, len(whole) // 97)):
        (tmp_path / "cut.pt").write_bytes(whole[:n])
        with pytest.raises(UserError) as e:
            load_codes(tmp_path / "cut.pt")
        reasons.add(str(e.value).removeprefix(f"{tmp_path / 'cut.pt'}: not a readable token file ("))
    assert reasons == {
        "truncated or damaged: it ends before its zip archive does)",
        "truncated, damaged or not written by torch.save: PytorchStreamReader failed reading zip archive:"
        " failed finding central directory)",
    }
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt: not a smapctl token file"):
        load_codes(tmp_path / "other.pt")
    weights = next(Path(tiny_kl_tokenizer).glob("checkpoints/step_*/ema.safetensors"))  # a JSON parser's
    with pytest.raises(UserError, match=r"ema.safetensors: a safetensors file, but not a token file of"):
        load_codes(weights)  # message used to be the whole explanation
    assert not (tmp_path / "png").exists()
    # A file edited by hand: fewer tokens than its prefix says, or a label past the classes (used to
    # decode as "k=5", or stop with an IndexError traceback).
    data = torch.load(out, weights_only=True)
    torch.save(data | {"latents": data["latents"][:, :2]}, tmp_path / "short.pt")
    with pytest.raises(UserError, match=r"short\.pt: inconsistent token file \(2 tokens per image, prefix 5"):
        load_codes(tmp_path / "short.pt")
    labels = data["labels"].clone()
    labels[0] = len(data["class_names"])
    torch.save(data | {"labels": labels}, tmp_path / "label.pt")
    torch.save(data | {"labels": torch.full_like(labels, -1)}, tmp_path / "nolabel.pt")
    with pytest.raises(UserError, match=r"nolabel\.pt: inconsistent token file \(images without a class"):
        decode_codes(tmp_path / "nolabel.pt", tmp_path / "png")
    with pytest.raises(UserError, match=r"label\.pt: inconsistent token file \(labels 1\.\.10, 10 classes\)"):
        load_codes(tmp_path / "label.pt")
    # Latents edited to nan, or to values the decoder overflows on, were written as black PNGs.
    latents = data["latents"].clone()
    latents[2, 0, 0] = float("nan")
    torch.save(data | {"latents": latents}, tmp_path / "nan.pt")
    with pytest.raises(
        UserError, match=rf"nan\.pt: inconsistent token file \(the latents of '{data['paths'][2]}'"
    ):
        load_codes(tmp_path / "nan.pt")
    torch.save(data | {"latents": data["latents"] * 1e38}, tmp_path / "huge.pt")
    with pytest.raises(UserError, match=r"huge\.pt: the tokens of '.*' decode to values that are not finite"):
        decode_codes(tmp_path / "huge.pt", tmp_path / "png")
    assert not (tmp_path / "png").exists()


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_tokenize_and_decode(tiny_vq_tokenizer, images, tmp_path, capsys):
    out = tmp_path / "codes.safetensors"
    code, stdout, _ = run_cli(
        capsys,
        "tokenize",
        images,
        "-o",
        out,
        "--checkpoint",
        tiny_vq_tokenizer,
        "--workers",
        "0",
    )
    assert code == 0 and "7 images -> indices 7x8" in stdout
    code, stdout, _ = run_cli(capsys, "decode", out, "-o", tmp_path / "png", "--prefix", "3")
    assert code == 0 and "7 images (k=3)" in stdout
    assert (tmp_path / "png" / "7" / "2.png").is_file()
    one = tmp_path / "one.pt"  # "1 images (k=8)" before
    args = ["--checkpoint", tiny_vq_tokenizer, "--workers", "0"]
    code, stdout, _ = run_cli(capsys, "tokenize", images / "7" / "2.png", "-o", one, *args)
    assert code == 0 and stdout.startswith("1 image -> indices 1x8")
    code, stdout, _ = run_cli(capsys, "decode", one, "-o", tmp_path / "one")
    assert code == 0 and stdout.startswith("1 image (k=8) in ")


def test_progress_and_notes_reach_a_log(tiny_vq_tokenizer, images, tmp_path):
    """Not on a terminal (a log file, a batch job), progress is a line now and then ($SMAPCTL_PROGRESS_EVERY
    seconds; 0: every batch). `tokenize` and `decode` set up no logging, so those lines (and the note of
    the files a folder scan left out) went nowhere."""
    folder = shutil.copytree(images, tmp_path / "digits")
    (folder / "notes.txt").write_text("not an image")
    env = subprocess_env(SMAPCTL_PROGRESS_EVERY="0")
    args = ["--checkpoint", tiny_vq_tokenizer, "--workers", 0, "--batch-size", 4]
    r = subprocess.run(
        [sys.executable, "-m", "smapctl", "tokenize", folder, "-o", tmp_path / "c.pt", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "INFO tokenizing: 7 of 7 images (100.0%)" in r.stderr
    assert "1 file left out, not images by their suffix: .txt x1" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "smapctl", "decode", tmp_path / "c.pt", "-o", tmp_path / "png"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and "INFO decoding: 7 of 7 images (100.0%)" in r.stderr, r.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_more_workers_than_cpus_is_said_once(tiny_vq_tokenizer, images, tmp_path):
    """torch warns as the DataLoader is made and again as it is iterated: the same paragraph twice."""
    one_cpu = (
        "import os, runpy, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "sys.argv[0] = 'smapctl'; runpy.run_module('smapctl', run_name='__main__')"
    )
    args = ["tokenize", images, "-o", tmp_path / "c.pt", "--checkpoint", tiny_vq_tokenizer, "--workers", "2"]
    r = subprocess.run(
        [sys.executable, "-c", one_cpu, *map(str, args)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("This DataLoader will create 2 worker processes") == 1, r.stderr


def test_cli_one_line_errors_in_process(tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys):
    ck = tiny_kl_tokenizer
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "notes.txt").write_text("hello")
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "x\ny.png").write_text("not a png")  # a line break in a name is legal on POSIX
    write_image(tmp_path / "misc" / "a.png", 0)
    cases = [
        (
            ["tokenize", tmp_path / "nope.png", "--checkpoint", ck],
            f"no such file or folder: {tmp_path}/nope.png",
        ),
        (["tokenize", tmp_path / "3" / "notes.txt", "--checkpoint", ck], "notes.txt: not an image"),
        # the name's line break is written \n: the error stays one line (it broke in two)
        (["tokenize", tmp_path / "4", "--checkpoint", ck, "--on-error", "fail"], "4/x\\ny.png: not an image"),
        (["tokenize", tmp_path / "misc", "--checkpoint", ck], "misc/a.png: cannot tell its class"),
        (["tokenize", images, "--checkpoint", ck, "-o", tmp_path / "x.npy"], "a token file is named"),
        (["tokenize", images, "--checkpoint", ck, "--label", "cat"], "--label: unknown class 'cat'"),
        (["tokenize", images, "--checkpoint", ck, "--prefix", "9"], "--prefix 9: out of range"),
        (["tokenize", images, "--checkpoint", tmp_path], "no complete checkpoint here"),
        (["decode", tmp_path / "none.pt", "-o", tmp_path], "none.pt: no such token file"),
        (["decode", images, "-o", tmp_path / "png"], f"{images}: a folder, not a token file"),
        # an image given to decode (it said "not a readable token file (not written by torch.save...)")
        (
            ["decode", tmp_path / "misc" / "a.png", "-o", tmp_path / "png"],
            f"{tmp_path}/misc/a.png: an image, not a token file (`smapctl tokenize` makes one of images)",
        ),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and message in lines[0], (args, err)
    assert list(tmp_path.glob("*.pt")) == []

    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=ck, prefix=5, workers=0)
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "png", "--prefix", "6")
    assert code == 1 and "--prefix 6: out of range" in err and "holds 5 tokens" in err

    # no --checkpoint and no trained demo run (its folder is relative to the working directory)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "tokenize", images, "-o", "new.pt")
    assert code == 1 and "not trained yet" in err
    assert f"smapctl train-tokenizer {ROOT / 'recipes/demo/tokenizer.yaml'}, or" in err  # one there from here


def test_a_run_still_training_is_said(tiny_kl_tokenizer, tmp_path, caplog):
    """A run folder whose training still runs (its lock held): its newest checkpoint so far is used with a
    warning saying so (it was silent: the token file then named a checkpoint the run deletes as it saves
    newer ones); before its first checkpoint the error says a training is running, not only "no complete
    checkpoint here"; a checkpoint named directly is that one, without a word."""
    from smapctl.train.run_folder import lock_folder

    run = tmp_path / "run"
    shutil.copytree(tiny_kl_tokenizer, run)
    (run / ".lock").unlink(missing_ok=True)
    handle, _ = lock_folder(run)  # another open file: held against this process's own try too
    try:
        for spec in (run, run / "checkpoints"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="smapctl"):
                tok = load_tokenizer(spec)
            assert f"{spec}: still training (process {os.getpid()} on " in caplog.text, caplog.text
            assert f"this uses its newest checkpoint so far, {tok.path.name}" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="smapctl"):
            load_tokenizer(tok.path)
        assert "still training" not in caplog.text
        shutil.rmtree(run / "checkpoints")
        with pytest.raises(UserError) as refused:
            load_tokenizer(run)
        assert str(refused.value).startswith(
            f"{run}: no complete checkpoint yet: a training is running there (process {os.getpid()} on "
        )
        assert str(refused.value).endswith("; wait for its first (every train.ckpt_every steps)")
    finally:
        handle.close()
    with pytest.raises(UserError, match="no complete checkpoint here"):  # its training has ended
        load_tokenizer(run)


def test_cli_errors_in_a_real_process(tiny_kl_tokenizer, tiny_vq_tokenizer, images, tmp_path):
    """What a user sees: exit status 1 and one line on stderr, no traceback (two real processes: each
    costs seconds of imports)."""
    ck = tiny_kl_tokenizer
    good = (images / "1" / "0.png").read_bytes()
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cut.png").write_bytes(good[:-40])
    out = tmp_path / "c.pt"
    line = one_line_error(
        smapctl("tokenize", tmp_path / "1", "--checkpoint", ck, "-o", out, "--workers", "1")
    )
    assert line.startswith("error: ") and "cut.png: truncated or corrupt image data" in line
    assert line.endswith("(--on-error skip leaves such images out)")  # tokenize's default is to stop
    assert not out.exists()

    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=ck, workers=0)
    line = one_line_error(smapctl("decode", codes, "-o", tmp_path / "png", "--checkpoint", tiny_vq_tokenizer))
    assert "made by another tokenizer" in line and str(ck) in line and str(tiny_vq_tokenizer) in line
    assert not (tmp_path / "png").exists()


def test_an_output_under_a_file_is_one_line(tiny_kl_tokenizer, images, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    out = afile / "x.pt"
    args = ["tokenize", images, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--workers", "0"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 1 and "Traceback" not in err and stdout == ""
    assert err.strip().splitlines() == [
        f"error: {out}: could not write the token file: {afile} is a file, not a folder"
    ]
    assert afile.read_text() == "not a folder\n"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_tokenizer_and_token_file_whose_names_are_not_utf8_tokenize_and_decode(
    tiny_kl_tokenizer, images, tmp_path, capsys, suffix
):
    """A checkpoint in a folder named in Latin-1 and a token file so named were refused as unreadable
    ("... is not valid UTF-8" from safetensors, torch's memory-mapped load alike): both readers take UTF-8
    paths only. They load, and the file decodes to the images it was made of."""
    import shutil

    here = os.fsencode(tmp_path)
    checkpoint = os.fsdecode(os.path.join(here, b"tok\xe9"))
    shutil.copytree(tiny_kl_tokenizer, checkpoint)
    codes = os.fsdecode(os.path.join(here, b"caf\xe9" + suffix.encode()))
    args = ["tokenize", images, "-o", codes, "--checkpoint", checkpoint, "--workers", "0"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "Traceback" not in err, err
    out = tmp_path / "decoded"
    code, stdout, err = run_cli(capsys, "decode", codes, "-o", out)
    assert code == 0 and "Traceback" not in err, err
    assert len(load_codes(codes).paths) == len(list(out.rglob("*.png"))) > 0


def test_an_output_name_that_is_not_utf8_is_written_and_said_with_its_bytes_escaped(
    tiny_kl_tokenizer, images, tmp_path, capsys
):
    """A token file named in Latin-1 (`caf\xe9.pt`, bytes that are not UTF-8) was written, and then its
    result line stopped the command with a UnicodeEncodeError traceback (a UTF-8 stdout refuses the
    surrogate Python holds the byte as); the line names it with the byte escaped."""
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.pt"))
    args = ["tokenize", images, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--workers", "0"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "Traceback" not in err, err
    assert f"in {tmp_path}/caf\\xe9.pt;" in stdout and os.path.isfile(out)


# ------------------------------------------------------------------------------------------ full disk


@pytest.mark.parametrize("name", ["codes.pt", "codes.safetensors"])
def test_disk_full_keeps_the_earlier_token_file(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, name
):
    """The disk full at the token file: the earlier one is kept, and so are the new tokens (in the run's
    partial folder), which --resume writes once there is room, without encoding an image again."""
    from smapctl.ops import tokenize

    out = tmp_path / name
    tokenize_images([images], out, checkpoint=tiny_kl_tokenizer, prefix=3, workers=0)
    before = out.read_bytes()
    args = ["tokenize", images, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--workers", "0", "--overwrite"]
    with pytest.MonkeyPatch.context() as full:
        hits = fill_disk(full, free=100, only=name)
        code, stdout, err = run_cli(capsys, *args)
    assert code == 1 and "Traceback" not in err and stdout == ""
    [line] = err.strip().splitlines()
    assert line == (
        f"error: {out}: could not write the token file (No space left on device): the disk is full; "
        f"free some space or write elsewhere; any earlier {name} is unchanged; the tokens are kept in "
        f"{out}.partial: --resume with this -o writes the file"
    )
    assert hits and out.read_bytes() == before and load_codes(out).prefix == 3
    assert temp_files(tmp_path) == []
    expected = tokenize_images([images], tmp_path / "all.pt", checkpoint=tiny_kl_tokenizer, workers=0)
    monkeypatch.setattr(tokenize, "encode_tokens", lambda *a: pytest.fail("encoded again"))
    code, stdout, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert stdout.startswith("7 images (7 of them from the interrupted run) -> latents 7x8x16 (prefix 8")
    assert "images/s" not in stdout  # none encoded: no rate
    assert torch.equal(load_codes(out).tokens, expected.codes.tokens)
    assert not (tmp_path / f"{name}.partial").exists()


def test_tokenize_and_decode_follow_windows_file_rules(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """On Windows every atomic write failed, the scratch file filled through a memory map could be neither
    renamed nor removed, and the lock file beside `-o` stayed (removed while open). Under its rules
    (`windows_file_rules`) the rows are made in memory: the same tokens, and nothing left beside them."""
    plain = tmp_path / "plain" / "codes.pt"
    assert run_cli(capsys, "tokenize", images, "-o", plain, "--checkpoint", tiny_kl_tokenizer)[0] == 0
    windows_file_rules(monkeypatch)
    out = tmp_path / "windows" / "codes.pt"
    code, _, err = run_cli(capsys, "tokenize", images, "-o", out, "--checkpoint", tiny_kl_tokenizer)
    assert code == 0, err
    assert torch.equal(load_codes(out).tokens, load_codes(plain).tokens)
    decoded = tmp_path / "windows" / "png"
    code, _, err = run_cli(capsys, "decode", out, "-o", decoded, "--checkpoint", tiny_kl_tokenizer)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["codes.pt", "png"]
    assert len(list(decoded.rglob("*.png"))) == sum(CLASSES.values())


def test_a_disk_full_for_the_parts_too_leaves_no_partial_folder(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, caplog
):
    out = tmp_path / "codes.pt"
    fill_disk(monkeypatch, free=10)
    code, stdout, err = run_cli(capsys, "tokenize", images, "-o", out, "--checkpoint", tiny_kl_tokenizer)
    assert code == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {out}: could not write the token file (No space left on device)")
    assert line.endswith("any earlier codes.pt is unchanged")  # not "the tokens are kept"
    assert (
        f"the tokens could not be kept for --resume either: {out}.partial/plan.json: could not write the "
        "plan of the tokens (No space left on device): the disk is full; free some space or write elsewhere"
    ) in caplog.text
    assert not (tmp_path / "codes.pt.partial").exists() and not out.exists()


def test_sigterm_ends_a_run_through_its_clean_ups_and_lets_its_token_file_be_written(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys, caplog
):
    """SIGTERM (`kill`, a cluster's time limit) ends a command as Ctrl-C does, through its clean-ups: as
    images are encoded, one line says why, the exit code is the shell's 128 + 15 and the tokens are kept
    for --resume. Once every image is encoded it lets the token file be written (it used to remove the
    half-written file and keep the tokens as a part, as large): exit 0, no temporary file left."""
    import os

    from smapctl import io
    from smapctl.ops import tokenize

    real_finish, real_encode, calls = io.finish_file, tokenize.encode_tokens, []

    def finish_then_terminated(path):
        real_finish(path)
        if ".codes.pt." in Path(path).name:  # the token file's temp file
            os.kill(os.getpid(), signal.SIGTERM)

    def terminated_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_encode(*args, **kwargs)

    caught = []  # without smapctl's own handler, pytest would be the one ended

    def outer(*_):
        caught.append(1)

    signal.signal(signal.SIGTERM, outer)
    args = [
        "tokenize",
        images,
        "-o",
        tmp_path / "codes.pt",
        "--checkpoint",
        tiny_kl_tokenizer,
        "--workers",
        0,
    ]
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(tokenize, "encode_tokens", terminated_at_the_second_batch)
            code, stdout, err = run_cli(capsys, *args, "--batch-size", "4")
        assert signal.getsignal(signal.SIGTERM) is outer  # put back when the command ends
        assert (code, caught, stdout) == (143, [], "")
        assert err.strip().splitlines()[-1] == "stopped by SIGTERM"
        assert not (tmp_path / "codes.pt").exists() and temp_files(tmp_path) == []
        assert [p.name for p in sorted((tmp_path / "codes.pt.partial").iterdir())] == [
            "0000000000-0000000004.safetensors",  # (the first batch)
            "plan.json",
        ]
        monkeypatch.setattr(io, "finish_file", finish_then_terminated)
        with caplog.at_level(logging.WARNING):
            code, stdout, err = run_cli(capsys, *args, "--resume")
        assert signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert (code, caught) == (0, []), err
    assert "SIGTERM once every image was encoded: the token file" in caplog.text and "stopped" not in err
    assert (
        len(load_codes(tmp_path / "codes.pt").paths) == sum(CLASSES.values()) and temp_files(tmp_path) == []
    )
    assert not (tmp_path / "codes.pt.partial").exists()


def test_cli_skip_counts_and_lists_unreadable_images(tiny_kl_tokenizer, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(images / "3", folder / "3")
    broken = add_broken_images(folder / "7")
    out = tmp_path / "codes.pt"
    args = ["tokenize", folder, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--on-error", "skip"]
    code, stdout, err = run_cli(capsys, *args, "--workers", "2")
    assert code == 0, err
    assert "2 images -> latents 2x8x16" in stdout and "2 unreadable skipped" in stdout
    listing = tmp_path / "codes.pt.skipped.txt"
    [line] = err.strip().splitlines()
    assert line.startswith(f"skipped 2 unreadable images (list: {listing}): {broken[0]}: empty file")
    assert f"{broken[1]}: not an image" in line
    assert [row.split("\t")[0] for row in listing.read_text().splitlines()] == [str(p) for p in broken]
    assert load_codes(out).paths == ["3/0.png", "3/1.png"]

    for path in broken:  # fixed: the next run finds nothing to skip, and the old list goes
        shutil.copy(images / "7" / "0.png", path)
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and err == "" and not listing.exists()


def test_images_already_at_size_skip_the_crop_and_resize_with_the_same_pixels(tmp_path):
    from torchvision.transforms import v2

    from smapctl.data.images import INTERPOLATION
    from smapctl.ops.inputs import ImageFiles

    rng = np.random.default_rng(0)
    for name, (h, w) in {"fits.png": (16, 16), "big.png": (24, 24), "wide.png": (16, 20)}.items():
        write_image(tmp_path / name, rng, size=(w, h))
    names = ["fits.png", "big.png", "wide.png"]
    files = ImageFiles([tmp_path / n for n in names], 16)
    crop_resize, framed = files.transform.crop_resize, []
    files.transform.crop_resize = lambda image: framed.append(tuple(image.shape[-2:])) or crop_resize(image)

    def reference(image):
        """What framing means, written out with torchvision's v2 transforms: the largest centred square,
        then the bicubic antialiased resize."""
        image = v2.ToImage()(image)
        image = v2.CenterCrop(min(image.shape[-2:]))(image)
        return v2.Resize((16, 16), interpolation=INTERPOLATION, antialias=True)(image)

    for i, name in enumerate(names):
        x, j, reason = files[i]
        assert (j, reason) == (i, "") and x.dtype == torch.uint8 and type(x) is torch.Tensor
        assert torch.equal(x, reference(load_image(tmp_path / name)).as_subclass(torch.Tensor))
    assert framed == [(24, 24), (16, 20)]  # the 16 x 16 image skipped the crop and resize


def test_missing_ema_weights_are_an_error_not_a_silent_swap(tiny_kl_tokenizer, tmp_path):
    from smapctl.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(tiny_kl_tokenizer)
    copy = tmp_path / latest.name  # a checkpoint folder is named step_N
    shutil.copytree(latest, copy)
    (copy / "ema.safetensors").unlink()
    with pytest.raises(UserError, match=r"ema.safetensors: not found \(this checkpoint has weights: model\)"):
        load_tokenizer(copy)
    assert load_tokenizer(copy, weights="model").path == copy


def test_an_older_checkpoints_relative_data_path_is_pointed_out(tiny_kl_tokenizer, tmp_path, caplog):
    """Runs of an older smapctl recorded `data.dataset: imgs` as typed; where it is read from is said."""
    run = tmp_path / "old"
    shutil.copytree(tiny_kl_tokenizer, run)
    [meta_file] = (run / "checkpoints").glob("step_*/meta.json")
    meta = json.loads(meta_file.read_text())
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        load_tokenizer(tiny_kl_tokenizer)
        meta["recipe"]["data"]["dataset"] = "~/imgs"
        meta_file.write_text(json.dumps(meta))
        load_tokenizer(run)
        assert "relative to the folder" not in caplog.text  # digits: a name; `~/imgs`: from home
        meta["recipe"]["data"]["dataset"] = "imgs"
        meta_file.write_text(json.dumps(meta))
        load_tokenizer(run)
    assert (
        f"recorded data.dataset 'imgs' relative to the folder it was trained from; it is read from"
        f" {Path.cwd()}" in caplog.text
    )


# ------------------------------------------------------------------------------- what is already there


def test_an_existing_output_is_refused_before_anything_is_encoded(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, capsys
):
    """`tokenize -o weights.safetensors` replaced model weights with a token file without a word; a folder
    or an unwritable -o was found only after every image was encoded."""
    import smapctl.ops.tokenize as tokenize

    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_kl_tokenizer, prefix=2, workers=0)
    weights = tmp_path / "ema.safetensors"
    shutil.copy(next(Path(tiny_kl_tokenizer).rglob("ema.safetensors")), weights)
    before = weights.read_bytes()
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "recon").mkdir()  # a folder not named like a token file: told so too (not "named .pt")

    def never(*args, **kwargs):
        raise AssertionError("encoded before the output was checked")

    monkeypatch.setattr(tokenize, "_encode_files", never)
    args = [images, "--checkpoint", tiny_kl_tokenizer, "--workers", "0"]
    for out, overwrite, message in [
        (codes, (), f"error: -o {codes}: a token file exists there; pass --overwrite to replace it"),
        (
            weights,
            ("--overwrite",),
            f"error: -o {weights}: exists and is not a token file; it is not replaced",
        ),
        (tmp_path / "dir.pt", (), f"error: -o {tmp_path / 'dir.pt'}: a folder; give the token file's name"),
        (tmp_path / "recon", (), f"error: -o {tmp_path / 'recon'}: a folder; give the token file's name"),
    ]:
        code, _, err = run_cli(capsys, "tokenize", *args, "-o", out, *overwrite)
        assert code == 1 and err.startswith(message), err
    assert weights.read_bytes() == before and load_codes(codes).prefix == 2
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "tokenize", *args, "-o", codes, "--overwrite")
    assert code == 0 and load_codes(codes).prefix == 8, err


def test_an_output_on_a_read_only_file_system_is_told_as_that(tmp_path, monkeypatch):
    """os.access says no for a folder without write permission and for one on a read-only mount alike;
    the second was reported as a permission problem (the other commands say "Read-only file system")."""
    import types

    from smapctl.ops.codes import check_codes_out

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(
        UserError, match=rf"could not write the token file: no permission to write in {tmp_path}$"
    ):
        check_codes_out(tmp_path / "codes.pt", False)
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(
        UserError, match=rf"could not write the token file: {tmp_path} is on a read-only file system$"
    ):
        check_codes_out(tmp_path / "codes.pt", False)


def test_a_class_is_not_taken_from_a_folder_above_the_input(images, tmp_path):
    """An input folder kept in a folder named like a class (`7/inp`) gave that class to all its images."""
    inp = tmp_path / "7" / "inp"
    foo, top = write_image(inp / "foo" / "a.png", 0), write_image(inp / "b.png", 1)
    folders = list_inputs([inp]).folders
    assert folder_class(foo, ["3", "7"], folders) is None and folder_class(top, ["3", "7"], folders) is None
    assert folder_class(write_image(inp / "3" / "c.png", 2), ["3", "7"], folders) == 0
    assert folder_class(foo, ["3", "7"]) == 1  # a file given alone: its nearest class folder


def test_a_class_id_in_other_digits_is_an_unknown_class(tiny_kl_tokenizer):
    tok = load_tokenizer(tiny_kl_tokenizer)
    assert tok.class_id("3") == 3
    with pytest.raises(UserError, match="unknown class '²'"):  # int("²") was a ValueError traceback
        tok.class_id("²")


def test_odd_outputs_are_refused_before_encoding_and_other_float_latents_decode(
    tiny_kl_tokenizer, images, tmp_path, capsys
):
    """A named pipe as -o hung (reading it to tell whether it is a token file); a folder where the skip
    list goes gave a traceback after the token file was written; latents stored in another float type
    (fp16 to save space) gave a traceback in decode."""
    import os

    os.mkfifo(tmp_path / "pipe.pt")
    code, _, err = run_cli(
        capsys, "tokenize", images, "--checkpoint", tiny_kl_tokenizer, "-o", tmp_path / "pipe.pt"
    )
    assert code == 1 and "exists and is not a token file" in err and len(error_lines(err)) == 1
    (tmp_path / "c.pt.skipped.txt").mkdir()
    code, _, err = run_cli(
        capsys, "tokenize", images, "--checkpoint", tiny_kl_tokenizer, "-o", tmp_path / "c.pt"
    )
    assert code == 1 and error_lines(err) == [
        f"error: -o {tmp_path / 'c.pt'}: {tmp_path / 'c.pt.skipped.txt'}, where it lists the images it skips,"
        " is not a file; move it or choose another -o"
    ]
    assert not (tmp_path / "c.pt").exists()
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_kl_tokenizer, workers=0)
    data = torch.load(codes, weights_only=True)
    data["latents"] = data["latents"].half()
    torch.save(data, tmp_path / "half.pt")
    for name, out in (("codes.pt", "full"), ("half.pt", "half")):
        code, _, err = run_cli(capsys, "decode", tmp_path / name, "-o", tmp_path / out)
        assert code == 0, err
    one = sorted((tmp_path / "full").rglob("*.png"))[0]
    assert one.relative_to(tmp_path / "full").as_posix() in {
        p.relative_to(tmp_path / "half").as_posix() for p in (tmp_path / "half").rglob("*.png")
    }


def test_a_weights_file_named_is_the_weights_loaded_or_refused(tiny_kl_tokenizer, images, tmp_path, capsys):
    """`--checkpoint .../model.safetensors` (a path copied from the checkpoint folder) loaded the EMA
    weights beside it without a word; `latents.tokenizer` and `decode --checkpoint` as well."""
    model_file = next(Path(tiny_kl_tokenizer).rglob("model.safetensors"))
    codes = tmp_path / "codes.pt"
    code, _, err = run_cli(capsys, "tokenize", images, "-o", codes, "--checkpoint", model_file)
    assert code == 1 and not codes.exists()
    assert error_lines(err) == [
        f"error: {model_file}: names the model weights, but this loads the ema weights; pass --weights "
        "model for those"
    ]
    code, _, err = run_cli(
        capsys, "tokenize", images, "-o", codes, "--checkpoint", model_file, "--weights", "model"
    )
    assert code == 0 and load_codes(codes).weights == "model", err
    ema = tmp_path / "ema.pt"
    tokenize_images([images], ema, checkpoint=tiny_kl_tokenizer, workers=0)
    code, _, err = run_cli(capsys, "decode", ema, "-o", tmp_path / "out", "--checkpoint", model_file)
    assert code == 1 and f"{ema} was made with the ema weights" in " ".join(error_lines(err))
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out", "--checkpoint", model_file)
    assert code == 0, err
    sets = ("--set", f"latents.tokenizer={model_file}")
    code, _, err = run_cli(
        capsys, "train-generator", ROOT / "recipes/demo/generator.yaml", *sets, "--dry-run"
    )
    assert "--set latents.tokenizer_weights=model for those" in " ".join(error_lines(err)) and code != 0


def test_a_checkpoint_recipe_no_recipe_takes_is_one_line_naming_its_meta_json(
    tiny_kl_tokenizer, images, tmp_path, capsys
):
    """A checkpoint from elsewhere whose meta.json holds a recipe value of the wrong kind was refused as
    `model.regularizer: expected a section ...`, as if the command's own recipe were wrong."""
    from smapctl.train.checkpoint import latest_checkpoint

    run = shutil.copytree(tiny_kl_tokenizer, tmp_path / "run")
    meta_file = latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["recipe"]["model"]["regularizer"] = 5
    meta_file.write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "tokenize", images, "-o", tmp_path / "c.pt", "--checkpoint", run)
    assert code == 1 and error_lines(err) == [
        f"error: {meta_file}: its recipe's model.regularizer: expected a section with kind: 'vq' | 'kl' |"
        " 'softvq', got 5 (a broken or hand-edited meta.json)"
    ]


def test_the_nearest_class_folder_below_the_input_gives_the_class(images, tmp_path):
    root = tmp_path / "root"
    image = write_image(root / "train" / "3" / "0.png", 0)
    assert folder_class(image, ["3", "7"], list_inputs([root]).folders) == 0
    # Nearest: of `a/3/7/`, the 7 (the folder the image is in), not the 3 above it.
    deeper = write_image(root / "a" / "3" / "7" / "0.png", 1)
    assert folder_class(deeper, ["3", "7"], list_inputs([root]).folders) == 1
    # Of two inputs, one inside the other, the innermost one it is in decides (whatever their order).
    inner = write_image(root / "3" / "7" / "0.png", 2)  # `root` alone makes it a 3 (its sub-folder)
    assert folder_class(inner, ["3", "7"], list_inputs([root]).folders) == 0
    for inputs in ([root, root / "3" / "7"], [root / "3" / "7", root]):
        assert folder_class(inner, ["3", "7"], list_inputs(inputs).folders) == 1


def test_a_folder_given_alone_keeps_its_layout_below_it(tmp_path):
    """Its images' paths are relative to the folder itself, even when they all lie in one sub-folder
    (the token file of `tokenize train` names `cat/a.png`, not `a.png`)."""
    write_image(tmp_path / "train" / "cat" / "a.png", 0)
    write_image(tmp_path / "train" / "cat" / "b.png", 1)
    listed = list_inputs([tmp_path / "train"])
    assert listed.relative == ["cat/a.png", "cat/b.png"] and listed.base == tmp_path / "train"


def test_workers_beyond_four_per_cpu_are_refused(tmp_path, capsys, monkeypatch):
    """`tokenize --workers 1000` forked a thousand image readers and stalled the machine."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    code, _, err = run_cli(capsys, "tokenize", tmp_path, "-o", tmp_path / "c.pt", "--workers", 9)
    assert code == 2 and "at most 8 (4 per CPU; this machine has 2)" in err and "--workers" in err
    assert not (tmp_path / "c.pt").exists()


def test_a_checkpoint_copied_out_of_its_run_is_usable_under_any_name(
    tiny_kl_tokenizer, images, tmp_path, capsys
):
    """README: copy the checkpoint a token file names elsewhere to keep it. Copied to `kept/`, `decode
    --checkpoint kept` said "no complete checkpoint here", and `evaluate --checkpoint` of a copy refused
    its own default output (kept/eval) as inside a run's checkpoints."""
    from smapctl.train import checkpoint as ckpt

    kept = tmp_path / "kept"
    shutil.copytree(ckpt.latest_checkpoint(tiny_kl_tokenizer), kept)
    codes = tmp_path / "c.pt"
    tokenize_images([images], codes, checkpoint=tiny_kl_tokenizer, workers=0)
    code, _, err = run_cli(capsys, "decode", codes, "--checkpoint", kept, "-o", tmp_path / "png")
    assert code == 0, err
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", kept, "--limit", 4, "--no-semantic")
    assert code == 0, err
    assert (kept / "eval" / "metrics.json").is_file()


def test_a_class_it_cannot_tell_lists_the_classes_as_the_other_messages_do():
    """The tokenizer's classes named by "cannot tell its class": 8 of digits' 10, then "..." (the other
    class messages show 12)."""
    from smapctl.ops.inputs import unknown_class_message

    digits = [str(i) for i in range(10)]
    assert "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9); pass --label" in unknown_class_message("a.png", digits, "--label")
    many = [f"c{i}" for i in range(13)]
    assert "c10, c11 ...); pass" in unknown_class_message("a.png", many, "--label")


def test_a_class_it_cannot_tell_lists_classes_from_elsewhere_short_and_printable():
    """A tokenizer from elsewhere naming a class with a line break, an escape sequence or 100,000
    characters: "cannot tell its class" lists its classes short and printable, as the other messages
    listing classes do; listed as they are, no test failed."""
    from smapctl.ops.inputs import unknown_class_message

    said = unknown_class_message("a.png", ["zero", "one\n\x1b[2J", "two" * 33_000], "--label")
    assert "(zero, one??[2J, twotwo" in said and len(said) < 300


def test_a_class_folder_above_the_input_is_named_when_no_class_can_be_told(
    tiny_vq_tokenizer, tmp_path, capsys
):
    """`tokenize train/3/fluffy` said its images were in no folder named after a class, though they are
    in `3/`: the folders above an input are not looked at (by design), and the message now says so and
    what to give instead. An input with no class folder above it keeps the message it had."""
    fluffy = tmp_path / "train" / "3" / "fluffy"
    write_image(fluffy / "a.png", 1)
    code, _, err = run_cli(
        capsys, "tokenize", fluffy, "--checkpoint", tiny_vq_tokenizer, "-o", tmp_path / "c.pt"
    )
    assert code == 1 and error_lines(err) == [
        f"error: {fluffy / 'a.png'}: cannot tell its class: no folder below the input folder {fluffy} is"
        " named after one of the tokenizer's classes, and the folders above an input are not looked at"
        f" ({tmp_path / 'train' / '3'} is the class 3); give {tmp_path / 'train' / '3'} as the input, or pass"
        " --label 3"
    ]
    code, _, err = run_cli(
        capsys,
        "tokenize",
        tmp_path / "train" / "3",
        "--checkpoint",
        tiny_vq_tokenizer,
        "-o",
        tmp_path / "c.pt",
    )
    assert code == 0, err
    write_image(tmp_path / "misc" / "b.png", 2)
    code, _, err = run_cli(
        capsys, "tokenize", tmp_path / "misc", "--checkpoint", tiny_vq_tokenizer, "-o", tmp_path / "m.pt"
    )
    assert code == 1 and "b.png: cannot tell its class: no folder it is in is named after one" in err


@pytest.mark.parametrize("name", ["codes.pt", "codes.safetensors"])
def test_tokens_are_made_in_a_scratch_file_not_in_memory(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch, name
):
    """The rows are made in a memory-mapped scratch file beside the token file (ImageNet's: 10.5 GB that
    were the process's own memory), which goes with the run; the token file holds the kept rows alone,
    with a skipped image as without."""
    import smapctl.ops.tokenize as tokenize

    folder = shutil.copytree(images, tmp_path / "digits")
    (folder / "3" / "broken.png").write_bytes(b"")
    out = tmp_path / "out" / name
    real, seen = tokenize.encode_tokens, []

    def watched(*args, **kwargs):
        seen.append([(p.name, p.stat().st_size) for p in temp_files(out.parent)])
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "encode_tokens", watched)
    r = tokenize_images([folder], out, checkpoint=tiny_kl_tokenizer, prefix=2, batch_size=3, on_error="skip",
                        workers=0)  # fmt: skip
    n = len(r.codes.paths)
    assert n == sum(CLASSES.values()) and len(seen) == 3
    rows = (n + 1) * 2 * 16 * 4  # the broken image's row too: the rows are made before it is found
    for listing in seen:
        [(scratch, size)] = listing
        assert scratch.startswith(f".{name}.") and rows <= size < rows + 256  # (its header)
    assert temp_files(tmp_path) == []
    monkeypatch.setattr(tokenize, "encode_tokens", real)
    expected = tokenize_images(
        [images], tmp_path / "all.pt", checkpoint=tiny_kl_tokenizer, prefix=2, workers=0
    )
    codes = load_codes(out)
    assert codes.paths == expected.codes.paths and torch.equal(codes.labels, expected.codes.labels)
    assert torch.allclose(codes.tokens, expected.codes.tokens, atol=1e-5)
    if name.endswith(".pt"):  # the kept rows alone, not the storage of all the rows made
        data = torch.load(out, weights_only=True)
        assert data["latents"].untyped_storage().nbytes() == n * 2 * 16 * 4
    assert torch.equal(r.codes.tokens, codes.tokens)


def test_a_disk_without_room_for_the_tokens_is_said_before_any_image_is_encoded(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, capsys
):
    import smapctl.ops.tokenize as tokenize

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "codes.pt"
    tokenize_images([images], out, checkpoint=tiny_vq_tokenizer, prefix=1, workers=0)
    before = out.read_bytes()
    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(tokenize, "encode_tokens", lambda *a, **k: pytest.fail("encoded"))
    args = ["tokenize", images, "-o", out, "--checkpoint", tiny_vq_tokenizer, "--overwrite"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 1 and stdout == ""
    assert err.strip() == (
        f"error: {out}: no room on its disk for its tokens (0.00 GB; No space left on device): free some "
        "space or write elsewhere; any earlier codes.pt is unchanged"
    )
    assert out.read_bytes() == before and temp_files(tmp_path) == []
    assert not (tmp_path / "codes.pt.partial").exists()


@pytest.mark.parametrize("why", ["room", "mmap"])
def test_rows_are_made_in_memory_without_room_or_maps_for_a_scratch_file(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch, caplog, why
):
    """A disk with room for the token file but not for a scratch file beside it, or a file system without
    memory maps: the rows are made in memory, as before, with a warning."""
    import collections
    import mmap

    import smapctl.ops.tokenize as tokenize

    if why == "room":
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(tokenize.shutil, "disk_usage", lambda path: usage(100, 100, 100))
        said = "the disk has no room for a scratch file of them beside the run's parts and the token file"
    else:

        def no_maps(*args, **kwargs):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

        monkeypatch.setattr(mmap, "mmap", no_maps)
        said = f"no scratch file ({os.strerror(errno.ENODEV)})"
    real, seen = tokenize.encode_tokens, []

    def watched(*args, **kwargs):
        seen.append(temp_files(tmp_path))
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "encode_tokens", watched)
    caplog.set_level(logging.WARNING, logger="smapctl")
    out = tmp_path / "codes.safetensors"
    r = tokenize_images([images], out, checkpoint=tiny_vq_tokenizer, batch_size=4, workers=0)
    assert f"{out}: its tokens are made in memory (0.00 GB): {said}" in caplog.text
    assert seen == [[], []] and temp_files(tmp_path) == []
    monkeypatch.setattr(tokenize, "encode_tokens", real)
    expected = tokenize_images([images], tmp_path / "again.pt", checkpoint=tiny_vq_tokenizer, workers=0)
    assert torch.equal(load_codes(out).tokens, expected.codes.tokens)
    assert torch.equal(r.codes.tokens, expected.codes.tokens)


def test_prefix_zero_keeps_no_tokens(tiny_kl_tokenizer, images, tmp_path):
    """--prefix 0 (the class alone) is a prefix like any other, not "all K"."""
    r = tokenize_images([images], tmp_path / "k0.pt", checkpoint=tiny_kl_tokenizer, prefix=0, workers=0)
    assert r.codes.prefix == 0 and r.codes.tokens.shape == (sum(CLASSES.values()), 0, 16)
    assert r.codes.num_tokens == 8


def test_a_relative_checkpoint_is_recorded_by_its_absolute_path(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch
):
    """The token file is read from elsewhere later (decode, train-generator): it names its checkpoint by an
    absolute path, whatever folder the command ran from."""
    monkeypatch.chdir(tiny_kl_tokenizer.parent)
    relative = Path(tiny_kl_tokenizer.name)
    r = tokenize_images([images], tmp_path / "c.pt", checkpoint=relative, prefix=2, workers=0)
    assert Path(r.codes.checkpoint).is_absolute()
    assert Path(r.codes.checkpoint) == load_tokenizer(tiny_kl_tokenizer).path.resolve()


def test_a_class_is_given_by_its_name_before_its_id():
    """--label (and the other class options) take a class by name, as the checkpoint lists it, and by id;
    a name that is a number is its class, not the class of that id."""
    from smapctl.ops.load import LoadedTokenizer

    tok = LoadedTokenizer(None, None, ["cat", "dog"], Path("ckpt"), "f")
    assert tok.class_id("dog") == 1 and tok.class_id("cat") == 0 and tok.class_id("1") == 1
    numbered = LoadedTokenizer(None, None, ["10", "5"], Path("ckpt"), "f")
    assert numbered.class_id("5") == 1 and numbered.class_id("10") == 0 and numbered.class_id("0") == 0
    with pytest.raises(UserError, match=r"^--label: unknown class 'bird'; the tokenizer's classes are"):
        tok.class_id("bird", "--label")


def test_the_fingerprint_tells_checkpoints_of_the_same_model_apart(tmp_path):
    """Two checkpoints of one model (another step, another training) have weights files of the same size:
    their meta.json tells them apart, and so does the weights file chosen."""
    from smapctl.ops.load import fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, step in ((a, 1), (b, 2)):
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"kind": "tokenizer", "step": step}))
        (folder / "ema.safetensors").write_bytes(b"x" * 64)
        (folder / "model.safetensors").write_bytes(b"x" * 64)
    assert fingerprint(a, "ema") == fingerprint(a, "ema")
    assert fingerprint(a, "ema") != fingerprint(b, "ema")
    assert fingerprint(a, "ema") != fingerprint(a, "model")


def test_the_cli_passes_each_option_to_its_own_parameter(tmp_path, capsys, monkeypatch):
    """`tokenize --precision bf16` must reach the encoder as bf16 (not the default), each option as itself."""
    import smapctl.ops.tokenize

    got = {}

    def record(inputs, out, **kwargs):
        got.update(kwargs, inputs=inputs, out=out)
        raise UserError("recorded")

    monkeypatch.setattr(smapctl.ops.tokenize, "tokenize_images", record)
    args = [
        "tokenize",
        tmp_path,
        "-o",
        tmp_path / "t.pt",
        "--checkpoint",
        tmp_path / "ck",
        "--weights",
        "model",
    ]
    args += ["--label", "3", "--prefix", 2, "--batch-size", 5, "--workers", 1, "--on-error", "skip"]
    code, _, err = run_cli(capsys, *args, "--precision", "bf16", "--overwrite")
    assert code == 1 and "recorded" in err, err
    assert {k: got[k] for k in ("weights", "label", "prefix", "batch_size", "workers", "on_error")} == {
        "weights": "model", "label": "3", "prefix": 2, "batch_size": 5, "workers": 1, "on_error": "skip"
    }  # fmt: skip
    assert got["precision"] == "bf16" and got["overwrite"] is True and got["resume"] is False
