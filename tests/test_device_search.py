"""--model auto's default search: successive halving within --budget, the score that compares a probe with an
adaptor, the refit on every row (and --no-refit), kill -9 during the search and during the refit, the probe
on sets narrower than the default rank, and the device probe against scikit-learn on the same features."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import write_digits_set

from mist.device.cli import main
from mist.device.data import read_rows, split_rows
from mist.device.probe import ProbeConfig, fit_family
from mist.device.search import DEFAULT_SPACE, parse_budget, rungs
from mist.formats import FeatureSet, load_checkpoint

SMALL = ["--rank", "4", "--heads", "2", "--batch-size", "32", "--threads", "1"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    return (write_digits_set(root / "train", slice(0, 500), shard_rows=100),
            write_digits_set(root / "test", slice(1000, 1400), split="test"))


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_budget_and_rungs_parse():
    assert parse_budget("4x") == (4.0, "x") and parse_budget("90s") == (90.0, "s") and parse_budget("0.5X")[0] == 0.5
    for bad in ("", "4", "x", "-1x", "0s", "4m", "nanx"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)
    assert rungs(30) == [7, 15] and rungs(8) == [2, 4] and rungs(2) == [1] and rungs(1) == []


def test_default_search_halves_refits_and_reports(sets, tmp_path):
    train, test = sets
    out = tmp_path / "auto"
    r = run("train", train, "--out", out, "--model", "auto", "--epochs", "8", "--budget", "1000x",
            "--progress", "lines", "--log-every", "5", *SMALL)
    assert r.exit_code == 0, r.output
    table = json.loads((out / "grid.json").read_text())
    adaptors = [m for m in table["members"] if m["kind"] == "lae"]
    assert len(adaptors) == len(DEFAULT_SPACE.split("=")[1].split(",")) * 3 == 6
    # rungs after epochs 2 and 4: 6 -> 3 -> 2 adaptors; nobody cut for the budget
    trained = sorted(m["epochs_trained"] for m in adaptors)
    assert trained == [2, 2, 2, 4, 8, 8] and not table["skipped_for_budget"]
    assert {m["stopped_by"] for m in adaptors if m["epochs_trained"] < 8} == {"halving"}
    assert "round 1: after epoch 2, 3 of 6 adaptors go on" in r.output and "round 2/3" in r.output
    # the choice: the highest score; an adaptor's score is the mean of its last three validation accuracies
    best = max(table["members"], key=lambda m: m["score"])
    assert table["chosen"] == best["name"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in adaptors:
        accs = [h["val_acc"] for h in history if h.get("member") == m["name"]]
        assert len(accs) == m["epochs_trained"] and m["score"] == pytest.approx(np.mean(accs[-3:]))
    # refit on all 500 rows; the set ships every token of every map in fp16
    assert table["refit"]["rows"] == 500 and table["train_rows"] + table["val_rows"] == 500
    assert table["set_bytes_per_image"] == 1 * 8 * 16 * 2
    report = json.loads(run("evaluate", out, test, "--json").output)
    assert report["accuracy"] > 0.8


def test_budget_cuts_the_search_and_says_so(sets, tmp_path):
    train, _ = sets
    out = tmp_path / "tight"
    r = run("train", train, "--out", out, "--model", "auto", "--epochs", "8", "--budget", "1e-6s", "--no-refit",
            *SMALL)
    assert r.exit_code == 0, r.output
    table = json.loads((out / "grid.json").read_text())
    adaptors = [m for m in table["members"] if m["kind"] == "lae"]
    assert sorted(m["epochs_trained"] for m in adaptors) == [2, 2, 2, 2, 2, 8]
    assert len(table["skipped_for_budget"]) == 2 and "skipped for the budget" in r.output
    assert table["refit"] is None
    # --no-refit: the run's best is the chosen member's own best epoch
    best, member = (load_checkpoint(p) for p in (out / "best.safetensors",
                                                 out / "members" / f"{table['chosen']}.safetensors"))
    for name in member.params:
        np.testing.assert_array_equal(best.params[name], member.params[name])
    r = run("train", train, "--out", tmp_path / "bad", "--model", "auto", "--budget", "lots", *SMALL)
    assert r.exit_code == 2 and "--budget" in r.output and "Traceback" not in r.output


def test_probe_refit_is_the_fit_on_every_row_and_runs_below_the_default_rank(sets, tmp_path):
    """d = 16 < the default rank 32: --model probe needs no --rank. Its refit is the chosen probe fitted on
    every row with the same C (l2 scaled by fit rows / all rows)."""
    train, _ = sets
    out = tmp_path / "probe"
    r = run("train", train, "--out", out, "--model", "probe", "--threads", "1")
    assert r.exit_code == 0, r.output
    table = json.loads((out / "grid.json").read_text())
    assert len(table["members"]) == 18 and table["refit"]["rows"] == 500
    chosen = next(m for m in table["members"] if m["name"] == table["chosen"])
    fs = FeatureSet(train)
    rows = np.arange(len(fs))
    cfg = replace(ProbeConfig.from_dict(chosen["config"]), l2=chosen["config"]["l2"] * 400 / 500)
    [(_, probe, _)] = fit_family([cfg], read_rows(fs, rows), fs.labels, None, np.empty(0, np.int64), log=lambda s: None)
    best = load_checkpoint(out / "best.safetensors")
    for name, value in probe.params.items():
        np.testing.assert_allclose(best.params[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_device_probe_matches_scikit_learn_on_the_same_features(tmp_path):
    """The device's --model probe against scikit-learn's LogisticRegression: the same standardisation, nine C
    values a decade apart chosen on the device's own 80/20 split, refit on every row; within 0.3 points."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = write_digits_set(tmp_path / "train", slice(0, 700), shard_rows=100)
    test = write_digits_set(tmp_path / "test", slice(1000, 1797), split="test")
    assert run("train", train, "--out", tmp_path / "p", "--model", "probe", "--threads", "1").exit_code == 0
    device = json.loads(run("evaluate", tmp_path / "p", test, "--json").output)["accuracy"]

    fs, ts = FeatureSet(train), FeatureSet(test)
    x, xt = read_rows(fs, np.arange(len(fs))), read_rows(ts, np.arange(len(ts)))
    fit, val = split_rows(fs.labels, 0.2, 0)
    best = None
    for f, ft in ((x.mean(axis=2).reshape(len(x), -1), xt.mean(axis=2).reshape(len(xt), -1)),
                  (x.reshape(len(x), -1), xt.reshape(len(xt), -1))):
        for c in np.logspace(-4, 4, 9):
            scaler = StandardScaler().fit(f[fit])
            clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(f[fit]), fs.labels[fit])
            score = clf.score(scaler.transform(f[val]), fs.labels[val])
            if best is None or score > best[0]:
                best = (score, c, f, ft)
    _, c, f, ft = best
    scaler = StandardScaler().fit(f)
    sklearn = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(f), fs.labels).score(
        scaler.transform(ft), ts.labels)
    assert device >= sklearn - 0.003, (device, sklearn)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 120
    while not ready():
        assert proc.poll() is None, f"the run finished before {what}"
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["search", "refit"])
def test_kill9_in_the_search_or_the_refit_then_resume_gives_the_same_model(sets, tmp_path, where):
    train, _ = sets
    # The search: --model auto's halving. The refit: adaptors only, so the refit trains one (a probe's is a fit).
    model = (["--model", "auto", "--budget", "1000x", "--probe-features", "pooled"] if where == "search"
             else ["--model", "lae", "--grid", "lr=3e-3,1e-2"])
    args = [sys.executable, "-m", "mist.device", "train", str(train), *model, "--epochs", "12", "--save-every", "3",
            "--seed", "1", *SMALL]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([*args, "--out", str(clean)], check=True, capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if where == "search":  # past the first rung, so the halving's decisions must survive the kill
        state = killed / "grid-last.safetensors"
        _kill_when(proc, lambda: state.exists() and load_checkpoint(state).train_state["epoch"] >= 4, "the kill")
    else:
        state = killed / "refit" / "last.safetensors"
        _kill_when(proc, lambda: state.exists() and load_checkpoint(state).train_state["step"] > 0, "the kill")
    assert not (killed / "grid.json").exists()
    result = subprocess.run([*args, "--out", str(killed), "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ta, tb = (json.loads((d / "grid.json").read_text()) for d in (clean, killed))
    assert ta["chosen"] == tb["chosen"] and ta["refit"]["rows"] == tb["refit"]["rows"] == 500
    assert [(m["name"], m.get("epochs_trained"), m["score"]) for m in ta["members"]] == \
        [(m["name"], m.get("epochs_trained"), m["score"]) for m in tb["members"]]
    best_a, best_b = load_checkpoint(clean / "best.safetensors"), load_checkpoint(killed / "best.safetensors")
    assert best_a.params.keys() == best_b.params.keys()
    for name in best_a.params:
        np.testing.assert_array_equal(best_a.params[name], best_b.params[name], err_msg=name)
