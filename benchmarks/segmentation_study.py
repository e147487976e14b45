"""Dense LAE against dense probe on the same shipped bytes, and what `--model auto` returns, over seeds.

Every number comes from the real command lines: `mist-device train --model auto` (each seed) on the
training set with a validation split of it, which trains the dense probes and the dense LAE and keeps each
one's weights, then `mist-device evaluate --json` on the test set for the dense LAE, the best dense probe on
validation and the model auto chose. Nothing is chosen on the test set: auto chooses on the validation
split, and the adaptor's settings passed with --lae-args were chosen on a validation split before this study
ran.

    python -m benchmarks.tasks.segmentation --out runs/segtask --train 500 --test 250
    mist-cloud extract --model tf_efficientnet_lite0 --pretrained --data runs/segtask/train --groups 9-11 \\
        --split train --out runs/segfeats/train          # and the same for test
    python -m benchmarks.segmentation_study --train runs/segfeats/train --test runs/segfeats/test \\
        --lae-args "--lr 1e-2" --out benchmarks/results/segmentation_study.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "mist.device", *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise SystemExit(f"mist-device {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--val-split", type=float, default=0.2)
    p.add_argument("--lae-args", default="", help="Adaptor options, chosen on validation beforehand.")
    p.add_argument("--runs", type=Path, default=Path("runs/segstudy"))
    p.add_argument("--out", type=Path, required=True, help="The JSON results file.")
    args = p.parse_args()
    common = ["--val-split", str(args.val_split), "--epochs", str(args.epochs), "--threads", "1", "--overwrite",
              *shlex.split(args.lae_args)]
    loads, rows = [os.getloadavg()[0]], []
    for seed in args.seeds:
        # One --model auto run trains every candidate (the dense probes at their learning rates, the dense LAE)
        # on one validation split, keeps each one's best epoch in RUN/candidates/, and chooses among them.
        run = args.runs / f"auto-{seed}"
        start = time.perf_counter()
        cli("train", args.train, "--out", str(run), "--model", "auto", "--seed", str(seed), *common)
        seconds = time.perf_counter() - start
        summary = json.loads((run / "dense.json").read_text())
        probes = [c for c in summary["candidates"] if c["kind"] == "dense-probe"]
        picks = {"lae": next(c for c in summary["candidates"] if c["kind"] == "dense-lae"),
                 "probe": max(probes, key=lambda c: c["val_miou"]),  # the probe's own choice on validation
                 "auto": next(c for c in summary["candidates"] if c["name"] == summary["chosen_name"])}
        row = {"seed": seed, "train_s": round(seconds, 1)}
        for model, pick in picks.items():
            test = json.loads(cli("evaluate", str(run / "candidates" / f"{pick['name']}.safetensors"), args.test,
                                  "--json"))
            row[model] = {"chosen": pick["name"], "val_miou": pick["val_miou"], "test_miou": test["miou"],
                          "test_pixel_accuracy": test["pixel_accuracy"]}
            print(f"seed {seed} {model:<5} {pick['name']:<22} val mIoU {pick['val_miou']:.4f} "
                  f"test mIoU {test['miou']:.4f} pixel acc {test['pixel_accuracy']:.4f}", flush=True)
        loads.append(os.getloadavg()[0])
        rows.append(row)
    mean = {m: sum(r[m]["test_miou"] for r in rows) / len(rows) for m in ("lae", "probe", "auto")}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_1min": [round(v, 2) for v in loads],
              "train": args.train, "test": args.test, "options": common, "rows": rows, "mean_test_miou": mean,
              "lae_minus_probe_points": round(100 * (mean["lae"] - mean["probe"]), 2),
              "auto_minus_probe_points": round(100 * (mean["auto"] - mean["probe"]), 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"mean test mIoU: dense LAE {mean['lae']:.4f}, dense probe {mean['probe']:.4f}, auto {mean['auto']:.4f} "
          f"(LAE - probe {result['lae_minus_probe_points']:+.2f} points); load {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
