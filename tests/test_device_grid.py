"""train --grid, the device probe and --model probe|lae|auto: gradients, solver, CLI, memory refusal, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import load_digits_tokens, write_digits_set
from gradcheck import check_grad

from mist.device.adaptor import parse_grid
from mist.device.cli import main
from mist.device.probe import ProbeConfig, fit_probe, loss_and_grad, probe_features, standardisation
from mist.formats import load_checkpoint
from mist.formats.safetensors_check import read_header

SMALL = ["--rank", "4", "--heads", "2", "--batch-size", "32", "--threads", "1", "--val-split", "0.2"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    return (write_digits_set(root / "train", slice(0, 600), shard_rows=100),
            write_digits_set(root / "test", slice(1000, 1400), split="test"))


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_probe_gradcheck():
    rng = np.random.default_rng(0)
    z, labels = rng.standard_normal((7, 5)), rng.integers(0, 3, 7)
    weight, bias = rng.standard_normal((5, 3)) * 0.5, rng.standard_normal(3) * 0.1
    _, dweight, dbias = loss_and_grad(weight, bias, z, labels, l2=0.3)
    f = lambda: loss_and_grad(weight, bias, z, labels, l2=0.3)[0]  # noqa: E731
    assert check_grad(f, weight, dweight, max_checks=None) < 1e-7
    assert check_grad(f, bias, dbias, max_checks=None) < 1e-7


@pytest.mark.parametrize("features", ["pooled", "flat"])
def test_probe_reaches_the_same_optimum_as_scikit_learn(features):
    """Same objective (C = 1 / (l2 N)), so L-BFGS here and scikit-learn's lbfgs must agree on the weights."""
    from sklearn.linear_model import LogisticRegression

    tokens, labels = load_digits_tokens()
    x, y = tokens[:500, None], labels[:500]
    cfg = ProbeConfig(dim=16, tokens=8, groups=1, num_classes=10, features=features, l2=1e-2, max_iter=1000)
    f = probe_features(x, features)
    probe, report = fit_probe(cfg, f, y)
    mean, inv_std = standardisation(f)
    sk = LogisticRegression(C=1.0 / (cfg.l2 * len(y)), max_iter=5000, tol=1e-10).fit((f - mean) * inv_std, y)
    scale = np.abs(sk.coef_).max()
    assert np.abs(probe.params["weight"].T - sk.coef_).max() < 5e-3 * scale, report
    test = tokens[1000:1300, None]
    agree = np.mean(probe.forward(test).argmax(1) == sk.predict((probe_features(test, features) - mean) * inv_std))
    assert agree > 0.99


def test_parse_grid():
    combos = parse_grid("lr=1e-3,3e-3 blocks=1,4 pos=0,1")
    assert len(combos) == 8 and combos[0] == {"lr": 1e-3, "blocks": 1, "pos": False}
    assert combos[-1] == {"lr": 3e-3, "blocks": 4, "pos": True}
    for bad, fragment in (("lr", "KEY=V1,V2"), ("depth=1", "KEY=V1,V2"), ("lr=x", "not a float"),
                          ("lr=1 lr=2", "twice"), ("", "empty")):
        with pytest.raises(ValueError, match=fragment):
            parse_grid(bad)


