"""The last holes of issue 24's sections 2 and 3, each as a real subprocess: exit status, one error line, no
traceback, every valid file byte-identical afterwards (the conventions of test_hostile_inputs.py).

Class names a set cannot carry, non-regular shard files, a token grid that does not multiply to the token count,
convert's shard cap, `pull --overwrite` leftovers, the serve flags, a finished extraction refused before the
model loads, `train --out` over another run's best checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from digits_sets import digits_manifest, write_digits_set
from hostile import assert_one_line_error, run_cli, snapshot
from test_cloud_datasets import make_folder

from mist.formats import FeatureSet, FeatureSetWriter, FormatError
from mist.formats.manifest import MANIFEST_NAME, MAX_CLASSES

pytestmark = pytest.mark.slow

TRAIN = ["--rank", "8", "--heads", "2", "--epochs", "1", "--batch-size", "64"]
TINY_CLOUD = ["--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0", "--threads", "1",
              "--progress", "none"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("holes")
    train = write_digits_set(root / "train", slice(0, 300), shard_rows=128)
    test = write_digits_set(root / "test", slice(300, 400), split="test", shard_rows=64)
    run_dir = root / "run"
    assert run_cli("device", "train", train, "--out", run_dir, *TRAIN).code == 0
    return {"root": root, "train": train, "test": test, "run": run_dir}


def edited(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    obj = json.loads((target / MANIFEST_NAME).read_text())
    edit(obj)
    (target / MANIFEST_NAME).write_text(json.dumps(obj))
    return target


def refused(fx, *args, code: int = 1, contains: str = "", program: str = "device", timeout: float = 120):
    before = snapshot(fx["root"])
    started = time.monotonic()
    result = run_cli(program, *args, timeout=timeout)
    assert_one_line_error(result, code, contains)
    assert snapshot(fx["root"]) == before
    return time.monotonic() - started


# ---- class names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes, contains", [
    ([str(i % 5) for i in range(10)], "names the class '0' twice"),
    (["x" * 2_000_000] + [str(i) for i in range(1, 10)], "name 0 is 2,000,000 characters long"),
    ([f"c{i}" for i in range(300_000)], "holds 300,000 names"),
    (["", *map(str, range(1, 10))], "name 0 is 0 characters long"),
])
def test_class_names_a_set_cannot_carry_are_refused_by_verify_and_train(fx, tmp_path, classes, contains):
    forged = edited(fx["train"], tmp_path / "forged", lambda obj: obj.update(classes=classes))
    for command in (["verify", forged], ["train", forged, "--out", tmp_path / "r", *TRAIN]):
        refused(fx, *command, contains=f"field 'classes' {contains}")
    assert not (tmp_path / "r").exists()


def test_class_names_are_refused_where_a_set_is_made(fx, tmp_path):
    listing = tmp_path / "list.csv"
    image = make_folder(tmp_path / "images", bad=False)
    files = sorted(p for p in image.rglob("*") if p.is_file())
    listing.write_text(f"{files[0]},{'y' * 300}\n{files[1]},b\n")
    refused(fx, "extract", *TINY_CLOUD, "--data", listing, "--out", tmp_path / "out", program="cloud",
            contains="the class names name 1 is 300 characters long")
    assert not (tmp_path / "out").exists()
    manifest = dataclasses.replace(digits_manifest("train"), classes=["a", "b", "a"])
    with pytest.raises(FormatError, match="names the class 'a' twice"):
        FeatureSetWriter(tmp_path / "w", manifest)


def test_many_classes_are_sized_before_the_confusion_matrix(fx, tmp_path):
    # 40,000 classes is within the bound, but its confusion matrix (and its list form) is ~77 GB: refused by the
    # memory check, naming the classes, instead of dying in the allocation with a traceback.
    source = FeatureSet(fx["train"])
    many = dataclasses.replace(source.manifest, classes=[f"c{i}" for i in range(40_000)])
    wide = tmp_path / "wide"
    writer = FeatureSetWriter(wide, many, shard_rows=128)
    writer.add(source.read(np.arange(len(source))), source.labels, source.ids)
    writer.close()
    run_dir = tmp_path / "run"
    assert run_cli("device", "train", wide, "--out", run_dir, *TRAIN, "--rank", "4").code == 0
    for command in (["evaluate", run_dir, wide], ["report", run_dir, wide]):
        result = run_cli("device", *command)
        assert_one_line_error(result, 2, "scoring 40,000 classes needs about")
    assert MAX_CLASSES >= 40_000


# ---- non-regular files --------------------------------------------------------------------------------------


def test_a_fifo_shard_is_refused_at_once(fx, tmp_path):
    fifo_set = shutil.copytree(fx["train"], tmp_path / "fifo")
    shard = sorted(fifo_set.glob("shard-*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    commands = {"device": [["verify", fifo_set], ["info", fifo_set], ["train", fifo_set, "--out", tmp_path / "r"],
                           ["evaluate", fx["run"], fifo_set], ["predict", fx["run"], fifo_set],
                           ["report", fx["run"], fifo_set, "--out", tmp_path / "rep"],
                           ["pull", fifo_set, tmp_path / "pulled"]],
                "cloud": [["convert", fifo_set, "--dtype", "int8", "--out", tmp_path / "c"]]}
    for program, runs in commands.items():
        for command in runs:
            took = refused(fx, *command, program=program, contains="is a FIFO, not a regular file", timeout=60)
            assert took < 60
    manifest_fifo = tmp_path / "fifo-manifest"
    manifest_fifo.mkdir()
    os.mkfifo(manifest_fifo / MANIFEST_NAME)
    refused(fx, "verify", manifest_fifo, contains="is a FIFO", timeout=60)
    device_shard = shutil.copytree(fx["train"], tmp_path / "dev")
    shard = sorted(device_shard.glob("shard-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to("/dev/zero")
    refused(fx, "verify", device_shard, contains="is a device, not a regular file", timeout=60)


# ---- the manifest's token grid ------------------------------------------------------------------------------


def test_a_token_grid_that_does_not_multiply_to_the_count_is_refused(fx, tmp_path):
    forged = edited(fx["train"], tmp_path / "grid", lambda obj: obj["tokens"].update(grid=[3, 3]))
    for command in (["verify", forged], ["train", forged, "--out", tmp_path / "r", *TRAIN]):
        refused(fx, *command, contains="field 'tokens.grid' is 3x3 = 9 spatial tokens, but tokens.count - "
                                       "tokens.prefix is 8")


# ---- convert and pull ---------------------------------------------------------------------------------------


def test_convert_caps_its_shards_as_extraction_does(fx, tmp_path):
    from mist.cloud.convert import convert

    int4 = tmp_path / "int4"
    assert run_cli("cloud", "convert", fx["train"], "--dtype", "int4", "--out", int4).code == 0
    lines = []
    out = convert(int4, tmp_path / "f32", "float32", log=lines.append, max_shard_bytes=64 * 8 * 16 * 4)
    assert [s.rows for s in out.shards] == [64] * 4 + [44]  # 128 rows of 512 bytes would pass the cap
    assert any("shard rows 128 -> 64" in line for line in lines)
    assert all((tmp_path / "f32" / s.file).stat().st_size < 64 * 8 * 16 * 4 + 2048 for s in out.shards)
    np.testing.assert_array_equal(FeatureSet(tmp_path / "f32").read(np.arange(300)),
                                  FeatureSet(int4).read(np.arange(300)))


def test_pull_overwrite_removes_the_old_sets_extra_shards(fx, tmp_path):
    destination = shutil.copytree(fx["train"], tmp_path / "dest")  # three shards
    assert run_cli("device", "pull", fx["test"], destination).code == 1  # a different set: refused
    result = run_cli("device", "pull", fx["test"], destination, "--overwrite", "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout)["removed"] == ["shard-00002.safetensors"]  # the test set has two shards
    assert sorted(p.name for p in destination.iterdir()) == sorted(p.name for p in fx["test"].iterdir())
    assert snapshot(destination) == {str(destination / Path(k).name): v for k, v in snapshot(fx["test"]).items()}


# ---- train over another run ---------------------------------------------------------------------------------


def test_train_refuses_a_directory_holding_another_runs_best_checkpoint(fx, tmp_path):
    other = shutil.copytree(fx["run"], tmp_path / "other")
    (other / "last.safetensors").unlink()
    before = snapshot(other)
    result = run_cli("device", "train", fx["test"], "--out", other, *TRAIN)
    assert_one_line_error(result, 1, "--overwrite")
    assert snapshot(other) == before


# ---- mist-cloud flags and order -----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, contains", [
    (["--seed", str(2**64)], "'--seed'"),
    (["--seed", "-1"], "'--seed'"),
    (["--img-size", "0"], "'--img-size'"),
])
def test_serve_flags_are_checked_as_extract_checks_them(fx, flags, contains):
    took = refused(fx, "serve", *TINY_CLOUD[:3], *flags, program="cloud", code=2, contains=contains)
    assert took < 60


def test_a_finished_extraction_is_refused_before_the_model_loads(fx, tmp_path):
    data = make_folder(tmp_path / "images", bad=False)
    done = tmp_path / "done"
    assert run_cli("cloud", "extract", *TINY_CLOUD, "--data", data, "--out", done, "--groups", "last").code == 0
    before = snapshot(done)
    # a model name that cannot even be built: the refusal comes first, so it never tries
    result = run_cli("cloud", "extract", "--model", "no_such_model", "--random-init", "--data", data, "--out", done)
    assert_one_line_error(result, 1, "already complete; pass --overwrite")
    assert snapshot(done) == before
