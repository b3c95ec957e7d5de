"""Token files: what `tokenize` writes is read back as written, and a file that is not one (made or edited
by hand, foreign, a pickle) is refused in one line without being run."""

from pathlib import Path

import pytest
import torch
from faults import PicklePayload
from safetensors import safe_open
from tiny_tokenizer import error_lines, run_cli

from smapctl.errors import UserError
from smapctl.ops.codes import first_not_finite, load_codes
from smapctl.ops.tokenize import tokenize_images


def test_malicious_codes_file_is_refused_and_never_run(tmp_path):
    from smapctl.ops.codes import load_codes

    target = tmp_path / "pwned.txt"
    evil = tmp_path / "codes.pt"
    torch.save({"format": "smapctl-codes", "labels": PicklePayload(target)}, evil)
    with pytest.raises(UserError, match="refused to load"):
        load_codes(evil)
    assert not target.exists()


def test_a_malicious_file_where_tokenize_writes_is_refused_and_never_run(tmp_path):
    """`tokenize -o` reads the file it would replace to tell a token file (replaced with --overwrite) from
    another; that look is `weights_only` too, and no test held it: a pickle there would have run as
    the look unpickled it. It is another file, refused, and never run."""
    from smapctl.ops.codes import check_codes_out

    target = tmp_path / "pwned.txt"
    evil = tmp_path / "codes.pt"
    torch.save({"format": "smapctl-codes", "labels": PicklePayload(target)}, evil)
    with pytest.raises(UserError, match="exists and is not a token file"):
        check_codes_out(evil, overwrite=True)
    assert not target.exists() and evil.is_file()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(indices=d["indices"] + 1000), "inconsistent token file (indices 10"),
        # the first index past the codebook of 64 (0..63), not only one far past it
        (lambda d: d["indices"].__setitem__((0, 0), 64), "..64, codebook of 64)"),
        (lambda d: d.update(labels=d["labels"].float()), "labels: torch.float32"),
        (lambda d: d.update(labels=d["labels"][:, None]), "labels: torch.int64 (7, 1)"),
        # -1 is the one label below 0 a file may hold (no class): -2 is no class id
        (lambda d: d["labels"].__setitem__(0, -2), "inconsistent token file (labels -2..7, 10 classes)"),
        (lambda d: d.update(paths="abcdefg"), "paths: expected a list of relative paths"),
        (lambda d: d.update(paths=["a\0b", *d["paths"][1:]]), "paths: expected a list of relative paths"),
        (lambda d: d.update(paths=[d["paths"][1], *d["paths"][1:]]), "the path '1/1.png' is there twice"),
        (lambda d: d.update(indices=None), "indices: <class 'NoneType'>"),
        # integers torch's embedding cannot look up (a traceback from the model)
        (lambda d: d.update(indices=d["indices"].to(torch.uint8)), "indices: torch.uint8 (7, 8); expected"),
        (lambda d: d.update(indices=d["indices"] > 0), "indices: torch.bool (7, 8); expected"),
        # tracebacks from torch: a sparse or `meta` tensor (torch.load keeps its device), latents in fp8
        (lambda d: d.update(indices=d["indices"].to_sparse()), "indices: torch.int64 (7, 8) sparse_coo;"),
        (lambda d: d.update(labels=d["labels"].to("meta")), "labels: torch.int64 (7,) on meta;"),
        (
            lambda d: d.update(latents=d.pop("indices")[..., None].to(torch.float8_e4m3fn)),
            "latents: torch.float8_e4m3fn (7, 8, 1);",
        ),
        (lambda d: d.update(prefix="8"), "prefix: '8'"),
        (lambda d: d.update(checkpoint=5), "checkpoint: 5"),  # a TypeError traceback
        (lambda d: d.update(checkpoint="x" * 5000), "made by the tokenizer xxx"),  # an OSError traceback
        (lambda d: d.update(weights="best"), "weights: 'best'"),
        (lambda d: d.update(regularizer="fsq"), "regularizer: 'fsq'"),
        (lambda d: d.update(fingerprint=None), "fingerprint: None"),
        (
            lambda d: d.update(class_names=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            "class_names: expected a list of names",
        ),
        (lambda d: d.update(version="1"), "token file version '1'; this smapctl reads 1"),  # said "version 1"
        (lambda d: d.update(version=True), "token file version True; this smapctl reads 1"),  # True == 1
        # one of a newer smapctl says what to do
        (
            lambda d: d.update(version=2),
            "token file version 2; this smapctl reads 1 (a newer smapctl wrote it: upgrade smapctl",
        ),
        # the field that is wrong is named (it said "7 labels, 7 paths", which agree)
        (lambda d: d.update(indices=d["indices"][:5]), "(indices of shape (5, 8), 7 labels, 7 paths)"),
        # more tokens per image than the tokenizer has, agreeing with a prefix edited to match
        (
            lambda d: d.update(indices=d["indices"].repeat(1, 2), prefix=16),
            "inconsistent token file (16 tokens per image, prefix 16 of 8)",
        ),
        # a file of its own agreeing with itself, not with the tokenizer (a traceback from the model)
        (
            lambda d: d.update(indices=d["indices"][:, :4], prefix=4, num_tokens=4),
            "inconsistent token file (4 indices per image; the tokenizer has 8 indices)",
        ),
    ],
)
def test_a_token_file_edited_by_hand_is_one_line(tiny_vq_tokenizer, images, tmp_path, capsys, edit, message):
    """Each of these was a traceback from the model or from writing the PNGs (duplicate paths wrote the
    images over each other)."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_vq_tokenizer, workers=0)
    data = torch.load(codes, weights_only=True)
    edit(data)
    torch.save(data, codes)
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out")
    assert code == 1 and err.startswith(f"error: {codes}: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_latents_of_another_width_than_the_tokenizers_are_one_line(
    tiny_kl_tokenizer, images, tmp_path, capsys
):
    """A token file of latents edited to another channel count (itself consistent): decode failed in the
    model with a traceback."""
    codes = tmp_path / "codes.pt"
    tokenize_images([images], codes, checkpoint=tiny_kl_tokenizer, workers=0)
    data = torch.load(codes, weights_only=True)
    data["latents"] = data["latents"][..., :4].contiguous()
    torch.save(data, codes)
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out")
    assert code == 1 and len(err.splitlines()) == 1
    assert err == (
        f"error: {codes}: inconsistent token file (latents of 4 channels; the tokenizer's have 16)\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_token_file_whose_metadata_nests_too_deep_is_one_line(tiny_kl_tokenizer, images, tmp_path, capsys):
    """A `.safetensors` token file whose metadata nests past Python's recursion limit: a RecursionError
    traceback from decode."""
    codes = tmp_path / "codes.safetensors"
    tokenize_images([images], codes, checkpoint=tiny_kl_tokenizer, workers=0)
    with safe_open(str(codes), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    from safetensors.torch import save_file

    save_file(tensors, str(codes), metadata=meta | {"class_names": "[" * 100_000 + "]" * 100_000})
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out")
    assert code == 1 and error_lines(err) == [err.strip()] and err.startswith(f"error: {codes}: ")
    assert not (tmp_path / "out").exists()


def test_a_generators_token_cache_is_named_as_such(tmp_path):
    from smapctl.data.latents import LatentCache, write_latents

    path = tmp_path / "cache.safetensors"
    write_latents(
        path, LatentCache(torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long), "f" * 16, "digits")
    )
    with pytest.raises(UserError, match="a generator's token cache"):
        load_codes(path)


def test_a_token_file_is_recognised_without_reading_its_tokens(
    tiny_kl_tokenizer, images, tmp_path, monkeypatch
):
    from smapctl.ops import codes

    pt, st = tmp_path / "c.pt", tmp_path / "c.safetensors"
    for path in (pt, st):
        tokenize_images([images], path, checkpoint=tiny_kl_tokenizer, workers=0)
    (tmp_path / "text.pt").write_text("no")
    weights = next(Path(tiny_kl_tokenizer).rglob("ema.safetensors"))
    monkeypatch.setattr(codes, "load_codes", None)  # a 10 GB ImageNet token file must not be read
    assert codes._is_codes_file(pt) and codes._is_codes_file(st)
    assert not codes._is_codes_file(weights) and not codes._is_codes_file(tmp_path / "text.pt")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_a_pt_token_file_is_mapped_not_read_and_a_legacy_one_still_loads(tiny_vq_tokenizer, images, tmp_path):
    """`decode` of ImageNet's `.pt` token file read its 10.5 GB of latents into memory; its tensors are
    now mapped from the file, as a `.safetensors` one's are. A file in torch's legacy format (which cannot
    be mapped) is read as before."""
    out = tmp_path / "codes.pt"
    r = tokenize_images([images], out, checkpoint=tiny_vq_tokenizer, workers=0)
    codes = load_codes(out)
    assert str(out) in Path("/proc/self/maps").read_text()
    assert torch.equal(codes.tokens, r.codes.tokens)
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(out, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_codes(legacy).tokens, r.codes.tokens)


def test_the_first_image_with_latents_not_finite_is_found_past_the_first_chunk():
    """The check runs `rows` images at a time; the index it names counts from the first image."""
    tokens = torch.zeros(7, 2, 3)
    assert first_not_finite(tokens, rows=2) is None
    tokens[5, 1, 0] = float("nan")
    tokens[6, 0, 2] = float("inf")
    assert first_not_finite(tokens, rows=2) == 5
    assert first_not_finite(tokens, rows=3) == 5 and first_not_finite(tokens) == 5


def test_tokens_of_any_layout_are_written_to_a_safetensors_file(tmp_path):
    """safetensors writes contiguous tensors only: a prefix or transposed view of the tokens is written
    as its values, not refused."""
    from smapctl.ops.codes import Codes, save_codes

    latents = torch.randn(4, 3, 6)[:, :, ::2]  # (N, k, C), not contiguous
    labels = torch.tensor([0, 9, 1, 9, 2, 9, 3, 9])[::2]  # (N,), not contiguous
    fields = dict(paths=[f"{i}.png" for i in range(4)], prefix=3, num_tokens=3, regularizer="kl")
    fields |= dict(image_size=16, fingerprint="f", checkpoint=str(tmp_path), weights="ema")
    codes = Codes(tokens=latents, labels=labels, class_names=[str(i) for i in range(5)], **fields)
    loaded = load_codes(save_codes(codes, tmp_path / "codes.safetensors"))
    assert torch.equal(loaded.tokens, latents) and torch.equal(loaded.labels, labels)
