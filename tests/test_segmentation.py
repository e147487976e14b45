"""Segmentation sets: the folder layout, the mask following the image's geometry, hostile masks refused in
one line, label maps in the shards (old sets unchanged), and the walk-through extract -> train -> evaluate /
report / predict on a tiny random ViT with real Fashion-MNIST canvases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mist.cloud.backbones import make_transform
from mist.cloud.cli import main
from mist.cloud.datasets import open_source
from mist.cloud.errors import CloudError
from mist.cloud.segmentation import mask_transform, sample_labels
from mist.formats import FeatureSet, FormatError, Manifest
from mist.formats.manifest import MANIFEST_NAME

TINY = ["--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0", "--threads", "1",
        "--progress", "none", "--groups", "1,2"]
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()


def make_seg_folder(root: Path, n: int = 6, size: tuple[int, int] = (40, 30), classes: int = 3) -> Path:
    """Blocky random label maps (each 5x5 block one class), their images coloured by class."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(f"class{c}" for c in range(classes)) + "\n")
    for i in range(n):
        blocks = rng.integers(0, classes, (size[1] // 5, size[0] // 5))
        mask = np.kron(blocks, np.ones((5, 5), np.int64)).astype(np.uint8)
        Image.fromarray((mask * 80).astype(np.uint8)).convert("RGB").save(root / "images" / f"im{i}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"im{i}.png")
    return root


def test_layout_is_detected_and_read_in_name_order(tmp_path: Path) -> None:
    source = open_source(str(make_seg_folder(tmp_path / "d")))
    assert source.kind == "segmentation" and source.classes == ["class0", "class1", "class2"]
    assert [p.name for p in source.paths] == [f"im{i}.png" for i in range(6)]
    assert [p.parent.name for p in source.masks] == ["masks"] * 6 and (source.labels == -1).all()


@pytest.mark.parametrize("config", [
    {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
    {"input_size": (3, 48, 48), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"},
])
def test_mask_follows_the_image_geometry(config: dict) -> None:
    """Compose a known mask with the transform: the image, coloured by class and moved by the backbone's own
    transform (bicubic, normalised), must show the class the mask transform put at each pixel wherever the
    mask is flat around it (an interpolated image blends colours only at class borders)."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 3, (4, 5))
    mask = np.kron(blocks, np.ones((24, 24), np.int64)).astype(np.uint8)  # 120 x 96, not square
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    image = Image.fromarray(colours[mask])
    config = {**config, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    pixels = make_transform(config)(image).numpy().transpose(1, 2, 0) * 255
    moved = mask_transform(make_transform(config))(Image.fromarray(mask, "L"))
    assert moved.shape == pixels.shape[:2]
    nearest = np.argmin(((pixels[:, :, None, :] - colours[None, None].astype(float)) ** 2).sum(-1), axis=-1)
    padded = np.pad(moved, 1, mode="edge")
    flat = np.ones_like(moved, bool)
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            flat &= padded[1 + dy:1 + dy + moved.shape[0], 1 + dx:1 + dx + moved.shape[1]] == moved
    assert flat.mean() > 0.3
    assert (nearest[flat] == moved[flat]).all()


def test_label_sampling_reads_block_centres() -> None:
    masks = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    np.testing.assert_array_equal(sample_labels(masks, (4, 4))[0], masks[0, 1::2, 1::2])
    np.testing.assert_array_equal(sample_labels(masks, (8, 8)), masks)


@pytest.mark.parametrize("damage,message", [
    ("size", "pixels, its image im1.png is 40x30"),
    ("label", "label 7 names no class"),
    ("orphan-mask", "a mask without its image"),
    ("orphan-image", "an image without its mask"),
    ("rgb-mask", "mode RGB; a mask is an 8-bit label map"),
    ("classes", "names no classes"),
])
def test_hostile_masks_are_one_line_errors(tmp_path: Path, damage: str, message: str) -> None:
    root = make_seg_folder(tmp_path / "d")
    mask = root / "masks" / "im1.png"
    if damage == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    elif damage == "label":
        values = np.asarray(Image.open(mask)).copy()
        values[3, 4] = 7
        Image.fromarray(values).save(mask)
    elif damage == "orphan-mask":
        (root / "images" / "im1.png").unlink()
    elif damage == "orphan-image":
        mask.unlink()
    elif damage == "rgb-mask":
        Image.open(mask).convert("RGB").save(mask)
    elif damage == "classes":
        (root / "classes.txt").write_text("\n\n")
    with pytest.raises(CloudError, match="names no class|" + message) as caught:
        open_source(str(root))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    result = CliRunner().invoke(main, ["extract", *TINY, "--data", str(root), "--out", str(tmp_path / "set")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "set").exists()  # refused before the model loads or anything is written


def test_ignore_label_is_accepted_and_shipped(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path / "d", n=4)
    values = np.asarray(Image.open(root / "masks" / "im0.png")).copy()
    values[:, :] = 255
    Image.fromarray(values).save(root / "masks" / "im0.png")
    out = tmp_path / "set"
    result = CliRunner().invoke(main, ["extract", *TINY, "--data", str(root), "--out", str(out),
                                       "--label-multiple", "2"])
    assert result.exit_code == 0, result.output
    fs = FeatureSet(out, verify=True)
    m = fs.manifest
    assert m.task == {"kind": "segmentation", "label_size": [4, 4], "ignore_index": 255}  # 2x the 2x2 grid
    assert json.loads((out / MANIFEST_NAME).read_text())["format_version"] == 3
    masks = fs.read_masks(np.arange(len(fs)))
    assert masks.shape == (4, 4, 4) and (masks[fs.ids == 0] == 255).all()
    assert set(np.unique(masks[fs.ids != 0])) <= {0, 1, 2}


def test_classification_sets_stay_version_1_and_refuse_label_reads(tmp_path: Path) -> None:
    from test_cloud_datasets import make_folder

    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "set"
    result = CliRunner().invoke(main, ["extract", *TINY, "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    body = json.loads((out / MANIFEST_NAME).read_text())
    assert body["format_version"] == 1 and "task" not in body
    with pytest.raises(FormatError, match="holds no label maps"):
        FeatureSet(out).read_masks(np.arange(1))


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update(kind="depth"), "must be 'segmentation'"),
    (lambda t: t.update(label_size=[5, 4]), "token grid times 1 to 16"),
    (lambda t: t.update(ignore_index=0), "must be 255"),
])
def test_manifest_task_is_checked(tmp_path: Path, change, message: str) -> None:
    root = make_seg_folder(tmp_path / "d", n=2)
    out = tmp_path / "set"
    assert CliRunner().invoke(main, ["extract", *TINY, "--data", str(root), "--out", str(out)]).exit_code == 0
    body = json.loads((out / MANIFEST_NAME).read_text())
    change(body["task"])
    with pytest.raises(FormatError, match=message):
        Manifest.from_json(body)
    body = json.loads((out / MANIFEST_NAME).read_text())
    body["format_version"] = 2
    with pytest.raises(FormatError, match="needs format_version 3"):
        Manifest.from_json(body)


def test_palette_png_is_a_valid_png(tmp_path: Path) -> None:
    from mist.device.png import label_palette, write_png

    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_png(tmp_path / "m.png", mask, label_palette())
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and im.size == (4, 3)
        np.testing.assert_array_equal(np.asarray(im), mask)
        assert im.getpalette()[3:6] == list(label_palette()[1])
    raw = (tmp_path / "m.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and zlib.crc32(raw[12:29]) == int.from_bytes(raw[29:33], "big")


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)
    assert (result.returncode == 0) == ok, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_walk_through_extract_train_evaluate_report_predict(tmp_path: Path) -> None:
    """docs/segmentation.md, small: real Fashion-MNIST canvases, a random tiny ViT, every step a subprocess."""
    from benchmarks.tasks.segmentation import generate

    generate(tmp_path / "task", train=24, test=8, canvas=64)
    feats = {}
    for split in ("train", "test"):
        feats[split] = tmp_path / "feats" / split
        _cli("mist.cloud", "extract", "--model", "test_vit", "--random-init", "--img-size", "64", "--groups", "1,2",
             "--workers", "0", "--progress", "none", "--data", str(tmp_path / "task" / split),
             "--out", str(feats[split]))
    run = tmp_path / "run"
    _cli("mist.device", "verify", str(feats["train"]))
    out = _cli("mist.device", "train", str(feats["train"]), "--out", str(run), "--model", "auto", "--val-split",
               "0.25", "--epochs", "3", "--rank", "8", "--heads", "2").stdout
    assert "chose dense-" in out
    summary = json.loads((run / "dense.json").read_text())
    assert [c["name"] for c in summary["candidates"]] == ["dense-probe-lr-0.01", "dense-probe-lr-0.03",
                                                          "dense-probe-lr-0.1", "dense-lae-lr-0.001"]
    best = max(summary["candidates"], key=lambda c: c["val_miou"])
    assert (summary["chosen_name"], summary["chosen"]) == (best["name"], best["kind"])
    result = json.loads(_cli("mist.device", "evaluate", str(run), str(feats["test"]), "--json").stdout)
    assert result["images"] == 8 and 0 <= result["miou"] <= 1 and result["pixels"] == 8 * 16 * 16
    assert len(result["per_class"]) == 11 and result["per_class"][0]["class"] == "background"
    _cli("mist.device", "report", str(run), str(feats["test"]))
    with Image.open(run / "report" / "masks.png") as im:
        assert im.mode == "RGB" and im.size[0] == 2 * 16 * 4 + 4
    _cli("mist.device", "predict", str(run), str(feats["test"]), "--out", str(tmp_path / "masks"))
    written = sorted((tmp_path / "masks").iterdir())
    assert len(written) == 8
    with Image.open(written[0]) as im:
        assert im.mode == "P" and im.size == (16, 16) and np.asarray(im).max() < 11
    # a second train into the same run, and a search option dense training lacks: one line each
    refused = _cli("mist.device", "train", str(feats["train"]), "--out", str(run), "--epochs", "1", ok=False)
    assert "already holds a run" in refused.stderr and "Traceback" not in refused.stderr
    refused = _cli("mist.device", "train", str(feats["train"]), "--out", str(tmp_path / "r2"), "--resume", ok=False)
    assert "--resume does not apply to a segmentation set" in refused.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_predict_server_writes_the_masks_of_the_extracted_features(tmp_path: Path) -> None:
    """predict --server on image files gives the masks predict gives on the same images' extracted features
    (served sums agree with extracted ones to a float16 step, so an argmax may flip at a rare pixel)."""
    from serve_helpers import Server

    from benchmarks.tasks.segmentation import generate

    generate(tmp_path / "task", train=8, test=0, canvas=64)
    backbone = ["--model", "test_vit", "--random-init", "--img-size", "64", "--groups", "1,2"]
    feats, run = tmp_path / "feats", tmp_path / "run"
    _cli("mist.cloud", "extract", *backbone, "--workers", "0", "--progress", "none", "--data",
         str(tmp_path / "task" / "train"), "--out", str(feats))
    _cli("mist.device", "train", str(feats), "--out", str(run), "--model", "lae", "--epochs", "2", "--rank", "8")
    _cli("mist.device", "predict", str(run), str(feats), "--out", str(tmp_path / "local"))
    images = sorted(str(p) for p in (tmp_path / "task" / "train" / "images").iterdir())
    server = Server(tmp_path / "serve.log", *backbone, token=None)
    try:
        _cli("mist.device", "predict", str(run), *images, "--server", server.url, "--out", str(tmp_path / "remote"))
    finally:
        server.stop()
    for i, image in enumerate(images):  # source ids are positions in name order
        with Image.open(tmp_path / "local" / f"{i:06d}.png") as a, \
                Image.open(tmp_path / "remote" / f"{Path(image).stem}.png") as b:
            assert (np.asarray(a) == np.asarray(b)).mean() > 0.98


def test_writer_and_reader_refuse_label_values_beyond_the_classes(tmp_path: Path) -> None:
    from mist.formats import FeatureSetWriter
    from mist.formats.feature_set import MASKS
    from mist.formats.manifest import segmentation_task
    from mist.formats.safetensors_check import read_header

    manifest = Manifest(backbone={"name": "x", "weights_sha256": "0" * 64, "weights_source": "random-init"},
                        groups=[[1]], scale="none", tokens=4, prefix_tokens=0, grid=[2, 2], dim=3, dtype="float16",
                        data_config={}, classes=["bg", "a"], split="train", dataset={"hash": "h"},
                        task=segmentation_task([2, 2], 2))
    writer = FeatureSetWriter(tmp_path / "set", manifest, shard_rows=4)
    x, labels, ids = np.zeros((2, 1, 4, 3)), np.full(2, -1), np.arange(2)
    with pytest.raises(ValueError, match="below 2 or 255"):
        writer.add(x, labels, ids, np.full((2, 4, 4), 2, np.uint8))
    writer.add(x, labels, ids, np.full((2, 4, 4), 255, np.uint8))
    writer.close()
    shard = next((tmp_path / "set").glob("shard-*.safetensors"))
    entry = read_header(shard).tensors[MASKS]
    raw = bytearray(shard.read_bytes())
    raw[entry.offset + 5] = 9  # a flipped label byte: the checksum no longer matches, and the value names no class
    shard.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum mismatch"):
        FeatureSet(tmp_path / "set", verify=True)
    with pytest.raises(FormatError, match="label map of row 0 holds a value above the 2 classes"):
        FeatureSet(tmp_path / "set").read_masks(np.arange(2))
