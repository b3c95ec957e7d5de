"""`smapctl tokenize digits:val`: a built-in dataset by name, its images as `evaluate --data` frames them,
labelled by its classes and named `digits/val/<class>/<index>.png`, so `decode` writes a folder per class."""

import os
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import run_cli

from smapctl.data.datasets import build_eval_dataset, embedded_split
from smapctl.data.images import save_png
from smapctl.errors import UserError
from smapctl.ops import tokenize
from smapctl.ops.codes import load_codes
from smapctl.ops.decode import decode_codes
from smapctl.ops.load import load_tokenizer
from smapctl.ops.tokenize import tokenize_images


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """A working directory without a file or folder named like a built-in dataset."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def written_out(spec: str, root: Path) -> Path:
    """The images of `spec` at 16 px as PNGs in `root/digits/<split>/<class>/<index>.png`."""
    data = embedded_split(spec, 16)
    for i, (image, y) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        save_png(image, root / data.name / data.split / data.class_names[y] / f"{i:05d}.png")
    return root


@pytest.mark.parametrize("tok", ["tiny_kl_tokenizer", "tiny_vq_tokenizer"])
def test_a_builtin_split_is_tokenized_as_its_images_written_out(cwd, request, tok):
    """The tokens of `digits:val` are those of the same images written out as PNGs in class folders and
    tokenized as files, bit for bit (the PNGs hold the 16 px uint8 pixels, which the framing leaves be;
    the rows come in another order, the split's against the folders', and match by path); and those of
    the frames `evaluate --data digits:val` encodes."""
    tok = request.getfixturevalue(tok)
    codes = tokenize_images(["digits:val"], cwd / "codes.pt", checkpoint=tok, batch_size=32).codes
    data = embedded_split("digits:val", 16)
    n = len(data.labels)
    assert codes.paths[:2] == [
        f"digits/val/{data.class_names[y]}/{i:05d}.png" for i, y in enumerate(data.labels[:2].tolist())
    ]
    assert len(codes.paths) == n == 179 and codes.class_names == [str(d) for d in range(10)]
    assert torch.equal(codes.labels, data.labels)  # the tokenizer's classes are the dataset's

    files = tokenize_images(
        [written_out("digits:val", cwd / "tree")], cwd / "files.pt", checkpoint=tok, batch_size=32
    ).codes
    assert sorted(files.paths) == sorted(codes.paths)  # the same names: the tree's relative paths
    row = {p: i for i, p in enumerate(files.paths)}
    order = torch.tensor([row[p] for p in codes.paths])
    assert torch.equal(files.labels[order], codes.labels)
    assert torch.equal(files.tokens[order], codes.tokens)

    # What evaluate reads: build_eval_dataset's float frames, encoded in the same batches.
    loaded = load_tokenizer(tok, "ema", "cpu")
    frames = build_eval_dataset("digits:val", 16, loaded.class_names)
    x = torch.stack([frames[i][0] for i in range(n)])
    with torch.inference_mode():
        direct = torch.cat(
            [
                tokenize.encode_tokens(loaded.model, x[s : s + 32], data.labels[s : s + 32], 8)
                for s in range(0, n, 32)
            ]
        )
    assert torch.equal(direct, codes.tokens)

    # `digits` is its held-out split: the same images, the same file.
    same = tokenize_images(["digits"], cwd / "same.pt", checkpoint=tok, batch_size=32).codes
    assert same.paths == codes.paths and torch.equal(same.tokens, codes.tokens)


def test_decode_writes_a_folder_per_class(cwd, tiny_vq_tokenizer):
    out = cwd / "codes.safetensors"
    tokenize_images(["digits:val"], out, checkpoint=tiny_vq_tokenizer, prefix=4)
    result = decode_codes(out, cwd / "recon")
    data = embedded_split("digits:val", 16)
    expected = {
        cwd / "recon" / "digits" / "val" / data.class_names[y] / f"{i:05d}.png"
        for i, y in enumerate(data.labels.tolist())
    }
    assert set(result.files) == expected and all(f.is_file() for f in expected)
    assert sorted(p.name for p in (cwd / "recon" / "digits" / "val").iterdir()) == [str(d) for d in range(10)]


def test_the_training_split_and_resume(cwd, tiny_kl_tokenizer, monkeypatch):
    """`digits:train` (1,618 images) interrupted goes on with --resume to the file of an uninterrupted
    run; another split is other images to a resume."""
    expected = tokenize_images(["digits:train"], cwd / "all.pt", checkpoint=tiny_kl_tokenizer, batch_size=512)
    assert len(expected.codes.paths) == 1618 and expected.codes.paths[0].startswith("digits/train/")
    real, calls = tokenize.encode_tokens, []

    def encode(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = cwd / "codes.pt"
    with monkeypatch.context() as m:
        m.setattr(tokenize, "encode_tokens", encode)
        with pytest.raises(KeyboardInterrupt):
            tokenize_images(["digits:train"], out, checkpoint=tiny_kl_tokenizer, batch_size=512)
    with pytest.raises(UserError, match=r"--resume: its images \(their paths, order or labels\) differ"):
        tokenize_images(["digits:val"], out, checkpoint=tiny_kl_tokenizer, batch_size=512, resume=True)
    calls.clear()
    monkeypatch.setattr(tokenize, "encode_tokens", encode)
    result = tokenize_images(["digits:train"], out, checkpoint=tiny_kl_tokenizer, batch_size=512, resume=True)
    assert result.resumed == 1024 and calls == [512, 82]
    codes = load_codes(out)
    assert codes.paths == expected.codes.paths and torch.equal(codes.tokens, expected.codes.tokens)
    assert torch.equal(codes.labels, expected.codes.labels)


def test_cli(cwd, tiny_kl_tokenizer, capsys):
    """The command line takes the name; a file or folder of that name wins; a mix with files, an unknown
    split, another dataset's classes and an unknown name are one-line errors."""
    ck = tiny_kl_tokenizer
    code, out, err = run_cli(capsys, "tokenize", "digits:val", "-o", cwd / "codes.pt", "--checkpoint", ck)
    assert code == 0, err
    assert "179 images -> latents 179x8x16" in out.replace("\n", " ")
    assert load_codes(cwd / "codes.pt").paths[0].startswith("digits/val/")

    save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), cwd / "digits" / "3" / "a.png")  # ./digits wins
    code, _, err = run_cli(capsys, "tokenize", "digits", "-o", cwd / "folder.pt", "--checkpoint", ck)
    assert code == 0, err
    assert load_codes(cwd / "folder.pt").paths == ["3/a.png"]
    os.rename(cwd / "digits", cwd / "moved")

    cases = [
        (
            ["digits:val", cwd / "moved"],
            f"digits:val: a built-in dataset is tokenized alone, not with {cwd}/moved",
        ),
        (["digits:test"], "digits:test: the split must be 'train' or 'val'"),
        (["photos:val"], "photos:val: its classes (astronaut, chelsea,"),
        (["digitz"], "no such file or folder: digitz"),
    ]
    for inputs, message in cases:
        code, _, err = run_cli(capsys, "tokenize", *inputs, "-o", cwd / "x.pt", "--checkpoint", ck)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and message in lines[0], (inputs, err)
    err = run_cli(capsys, "tokenize", "photos", "-o", cwd / "x.pt", "--checkpoint", ck)[2]
    assert "are not the tokenizer's (0, 1, 2" in err
    assert not (cwd / "x.pt").exists()
