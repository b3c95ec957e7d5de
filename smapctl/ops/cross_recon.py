"""Cross-reconstruction panels: what the class embedding and the latent prefix each carry (figures 1, 4).

For two images a and b with classes A and B, and D(z, y) the decoder (eq. 4) the rows are, top to bottom:

    originals                 a, b
    reconstructions (k = K)   D(z_a, A), D(z_b, B)
    class only (k = 0)        D([], A), D([], B)          the class embedding alone
    swapped classes           D(z_b, A), D(z_a, B)        b's latents with a's class, and the reverse
    prefix sweep of a         D(z_a[:k], A) for k = 0, 1, 2, 4, ..., K
    prefix sweep of b         D(z_b[:k], B) for the same k

Each image is encoded with its own class (eq. 3). Images are prepared as in training evaluation. An image
of a built-in dataset is named as `tokenize` names it (`digits/val/3/00026.png`), where no such file is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from smapctl.data.folder import shown_class
from smapctl.data.images import eval_transform, load_image, save_png, to_uint8
from smapctl.devices import default_device
from smapctl.errors import UserError
from smapctl.ops.codes import UNKNOWN_LABEL
from smapctl.ops.inputs import folder_class, unknown_class_message
from smapctl.progress import progress

MIN_CELL = 64  # smaller images are enlarged (nearest neighbour, integer factor) to at least this in the panel
PADDING = 2  # px between and around the cells
TEXT_GAP = 6  # px either side of a row label
FONT_SIZE = 13  # px
# The file names of a panel's images (`cross_reconstruct`'s rows): --keep-parts replaces only these.
PART_NAME = re.compile(
    r"(?:[ab](?:_recon|_class_only|_k\d+)?|swap_class_a_latents_b|swap_class_b_latents_a)\.png"
)
# A built-in dataset's image as `tokenize` names it: <dataset>/<split>/<class>/<index>.png.
BUILTIN_IMAGE = re.compile(r"(?P<name>[^/]+)/(?P<split>[^/]+)/(?P<cls>[^/]+)/(?P<index>\d+)\.png")


@dataclass
class PanelRow:
    label: str
    images: torch.Tensor  # (n, 3, S, S) uint8
    names: list[str]  # a file stem per image, for --keep-parts


@dataclass
class PanelLayout:
    """Where things are in the panel: row r, column c starts at `cell_origin(r, c)`."""

    labels: list[str]  # one per row, top to bottom
    columns: int
    cell: int  # side of one cell in px (image size x scale)
    margin: int  # width of the label margin on the left, px
    padding: int = PADDING

    @property
    def rows(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the panel in px."""
        step = self.cell + self.padding
        return self.rows * step + self.padding, self.margin + self.columns * step + self.padding

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left corner of a cell."""
        step = self.cell + self.padding
        return self.padding + row * step, self.margin + self.padding + col * step


@dataclass
class CrossRecon:
    panel: torch.Tensor  # (3, H, W) uint8
    layout: PanelLayout
    rows: list[PanelRow]
    classes: tuple[str, str]  # the class names used for a and b
    prefixes: list[int]  # the k of the sweep rows


def image_class(tok, path: str | os.PathLike, given: str | None, option: str) -> int:
    """A class given as an option (name or id), else the image's folder name when it is a class."""
    if given is not None:
        return tok.class_id(given, option)
    y = folder_class(path, tok.class_names)
    if y is None:
        if tok.model.cfg.class_condition:
            raise UserError(unknown_class_message(path, tok.class_names, f"{option} NAME_OR_ID"))
        return UNKNOWN_LABEL
    return y


