"""Image folders, the embedded datasets, splits, and the resumable sample order."""

import gc
import logging
import multiprocessing
import os
import signal
import sys
import weakref
from itertools import islice

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from faults import SignalsAsItsSecondWorkerStarts, add_broken_images, stopped_as_the_second_worker_starts
from PIL import Image
from tokenize_helpers import write_image
from torch.utils.data import BatchSampler, DataLoader

from smapctl.data.config import DataConfig
from smapctl.data.datasets import ResumableSampler, build_datasets, build_eval_dataset, make_loader
from smapctl.data.embedded import PHOTOS, build_digits, build_photos, cache_dir, load_embedded
from smapctl.data.folder import ImageFolderDataset, split_indices
from smapctl.data.images import BadImageError, SampleKey, eval_transform
from smapctl.data.skipped import attach_skip_log, read_skip_list, skip_summary, write_skip_list
from smapctl.errors import UserError

SIZE = 16


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, value, value)).save(path)


@pytest.fixture
def folder(tmp_path):
    """cat: 0.png 1.png bad.png 2.png (bad is text); dog: 0.png 1.png sub/2.png."""
    root = tmp_path / "train"
    for i in range(3):
        _write(root / "cat" / f"{i}.png", 10 * i)
    (root / "cat" / "bad.png").write_text("not a picture")
    for i, rel in enumerate(["0.png", "1.png", "sub/2.png"]):
        _write(root / "dog" / rel, 100 + 10 * i)
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root


# ------------------------------------------------------------------------------------------ image folders


def test_folder_lists_classes_and_files(folder):
    ds = ImageFolderDataset(folder)
    assert ds.class_names == ["cat", "dog"]
    assert [ds.path(i).relative_to(folder).as_posix() for i in range(len(ds))] == [
        "cat/0.png", "cat/1.png", "cat/2.png", "cat/bad.png", "dog/0.png", "dog/1.png", "dog/sub/2.png",
    ]  # fmt: skip
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    image, label = ImageFolderDataset(folder, eval_transform(SIZE))[5]
    assert image.shape == (3, SIZE, SIZE) and label == 1
    assert torch.allclose(image, torch.full_like(image, 110 / 127.5 - 1))


def test_a_subset_keeps_each_image_with_its_own_label(folder):
    """A held-out split picks indices in any order: each image keeps its class, none takes another's."""
    ds = ImageFolderDataset(folder, eval_transform(SIZE))
    view = ds.subset([5, 0, 6, 2], eval_transform(SIZE))
    rel = [view.path(i).relative_to(folder).as_posix() for i in range(len(view))]
    assert rel == ["dog/1.png", "cat/0.png", "dog/sub/2.png", "cat/2.png"]
    assert view.labels.tolist() == [1, 0, 1, 0]
    assert [view[i][1] for i in range(len(view))] == [1, 0, 1, 0]
    assert torch.allclose(view[0][0], torch.full((3, SIZE, SIZE), 110 / 127.5 - 1))


def test_folder_fail_mode_names_the_bad_file(folder):
    ds = ImageFolderDataset(folder, on_error="fail")
    with pytest.raises(BadImageError, match="bad.png: not an image"):
        ds[3]


