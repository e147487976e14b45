"""Extraction overhead: images/s of a bare ``model(x)`` against the full ``mist-cloud extract`` path.

Same model, batch size and threads, in one process:

- bare: ``model(x)`` on images decoded and preprocessed beforehand (the whole network, classifier included);
- taps only: the forward extraction runs, on the same tensors (hooks, fp32 sums, stop after the last
  tapped layer), which separates "extraction skips the head" from "the pipeline costs little";
- extract: the real path (DataLoader decode + transform, taps, fp16 cast, shard writes with fsync).

The three run interleaved for ``--rounds`` rounds and the medians are reported, so a machine that is busy
with other work biases none of them in particular.

    .venv/bin/python benchmarks/bench_extract.py --json runs/bench_extract.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mist.cloud.backbones import create_backbone, make_transform
from mist.cloud.datasets import open_source, select
from mist.cloud.extract import ExtractConfig, extract
from mist.cloud.gather import parse_groups
from mist.cloud.taps import GroupTap, find_layers, recipe_for


def images_per_second(fn, batches: list[torch.Tensor]) -> float:
    """images/s of ``fn(x)`` over ``batches``, after one warm-up batch."""
    with torch.inference_mode():
        fn(batches[0])
        start = time.perf_counter()
        for x in batches:
            fn(x)
        seconds = time.perf_counter() - start
    return sum(len(x) for x in batches) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random-init"])
    parser.add_argument("--groups", default="12-15", help="lite0: stage 5, four blocks of (49, 192) at 224 px")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=256, help="per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    quiet = lambda _m: None  # noqa: E731
    backbone = create_backbone(args.model, args.weights, log=quiet)
    model = backbone.model
    channels_last = recipe_for(model).layout == "NCHW"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    source = open_source(args.data, args.split)
    ids = select(source.labels, args.images, None, 0)
    transform = make_transform(backbone.data_config)
    images = torch.stack([transform(source.load(int(i))) for i in ids])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    batches = [images[i:i + args.batch_size].contiguous(memory_format=layout)
               for i in range(0, len(images), args.batch_size)]
    layers = find_layers(model)
    groups = parse_groups(args.groups, len(layers))

    runs: dict[str, list[float]] = {"bare": [], "taps_only": [], "extract": []}
    row_shape = None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            runs["bare"].append(images_per_second(model, batches))
            with GroupTap(model, layers, groups) as tap:
                runs["taps_only"].append(images_per_second(tap, batches))
            result = extract(ExtractConfig(
                model=args.model, weights=args.weights, data=args.data, split=args.split,
                out=Path(tmp) / "set", groups=args.groups, dtype="float16", batch_size=args.batch_size,
                workers=args.workers, threads=args.threads, limit=args.images, overwrite=True,
                progress="none"), log=quiet)
            runs["extract"].append(result.images_per_second)
            row_shape = list(result.manifest.row_shape)
    median = {k: statistics.median(v) for k, v in runs.items()}
    report = {
        "model": args.model, "weights": backbone.weights_source, "groups": args.groups, "row_shape": row_shape,
        "images": len(ids), "rounds": args.rounds, "batch_size": args.batch_size, "threads": args.threads,
        "workers": args.workers, "channels_last": channels_last,
        "images_per_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "median_images_per_s": {k: round(v, 2) for k, v in median.items()},
        "extract_over_bare": round(median["extract"] / median["bare"], 3),
        "extract_over_taps_only": round(median["extract"] / median["taps_only"], 3), "goal": 0.95,
        "torch": torch.__version__, "machine": platform.machine(),
    }
    print(f"{args.model}, groups {args.groups} -> rows {tuple(row_shape)} fp16, {len(ids)} {args.data} images "
          f"x {args.rounds} rounds, batch {args.batch_size}, {args.threads} threads, {args.workers} workers")
    labels = {"bare": "bare model(x), preprocessed tensors", "taps_only": "taps only, preprocessed tensors",
              "extract": "extract: decode+transform+taps+fp16+shards"}
    print(f"{'path':<44} {'median':>8}  rounds (images/s)")
    for key, label in labels.items():
        print(f"{label:<44} {median[key]:>8.1f}  " + " ".join(f"{x:.1f}" for x in runs[key]))
    verdict = "meets" if report["extract_over_bare"] >= 0.95 else "misses"
    print(f"extract / bare = {report['extract_over_bare']:.3f} ({verdict} the 0.95 goal); "
          f"extract / taps only = {report['extract_over_taps_only']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
