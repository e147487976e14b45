"""int8/int4 sets through both CLIs: `mist-cloud extract --dtype`, `mist-cloud convert`, and every
`mist-device` command on real (sklearn digits) quantised sets."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import digits_manifest, load_digits_tokens
from format_fixtures import make_manifest, make_rows, write_set

from mist.cloud.cli import main as cloud
from mist.device.cli import main as device
from mist.formats import FeatureSet, FeatureSetWriter, Manifest
from mist.formats.atomic import atomic_write_json
from mist.formats.quant import decode_features, encode_features

TINY = ["--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0", "--threads", "1",
        "--progress", "none", "--data", "fashion-mnist", "--split", "test", "--limit", "24", "--groups", "2,3",
        "--batch-size", "8", "--shard-rows", "8"]
FAST = ["--rank", "8", "--heads", "2", "--epochs", "6", "--batch-size", "32", "--lr", "1e-2", "--warmup", "1"]


def invoke(cli, *args: object, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        if result.exit_code != 2:  # not a click usage error: one of ours, a single line after any progress
            last = result.output.strip().splitlines()[-1]
            assert last.startswith("Error: ") and result.output.count("Error") == 1, result.output
    return result


def shard_digests(directory: Path) -> list[str]:
    return [s.sha256 for s in Manifest.load(directory / "manifest.json").shards]


# ---- cloud --------------------------------------------------------------------------------------------------


def test_extract_quantises_the_fp32_sums_and_convert_gives_the_same_bytes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from test_cloud_datasets import HAVE_FMNIST

    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed")
    invoke(cloud, "extract", *TINY, "--dtype", "float32", "--out", tmp_path / "f32")
    full = FeatureSet(tmp_path / "f32").read(np.arange(24))
    for dtype in ("int8", "int4"):
        invoke(cloud, "extract", *TINY, "--dtype", dtype, "--out", tmp_path / dtype)
        fs = FeatureSet(tmp_path / dtype, verify=True)
        assert fs.manifest.dtype == dtype and fs.row_shape == (2, 5, 64)
        expected = decode_features(encode_features(full, dtype), dtype, fs.row_shape)
        assert np.array_equal(fs.read(np.arange(24)), expected)
        invoke(cloud, "convert", tmp_path / "f32", "--dtype", dtype, "--out", tmp_path / f"{dtype}-converted")
        assert shard_digests(tmp_path / f"{dtype}-converted") == shard_digests(tmp_path / dtype)
        assert FeatureSet(tmp_path / f"{dtype}-converted").fingerprint == fs.fingerprint


@pytest.fixture
def float_set(tmp_path: Path) -> Path:
    m = make_manifest(dtype="float32", dim=7)
    write_set(tmp_path / "src", m, *make_rows(m, 40))
    return tmp_path / "src"


def test_convert_resumes_after_a_crash(float_set: Path, tmp_path: Path) -> None:
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    invoke(cloud, "convert", float_set, "--dtype", "int4", "--out", clean)
    shutil.copytree(clean, crashed)
    # What a kill -9 after the first shard leaves: a manifest listing one shard, a later file on disk.
    m = Manifest.load(crashed / "manifest.json")
    atomic_write_json(crashed / "manifest.json", m.with_shards(m.shards[:1], complete=False).to_json())
    (crashed / "shard-00002.safetensors").write_bytes(b"half a shard")
    result = invoke(cloud, "convert", float_set, "--dtype", "int4", "--out", crashed)
    assert "resuming: 16 rows in 1 shard " in result.output
    assert shard_digests(crashed) == shard_digests(clean) and len(shard_digests(clean)) == 3
    assert FeatureSet(crashed, verify=True).ids.tolist() == FeatureSet(float_set).ids.tolist()


def test_convert_back_to_float16_and_between_quantised_dtypes(float_set: Path, tmp_path: Path) -> None:
    invoke(cloud, "convert", float_set, "--dtype", "int8", "--out", tmp_path / "i8", "--shard-rows", "9")
    invoke(cloud, "convert", tmp_path / "i8", "--dtype", "float16", "--out", tmp_path / "f16")
    invoke(cloud, "convert", tmp_path / "i8", "--dtype", "int4", "--out", tmp_path / "i4")
    i8, f16 = FeatureSet(tmp_path / "i8"), FeatureSet(tmp_path / "f16")
    assert [s.rows for s in i8.manifest.shards] == [9, 9, 9, 9, 4]
    assert [s.rows for s in f16.manifest.shards] == [9, 9, 9, 9, 4]  # the source's shard size by default
    rows = np.arange(40)
    assert np.allclose(f16.read(rows), i8.read(rows), rtol=2 ** -10)
    assert FeatureSet(tmp_path / "i4").manifest.dtype == "int4"


def test_convert_refusals_are_one_line_and_keep_what_exists(float_set: Path, tmp_path: Path) -> None:
    assert "is the set being converted" in invoke(cloud, "convert", float_set, "--dtype", "int8", "--out",
                                                  float_set, ok=False).output
    invoke(cloud, "convert", float_set, "--dtype", "int8", "--out", tmp_path / "done")
    before = shard_digests(tmp_path / "done")
    assert "already complete" in invoke(cloud, "convert", float_set, "--dtype", "int8", "--out",
                                        tmp_path / "done", ok=False).output
    assert shard_digests(tmp_path / "done") == before
    assert "--dtype" in invoke(cloud, "convert", float_set, "--dtype", "int3", "--out", tmp_path / "x",
                               ok=False).output
    # Values an fp16 scale cannot hold: refused, naming the source set and the rows.
    huge = make_manifest(dtype="float32")
    features, labels, ids = make_rows(huge, 20)
    features[13] *= 1e8
    write_set(tmp_path / "huge", huge, features, labels, ids)
    message = invoke(cloud, "convert", tmp_path / "huge", "--dtype", "int8", "--out", tmp_path / "h8",
                     ok=False).output
    assert str(tmp_path / "huge") in message and "too large for an fp16 scale" in message


# ---- device -------------------------------------------------------------------------------------------------


def write_digits(directory: Path, rows: slice, split: str, dtype: str) -> Path:
    images, labels = load_digits_tokens()
    writer = FeatureSetWriter(directory, replace(digits_manifest(split), dtype=dtype), shard_rows=128)
    writer.add(images[rows, None], labels[rows], np.arange(len(labels))[rows])
    writer.close()
    return directory


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_every_device_command_takes_a_quantised_set(tmp_path: Path, dtype: str) -> None:
    train = write_digits(tmp_path / "train", slice(0, 1200), "train", dtype)
    test = write_digits(tmp_path / "test", slice(1200, None), "test", dtype)
    text = invoke(device, "info", train).output
    assert f"dtype={dtype}" in text
    per_image = {"int8": "144 bytes shipped (56.2% of float16)", "int4": "80 bytes shipped (31.2% of float16)"}
    assert per_image[dtype] in text  # T=8, d=16: 128 codes (or 64 bytes) + 8 fp16 scales
    assert json.loads(invoke(device, "info", "--json", train).output)["quantization"]["bits"] == int(dtype[3:])
    assert "checksums match" in invoke(device, "verify", train).output
    invoke(device, "train", train, "--out", tmp_path / "run", "--val", test, *FAST)
    report = json.loads(invoke(device, "evaluate", tmp_path / "run", test, "--json").output)
    assert report["accuracy"] > 0.8, report["accuracy"]
    predictions = invoke(device, "predict", tmp_path / "run", test, "--format", "json").output
    assert len(json.loads(predictions)) == len(FeatureSet(test))


def test_device_refuses_a_damaged_quantised_set_in_one_line(tmp_path: Path) -> None:
    train = write_digits(tmp_path / "train", slice(0, 300), "train", "int8")
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["quantization"]["bits"] = 3
    (train / "manifest.json").write_text(json.dumps(manifest))
    for command in (["info", train], ["verify", train], ["train", train, "--out", tmp_path / "run"]):
        assert "field 'quantization' does not describe" in invoke(device, *command, ok=False).output