def builtin_image(path: str | os.PathLike, image_size: int) -> torch.Tensor | None:
    """The uint8 (3, S, S) image of a built-in dataset that `path` names as `tokenize` names them
    (`digits/val/3/00026.png`: image 26 of the val split, of class 3), or None for any other path (a
    file of that name wins, as for `tokenize digits`). A class that is not the image's, or an index
    past the split, is a one-line error."""
    from smapctl.data.config import check_embedded_split, embedded_name
    from smapctl.data.datasets import embedded_split
    from smapctl.data.folder import class_key

    text = os.fspath(path)
    m = BUILTIN_IMAGE.fullmatch(text.replace(os.sep, "/"))
    if m is None or embedded_name(m["name"]) is None or os.path.lexists(text):
        return None
    spec = f"{m['name']}:{m['split']}"
    try:
        check_embedded_split(spec)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    data = embedded_split(spec, image_size)
    i, n = int(m["index"]), len(data.labels)
    if i >= n:
        raise UserError(f"{path}: {spec} has {n} images, 0 to {n - 1}")
    named = data.class_names[data.labels[i]]
    if class_key(named) != class_key(m["cls"]):
        right = f"{m['name']}/{m['split']}/{named}/{m['index']}.png"
        raise UserError(f"{path}: image {i} of {spec} is of class {named}: {right}")
    return data.images[i]


def read_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """An image file or a built-in dataset's image (`builtin_image`) -> float32 (3, S, S) in [-1, 1],
    framed as evaluation frames it."""
    image = builtin_image(path, image_size)
    return eval_transform(image_size)(load_image(path) if image is None else image)


@torch.inference_mode()
def cross_reconstruct(
    image_a: str | os.PathLike,
    image_b: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    class_a: str | None = None,
    class_b: str | None = None,
    weights: str = "ema",
    device: str | None = None,
) -> CrossRecon:
    """Build the cross-reconstruction panel of two images (rows as in the module docstring)."""
    from smapctl.ops.load import load_tokenizer
    from smapctl.train.signals import stop_if_unheard
    from smapctl.train.tokenizer import preview_prefixes

    device = device or default_device()
    tok = load_tokenizer(checkpoint, weights, device)
    model = tok.model
    x = torch.stack([read_image(p, model.cfg.image_size) for p in (image_a, image_b)]).to(
        device
    )  # (2, 3, S, S)
    labels = [
        image_class(tok, image_a, class_a, "--class-a"),
        image_class(tok, image_b, class_b, "--class-b"),
    ]
    if labels[0] == labels[1] and labels[0] >= 0:  # the "swapped" row would show the reconstructions again
        logging.getLogger("smapctl").warning(
            "both images are of class %s: the swapped row swaps no class; --class-a / --class-b give another",
            shown_class(tok.class_names[labels[0]]),
        )
    y = torch.tensor(labels, device=device)
    K = model.cfg.num_latent_tokens
    ks = preview_prefixes(K)
    # A pass of the encoder (eq. 3), one of the decoder (eq. 4) a prefix, one for the swap: 1 min 45 s
    # for a ViT-B SMAP at 256 px on a CPU, silent before.
    with progress(len(ks) + 2, "cross-recon", "passes") as bar:
        z = model.encode(x, y).z  # (2, K, C)
        bar.update(1)
        sweeps = []
        for k in ks:
            stop_if_unheard()  # a SIGTERM lost as the command started stops it after its first pass
            sweeps.append(to_uint8(model.decode(z[:, :k], y)))  # (2, 3, S, S)
            bar.update(1)
        swapped = to_uint8(model.decode(z.flip(0), y))  # latents of b with class A; latents of a with class B
        bar.update(1)
    sweeps = torch.stack(sweeps, dim=1)  # (2, len(ks), 3, S, S)
    A, B = (shown_class(tok.class_names[i]) if i >= 0 else "-" for i in labels)
    rows = [
        PanelRow(f"originals ({A} | {B})", to_uint8(x), ["a", "b"]),
        PanelRow(f"reconstructions, k={K}", sweeps[:, -1], ["a_recon", "b_recon"]),
        PanelRow(f"class only, k=0 ({A} | {B})", sweeps[:, 0], ["a_class_only", "b_class_only"]),
        PanelRow(
            f"swapped ({A} + z_b | {B} + z_a)", swapped, ["swap_class_a_latents_b", "swap_class_b_latents_a"]
        ),
        PanelRow(f"a, k = {' '.join(map(str, ks))}", sweeps[0], [f"a_k{k}" for k in ks]),
        PanelRow(f"b, k = {' '.join(map(str, ks))}", sweeps[1], [f"b_k{k}" for k in ks]),
    ]
    rows = [PanelRow(r.label, r.images.cpu(), r.names) for r in rows]
    panel, layout = render_panel(rows)
    return CrossRecon(panel, layout, rows, (A, B), ks)


