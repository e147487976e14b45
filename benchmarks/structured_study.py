"""The structured-task study: does the device's own search (`mist-device train --model auto`) beat the best
linear probe on the same shipped bytes, on VTAB-style structured tasks and on the natural task?

    python -m benchmarks.structured_study all            # tasks, extraction, then every grid (3 seeds)
    python -m benchmarks.structured_study extract        # only generate the tasks and extract features
    python -m benchmarks.structured_study run --seeds 0 1 2

Tasks: count, location, orientation (benchmarks/tasks/structured.py, real Fashion-MNIST items) and natural
(Fashion-MNIST itself); 100 training images per class, of which the device holds out 20% for validation, and
40 test images per class (natural: 400 test images). Features: the real EfficientNet-Lite0 (installed weights
package, offline), stage 5 summed (groups 12-15, at 112 px: 16 x 192, fp16). Every model is chosen on validation only;
test accuracy is read after the choice. Results: benchmarks/results/structured_study.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "structured"
RESULTS = ROOT / "benchmarks" / "results" / "structured"  # one JSON per task, so tasks can run side by side
TASKS = ("count", "location", "orientation", "natural")
GROUPS = "12-15"
# The canvases are 112 px (4x4 cells of 28 px items): extracting at 112 px, not the model's 224, keeps their
# native resolution and costs a quarter of the compute on a shared 2-core machine; stage 5 is then 4 x 4 tokens.
IMG_SIZE = 112
# The searched grid: learning rate x depth x position embedding, with the probes beside it (--model auto).
# It contains the adaptor's defaults (lr 1e-3, one block, no position embedding) as one of its points, trained
# on the same split and seed, so "defaults, no search" is read from that member without another run.
GRID = "lr=1e-3,3e-3 blocks=1,4 pos=0,1"
DEFAULTS_MEMBER = "lae-lr0.001-blocks1-pos0"
EPOCHS = 20


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def sh(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def extract(task: str, threads: int) -> None:
    out = WORK / task
    if (out / "done").exists():
        return
    base = [bin_path("mist-cloud"), "extract", "--model", "tf_efficientnet_lite0", "--pretrained",
            "--groups", GROUPS, "--img-size", str(IMG_SIZE), "--threads", str(threads), "--progress", "lines"]
    if task == "natural":
        sh([*base, "--data", "fashion-mnist", "--split", "train", "--per-class", "100", "--out", str(out / "train")])
        sh([*base, "--data", "fashion-mnist", "--split", "test", "--limit", "400", "--out", str(out / "test")])
    else:
        from benchmarks.tasks.structured import generate

        images = generate(task, WORK / "images" / task, per_class=100, test_per_class=40, seed=0)
        sh([*base, "--data", str(images["train"]), "--out", str(out / "train")])
        sh([*base, "--data", str(images["test"]), "--out", str(out / "test")])
    (out / "done").write_text("ok\n")


def evaluate(run_dir: Path, test_set: Path) -> float:
    out = subprocess.run([bin_path("mist-device"), "evaluate", str(run_dir), str(test_set), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["accuracy"])


def run_one(task: str, seed: int, threads: int) -> dict:
    """One seed of one task: the auto search (probes + LAE grid, the defaults among them)."""
    data = WORK / task
    common = ["--val-split", "0.2", "--epochs", str(EPOCHS), "--seed", str(seed), "--threads", str(threads),
              "--overwrite", "--no-verify"]
    row: dict = {"task": task, "seed": seed}
    auto_dir = data / f"auto-s{seed}"
    row["auto_seconds"] = sh([bin_path("mist-device"), "train", str(data / "train"), "--out", str(auto_dir),
                              "--model", "auto", "--grid", GRID, *common])
    table = json.loads((auto_dir / "grid.json").read_text())
    row["auto_choice"] = table["chosen"]
    row["auto_test"] = evaluate(auto_dir, data / "test")
    # The best of each family, chosen on validation within the family; test read afterwards.
    for family in ("probe", "lae"):
        members = [m for m in table["members"] if m["kind"] == family]
        best = max(members, key=lambda m: (m["val_acc"], -m["val_loss"]))
        row[f"{family}_choice"] = best["name"]
        row[f"{family}_val"] = best["val_acc"]
        row[f"{family}_test"] = evaluate(auto_dir / "members" / f"{best['name']}.safetensors", data / "test")
    defaults = next(m for m in table["members"] if m["name"] == DEFAULTS_MEMBER)
    row["default_val"] = defaults["val_acc"]
    row["default_test"] = evaluate(auto_dir / "members" / f"{DEFAULTS_MEMBER}.safetensors", data / "test")
    return row


def run(seeds: list[int], threads: int, tasks: list[str]) -> None:
    for task in tasks:
        path = RESULTS / f"{task}.json"
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        for seed in seeds:
            rows = [r for r in rows if r["seed"] != seed]
            rows.append(run_one(task, seed, threads))
            rows.sort(key=lambda r: r["seed"])
            save(path, rows)


def save(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"grid": GRID, "img_size": IMG_SIZE, "epochs": EPOCHS, "groups": GROUPS,
                                "loadavg": os.getloadavg(), "rows": rows}, indent=1) + "\n")


def all_rows() -> list[dict]:
    return [r for t in TASKS if (RESULTS / f"{t}.json").exists()
            for r in json.loads((RESULTS / f"{t}.json").read_text())["rows"]]


def summarise(rows: list[dict]) -> str:
    import numpy as np

    lines = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        lines.append(f"\n### {task} ({len(mine)} seeds)\n")
        lines.append("| model (chosen on validation) | test accuracy, mean ± std | chosen |")
        lines.append("|---|---|---|")
        for key, name in (("auto", "--model auto"), ("probe", "best probe on the shipped sum"),
                          ("lae", "best adaptor in the grid"), ("default", "adaptor defaults, no search")):
            accs = np.array([r[f"{key}_test"] for r in mine]) * 100
            chosen = ", ".join(sorted({str(r.get(f"{key}_choice", "defaults")) for r in mine}))
            lines.append(f"| {name} | {accs.mean():.1f} ± {accs.std():.1f} | {chosen} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("extract", "run", "all", "table"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.step in ("extract", "all"):
        for task in a.tasks:
            extract(task, a.threads)
    if a.step in ("run", "all"):
        run(a.seeds, a.threads, a.tasks)
    print(summarise(all_rows()))


if __name__ == "__main__":
    main()
