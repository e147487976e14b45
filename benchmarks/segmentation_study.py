"""Dense LAE against dense probe on the same shipped bytes, and what `--model auto` returns, over seeds.

Every number comes from the real command lines: `mist-device train` (--model lae, probe and auto, each
with the seed) on the training set, with a validation split of it, then `mist-device evaluate --json` on the
test set. Nothing is chosen on the test set: auto chooses on the validation split, and the adaptor's settings
passed with --lae-args were chosen on the same validation split before this study ran.

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
        row = {"seed": seed}
        for model in ("lae", "probe", "auto"):
            run = args.runs / f"{model}-{seed}"
            start = time.perf_counter()
            cli("train", args.train, "--out", str(run), "--model", model, "--seed", str(seed), *common)
            seconds = time.perf_counter() - start
            summary = json.loads((run / "dense.json").read_text())
            test = json.loads(cli("evaluate", str(run), args.test, "--json"))
            chosen = next(c for c in summary["candidates"] if c["kind"] == summary["chosen"])
            row[model] = {"chosen": summary["chosen"], "val_miou": chosen["val_miou"], "test_miou": test["miou"],
                          "test_pixel_accuracy": test["pixel_accuracy"], "train_s": round(seconds, 1)}
            loads.append(os.getloadavg()[0])
            print(f"seed {seed} {model:<5} chose {summary['chosen']:<11} val mIoU {chosen['val_miou']:.4f} "
                  f"test mIoU {test['miou']:.4f} pixel acc {test['pixel_accuracy']:.4f} ({seconds:.0f} s)",
                  flush=True)
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