def test_folder_skip_mode_returns_the_next_image_and_warns_once(folder, caplog):
    ds = ImageFolderDataset(folder, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        first, second = ds[3], ds[3]
    assert np.array_equal(np.asarray(first[0]), np.asarray(ds[4][0])) and first[1] == second[1] == 1
    assert ds.skipped == {str(folder / "cat" / "bad.png")}
    assert len([r for r in caplog.records if "bad.png" in r.getMessage()]) == 1


def test_only_the_first_unreadable_images_are_named_as_they_are_met(folder, caplog):
    """A folder with many broken files flooded the log (and the progress bar) with a warning each: the first
    few are named, the rest left to the summary at the end."""
    from smapctl.data.folder import WARNED_AS_MET

    for i in range(WARNED_AS_MET + 3):
        (folder / "cat" / f"broken{i}.png").write_bytes(b"")
    ds = ImageFolderDataset(folder, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        for i in range(len(ds)):
            ds[i]
    assert len(ds.skipped) == WARNED_AS_MET + 4  # bad.png too
    said = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(said) == WARNED_AS_MET and said[-1].endswith(
        "; any more are not named here (the summary at the end counts them)"
    )
    # The training and held-out views of one folder count together (it named 5 in each).
    caplog.clear()
    fresh = ImageFolderDataset(folder, on_error="skip")
    views = fresh.subset(range(0, len(fresh), 2), None), fresh.subset(range(1, len(fresh), 2), None)
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        for view in views:
            for i in range(len(view)):
                view[i]
    said = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(said) == WARNED_AS_MET


def test_an_unreadable_image_with_a_line_break_in_its_name_is_named_on_one_line(folder, caplog):
    """The warning as an unreadable image is met wrote the name's line break as it is: two lines."""
    (folder / "cat" / "nl\nname.png").write_bytes(b"")
    (folder / "cat" / "tab\tname.png").write_bytes(b"")
    ds = ImageFolderDataset(folder, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        for i in range(len(ds)):
            ds[i]
    said = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert any("nl\\nname.png" in line for line in said) and any("tab\\tname.png" in line for line in said)
    assert not any("\n" in line or "\t" in line for line in said)


def test_archive_junk_is_no_class_and_an_empty_class_is_named(folder, caplog):
    """A zip unpacked from macOS brings `__MACOSX/`, which used to become class 0 and shift every real
    label; an empty class folder stays a class (its id is kept) but is named in a warning."""
    _write(folder / "__MACOSX" / "cat" / "0.png", 5)
    (folder / "emu").mkdir()
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        ds = ImageFolderDataset(folder)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert f"{folder}: class folder(s) without images: emu" in caplog.text


def test_a_link_up_out_of_a_class_folder_is_not_followed_and_a_loose_image_is_named(folder, caplog):
    """`cat/loop -> ..` listed every dog image again as a cat (the class folder is walked on its own,
    and only it was known as walked), without a word; an image beside the class folders, in none, was
    left out without a word either."""
    before = ImageFolderDataset(folder)
    (folder / "cat" / "loop").symlink_to(folder, target_is_directory=True)
    _write(folder / "stray.png", 7)
    (folder / "notes.txt").write_text("not an image, not a class")
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        ds = ImageFolderDataset(folder)
    assert [ds.path(i) for i in range(len(ds))] == [before.path(i) for i in range(len(before))]
    assert ds.labels.tolist() == before.labels.tolist()
    loop = folder / "cat" / "loop"
    assert f"{loop}: a link to {os.path.realpath(folder)}, a folder it is inside, not followed" in caplog.text
    assert f"{folder}: 1 image(s) beside its class folders, in none, left out: stray.png" in caplog.text


def test_folder_where_nothing_is_readable_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="none of its 1 images"):
        ImageFolderDataset(tmp_path)[0]


def test_folder_errors_inside_dataloader_workers(folder):
    ds = ImageFolderDataset(folder, eval_transform(SIZE), on_error="fail")
    batches = iter(DataLoader(ds, batch_size=7, num_workers=1))
    try:
        next(batches)
        raise AssertionError("the bad file was not reported")
    except BadImageError as e:  # not pytest.raises: its traceback would keep the workers alive until gc,
        message = str(e)  # and torch's worker shutdown stalls for seconds when left to gc
    del batches
    assert message == f"{folder / 'cat' / 'bad.png'}: not an image (unrecognised file format)"
    ds.on_error = "skip"
    (images, labels), *rest = DataLoader(ds, batch_size=7, num_workers=1)
    assert images.shape == (7, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and not rest


def test_folder_with_given_class_names(folder):
    ds = ImageFolderDataset(folder, class_names=["ant", "cat", "dog"])
    assert ds.labels.tolist() == [1, 1, 1, 1, 2, 2, 2]
    with pytest.raises(UserError, match="dog not among the 2 training classes"):
        ImageFolderDataset(folder, class_names=["cat", "eel"])


def test_class_names_match_whatever_unicode_form_the_folders_have(tmp_path):
    """'café' composed (NFC) in the training classes and decomposed (NFD, as macOS, zip and rsync hand
    names over) on disk is one class: it was 'not among the training classes' under its own name."""
    import unicodedata

    from smapctl.ops.inputs import folder_class
    from smapctl.ops.load import LoadedTokenizer
    from smapctl.ops.sample import parse_classes

    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    assert nfc != nfd
    _write(tmp_path / nfd / "0.png", 1)
    _write(tmp_path / "cat" / "0.png", 2)
    assert ImageFolderDataset(tmp_path, class_names=["cat", nfc]).labels.tolist() == [1, 0]
    assert folder_class(str(tmp_path / nfd / "0.png"), ["cat", nfc], [str(tmp_path)]) == 1
    assert folder_class(str(tmp_path / nfd / "0.png"), ["cat", nfc], []) == 1
    assert parse_classes(nfd, ["cat", nfc]) == [1] and parse_classes(f"cat,{nfd}", ["cat", nfc]) == [0, 1]
    tok = LoadedTokenizer(model=None, recipe=None, class_names=["cat", nfc], path=tmp_path, fingerprint="")
    assert tok.class_id(nfd) == 1
    # Class lists compare so (a resume, the reference classifier against the model), sample file names
    # spell both forms alike, and a folder's classes take the same ids in either form.
    from smapctl.data.folder import same_classes
    from smapctl.ops.sample import safe_name
    from smapctl.train.resume import check_same_classes

    assert same_classes(["cat", nfc], ["cat", nfd]) and not same_classes(["cat", nfc], [nfc, "cat"])
    assert safe_name(nfd) == safe_name(nfc) == "café"
    check_same_classes(tmp_path, {"class_names": ["cat", nfc]}, ["cat", nfd])
    with pytest.raises(UserError, match="trained on other classes"):
        check_same_classes(tmp_path, {"class_names": ["cat", nfc]}, ["cat", "dog"])
    ecole = {form: unicodedata.normalize(form, "école") for form in ("NFC", "NFD")}
    for form, name in ecole.items():
        _write(tmp_path / form / name / "0.png", 1)
        _write(tmp_path / form / "fleur" / "0.png", 2)
    assert ImageFolderDataset(tmp_path / "NFD").class_names == ["fleur", ecole["NFD"]]
    assert ImageFolderDataset(tmp_path / "NFC").class_names == ["fleur", ecole["NFC"]]


def test_files_that_are_not_images_are_counted_once_not_dropped_silently(tmp_path, caplog):
    """A .avif or .heic beside the images went missing from training, tokenize and evaluate without a
    word; .jfif and .jpe (JPEG files) were among them, and are images now."""
    from smapctl.eval.image_sets import read_image_set
    from smapctl.ops.inputs import list_inputs

    _write(tmp_path / "cat" / "a.png", 1)
    Image.new("RGB", (12, 10)).save(tmp_path / "cat" / "b.jfif", format="JPEG")
    Image.new("RGB", (12, 10)).save(tmp_path / "cat" / "c.jpe", format="JPEG")
    for name in ("d.avif", "e.avif", "notes.txt", ".DS_Store", "README"):  # hidden files are not counted
        (tmp_path / "cat" / name).write_bytes(b"x")
    for read in (ImageFolderDataset, lambda p: list_inputs([p]).paths, lambda p: read_image_set(p).images):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="smapctl"):
            assert len(read(tmp_path)) == 3
        [said] = [r.getMessage() for r in caplog.records]
        assert said.startswith(f"{tmp_path}: 4 files left out, not images by their suffix: .avif x2, ")
        assert ".txt x1" in said and "no suffix x1" in said
    # A folder given twice counts once; a pattern's matches count too.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smapctl"):
        list_inputs([tmp_path, tmp_path])
        list_inputs([str(tmp_path / "cat" / "*")])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all(
        ": 4 files left out, not images by their suffix: .avif x2, " in s for s in said
    )
    # A folder of no images says what it did hold (the count of left-out files was missing there alone).
    (tmp_path / "notes" / "a").mkdir(parents=True)
    (tmp_path / "notes" / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError) as e:
        list_inputs([tmp_path / "notes"])
    assert str(e.value) == (
        f"no images found in {tmp_path / 'notes'} (1 file left out, not images by their suffix: .txt x1)"
    )
    # A `smapctl sample` folder's own files (sampling.json, samples.npz, an evaluation's metrics.json) are
    # not the user's: nothing to say of them.
    samples = tmp_path / "samples"
    samples.mkdir()
    _write(samples / "0000_cat_00000.png", 1)
    for name in ("sampling.json", "samples.npz", "metrics.json"):
        (samples / name).write_text("{}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smapctl"):
        read_image_set(samples)
    assert "left out" not in caplog.text


def test_class_folders_without_any_image_are_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no image files in its class folders"):
        ImageFolderDataset(tmp_path)


def test_flat_folder_is_explained(tmp_path):
    """A folder of images without classes (for a tokenizer without class conditioning) is refused with the
    way to give it: one sub-folder, one class."""
    _write(tmp_path / "x.png", 0)
    with pytest.raises(UserError, match="one sub-folder per class") as e:
        ImageFolderDataset(tmp_path)
    assert f"in one sub-folder (e.g. {tmp_path / 'images'}), with --set model.num_classes=1" in str(e.value)
    (tmp_path / "images").mkdir()
    (tmp_path / "x.png").rename(tmp_path / "images" / "x.png")
    assert ImageFolderDataset(tmp_path).class_names == ["images"]


# ------------------------------------------------------------------------------------------------ splits


def test_split_is_deterministic_disjoint_and_stratified():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val = split_indices(100, 0.1, seed=0, labels=labels)
    assert (train, val) == split_indices(100, 0.1, seed=0, labels=labels)
    assert sorted(train + val) == list(range(100)) and train == sorted(train) and val == sorted(val)
    assert np.bincount(np.array(labels)[val]).tolist() == [5, 3, 2]
    assert val != split_indices(100, 0.1, seed=1, labels=labels)[1]
    assert split_indices(10, 0.0) == (list(range(10)), [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0)  # every image held out: nothing left to train on


def test_class_names_that_differ_only_in_unicode_form_take_the_first_id():
    from smapctl.data.folder import class_ids

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert class_ids(["ant", composed, decomposed, "dog"]) == {"ant": 0, composed: 1, "dog": 3}


# ---------------------------------------------------------------------------------------------- embedded


def test_digits_are_sklearn_digits_white_on_black():
    from sklearn.datasets import load_digits

    data = build_digits(8)  # at the native size the bilinear resize is the identity
    images = torch.cat([data.train_images, data.val_images])
    labels = torch.cat([data.train_labels, data.val_labels])
    assert images.shape == (1797, 3, 8, 8) and images.dtype == torch.uint8
    order = torch.sort(labels, stable=True).indices  # compare as multisets per class via sorted pixels
    digits = load_digits()
    expected = torch.from_numpy(np.rint(digits.images * 255 / 16)).to(torch.uint8)
    assert torch.equal(images[:, 0], images[:, 2])  # grey RGB
    assert sorted(map(bytes, images[order, 0].numpy())) == sorted(map(bytes, expected.numpy()))
    assert np.bincount(data.val_labels.numpy()).tolist() == np.rint(np.bincount(digits.target) / 10).tolist()


def test_digits_are_deterministic_and_cached():
    first = build_digits(SIZE)
    cached = load_embedded("digits", SIZE)
    assert (cache_dir() / "datasets" / f"digits-{SIZE}px-v1.safetensors").is_file()
    assert cached.class_names == [str(d) for d in range(10)]
    for key in ("train_images", "train_labels", "val_images", "val_labels"):
        assert torch.equal(getattr(first, key), getattr(build_digits(SIZE), key))
        assert torch.equal(getattr(first, key), getattr(load_embedded("digits", SIZE), key))
    assert first.train_images.shape == (1618, 3, SIZE, SIZE) and first.val_images.shape == (
        179,
        3,
        SIZE,
        SIZE,
    )
    assert first.train_images.float().mean() < 80  # mostly black background


def test_photos_set():
    data = build_photos(SIZE)
    assert data.class_names == list(PHOTOS) and len(PHOTOS) == 9
    assert data.train_images.shape == (9 * 200, 3, SIZE, SIZE) and data.val_images.shape == (
        9 * 20,
        3,
        SIZE,
        SIZE,
    )
    assert np.bincount(data.train_labels.numpy()).tolist() == [200] * 9
    assert torch.equal(data.train_images, build_photos(SIZE).train_images)
    assert not torch.equal(data.train_images[:20], data.val_images[:20])
    assert not torch.equal(data.train_images[0], data.train_images[1])
    assert data.train_images[:, 0].float().std() > 20  # colourful, varied crops


def test_damaged_cache_is_rebuilt(caplog):
    path = cache_dir() / "datasets" / "digits-9px-v1.safetensors"
    good = load_embedded("digits", 9)
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        again = load_embedded("digits", 9)
    assert torch.equal(good.train_images, again.train_images) and "rebuilding" in caplog.text
    assert load_embedded("digits", 9).class_names == good.class_names  # the rewritten file reads back


# ----------------------------------------------------------------------------------------- build_datasets


def test_build_datasets_embedded():
    bundle = build_datasets(DataConfig(dataset="digits"), SIZE)
    assert len(bundle.train) == 1618 and len(bundle.val) == 179 and len(bundle.class_names) == 10
    frame, _ = bundle.train[SampleKey(0, 123)]  # uint8: the training loop converts whole batches
    assert frame.shape == (3, SIZE, SIZE) and frame.dtype == torch.uint8
    assert torch.equal(frame, bundle.train[SampleKey(0, 123)][0])
    image, _ = bundle.val[0]
    assert image.dtype == torch.float32 and -1 <= image.min() <= image.max() <= 1


def test_build_datasets_folder_split_and_val_folder(folder, tmp_path):
    bundle = build_datasets(DataConfig(dataset=str(folder), val_fraction=0.3), SIZE)
    assert bundle.class_names == ["cat", "dog"]
    assert len(bundle.train) + len(bundle.val) == 7 and len(bundle.val) == 2  # round(0.3*4) + round(0.3*3)
    _write(tmp_path / "val" / "dog" / "v.png", 7)
    bundle = build_datasets(DataConfig(dataset=str(folder), val_dataset=str(tmp_path / "val")), SIZE)
    assert len(bundle.train) == 7 and len(bundle.val) == 1 and bundle.val[0][1] == 1
    _write(tmp_path / "val2" / "eel" / "v.png", 7)
    with pytest.raises(UserError, match="^data.val_dataset: .*eel"):
        build_datasets(DataConfig(dataset=str(folder), val_dataset=str(tmp_path / "val2")), SIZE)


def test_only_augmented_training_images_are_cropped_and_flipped(tmp_path):
    """The held-out split and a validation folder are framed as evaluation frames them (float in [-1, 1],
    the centred square), and so is the training split without `train_augment` (the semantic score's
    reference classifier trains on it): random crops there made the scores change from run to run."""
    from smapctl.data.images import eval_frame, load_image

    rng = np.random.default_rng(0)
    for root in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(3):
                write_image(tmp_path / root / cls / f"{i}.png", rng, size=(24, 20))
    cfg = DataConfig(dataset=str(tmp_path / "train"), val_fraction=0.4, crop_scale=(0.2, 0.3))

    def framed_as_eval(ds, i, key, frame):
        image, _ = ds[key]
        return torch.equal(image, frame(load_image(ds.path(i))))

    bundle = build_datasets(cfg, SIZE)
    assert len(bundle.val) == 2 and all(
        framed_as_eval(bundle.val, i, SampleKey(i, 7), eval_transform(SIZE)) for i in range(2)
    )
    assert not framed_as_eval(bundle.train, 0, SampleKey(0, 7), eval_frame(SIZE))  # augmented
    plain = build_datasets(cfg, SIZE, train_augment=False)
    assert all(framed_as_eval(plain.train, i, SampleKey(i, 7), eval_frame(SIZE)) for i in range(4))
    cfg.val_dataset = str(tmp_path / "val")
    val = build_datasets(cfg, SIZE).val
    assert all(framed_as_eval(val, i, SampleKey(i, 7), eval_transform(SIZE)) for i in range(6))


def test_a_missing_folder_is_no_class_count_problem():
    """`missing_data` says a folder is not there; the class count check leaves it to that."""
    from smapctl.data.datasets import class_count_problem

    assert class_count_problem(DataConfig(dataset="/nowhere/at/all"), 10) is None
    assert "has 10 classes" in class_count_problem(DataConfig(dataset="digits"), 9)


def test_a_models_classes_keep_their_ids_in_a_folder_changed_since(folder, tmp_path):
    """evaluate's default held-out images are labelled with the tokenizer's classes: a class folder
    deleted since training (an empty one, say) used to shift every later class's id by one."""
    from types import SimpleNamespace

    from smapctl.eval.reconstruction import reconstruction_data

    cfg = DataConfig(dataset=str(folder), val_fraction=0.3)
    bundle = build_datasets(cfg, SIZE, class_names=["ant", "cat", "dog"])
    assert sorted(label for _, label in bundle.val) == [1, 2]  # one held-out cat, one dog
    tok = SimpleNamespace(
        model=SimpleNamespace(cfg=SimpleNamespace(image_size=SIZE)),
        recipe=SimpleNamespace(data=cfg),
        class_names=["ant", "cat", "dog"],
        path=tmp_path / "tok",
    )
    tok.path.mkdir()
    (tok.path / "meta.json").write_text("{}")  # a checkpoint from before `data_listing`: not checked
    images, _ = reconstruction_data(tok, None, None)
    assert sorted(images[i][1] for i in range(len(images))) == [1, 2]
    _write(folder / "eel" / "0.png", 7)  # a class the model does not have
    with pytest.raises(UserError, match="^data.dataset: .*eel.*not among the 3 training classes"):
        reconstruction_data(tok, None, None)


def test_evaluate_of_a_recipe_with_a_val_dataset_reads_that_folder_alone(folder, tmp_path):
    """With data.val_dataset, evaluate's default images are that folder: the training folder is not
    listed (ImageNet's 1.28M files took minutes for nothing), so it may be gone (here: moved away)."""
    from types import SimpleNamespace

    from smapctl.eval.reconstruction import reconstruction_data

    _write(tmp_path / "val" / "dog" / "0.png", 5)
    cfg = DataConfig(dataset=str(folder), val_dataset=str(tmp_path / "val"))
    folder.rename(tmp_path / "elsewhere")
    tok = SimpleNamespace(
        model=SimpleNamespace(cfg=SimpleNamespace(image_size=SIZE)),
        recipe=SimpleNamespace(data=cfg),
        class_names=["cat", "dog"],
        path=tmp_path / "tok",
    )
    images, label = reconstruction_data(tok, None, None)
    assert label == str((tmp_path / "val").resolve())
    assert [images[i][1] for i in range(len(images))] == [1]  # the tokenizer's id of "dog"


def test_build_datasets_missing_folder_names_the_key(tmp_path):
    with pytest.raises(UserError, match="^data.dataset: .*nowhere.*neither an embedded dataset"):
        build_datasets(DataConfig(dataset=str(tmp_path / "nowhere")), SIZE)
    # The paper recipes set data.val_dataset: holding out a share of one's own folder needs it unset.
    _write(tmp_path / "mine" / "a" / "0.png", 1)
    with pytest.raises(
        UserError, match=r"nor a folder; --set data.val_dataset=null holds out data.val_fraction"
    ):
        build_datasets(
            DataConfig(dataset=str(tmp_path / "mine"), val_dataset=str(tmp_path / "imagenet/val")), SIZE
        )


def test_build_eval_dataset():
    assert len(build_eval_dataset("digits", SIZE)) == 179
    assert len(build_eval_dataset("digits:train", SIZE, class_names=[str(d) for d in range(10)])) == 1618
    with pytest.raises(UserError, match="split"):
        build_eval_dataset("digits:test", SIZE)
    with pytest.raises(UserError, match="classes"):
        build_eval_dataset("digits", SIZE, class_names=["a", "b"])


# ------------------------------------------------------------------------------------- resumable sampling


def test_sampler_order_depends_only_on_seed_and_epoch():
    stream = list(islice(ResumableSampler(10, seed=3), 30))
    assert stream == list(islice(ResumableSampler(10, seed=3), 30))
    epochs = [sorted(k.index for k in stream[i : i + 10]) for i in (0, 10, 20)]
    assert epochs == [list(range(10))] * 3  # each epoch is a permutation
    assert stream[:10] != stream[10:20] and stream != list(islice(ResumableSampler(10, seed=4), 30))
    assert [k.index for k in ResumableSampler(4, shuffle=False, epochs=1)] == [0, 1, 2, 3]


def test_each_epoch_draws_new_augmentation_seeds():
    sampler = ResumableSampler(50, seed=3)
    assert not torch.equal(sampler.epoch_order(0)[1], sampler.epoch_order(1)[1])
    assert not torch.equal(sampler.epoch_order(0)[1].sort().values, sampler.epoch_order(1)[1].sort().values)


def test_an_endless_sampler_of_no_images_is_an_error():
    with pytest.raises(UserError, match="empty dataset"):
        ResumableSampler(0)
    assert list(ResumableSampler(0, epochs=1)) == []


def test_a_shuffled_loader_follows_its_seed():
    from smapctl.data.latents import LatentDataset

    data = LatentDataset(torch.zeros(20, 2), torch.arange(20))

    def order(seed):
        return torch.cat([labels for _, labels in make_loader(data, 5, shuffle=True, seed=seed)]).tolist()

    assert order(5) == order(5) and order(5) != order(6)
    assert order(5) == [k.index for k in ResumableSampler(20, seed=5, epochs=1)]


def test_a_loader_gets_the_workers_it_is_given():
    from smapctl.data.latents import LatentDataset

    data = LatentDataset(torch.zeros(4, 2), torch.arange(4))
    assert make_loader(data, 2, shuffle=False, num_workers=2).num_workers == 2


def test_as_many_workers_as_cpus_are_taken_without_a_word(caplog, monkeypatch):
    from smapctl.data import datasets

    monkeypatch.setattr(datasets, "_SAID_WORKERS", set())  # (said once a process)
    with caplog.at_level(logging.INFO, logger="smapctl.data"):
        cpus = datasets.data_workers(10**6)
        assert len(caplog.records) == 1 and f"; {cpus} workers" in caplog.text
        caplog.clear()
        assert datasets.data_workers(cpus) == cpus
    assert not caplog.records


def test_a_training_set_of_exactly_one_batch_is_no_problem():
    from smapctl.data.datasets import batch_size_problem

    assert batch_size_problem(4, 4) is None
    assert batch_size_problem(4, 3) == "train.batch_size: 4 is larger than the training set (3 images)"


def test_an_unshuffled_loader_keeps_the_dataset_order():
    from smapctl.data.latents import LatentDataset

    data = LatentDataset(torch.zeros(10, 2), torch.arange(10))  # takes the sampler's keys
    batches = list(make_loader(data, 4, shuffle=False, seed=5))
    assert [labels.tolist() for _, labels in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("start", [0, 7, 10, 23])
def test_sampler_resumes_at_the_exact_position(start):
    full = list(islice(ResumableSampler(10, seed=1), 40))
    assert list(islice(ResumableSampler(10, seed=1, start=start), 40 - start)) == full[start:]
    assert len(ResumableSampler(10, epochs=2, start=start)) == max(0, 20 - start)


def test_sampler_resumes_under_accelerate_sharding():
    n, per_process, processes = 37, 4, 2

    def shard_batches(start, process, count):
        batches = BatchSampler(ResumableSampler(n, seed=5, start=start), per_process, drop_last=True)
        return list(islice(BatchSamplerShard(batches, processes, process), count))

    for process in range(processes):
        uninterrupted = shard_batches(0, process, 30)
        step, global_batch = 11, per_process * processes
        assert shard_batches(step * global_batch, process, 30 - step) == uninterrupted[step:]
    assert shard_batches(0, 0, 5) != shard_batches(0, 1, 5)


def test_loader_batches_do_not_depend_on_workers_or_resuming():
    train = build_datasets(DataConfig(dataset="digits", crop_scale=(0.5, 1.0)), SIZE).train

    def batches(num_workers, start, count):
        loader = make_loader(
            train, 8, shuffle=True, num_workers=num_workers, seed=2, start=start, endless=True
        )
        return list(islice(loader, count))

    reference = batches(0, 0, 6)
    for got, want in zip(batches(2, 0, 6) + batches(0, 3 * 8, 3), reference + reference[3:], strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(reference[0][0], reference[1][0])


# ------------------------------------------------------------------------------------------ skipped files


def test_skips_in_dataloader_workers_are_listed_once_each(folder, tmp_path):
    broken = [folder / "cat" / "bad.png", *add_broken_images(folder / "dog")]
    ds = ImageFolderDataset(folder, eval_transform(SIZE), on_error="skip")
    log = attach_skip_log([ds, torch.zeros(1)], tmp_path / "skipped.txt", fresh=True)
    for _ in range(2):  # two epochs, two workers: each bad file is skipped in several processes
        assert sum(len(y) for _, y in DataLoader(ds, batch_size=3, num_workers=2)) == len(ds)
    assert ds.skipped == set()  # the main process saw nothing: only the shared log knows
    errors = log.read()
    assert sorted(e.path for e in errors) == sorted(map(str, broken))
    assert skip_summary(errors, log.path).startswith(f"skipped 3 unreadable images (list: {log.path}): ")
    assert attach_skip_log([ds], log.path, fresh=True).read() == []  # a fresh run starts a fresh list


def test_skip_summary_and_list_file(tmp_path):
    errors = [BadImageError(tmp_path / f"{i}.png", "empty file (0 bytes)") for i in range(5)]
    assert skip_summary(errors[:1]) == f"skipped 1 unreadable image: {errors[0]}"
    assert skip_summary(errors, "l.txt") == (
        f"skipped 5 unreadable images (list: l.txt): {errors[0]}; {errors[1]}; {errors[2]}; and 2 more"
    )
    listing = write_skip_list(errors, tmp_path / "list.txt")
    with open(listing, "a") as f:
        f.write(f"{tmp_path}/torn")  # a killed writer's last line
    assert [str(e) for e in read_skip_list(listing)] == [str(e) for e in errors]
    assert write_skip_list([], listing) is None and not listing.exists()


def test_a_summary_of_as_many_images_as_it_names_says_no_more(tmp_path):
    errors = [BadImageError(tmp_path / f"{i}.png", "empty file (0 bytes)") for i in range(3)]
    assert skip_summary(errors) == f"skipped 3 unreadable images: {errors[0]}; {errors[1]}; {errors[2]}"


def test_a_list_naming_an_image_twice_keeps_its_first_reason(tmp_path):
    path = tmp_path / "skipped.txt"
    path.write_text("a.png\tempty file (0 bytes)\nb.png\tno such file\na.png\tcannot decode (x)\n")
    errors = read_skip_list(path)
    assert [(e.path, e.reason) for e in errors] == [
        ("a.png", "empty file (0 bytes)"),
        ("b.png", "no such file"),
    ]


def test_a_moved_folder_relocates_its_own_images_not_a_neighbour_sharing_its_name(tmp_path):
    path = tmp_path / "skipped.txt"
    path.write_text(f"{tmp_path}/a/x.png\tempty file (0 bytes)\n{tmp_path}/ab/y.png\tno such file\n")
    errors = read_skip_list(path, moved={f"{tmp_path}/a": f"{tmp_path}/new"})
    assert [e.path for e in errors] == [f"{tmp_path}/new/x.png", f"{tmp_path}/ab/y.png"]


def test_file_names_with_tabs_and_line_breaks_round_trip_through_the_list(tmp_path):
    """The list is one `path<TAB>reason` line per image: such names were cut at their tab or line break."""
    from smapctl.data.skipped import SkipLog

    names = ["a\tb.png", "line\nbreak.png", "back\\slash\\t.png", "form\x0cfeed.png", "plain.png"]
    errors = [BadImageError(tmp_path / name, "empty file (0 bytes)") for name in names]
    log = SkipLog(tmp_path / "list.txt")
    for e in errors:
        log.add(e)
    assert [(str(e.path), e.reason) for e in log.read()] == [(str(e.path), e.reason) for e in errors]
    assert len((tmp_path / "list.txt").read_bytes().split(b"\n")) == len(names) + 1
    # ... and the summary the commands print at the end is one line, as the list's lines are
    said = skip_summary(errors[:2])
    assert len(said.splitlines()) == 1 and f"{tmp_path}/a\\tb.png: " in said and "line\\nbreak.png" in said


def test_a_skip_list_that_is_a_symbolic_link_is_not_written_through(tmp_path):
    """A run folder from elsewhere, resumed, whose skipped-images list is a link to a file anywhere: each
    image the run skipped was appended to that file. The link is replaced by the run's own list."""
    from smapctl.data.skipped import attach_skip_log

    class Folder:
        skip_log = None

    decoy = tmp_path / "elsewhere.txt"
    decoy.write_text("someone else's file\n")
    (tmp_path / "run").mkdir()
    listed = tmp_path / "run" / "skipped.txt"
    listed.symlink_to(decoy)
    log = attach_skip_log([Folder()], listed, fresh=False)  # a resumed run's
    log.add(BadImageError(tmp_path / "a.png", "empty file (0 bytes)"))
    assert decoy.read_text() == "someone else's file\n" and not listed.is_symlink()
    assert [(str(e.path), e.reason) for e in log.read()] == [
        (str(tmp_path / "a.png"), "empty file (0 bytes)")
    ]


def test_file_names_that_are_not_utf8_are_listed_as_their_bytes(tmp_path):
    """A broken file whose name is not valid UTF-8 used to crash the run where it was skipped (the list
    writers encoded strictly); its line now holds the name's own bytes, which open the file."""
    import os

    from smapctl.data.skipped import SkipLog

    _write(tmp_path / "images" / "a" / "good.png", 40)
    bad = os.path.join(os.fsencode(tmp_path / "images" / "a"), b"bad\xff.png")  # sorts before good.png
    with open(bad, "wb") as f:
        f.write(b"junk")
    ds = ImageFolderDataset(tmp_path / "images", eval_transform(SIZE), on_error="skip")
    ds.skip_log = SkipLog(tmp_path / "shared.txt")  # the list the training run's workers share
    ds[0]  # the bad file: skipped, logged
    [error] = ds.skip_log.read()
    listing = write_skip_list([error], tmp_path / "list.txt")  # tokenize's and evaluate's list
    for path in (ds.skip_log.path, listing):
        assert path.read_bytes().split(b"\t")[0] == bad
        [again] = read_skip_list(path)
        assert os.fsencode(again.path) == bad and str(again) == str(error)


def test_token_cache_of_a_folder_counts_skipped_images(tiny_kl_tokenizer, tmp_path, caplog):
    from smapctl.data.latents import encode_dataset
    from smapctl.ops.load import load_tokenizer

    for i, label in enumerate("3377"):
        _write(tmp_path / "images" / label / f"{i}.png", 40 * i)
    broken = add_broken_images(tmp_path / "images" / "7")
    tok = load_tokenizer(tiny_kl_tokenizer)
    listing = tmp_path / "cache.skipped.txt"
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        cache = encode_dataset(tok, str(tmp_path / "images"), False, 4, "cpu", skip_list=listing)
    assert len(cache.labels) == 6  # the folder's six files: a broken one stands in for the next image
    assert f"skipped 2 unreadable images (list: {listing}): {broken[0]}: empty file" in caplog.text
    # The tokenizer's data.on_error: fail holds for its tokens too (it used to be skip, always).
    tok.recipe.data.on_error = "fail"
    with pytest.raises(BadImageError, match="empty file"):
        encode_dataset(tok, str(tmp_path / "images"), False, 4, "cpu")


def test_a_token_cache_that_fails_ends_its_loader_workers_at_once(tiny_kl_tokenizer, tmp_path):
    # A notebook keeps the traceback (sys.last_traceback), and with it the loader's worker processes.

    from smapctl.data.latents import encode_dataset
    from smapctl.ops.load import load_tokenizer

    for i, label in enumerate("3377"):
        _write(tmp_path / "images" / label / f"{i}.png", 40 * i)
    add_broken_images(tmp_path / "images" / "7")
    tok = load_tokenizer(tiny_kl_tokenizer)
    tok.recipe.data.on_error, tok.recipe.data.num_workers = "fail", 1
    with pytest.raises(BadImageError, match="empty file") as failed:
        encode_dataset(tok, str(tmp_path / "images"), False, 4, "cpu")
    assert failed.tb is not None and multiprocessing.active_children() == []


def test_a_fresh_token_cache_lists_the_images_it_skipped(tiny_kl_tokenizer, tmp_path, monkeypatch, caplog):
    """The first cache in an empty $SMAPCTL_CACHE: the list of skipped images went to a folder that did not
    exist yet, so it and the warning were lost (silently: a full disk must not stop the run either)."""
    from smapctl.data.latents import cache_path, load_or_build_latents
    from smapctl.ops.load import load_tokenizer

    for i, label in enumerate("3377"):
        _write(tmp_path / "images" / label / f"{i}.png", 40 * i)
    broken = add_broken_images(tmp_path / "images" / "7")
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "new-cache"))
    tok = load_tokenizer(tiny_kl_tokenizer)
    folder = str(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        load_or_build_latents(tok, folder, False, 4, "cpu")
    cache = cache_path(tok.fingerprint, folder, False)
    listing = cache.with_name(f"{cache.name}.skipped.txt")
    assert f"skipped 2 unreadable images (list: {listing}): {broken[0]}: empty file" in caplog.text
    assert sorted(e.path for e in read_skip_list(listing)) == sorted(map(str, broken))


def test_an_image_rewritten_with_as_many_bytes_has_its_tokens_made_again(tiny_kl_tokenizer, tmp_path, caplog):
    """An image of a folder rewritten in place is a change to it, and its token cache is made again, also
    when the new file has as many bytes as the old (an uncompressed format, a PNG of the same settings):
    its modification time tells, its size alone cannot (the test of a rewrite that changed the size
    passed with the time left out of the folder's digest)."""
    from smapctl.data.latents import load_or_build_latents
    from smapctl.ops.load import load_tokenizer

    def save(path, value):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (value, 255 - value, value)).save(path, compress_level=0)

    for i, label in enumerate("3377"):
        save(tmp_path / "images" / label / f"{i}.png", 40 * i)
    image = tmp_path / "images" / "3" / "0.png"
    long_ago = image.stat().st_mtime_ns - 60 * 10**9  # (a rewrite within the clock's tick keeps the time)
    os.utime(image, ns=(long_ago, long_ago))
    tok = load_tokenizer(tiny_kl_tokenizer)
    folder = str(tmp_path / "images")
    first = load_or_build_latents(tok, folder, False, 4, "cpu")
    size = image.stat().st_size
    save(image, 250)
    assert image.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="smapctl.data"):
        again = load_or_build_latents(tok, folder, False, 4, "cpu")
    assert "changed since their tokens were cached: tokenizing them again" in caplog.text
    assert again.images != first.images and not torch.equal(again.tokens, first.tokens)


# --------------------------------------------------------------------------------------------- latents


def test_a_constant_latent_channel_normalises_to_finite_values():
    from smapctl.data.latents import LatentStats

    tokens = torch.randn(6, 4, 3)
    tokens[..., 1] = 2.5  # a channel the tokenizer never uses
    stats = LatentStats.of(tokens)
    assert stats.std[1] > 0 and torch.isfinite(stats.normalize(tokens)).all()


def test_a_token_cache_of_another_format_version_is_refused(tmp_path):
    from smapctl.data.latents import LatentCache, read_latents, write_latents
    from smapctl.safetensors_io import write_safetensors

    path = tmp_path / "cache.safetensors"
    write_latents(
        path, LatentCache(torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long), "fp", "digits:train")
    )
    assert read_latents(path).fingerprint == "fp"
    tensors = {"tokens": torch.zeros(2, 4, 3), "labels": torch.zeros(2, dtype=torch.long)}
    write_safetensors(path, tensors, {"fingerprint": "fp", "dataset": "digits:train", "version": "1"})
    with pytest.raises(UserError, match="latent cache of another format version; delete it to rebuild"):
        read_latents(path)


def test_generator_tokens_leave_out_only_a_held_out_split_of_the_folder(tmp_path):
    """With a validation folder the tokenizer trained on the whole of data.dataset: all of it is the
    generator's, whatever data.val_fraction says."""
    from smapctl.data.latents import tokenizer_training_data

    folder, val = str(tmp_path / "train"), str(tmp_path / "val")
    assert tokenizer_training_data(DataConfig(dataset=folder, val_fraction=0.2)) == (folder, 0.2)
    assert tokenizer_training_data(DataConfig(dataset=folder, val_dataset=val, val_fraction=0.2)) == (
        folder,
        0.0,
    )
    assert tokenizer_training_data(DataConfig(dataset="digits", val_fraction=0.2)) == ("digits", 0.0)


def test_a_cache_folder_under_a_home_that_is_not_there_is_one_line(monkeypatch):
    # `~name` of no such user was pathlib's RuntimeError traceback, "Could not determine home directory".
    monkeypatch.setenv("SMAPCTL_CACHE", "~no-such-user-of-smapctl/cache")
    with pytest.raises(UserError, match=r"^SMAPCTL_CACHE=~no-such-user-of-smapctl/cache: no home folder of"):
        load_embedded("digits", 9)


def test_a_folders_listing_is_the_same_whatever_the_systems_path_separator(tmp_path, monkeypatch):
    """Windows' `\\` sorted `sub\\x.png` after `subA.png` (`/` before it), so the held-out split was
    another, and every listing digest differed: a run trained on Linux had its folder refused there as
    changed (the digest is in its checkpoints and token caches)."""
    for name in ("a/sub/x.png", "a/subA.png", "a/b.png", "b/deep/er/c.png", "b/d.png"):
        _write(tmp_path / name, 0)
    here = ImageFolderDataset(tmp_path)
    relpath = os.path.relpath
    monkeypatch.setattr(os, "sep", "\\")
    # `os.path.relpath` (ntpath's on Windows) joins the folders it gives with `\\`
    monkeypatch.setattr(os.path, "relpath", lambda *a: relpath(*a).replace("/", "\\"))
    windows = ImageFolderDataset(tmp_path)
    assert (
        windows._paths.tolist()
        == here._paths.tolist()
        == [b"a/b.png", b"a/sub/x.png", b"a/subA.png", b"b/d.png", b"b/deep/er/c.png"]
    )
    assert windows.listing() == here.listing()


# ---------------------------------------------------------------------------- workers and signals

# Run as a script, as pip's `smapctl` console script runs: smapctl.cli imported at the top. Under `spawn`
# each DataLoader worker runs it again first (as `__mp_main__`), then imports torch for seconds; what the
# worker's dataset returns is how SIGINT and SIGTERM stood when it did.
_SPAWNED = """\
import signal, sys
from smapctl.cli import main

AT_START = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), "torch" in sys.modules)


class Report:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        import logging

        logging.getLogger("smapctl.data.unreadable").warning("skipping unreadable image x.png: empty file")
        return repr(AT_START)


if __name__ == "__main__":
    from torch.utils.data import DataLoader

    [[report]] = DataLoader(Report(), batch_size=1, num_workers=1, multiprocessing_context=sys.argv[1])
    print(report)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_spawned_worker_ignores_sigint_and_sigterm_before_it_imports_torch(tmp_path, method):
    """A Ctrl-C (to the whole process group) while a `spawn` worker (macOS, Windows) imported torch killed
    it, and a training with it, with a traceback and no checkpoint. A `forkserver` worker (Python 3.14's
    default on Linux) imports the script as a spawned one does."""
    import subprocess

    script = tmp_path / "smapctl_like.py"
    script.write_text(_SPAWNED)
    done = subprocess.run([sys.executable, script, method], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr((signal.SIG_IGN, signal.SIG_IGN, False))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_spawned_worker_logs_as_the_command_does(tmp_path, method):
    """A `spawn` worker's warnings (the unreadable images it meets, named as met) went to logging's last
    resort: without their level, and on a terminal past the progress bar. (So does a `forkserver` one.)"""
    import subprocess

    script = tmp_path / "smapctl_like.py"
    script.write_text(_SPAWNED)
    done = subprocess.run([sys.executable, script, method], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # (Python's resource tracker, on a loaded machine, may warn of the loader's semaphore as the script
    # exits, "There appear to be 1 leaked semaphore objects": its own two lines, not the worker's.)
    lines = [line for line in done.stderr.splitlines() if "resource_tracker" not in line]
    assert lines == ["WARNING skipping unreadable image x.png: empty file"], done.stderr


def test_forked_dataloader_workers_start_deaf_to_sigint_and_sigterm():
    """Forked workers start with both signals blocked (`deaf_workers`): a SIGTERM to the group of
    `tokenize --workers` killed them, and torch printed a traceback as the command stopped. (A spawned
    worker begins with an empty mask whatever it is here: the test above.)"""
    from smapctl.data.datasets import deaf_workers

    loader = deaf_workers(DataLoader(range(4), batch_size=2, num_workers=1, multiprocessing_context="fork"))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    iterator = iter(loader)
    try:
        [worker] = iterator._workers
        with open(f"/proc/{worker.pid}/status") as f:
            blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        assert all(blocked >> (s - 1) & 1 for s in (signal.SIGINT, signal.SIGTERM))
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # this process's mask is as it was
        assert [b.tolist() for b in iterator] == [[0, 1], [2, 3]]
    finally:
        iterator._shutdown_workers()


def test_the_workers_of_tokenize_and_a_token_cache_start_deaf_to_sigint_and_sigterm(
    tiny_kl_tokenizer, tmp_path, monkeypatch
):
    """`tokenize --workers` and a generator's token cache read their images in workers of loaders of their
    own, which must start with SIGINT and SIGTERM blocked (`deaf_workers`), as the test above checks of a
    loader given to it: nothing checked that they did, and without it a SIGTERM to the command's process
    group would kill them, with torch's traceback as the command stopped. Each image read in a worker here
    notes the worker's blocked signals."""
    from smapctl.data import folder as folder_module
    from smapctl.data.latents import encode_dataset
    from smapctl.ops import inputs
    from smapctl.ops.load import load_tokenizer
    from smapctl.ops.tokenize import tokenize_images

    def noting_the_mask(real):
        def load(path):
            if os.getpid() != main:  # (in a worker)
                with open("/proc/self/status") as f:
                    mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
                blocked = [s for s in (signal.SIGINT, signal.SIGTERM) if mask >> (s - 1) & 1]
                with open(notes, "a") as f:
                    f.write(f"{sorted(int(s) for s in blocked)}\n")
            return real(path)

        return load

    main, notes = os.getpid(), tmp_path / "masks.txt"
    # Forked, as on Linux before Python 3.14, so the workers read the images through the functions below.
    monkeypatch.setattr(
        multiprocessing.context._default_context, "_actual_context", multiprocessing.get_context("fork")
    )
    monkeypatch.setattr(inputs, "load_image", noting_the_mask(inputs.load_image))
    monkeypatch.setattr(folder_module, "load_image", noting_the_mask(folder_module.load_image))
    for i, label in enumerate("3377"):
        _write(tmp_path / "images" / label / f"{i}.png", 40 * i)
    tokenize_images([tmp_path / "images"], tmp_path / "codes.pt", checkpoint=tiny_kl_tokenizer, workers=1)
    assert notes.read_text().splitlines() == ["[2, 15]"] * 4
    notes.unlink()
    tok = load_tokenizer(tiny_kl_tokenizer)
    tok.recipe.data.num_workers = 1
    encode_dataset(tok, str(tmp_path / "images"), False, 4, "cpu")
    assert notes.read_text().splitlines() == ["[2, 15]"] * 4


def test_a_loader_with_workers_is_freed_with_its_dataset_once_let_go():
    """A loader whose workers `deaf_workers` and `record_iterators` watch is freed as soon as it is let go,
    with its dataset: the functions they put in its place held the loader, a cycle that kept it and a
    training's images (data.num_workers > 0) in memory after `train_tokenizer` returned, until Python's
    next full collection."""
    from smapctl.data.datasets import deaf_workers, record_iterators, shutdown_iterators

    dataset = torch.arange(4)
    gone, started = weakref.ref(dataset), []
    loader = DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context="fork")
    record_iterators(deaf_workers(loader), started)
    try:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]  # the iterators are still made and recorded
        assert len(started) == 1
    finally:
        shutdown_iterators(started)
    gc.disable()
    try:
        del dataset, loader
        assert gone() is None
    finally:
        gc.enable()


