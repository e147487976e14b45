"""The feature-set manifest: what produced the features, how they are laid out, and which shards hold them.

See ``formats/SPEC.md`` for the field-by-field contract. ``Manifest.from_json`` checks every field and
raises :class:`FormatError` naming the field, so a device never trains on a set it misreads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FormatError
from .quant import SCHEMES, STORAGE_DTYPES, is_quantised

if TYPE_CHECKING:
    from .signing import Trust

FORMAT_NAME = "mist-feature-set"
# The newest version this code reads. A set is written with the lowest version that describes it: float16
# and float32 sets stay version 1 (readable by older mist), int8 and int4 sets need version 2 (§11).
FORMAT_VERSION = 3
QUANTISED_SINCE = 2
# A set that carries a per-pixel label map with each row (a segmentation set, SPEC §14) is version 3, so an
# older mist refuses it instead of training a classifier on its placeholder labels.
TASK_SINCE = 3
SEGMENTATION = "segmentation"
IGNORE_INDEX = 255  # a label map's "no label here" value, as in VOC and ADE20K tooling
MAX_LABEL_MULTIPLE = 16  # a label map is at most 16x the token grid on each side
MANIFEST_NAME = "manifest.json"
SCALES = ("none", "mean")
POOLS = ("none", "mean", "cls")
# Class names bound every allocation made from them (a C x C confusion matrix, a d x C head) and must fit, twice
# (the classes and the training layout), in a checkpoint's 16 MiB header: see SPEC §2.
MAX_CLASSES = 50_000
MAX_CLASS_NAME_CHARS = 256
MAX_CLASSES_JSON_BYTES = 4 << 20
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a feature set, and nothing it could get wrong silently."""

    backbone: dict[str, str]  # name, weights_sha256, weights_source, timm_version, torch_version
    groups: list[list[int]]  # Gather* layer groups; layer 0 is the patch embedding (or stem)
    scale: str  # "none": plain sum; "mean": sum divided by the group's size
    tokens: int  # T
    prefix_tokens: int  # class and register tokens at the front of the T tokens
    grid: list[int] | None  # (rows, cols) of the spatial tokens, None when unknown
    dim: int  # d
    dtype: str  # storage dtype of `features`
    data_config: dict[str, Any]  # input_size, interpolation, mean, std, crop_pct, crop_mode
    classes: list[str]
    split: str
    dataset: dict[str, Any]  # source, hash (identity of the exact images and their order), ...
    shards: list[Shard] = field(default_factory=list)
    rows: int = 0
    complete: bool = False
    layer_names: list[str] = field(default_factory=list)  # the backbone module behind each layer index
    pool: str = "none"  # "mean" or "cls": the cloud shipped one pooled token per map (then tokens == 1)
    # None: a classification set. {"kind": "segmentation", "label_size": [H, W], "ignore_index": 255}: every row
    # also carries an (H, W) uint8 label map in the shards' "masks" tensor (SPEC §14).
    task: dict[str, Any] | None = None

    @property
    def label_size(self) -> tuple[int, int] | None:
        """(H, W) of each row's label map, or None for a classification set."""
        return None if self.task is None else (int(self.task["label_size"][0]), int(self.task["label_size"][1]))

    @property
    def k(self) -> int:
        return len(self.groups)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return (self.k, self.tokens, self.dim)

    def with_shards(self, shards: list[Shard], complete: bool) -> Manifest:
        return replace(self, shards=list(shards), rows=sum(s.rows for s in shards), complete=complete)

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "backbone": dict(self.backbone),
            "gather": {"groups": [list(g) for g in self.groups], "scale": self.scale,
                       "layer_names": list(self.layer_names),
                       # only when pooled, so the layout fingerprint of every unpooled set stays as it was
                       **({"pool": self.pool} if self.pool != "none" else {})},
            "tokens": {"count": self.tokens, "prefix": self.prefix_tokens,
                       "grid": None if self.grid is None else list(self.grid)},
            "dim": self.dim,
            "dtype": self.dtype,
            "data_config": dict(self.data_config),
            "classes": list(self.classes),
            "split": self.split,
            "dataset": dict(self.dataset),
            "shards": [asdict(s) for s in self.shards],
            "rows": self.rows,
            "complete": self.complete,
        }
        if self.task is not None:  # only for a segmentation set: every classification set reads as it did
            body["task"] = dict(self.task)
        if is_quantised(self.dtype):  # after "dtype", so a person reading the manifest sees them together
            items = list(body.items())
            at = [key for key, _ in items].index("dtype") + 1
            body = dict([*items[:at], ("quantization", SCHEMES[self.dtype].describe()), *items[at:]])
        return body

    @property
    def format_version(self) -> int:
        """The lowest version that describes this set (older mist reads what it can)."""
        if self.task is not None:
            return TASK_SINCE
        return QUANTISED_SINCE if is_quantised(self.dtype) else 1

    def layout_fingerprint(self) -> str:
        """Hash of everything except the shard list: two writers with equal fingerprints write the same set."""
        body = self.to_json()
        for key in ("shards", "rows", "complete"):
            body.pop(key)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, obj: Any, source: str = MANIFEST_NAME, trust: Trust | None = None) -> Manifest:
        """The manifest in the JSON value ``obj``; with ``trust``, its signature is checked first (§13)."""
        if trust is not None and isinstance(obj, dict):
            from .signing import SIGNATURE, manifest_message

            trust.check(obj.get(SIGNATURE), manifest_message(obj), "feature set", source)
        return _parse(obj, source)

    @classmethod
    def load(cls, path: str | Path, trust: Trust | None = None) -> Manifest:
        from .safetensors_check import open_regular

        path = Path(path)
        try:
            with open_regular(path) as f:  # a FIFO or a device would block or never end
                if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
                    raise FormatError(f"{path}: over {MAX_MANIFEST_BYTES >> 20} MiB, larger than any manifest "
                                      "mist writes")
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise FormatError(f"{path}: missing manifest (is this a feature-set directory?)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: unreadable manifest ({e.__class__.__name__})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: manifest is not valid JSON (line {e.lineno})") from None
        except (ValueError, RecursionError):  # an over-long integer literal, or absurdly deep nesting
            raise FormatError(f"{path}: manifest is not valid JSON") from None
        return cls.from_json(obj, str(path), trust)