def test_auto_picks_on_validation_and_every_command_takes_the_result(sets, tmp_path):
    train, test = sets
    out = tmp_path / "auto"
    result = run("train", train, "--out", out, "--model", "auto", "--grid", "lr=3e-3 blocks=0,1 pos=0,1",
                 "--epochs", "3", *SMALL)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "grid.json").read_text())
    assert {m["kind"] for m in table["members"]} == {"probe", "lae"} and len(table["members"]) == 4 + 18
    best = max(table["members"], key=lambda m: (m["score"], -m["val_loss"]))
    assert table["chosen"] == best["name"] and "chosen: " + best["name"] in result.output
    chosen = load_checkpoint(out / "best.safetensors")
    assert chosen.kind == table["kind"]
    # every member's best weights are kept; a probe checkpoint evaluates, predicts and exports like an LAE
    probe_path = out / "members" / "probe-flat-l2-0.01.safetensors"
    assert load_checkpoint(probe_path).kind == "probe"
    report = json.loads(run("evaluate", probe_path, test, "--json").output)
    assert report["accuracy"] > 0.85
    assert run("predict", probe_path, test, "--out", tmp_path / "p.csv").exit_code == 0
    assert run("export", probe_path, "--out", tmp_path / "slim.safetensors").exit_code == 0
    slim = load_checkpoint(tmp_path / "slim.safetensors")
    assert slim.kind == "probe" and not slim.resumable
    assert json.loads(run("evaluate", tmp_path / "slim.safetensors", test, "--json").output)["accuracy"] == \
        report["accuracy"]
    assert run("evaluate", out, test).exit_code == 0


def test_model_probe_and_plain_lae_checkpoints_stay_version_1(sets, tmp_path):
    train, test = sets
    assert run("train", train, "--out", tmp_path / "p", "--model", "probe", *SMALL).exit_code == 0
    assert load_checkpoint(tmp_path / "p" / "best.safetensors").kind == "probe"
    assert read_header(tmp_path / "p" / "best.safetensors").metadata["format_version"] == "2"
    assert run("train", train, "--out", tmp_path / "l", "--epochs", "1", *SMALL).exit_code == 0
    meta = read_header(tmp_path / "l" / "best.safetensors").metadata
    assert meta["format_version"] == "1" and "model_kind" not in meta  # what earlier mist wrote and reads
    assert run("evaluate", tmp_path / "l", test).exit_code == 0


def test_bad_grid_and_memory_limit_are_one_line_errors_that_write_nothing(sets, tmp_path):
    train, _ = sets
    out = tmp_path / "refused"
    r = CliRunner().invoke(main, ["train", str(train), "--out", str(out), "--grid", "lr=1e-3,3e-3 rank=4,8",
                                  "--max-memory", "1M", "--model", "auto", "--blocks-per-group", "64", *SMALL])
    assert r.exit_code != 0 and "--max-memory" in r.output and "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())
    r = CliRunner().invoke(main, ["train", str(train), "--out", str(out), "--grid", "depth=3", *SMALL])
    assert r.exit_code == 2 and "--grid" in r.output
    r = CliRunner().invoke(main, ["train", str(train), "--out", str(out), "--grid", "lr=1e-3,3e-3",
                                  "--rank", "4", "--heads", "2", "--threads", "1", "--val-split", "0"])
    assert r.exit_code != 0 and "validation" in r.output


@pytest.mark.slow
def test_grid_kill9_then_resume_gives_identical_weights(sets, tmp_path):
    train, _ = sets
    args = [sys.executable, "-m", "mist.device", "train", str(train), "--model", "auto", "--grid",
            "lr=1e-3,3e-3 pos=0,1", "--epochs", "12", "--save-every", "5", "--seed", "2", *SMALL]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([*args, "--out", str(clean)], check=True, capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    state = killed / "grid-last.safetensors"
    while not (state.exists() and load_checkpoint(state).train_state["step"] > 0):
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "grid.json").exists()
    result = subprocess.run([*args, "--out", str(killed), "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed the grid" in result.stdout
    a, b = load_checkpoint(clean / "grid-last.safetensors"), load_checkpoint(state)
    assert a.train_state["step"] == b.train_state["step"]
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    for name in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[name], b.optimizer[name], err_msg=name)
    ta, tb = (json.loads((d / "grid.json").read_text()) for d in (clean, killed))
    assert ta["chosen"] == tb["chosen"]
    assert [(m["name"], m["val_acc"]) for m in ta["members"]] == [(m["name"], m["val_acc"]) for m in tb["members"]]
    best_a, best_b = load_checkpoint(clean / "best.safetensors"), load_checkpoint(killed / "best.safetensors")
    for name in best_a.params:
        np.testing.assert_array_equal(best_a.params[name], best_b.params[name], err_msg=name)
