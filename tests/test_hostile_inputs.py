"""Every command of mist-device and mist-cloud, run as a real subprocess over a table of bad inputs.

For each input: the exit status, exactly one ``Error:`` line on stderr (its last line), no traceback, and
every file that was valid before is byte-identical after. The sets are small (sklearn digits as tokens, a
random-init ``test_vit`` at 32 px), so the whole table runs in about a minute.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import digits_manifest, load_digits_tokens, write_digits_set
from hostile import assert_one_line_error, forge_checkpoint, forge_tensors, reseal_shard, run_cli, snapshot
from test_cloud_datasets import make_folder

from mist.device.cli import main as device_main
from mist.formats import FeatureSet, FeatureSetWriter
from mist.formats.manifest import MANIFEST_NAME

TRAIN = ["--rank", "8", "--heads", "2", "--epochs", "1", "--batch-size", "64", "--no-verify"]
TINY_CLOUD = ["--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0", "--threads", "1",
              "--progress", "none"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valid")
    train = write_digits_set(root / "train", slice(0, 200), shard_rows=64)
    test = write_digits_set(root / "test", slice(200, 300), split="test", shard_rows=64)
    run_dir = root / "run"
    result = CliRunner().invoke(device_main, ["train", str(train), "--out", str(run_dir), *TRAIN])
    assert result.exit_code == 0, result.output
    return {"root": root, "train": train, "test": test, "run": run_dir, "ckpt": run_dir / "best.safetensors"}


def copy_set(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_manifest(directory: Path, edit: Callable[[dict], None]) -> Path:
    path = directory / MANIFEST_NAME
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    return directory


def write_rows(directory: Path, features: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Path:
    writer = FeatureSetWriter(directory, digits_manifest("train"), shard_rows=64)
    if len(features):
        writer.add(features, labels, ids)
    writer.close()
    return directory


def digits(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens, labels = load_digits_tokens()
    return tokens[:n, None], labels[:n], np.arange(n)


def shard_listed_twice(fx, tmp):
    def edit(obj):
        obj["shards"].append(obj["shards"][0])
        obj["rows"] += obj["shards"][0]["rows"]
    return ["verify", edit_manifest(copy_set(fx["train"], tmp / "twice"), edit)]


def duplicate_ids(fx, tmp):
    x, y, ids = digits(100)
    ids[50] = ids[10]
    return ["verify", write_rows(tmp / "dup", x, y, ids)]


def nan_rows(fx, tmp):
    x, y, ids = digits(100)
    x[70, 0, 3, 2] = np.nan
    return ["verify", "--deep", write_rows(tmp / "nan", x, y, ids)]


def empty_set(fx, tmp):
    x, y, ids = digits(0)
    return ["verify", write_rows(tmp / "empty", x, y, ids)]


def shard_moved(fx, tmp):
    directory = copy_set(fx["train"], tmp / "moved")
    reseal_shard(directory, 1, shard_index="0", row_start="0")
    return ["info", directory]


def shard_of_another_set(fx, tmp):
    directory = copy_set(fx["train"], tmp / "foreign")
    reseal_shard(directory, 0, set_identity="0" * 64)
    return ["evaluate", fx["ckpt"], directory]


def ckpt(**changes):
    def make(fx, tmp):
        return forge_checkpoint(fx["ckpt"], tmp / "forged.safetensors", **changes)
    return make


def cmd(command: str, forged: Callable, *rest: str, with_set: bool = True):
    def make(fx, tmp):
        return [command, forged(fx, tmp), *([fx["test"]] if with_set else []), *rest]
    return make


def nan_head(fx, tmp):
    from safetensors.numpy import load_file

    head = load_file(str(fx["ckpt"]))["param.head.weight"].copy()
    head[0, 0] = np.inf
    return forge_tensors(fx["ckpt"], tmp / "nan.safetensors", param__head__weight=head)


def train_args(*flags: str):
    return lambda fx, tmp: ["train", fx["train"], "--out", tmp / "r", *TRAIN, *flags]


CLASSES = [str(i) for i in range(10)]

DEVICE_CASES = {
    # flags: usage errors (status 2), before any work
    "lr nan": (train_args("--lr", "nan"), 2, "'--lr'"),
    "warmup inf": (train_args("--warmup", "inf"), 2, "'--warmup'"),
    "val-split nan": (train_args("--val-split", "nan"), 2, "'--val-split'"),
    "input-scale -inf": (train_args("--input-scale", "-inf"), 2, "'--input-scale'"),
    "label-smoothing nan": (train_args("--label-smoothing", "nan"), 2, "'--label-smoothing'"),
    "seed negative": (train_args("--seed", "-1"), 2, "'--seed'"),
    "threads zero": (train_args("--threads", "0"), 2, "'--threads'"),
    "max-memory junk": (train_args("--max-memory", "lots"), 2, "'--max-memory'"),
    "blocks too many for memory": (train_args("--blocks-per-group", "100000"), 2, "needs about"),
    "over --max-memory": (train_args("--blocks-per-group", "50", "--max-memory", "1M"), 2, "more than --max-memory"),
    "evaluate batch 0": (lambda fx, tmp: ["evaluate", fx["run"], fx["test"], "--batch-size", "0"], 2, "'--batch-size'"),
    "predict top-k 0": (lambda fx, tmp: ["predict", fx["run"], fx["test"], "--top-k", "0"], 2, "'--top-k'"),
    # checkpoints whose metadata disagree with their weights
    "classes too short": (cmd("evaluate", ckpt(classes=["0", "1"])), 1, "classes"),
    "classes not strings": (cmd("predict", ckpt(classes=list(range(10)))), 1, "list of strings"),
    "classes repeated": (cmd("evaluate", ckpt(classes=["0"] * 10)), 1, "twice"),
    "classes renamed": (cmd("evaluate", ckpt(classes=[f"c{i}" for i in range(10)])), 1, "classes differ"),
    "config more blocks": (cmd("predict", ckpt(config={**json.loads('{}'), "dim": 16, "tokens": 8, "groups": 1,
                                                        "num_classes": 10, "rank": 8, "heads": 2,
                                                        "blocks_per_group": 10**9})), 1, "weight arrays"),
    "config boolean rank": (cmd("evaluate", ckpt(config={"dim": 16, "tokens": 8, "groups": 1, "num_classes": 10,
                                                         "rank": True, "heads": 2})), 1, "'rank'"),
    "config not JSON": (cmd("evaluate", ckpt(config="{not json")), 1, "not valid JSON"),
    "feature_set no layout": (cmd("predict", ckpt(feature_set={"fingerprint": "x"})), 1, "layout"),
    "infinite weights": (cmd("evaluate", nan_head), 1, "NaN or infinite"),
    "export refuses short classes": (cmd("export", ckpt(classes=["0"]), "--out", "OUT", with_set=False), 1, "classes"),
    "export refuses infinite weights": (cmd("export", nan_head, "--out", "OUT", with_set=False), 1, "NaN or infinite"),
    # feature sets
    "shard listed twice": (shard_listed_twice, 1, "a second time"),
    "duplicate row ids": (duplicate_ids, 1, "more than one row"),
    "NaN rows, verify --deep": (nan_rows, 1, "NaN or infinite features"),
    "empty set": (empty_set, 1, "empty feature set"),
    "shard moved": (shard_moved, 1, "shard metadata says shard_index"),
    "shard of another set": (shard_of_another_set, 1, "another feature set"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEVICE_CASES))
def test_device_refuses_in_one_line_and_alters_nothing(fx, tmp_path, name):
    make, code, contains = DEVICE_CASES[name]
    args = [tmp_path / "out.safetensors" if a == "OUT" else a for a in make(fx, tmp_path)]
    before = snapshot(fx["root"])
    result = run_cli("device", *args)
    assert_one_line_error(result, code, contains)
    assert snapshot(fx["root"]) == before
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_closed_pipe_ends_quietly(fx):
    for command in (["evaluate", fx["run"], fx["test"]],
                    ["predict", fx["run"], fx["test"], "--format", "json", "--top-k", "10"]):
        result = run_cli("device", *command, shell_tail="| head -c 20")
        assert result.code in (0, 141) and result.stderr == "", result
    # `true` reads nothing and is gone before Python has started: the first write meets a closed pipe.
    result = run_cli("device", "predict", fx["run"], fx["test"], shell_tail="| true")
    assert result.code == 141 and result.stderr == "", result


@pytest.mark.slow
def test_overwrite_keeps_old_metrics_until_the_new_run_replaces_them(fx, tmp_path):
    run_dir = copy_set(fx["run"], tmp_path / "run")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "last.safetensors.tmp").mkdir()  # the new run cannot write its checkpoint
    result = run_cli("device", "train", fx["train"], "--out", run_dir, *TRAIN, "--overwrite")
    assert_one_line_error(result, 1, "last.safetensors")
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_names_the_path(fx, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = run_cli("device", "predict", fx["run"], fx["test"], "--out", out / "p.csv")
        assert_one_line_error(result, 1, str(out / "p.csv"))
    finally:
        out.chmod(0o755)


HOSTILE_NAMES = ["a,b", 'say "hi"', "two\nlines", "\x1b[31mred\x1b[0m", "tab\there", " edge ", "é ✓", "\u202eevil",
                 "\ud800", "=1+1"]


@pytest.mark.slow
def test_any_class_name_gives_valid_csv_json_and_safe_text(tmp_path):
    source = FeatureSet(write_digits_set(tmp_path / "plain", slice(0, 300), shard_rows=128))
    manifest = dataclasses.replace(source.manifest, classes=HOSTILE_NAMES)
    named = tmp_path / "named"
    writer = FeatureSetWriter(named, manifest, shard_rows=128)
    writer.add(source.read(np.arange(len(source))), source.labels, source.ids)
    writer.close()
    run_dir = tmp_path / "run"
    assert run_cli("device", "train", named, "--out", run_dir, *TRAIN).code == 0

    for command in (["info", named], ["evaluate", run_dir, named], ["verify", named]):
        result = run_cli("device", *command)
        assert result.code == 0 and "Traceback" not in result.stderr, result
        assert "\x1b" not in result.stdout and "\u202e" not in result.stdout and "two\nlines" not in result.stdout

    report = json.loads(run_cli("device", "evaluate", run_dir, named, "--json").stdout)
    assert len(report["classes"]) == 10 and report["classes"][:8] == HOSTILE_NAMES[:8]
    records = json.loads(run_cli("device", "predict", run_dir, named, "--format", "json").stdout)
    assert len(records) == 300 and all(r["label"] in report["classes"] for r in records)

    result = run_cli("device", "predict", run_dir, named, "--top-k", "3")
    rows = list(csv.reader(io.StringIO(result.stdout, newline="")))
    assert rows[0] == ["id", "label", "prediction", "class1", "p1", "class2", "p2", "class3", "p3"]
    assert len(rows) == 301 and all(len(r) == 9 for r in rows)
    shown = {r[1] for r in rows[1:]}
    assert shown <= (set(HOSTILE_NAMES) - {"\ud800"}) | {"\\ud800"}, shown
    assert "\x1b[31mred\x1b[0m" in shown  # exact: click strips ESC sequences off a pipe unless told not to
    out = tmp_path / "p.csv"
    assert run_cli("device", "predict", run_dir, named, "--top-k", "3", "--out", out).code == 0
    assert list(csv.reader(io.StringIO(out.read_text("utf-8"), newline="")))[1:] == rows[1:]


# ---- mist-cloud -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_fx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cloud")
    data = make_folder(root / "data", bad=False)
    out = root / "set"
    result = run_cli("cloud", "extract", *TINY_CLOUD, "--data", data, "--out", out, "--groups", "last")
    assert result.code == 0, result
    return {"root": root, "data": data, "set": out}


def extract(*flags: str, out: str = "new"):
    return lambda fx, tmp: ["extract", *TINY_CLOUD, "--data", fx["data"], "--out",
                            fx["set"] if out == "set" else tmp / out, *flags]


CLOUD_CASES = {
    "seed negative": (extract("--seed", "-1"), 2, "'--seed'"),
    "batch size 0": (extract("--batch-size", "0"), 2, "'--batch-size'"),
    "workers negative": (extract("--workers", "-2"), 2, "'--workers'"),
    "img-size the patches do not divide": (extract("--img-size", "30"), 1, "cannot run on a 3x30x30 input"),
    "model-kwargs it cannot build": (extract("--model-kwargs", '{"depth": -1}'), 1, "cannot be built"),
    "over --max-memory": (extract("--max-memory", "1K"), 1, "more than --max-memory"),
    "complete set, no --overwrite": (extract("--groups", "last", out="set"), 1, "already complete"),
    "info at an absurd size": (lambda fx, tmp: ["info", "test_vit", "--img-size", "100000"], 1, "--img-size 100000"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLOUD_CASES))
def test_cloud_refuses_in_one_line_and_alters_nothing(cloud_fx, tmp_path, name):
    make, code, contains = CLOUD_CASES[name]
    before = snapshot(cloud_fx["root"])
    result = run_cli("cloud", *make(cloud_fx, tmp_path))
    assert_one_line_error(result, code, contains)
    assert snapshot(cloud_fx["root"]) == before


@pytest.mark.slow
def test_export_carries_no_local_path_and_still_predicts(fx, tmp_path):
    out = tmp_path / "adaptor.safetensors"
    assert run_cli("device", "export", fx["run"], "--out", out).code == 0
    blob = out.read_bytes()
    assert str(fx["root"]).encode() not in blob and b'"directory"' not in blob
    direct = run_cli("device", "predict", fx["run"], fx["test"])
    exported = run_cli("device", "predict", out, fx["test"])
    assert exported.code == 0 and exported.stdout == direct.stdout
