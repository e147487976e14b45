"""Adaptor checkpoints: one safetensors file, weights plus JSON metadata, never a pickle.

Tensors are stored as ``param.<name>`` (the adaptor's weights) and, in resumable checkpoints,
``optim.<name>`` (optimizer moments, plus integer counters such as the step). Metadata values are JSON
strings:

- ``format`` / ``format_version``: ``mist-adaptor`` / ``1`` (an LAE) or ``2`` (any other model kind, so a mist
  that knows only the LAE refuses it cleanly instead of misreading it);
- ``model_kind`` (version 2): the model kind's name (``probe``, or any kind the device registers), or ``grid``
  (the resumable state of a whole search); absent means ``lae``, so every version-1 checkpoint still loads;
- ``config``: the adaptor's configuration;
- ``classes``: class names, index = output unit;
- ``feature_set``: fingerprint and layout of the set it was trained on, so evaluation can refuse a set made
  by another backbone (``feature_set_record`` writes it, ``training_layout`` reads the layout back,
  ``inference_record`` is what an exported adaptor keeps of it);
- ``train_state`` (resumable only): step, epoch, RNG state, best validation accuracy, training options.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .atomic import atomic_write
from .errors import FormatError
from .manifest import Manifest
from .safetensors_check import DTYPE_NAMES, read_header, write_safetensors

if TYPE_CHECKING:
    from .feature_set import FeatureSet

CHECKPOINT_FORMAT = "mist-adaptor"
CHECKPOINT_VERSION = 2
# A model kind is a name the device's registry knows (device/kinds.py); the format only bounds its spelling, so
# a new kind needs no change here. "grid" is the resumable state of a search.
MODEL_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")
PARAM, OPTIM = "param.", "optim."
_JSON_KEYS = ("config", "classes", "feature_set", "train_state")


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    config: dict[str, Any]
    classes: list[str]
    feature_set: dict[str, Any]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    kind: str = "lae"

    @property
    def resumable(self) -> bool:
        return self.train_state is not None


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically; a reader never sees a half-written file."""
    # np.asarray, not np.ascontiguousarray: the latter makes a 0-d step count 1-d, and it would come back as
    # an array that int() refuses. write_safetensors makes everything C-contiguous itself.
    tensors = {PARAM + k: np.asarray(v) for k, v in ckpt.params.items()}
    tensors.update({OPTIM + k: np.asarray(v) for k, v in ckpt.optimizer.items()})
    for name, value in tensors.items():
        # Refuse here what load_checkpoint refuses, so a bad checkpoint fails when written, not at resume.
        if name.startswith(PARAM) and value.dtype.kind != "f":
            raise FormatError(f"{path}: refusing to write weights {name!r} of dtype {value.dtype}; "
                              "weights must be floating point")
        if not np.all(np.isfinite(value)):
            raise FormatError(f"{path}: refusing to write a checkpoint with non-finite values in {name!r}")
    if not isinstance(ckpt.kind, str) or not MODEL_KIND.fullmatch(ckpt.kind):
        raise FormatError(f"{path}: model kind {ckpt.kind!r} is not a lowercase name of at most 32 characters")
    # An LAE checkpoint stays version 1, byte for byte what earlier mist wrote and reads.
    version = 1 if ckpt.kind == "lae" else CHECKPOINT_VERSION
    metadata = {"format": CHECKPOINT_FORMAT, "format_version": str(version)}
    if ckpt.kind != "lae":
        metadata["model_kind"] = ckpt.kind
    for key in _JSON_KEYS:
        value = getattr(ckpt, key)
        if value is not None:
            metadata[key] = json.dumps(value, sort_keys=True)
    # Not safetensors' save_file, whose metadata order changes from call to call (see write_safetensors).
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"{path}: not a mist adaptor checkpoint (format {meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise FormatError(f"{path}: bad checkpoint format_version {meta.get('format_version')!r}") from None
    if version > CHECKPOINT_VERSION:
        raise FormatError(f"{path}: checkpoint format {version} is newer than this mist reads "
                          f"({CHECKPOINT_VERSION}); upgrade mist")
    fields: dict[str, Any] = {"kind": meta.get("model_kind", "lae")}
    if not MODEL_KIND.fullmatch(fields["kind"]):
        raise FormatError(f"{path}: model kind {fields['kind']!r} is not a lowercase name of at most 32 characters")
    for key in _JSON_KEYS:
        if key not in meta:
            if key == "train_state":
                fields[key] = None
                continue
            raise FormatError(f"{path}: checkpoint metadata lacks {key!r}")
        try:
            fields[key] = json.loads(meta[key])
        except (ValueError, RecursionError):  # JSONDecodeError, or an over-long integer literal
            raise FormatError(f"{path}: checkpoint metadata {key!r} is not valid JSON") from None
    for entry in header.tensors.values():
        if not entry.name.startswith((PARAM, OPTIM)):
            raise FormatError(f"{path}: unexpected tensor {entry.name!r}")
        # Weights are floats; optimizer state may also hold integer counters (AdamW's step), which the
        # trainer saves as a 0-d int64 and must be able to load back.
        kinds = "f" if entry.name.startswith(PARAM) else "fiu"
        if entry.dtype.kind not in kinds:
            raise FormatError(f"{path}: tensor {entry.name!r} has dtype {DTYPE_NAMES[entry.dtype]}, "
                              f"expected {'a float' if kinds == 'f' else 'a numeric'} type")
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:  # read_header passed it, but the library is stricter in corners
        raise FormatError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    params = {k[len(PARAM):]: v for k, v in tensors.items() if k.startswith(PARAM)}
    optimizer = {k[len(OPTIM):]: v for k, v in tensors.items() if k.startswith(OPTIM)}
    if not params:
        raise FormatError(f"{path}: checkpoint holds no weights")
    if not isinstance(fields["classes"], list) or not isinstance(fields["config"], dict):
        raise FormatError(f"{path}: checkpoint metadata 'classes' or 'config' has the wrong type")
    classes = fields["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        raise FormatError(f"{path}: checkpoint metadata 'classes' must be a non-empty list of strings")
    if len(set(classes)) != len(classes):
        raise FormatError(f"{path}: checkpoint metadata 'classes' names a class twice")
    if not isinstance(fields["feature_set"], dict):
        raise FormatError(f"{path}: checkpoint metadata 'feature_set' must be an object")
    if fields["train_state"] is not None and not isinstance(fields["train_state"], dict):
        raise FormatError(f"{path}: checkpoint metadata 'train_state' must be an object")
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise FormatError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return Checkpoint(params=params, optimizer=optimizer, **fields)


# ---- the feature_set record: which set a checkpoint was trained on ------------------------------------------


def feature_set_record(fs: FeatureSet) -> dict[str, Any]:
    """What a checkpoint remembers of its training set: identity plus layout, for compatibility checks."""
    layout = fs.manifest.with_shards([], complete=False).to_json()
    return {"fingerprint": fs.fingerprint, "directory": str(fs.directory), "layout": layout}


def training_layout(record: Any, where: str) -> Manifest:
    """The manifest (without shards) of the set a checkpoint was trained on, read back from its ``feature_set``
    record and checked; ``where`` names the checkpoint in the error."""
    if not isinstance(record, dict) or not isinstance(record.get("layout"), dict):
        raise FormatError(f"{where}: checkpoint lacks the feature-set layout")
    fingerprint = record.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise FormatError(f"{where}: checkpoint feature_set fingerprint must be a string")
    return Manifest.from_json(record["layout"], source=f"{where} (feature_set layout)")


def inference_record(record: dict[str, Any]) -> dict[str, Any]:
    """What an exported adaptor keeps of its training set: the fingerprint and the layout, minus local paths
    (the set's directory and the image source's root on the training machine)."""
    layout = dict(record["layout"])
    if isinstance(layout.get("dataset"), dict):
        layout["dataset"] = {k: v for k, v in layout["dataset"].items() if k != "root"}
    return {k: v for k, v in record.items() if k not in ("directory", "layout")} | {"layout": layout}
