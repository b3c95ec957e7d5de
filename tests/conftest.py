import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

# The suite's models are tiny: one thread is faster than two (no OpenMP barriers), and it keeps
# subprocesses (CLI tests) from oversubscribing the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# The tests read the commands' output as a pipe gives it (CI's): 80 columns, no colours. rich takes the
# width of a terminal the run was started in even when output is captured (in 70 columns ten tests of
# test_cli.py failed on wrapped lines), and FORCE_COLOR, PY_COLORS, TTY_COMPATIBLE or GITHUB_ACTIONS
# (set on GitHub's runners) coloured the usage errors, failing 38 tests. Before smapctl.cli is imported.
os.environ["COLUMNS"] = "80"
for name in ("FORCE_COLOR", "PY_COLORS", "TTY_COMPATIBLE", "GITHUB_ACTIONS"):
    os.environ.pop(name, None)

# smapctl's own variables, as a user's shell may set them, are the tests' to set: SMAPCTL_DEBUG=1 turned
# the one-line errors they expect into tracebacks, SMAPCTL_PROGRESS_EVERY=0 changed the progress lines.
for name in [name for name in os.environ if name.startswith("SMAPCTL_")]:
    del os.environ[name]

# The tests that send this process SIGINT expect Ctrl-C's KeyboardInterrupt. A run started in the
# background by a non-interactive shell (`pytest &` in a script, nohup) inherits SIGINT ignored, and so do
# pytest-xdist's workers: the signal was lost (cross-recon's ended without its "interrupted" line).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Captured output as a terminal shows it: a file name that is not UTF-8 (tests of such names log
    them) holds lone surrogates, which pytest-xdist cannot send from a worker (its worker crashed)."""
    report = yield
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]
    return report


@pytest.fixture(scope="session", autouse=True)
def _library_files_in_basetemp(tmp_path_factory):
    """What the libraries write of their own goes into the session's basetemp, not the user's home or
    temp folder: matplotlib's font cache and config folder (~/.cache/matplotlib, ~/.config/matplotlib),
    torch.compile's kernels and headers (TMPDIR/torchinductor_USER) and the log folder torchrun makes for
    each launch and never removes (TMPDIR/torchelastic_*, about 30 a run). Session-wide: module and
    session fixtures draw figures and compile too."""
    base = tmp_path_factory.getbasetemp()
    (base / "tmp").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLCONFIGDIR", str(base / "matplotlib"))
        # (torch sets it in os.environ as it is imported, to TMPDIR's, which the processes started inherit)
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(base / "torchinductor"))
        mp.setenv("TMPDIR", str(base / "tmp"))  # the processes the tests start
        mp.setattr(tempfile, "tempdir", str(base / "tmp"))  # this one (read once, before the tests)
        yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Each test session (each xdist worker) gets its own data cache (embedded datasets, reference
    classifiers), basetemp/smapctl-cache. Session-wide, set before any other fixture: the module and
    session fixtures that train or tokenize (the tiny tokenizers below, test modules' runs) use it too. A
    test that sets SMAPCTL_CACHE with `monkeypatch` gets it back after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMAPCTL_CACHE", str(tmp_path_factory.getbasetemp() / "smapctl-cache"))
        yield


# Tiny tokenizers trained for 3 steps through the library (16 px, 8 latent tokens, one block per tower):
# real checkpoints for tests of loading, tokenizing and decoding. Shared by the whole session.
RECIPE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "demo", "tokenizer.yaml"
)
TINY_TOKENIZER = [
    "model.image_size=16",
    "model.patch_size=4",
    "model.enc_width=32",
    "model.dec_width=32",
    "model.enc_depth=1",
    "model.dec_depth=1",
    "model.num_latent_tokens=8",
    "train.max_steps=3",
    "train.batch_size=8",
    "train.ckpt_every=3",
    "train.sample_every=3",
    "train.precision='no'",  # quoted: a bare `no` is YAML's false
]


def _train_tiny_tokenizer(tmp_path_factory, name: str, extra: list[str]):
    from smapctl.recipe import load_tokenizer_recipe
    from smapctl.train.tokenizer import train_tokenizer

    run_dir = tmp_path_factory.mktemp(name)
    recipe = load_tokenizer_recipe(RECIPE, TINY_TOKENIZER + extra)
    train_tokenizer(recipe, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_kl_tokenizer(tmp_path_factory):
    """Run folder of a tiny SMAP-KL tokenizer on the digits (classes "0".."9"; 8 tokens x 16 channels)."""
    return _train_tiny_tokenizer(tmp_path_factory, "tiny-kl", [])


@pytest.fixture(scope="session")
def tiny_unconditioned_tokenizer(tmp_path_factory):
    """Run folder of a tiny SMAP-KL tokenizer without class conditioning (TiTok-style) on the digits."""
    return _train_tiny_tokenizer(tmp_path_factory, "tiny-nocls", ["model.class_condition=false"])


@pytest.fixture(scope="session")
def tiny_vq_tokenizer(tmp_path_factory):
    """Run folder of a tiny SMAP-VQ tokenizer on the digits (classes "0".."9"; 8 tokens, 64 codes x 8)."""
    vq = "model.regularizer={kind: vq, codebook_size: 64, token_dim: 8}"
    return _train_tiny_tokenizer(tmp_path_factory, "tiny-vq", [vq])


# The tests of evaluate (test_evaluate*.py): a tiny tokenizer and a CARD generator on it, trained once a
# session (per xdist worker) for the three files, from `tiny_tokenizer`'s recipe overrides.
@pytest.fixture(scope="session")
def tok_run(tmp_path_factory) -> Path:
    """A 3-step SMAP-KL on 16 px digits, 8 tokens; its run folder."""
    from tiny_tokenizer import DEMO_TOKENIZER_TINY, ROOT

    from smapctl.recipe import load_tokenizer_recipe
    from smapctl.train.tokenizer import train_tokenizer

    run_dir = tmp_path_factory.mktemp("eval-tok")
    recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", DEMO_TOKENIZER_TINY)
    train_tokenizer(recipe, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def gen_run(tok_run, tmp_path_factory) -> Path:
    """A 5-step tiny CARD on the tiny tokenizer (3 flow steps when sampling); its run folder."""
    from tiny_tokenizer import DEMO_GENERATOR_TINY, ROOT

    from smapctl.recipe import load_generator_recipe
    from smapctl.train.generator import train_generator

    run_dir = tmp_path_factory.mktemp("eval-gen")
    sets = [f"latents.tokenizer={tok_run}", *DEMO_GENERATOR_TINY, "train.max_steps=5"]
    train_generator(load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets), run_dir)
    return run_dir


@pytest.fixture
def quick_classifier(monkeypatch):
    """The reference classifier at 16 px and 40 steps: the real one (32 px, 500 steps) takes minutes."""
    from smapctl.eval import semantic

    monkeypatch.setattr(semantic, "CLASSIFIER_STEPS", 40)
    monkeypatch.setitem(semantic.CLASSIFIER_SIZES, "digits", 16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """digits/<class>/<i>.png, 7 small random PNGs in three class folders (`tokenize_helpers.CLASSES`),
    for the tests of tokenize, decode and token files (a test module may have its own)."""
    from tokenize_helpers import class_folders

    return class_folders(tmp_path_factory.mktemp("images") / "digits")


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A weights file in torch-fidelity's Inception format with random (He-initialised) weights: enough
    to run the FID/IS plumbing offline; the numbers it gives mean nothing.

    torch-fidelity's constructor always loads weights, so it is built once with loading switched off.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from smapctl.eval.fidelity import INCEPTION_WEIGHTS_FILE

    mp = pytest.MonkeyPatch()
    mp.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        mp.undo()
    # PyTorch's default conv init shrinks activations ~1e-8 over Inception's depth (every FID ~0);
    # He init keeps them O(1) so that different sets give different features.
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory):
    """A randomly initialised VGG-16 (He init) in torchvision's state-dict layout; only the `features.*`
    part, the only one the loss reads (the 120M-parameter classifier would only cost time)."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg16(weights=None).features.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        fan_in = shape[1:].numel() if len(shape) == 4 else 1
        std = (2 / fan_in) ** 0.5 if len(shape) == 4 else 0.0
        state[f"features.{k}"] = torch.randn(shape, generator=g) * std
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path
