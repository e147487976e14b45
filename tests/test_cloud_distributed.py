"""Distributed extraction: real ``torchrun`` processes on gloo over 127.0.0.1, a real SIGKILL of one rank.

The chunk protocol itself is also run in this process as a world of one (the same env:// variables torchrun
sets), which is cheap enough to cover unreadable images mid-stream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from click.testing import CliRunner
from PIL import Image
from test_cloud_datasets import make_folder

from mist.cloud.cli import main
from mist.formats import FeatureSet

TINY = ["--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0", "--threads", "1",
        "--progress", "none", "--groups", "0-2,3-6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def without_shards(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k != "shards"}


def one_process(data: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(main, ["extract", *TINY, "--data", str(data), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Makes this process rank 0 of 1 (the env:// variables torchrun sets); the group is gone afterwards."""
    def enter() -> None:
        for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(free_port())}.items():
            monkeypatch.setenv(name, value)
    yield enter
    if dist.is_initialized():  # a refused run stops before it leaves the group
        dist.destroy_process_group()


def test_chunks_equal_one_process_with_unreadable_images(tmp_path: Path, world_of_one: Callable[[], None]) -> None:
    # Items 4 and 8 do not decode: chunks of 2 items leave shard 2 short and shard 4 empty, while one process
    # fills every shard. Same rows, ids, labels, values and skipped.txt; the manifest differs only in shards.
    data = make_folder(tmp_path / "data")
    args = ["--batch-size", "2", "--shard-rows", "2"]
    one_process(data, tmp_path / "one", *args)
    world_of_one()
    one_process(data, tmp_path / "chunks", *args)
    a, b = FeatureSet(tmp_path / "one", verify=True), FeatureSet(tmp_path / "chunks", verify=True)
    assert b.ids.tolist() == a.ids.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert b.labels.tolist() == a.labels.tolist()
    # Bit-equal here; the tolerance docs/cloud.md states is for backends whose kernels depend on the batch.
    np.testing.assert_array_equal(b.read(np.arange(7), np.float16), a.read(np.arange(7), np.float16))
    assert [s.rows for s in b.manifest.shards] == [2, 2, 1, 2] and [s.rows for s in a.manifest.shards] == [2, 2, 2, 1]
    assert without_shards(tmp_path / "chunks") == without_shards(tmp_path / "one")
    assert (tmp_path / "chunks" / "skipped.txt").read_bytes() == (tmp_path / "one" / "skipped.txt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
        "shard-00003.safetensors", "skipped.txt"]  # chunk 4 (item 8 only) has no shard; parts/ is gone

    # A complete set is refused like a one-process one, with the rank in the line.
    result = CliRunner().invoke(main, ["extract", *TINY, "--data", str(data), "--out", str(tmp_path / "chunks"),
                                       *args])
    assert result.exit_code == 1 and "rank 0 of 1: " in result.output and "already complete" in result.output


def many_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i:04d}.png")
    return root


def torchrun(ranks: int, *args: str, inner: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args,
            *(inner if inner is not None else ["-m", "mist.cloud"])]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker torchrun started as ``rank`` (its children, read from /proc)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    if children.exists():
        pids = children.read_text().split()
    else:  # a kernel without CONFIG_PROC_CHILDREN: find them by parent pid
        pids = [p.parent.name for p in Path("/proc").glob("[0-9]*/stat")
                if _parent_pid(p) == launcher.pid]
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def _parent_pid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_a_killed_rank_resumes(tmp_path: Path) -> None:
    data = many_images(tmp_path / "data", 240)
    args = [*TINY, "--data", str(data), "--batch-size", "2", "--shard-rows", "2"]
    one_process(data, tmp_path / "one", *args[len(TINY) + 2:])

    # 1. Two ranks: byte-identical to one process (every image decodes, so even the shards coincide).
    two = tmp_path / "two"
    run = subprocess.run(torchrun(2) + ["extract", *args, "--out", str(two)], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "[rank 1 of 2] extracting 120 images in 60 of 120 shards" in run.stderr
    assert files(two) == files(tmp_path / "one")

    # 2. SIGKILL rank 1 once it has committed a chunk (its chunks are the odd ones), then rerun.
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(torchrun(2) + ["extract", *args, "--out", str(killed)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.monotonic() + 90, None
    while time.monotonic() < deadline and launcher.poll() is None:
        if list((killed / "parts").glob("chunk-*[13579].json")):
            victim = rank_pid(launcher, 1)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.005)
    _, stderr = launcher.communicate(timeout=60)
    assert victim is not None, "the run ended before rank 1 committed a chunk; make it longer"
    assert launcher.returncode != 0, stderr
    partial = json.loads((killed / "manifest.json").read_text())
    assert partial["complete"] is False and partial["shards"] == []  # never a half-written manifest
    committed = len(list((killed / "parts").glob("chunk-*.json")))
    assert 0 < committed < 120, "the kill landed after every chunk was committed; make the run longer"

    rerun = subprocess.run(torchrun(2) + ["extract", *args, "--out", str(killed)], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {committed} of 120 shards" in rerun.stderr
    assert files(killed) == files(two)


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_in_one_line_naming_it(tmp_path: Path) -> None:
    # Rank 1 runs on a machine where the data is not mounted: the job fails, rank 1 says so in one line.
    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "set"
    command = (f'd={data}; [ "$RANK" = 1 ] && d={tmp_path}/not-mounted; exec {sys.executable} -m mist.cloud '
               f'extract {" ".join(TINY)} --data "$d" --out {out}')
    run = subprocess.run(torchrun(2, "--no-python", inner=["bash", "-c", command]), env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1 of 2: --data ") and "not-mounted" in lines[0], \
        run.stderr
    # The only traceback is torchrun's own report (ChildFailedError, whose root cause also names rank 1).
    assert run.stderr.count("Traceback") <= 1 and ("Traceback" not in run.stderr or "ChildFailedError" in run.stderr)
    assert not (out / "manifest.json").exists() or not json.loads((out / "manifest.json").read_text())["complete"]