def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The labels' font: DejaVu Sans as matplotlib ships it (accented Latin, Greek and Cyrillic class
    names; PIL's built-in font draws them as boxes), else PIL's built-in one. Nothing is downloaded."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(path, FONT_SIZE)
    except OSError:  # a matplotlib packaged without its fonts
        return ImageFont.load_default(size=FONT_SIZE)


def render_panel(rows: list[PanelRow], min_cell: int = MIN_CELL) -> tuple[torch.Tensor, PanelLayout]:
    """Rows of uint8 images (n_r, 3, S, S) -> one uint8 (3, H, W) panel on white, left-aligned, with each
    row's label drawn in a left margin (`label_font`)."""
    side = rows[0].images.shape[-1]
    scale = max(1, math.ceil(min_cell / side))
    font = label_font()
    margin = max(math.ceil(font.getlength(r.label)) for r in rows) + 2 * TEXT_GAP
    layout = PanelLayout([r.label for r in rows], max(len(r.images) for r in rows), side * scale, margin)
    height, width = layout.size
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        big = row.images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # (n, 3, c, c)
        for c, image in enumerate(big):
            y, x = layout.cell_origin(r, c)
            canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (x, y))
        top, bottom = font.getbbox(row.label)[1::2]
        y = layout.cell_origin(r, 0)[0] + (layout.cell - (bottom - top)) // 2 - top
        draw.text((TEXT_GAP, y), row.label, fill=(0, 0, 0), font=font)
    panel = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()  # (3, H, W)
    return panel, layout


def parts_dir(out: str | os.PathLike) -> Path:
    """Where --keep-parts puts the single images: `panel.png` -> `panel_parts/` next to it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_parts")


def check_output(
    out: str | os.PathLike,
    inputs: tuple[str | os.PathLike, ...],
    keep_parts: bool = False,
    overwrite: bool = False,
) -> None:
    """Before the tokenizer is loaded: the panel (and with `keep_parts` its images) must not be written
    over one of the images it shows (`-o a.png` would replace image a; an input in `parts_dir(out)` would
    be replaced by its crop), nor over an earlier panel without `overwrite`."""
    out = Path(out)
    _check_panel_name(out, inputs)
    parts = parts_dir(out)
    if keep_parts:
        _check_parts_place(parts, inputs)
    _check_earlier_files(out, parts, keep_parts, overwrite)


def _check_panel_name(out: Path, inputs) -> None:
    """The panel's file: outside the checkpoints, a .png file name, not one of the images it shows."""
    from smapctl.train.checkpoint import refuse_output_in_checkpoints

    refuse_output_in_checkpoints(out)
    if out.is_dir():
        raise UserError(f"-o {out}: a folder; give the panel's file name (e.g. {out / 'cross-recon.png'})")
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the panel is saved as PNG; use a .png file name")
    for image in inputs:
        if os.path.exists(out) and os.path.exists(image) and os.path.samefile(out, image):
            raise UserError(f"-o {out}: that is the input image {image}; choose another file name")


def _check_parts_place(parts: Path, inputs) -> None:
    """--keep-parts: `parts` can be a folder, and holds none of the input images (they would be replaced
    by their crops)."""
    from smapctl.io import file_in_the_way

    blocker = file_in_the_way(parts)
    if blocker is not None:  # found after the panel is written, it would then block a rerun
        raise UserError(
            f"{parts}: could not write the panel's images there: {blocker} is a file, not a folder"
        )
    for image in inputs:
        if Path(image).resolve().is_relative_to(parts.resolve()):
            raise UserError(
                f"{image}: inside {parts}, where --keep-parts writes the panel's images; choose another -o"
            )


