"""A segmentation task from real images: Fashion-MNIST items composed on a canvas, labelled pixel by pixel.

Each canvas (224x224 by default, so Lite0's stage 4 or a ViT/16 sees a 14x14 token grid) holds 2 to 4 real
Fashion-MNIST items, each scaled to 48-96 px and pasted at a random place over a faint noise background.
Items are drawn one after the other, the later one nearer: where two overlap, the nearer item's pixels and
label win. A pixel is labelled with its item's class where the item's ink is brighter than ``INK`` (the
item's dark margin is background), otherwise 0 = background; no pixel is ignored (255) by this generator.

Training canvases use items of the training split only, test canvases items of the test split only. The
output is a segmentation folder (images/, masks/, classes.txt) that `mist-cloud extract --data DIR` reads:

    python -m benchmarks.tasks.segmentation --out runs/tasks/seg --train 400 --test 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.tasks.structured import load_items

FASHION_MNIST_LABELS = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
INK = 40  # an item pixel at or below this is the item's black margin: background in the label map
CANVAS = 224


def load_labels(split: str) -> np.ndarray:
    from benchmarks.tasks.structured import read_idx

    prefix = "train" if split == "train" else "t10k"
    path = FASHION_MNIST_LABELS / f"{prefix}-labels-idx1-ubyte.gz"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (install Debian's dataset-fashion-mnist)")
    return read_idx(path).astype(np.int64)


def compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS,
            ) -> tuple[np.ndarray, np.ndarray]:
    """One (canvas, canvas) greyscale image and its label map (0 = background, item class + 1)."""
    image = rng.integers(0, 24, (canvas, canvas)).astype(np.uint8)  # faint noise: no free "black = bg" rule
    mask = np.zeros((canvas, canvas), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        pick = int(rng.integers(len(items)))
        size = int(rng.integers(canvas * 3 // 14, canvas * 6 // 14 + 1))  # 48..96 px on 224
        item = np.asarray(Image.fromarray(items[pick]).resize((size, size), Image.BILINEAR))
        top, left = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
        ink = item > INK
        window = (slice(top, top + size), slice(left, left + size))
        image[window][ink] = item[ink]  # the nearer item covers what was drawn before
        mask[window][ink] = labels[pick] + 1
    return image, mask


def generate(out: Path, train: int, test: int, seed: int = 0, canvas: int = CANVAS) -> None:
    for split, count in (("train", train), ("test", test)):
        items, labels = load_items("fashion-mnist", split), load_labels(split)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        root = out / split
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        for i in range(count):
            image, mask = compose(items, labels, rng, canvas)
            Image.fromarray(image).convert("RGB").save(root / "images" / f"{i:05d}.png")
            Image.fromarray(mask, "L").save(root / "masks" / f"{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="Writes OUT/train and OUT/test.")
    p.add_argument("--train", type=int, default=400, help="Training canvases.")
    p.add_argument("--test", type=int, default=200, help="Test canvases.")
    p.add_argument("--canvas", type=int, default=CANVAS, help="Canvas side in pixels.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    generate(args.out, args.train, args.test, args.seed, args.canvas)


if __name__ == "__main__":
    main()
