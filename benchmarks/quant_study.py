"""Accuracy and bytes of float16, int8 and int4 feature sets: the device's models on each, same images.

Lite0 (real ImageNet weights, `--pretrained`) stage-5 sum, groups 12-15 (T = 49, d = 192), on Fashion-MNIST:
100 training images per class and 300 test images per class. The backbone runs once per split, in float32;
`mist-cloud convert` then writes the float16, int8 and int4 sets from those fp32 sums. That is the same
function and the same fp32 input `mist-cloud extract --dtype int8` quantises (`tests/test_quant_cli.py`
checks that the bytes are equal), so every dtype sees exactly the same images and sums.

Per dtype:
- the relative error of the stored features against the fp32 sums, ||x' - x|| / ||x||;
- a scikit-learn linear probe (lbfgs logistic regression) on the standardised mean-pooled features. C is
  chosen once, on an 80/20 split of the float16 training set, and used for every dtype. It is deterministic;
- the device's own probe, `mist-device train --blocks-per-group 0` (LayerNorm, mean pool, linear head),
  seeds 0, 1, 2;
- the adaptor, `mist-device train` (one LAE block, rank 32, 4 heads, 30 epochs, lr 3e-3: the recipe the
  accuracy study chose for Gather* k = 1 on this set), seeds 0, 1, 2.
Each run is tested with `mist-device evaluate` on its final checkpoint (last.safetensors): no choice is
made on the test set. Runs go through the real CLIs, in subprocesses with one BLAS thread.

    nice -n 10 .venv/bin/python benchmarks/quant_study.py --work runs/quant_study --jobs 3

With ``--structured DIR`` it runs the same device models on the structured tasks that
``python -m benchmarks.structured_study all`` extracted under DIR (count, location, orientation, natural; their
stored float16 sets, so int8 and int4 are quantised from the float16 sums there, not from fp32):

    nice -n 10 .venv/bin/python benchmarks/quant_study.py --structured runs/structured --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DTYPES = ("float16", "int8", "int4")
SEEDS = (0, 1, 2)
EXTRACT = ["--model", "tf_efficientnet_lite0", "--pretrained", "--data", "fashion-mnist", "--groups", "12-15",
           "--dtype", "float32", "--batch-size", "32", "--progress", "lines"]
SPLITS = {"train": ["--split", "train", "--per-class", "100", "--seed", "0"],
          "test": ["--split", "test", "--per-class", "300", "--seed", "0"]}
ADAPTOR = ["--rank", "32", "--heads", "4", "--epochs", "30", "--lr", "3e-3"]
PROBE = ["--blocks-per-group", "0", "--epochs", "30", "--lr", "1e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sh(*args: object) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=ENV)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{result.stdout}{result.stderr}")
    return result.stdout


def train_and_test(work: Path, dtype: str, model: str, seed: int) -> dict:
    run_dir = work / "runs" / f"{model}-{dtype}-seed{seed}"
    flags = ADAPTOR if model == "adaptor" else PROBE
    start = time.perf_counter()
    sh(BIN / "mist-device", "train", work / f"train-{dtype}", "--out", run_dir, "--seed", seed, "--overwrite",
       *flags)
    seconds = time.perf_counter() - start
    report = json.loads(sh(BIN / "mist-device", "evaluate", run_dir / "last.safetensors", work / f"test-{dtype}",
                           "--json", "--no-verify"))
    predictions = sh(BIN / "mist-device", "predict", run_dir / "last.safetensors", work / f"test-{dtype}",
                     "--no-verify")
    return {"dtype": dtype, "model": model, "seed": seed, "accuracy": 100 * report["accuracy"],
            "train_seconds": seconds, "predictions": [line.split(",")[2] for line in predictions.splitlines()[1:]]}


def linear_probe(work: Path) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mist.formats import FeatureSet

    def pooled(path: Path) -> tuple[np.ndarray, np.ndarray]:
        fs = FeatureSet(path)
        return fs.read(np.arange(len(fs))).mean(axis=2).reshape(len(fs), -1), fs.labels

    x, y = pooled(work / "train-float16")
    rng = np.random.default_rng(0)
    val = np.zeros(len(y), bool)
    for c in np.unique(y):
        rows = np.nonzero(y == c)[0]
        val[rng.permutation(rows)[: len(rows) // 5]] = True
    scores = {}
    for C in (0.01, 0.1, 1.0, 10.0):
        scaler = StandardScaler().fit(x[~val])
        fit = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x[~val]), y[~val])
        scores[C] = float(fit.score(scaler.transform(x[val]), y[val]))
    best = max(scores, key=lambda c: (scores[c], -c))
    out = {"C": best, "val_scores": scores, "accuracy": {}}
    for dtype in DTYPES:
        xt, yt = pooled(work / f"train-{dtype}")
        xs, ys = pooled(work / f"test-{dtype}")
        scaler = StandardScaler().fit(xt)
        fit = LogisticRegression(C=best, max_iter=5000).fit(scaler.transform(xt), yt)
        out["accuracy"][dtype] = 100 * float(fit.score(scaler.transform(xs), ys))
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean, std and agreement with float16 of each (dtype, model), over the seeds."""
    import numpy as np

    out = {}
    for dtype in DTYPES:
        for model in ("probe", "adaptor"):
            mine = [r for r in runs if r["dtype"] == dtype and r["model"] == model]
            accs = [r["accuracy"] for r in mine]
            same = [np.mean(np.array(r["predictions"]) == np.array(f["predictions"])) for r in mine
                    for f in runs if f["dtype"] == "float16" and f["model"] == model and f["seed"] == r["seed"]]
            out[f"{model}-{dtype}"] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs,
                                       "agreement_with_float16": float(np.mean(same))}
    return out


