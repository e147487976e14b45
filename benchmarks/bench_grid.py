"""A 16-configuration `mist-device train --grid` against the same 16 runs one after another, same machine,
same run: wall time of each, their ratio (goal: grid <= 0.5x), and the machine load they ran under.

    python -m benchmarks.bench_grid FEATURE_SET [--epochs 5] [--repeats 1]

FEATURE_SET: any set from `mist-cloud extract`, e.g. runs/structured/count/train (python -m
benchmarks.structured_study extract). The sequential runs are real `mist-device train` subprocesses with the
same options, each with one grid point's values; both sides use one BLAS thread and --no-verify.
Writes benchmarks/results/bench_grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = "lr=1e-3,3e-3 blocks=1,2 rank=16,32 wd=1e-4,0.05"
FLAG = {"lr": "--lr", "wd": "--weight-decay", "blocks": "--blocks-per-group", "rank": "--rank"}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("feature_set", type=Path)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    from mist.device.adaptor import parse_grid

    device = str(Path(sys.executable).with_name("mist-device"))
    common = ["--epochs", str(a.epochs), "--val-split", "0.2", "--threads", "1", "--no-verify", "--overwrite"]
    combos = parse_grid(GRID)
    grid_s, seq_s, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            loads.append(os.getloadavg()[0])
            # --no-refit: the sequential runs below train no final model either, so both sides do the same work
            grid_s.append(timed([device, "train", str(a.feature_set), "--out", f"{tmp}/grid", "--grid", GRID,
                                 "--no-refit", *common]))
            total = 0.0
            for i, combo in enumerate(combos):
                flags = [str(x) for k, v in combo.items() for x in (FLAG[k], v)]
                total += timed([device, "train", str(a.feature_set), "--out", f"{tmp}/run{i}", *flags, *common])
            seq_s.append(total)
            loads.append(os.getloadavg()[0])
    result = {"grid": GRID, "configs": len(combos), "epochs": a.epochs, "feature_set": str(a.feature_set),
              "grid_s": grid_s, "sequential_s": seq_s, "median_ratio": statistics.median(
                  g / s for g, s in zip(grid_s, seq_s)), "loadavg_1min": loads, "cpus": os.cpu_count()}
    print(f"{'what':<34} {'median s':>9}")
    print(f"{'--grid, 16 configs, one pass':<34} {statistics.median(grid_s):>9.1f}")
    print(f"{'16 runs one after another':<34} {statistics.median(seq_s):>9.1f}")
    print(f"ratio {result['median_ratio']:.2f} (goal <= 0.5); load average {loads}")
    out = Path(__file__).resolve().parent / "results" / "bench_grid.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