def _check_earlier_files(out: Path, parts: Path, keep_parts: bool, overwrite: bool) -> None:
    """An earlier panel is replaced only with `overwrite`, one with its images in `parts` only with
    `keep_parts` too; with `keep_parts`, files in `parts` that are not a panel's images are refused."""
    names = sorted(f.name for f in parts.iterdir()) if parts.is_dir() else []
    earlier = any(PART_NAME.fullmatch(name) for name in names)  # an earlier panel's images
    if keep_parts:
        others = [name for name in names if not PART_NAME.fullmatch(name)]
        if others:  # the user's (--overwrite would have deleted its PNGs as an earlier panel's)
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            raise UserError(
                f"{parts}: holds files that are not a panel's images ({others[0]}{more}), where --keep-parts"
                " writes them; choose another -o, or move those files"
            )
    if out.exists() and not overwrite:
        raise UserError(f"-o {out}: exists already; pass --overwrite to replace it, or choose another -o")
    if keep_parts and earlier and not overwrite:
        raise UserError(
            f"{parts}: holds the images of an earlier panel; pass --overwrite to replace them, or choose"
            " another -o"
        )
    if not keep_parts and out.exists() and earlier:
        # The earlier panel's images would stay beside a panel of other images.
        raise UserError(
            f"{parts}: holds the images of the panel --overwrite replaces; pass --keep-parts to replace them"
            " too, or remove that folder"
        )


def write_cross_recon(
    result: CrossRecon, out: str | os.PathLike, keep_parts: bool = False, ends_command: bool = False
) -> list[Path]:
    """Save the panel as `out` (.png) and, with `keep_parts`, every image at the model's resolution into
    `parts_dir(out)`, whose other PNGs (an earlier panel's, of another tokenizer: `a_k16.png` beside
    this one's `a_k8.png`) are removed once these are written. The panel is written last: when an image
    cannot be written, those this run wrote are removed and no panel is left to block a rerun. Once the
    panel is in place the run is complete, a signal then too (with `ends_command`, `smapctl cross-recon`,
    up to the command's end: `signals.CommandEnd`). Returns the written files, the panel first."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the panel is saved as PNG; use a .png file name")
    parts: list[Path] = []
    if keep_parts:
        folder = parts_dir(out)
        made = not os.path.lexists(folder)
        try:
            for row in result.rows:
                for im, n in zip(row.images, row.names, strict=True):
                    parts.append(folder / f"{n}.png")  # listed first: a Ctrl-C inside save_png left it
                    save_png(im, parts[-1])
        except BaseException:
            for path in parts:
                if path.is_file():  # (not a folder in the way of the last one)
                    path.unlink()
            if made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        for stale in {f for f in folder.glob("*.png") if PART_NAME.fullmatch(f.name)} - set(parts):
            stale.unlink()  # an earlier panel's (of another K: a_k16.png beside a_k8.png)
    return [_write_panel(result.panel, out, len(parts), ends_command), *parts]


def _write_panel(panel: torch.Tensor, out: Path, parts: int, ends_command: bool) -> Path:
    """`out`, the panel, written last: once it is renamed into place the run is complete (otherwise a signal
    in its folder's fsync, or at the command's final print, would exit 130 with every file written)."""
    from smapctl.io import file_identity
    from smapctl.train.signals import completed

    written = (
        f"the panel {out} and its {parts} images in {parts_dir(out)} are" if parts else f"the panel {out} is"
    )
    complete = f"{written} written; cross-recon is complete"
    earlier = file_identity(out)  # (an earlier run's panel, replaced with --overwrite)
    try:
        save_png(panel, out)
        if ends_command:
            completed(complete)
    except KeyboardInterrupt:
        if file_identity(out) == earlier:  # not in place yet: stopped
            raise
        logging.getLogger("smapctl").warning("interrupted once the panel was written: %s", complete)
        if ends_command:
            completed(complete)
    return out