def structured(source: Path, jobs: int, json_path: Path) -> None:
    from mist.formats import FeatureSet
    from mist.formats.quant import bytes_per_row

    load_before, started = os.getloadavg(), time.perf_counter()
    results = {}
    for task in ("count", "location", "orientation", "natural"):
        work = source / task / "quant"
        work.mkdir(exist_ok=True)
        for split in ("train", "test"):
            link = work / f"{split}-float16"
            if not link.exists():
                link.symlink_to((source / task / split).resolve())
            for dtype in DTYPES[1:]:
                sh(BIN / "mist-cloud", "convert", link, "--dtype", dtype, "--out", work / f"{split}-{dtype}",
                   "--overwrite")
        shape = FeatureSet(work / "train-float16").row_shape
        tasks = [(d, m, s) for m in ("probe", "adaptor") for s in SEEDS for d in DTYPES]
        with ThreadPoolExecutor(jobs) as pool:
            runs = list(pool.map(lambda t, work=work: train_and_test(work, *t), tasks))
        results[task] = {"row_shape": list(shape), **summarise(runs),
                         "bytes_per_image": {d: bytes_per_row(d, shape) for d in DTYPES}}
        row = results[task]
        print(f"| {task} | " + " | ".join(
            f"{row[f'{m}-{d}']['mean']:.2f} ± {row[f'{m}-{d}']['std']:.2f}"
            for m in ("probe", "adaptor") for d in DTYPES) + " |", flush=True)
    load_after = os.getloadavg()
    print(f"load {load_before[0]:.1f} -> {load_after[0]:.1f}, {time.perf_counter() - started:.0f} s")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"source": str(source), "adaptor": ADAPTOR, "probe": PROBE, "seeds": SEEDS,
                                     "loadavg_before": load_before, "loadavg_after": load_after,
                                     "seconds": time.perf_counter() - started, "tasks": results}, indent=2) + "\n")
    print(f"wrote {json_path}")


