"""`smapctl tokenize` under a launcher (torchrun, gloo on the CPU): the processes share the batches and the
main process writes the token file one process writes, keeps the parts and lists the skipped images."""

import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_tokenizer import another_copy, before_torchrun, torchrun, two_nodes
from tokenize_helpers import write_image

from smapctl.ops.codes import load_codes
from smapctl.ops.tokenize import tokenize_images

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2  # 9 inputs: batches 0-1, 2-3, 4-5, 6-7 and 8, the last round's for the main process alone


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3/0.png, 3/1.png, 3/empty.png (unreadable: input 2, in the second process's first batch), 7/0-5.png."""
    root = tmp_path_factory.mktemp("launch") / "digits"
    rng = np.random.default_rng(0)
    for name, n in (("3", 2), ("7", 6)):
        for i in range(n):
            write_image(root / name / f"{i}.png", rng)
    (root / "3" / "empty.png").write_bytes(b"")
    return root


def one_process(images, out, tok, **kwargs):
    """The same run in this process (one thread, as each launched process: the same numbers)."""
    return tokenize_images([images], out, checkpoint=tok, workers=0, batch_size=BATCH, **kwargs)


def same_file(two: Path, one: Path) -> None:
    a, b = load_codes(two), load_codes(one)
    assert a.paths == b.paths and torch.equal(a.labels, b.labels)
    assert a.tokens.dtype == b.tokens.dtype
    torch.testing.assert_close(a.tokens, b.tokens)


@pytest.mark.slow
def test_two_processes_write_the_token_file_of_one(tiny_kl_tokenizer, images, tmp_path):
    """Under a launcher tokenize was refused; now each process encodes every other batch (an uneven last
    round, an unreadable image in the second process's batch) and the file is that of one process."""
    out = tmp_path / "two.pt"
    args = ("--checkpoint", tiny_kl_tokenizer, "--batch-size", BATCH, "--workers", 0, "--on-error", "skip")
    r = torchrun("tokenize", images, "-o", out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = one_process(images, tmp_path / "one.pt", tiny_kl_tokenizer, on_error="skip")
    same_file(out, expected.out)
    assert len(load_codes(out).paths) == 8
    assert r.stdout.count("8 images -> latents 8x8x16 (prefix 8 of 8) in") == 1  # said by the main process
    assert r.stdout.count("1 unreadable skipped") == 1
    assert r.stderr.count("skipped 1 unreadable image (list: ") == 1, r.stderr[-3000:]
    listed = (tmp_path / "two.pt.skipped.txt").read_text()
    assert listed == expected.skipped_list.read_text() and "3/empty.png" in listed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["two.pt", "two.pt.skipped.txt", "one.pt", "one.pt.skipped.txt"]
    )  # no partial folder, lock or scratch file left


@pytest.mark.slow
def test_an_unreadable_image_stops_every_process_and_resume_goes_on(tiny_vq_tokenizer, images, tmp_path):
    """The second process reads the unreadable image: every process stops at it, the main process keeps
    the batch before it and says it once; a refused resume (another --prefix, which only the main process
    can tell from its parts) stops every process at once; --resume under the launcher goes on."""
    out = tmp_path / "codes.pt"
    args = (images, "-o", out, "--checkpoint", tiny_vq_tokenizer, "--batch-size", BATCH, "--workers", 0)
    r = torchrun("tokenize", *args)
    assert r.returncode != 0
    empty = images / "3" / "empty.png"
    assert (
        r.stderr.count(f"error: {empty}: empty file (0 bytes) (--on-error skip leaves such images out)") == 1
    ), r.stderr
    assert "Traceback" not in r.stderr.split("error: ")[0], r.stderr[-3000:]
    assert f"stopped: 2 of 9 images done, their tokens kept in {out}.partial" in r.stderr
    assert not out.exists()

    r = torchrun("tokenize", *args, "--resume", "--prefix", 3, "--on-error", "skip")
    assert r.returncode != 0
    refused = f"error: --resume: its --prefix was 8, not 3 (the interrupted run in {out}.partial)"
    assert r.stderr.count(refused) == 1, r.stderr[-3000:]
    assert "another process of this launch stopped" not in r.stderr  # every process stopped with it

    r = torchrun("tokenize", *args, "--resume", "--on-error", "skip")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8 images (2 of them from the interrupted run) -> indices 8x8" in r.stdout
    expected = one_process(images, tmp_path / "one.pt", tiny_vq_tokenizer, on_error="skip")
    same_file(out, expected.out)
    assert (tmp_path / "codes.pt.skipped.txt").read_text() == expected.skipped_list.read_text()
    assert not (tmp_path / "codes.pt.partial").exists()


@pytest.mark.slow
def test_two_processes_tokenize_a_builtin_dataset_with_a_label(tiny_kl_tokenizer, tmp_path):
    """A built-in dataset, --label and --prefix under the launcher: the file of one process."""
    out = tmp_path / "two.safetensors"
    args = ("--checkpoint", tiny_kl_tokenizer, "--label", "5", "--prefix", 3, "--batch-size", 16)
    r = torchrun("tokenize", "digits:val", "-o", out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    one = tokenize_images(
        ["digits:val"], tmp_path / "one.safetensors", checkpoint=tiny_kl_tokenizer, label="5", prefix=3,
        batch_size=16,
    )  # fmt: skip
    same_file(out, one.out)
    assert set(load_codes(out).labels.tolist()) == {5} and load_codes(out).prefix == 3


def test_a_problem_only_the_main_process_meets_stops_the_others_with_it(monkeypatch):
    """The main process alone holds the lock, the parts and the scratch file. The others wait to hear where
    to start: its problem there is what they hear (NCCL would otherwise have kept them waiting for the
    process group's timeout, an hour), and every process stops with it at the same point, the main one
    with its own error."""
    import types

    import accelerate.utils

    from smapctl.errors import UserError
    from smapctl.ops.tokenize import _Launch, _told_to_the_others

    told = []

    def gather_object(objects):  # what process 0 sends and this one's, as every process receives them
        if launch.main:
            told.append(list(objects[0][:2]))
        return [(*told[-1], None, ()), *objects]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    launch = _Launch(types.SimpleNamespace(is_main_process=True))
    with pytest.raises(UserError) as raised, _told_to_the_others(launch):
        raise UserError("--resume: its --prefix was 8, not 3")
    assert told == [[0, "--resume: its --prefix was 8, not 3"]] and raised.value.agreed
    launch = _Launch(types.SimpleNamespace(is_main_process=False))
    with pytest.raises(UserError, match=r"^--resume: its --prefix was 8, not 3$") as raised:
        launch.start()
    assert raised.value.agreed and raised.value.same_in_every_process  # printed by the main process alone

    launch = _Launch(types.SimpleNamespace(is_main_process=True))
    with pytest.raises(UserError, match="no room") as raised, _told_to_the_others(launch):
        assert launch.start(6) == 6
        raise UserError("no room")  # after the start: not told again (the others are encoding)
    assert told == [[0, "--resume: its --prefix was 8, not 3"], [6, None]] and not raised.value.agreed
    launch = _Launch(types.SimpleNamespace(is_main_process=False))
    assert launch.start() == 6


def test_a_launch_accelerate_did_not_join_is_refused_and_its_precision_said_unused(monkeypatch, caplog):
    """As `sample` joins a launch: processes accelerate set up alone would each write the whole token
    file; `accelerate launch --mixed_precision bf16` is not what the encoder runs in (its --precision is)."""
    import types

    import smapctl.launch
    from smapctl.errors import UserError
    from smapctl.ops.tokenize import _Launch

    for name in ("WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    state = types.SimpleNamespace(device="cpu", process_index=0, num_processes=1, is_main_process=True)
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    with pytest.raises(
        UserError, match="the launcher started 2 processes but accelerate set up 1; each would"
    ):
        _Launch.joined("fp32")
    state.num_processes = 2
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="smapctl"):
        assert _Launch.joined("fp32").world == 2
    assert (
        "accelerate's mixed precision bf16 is not used: tokenize encodes in --precision fp32" in caplog.text
    )
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert _Launch.joined("fp32") is None  # alone: the command's own device, as before


def test_tokens_of_no_element_are_gathered_as_nccl_gathers(monkeypatch):
    """`tokenize --prefix 0` (the class-only file) sends tokens of 0 elements each round. accelerate's
    gather over NCCL shapes what it received by `view(-1, *shape[1:])`, which such a tensor cannot take: a
    traceback in every process at the first round (gloo's path, which the launched tests take, cats)."""
    import types

    import accelerate.utils.operations as operations
    import torch.distributed

    from smapctl.launch import gather_rows

    state = types.SimpleNamespace(
        distributed_type=operations.DistributedType.MULTI_GPU,
        debug=False,
        backend="nccl",
        num_processes=2,
        device=torch.device("cpu"),
    )

    def all_gather_single(output, tensor):  # two processes that sent the same (NCCL: by element count)
        output.copy_(torch.cat([tensor.reshape(-1), tensor.reshape(-1)]))

    monkeypatch.setattr(operations, "PartialState", lambda: state)
    monkeypatch.setattr(torch.distributed, "all_gather_single", all_gather_single, raising=False)
    for shape in ((3, 0), (3, 0, 16), (3, 2, 16)):  # VQ and KL at --prefix 0, and KL at --prefix 2
        t = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
        gathered = gather_rows((t, torch.tensor([4, 5, 6])), BATCH + 2, 2)
        assert len(gathered) == 2
        for t_p, y_p in gathered:
            assert torch.equal(t_p, t) and y_p.tolist() == [4, 5, 6]


def test_each_launched_process_encodes_only_its_share_of_the_batches(tiny_kl_tokenizer, images, monkeypatch):
    """A launched process that encoded every batch itself (and sent the others only its own) ended as one
    that had encoded its share, the token file the same: the launch was as slow as one process. Each
    encodes the batches of its turn in every round (here the second process of 2: the 2nd and 4th of 5);
    the other process's rows come back from the gathers stubbed here."""
    import types

    import accelerate.utils

    import smapctl.launch
    from smapctl.ops import tokenize
    from smapctl.ops.inputs import ImageFiles
    from smapctl.ops.load import load_tokenizer

    monkeypatch.setattr(smapctl.launch, "gather_rows", lambda rows, batch_size, world: [rows] * world)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda sent: sent * 2)
    monkeypatch.setattr(smapctl.launch.RoundStops, "round_done", lambda self, last: None)
    encoded = []

    def encode_batch(model, batch, *args, real=tokenize._encode_batch):
        if batch is not None:
            encoded.append(batch[1].tolist())  # (the inputs' indices)
        return real(model, batch, *args)

    monkeypatch.setattr(tokenize, "_encode_batch", encode_batch)
    tok = load_tokenizer(tiny_kl_tokenizer)
    paths = sorted(images.rglob("*.png"))
    source, labels = ImageFiles(paths, tok.model.cfg.image_size), torch.zeros(len(paths), dtype=torch.long)
    launch = types.SimpleNamespace(device=torch.device("cpu"), world=2, rank=1, main=False)
    k = tok.model.cfg.num_latent_tokens
    tokenize._encode_rounds(tok.model, source, paths, labels, (k, BATCH, 0, "fp32", "skip"), launch, 0)
    assert encoded == [[2, 3], [6, 7]]


def test_processes_that_list_other_images_all_stop_before_encoding(monkeypatch):
    """Each process reads its batches from its own listing and the main one keeps their tokens under its
    own paths: a node whose copy of the folder lacks an image had every image's tokens after it kept
    under the next one's path, in a token file that looked complete. Every process stops at the start."""
    import types

    import accelerate.utils

    from smapctl.errors import UserError
    from smapctl.launch import fingerprints
    from smapctl.ops.inputs import ImageList
    from smapctl.ops.tokenize import _Launch

    def listing(names, labels, main=False, tokenizer="a1b2"):
        launch = _Launch(types.SimpleNamespace(is_main_process=main))
        tok = types.SimpleNamespace(path=Path("tok/checkpoints/step_000000003"), fingerprint=tokenizer)
        launch.listed(ImageList(names, names, Path("/data")), torch.tensor(labels), tok)
        return launch

    def told(*launches, done=0):  # the main process's start and each process's listing, on every process
        everyone = [(done, None, launch.inputs, fingerprints(launch.tokenizer)) for launch in launches]
        monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: everyone)

    main = listing(["3/0.png", "3/1.png", "7/0.png"], [3, 3, 7], main=True)
    for names, labels, said in (
        (["3/0.png", "7/0.png"], [3, 7], "process 1 of the launch lists 2 images, the main process 3:"),
        (["3/0.png", "3/2.png", "7/0.png"], [3, 3, 7], "process 1 of the launch lists other images or"),
        (["3/0.png", "3/1.png", "7/0.png"], [3, 7, 7], "process 1 of the launch lists other images or"),
    ):
        other = listing(names, labels)
        told(main, other)
        for launch in (main, other):  # the same error in each, agreed (printed once, by the main process)
            with pytest.raises(UserError, match=said) as raised:
                launch.start()
            assert raised.value.agreed and "every process must read the same images" in str(raised.value)
    same = listing(["3/0.png", "3/1.png", "7/0.png"], [3, 3, 7])
    told(main, same, done=4)
    assert main.start(4) == 4 and same.start() == 4
    # The same images, encoded with another copy of the tokenizer (`launch.different_checkpoints`).
    other = listing(["3/0.png", "3/1.png", "7/0.png"], [3, 3, 7], tokenizer="c3d4")
    told(main, other)
    for launch in (main, other):
        with pytest.raises(UserError, match="process 1 of the launch loaded another tokenizer") as raised:
            launch.start()
        assert raised.value.agreed


