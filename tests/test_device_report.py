"""``mist-device report``: PNG training curves and confusion matrix that decode and show the data, a per-class
table that agrees with scikit-learn, and the fallback to the table alone without matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import write_digits_set

from mist.device.cli import main
from mist.device.report import CURVES_SIZE, DPI, classification_table, confusion_size

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

BLOCK_MATPLOTLIB = '''\
import sys


class _NoMatplotlib:
    """A machine without the [plots] extra: importing matplotlib fails as it would there."""

    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoMatplotlib())
'''


def run(*args: object, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("digits")
    train = write_digits_set(root / "train", slice(0, 1200))
    test = write_digits_set(root / "test", slice(1200, None), split="test")
    run("train", train, "--out", root / "run", "--val-split", "0.2", "--epochs", "6", "--rank", "8", "--heads", "2",
        "--lr", "1e-2", "--progress", "none")
    return root / "run", test


def test_the_table_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import classification_report

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    labels[labels == 3] = 2  # a class with no true rows
    predictions = np.where(rng.random(400) < 0.6, labels, rng.integers(0, 5, 400))
    predictions[predictions == 4] = 0  # a class never predicted
    confusion = np.zeros((5, 5), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    names = ["a", "b", "c", "d", "e"]
    ours = classification_table(confusion, names)
    theirs = classification_report(labels, predictions, labels=range(5), target_names=names, output_dict=True,
                                   zero_division=0)
    for name in names:
        for key, their_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                               ("support", "support")):
            assert ours["classes"][name][key] == pytest.approx(theirs[name][their_key]), (name, key)
    for avg in ("macro avg", "weighted avg"):
        for key, their_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert ours[avg][key] == pytest.approx(theirs[avg][their_key]), (avg, key)
    assert ours["accuracy"] == pytest.approx(np.mean(labels == predictions))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")).astype(int)


def has_colour(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 6) -> int:
    return int(np.sum(np.all(np.abs(rgb - np.array(colour)) <= tolerance, axis=2)))


def test_report_writes_curves_confusion_and_table(trained: tuple[Path, Path]) -> None:
    run_dir, test = trained
    result = run("report", run_dir, test)
    out = run_dir / "report"
    for name in ("curves.png", "confusion.png", "report.json"):
        assert f"wrote {out / name}" in result.output
    assert "precision" in result.output and "weighted avg" in result.output

    curves = pixels(out / "curves.png")
    assert curves.shape == (int(CURVES_SIZE[1] * DPI), int(CURVES_SIZE[0] * DPI), 3)
    # Training (matplotlib's C0 blue) and validation (C1 orange) lines are both drawn, in quantity.
    assert has_colour(curves, (31, 119, 180)) > 500 and has_colour(curves, (255, 127, 14)) > 300
    side = int(confusion_size(10) * DPI)
    confusion = pixels(out / "confusion.png")
    assert confusion.shape == (side, side, 3)
    # A good adaptor: most of the diagonal is dark blue (Blues above 0.8), most other cells near white.
    dark = np.all(np.abs(confusion - np.array([8, 48, 107])) <= 40, axis=2)
    assert dark.sum() > 5 * 40 * 40, "at least five dark diagonal cells"
    assert (confusion.std(axis=2) > 10).mean() > 0.05, "not a blank picture"

    body = json.loads((out / "report.json").read_text())
    matrix = np.array(body["confusion"])
    assert matrix.shape == (10, 10) and matrix.sum() == 597
    assert np.trace(matrix) / matrix.sum() == pytest.approx(body["table"]["accuracy"])
    assert [r["epoch"] for r in body["epochs"]] == list(range(1, 7))
    assert body["table"]["accuracy"] > 0.6


def test_report_of_curves_only_and_a_bad_run_dir(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = trained
    result = run("report", run_dir, "--out", tmp_path / "plots")
    assert (tmp_path / "plots" / "curves.png").exists() and not (tmp_path / "plots" / "confusion.png").exists()
    assert "pass TEST_SET" in result.output
    (tmp_path / "empty").mkdir()
    bad = run("report", tmp_path / "empty", ok=False)
    assert bad.exit_code == 1 and "metrics.jsonl: missing" in bad.output and bad.output.count("\n") == 1


def test_without_matplotlib_the_table_is_printed_with_how_to_get_plots(trained: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    run_dir, test = trained
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK_MATPLOTLIB)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True)
    assert probe.returncode != 0, "the block must work, or this test proves nothing"
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "mist.device", "report", str(run_dir), str(test), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'mist-tuning[plots]'" in done.stderr and "Traceback" not in done.stderr
    assert "weighted avg" in done.stdout and "precision" in done.stdout
    assert (out / "report.json").exists() and not list(out.glob("*.png"))
