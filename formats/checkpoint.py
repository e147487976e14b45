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
- ``train_state`` (resumable only): step, epoch, RNG state, best validation accuracy, training options;
- ``tensor_sha256`` and ``metadata_sha256``: a digest of every tensor, and one of the metadata (which covers
  those), checked on every load, so one flipped weight is refused; ``signature`` (optional): an Ed25519
  signature over the metadata digest (formats/signing.py), which a device can require.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write
from .errors import FormatError
from .manifest import Manifest, check_classes
from .safetensors_check import DTYPE_NAMES, Header, header_from_bytes, open_regular, stored_array, write_safetensors

if TYPE_CHECKING:
    from .feature_set import FeatureSet
    from .signing import SigningKey, Trust

CHECKPOINT_FORMAT = "mist-adaptor"
CHECKPOINT_VERSION = 2
# A model kind is a name the device's registry knows (device/kinds.py); the format only bounds its spelling, so
# a new kind needs no change here. "grid" is the resumable state of a search.
MODEL_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")
PARAM, OPTIM = "param.", "optim."
_JSON_KEYS = ("config", "classes", "feature_set", "train_state")
TENSOR_DIGESTS, METADATA_DIGEST = "tensor_sha256", "metadata_sha256"


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    config: dict[str, Any]
    classes: list[str]
    feature_set: dict[str, Any]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    kind: str = "lae"
    digest: str | None = None  # metadata_sha256 as loaded (None: written before digests existed)
    signed_by: str | None = None  # the id of the trusted key whose signature was checked on load

    @property
    def resumable(self) -> bool:
        return self.train_state is not None


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, signer: SigningKey | None = None) -> None:
    """Write ``ckpt`` atomically, with its digests (and signed by ``signer`` when given); a reader never sees a
    half-written file."""
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
    stored = {name: stored_array(value, f"{path}: tensor {name!r}") for name, value in tensors.items()}
    metadata[TENSOR_DIGESTS] = json.dumps({name: _sha256(a.reshape(-1).view(np.uint8)) for name, a in stored.items()},
                                          sort_keys=True)
    layout = {name: [DTYPE_NAMES[a.dtype], list(a.shape)] for name, a in stored.items()}
    metadata[METADATA_DIGEST] = metadata_digest(metadata, layout)
    if signer is not None:
        from .signing import ADAPTOR_DOMAIN, SIGNATURE

        metadata[SIGNATURE] = json.dumps(signer.sign(ADAPTOR_DOMAIN + metadata[METADATA_DIGEST].encode()),
                                         sort_keys=True)
    tensors = stored
    # Not safetensors' save_file, whose metadata order changes from call to call (see write_safetensors).
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata_digest(metadata: dict[str, str], layout: dict[str, list]) -> str:
    """sha256 of the metadata (all of it but this digest and the signature, so the tensor digests too) and of
    every tensor's dtype and shape, canonically encoded: what a signature signs (SPEC §9)."""
    from .signing import SIGNATURE, canonical_json

    covered = {k: v for k, v in metadata.items() if k not in (METADATA_DIGEST, SIGNATURE)}
    return _sha256(canonical_json({"metadata": covered, "tensors": layout}))


def _read_checkpoint(path: Path) -> tuple[bytes, Header]:
    """The whole file, read once (digests, header and tensors all come from these same bytes), and its header."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a safetensors file") from None
    except OSError as e:
        raise FormatError(f"{path}: unreadable ({e.strerror or e.__class__.__name__})") from None
    return data, header_from_bytes(path, data)


def _check_digests(path: Path, header: Header, data: bytes) -> str | None:
    """Refuse a checkpoint whose tensors or metadata do not match the digests it carries; return the metadata
    digest (None for a checkpoint written before digests existed, which carries neither)."""
    meta = header.metadata
    if TENSOR_DIGESTS not in meta and METADATA_DIGEST not in meta:
        return None
    try:
        digests = json.loads(meta.get(TENSOR_DIGESTS, ""))
    except (ValueError, RecursionError):
        digests = None
    if not isinstance(digests, dict) or METADATA_DIGEST not in meta or set(digests) != set(header.tensors):
        raise FormatError(f"{path}: checkpoint digests are missing or do not list its tensors "
                          "(the file is corrupt or was modified)")
    view = memoryview(data)
    for name, entry in header.tensors.items():
        if digests[name] != _sha256(view[entry.offset:entry.offset + entry.nbytes]):
            raise FormatError(f"{path}: tensor {name!r} does not match its digest (the file is corrupt or was "
                              "modified)")
    layout = {name: [DTYPE_NAMES[e.dtype], list(e.shape)] for name, e in header.tensors.items()}
    if metadata_digest(meta, layout) != meta[METADATA_DIGEST]:
        raise FormatError(f"{path}: checkpoint metadata does not match its digest (the file is corrupt or was "
                          "modified)")
    return meta[METADATA_DIGEST]


def load_checkpoint(path: str | os.PathLike, trust: Trust | None = None) -> Checkpoint:
    """Read and check a checkpoint: header, digests, then (with ``trust``) its signature, then every field."""
    path = Path(path)
    data, header = _read_checkpoint(path)
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
    fields["digest"] = _check_digests(path, header, data)
    if trust is not None:
        from .signing import ADAPTOR_DOMAIN, SIGNATURE, SignatureError

        signature = None
        if SIGNATURE in meta:
            try:
                signature = json.loads(meta[SIGNATURE])
            except (ValueError, RecursionError):
                raise SignatureError(f"{path}: malformed signature (not JSON)") from None
            if fields["digest"] is None:
                raise SignatureError(f"{path}: signed, but carries no digest for the signature to cover")
        fields["signed_by"] = trust.check(signature, ADAPTOR_DOMAIN + (fields["digest"] or "").encode(), "adaptor",
                                       str(path))
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
    # Every entry was checked against the file's bytes (§4), so the arrays are cut straight out of them: the
    # digests and the weights come from one read, and no second parse can see other bytes.
    view = memoryview(data)
    tensors = {name: np.frombuffer(view[e.offset:e.offset + e.nbytes], dtype=e.dtype).reshape(e.shape).copy()
               for name, e in header.tensors.items()}
    params = {k[len(PARAM):]: v for k, v in tensors.items() if k.startswith(PARAM)}
    optimizer = {k[len(OPTIM):]: v for k, v in tensors.items() if k.startswith(OPTIM)}
    if not params:
        raise FormatError(f"{path}: checkpoint holds no weights")
    if not isinstance(fields["classes"], list) or not isinstance(fields["config"], dict):
        raise FormatError(f"{path}: checkpoint metadata 'classes' or 'config' has the wrong type")
    classes = fields["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        raise FormatError(f"{path}: checkpoint metadata 'classes' must be a non-empty list of strings")
    check_classes(classes, lambda why: FormatError(f"{path}: checkpoint metadata 'classes' {why}"))
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