def _delta(value: float, base: float, is_base: bool) -> str:
    return "" if is_base else f" ({value - base:+.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quant_study")
    parser.add_argument("--jobs", type=int, default=3, help="Training runs at a time.")
    parser.add_argument("--json", type=Path, default=None,
                        help="Default: benchmarks/results/quant_study.json (quant_structured.json with --structured).")
    parser.add_argument("--structured", type=Path, default=None,
                        help="The structured study's work directory: run on its tasks instead.")
    args = parser.parse_args()
    results = REPO / "benchmarks" / "results"
    if args.structured is not None:
        structured(args.structured, args.jobs, args.json or results / "quant_structured.json")
        return
    args.json = args.json or results / "quant_study.json"
    import numpy as np

    from mist.formats import FeatureSet
    from mist.formats.quant import bytes_per_row

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    for split, flags in SPLITS.items():
        if not (work / f"{split}-float32" / "manifest.json").exists() or not FeatureSet(
                work / f"{split}-float32", allow_incomplete=True).manifest.complete:
            print(f"extracting {split} (fp32) ...", flush=True)
            sh(BIN / "mist-cloud", "extract", *EXTRACT, *flags, "--out", work / f"{split}-float32")
        for dtype in DTYPES:
            sh(BIN / "mist-cloud", "convert", work / f"{split}-float32", "--dtype", dtype,
               "--out", work / f"{split}-{dtype}", "--overwrite")

    exact = FeatureSet(work / "train-float32")
    rows = np.arange(len(exact))
    reference = exact.read(rows)
    shape = exact.row_shape
    error = {d: float(np.linalg.norm(FeatureSet(work / f"train-{d}").read(rows) - reference)
                      / np.linalg.norm(reference)) for d in DTYPES}
    probe = linear_probe(work)
    print(f"linear probe (C={probe['C']}): {probe['accuracy']}", flush=True)
    tasks = [(d, m, s) for m in ("probe", "adaptor") for s in SEEDS for d in DTYPES]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda t: train_and_test(work, *t), tasks))
    load_after = os.getloadavg()

    table = []
    for dtype in DTYPES:
        row = {"dtype": dtype, "bytes_per_image": bytes_per_row(dtype, shape),
               "bytes_vs_float16": bytes_per_row(dtype, shape) / bytes_per_row("float16", shape),
               "relative_error": error[dtype], "sklearn_probe": probe["accuracy"][dtype]}
        for model in ("probe", "adaptor"):
            accs = [r["accuracy"] for r in runs if r["dtype"] == dtype and r["model"] == model]
            row[model] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs}
            same = [np.mean(np.array(r["predictions"]) == np.array(f["predictions"]))
                    for r in runs if r["dtype"] == dtype and r["model"] == model
                    for f in runs if f["dtype"] == "float16" and f["model"] == model and f["seed"] == r["seed"]]
            row[model]["agreement_with_float16"] = float(np.mean(same))
        table.append(row)
    base = table[0]
    print(f"\n{len(exact)} train / {len(FeatureSet(work / 'test-float32'))} test images, T={shape[1]} d={shape[2]}; "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}, {time.perf_counter() - started:.0f} s")
    print("| storage | bytes/image | vs fp16 | rel. error | LP pooled (sklearn) | device probe | adaptor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in table:
        cells = [f"{r['sklearn_probe']:.2f}" + _delta(r["sklearn_probe"], base["sklearn_probe"], r is base)]
        for model in ("probe", "adaptor"):
            cells.append(f"{r[model]['mean']:.2f} ± {r[model]['std']:.2f}"
                         + _delta(r[model]["mean"], base[model]["mean"], r is base))
        print(f"| {r['dtype']} | {r['bytes_per_image']:,} | {100 * r['bytes_vs_float16']:.1f}% | "
              f"{100 * r['relative_error']:.2f}% | " + " | ".join(cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for r in runs:
        r.pop("predictions")
    args.json.write_text(json.dumps({
        "train_images": len(exact), "test_images": len(FeatureSet(work / "test-float32")),
        "row_shape": list(shape), "extract": EXTRACT, "splits": SPLITS, "adaptor": ADAPTOR, "probe": PROBE,
        "sklearn_probe": probe, "loadavg_before": load_before, "loadavg_after": load_after,
        "seconds": time.perf_counter() - started, "table": table, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
