"""Training killed with a real SIGKILL and resumed ends with weights identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from digits_sets import write_digits_set

from mist.formats import load_checkpoint

# 30 epochs of 40 steps (1,200, about 2 s here): the kill below, within 0.1 s of the first checkpoint,
# lands well before the run ends.
ARGS = ["--rank", "4", "--heads", "2", "--epochs", "30", "--batch-size", "16", "--lr", "3e-3", "--warmup", "1",
        "--save-every", "7", "--threads", "1", "--seed", "3", "--val-split", "0.2"]


def train_cmd(train_set: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mist.device", "train", str(train_set), "--out", str(run_dir), *ARGS, *extra]


@pytest.mark.slow
def test_kill9_then_resume_gives_identical_weights(tmp_path):
    train_set = write_digits_set(tmp_path / "train", slice(0, 800), shard_rows=100)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(train_cmd(train_set, clean), check=True, capture_output=True)

    # Kill at a random moment after the first checkpoint exists, so the run dies mid-epoch or mid-write.
    proc = subprocess.Popen(train_cmd(train_set, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "last.safetensors").exists():
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.Random().uniform(0.0, 0.1))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(killed / "last.safetensors").train_state["step"]

    result = subprocess.run(train_cmd(train_set, killed, "--resume"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout

    a, b = load_checkpoint(clean / "last.safetensors"), load_checkpoint(killed / "last.safetensors")
    assert b.train_state["step"] == a.train_state["step"] > interrupted_at
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    for name in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[name], b.optimizer[name], err_msg=name)
    best_a, best_b = load_checkpoint(clean / "best.safetensors"), load_checkpoint(killed / "best.safetensors")
    assert best_a.train_state["epoch"] == best_b.train_state["epoch"]
    for name in best_a.params:
        np.testing.assert_array_equal(best_a.params[name], best_b.params[name], err_msg=f"best {name}")
    clean_metrics = (clean / "metrics.jsonl").read_text().splitlines()
    killed_metrics = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(killed_metrics) == len(clean_metrics) == 30


def test_resume_with_other_options_is_refused(tmp_path):
    train_set = write_digits_set(tmp_path / "train", slice(0, 200), shard_rows=100)
    run_dir = tmp_path / "run"
    subprocess.run(train_cmd(train_set, run_dir), check=True, capture_output=True)
    cmd = train_cmd(train_set, run_dir, "--resume")
    cmd[cmd.index("--lr") + 1] = "1e-2"
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    assert "lr=" in result.stderr and "Traceback" not in result.stderr


def test_resume_tolerates_a_half_written_metrics_line(tmp_path):
    train_set = write_digits_set(tmp_path / "train", slice(0, 200), shard_rows=100)
    run_dir = tmp_path / "run"
    cmd = train_cmd(train_set, run_dir)
    cmd[cmd.index("--epochs") + 1] = "2"
    subprocess.run(cmd, check=True, capture_output=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "st')  # what a kill in the middle of a write leaves
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
