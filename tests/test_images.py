"""Image loading (every colour mode, every way a file can be broken), finding files, transforms, PNGs."""

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import shallow_recursion_limit
from PIL import Image
from torchvision.transforms import v2

from smapctl.data.images import (
    BadImageError,
    apply_transform,
    eval_frame,
    eval_transform,
    find_images,
    load_image,
    make_grid,
    save_png,
    to_signed_float,
    to_uint8,
    train_transform,
)
from smapctl.errors import UserError


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# ----------------------------------------------------------------------------------------- colour modes


def test_greyscale_becomes_rgb(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.size == (5, 4)
    assert (pixels(img) == 77).all()


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (4, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putdata([0, 1, 0, 1])
    img.save(tmp_path / "p.png", transparency=0)  # red is transparent
    out = pixels(load_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode,key,other", [("RGB", (200, 0, 0), (0, 0, 90)), ("L", 30, 90)])
def test_colour_key_transparency_is_composited_on_white(tmp_path, mode, key, other):
    """A PNG colour key (tRNS on an RGB or greyscale image): pixels of that colour are transparent."""
    img = Image.new(mode, (2, 1))
    img.putdata([key, other])
    img.save(tmp_path / "k.png", transparency=key)
    out = pixels(load_image(tmp_path / "k.png"))[0]
    assert out[0].tolist() == [255, 255, 255]
    assert out[1].tolist() == list(other) if mode == "RGB" else [other] * 3


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)])  # transparent, opaque, half
    img.convert(mode).save(tmp_path / "a.png")
    out = pixels(load_image(tmp_path / "a.png"))[0]
    assert out[0].tolist() == [255, 255, 255]
    assert out[1].tolist() == [0, 0, 0]
    assert abs(int(out[2, 0]) - 127) <= 1


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (2, 2), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan
    assert (pixels(load_image(tmp_path / "c.tif")) == [0, 255, 255]).all()


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    img = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert img.mode == "I;16"
    img.save(tmp_path / "deep.png")
    out = pixels(load_image(tmp_path / "deep.png"))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_16_bit_levels_of_8_bit_values_read_back_as_those_values(tmp_path):
    """v * 257 is how an 8-bit level v is written in 16 bits (65535 = 255 x 257): it reads back as v."""
    levels = np.array([[0, 1, 127, 128, 200, 254, 255]], dtype=np.uint16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")
    assert pixels(load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == levels[0].tolist()


def test_16_bit_colour_key_is_composited_on_white(tmp_path):
    """A 16-bit greyscale PNG's colour key was ignored (its clear pixels came out black)."""
    img = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    img.save(tmp_path / "deep.png", transparency=0)
    with Image.open(tmp_path / "deep.png") as saved:
        assert saved.info.get("transparency") == 0
    out = pixels(load_image(tmp_path / "deep.png"))
    assert out[0, :, 0].tolist() == [255, 100, 255]


def test_32_bit_int_and_float_images(tmp_path):
    Image.fromarray(np.array([[0, 257 * 50, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert pixels(load_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 50, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert pixels(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (8, 4), (255, 0, 0))
    wide.paste((0, 0, 255), (4, 0, 8, 4))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    wide.save(tmp_path / "rot.png", exif=exif)
    out = pixels(load_image(tmp_path / "rot.png"))
    assert out.shape == (8, 4, 3)  # now tall
    assert (out[:4] == [255, 0, 0]).all() and (out[4:] == [0, 0, 255]).all()  # left went to the top


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as saved:
        assert saved.n_frames == 2
    out = pixels(load_image(tmp_path / "anim.gif"))
    assert (out == [255, 0, 0]).all()


# ----------------------------------------------------------------------------------------- broken files


def _noise(size=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bad_file(tmp_path, case: str):
    if case == "empty":
        (tmp_path / "empty.png").write_bytes(b"")
        return tmp_path / "empty.png", "empty file"
    if case == "text":
        (tmp_path / "text.png").write_text("hello, I am not a picture\n")
        return tmp_path / "text.png", "not an image"
    if case in ("jpeg", "png"):
        path = tmp_path / f"cut.{case}"
        _noise().save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if case == "bomb":  # the header claims 10^10 pixels; nothing of that size is ever allocated
        (tmp_path / "bomb.png").write_bytes(_png_header(100_000, 100_000))
        return tmp_path / "bomb.png", "too large"
    if case == "mild_bomb":  # above PIL's warning threshold, below its error threshold
        (tmp_path / "mild.png").write_bytes(_png_header(10_000, 10_000))
        return tmp_path / "mild.png", "too large"
    if case == "missing":
        return tmp_path / "nowhere.png", "no such file"
    if case == "folder":
        (tmp_path / "dir.png").mkdir()
        return tmp_path / "dir.png", "not a regular file"
    if case == "broken_link":  # listed by the folder, so "no such file" contradicted the listing
        (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
        return tmp_path / "link.png", "a broken symbolic link"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["empty", "text", "jpeg", "png", "bomb", "mild_bomb", "missing", "folder", "broken_link"]
)
def test_bad_files_raise_one_line_errors_naming_the_path(tmp_path, case):
    path, reason = _bad_file(tmp_path, case)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    err = info.value
    assert isinstance(err, UserError)
    assert err.path == str(path) and reason in err.reason
    assert str(err).startswith(f"{path}: ") and "\n" not in str(err)


@pytest.mark.parametrize("fmt, name", [("PNG", "photo.jpg"), ("JPEG", "photo.png"), ("PNG", "photo.dat")])
def test_wrong_extension_is_read_by_its_content(tmp_path, fmt, name):
    _noise(24).save(tmp_path / name, format=fmt)
    image = load_image(tmp_path / name)
    assert image.mode == "RGB" and image.size == (24, 24)
    if fmt == "PNG":  # lossless: the very pixels
        assert np.array_equal(np.asarray(image), np.asarray(_noise(24)))


def test_bad_image_error_survives_a_dataloader_worker_round_trip():
    # torch re-raises worker errors as type(err)(formatted traceback); the one-line message must survive
    original = BadImageError("/data/cat/x.png", "truncated or corrupt image data (oops)")
    traceback_text = (
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "folder.py", line 1, in _read\n'
        f"smapctl.data.images.BadImageError: {original}\n"
    )
    rebuilt = BadImageError(traceback_text)
    assert str(rebuilt) == str(original) and rebuilt.path == original.path


# ------------------------------------------------------------------------------------------ find_images


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ["a/x.png", "a/sub/y.JPEG", "a/.hidden.png", "a/._x.png", "b.png"]:
        _noise(4).save(tmp_path / rel, format="PNG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    return tmp_path


def _spelled(*paths) -> list[str]:
    return [str(p) for p in paths]


def test_find_images_folders_are_recursive_sorted_and_skip_junk(tree):
    assert find_images([tree / "a"]) == _spelled(tree / "a/sub/y.JPEG", tree / "a/x.png")


def test_hidden_folders_are_not_searched(tree):
    """A folder's hidden sub-folders (.thumbnails, .git, a trash folder) hold no dataset images."""
    from smapctl.data.images import scan_relative

    (tree / "a" / ".thumbnails").mkdir()
    _noise(4).save(tree / "a" / ".thumbnails" / "x.png", format="PNG")
    assert find_images([tree / "a"]) == _spelled(tree / "a/sub/y.JPEG", tree / "a/x.png")
    assert scan_relative(tree / "a") == ["sub/y.JPEG", "x.png"]


def test_a_folder_deeper_than_the_recursion_limit_is_listed(tmp_path):
    """An image 1,000 folders deep ended `tokenize` (and a training's listing) with a RecursionError
    traceback on Python 3.11, whose os.walk recurses once per level."""
    from smapctl.data.images import scan_relative

    top, levels = tmp_path / "top", 200
    (top / ("d/" * levels)).mkdir(parents=True)
    _noise(4).save(top / ("d/" * levels) / "x.png", format="PNG")
    _noise(4).save(top / "y.png", format="PNG")
    name = "d/" * levels + "x.png"
    with shallow_recursion_limit():
        assert scan_relative(top) == [name, "y.png"]
        assert find_images([str(top)]) == [f"{top}/{name}", f"{top}/y.png"]
        with pytest.raises(UserError, match=r"go too deep for a pattern to list .* give the folder itself"):
            find_images([f"{top}/**/*.png"])  # glob's `**` recurses: a line, not a traceback


def test_a_folder_that_cannot_be_read_is_said_not_left_out_in_silence(tree, monkeypatch, caplog):
    """A class folder without read permission: the listing (os.walk's) left its images out of a training
    or a `tokenize` without a word."""
    from smapctl.data.images import scan_relative

    real = os.scandir

    def scandir(path):
        if os.fspath(path).endswith(f"{os.sep}sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING):
        assert scan_relative(tree / "a") == ["x.png"]
    said = f"{tree / 'a' / 'sub'}: cannot be read (Permission denied); its images are left out"
    assert caplog.messages == [said]


def test_find_images_keeps_input_order_and_drops_duplicates(tree):
    found = find_images([str(tree / "b.png"), str(tree / "a"), str(tree / "a/x.png")])
    assert found == _spelled(tree / "b.png", tree / "a/sub/y.JPEG", tree / "a/x.png")


def test_find_images_drops_duplicates_reached_through_linked_folders(tree):
    (tree / "link-to-a").symlink_to(tree / "a", target_is_directory=True)
    found = find_images(
        [str(tree / "a"), str(tree / "link-to-a"), str(tree / "a/x.png"), str(tree / "b.png")]
    )
    assert found == _spelled(tree / "a/sub/y.JPEG", tree / "a/x.png", tree / "b.png")


def test_a_linked_file_is_an_image_of_its_own_folder(tree):
    """An image linked into another class folder is a sample of that class too, as training sees it;
    it used to be dropped as a duplicate of its target, so tokenize gave it the first path's class only."""
    (tree / "a" / "sub" / "alias.png").symlink_to(tree / "b.png")
    found = find_images([str(tree / "a"), str(tree / "b.png")])
    assert found == _spelled(
        tree / "a/sub/alias.png", tree / "a/sub/y.JPEG", tree / "a/x.png", tree / "b.png"
    )


def test_folder_scan_follows_linked_folders_but_walks_each_once(tree, tmp_path):
    """A class folder may be a link into another tree; a link back to a folder above (a loop) used to
    list that folder's images about 40 times over, weighting its class 40-fold."""
    from smapctl.data.images import scan_relative

    before = scan_relative(tree)
    (tree / "a" / "sub" / "back-up").symlink_to(tree / "a", target_is_directory=True)
    (tree / "a" / "self").symlink_to(tree / "a", target_is_directory=True)
    assert scan_relative(tree) == before
    elsewhere = tmp_path / "elsewhere" / "c"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(elsewhere / "z.png")
    (tree / "linked-class").symlink_to(elsewhere, target_is_directory=True)
    assert scan_relative(tree) == sorted([*before, os.path.join("linked-class", "z.png")])


def test_real_folders_resolve_as_os_path_realpath(tree, monkeypatch):
    """`find_images` resolves each folder once (`_RealFolders`); every file must get realpath's answer
    for its folder, and keep its own name."""
    from smapctl.data.images import _RealFolders

    (tree / "link-to-a").symlink_to(tree / "a", target_is_directory=True)
    (tree / "a" / "alias.png").symlink_to(tree / "b.png")
    (tree / "a" / "dangling.png").symlink_to(tree / "nowhere.png")
    (tree / "a" / "loop.png").symlink_to(tree / "a" / "loop.png")
    monkeypatch.chdir(tree / "a")
    paths = [
        tree / "a/x.png",
        tree / "link-to-a/sub/y.JPEG",
        tree / "link-to-a/alias.png",
        tree / "a/dangling.png",
        tree / "a/loop.png",
        tree / "a/sub/../x.png",
        tree / "link-to-a/sub/../x.png",
        "x.png",
        "sub/y.JPEG",
        "../b.png",
        "missing.png",
        ".",
        "..",
    ]
    real = _RealFolders()

    def expected(p):
        folder, name = os.path.split(os.fspath(p))
        if name in ("", ".", ".."):
            return os.path.realpath(p)
        return os.path.join(os.path.realpath(folder or "."), name)

    assert [real(p) for p in paths] == [expected(p) for p in paths]
    assert real(tree / "link-to-a/alias.png") == str(tree.resolve() / "a" / "alias.png")  # not b.png


def test_find_images_globs(tree):
    assert find_images([str(tree / "a" / "*.png")]) == _spelled(tree / "a/x.png")
    assert find_images([str(tree / "**" / "*.JPEG")]) == _spelled(tree / "a/sub/y.JPEG")
    # A file named explicitly is kept whatever its suffix.
    assert find_images([str(tree / "a" / "notes.txt")]) == _spelled(tree / "a/notes.txt")


def test_find_images_spells_paths_as_pathlib_does(tree, monkeypatch):
    """`find_images` makes its paths as strings (a `Path` per file was half of listing ImageNet); they
    must read as `pathlib` spells them, as they did when they were `Path`s: in errors, skipped-image lists
    and the token file's paths."""
    (tree / "a" / "sub" / "deeper").mkdir()
    _noise(4).save(tree / "a" / "sub" / "deeper" / "z.png", format="PNG")
    monkeypatch.chdir(tree)
    monkeypatch.setenv("HOME", str(tree / "a"))
    one = "a ./a a/ a//sub ./a/./sub/ . ~ ~/sub/ a/sub/.. a/x.png ./a/x.png a//x.png ~/x.png *.png ./*.png"
    one += " a//*.png ./a/**/*.png **/ ./a/sub/* ~/**/*.JPEG"
    spellings = [[i] for i in one.split()] + [[""], [str(tree / "a")], [f"{tree}//a/./sub"]]
    spellings.append(["./a", "a/x.png", "b.png"])
    for inputs in spellings:
        found = find_images(inputs)
        assert all(isinstance(p, str) and p == str(Path(p)) for p in found), (inputs, found)
        assert len(set(found)) == len(found), inputs


@pytest.mark.parametrize(
    "rel, message",
    [("missing", "no such file or folder"), ("*.gif", "no files match"), ("empty", "no images")],
)
def test_find_images_errors(tree, rel, message):
    with pytest.raises(UserError, match=message):
        find_images([str(tree / rel)])


def test_a_special_file_named_as_an_input_is_said_for_what_it_is(tmp_path):
    """A named pipe or a broken link given by name (`tokenize x.png`) was "no such file or folder", of a
    file `ls` lists; it is kept as a file named explicitly is, and reading it says what it is."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    for name, reason in (("pipe.png", "not a regular file"), ("link.png", "a broken symbolic link")):
        assert find_images([tmp_path / name]) == [str(tmp_path / name)]
        with pytest.raises(BadImageError, match=f"^{tmp_path / name}: {reason}$"):
            load_image(tmp_path / name)


# ------------------------------------------------------------------------------------------- transforms


def test_to_uint8_inverts_the_loader_scaling_exactly():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    signed = v2.Normalize([0.5] * 3, [0.5] * 3)(values.float() / 255)
    assert torch.equal(to_uint8(signed), values)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_eval_transform_is_identity_on_images_of_the_right_size():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = eval_transform(16)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    assert torch.equal(to_uint8(out), image)


def test_eval_transform_frames_like_resize_then_centre_crop():
    y, x = torch.meshgrid(torch.linspace(0, 1, 60), torch.linspace(0, 1, 90), indexing="ij")
    smooth = (torch.stack([x, y, x * y]) * 255).round().to(torch.uint8)  # (3, 60, 90)
    ours = eval_transform(20)(smooth)
    reference = v2.Compose(
        [v2.Resize(20, antialias=True), v2.CenterCrop(20), v2.ToDtype(torch.float32, scale=True)]
    )
    assert (ours - (reference(smooth) * 2 - 1)).abs().mean() < 0.02


def test_eval_transform_handles_extreme_aspect_ratios():
    """A 3000 x 1 image (and 1 x 3000): its centred 1 x 1 square, of the red middle, resized to 16 x 16;
    not the blue ends squeezed in."""
    red = torch.tensor([200, 10, 30], dtype=torch.uint8)[:, None, None].expand(3, 16, 16)
    for size, middle in (((3000, 1), (1450, 0, 1550, 1)), ((1, 3000), (0, 1450, 1, 1550))):
        image = Image.new("RGB", size, (0, 0, 255))
        image.paste((200, 10, 30), middle)
        out = eval_transform(16)(image)
        assert out.shape == (3, 16, 16)
        assert torch.equal(to_uint8(out), red)


def test_framing_as_uint8_then_converting_the_batch_equals_eval_transform_bit_for_bit():
    images = [
        _noise(40),
        Image.new("RGB", (37, 23), (200, 10, 90)),
        torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8),
    ]
    framed = [eval_frame(16)(image) for image in images]
    assert all(type(f) is torch.Tensor and f.dtype == torch.uint8 and f.shape == (3, 16, 16) for f in framed)
    batch = to_signed_float(torch.stack(framed))
    assert type(batch) is torch.Tensor
    assert torch.equal(batch, torch.stack([eval_transform(16)(image) for image in images]))


@pytest.mark.parametrize(
    "image",
    [
        _noise(40),
        Image.new("RGB", (37, 23), (200, 10, 90)),
        torch.randint(0, 256, (3, 24, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
        torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
    ],
    ids=["pil-square", "pil-wide", "tensor-tall", "tensor-at-size"],
)
def test_eval_frame_equals_torchvisions_crop_and_resize_bit_for_bit(image):
    """`Frame` calls torchvision's kernels directly; its pixels are those of v2's own transforms."""
    reference = v2.ToImage()(image)
    reference = v2.CenterCrop(min(reference.shape[-2:]))(reference)
    reference = v2.Resize((16, 16), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(reference)
    framed = eval_frame(16)(image)
    assert type(framed) is torch.Tensor and framed.dtype == torch.uint8
    assert torch.equal(framed, reference.as_subclass(torch.Tensor))


def test_train_transform_without_randomness_equals_eval():
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    train = train_transform(16, crop_scale=(1.0, 1.0), hflip=False)
    frame = apply_transform(train, image, 5)
    assert type(frame) is torch.Tensor and frame.dtype == torch.uint8
    assert torch.equal(frame, eval_frame(16)(image))


def test_seeded_augmentation_is_reproducible_and_leaves_the_global_rng_alone():
    image = _noise(40)
    tf = train_transform(16, crop_scale=(0.3, 1.0), hflip=True)
    state = torch.get_rng_state()
    a, b, c = (apply_transform(tf, image, s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8


@pytest.mark.parametrize("hflip", [False, True])
def test_train_transform_equals_torchvisions_own_pipeline_bit_for_bit(hflip):
    """`train_transform` (`RandomCropFlip`) calls torchvision's kernels directly, and the training loop
    converts its uint8 frames per batch (`to_signed_float`): the same draws, the same pixels and the same
    floats as the v2 transforms they replace, for PIL and tensor inputs of any shape."""
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                16,
                (0.3, 1.0),
                ratio=(3 / 4, 4 / 3),
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            *([v2.RandomHorizontalFlip()] if hflip else []),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
            v2.ToPureTensor(),
        ]
    )
    ours = train_transform(16, crop_scale=(0.3, 1.0), hflip=hflip)
    images = [
        _noise(40),
        Image.new("RGB", (37, 23), (200, 10, 90)),
        torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8),
        torch.randint(0, 256, (3, 50, 31), dtype=torch.uint8),
    ]
    distinct = set()
    for seed in range(12):
        frames = [apply_transform(ours, image, seed) for image in images]
        assert all(type(f) is torch.Tensor and f.dtype == torch.uint8 for f in frames)
        want = torch.stack([apply_transform(reference, image, seed) for image in images])
        assert torch.equal(to_signed_float(torch.stack(frames)), want), seed
        distinct.add(torch.equal(frames[3], apply_transform(ours, images[3], 0)))
    assert len(distinct) == 2  # the seeds did draw different crops


# ---------------------------------------------------------------------------------------------- saving


def test_save_png_round_trips_and_makes_grids(tmp_path):
    image = torch.rand(3, 5, 7) * 2 - 1
    save_png(image, tmp_path / "out" / "one.png")
    assert np.array_equal(
        np.asarray(load_image(tmp_path / "out" / "one.png")), to_uint8(image).permute(1, 2, 0)
    )
    save_png(torch.rand(5, 3, 8, 8) * 2 - 1, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 per row, padding 2
    assert make_grid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), nrow=4).shape == (3, 12, 42)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "out"]  # no temporary files left


def test_save_png_refuses_other_formats(tmp_path):
    with pytest.raises(UserError, match="PNG"):
        save_png(torch.zeros(3, 4, 4), tmp_path / "x.jpg")
