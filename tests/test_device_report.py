"""``mist-device report``: PNG training curves, search chart and confusion matrix that decode and show the data,
for a plain run, --model probe, --model auto and --grid alike; a per-class table that agrees with scikit-learn;
refusal to replace a report without --overwrite; and the fallback to the table alone without matplotlib."""

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
from mist.device.report import CURVES_SIZE, DPI, classification_table, confusion_size, loss_footing, search_size

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
    assert curves.shape == (round(CURVES_SIZE[1] * DPI), round(CURVES_SIZE[0] * DPI), 3)
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
    assert bad.exit_code == 1 and "not a run of `mist-device train`" in bad.output and bad.output.count("\n") == 1


def test_a_report_is_never_replaced_without_overwrite(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = trained
    out = tmp_path / "plots"
    run("report", run_dir, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run("report", run_dir, "--out", out, ok=False)
    assert again.exit_code == 2 and "--overwrite" in again.output and "curves.png" not in again.output.split("\n")[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a refused report must not touch a file"
    run("report", run_dir, "--out", out, "--overwrite")


def test_curves_put_both_losses_on_one_footing_and_mark_the_kept_epoch(trained: tuple[Path, Path]) -> None:
    run_dir, _ = trained
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Trained with label smoothing 0.1: the smoothed validation loss is recorded beside the plain one, higher.
    assert all(r["val_loss_smoothed"] > r["val_loss"] for r in lines)
    assert loss_footing(lines) == ("val_loss_smoothed", None)
    old = [{k: v for k, v in r.items() if k != "val_loss_smoothed"} for r in lines]  # a run from before the field
    key, note = loss_footing(old)
    assert key == "val_loss" and "without label smoothing" in note
    curves = pixels(run_dir / "report" / "curves.png")
    assert has_colour(curves, (44, 160, 44)) > 300, "the kept epoch's line (C2 green) is drawn in every panel"
    body = json.loads((run_dir / "report" / "report.json").read_text())
    best = max(lines, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    assert body["kept_epoch"] == best and body["kind"] == "plain"


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


# ---- searches: --model auto, --model probe, --grid ---------------------------------------------------------

SEARCH = ["--val-split", "0.2", "--epochs", "4", "--rank", "4", "--heads", "2", "--progress", "none"]


@pytest.fixture(scope="module")
def searches(trained: tuple[Path, Path]) -> dict[str, Path]:
    root = trained[0].parent
    train = root / "train"
    runs = {"auto": ["--model", "auto"], "probe": ["--model", "probe"],
            "grid": ["--grid", "lr=1e-2,3e-3 blocks=1"]}
    for name, options in runs.items():
        run("train", train, "--out", root / name, *options, *SEARCH)
    return {name: root / name for name in runs}


@pytest.mark.parametrize("kind", ["auto", "probe", "grid"])
def test_report_of_every_search(searches: dict[str, Path], trained: tuple[Path, Path], kind: str) -> None:
    run_dir, test = searches[kind], trained[1]
    grid = json.loads((run_dir / "grid.json").read_text())
    result = run("report", run_dir, test)
    out = run_dir / "report"
    assert f"chosen {grid['chosen']}" in result.output and "weighted avg" in result.output
    body = json.loads((out / "report.json").read_text())
    assert body["kind"] == "search" and body["chosen"] == grid["chosen"]
    assert np.array(body["confusion"]).sum() == 597 and body["table"]["accuracy"] > 0.5
    # The search chart: one row per configuration, probes (C0 blue) and adaptors (C1 orange) side by side.
    chart = pixels(out / "search.png")
    assert chart.shape[:2] == tuple(round(v * DPI) for v in search_size(len(grid["members"]))[::-1])
    kinds = {m["kind"] for m in grid["members"]}
    assert (has_colour(chart, (31, 119, 180)) > 100) == ("probe" in kinds)
    assert (has_colour(chart, (255, 127, 14)) > 100) == ("lae" in kinds)
    assert has_colour(confusion := pixels(out / "confusion.png"), (8, 48, 107), 40) > 5 * 40 * 40, confusion.shape
    if kind == "probe":  # fitted once: no epochs, no curves, and the report says so
        assert not (out / "curves.png").exists() and "fitted once" in result.output
        return
    # Curves of the chosen adaptor, or of the best adaptor when a probe won; the kept epoch is its best epoch.
    adaptor = next(m for m in grid["members"] if m["kind"] == "lae")
    shown = grid["chosen"] if grid["kind"] == "lae" else adaptor["name"]
    assert body["curves_of"] == shown
    assert body["kept_epoch"] == next(m["best_epoch"] for m in grid["members"] if m["name"] == shown)
    assert [r["epoch"] for r in body["epochs"]] == [1, 2, 3, 4] and all(r["member"] == shown for r in body["epochs"])
    assert has_colour(pixels(out / "curves.png"), (44, 160, 44)) > 300


def test_an_unfinished_search_says_so(searches: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    half = tmp_path / "half"
    shutil.copytree(searches["grid"], half)
    (half / "grid.json").unlink()
    bad = run("report", half, ok=False)
    assert bad.exit_code == 1 and "has not finished" in bad.output and "--resume" in bad.output