# ---- validation -------------------------------------------------------------------------------------------


def check_classes(classes: Any, fail: Any) -> None:
    """Refuse class names a set cannot carry: not a list of strings, empty or over-long names, repeats, too many
    (``fail(why)`` makes the error, naming the file or flag). Checked where a set is made and where it is read."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise fail("must be a list of strings")
    if len(classes) > MAX_CLASSES:
        raise fail(f"holds {len(classes):,} names, more than the {MAX_CLASSES:,} a set may have")
    for i, name in enumerate(classes):
        if not name or len(name) > MAX_CLASS_NAME_CHARS:
            raise fail(f"name {i} is {len(name):,} characters long; a class name has 1 to {MAX_CLASS_NAME_CHARS}")
    if len(set(classes)) != len(classes):
        seen: set[str] = set()
        twice = next(c for c in classes if c in seen or seen.add(c))
        raise fail(f"names the class {twice[:60]!r} twice (its rows would be counted under one label)")
    size = len(json.dumps(classes))
    if size > MAX_CLASSES_JSON_BYTES:
        raise fail(f"takes {size:,} bytes of JSON, more than the {MAX_CLASSES_JSON_BYTES:,} a set may have")


class _Fields:
    """Typed access to a JSON object that names the dotted field path in every error."""

    def __init__(self, obj: Any, source: str, prefix: str = ""):
        if not isinstance(obj, dict):
            raise FormatError(f"{source}: field '{prefix.rstrip('.') or '<root>'}' must be an object")
        self.obj, self.source, self.prefix = obj, source, prefix

    def fail(self, key: str, why: str) -> FormatError:
        return FormatError(f"{self.source}: field '{self.prefix}{key}' {why}")

    def get(self, key: str, kind: type | tuple, default: Any = ...) -> Any:
        if key not in self.obj:
            if default is not ...:
                return default
            raise self.fail(key, "is missing")
        value = self.obj[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"must be {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def positive_int(self, key: str, minimum: int = 1) -> int:
        value = self.get(key, int)
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self.source, f"{self.prefix}{key}.")


def _kind_name(kind: type | tuple) -> str:
    names = {int: "an integer", str: "a string", dict: "an object", list: "a list", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse(obj: Any, source: str) -> Manifest:
    top = _Fields(obj, source)
    version = top.get("format_version", int)
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{source}: format version {version} is newer than this mist reads ({FORMAT_VERSION}); upgrade mist"
        )
    if version < 1:
        raise top.fail("format_version", f"must be >= 1, got {version}")
    if top.get("format", str) != FORMAT_NAME:
        raise top.fail("format", f"must be {FORMAT_NAME!r}")

    backbone = top.sub("backbone")
    for key in ("name", "weights_sha256", "weights_source"):
        backbone.get(key, str)

    gather = top.sub("gather")
    groups = gather.get("groups", list)
    if not groups:
        raise gather.fail("groups", "must hold at least one group")
    for i, group in enumerate(groups):
        if not isinstance(group, list) or not group or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in group
        ):
            raise gather.fail(f"groups[{i}]", "must be a non-empty list of layer indices")
    scale = gather.get("scale", str)
    if scale not in SCALES:
        raise gather.fail("scale", f"must be one of {SCALES}, got {scale!r}")
    layer_names = gather.get("layer_names", list, default=[])
    pool = gather.get("pool", str, default="none")
    if pool not in POOLS:
        raise gather.fail("pool", f"must be one of {POOLS}, got {pool!r}")

    tokens = top.sub("tokens")
    count = tokens.positive_int("count")
    prefix = tokens.get("prefix", int)
    if not 0 <= prefix <= count:
        raise tokens.fail("prefix", f"must lie in [0, {count}], got {prefix}")
    grid = tokens.get("grid", (list, type(None)))
    if grid is not None and (len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0
                                                       for g in grid)):
        raise tokens.fail("grid", "must be null or two positive integers")
    if grid is not None and grid[0] * grid[1] != count - prefix:
        raise tokens.fail("grid", f"is {grid[0]}x{grid[1]} = {grid[0] * grid[1]} spatial tokens, but tokens.count "
                                  f"- tokens.prefix is {count - prefix}")

    if pool != "none" and count != 1:
        raise tokens.fail("count", f"must be 1 for features pooled by the cloud (gather.pool {pool!r}), got {count}")
    dim = top.positive_int("dim")
    dtype = top.get("dtype", str)
    if dtype not in STORAGE_DTYPES:
        raise top.fail("dtype", f"must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if is_quantised(dtype):
        if version < QUANTISED_SINCE:
            raise top.fail("dtype", f"{dtype!r} needs format_version {QUANTISED_SINCE}, the manifest says {version}")
        scheme = top.get("quantization", dict)
        if scheme != SCHEMES[dtype].describe():
            raise top.fail("quantization", f"does not describe the {dtype} scheme this mist reads "
                                           f"(got {json.dumps(scheme, sort_keys=True)[:120]})")
    data_config = top.get("data_config", dict)
    classes = top.get("classes", list)
    check_classes(classes, lambda why: top.fail("classes", why))
    split = top.get("split", str)
    dataset = top.get("dataset", dict)

    shards = []
    for i, entry in enumerate(top.get("shards", list)):
        s = _Fields(entry, source, f"shards[{i}].")
        name = s.get("file", str)
        # A NUL would make open() raise a bare ValueError instead of a FormatError naming the shard.
        if "/" in name or "\\" in name or "\0" in name or name in ("", ".", ".."):
            raise s.fail("file", f"must be a plain file name inside the set, got {name!r}")
        digest = s.get("sha256", str)
        if len(digest) != 64:
            raise s.fail("sha256", "must be a 64-character hex digest")
        shards.append(Shard(file=name, rows=s.positive_int("rows", minimum=0), sha256=digest))
    seen: set[str] = set()
    for i, shard in enumerate(shards):
        if shard.file in seen:
            raise FormatError(f"{source}: field 'shards[{i}].file' lists {shard.file!r} a second time "
                              "(its rows would be read twice)")
        seen.add(shard.file)
    rows = top.positive_int("rows", minimum=0)
    if rows != sum(s.rows for s in shards):
        raise top.fail("rows", f"is {rows} but the shards hold {sum(s.rows for s in shards)}")
    complete = top.get("complete", bool)
    task = _parse_task(top, version, None if grid is None else list(grid), len(classes))

    return Manifest(
        backbone=dict(backbone.obj), groups=[list(g) for g in groups], scale=scale, tokens=count,
        prefix_tokens=prefix, grid=None if grid is None else list(grid), dim=dim, dtype=dtype,
        data_config=dict(data_config), classes=list(classes), split=split, dataset=dict(dataset),
        shards=shards, rows=rows, complete=complete, layer_names=list(layer_names), pool=pool,
        task=task,
    )


def _parse_task(top: _Fields, version: int, grid: list[int] | None, num_classes: int) -> dict[str, Any] | None:
    """The optional ``task`` object (SPEC §14): absent for classification."""
    if "task" not in top.obj:
        return None
    if version < TASK_SINCE:
        raise top.fail("task", f"needs format_version {TASK_SINCE}, the manifest says {version}")
    task = top.sub("task")
    kind = task.get("kind", str)
    if kind != SEGMENTATION:
        raise task.fail("kind", f"must be {SEGMENTATION!r}, got {kind!r}")
    size = task.get("label_size", list)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise task.fail("label_size", "must be two positive integers [H, W]")
    if grid is None:
        raise task.fail("label_size", "needs tokens.grid: a label map is laid over the token grid")
    multiple = size[0] // grid[0]
    if size != [grid[0] * multiple, grid[1] * multiple] or not 1 <= multiple <= MAX_LABEL_MULTIPLE:
        raise task.fail("label_size", f"must be the {grid[0]}x{grid[1]} token grid times 1 to "
                                      f"{MAX_LABEL_MULTIPLE}, got {size[0]}x{size[1]}")
    ignore = task.get("ignore_index", int)
    if ignore != IGNORE_INDEX:
        raise task.fail("ignore_index", f"must be {IGNORE_INDEX}, got {ignore}")
    if num_classes >= IGNORE_INDEX:
        raise top.fail("classes", f"holds {num_classes} names; a segmentation set has at most {IGNORE_INDEX} "
                                  "(a label map stores one byte a pixel, 255 = ignore)")
    return {"kind": kind, "label_size": list(size), "ignore_index": ignore}


def segmentation_task(grid: list[int], multiple: int) -> dict[str, Any]:
    """The ``task`` of a segmentation set whose label maps are ``multiple`` times the token grid."""
    return {"kind": SEGMENTATION, "label_size": [grid[0] * multiple, grid[1] * multiple],
            "ignore_index": IGNORE_INDEX}
