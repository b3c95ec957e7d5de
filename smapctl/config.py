"""Strict YAML recipes loaded into dataclass configs.

A recipe is a YAML mapping that fills a tree of dataclasses. Loading is strict: an unknown key, a wrong
type, a duplicate key, a missing required key or an impossible value is a `ConfigError` whose one-line
message names the file and the dotted key path. Two conveniences keep recipe files short:

* `base: other.yaml` at the top of a file inherits that file (resolved relative to this one); mappings
  merge key by key, anything else is replaced.
* `preset: NAME` inside a section whose dataclass has presets (see `presets.py`) starts from that preset.

Unions of dataclasses are told apart by their `kind` field, e.g. `regularizer: {kind: vq, ...}`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from smapctl.errors import ConfigError
from smapctl.train.layout import CHECKPOINTS, RUN_RECIPE

T = TypeVar("T")

MISSING = dataclasses.MISSING
SEED_MAX = 2**32 - 1  # the seeds torch, numpy and accelerate's set_seed take (train.seed, --seed)
INT_LIMIT = 2**63  # a recipe's or an option's integers are below it: torch holds them (int64)

# --------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads `1e-4` as a float (YAML 1.1 would give a str)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    merge = "tag:yaml.org,2002:merge"
    explicit = sum(1 for key_node, _ in node.value if key_node.tag != merge)
    loader.flatten_mapping(node)  # the merged (`<<: *anchor`) pairs first, then the explicit ones
    merged = len(node.value) - explicit
    out: dict = {}
    explicit_keys: set = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):  # `? [a, b]`, `1: x`: a recipe's keys are names
            line = key_node.start_mark.line + 1
            raise ConfigError(f"line {line}: a {type(key).__name__} as a key; keys are names")
        if i >= merged:  # an explicit key may override a merged one, not another explicit one
            if key in explicit_keys:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key '{key}' (line {line})")
            explicit_keys.add(key)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# YAML 1.2 scalars: `1e-4` is a float and only true/false are booleans (YAML 1.1 also reads yes/no/on/off
# as booleans, which would turn `precision: no` into False); integers are decimal or 0x hex, their digits
# groupable with `_` as YAML 1.1 allows (YAML 1.1 read `0500` as octal 320 and `1:00` as 60 in base 60); no
# timestamps (`2024-05-01` is a string).
_YAML11_ONLY = ("float", "bool", "int", "timestamp")
_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag.rpartition(":")[2] not in _YAML11_ONLY]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(path: str | Path) -> dict:
    """Parse one YAML file into a dict, with strict keys; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        if path.name == RUN_RECIPE and (path.parent / CHECKPOINTS).is_dir():  # a run's own, removed
            raise ConfigError(
                f"{path}: recipe file not found; the run's checkpoints hold the recipe they were trained "
                'with, under "recipe" in their meta.json'
            )
        if os.path.lexists(path):  # there, but no file to read: /dev/null, a symbolic link in a loop
            what = "not a regular file" if path.exists() else "a broken symbolic link"
            raise ConfigError(f"{path}: {what}, not a recipe file")
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (a recipe is YAML text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, not {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    """Merge `top` over `base` key by key; a section whose `kind` changes is replaced, not merged."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and _same_kind(old, value):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _same_kind(a: dict, b: dict) -> bool:
    return "kind" not in a or "kind" not in b or a["kind"] == b["kind"]


def read_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, following its `base:` chain; the result has no `base` key."""
    # (Path.resolve raises RuntimeError on a symbolic link in a loop before Python 3.13: a traceback)
    path = Path(os.path.realpath(path))
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    parent = path.parent / Path(base).expanduser()
    if not parent.is_file() and not parent.is_dir():  # a recipe copied away from its base (recipes/_base/)
        raise ConfigError(
            f"{path}: base: {base}: no such file {parent} (a base is read relative to the recipe that"
            " names it: copy it along, or give its absolute path)"
        )
    return _merge(read_recipe_dict(parent, (*_seen, path)), data)


# ---------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.num_latent_tokens=64` -> (['model', 'num_latent_tokens'], 64); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set train.batch_size=64")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except (yaml.YAMLError, ConfigError):
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw recipe dict (validation happens when it is built)."""
    data = _merge({}, data)
    set_by: dict[tuple[str, ...], str] = {}  # a key's path -> the override that set it last
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                earlier = set_by.get(tuple(parts[: i + 1]))
                if earlier is not None:  # `--set train=5`, not the `train.max_steps=N` --max-steps adds
                    key = ".".join(parts[: i + 1])
                    raise ConfigError(f"--set {earlier}: {key}: expected a section (mapping), got {child!r}")
                raise ConfigError(f"--set {text}: '{part}' is not a section")
            node[part] = child = _merge({}, child)
            node = child
        node[parts[-1]] = value
        set_by[tuple(parts)] = text
    return data


# ----------------------------------------------------------------------------- dataclass build

_PRESET_TABLES: dict[type, dict[str, Any]] = {}


def register_presets(cls: type, table: dict[str, Any]) -> None:
    """Let sections of type `cls` say `preset: NAME` to start from `table[NAME]`."""
    _PRESET_TABLES[cls] = table


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        kinds = [_kind_of(a) for a in args if _is_dataclass_type(a)]
        if kinds and None not in kinds:  # the sections a `kind` picks (the regularizer's)
            rest = [_type_name(a) for a in args if not _is_dataclass_type(a)]
            return " | ".join([f"a section with kind: {' | '.join(map(repr, kinds))}", *rest])
        return " | ".join(_type_name(a) for a in args)
    if get_origin(tp) in (list, tuple):
        args = get_args(tp)
        if get_origin(tp) is tuple and Ellipsis not in args:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    if _is_dataclass_type(tp):  # a section, as a recipe writes it (not the Python class name)
        return "a section"
    return getattr(tp, "__name__", str(tp))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _kind_of(cls: type) -> str | None:
    for f in dataclasses.fields(cls):
        if f.name == "kind":
            return f.default if f.default is not MISSING else None
    return None


def _convert(tp: Any, value: Any, where: str) -> Any:
    """`value` read from a recipe as type `tp`, strictly; `where` is its key path in messages."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, get_args(tp)))}, got {value!r}")
        return value
    if origin in (list, tuple):
        return _convert_sequence(tp, value, where)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return build(tp, value, where)
    return _convert_scalar(tp, value, where)


def _convert_union(tp: Any, value: Any, where: str) -> Any:
    """A union: null, a section picked by its `kind`, else the first member type `value` converts to (of
    `X | None`: X, with X's own message when it does not)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    dcs = [a for a in args if _is_dataclass_type(a)]
    if dcs and isinstance(value, dict):
        kinds = {_kind_of(a): a for a in dcs}
        kind = value.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            raise ConfigError(f"{where}.kind: expected one of {sorted(map(str, kinds))}, got {kind!r}")
        return build(kinds[kind], value, where)
    if len(args) == 2 and type(None) in args:  # `X | None` given a value: X's own message if it is no X
        return _convert(next(a for a in args if a is not type(None)), value, where)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _convert_sequence(tp: Any, value: Any, where: str) -> list | tuple:
    """A list, a tuple of any length, or a fixed-length tuple, item by item."""
    origin = get_origin(tp)
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = get_args(tp)
    if origin is tuple and Ellipsis not in args:  # fixed length, e.g. tuple[float, float]
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {list(value)!r}")
        return tuple(
            _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    items = [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    """A bool, int, float or str, as YAML wrote it (no coercion but int -> float)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not -INT_LIMIT <= value < INT_LIMIT:  # torch's int64: 2^63 overflowed deep inside it
            raise ConfigError(f"{where}: expected an integer below 2^63, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # .inf passed every `>= 0` check, .nan every comparison; an integer beyond a float's range (1e400
        # written out) made math.isfinite raise OverflowError
        if abs(value) > sys.float_info.max or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def build(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a dict, strictly. `where` is the key path used in messages."""
    prefix = f"{where}." if where else ""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        table = _PRESET_TABLES.get(cls)
        if table is None:
            raise ConfigError(f"{prefix}preset: section '{where or 'recipe'}' has no presets")
        if not isinstance(preset, str) or preset not in table:
            raise ConfigError(f"{prefix}preset: unknown preset {preset!r}; choose from {', '.join(table)}")
        data = _merge(dataclasses.asdict(table[preset]), data)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        valid = ", ".join(fields)
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys here are: {valid}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, dict) and "kind" not in value and f.default_factory is not MISSING:
                # A union section without `kind` keeps the kind of the field's default.
                kind = getattr(f.default_factory(), "kind", None)
                value = value if kind is None else {"kind": kind, **value}
            kwargs[name] = _convert(hints[name], value, f"{prefix}{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        # __post_init__ checks raise "key: message"; give the full path and the value.
        key = msg.partition(":")[0]
        got = f" (got {kwargs[key]!r})" if key in kwargs and not dataclasses.is_dataclass(kwargs[key]) else ""
        raise ConfigError(f"{prefix}{msg}{got}") from None


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ValueError `key: message` when `condition` fails (for dataclass `__post_init__`)."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def check_mlp_ratio(mlp_ratio: float, width: int) -> None:
    """`mlp_ratio` positive and giving an MLP of `width` x mlp_ratio at least one unit: timm's Block and
    the generators' blocks size theirs int(width * mlp_ratio), so below one unit they would have none at
    all and train without a word."""
    check(mlp_ratio > 0, "mlp_ratio", "must be positive")
    check(
        int(width * mlp_ratio) > 0,
        "mlp_ratio",
        f"gives the MLP int({width} x mlp_ratio) = 0 units; it needs {width} x mlp_ratio >= 1",
    )


def load(
    cls: type[T],
    path: str | Path,
    overrides: list[str] | None = None,
    commands: dict[str, str] | None = None,
) -> T:
    """Read recipe `path` (with its bases and `--set` overrides) into dataclass `cls`.

    With `commands` (recipe kind -> the command that takes it) the recipe must state `cls`'s `kind`: an
    empty file, or a recipe of another kind, is an error naming the command to use instead.
    """
    raw = read_recipe_dict(path)
    data = apply_overrides(raw, overrides or [])
    expected = _kind_of(cls)
    if commands is not None and expected is not None and data.get("kind") != expected:
        got = data.get("kind")
        if got is not None and not isinstance(got, str):
            raise ConfigError(f"{path}: kind: expected a name ({expected!r}), got {got!r}")
        if got is None:
            raise ConfigError(
                f"{path}: kind: required key is missing (a {expected} recipe says `kind: {expected}`)"
            )
        given = [t for t in overrides or [] if t.partition("=")[0].strip() == "kind"]
        if given:  # not the file's kind: else it blames the file, sends a tokenizer recipe to train-generator
            raise ConfigError(
                f"{path}: kind: --set {given[-1]} makes it a {got!r} recipe; this command takes a "
                f"{expected!r} one"
            )
        use = f"; use `{commands[got]}`" if isinstance(got, str) and got in commands else ""
        raise ConfigError(f"{path}: kind: this is a {got!r} recipe, not a {expected!r} one{use}")
    try:
        built = build(cls, data)
    except ConfigError as e:
        # A value given on the command line is not the file's: say where it came from.
        key = str(e).partition(":")[0]
        # The key itself, a section of it (`--set trian.lr=1`: `trian: unknown key`), or a key inside a
        # section given whole (`--set 'model.regularizer={kind: foo}'`: `model.regularizer.kind: ...`).
        given = [
            t
            for t in overrides or []
            if f"{t.partition('=')[0].strip()}.".startswith(f"{key}.")
            or f"{key}.".startswith(f"{t.partition('=')[0].strip()}.")
        ]
        if not given and ": unknown key;" not in str(e):  # a check against another key of its section
            given = _sibling_set(key, str(e), overrides or [])  # (`patch_size: must divide image_size`)
        origin = f" (from --set {given[-1]})" if given else ""
        left = not given and _lookup(raw, key) is not None  # the file's key, not one set on the line
        for text in (overrides or []) if left else []:  # a key of the old kind, left by `--set S.kind=NEW`
            section, _, last = text.partition("=")[0].strip().rpartition(".")
            old, new = _lookup(raw, f"{section}.kind"), _lookup(data, f"{section}.kind")
            if section and last == "kind" and key.startswith(f"{section}.") and old not in (None, new):
                origin = (
                    f" (a setting of kind {old!r}, which --set {text} changed: set the whole section"
                    f" instead, --set '{section}={{kind: {new}, ...}}')"
                )
        raise ConfigError(f"{path}: {e}{origin}") from None
    _warn_overridden_presets(cls, raw, overrides or [], path)
    return built


def _sibling_set(key: str, message: str, overrides: list[str]) -> list[str]:
    """The `--set`s of another key of `key`'s section that `message` names: otherwise `--set
    model.image_size=30` would fail as `model.patch_size: must divide image_size (got 8)`, blaming the file's
    patch size and not saying which value on the command line made it wrong."""
    section = key.rpartition(".")[0]
    said = message.partition(":")[2]
    found = []
    for text in overrides:
        other = text.partition("=")[0].strip()
        parent, _, name = other.rpartition(".")
        if parent == section and other != key and re.search(rf"\b{re.escape(name)}\b", said):
            found.append(text)
    return found


def _warn_overridden_presets(cls: type, raw: dict, overrides: list[str], path: str | Path) -> None:
    """`--set SECTION.preset=NAME` on a recipe whose section sets sizes of its own: those still win over
    the preset (as they do in a file), so the override alone would change nothing without a word."""
    import logging

    for text in overrides:
        key, _, _ = text.partition("=")
        section, _, last = key.strip().rpartition(".")
        if last != "preset":
            continue
        own = _lookup(raw, section) if section else raw
        target = _section_class(cls, section.split(".") if section else [], raw)
        table = _PRESET_TABLES.get(target)
        name = parse_override(text)[1]
        if not isinstance(own, dict) or table is None or not isinstance(name, str) or name not in table:
            continue
        values = to_dict(table[name])
        also_set = {t.partition("=")[0].strip() for t in overrides}
        winning = [
            k for k, v in own.items()
            if k in values and k not in ("kind", "preset") and f"{section}.{k}" not in also_set
            and _plain(v) != values[k]
        ]  # fmt: skip
        if winning:
            logging.getLogger("smapctl").warning(
                "--set %s: %s sets %s itself, which override the preset's (%s); --set them too to take "
                "the preset's", text, path, ", ".join(f"{section}.{k}" for k in winning),
                ", ".join(f"{k}={values[k]!r}" for k in winning),
            )  # fmt: skip


def _section_class(cls: type, parts: list[str], data: Any) -> type | None:
    """The dataclass a dotted section of a `cls` recipe builds (a union by the section's `kind`)."""
    for part in parts:
        if not _is_dataclass_type(cls):
            return None
        tp = get_type_hints(cls).get(part)
        data = data.get(part) if isinstance(data, dict) else None
        options = [a for a in get_args(tp) if _is_dataclass_type(a)] if get_origin(tp) else [tp]
        kind = data.get("kind") if isinstance(data, dict) else None
        matching = [a for a in options if _is_dataclass_type(a) and (kind is None or _kind_of(a) == kind)]
        cls = matching[0] if matching else None
    return cls


def _lookup(data: dict, dotted: str) -> Any:
    """The value at a dotted key path of a raw recipe dict, or None."""
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain YAML-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


class _StrictDumper(yaml.SafeDumper):
    """Quotes a string wherever `_StrictLoader` would read it as something else (`'1e3'`, which YAML
    1.1's dumper writes bare and the run's recipe.yaml would then read back as the number 1000.0)."""


# Quoted wherever either YAML 1.2 (this loader) or YAML 1.1 (other tools, PyYAML's safe_load) would read
# a string as something else: `'1e3'`, `'no'`, `'0500'`.
_StrictDumper.yaml_implicit_resolvers = {
    k: [
        *yaml.SafeLoader.yaml_implicit_resolvers.get(k, []),
        *_StrictLoader.yaml_implicit_resolvers.get(k, []),
    ]
    for k in {*yaml.SafeLoader.yaml_implicit_resolvers, *_StrictLoader.yaml_implicit_resolvers}
}


def dump_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_StrictDumper, sort_keys=False)


__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "check",
    "dump_yaml",
    "load",
    "read_recipe_dict",
    "read_yaml",
    "register_presets",
    "to_dict",
]