class _SignalsTheMainProcess(SignalsAsItsSecondWorkerStarts):
    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_signal_while_workers_start_waits_until_they_have_started(method, monkeypatch):
    """A Ctrl-C or SIGTERM while `spawn` or `forkserver` workers (Python 3.14's default on Linux) started
    stopped `tokenize --workers` (or a token cache) half way through starting them, with torch's
    traceback from the half-made iterator and the cut-off worker's. The blocked mask of `deaf_workers`
    holds no signal off the handler once another thread (torch's) can take it: it now waits until every
    worker has started, then the command's handler has it, and the workers are stopped."""
    from smapctl.data.datasets import deaf_workers

    loader = DataLoader(_SignalsTheMainProcess(), batch_size=2, num_workers=2, multiprocessing_context=method)
    with stopped_as_the_second_worker_starts(monkeypatch):
        iter(deaf_workers(loader))


# A fresh process, whose first DataLoader iterator starts multiprocessing's resource tracker and fork server.
_FORKSERVER_MASK = """\
import signal


class Blocked:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        with open("/proc/self/status") as f:
            mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        return [s for s in (signal.SIGINT, signal.SIGTERM) if mask >> (s - 1) & 1]


if __name__ == "__main__":
    import sys

    from torch.utils.data import DataLoader

    from smapctl.data.datasets import deaf_workers

    loader = DataLoader(Blocked(), batch_size=None, num_workers=1, multiprocessing_context=sys.argv[1])
    [blocked] = deaf_workers(loader)
    here = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print(sorted(int(s) for s in blocked), sorted(int(s) for s in here))
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_forkserver_and_spawned_workers_start_deaf_to_sigint_and_sigterm(tmp_path, method):
    """Under `forkserver` (Python 3.14's default on Linux) the first workers' start also started the
    resource tracker, which unblocked SIGINT and SIGTERM as it returned: the fork server and every worker
    forked from it had neither blocked, and a Ctrl-C or SIGTERM as a worker started killed it, with
    torch's traceback from the half-made iterator (`tokenize --workers`, a token cache, `evaluate`)."""
    import subprocess

    script = tmp_path / "first_loader.py"
    script.write_text(_FORKSERVER_MASK)
    done = subprocess.run([sys.executable, script, method], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("] [") == ["[2, 15", "]\n"]  # the worker's mask; this process's, as it was


# Forces `spawn` in every Python process started with it on the path, and has each spawned process write
# how SIGINT and SIGTERM stood (ignored?) and whether torch was imported once it had imported the main
# module, before it took its work.
_SPAWN_SITE = """\
import multiprocessing, multiprocessing.spawn as spawn, os, signal, sys

multiprocessing.set_start_method("spawn")
_prepare = spawn.prepare


def prepare(data):
    _prepare(data)
    with open(os.path.join(os.environ["SPAWN_REPORTS"], str(os.getpid())), "w") as f:
        f.write(repr(tuple(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))))


spawn.prepare = prepare
"""


def test_python_m_smapctl_sets_up_its_spawned_workers_too(tiny_kl_tokenizer, tmp_path):
    """`python -m smapctl` under `spawn` (macOS, Windows): a spawned worker imports the program's main
    module first, but multiprocessing skips a package's `__main__`, so the workers of `python -m smapctl`
    (not those of the `smapctl` script) went without smapctl.cli's set-up: a Ctrl-C to the group while
    they imported torch killed them (and the command with them) with a traceback."""
    import subprocess

    from tiny_tokenizer import subprocess_env

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SPAWN_SITE)
    (tmp_path / "reports").mkdir()
    for i in range(2):
        _write(tmp_path / "images" / "0" / f"{i}.png", i)
    args = ["tokenize", tmp_path / "images", "-o", tmp_path / "codes.pt", "--checkpoint", tiny_kl_tokenizer]
    path = os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)
    env = subprocess_env(PYTHONPATH=path, SPAWN_REPORTS=str(tmp_path / "reports"))
    done = subprocess.run(
        [sys.executable, "-m", "smapctl", *map(str, args), "--workers", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    reports = [p.read_text() for p in (tmp_path / "reports").iterdir()]
    assert reports == [repr((True, True))]  # one worker, both signals ignored before it took its work
