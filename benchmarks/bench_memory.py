"""Device memory: peak RSS of `mist-device train`, `evaluate` and `predict` on ViT-B/16-shaped feature sets.

Two sets (1k and 10k rows, T = 197, d = 768, k = 1, fp16, 10 classes) are written with the real writer
(FeatureSetWriter) under a temporary directory and deleted afterwards (10k rows are about 3 GB). Each command
runs as the only child of a small Python process that reports resource.getrusage(RUSAGE_CHILDREN).ru_maxrss,
i.e. the command's own peak resident set. Each measurement is repeated (interleaved) and the median shown.

    .venv/bin/python benchmarks/bench_memory.py      # the table; JSON to benchmarks/results/bench_memory.json
    .venv/bin/python benchmarks/bench_memory.py --rows 1000 --rows 3000 --repeats 1   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T, D, K, CLASSES = 197, 768, 1, 10
# The child's peak RSS in KiB (ru_maxrss is in KiB on Linux), measured from a parent that has no other child.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def write_set(directory: Path, rows: int, seed: int) -> None:
    import numpy as np

    from mist.formats import FeatureSetWriter, Manifest

    manifest = Manifest(
        backbone={"name": "vit_base_patch16_224", "weights_sha256": "0" * 64, "weights_source": "benchmark",
                  "timm_version": "", "torch_version": ""},
        groups=[[11]], scale="none", tokens=T, prefix_tokens=1, grid=[14, 14], dim=D, dtype="float16",
        data_config={"input_size": [3, 224, 224]}, classes=[f"c{i}" for i in range(CLASSES)], split="train",
        dataset={"source": "bench_memory random features", "hash": f"seed{seed}-rows{rows}"},
    )
    rng = np.random.default_rng(seed)
    # Drawing 10k fresh rows would take minutes: one random block, its rows reshuffled for every chunk.
    block = rng.standard_normal((256, K, T, D), dtype=np.float32).astype(np.float16)
    writer = FeatureSetWriter(directory, manifest, shard_rows=512, overwrite=True)
    for begin in range(0, rows, 256):
        n = min(256, rows - begin)
        writer.add(block[rng.permutation(256)[:n]], rng.integers(0, CLASSES, n), np.arange(begin, begin + n))
    writer.close()


def peak_rss_mb(command: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kib, rc = out.stdout.split()[-2:]
    if rc != "0":
        raise SystemExit(f"{' '.join(command)} failed (exit {rc}): {out.stderr.strip().splitlines()[-1:]}")
    return int(kib) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, action="append", help="set sizes; default 1000 and 10000")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each measurement")
    p.add_argument("--batch-size", type=int, default=32, help="train batch size (the CLI default)")
    p.add_argument("--eval-batch", type=int, action="append", help="evaluate/predict batch sizes; default 128 "
                   "(the CLI default) and 1000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the sets are written")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_memory.json")
    args = p.parse_args()
    sizes, eval_batches = sorted(args.rows or [1000, 10000]), args.eval_batch or [128, 1000]
    device = [str(Path(sys.executable).with_name("mist-device"))]
    if not Path(device[0]).exists():
        device = [sys.executable, "-m", "mist.device"]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="mist-bench-memory-", dir=args.tmp))
    try:
        start = time.perf_counter()
        sets = {}
        for n in sizes:
            sets[n] = work / f"vitb-{n}"
            write_set(sets[n], n, seed=n)
        print(f"wrote {', '.join(f'{n} rows' for n in sizes)} in {time.perf_counter() - start:.0f}s under {work}")
        largest = sets[sizes[-1]]
        jobs = {f"train {n}": device + ["train", str(sets[n]), "--out", str(work / f"run-{n}"), "--epochs", "1",
                                        "--batch-size", str(args.batch_size), "--overwrite",
                                        "--threads", str(args.threads)] for n in sizes}
        # evaluate/predict use the checkpoint trained on the smallest set (same layout as every set)
        adaptor = str(work / f"run-{sizes[0]}")
        for b in eval_batches:
            jobs[f"evaluate {sizes[-1]} b{b}"] = device + ["evaluate", adaptor, str(largest), "--batch-size", str(b),
                                                          "--threads", str(args.threads)]
            jobs[f"predict {sizes[-1]} b{b}"] = device + ["predict", adaptor, str(largest), "--batch-size", str(b),
                                                         "--out", str(work / "predictions.csv"),
                                                         "--threads", str(args.threads)]
        peaks: dict[str, list[float]] = {name: [] for name in jobs}
        seconds: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, command in jobs.items():
                t0 = time.perf_counter()
                peaks[name].append(peak_rss_mb(command))
                seconds[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {name: sorted(v)[len(v) // 2] for name, v in peaks.items()}
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"peak RSS (MB = 2^20 bytes), median of {args.repeats}; ViT-B/16 shape T={T} d={D} k={K} fp16, "
          f"train batch {args.batch_size}, --threads {args.threads}")
    print(f"{'command':<24} {'peak RSS MB':>11} {'runs MB':>20} {'seconds':>8}")
    for name in jobs:
        runs = " ".join(f"{v:.0f}" for v in peaks[name])
        print(f"{name:<24} {median[name]:>11.1f} {runs:>20} {sorted(seconds[name])[len(seconds[name]) // 2]:>8.1f}")
    growth = None
    if len(sizes) > 1:
        growth = median[f"train {sizes[-1]}"] / median[f"train {sizes[0]}"] - 1
        print(f"train growth {sizes[0]} -> {sizes[-1]} rows: {100 * growth:+.1f}%")
    print(f"load average (1, 5, 15 min) before {', '.join(f'{v:.1f}' for v in load['before'])}, "
          f"after {', '.join(f'{v:.1f}' for v in load['after'])}, {load['cpus']} CPUs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": load, "shape": [K, T, D],
        "train_batch": args.batch_size, "threads": args.threads, "peak_rss_mb": median, "runs_mb": peaks,
        "seconds": seconds, "train_growth": growth}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
