"""mist-device as a newcomer drives it (issue 18): warm-up that fits the run, a seed for the validation split
alone, evaluation on a subset of the training classes, and progress on a terminal, in a log, or not at all."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import digits_manifest, load_digits_tokens, write_digits_set

from mist.device.cli import main
from mist.device.train import Trainer, TrainOptions, build_config
from mist.formats import FeatureSet, FeatureSetWriter

FAST = ["--rank", "8", "--heads", "2", "--batch-size", "32", "--lr", "1e-2"]


def run(*args: object, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def write_named_digits(directory: Path, digits: dict[str, int], rows: slice) -> Path:
    """Digits rows whose label is in ``digits`` (digit -> class name), under those names only: a test
    folder with its own, shorter class list, as an ImageFolder lacking some classes produces."""
    images, labels = load_digits_tokens()
    images, labels, ids = images[rows], labels[rows], np.arange(len(labels))[rows]
    keep = np.isin(labels, list(digits.values()))
    names = sorted(digits)
    relabel = {digits[name]: names.index(name) for name in names}
    manifest = replace(digits_manifest("test"), classes=names)
    writer = FeatureSetWriter(directory, manifest, shard_rows=128)
    writer.add(images[keep][:, None], np.array([relabel[v] for v in labels[keep]]), ids[keep])
    writer.close()
    return directory


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    return {"train": write_digits_set(root / "train", slice(0, 1200)),
            "test": write_digits_set(root / "test", slice(1200, None), split="test"),
            "subset": write_named_digits(root / "subset", {"3": 3, "7": 7, "9": 9}, slice(1200, None)),
            "superset": write_named_digits(root / "superset", {"3": 3, "seven": 7, "nine": 9}, slice(1200, None))}


@pytest.fixture(scope="module")
def trained(sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run("train", sets["train"], "--out", run_dir, "--epochs", "6", "--progress", "none", *FAST)
    return run_dir


def trainer_for(fs: FeatureSet, tmp_path: Path, **options: object) -> Trainer:
    cfg = build_config(fs, rank=4, heads=2)
    return Trainer(tmp_path / "run", fs, None, cfg, TrainOptions(**options), log=lambda _m: None)


# ---- warm-up ----------------------------------------------------------------------------------------------


def test_the_default_warm_up_is_a_tenth_of_any_run(sets: dict[str, Path], tmp_path: Path) -> None:
    fs = FeatureSet(sets["train"])
    for epochs in (2, 3, 30):
        t = trainer_for(fs, tmp_path, epochs=epochs)
        assert t.warmup_steps == round(0.1 * t.total_steps) and t.warmup_warning is None
    # At the default 30 epochs it is the 3 epochs the recipe always had.
    t = trainer_for(fs, tmp_path, epochs=30)
    assert t.warmup_steps == 3 * t.steps_per_epoch


def test_a_warm_up_longer_than_half_the_run_is_clamped_with_a_warning(sets: dict[str, Path], tmp_path: Path) -> None:
    t = trainer_for(FeatureSet(sets["train"]), tmp_path, epochs=2, warmup_epochs=3.0)
    assert t.warmup_steps == t.total_steps // 2 and "more than half" in t.warmup_warning
    result = run("train", sets["train"], "--out", tmp_path / "r", "--epochs", "2", "--warmup", "3",
                 "--progress", "none", *FAST)
    assert "warning: --warmup 3 epochs is more than half of a 2-epoch run" in result.output
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-2, rel=0.02), "the peak is reached at the end of the first epoch"
    assert lrs[1] < 1e-3, "and the cosine decays over the second"
    t = trainer_for(FeatureSet(sets["train"]), tmp_path, epochs=10, warmup_epochs=1.0)
    assert t.warmup_steps == t.steps_per_epoch and t.warmup_warning is None


# ---- seeds ------------------------------------------------------------------------------------------------


def test_val_seed_fixes_the_split_while_seed_varies_the_initialisation(sets: dict[str, Path], tmp_path: Path) -> None:
    fs = FeatureSet(sets["train"])
    a = trainer_for(fs, tmp_path, val_split=0.2, seed=1, val_seed=5)
    b = trainer_for(fs, tmp_path, val_split=0.2, seed=2, val_seed=5)
    assert np.array_equal(a.val_rows, b.val_rows) and len(a.val_rows) == 240
    assert not np.array_equal(a.model.params["head.weight"], b.model.params["head.weight"])
    c = trainer_for(fs, tmp_path, val_split=0.2, seed=2)
    d = trainer_for(fs, tmp_path, val_split=0.2, seed=2, val_seed=2)
    assert np.array_equal(c.val_rows, d.val_rows), "without --val-seed the split follows --seed, as before"
    assert not np.array_equal(a.val_rows, c.val_rows)
    assert "--val-seed" in run("train", "--help").output


# ---- evaluate on a subset of the classes ------------------------------------------------------------------


def test_evaluate_on_a_subset_of_the_classes_matches_them_by_name(sets: dict[str, Path], trained: Path) -> None:
    full = json.loads(run("evaluate", trained, sets["test"], "--json").output)
    sub = json.loads(run("evaluate", trained, sets["subset"], "--json").output)
    assert sub["classes"] == [str(i) for i in range(10)] and sub["test_classes"] == ["3", "7", "9"]
    # Matched by name, each class scores exactly what it scores in the full test set.
    for name in ("3", "7", "9"):
        assert sub["per_class_accuracy"][name] == pytest.approx(full["per_class_accuracy"][name])
    assert sub["per_class_accuracy"]["0"] is None
    confusion = np.array(sub["confusion"])
    assert confusion.sum() == sub["rows"] and confusion[[3, 7, 9]].sum() == sub["rows"]
    assert np.array_equal(confusion[[3, 7, 9]], np.array(full["confusion"])[[3, 7, 9]])
    text = run("evaluate", trained, sets["subset"]).output
    assert "no test rows" in text and "Traceback" not in text


def test_a_test_class_the_adaptor_never_saw_is_refused_by_name(sets: dict[str, Path], trained: Path) -> None:
    result = run("evaluate", trained, sets["superset"], ok=False)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "not trained on: 'nine', 'seven'" in result.output and str(sets["superset"]) in result.output


# ---- progress ---------------------------------------------------------------------------------------------


def train_command(sets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mist.device", "train", str(sets["train"]), "--out", str(out), "--epochs", "2",
            "--threads", "1", *FAST, *extra]


def run_on_a_terminal(command: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal, as in an interactive shell; return (status, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    proc.wait(timeout=30)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_the_bar_on_a_terminal_shows_epoch_loss_lr_and_speed(sets: dict[str, Path], tmp_path: Path) -> None:
    status, output = run_on_a_terminal(train_command(sets, tmp_path / "run"))
    assert status == 0, output
    # Each redraw returns to the line start and erases it, then writes one frame.
    frames = re.findall(r"\r\x1b\[K(epoch (\d)/2 \[([#-]{24})\] (\d+)/38  loss [\d.]+  lr [\d.e+-]+  \d+ img/s)",
                        output)
    assert frames, output
    assert {f[1] for f in frames} == {"1", "2"}
    assert frames[-1][1:4] == ("2", "#" * 24, "38"), "the last frame of an epoch is the full bar"
    assert "epoch 2/2  loss" in output, "each epoch still ends with its summary line"


def test_off_a_terminal_there_is_no_bar_and_lines_come_every_n_steps(sets: dict[str, Path], tmp_path: Path) -> None:
    done = subprocess.run(train_command(sets, tmp_path / "a", "--log-every", "10"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    steps = [line for line in done.stdout.splitlines() if "  step " in line]
    assert [line.split("  step ")[1].split("/")[0] for line in steps] == ["10", "20", "30", "40", "50", "60", "70"]
    assert steps[0].startswith("epoch 1/2  batch 10/38  step 10/76  loss ") and "img/s" in steps[0]
    quiet = subprocess.run(train_command(sets, tmp_path / "b", "--log-every", "10", "--progress", "none"),
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "  step " not in quiet.stdout and "\r" not in quiet.stderr
    assert "epoch 2/2  loss" in quiet.stdout


def test_step_records_in_metrics_on_request(sets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')  # a fresh run replaces old metrics
    run("train", sets["train"], "--out", out, "--epochs", "2", "--step-metrics", "--progress", "none", "--overwrite",
        *FAST)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if "kind" not in r]
    assert [r["step"] for r in steps] == list(range(1, 77)) and [r["epoch"] for r in epochs] == [1, 2]
    assert not any(r.get("stale") for r in records)
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in steps)
    assert steps[37]["running_loss"] == pytest.approx(epochs[0]["train_loss"])
    assert steps[-1]["lr"] == pytest.approx(epochs[1]["lr"])


def test_evaluate_and_predict_take_progress_too(sets: dict[str, Path], trained: Path) -> None:
    status, output = run_on_a_terminal([sys.executable, "-m", "mist.device", "evaluate", str(trained),
                                        str(sets["test"]), "--batch-size", "100"])
    assert status == 0 and "evaluating [" in output and "597/597 rows" in output, output
    result = run("predict", trained, sets["test"], "--progress", "lines")
    assert "predicting: 597 rows in" in result.output
    assert run("predict", trained, sets["test"]).output.count("rows/s") == 0, "piped output stays clean"