# `smapctl` as a launched process in which the process of rank argv[1] sends itself the signal argv[3] as
# it encodes its argv[2]-th batch (after the encoding, inside the round: the signal lands at a known round).
ROUND_SIGNAL_LAUNCHER = """\
import os
import signal
import sys

from smapctl.ops import tokenize

rank, at, signum = (int(a) for a in sys.argv[1:4])
del sys.argv[1:4]
real, calls = tokenize._encode_batch, []


def encode(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append(1)
    if int(os.environ["RANK"]) == rank and len(calls) == at:
        os.kill(os.getpid(), signum)
    return out


tokenize._encode_batch = encode
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rank", "at", "signum", "done"),
    [(1, 1, signal.SIGINT, 4), (0, 2, signal.SIGTERM, 8), (1, 3, signal.SIGINT, None)],
    ids=["other-first-round", "main-second-round", "other-last-round"],
)
def test_a_signal_stops_every_process_after_the_same_round(
    tiny_kl_tokenizer, images, tmp_path, rank, at, signum, done
):
    """Batches of 2 in rounds (0, 1), (2, 3) and (4,). The process that received a signal stopped at
    once, where it was, and the others met a broken collective (with NCCL: waited until torchrun killed
    them, the last rounds lost). Now every process finishes the round, the main process keeps it, and
    all exit with the signal's status; `--resume` writes the file one process writes. A signal in the
    last round lets the run finish, said once."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(ROUND_SIGNAL_LAUNCHER)
    out = tmp_path / "codes.pt"
    args = (images, "-o", out, "--checkpoint", tiny_kl_tokenizer, "--batch-size", BATCH, "--workers", 0)
    args += ("--on-error", "skip")
    r = torchrun(rank, at, int(signum), "tokenize", *args, script=launcher)
    # torchrun's summary of the processes' exit statuses (printed when one of them failed)
    statuses = re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.MULTILINE)
    expected = one_process(images, tmp_path / "one.pt", tiny_kl_tokenizer, on_error="skip")
    if done is None:
        assert r.returncode == 0 and not statuses, r.stderr[-3000:]
        said = f"SIGINT during the last round: the token file {out} is written; tokenize is complete"
        assert r.stderr.count(said) == 1, r.stderr[-3000:]
    else:
        assert sorted(statuses) == [str(128 + signum)] * 2, r.stderr[-3000:]
        kept = f"interrupted: {done} of 9 images done, their tokens kept in {out}.partial"
        ours = before_torchrun(r.stderr)
        assert ours.count(kept) == 1 and "Traceback" not in ours, r.stderr[-3000:]
        assert not out.exists()
        tokenize_images(
            [images],
            out,
            checkpoint=tiny_kl_tokenizer,
            workers=0,
            batch_size=BATCH,
            on_error="skip",
            resume=True,
        )
    same_file(out, expected.out)


