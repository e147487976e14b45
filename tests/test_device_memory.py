"""The one memory estimate (device/memory.py) against the peak RSS of real `mist-device train` runs.

Each run is the only child of a small Python process that reports its peak resident set (ru_maxrss of
RUSAGE_CHILDREN), and the estimate is the figure the run itself prints before it allocates anything. Two
shapes: one adaptor at ViT-B/16's (T=197, d=768, batch 32), and a search of four adaptors of different depths
over two maps. The estimate must stay within 20% of what the kernel measured.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mist.formats import FeatureSetWriter, Manifest

PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.stdout, r.stderr); print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "r.returncode)")


def random_set(directory: Path, rows: int, k: int, tokens: int, dim: int) -> Path:
    manifest = Manifest(
        backbone={"name": "random", "weights_sha256": "0" * 64, "weights_source": "test", "timm_version": "",
                  "torch_version": ""},
        groups=[[i] for i in range(k)], scale="none", tokens=tokens, prefix_tokens=0, grid=[tokens, 1], dim=dim,
        dtype="float16", data_config={}, classes=[f"c{i}" for i in range(10)], split="train",
        dataset={"source": "random features", "hash": f"{rows}-{k}-{tokens}-{dim}"})
    rng = np.random.default_rng(0)
    writer = FeatureSetWriter(directory, manifest, shard_rows=256)
    for begin in range(0, rows, 64):
        n = min(64, rows - begin)
        features = rng.standard_normal((n, k, tokens, dim), dtype=np.float32).astype(np.float16)
        writer.add(features, rng.integers(0, 10, n), np.arange(begin, begin + n))
    writer.close()
    return directory


def peak_and_estimate(train_set: Path, run_dir: Path, *options: str) -> tuple[float, float]:
    command = [sys.executable, "-m", "mist.device", "train", str(train_set), "--out", str(run_dir), "--epochs", "1",
               "--val-split", "0.2", "--threads", "1", "--progress", "none", *options]
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True).stdout
    kib, rc = re.search(r"PEAK (\d+) (-?\d+)", out).groups()
    assert rc == "0", out
    estimate = re.search(r"memory estimate ([\d,.]+) MiB", out)
    assert estimate, out
    return int(kib) / 1024, float(estimate.group(1).replace(",", ""))


@pytest.mark.slow
@pytest.mark.parametrize("shape, options", [
    ((200, 1, 197, 768), ["--rank", "32", "--heads", "4", "--batch-size", "32"]),
    ((400, 2, 50, 256), ["--rank", "16", "--heads", "4", "--batch-size", "64", "--grid", "blocks=1,2 lr=1e-3,3e-3"]),
], ids=["vit-b-one-adaptor", "search-of-four"])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, shape, options):
    train_set = random_set(tmp_path / "set", *shape)
    peak, estimate = peak_and_estimate(train_set, tmp_path / "run", *options)
    assert 0.8 * peak <= estimate <= 1.2 * peak, f"estimate {estimate:.1f} MiB, measured peak {peak:.1f} MiB"
