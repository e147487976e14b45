"""Image sources for extraction: an ImageFolder tree, Fashion-MNIST IDX files, or a ``path,label`` list.

A source is a numbered list of items (id = position in the source) with labels known up front, so subsets
can be drawn without decoding anything. Decoding happens in DataLoader workers; an item that fails to
decode comes back as a skip record instead of an exception, so one bad file never ends a long run.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mist.formats import sha256_file

from .errors import CloudError
from .images import to_rgb

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_IDX_PREFIX = {"train": "train", "test": "t10k"}


@dataclass
class Source:
    """Items 0..n-1 with their labels (-1: unknown); ``load(i)`` decodes item i as an RGB image."""

    kind: str  # "image-folder", "fashion-mnist", "list" or "segmentation"
    root: str
    classes: list[str]
    labels: np.ndarray  # (n,) int64
    identity: str  # sha256 of what the items are (file hashes, or relative paths + sizes + labels)
    paths: list[Path] = field(default_factory=list)  # file sources
    pixels: np.ndarray | None = None  # IDX sources: (n, H, W) uint8
    masks: list[Path] = field(default_factory=list)  # segmentation sources: item i's label map (segmentation.py)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        if self.pixels is not None:
            return Image.fromarray(self.pixels[i]).convert("RGB")  # 2-D uint8: greyscale
        with Image.open(self.paths[i]) as image:
            # Every mode to the RGB a viewer shows (16-bit, float, alpha, EXIF orientation: cloud/images.py),
            # fully decoded here, inside the try of the caller.
            return to_rgb(image, str(self.paths[i]))

    def describe(self, i: int) -> str:
        return str(self.paths[i]) if self.paths else f"{self.kind} #{i}"


def open_source(spec: str, split: str = "train") -> Source:
    """``--data``: 'fashion-mnist[:DIR]', a segmentation folder (images/, masks/, classes.txt), an ImageFolder
    directory, or a CSV/text file of path,label."""
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        root = Path(spec.partition(":")[2] or FASHION_MNIST_DIR).resolve()
        return _fashion_mnist(root, split)
    path = Path(spec).resolve()  # absolute, so a resume from another working directory matches
    if path.is_dir():
        from .segmentation import is_segmentation_folder, open_segmentation

        return open_segmentation(path) if is_segmentation_folder(path) else _image_folder(path)
    if path.is_file():
        return _image_list(path)
    raise CloudError(f"--data {spec}: not a directory, a path,label list file, or fashion-mnist[:DIR]")


# ---- Fashion-MNIST (IDX) ----------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzipped or not: magic, dims as big-endian u32, then uint8s."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[:2] != b"\0\0" or head[2] != 0x08:
                raise CloudError(f"{path}: not an IDX file of unsigned bytes")
            raw_dims = f.read(4 * head[3])
            if len(raw_dims) != 4 * head[3]:
                raise CloudError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{head[3]}I", raw_dims)
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise CloudError(f"{path}: unreadable IDX file ({e.__class__.__name__}: {e})") from None
    if data.size != int(np.prod(dims)):
        raise CloudError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _fashion_mnist(root: Path, split: str) -> Source:
    if split not in _IDX_PREFIX:
        raise CloudError(f"--split {split}: Fashion-MNIST has the splits {', '.join(_IDX_PREFIX)}")
    files = []
    for part in ("images-idx3", "labels-idx1"):
        name = f"{_IDX_PREFIX[split]}-{part}-ubyte"
        found = [root / (name + ext) for ext in (".gz", "") if (root / (name + ext)).is_file()]
        if not found:
            raise CloudError(f"{root / name}.gz: missing (install Debian's dataset-fashion-mnist, "
                             "or pass fashion-mnist:DIR)")
        files.append(found[0])
    pixels, labels = read_idx(files[0]), read_idx(files[1]).astype(np.int64)
    if pixels.ndim != 3 or labels.shape != (len(pixels),):
        raise CloudError(f"{root}: image and label files do not match ({pixels.shape} vs {labels.shape})")
    identity = _sha256_text("".join(sha256_file(f) for f in files))
    return Source("fashion-mnist", str(root), list(FASHION_MNIST_CLASSES), labels, identity, pixels=pixels)


# ---- files on disk ----------------------------------------------------------------------------------------


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def _image_folder(root: Path) -> Source:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise CloudError(f"--data {root}: an ImageFolder needs one subfolder per class; found none")
    extensions = _image_extensions()
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in extensions
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise CloudError(f"--data {root}: no image files under its class folders")
    identity = _files_identity(paths, labels, root)
    return Source("image-folder", str(root), classes, np.array(labels, np.int64), identity, paths=paths)


def _image_list(list_file: Path) -> Source:
    try:
        text = list_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CloudError(f"--data {list_file}: unreadable list file ({e.__class__.__name__})") from None
    entries = []
    for row in csv.reader(line for line in text.splitlines() if line.strip() and not line.startswith("#")):
        if not row or len(row) > 2:
            raise CloudError(f"--data {list_file}: each line must be 'path' or 'path,label', got {row}")
        path, label = row[0].strip(), (row[1].strip() if len(row) > 1 else "")
        if not entries and (path.lower(), label.lower()) == ("path", "label"):
            continue  # header line
        entries.append((path, label))
    if not entries:
        raise CloudError(f"--data {list_file}: the list holds no images")
    names = {label for _, label in entries if label}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = sorted(names, key=(lambda n: int(n)) if numeric else None)
    index = {name: i for i, name in enumerate(classes)}
    # Relative paths are relative to the list file, so a dataset folder can carry its own list.
    paths = [Path(p) if Path(p).is_absolute() else list_file.parent / p for p, _ in entries]
    labels = [index[label] if label else -1 for _, label in entries]
    identity = _files_identity(paths, labels, list_file.parent)
    return Source("list", str(list_file), classes, np.array(labels, np.int64), identity, paths=paths)


def _files_identity(paths: Sequence[Path], labels: Sequence[int], root: Path) -> str:
    # Paths relative to the root plus sizes: cheap for 100k files, and it moves with the folder.
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        digest.update(f"{rel.as_posix()}\t{size}\t{label}\n".encode())
    return digest.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- subsets ----------------------------------------------------------------------------------------------


def select(labels: np.ndarray, limit: int | None = None, per_class: int | None = None,
           seed: int = 0) -> np.ndarray:
    """Source ids to extract, ascending: ``per_class`` random items of each label (unlabelled items count
    as one more class), then ``limit`` random items of those; the same seed always picks the same ids."""
    rng = np.random.default_rng(seed)
    ids = np.arange(len(labels), dtype=np.int64)
    if per_class is not None:
        picked = []
        for label in np.unique(labels):
            members = ids[labels == label]
            picked.append(rng.choice(members, min(per_class, len(members)), replace=False))
        ids = np.concatenate(picked) if picked else ids[:0]
    if limit is not None and limit < len(ids):
        ids = rng.choice(ids, limit, replace=False)
    return np.sort(ids)


def dataset_record(source: Source, split: str, ids: np.ndarray, limit: int | None, per_class: int | None,
                   seed: int) -> dict[str, Any]:
    """The manifest's ``dataset`` field; ``hash`` pins the exact images and their order."""
    ids_hash = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()
    return {
        "source": source.kind, "root": source.root, "split": split, "items": int(len(ids)),
        "source_items": len(source), "limit": limit, "per_class": per_class, "seed": seed,
        "hash": _sha256_text(json.dumps([source.kind, source.identity, ids_hash])),
    }


# ---- decoding in DataLoader workers -----------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Items ``ids`` of ``source``, transformed; a failed decode yields (None, label, id, reason)."""

    def __init__(self, source: Source, ids: np.ndarray, transform: Callable):
        self.source, self.ids, self.transform = source, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> tuple[torch.Tensor | None, int, int, str]:
        i = int(self.ids[j])
        label = int(self.source.labels[i])
        try:
            return self.transform(self.source.load(i)), label, i, ""
        except Exception as e:  # any decoder error: truncated, not an image, unsupported mode, ...
            reason = (str(e).splitlines() or [""])[0]
            return None, label, i, f"{e.__class__.__name__}: {reason}"


def collate(items: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Stack the decoded images; the failed ones travel beside them as (id, reason)."""
    good = [it for it in items if it[0] is not None]
    images = torch.stack([it[0] for it in good]) if good else None
    labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
    ids = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return images, labels, ids, [(it[2], it[3]) for it in items if it[0] is None]
