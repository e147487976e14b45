"""The mist-device CLI end to end on small real sets (sklearn digits as tokens): no torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import write_digits_set

from mist.device.cli import main
from mist.formats import FeatureSet, load_checkpoint

FAST = ["--rank", "8", "--heads", "2", "--epochs", "10", "--batch-size", "32", "--lr", "1e-2", "--warmup", "1"]


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    return {
        "train": write_digits_set(root / "train", slice(0, 1200)),
        "test": write_digits_set(root / "test", slice(1200, None), split="test"),
        "unlabelled": write_digits_set(root / "unlabelled", slice(1200, 1300), split="x", unlabelled=True),
    }


@pytest.fixture(scope="module")
def trained(sets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run("train", sets["train"], "--out", run_dir, "--val", sets["test"], *FAST)
    return run_dir


def test_version_and_help():
    assert "mist-device" in run("--version").output
    text = run("train", "--help").output
    for flag in ("--rank", "--heads", "--epochs", "--batch-size", "--lr", "--weight-decay", "--warmup",
                 "--label-smoothing", "--seed", "--threads", "--val", "--val-split", "--resume"):
        assert flag in text
    assert "default: 32;" in text  # click shows "[env var: MIST_TRAIN_RANK; default: 32; x>=1]"


def test_info_and_verify(sets):
    text = run("info", sets["train"]).output
    assert "k=1" in text and "T=8" in text and "1,200 in" in text
    assert json.loads(run("info", "--json", sets["train"]).output)["rows"] == 1200
    assert "checksums match" in run("verify", sets["train"]).output


def test_train_writes_metrics_and_checkpoints(trained):
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 11))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "elapsed_s"):
        assert key in lines[-1]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["val_acc"] > 0.75  # chance is 0.1
    best = load_checkpoint(trained / "best.safetensors")
    assert best.resumable and best.classes == [str(i) for i in range(10)]


def test_evaluate_text_and_json(trained, sets):
    text = run("evaluate", trained, sets["test"]).output
    assert text.startswith("accuracy ") and "confusion" in text
    report = json.loads(run("evaluate", trained, sets["test"], "--json").output)
    assert report["rows"] == 597 and report["accuracy"] > 0.75
    confusion = np.array(report["confusion"])
    assert confusion.sum() == 597
    assert np.trace(confusion) / 597 == pytest.approx(report["accuracy"])
    # The text matrix numbers its columns as its rows, and each row is that class's counts.
    lines = text.split("confusion (rows: true class, columns: predicted class, numbered as the rows)\n")[1].splitlines()
    assert lines[0].split() == [str(j) for j in range(10)]
    for i, line in enumerate(lines[1:11]):
        assert [int(v) for v in line.split()[2:]] == confusion[i].tolist() and line.split()[:2] == [str(i), str(i)]


def test_predict_matches_evaluate(trained, sets, tmp_path):
    out = tmp_path / "pred.json"
    run("predict", trained, sets["test"], "--format", "json", "--top-k", "3", "--out", out)
    records = json.loads(out.read_text())
    assert len(records) == 597 and len(records[0]["top"]) == 3
    accuracy = np.mean([r["prediction"] == r["label"] for r in records])
    report = json.loads(run("evaluate", trained, sets["test"], "--json").output)
    assert accuracy == pytest.approx(report["accuracy"])
    csv = run("predict", trained, sets["unlabelled"], "--top-k", "2").output.splitlines()
    assert csv[0] == "id,label,prediction,class1,p1,class2,p2" and len(csv) == 101
    assert csv[1].split(",")[1] == ""  # unlabelled rows have no label


def test_export_is_slim_and_usable(trained, sets, tmp_path):
    out = tmp_path / "adaptor.safetensors"
    run("export", trained, "--out", out)
    slim = load_checkpoint(out)
    assert not slim.resumable and not slim.optimizer
    assert out.stat().st_size < (trained / "best.safetensors").stat().st_size
    a = json.loads(run("evaluate", out, sets["test"], "--json").output)["accuracy"]
    b = json.loads(run("evaluate", trained, sets["test"], "--json").output)["accuracy"]
    assert a == b


@pytest.mark.parametrize("flags, message", [
    (["--rank", "17"], "rank"),
    (["--rank", "6", "--heads", "4"], "heads"),
    (["--pool", "cls"], "class token"),
    (["--threads", "0"], "threads"),
])
def test_bad_flags_one_line(sets, tmp_path, flags, message):
    result = run("train", sets["train"], "--out", tmp_path / "r", *flags, ok=False)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_unlabelled_and_empty_sets_refused(sets, tmp_path):
    result = run("train", sets["unlabelled"], "--out", tmp_path / "r", *FAST, ok=False)
    assert result.exit_code == 1 and "no labelled rows" in result.output
    empty = write_digits_set(tmp_path / "empty", slice(0, 0))
    result = run("train", empty, "--out", tmp_path / "r2", *FAST, ok=False)
    assert result.exit_code == 1 and "empty" in result.output


def test_incompatible_val_set_names_field(sets, tmp_path):
    other = write_digits_set(tmp_path / "k2", slice(0, 100), k=2)
    result = run("train", sets["train"], "--out", tmp_path / "r", "--val", other, *FAST, ok=False)
    assert result.exit_code == 1 and "gather.groups" in result.output


def test_evaluate_refuses_other_backbone(trained, tmp_path):
    other = write_digits_set(tmp_path / "k2", slice(0, 100), k=2)
    result = run("evaluate", trained, other, ok=False)
    assert result.exit_code == 1 and "incompatible" in result.output


def test_corrupt_shard_one_line_error(sets, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sets["test"], broken)
    shard = sorted(broken.glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run("verify", broken, ok=False)
    assert result.exit_code == 1 and "checksum mismatch" in result.output
    assert len(result.output.strip().splitlines()) == 1
    shard.write_bytes(bytes(data[: len(data) // 2]))
    result = run("info", broken, ok=False)
    assert result.exit_code == 1 and "truncated" in result.output


def test_nan_features_stop_training_and_keep_checkpoints(sets, tmp_path):
    from mist.formats import FeatureSetWriter

    good = FeatureSet(sets["train"])
    x = good.read(np.arange(200))
    x[150, 0, 3, 3] = np.nan
    bad = FeatureSetWriter(tmp_path / "nan", good.manifest, shard_rows=100)
    bad.add(x, good.labels[:200], good.ids[:200])
    bad.close()
    run_dir = tmp_path / "run"
    run("train", sets["train"], "--out", run_dir, *FAST, "--epochs", "1")
    before = (run_dir / "last.safetensors").read_bytes()
    result = run("train", tmp_path / "nan", "--out", run_dir, *FAST, "--overwrite", ok=False)
    assert result.exit_code == 1 and "non-finite" in result.output
    assert (run_dir / "last.safetensors").read_bytes() == before
    result = run("evaluate", run_dir, tmp_path / "nan", ok=False)
    assert result.exit_code == 1 and "non-finite" in result.output


def test_non_finite_loss_detected(sets, tmp_path):
    result = run("train", sets["train"], "--out", tmp_path / "r", *FAST, "--lr", "1e30", "--grad-clip", "0",
                 "--input-scale", "1e30", ok=False)
    assert result.exit_code == 1 and "non-finite" in result.output


def test_options_read_mist_environment_variables(sets, tmp_path):
    args = ["train", str(sets["train"]), "--out", str(tmp_path / "r"), "--rank", "8", "--heads", "2"]
    result = CliRunner().invoke(main, args, env={"MIST_TRAIN_EPOCHS": "2"})
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and "epoch 3" not in result.output


def test_existing_run_is_not_silently_overwritten(sets, tmp_path):
    run_dir = tmp_path / "run"
    run("train", sets["train"], "--out", run_dir, *FAST, "--epochs", "1")
    result = run("train", sets["train"], "--out", run_dir, *FAST, "--epochs", "1", ok=False)
    assert result.exit_code == 1 and "already holds a run" in result.output
    run("train", sets["train"], "--out", run_dir, *FAST, "--epochs", "2", "--overwrite")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    result = run("export", run_dir / "last.safetensors", "--out", run_dir / "last.safetensors", ok=False)
    assert result.exit_code == 2 and "choose another output file" in result.output
    assert load_checkpoint(run_dir / "last.safetensors").resumable


def test_out_of_range_labels_and_unlabelled_val_split_are_one_line(sets, tmp_path):
    from mist.formats import FeatureSetWriter

    good = FeatureSet(sets["train"])
    labels = good.labels[:100].copy()
    labels[7] = 12
    writer = FeatureSetWriter(tmp_path / "bad", good.manifest, shard_rows=100)
    writer.add(good.read(np.arange(100)), labels, good.ids[:100])
    writer.close()
    result = run("train", tmp_path / "bad", "--out", tmp_path / "r", *FAST, ok=False)
    assert result.exit_code == 1 and "label 12 is out of range for 10 classes" in result.output
    result = run("train", sets["unlabelled"], "--out", tmp_path / "r2", "--val-split", "0.2", *FAST, ok=False)
    assert result.exit_code == 1 and "no labelled rows" in result.output


def test_predict_names_labels_with_the_sets_own_classes(trained, sets, tmp_path):
    import dataclasses

    from mist.formats import FeatureSetWriter

    source = FeatureSet(sets["test"])
    renamed = dataclasses.replace(source.manifest, classes=[f"digit {c}" for c in source.manifest.classes])
    writer = FeatureSetWriter(tmp_path / "renamed", renamed, shard_rows=200)
    writer.add(source.read(np.arange(50)), source.labels[:50], source.ids[:50])
    writer.close()
    records = json.loads(run("predict", trained, tmp_path / "renamed", "--format", "json").output)
    assert records[0]["label"] == f"digit {source.labels[0]}"
    assert records[0]["prediction"] in [str(i) for i in range(10)]  # the adaptor's own class names