@pytest.mark.slow
@pytest.mark.parametrize("node", [0, 1])
def test_on_nodes_that_do_not_share_the_output_only_the_main_one_checks_it(
    tiny_kl_tokenizer, images, tmp_path, node
):
    """Two nodes (two `torchrun --nnodes 2 --node_rank N` on this machine, one process each), each with its
    own folder for the relative `-o codes.pt`, a token file already in the folder of node `node`. Each
    process checked OUT before they joined: node 0's token file stopped it alone, and node 1's process
    died in its broken rendezvous with a traceback; node 1's refused a run that would only have written
    on node 0, whose process then waited until killed. Now the main process alone checks OUT, and what it
    refuses stops both in one line."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    stale = folders[node] / "codes.pt"
    one_process(images, stale, tiny_kl_tokenizer, on_error="skip")
    before = stale.read_bytes()
    args = ("tokenize", images, "-o", "codes.pt", "--checkpoint", tiny_kl_tokenizer, "--batch-size", BATCH)
    outputs = two_nodes(*args, "--workers", 0, "--on-error", "skip", cwds=folders)
    statuses = [status for status, _, _ in outputs]
    ours = [before_torchrun(err) for _, _, err in outputs]
    if node == 0:
        assert statuses == [1, 1]
        refused = "error: -o codes.pt: a token file exists there; pass --overwrite to replace it"
        assert ours[0].count(refused) == 1 and ours[1] == "", outputs
        assert stale.read_bytes() == before and not (folders[1] / "codes.pt").exists()
    else:
        assert statuses == [0, 0], outputs
        same_file(folders[0] / "codes.pt", stale)
        assert stale.read_bytes() == before


def test_an_unreadable_image_every_process_stops_at_keeps_nothing_of_the_run(
    tiny_vq_tokenizer, images, tmp_path, monkeypatch
):
    """The error every process of a launch raises at the first unreadable image (on_error fail) was held
    in a local of the frame it was raised from, a cycle through its traceback that kept the model and
    the tokens until Python's next full collection. (In one process as its own launch: the same rounds.)"""
    import gc
    import types
    import weakref

    from smapctl.data.images import BadImageError
    from smapctl.ops import load, tokenize

    state = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    state.is_main_process = True
    monkeypatch.setattr(tokenize._Launch, "joined", classmethod(lambda cls, precision: cls(state)))
    models, real = [], load.load_tokenizer
    monkeypatch.setattr(load, "load_tokenizer", lambda *a, **k: models.append(real(*a, **k)) or models[-1])
    for run, collect in (("warm", True), ("run", False)):  # (what the first run imports: its own cycles)
        gc.disable() if not collect else gc.collect()
        try:
            with pytest.raises(BadImageError, match="empty file"):
                tokenize_images([images], tmp_path / f"{run}.pt", checkpoint=tiny_vq_tokenizer, workers=0)
            gone = weakref.ref(models.pop().model)
            assert collect or gone() is None
        finally:
            gc.enable()


@pytest.mark.slow
def test_nodes_whose_copies_of_the_tokenizer_differ_stop_before_encoding(tiny_kl_tokenizer, images, tmp_path):
    """Two nodes, each with its own copy of the tokenizer run (`--checkpoint tok`, relative), node 1's of
    another checkpoint: each encoded its share of the images with its own copy, and the token file mixed
    two tokenizers' tokens without a word. Now both stop before encoding, in one line."""
    import shutil

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    shutil.copytree(tiny_kl_tokenizer, folders[0] / "tok")
    another_copy(tiny_kl_tokenizer, folders[1]).rename(folders[1] / "tok")
    args = ("tokenize", images, "-o", tmp_path / "codes.pt", "--checkpoint", "tok", "--batch-size", BATCH)
    outputs = two_nodes(*args, "--workers", 0, cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = "error: process 1 of the launch loaded another tokenizer than the main process's (tok/checkpoints/"
    assert ours[0].count(said) == 1 and ours[1] == "", outputs
    assert "its node's copy is of another step or training; give every node the same copy" in ours[0]
    assert not (tmp_path / "codes.pt").exists()
