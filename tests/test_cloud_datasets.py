"""Image sources: ImageFolder, path,label lists and Fashion-MNIST; reproducible subsets; bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mist.cloud.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageDataset,
    collate,
    dataset_record,
    open_source,
    select,
)
from mist.cloud.errors import CloudError

HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def make_folder(root: Path, bad: bool = True) -> Path:
    """cat/ and dog/ with small images of assorted modes, plus (optionally) two unreadable files."""
    rng = np.random.default_rng(0)
    for cls, n in (("dog", 3), ("cat", 4)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            image = image.convert(["RGB", "L", "RGBA", "P"][i % 4])
            image.save(root / cls / f"{i}.png")
    if bad:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "cat" / "trunc.jpg")
        data = (root / "cat" / "trunc.jpg").read_bytes()
        (root / "cat" / "trunc.jpg").write_bytes(data[: len(data) // 2])
        (root / "dog" / "notes.png").write_text("this is not a picture\n")
    (root / "dog" / "readme.txt").write_text("not an image extension: never listed\n")
    return root


def test_image_folder_lists_classes_and_files(tmp_path: Path) -> None:
    source = open_source(str(make_folder(tmp_path / "data")))
    assert source.kind == "image-folder" and source.classes == ["cat", "dog"]
    names = [p.relative_to(tmp_path / "data").as_posix() for p in source.paths]
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "cat/3.png", "cat/trunc.jpg",
                     "dog/0.png", "dog/1.png", "dog/2.png", "dog/notes.png"]
    assert source.labels.tolist() == [0] * 5 + [1] * 4
    assert all(source.load(i).mode == "RGB" for i in (0, 1, 2, 3))


def test_unreadable_images_come_back_as_skip_records(tmp_path: Path) -> None:
    source = open_source(str(make_folder(tmp_path / "data")))
    data = ImageDataset(source, np.arange(len(source)), transform=lambda im: torch.zeros(3))
    images, labels, ids, bad = collate([data[j] for j in range(len(data))])
    assert images.shape == (7, 3) and ids.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert [i for i, _ in bad] == [4, 8]
    assert all(reason and "\n" not in reason for _, reason in bad)


def test_list_file(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", bad=False)
    listing = tmp_path / "data" / "list.csv"
    listing.write_text("path,label\n# a comment\ncat/0.png,10\ndog/1.png,2\n\ncat/2.png,\n"
                       f"{tmp_path / 'data' / 'dog' / '0.png'},2\n")
    source = open_source(str(listing))
    assert source.kind == "list" and source.classes == ["2", "10"]  # numeric labels sort as numbers
    assert source.labels.tolist() == [1, 0, -1, 0]
    assert source.paths[0] == tmp_path / "data" / "cat" / "0.png"
    assert source.load(3).size == (10, 12)


def test_bad_data_specs(tmp_path: Path) -> None:
    with pytest.raises(CloudError, match="not a directory, a path,label list file"):
        open_source(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CloudError, match="one subfolder per class"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(CloudError, match="missing"):
        open_source(f"fashion-mnist:{tmp_path}")
    (tmp_path / "bad.csv").write_text("a,b,c\n")
    with pytest.raises(CloudError, match="'path' or 'path,label'"):
        open_source(str(tmp_path / "bad.csv"))


def test_select_is_reproducible_sorted_and_balanced() -> None:
    labels = np.repeat(np.arange(4), 25)
    a, b = select(labels, limit=10, seed=3), select(labels, limit=10, seed=3)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and len(a) == 10
    assert not np.array_equal(a, select(labels, limit=10, seed=4))
    per = select(labels, per_class=5, seed=0)
    assert np.bincount(labels[per]).tolist() == [5, 5, 5, 5] and np.all(np.diff(per) > 0)
    assert len(select(labels, per_class=5, limit=7, seed=0)) == 7
    assert np.array_equal(select(labels), np.arange(100))


def test_dataset_hash_pins_the_items() -> None:
    source = open_source("fashion-mnist", "test") if HAVE_FMNIST else None
    if source is None:
        pytest.skip("Fashion-MNIST is not installed")
    a = dataset_record(source, "test", np.arange(10), 10, None, 0)
    assert a == dataset_record(source, "test", np.arange(10), 10, None, 0)
    assert a["hash"] != dataset_record(source, "test", np.arange(1, 11), 10, None, 0)["hash"]


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST is not installed")
def test_fashion_mnist() -> None:
    source = open_source("fashion-mnist", "test")
    assert len(source) == 10000 and source.classes == FASHION_MNIST_CLASSES
    assert np.bincount(source.labels).tolist() == [1000] * 10
    image = source.load(0)
    assert image.mode == "RGB" and image.size == (28, 28)
    with pytest.raises(CloudError, match="splits train, test"):
        open_source("fashion-mnist", "val")


@pytest.mark.parametrize("content", [b"\0\0\x08\x03\0\0", b"\0\0\x08\x01\0\0\0\x05abc", b"not gzip at all"])
def test_damaged_idx_files_are_one_line_errors(tmp_path: Path, content: bytes) -> None:
    import gzip

    from mist.cloud.datasets import read_idx

    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(content)
    broken_gz = tmp_path / "y-idx3-ubyte.gz"
    broken_gz.write_bytes(gzip.compress(content)[:-6] if content.startswith(b"\0") else content)
    for path in (plain, broken_gz):
        with pytest.raises(CloudError):
            read_idx(path)
