"""The search study (issue 22): does ``mist-device train --model auto``, with no other flag, beat the best
linear probe on the same shipped bytes, match the exhaustive grid, and stay stable across seeds?

    python -m benchmarks.search_study --tasks count orientation natural --seeds 0 1 2
    python -m benchmarks.search_study --table          # the tables of docs/results.md from the saved rows

Per task and seed, on the sets benchmarks/structured_study.py extracts (real EfficientNet-Lite0, stage 5
summed, 100 training images per class; ``--data`` holds them, by default runs/structured):
  auto       ``train --model auto`` (successive halving within the default budget, refit on every row)
  grid       ``train --model auto --grid "lr=1e-3,3e-3 blocks=1,4"`` (every point to the end, refit)
  today      ``train --model auto --grid lr=1e-3 --no-refit``: what --model auto trained before the search
             (the probes and one default adaptor), for the training-time ratio, measured in the same run
  sklearn    scikit-learn LogisticRegression on the same shipped sum, pooled and flattened, standardised,
             C from nine values chosen on the device's own 80/20 split, refit on every training row
Test accuracy is read after every choice. Rows go to benchmarks/results/search/<task>.json with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "search"
TASKS = ("count", "orientation", "natural", "location")
GRID = "lr=1e-3,3e-3 blocks=1,4"
C_VALUES = np.logspace(-4, 4, 9)


def mist(*args: str) -> float:
    """Run a mist-device command; its wall seconds."""
    cmd = [str(Path(sys.executable).with_name("mist-device")), *args]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def test_accuracy(model: Path, test_set: Path) -> float:
    out = subprocess.run([str(Path(sys.executable).with_name("mist-device")), "evaluate", str(model), str(test_set),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["accuracy"])


def sklearn_probe(data: Path, seed: int) -> dict:
    """The best probe on the same bytes, as the issue defines it; the split is the device's own."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mist.device.data import read_rows, split_rows
    from mist.formats import FeatureSet

    train, test = FeatureSet(data / "train"), FeatureSet(data / "test")
    x = read_rows(train, np.arange(len(train)))
    xt = read_rows(test, np.arange(len(test)))
    fit_rows, val_rows = split_rows(train.labels, 0.2, seed)
    best = None
    for features, f, ft in (("pooled", x.mean(axis=2).reshape(len(x), -1), xt.mean(axis=2).reshape(len(xt), -1)),
                            ("flat", x.reshape(len(x), -1), xt.reshape(len(xt), -1))):
        for c in C_VALUES:
            scaler = StandardScaler().fit(f[fit_rows])
            clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(f[fit_rows]), train.labels[fit_rows])
            val = clf.score(scaler.transform(f[val_rows]), train.labels[val_rows])
            if best is None or val > best[0]:
                best = (val, features, c, f, ft)
    val, features, c, f, ft = best
    scaler = StandardScaler().fit(f)
    clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(f), train.labels)
    return {"sklearn_test": float(clf.score(scaler.transform(ft), test.labels)),
            "sklearn_choice": f"{features} C={c:g}", "sklearn_val": float(val)}


def run_one(data: Path, task: str, seed: int, threads: int) -> dict:
    d, out = data / task, data / task / "search-runs"
    common = ["--seed", str(seed), "--threads", str(threads), "--overwrite", "--no-verify", "--progress", "none"]
    row: dict = {"task": task, "seed": seed}
    for key, extra in (("auto", []), ("grid", ["--grid", GRID]), ("today", ["--grid", "lr=1e-3", "--no-refit"])):
        run_dir = out / f"{key}-s{seed}"
        row[f"{key}_seconds"] = mist("train", str(d / "train"), "--out", str(run_dir), "--model", "auto", *extra,
                                     *common)
        table = json.loads((run_dir / "grid.json").read_text())
        row[f"{key}_choice"] = table["chosen"]
        row[f"{key}_test"] = test_accuracy(run_dir, d / "test")
        row["set_bytes_per_image"] = table["set_bytes_per_image"]
    row.update(sklearn_probe(d, seed))
    return row


def summarise(rows: list[dict]) -> str:
    lines = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        lines += [f"\n### {task} ({len(mine)} seeds: {', '.join(str(r['seed']) for r in mine)})\n",
                  "| model | test accuracy %, mean ± std | per seed | train s, mean | chosen |",
                  "|---|---|---|---|---|"]
        for key, name in (("sklearn", "best probe on the same bytes (scikit-learn, refit)"),
                          ("auto", "`--model auto` (default search)"), ("grid", f"`--model auto --grid \"{GRID}\"`"),
                          ("today", "`--model auto --grid lr=1e-3 --no-refit` (before this issue)")):
            acc = np.array([r[f"{key}_test"] for r in mine]) * 100
            secs = np.mean([r[f"{key}_seconds"] for r in mine]) if f"{key}_seconds" in mine[0] else float("nan")
            chosen = ", ".join(sorted({str(r[f"{key}_choice"]) for r in mine}))
            lines.append(f"| {name} | {acc.mean():.1f} ± {acc.std():.1f} | {' / '.join(f'{a:.1f}' for a in acc)} | "
                         f"{secs:.1f} | {chosen} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "structured",
                   help="where benchmarks/structured_study.py extract wrote the sets")
    p.add_argument("--tasks", nargs="+", default=["count", "orientation", "natural"], choices=TASKS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print the tables of the saved rows")
    a = p.parse_args()
    if not a.table:
        for task in a.tasks:
            path = RESULTS / f"{task}.json"
            rows = json.loads(path.read_text())["rows"] if path.exists() else []
            for seed in a.seeds:
                row = run_one(a.data, task, seed, a.threads)
                row["loadavg"] = os.getloadavg()
                rows = sorted([r for r in rows if r["seed"] != seed] + [row], key=lambda r: r["seed"])
                path.parent.mkdir(parents=True, exist_ok=True)
                saved = {"grid": GRID, "machine": "2-core x86_64 VM", "rows": rows}
                path.write_text(json.dumps(saved, indent=1) + "\n")
    paths = [RESULTS / f"{t}.json" for t in TASKS if (RESULTS / f"{t}.json").exists()]
    rows = [r for path in paths for r in json.loads(path.read_text())["rows"]]
    print(summarise(rows))


if __name__ == "__main__":
    main()
