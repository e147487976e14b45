"""Device reader throughput and training-step time for float16, int8 and int4 sets, side by side in one run.

The same rows are written in each storage dtype (through the writer, i.e. `mist.formats.quant`). Each round
then times, for every dtype in turn:

- **read**: one epoch of shuffled minibatches through `FeatureSet.read`, exactly as the trainer reads
  them (fresh memmap per batch, dequantised to fp32 per batch);
- **step**: the trainer's data step and training step on those batches: `mist.device.data.batches` (read,
  cast, per-token statistics, the NaN/inf check) and `mist.device.step.train_step` on the model training
  uses (forward, backward, gradient clipping, AdamW).

Rounds alternate the dtypes, so background load hits all of them alike; the table reports medians. The sets
are a few tens of MB and sit in the page cache after the first round: this is the reader's CPU cost, not a
disk's. BLAS threads are fixed before NumPy loads (default 1, a Raspberry Pi core).

    .venv/bin/python benchmarks/bench_quant.py --source SET          # the rows of a real set (any dtype)
    .venv/bin/python benchmarks/bench_quant.py --rows 1000           # random Lite0-shaped rows instead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float16", "int8", "int4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="A feature set whose rows to use.")
    parser.add_argument("--rows", type=int, default=1000, help="Random Lite0-shaped rows when no --source.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-batches", type=int, default=8, help="Training steps timed per dtype per round.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_quant.json")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before NumPy loads its BLAS

    import numpy as np

    from mist.device.adaptor import build
    from mist.device.data import batches as prepared_batches
    from mist.device.lae import init_params
    from mist.device.optim import AdamW
    from mist.device.step import Recipe, train_step
    from mist.device.train import build_config
    from mist.formats import FeatureSet, FeatureSetWriter, Manifest
    from mist.formats.quant import bytes_per_row

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        if args.source is not None:
            src = FeatureSet(args.source)
            manifest, rows = src.manifest, np.arange(len(src))
            features, labels, ids = src.read(rows), src.labels, src.ids
        else:
            manifest = Manifest(
                backbone={"name": "random", "weights_sha256": "0" * 64, "weights_source": "none"},
                groups=[[12, 13, 14, 15]], scale="none", tokens=49, prefix_tokens=0, grid=[7, 7], dim=192,
                dtype="float16", data_config={}, classes=[str(c) for c in range(10)], split="train",
                dataset={"source": "random", "hash": "0"})
            rng = np.random.default_rng(0)
            features = rng.standard_normal((args.rows, *manifest.row_shape)).astype(np.float32)
            labels, ids = rng.integers(0, 10, args.rows), np.arange(args.rows)
        sets = {}
        for dtype in DTYPES:
            writer = FeatureSetWriter(Path(tmp) / dtype, replace(manifest, dtype=dtype), shard_rows=512)
            writer.add(features, labels, ids)
            writer.close()
            sets[dtype] = FeatureSet(Path(tmp) / dtype)
        n = len(features)
        cfg = build_config(sets["float16"])
        reads = {d: [] for d in DTYPES}
        steps = {d: [] for d in DTYPES}
        for round_index in range(args.rounds + 1):  # round 0 warms the page cache and the allocator
            order = np.random.default_rng([0, round_index]).permutation(n)
            batches = [order[b:b + args.batch] for b in range(0, n, args.batch)]
            for dtype in DTYPES:
                fs = sets[dtype]
                start = time.perf_counter()
                for rows in batches:
                    fs.read(rows)
                seconds = time.perf_counter() - start
                model = build(cfg, init_params(cfg, 0))
                optimizer = AdamW(model.params, lr=1e-3, weight_decay=1e-4)
                recipe = Recipe(lr=1e-3, total_steps=len(batches), warmup_steps=0, label_smoothing=0.1)
                start = time.perf_counter()
                for i, batch in enumerate(prepared_batches(fs, batches[:args.step_batches], {model.reads})):
                    train_step(model, optimizer, batch.input_for(model), batch.labels, i, recipe)
                step_seconds = (time.perf_counter() - start) / min(args.step_batches, len(batches))
                if round_index:
                    reads[dtype].append(n / seconds)
                    steps[dtype].append(step_seconds)
    load_after = os.getloadavg()

    results = []
    fp16_read = float(np.median(reads["float16"]))
    fp16_step = float(np.median(steps["float16"]))
    for dtype in DTYPES:
        read = float(np.median(reads[dtype]))
        step = float(np.median(steps[dtype]))
        results.append({
            "dtype": dtype, "bytes_per_image": bytes_per_row(dtype, manifest.row_shape),
            "bytes_vs_float16": bytes_per_row(dtype, manifest.row_shape) / bytes_per_row("float16", manifest.row_shape),
            "read_images_per_s": read, "read_vs_float16": read / fp16_read,
            "read_runs": reads[dtype], "step_ms": 1e3 * step, "step_vs_float16": step / fp16_step,
            "step_runs_ms": [1e3 * s for s in steps[dtype]],
        })
    print(f"rows {n} of (k, T, d) = {manifest.row_shape}, batch {args.batch}, {args.rounds} rounds (medians), "
          f"{args.threads} BLAS thread(s); load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'dtype':<8} {'bytes/img':>9} {'vs fp16':>7} {'read img/s':>11} {'vs fp16':>7} "
          f"{'step ms':>8} {'vs fp16':>7}")
    for r in results:
        print(f"{r['dtype']:<8} {r['bytes_per_image']:>9,} {r['bytes_vs_float16']:>7.3f} "
              f"{r['read_images_per_s']:>11,.0f} {r['read_vs_float16']:>7.2f} {r['step_ms']:>8.2f} "
              f"{r['step_vs_float16']:>7.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "source": str(args.source) if args.source else f"random, {args.rows} rows",
        "row_shape": list(manifest.row_shape), "batch": args.batch, "rounds": args.rounds,
        "step_batches": args.step_batches, "threads": args.threads, "lae": cfg.to_dict(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "numpy": np.__version__},
        "results": results,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
