"""Extraction overhead: images/s of a bare ``model(x)`` against the full ``mist-cloud extract`` path.

Same model, batch size and threads, in one process:

- bare: ``model(x)`` on images decoded and preprocessed beforehand (the whole network, classifier included);
- taps only: the forward extraction runs, on the same tensors (hooks, fp32 sums, stop after the last
  tapped layer), which separates "extraction skips the head" from "the pipeline costs little";
- extract: the real path (DataLoader decode + transform, taps, fp16 cast, shard writes with fsync).

The three run interleaved for ``--rounds`` rounds and the medians are reported, so a machine that is busy
with other work biases none of them in particular.

    .venv/bin/python benchmarks/bench_extract.py --json runs/bench_extract.json

``--distributed``: the same extraction as real ``mist-cloud extract`` processes, 1 process x 2 threads against
``torchrun`` with 2 processes x 1 thread, with 1 process x 1 thread as a control (and, with ``--gpus``, 1..N
processes on N GPUs instead), interleaved for
``--rounds`` rounds. It reports the images/s of the extraction loop (total rows over the slowest rank's loop,
read from the ranks' own log lines) and of the whole command (process start, imports and model load
included), with the load average it ran under:

    .venv/bin/python benchmarks/bench_extract.py --distributed --model test_vit --weights file \
        --json benchmarks/results/bench_extract_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
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
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random-init", "file"],
                        help="file: the depth-12 ViT in benchmarks/weights (with --model test_vit --distributed)")
    parser.add_argument("--groups", default="12-15", help="lite0: stage 5, four blocks of (49, 192) at 224 px")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=256, help="per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--distributed", action="store_true",
                        help="1 process x 2 threads against torchrun 2 processes x 1 thread (see the docstring).")
    parser.add_argument("--gpus", action="store_true", help="With --distributed: 1..N processes on N GPUs.")
    args = parser.parse_args()
    if args.distributed:
        return distributed_main(args)
    if args.weights == "file":
        parser.error("--weights file goes with --distributed")
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


VIT_D12 = Path(__file__).parent / "weights" / "vit_fmnist_d12.safetensors"
_RANK_LINE = re.compile(r"wrote (\d+) rows in \d+ shards, ([\d.]+) images/s")
_ONE_LINE = re.compile(r"wrote \d+ rows \((\d+) now, \d+ before\).*?([\d.]+) images/s")


def extract_command(args: argparse.Namespace, out: Path, threads: int, device: str) -> list[str]:
    weights = (["--pretrained"] if args.weights == "pretrained" else
               ["--weights", str(VIT_D12), "--img-size", "64", "--model-kwargs", '{"depth": 12}']
               if args.weights == "file" else ["--random-init"])
    return ["-m", "mist.cloud", "extract", "--model", args.model, *weights, "--data", args.data,
            "--split", args.split, "--limit", str(args.images), "--groups", args.groups, "--batch-size",
            str(args.batch_size), "--workers", str(args.workers), "--threads", str(threads), "--device", device,
            "--progress", "lines", "--overwrite", "--out", str(out)]


def timed_run(processes: int, command: list[str]) -> dict[str, float]:
    """One real run: loop images/s (rows over the slowest rank's loop) and whole-command images/s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 0:  # a plain process, no torchrun
        argv = [sys.executable, *command]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
                "--master-addr", "127.0.0.1", "--master-port", str(port), *command]
    start = time.perf_counter()
    run = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"extraction failed ({' '.join(argv)}):\n{run.stderr[-2000:]}")
    found = _RANK_LINE.findall(run.stderr) if processes else _ONE_LINE.findall(run.stderr)
    rows = [int(n) for n, _ in found]
    loop_seconds = max(int(n) / float(rate) for n, rate in found if float(rate) > 0)
    return {"loop": sum(rows) / loop_seconds, "command": sum(rows) / wall}


def distributed_main(args: argparse.Namespace) -> None:
    if args.weights == "file" and args.groups == "12-15":
        args.groups = "0-12"  # the depth-12 ViT's layers
    # The middle one is the control: it tells the gain of 2 processes from that of 1 thread per process
    # (on an oversubscribed machine, 2 OpenMP threads lose badly waiting for each other).
    configs = {"1 process x 2 threads": (0, 2, "cpu"), "1 process x 1 thread": (0, 1, "cpu"),
               "2 processes x 1 thread": (2, 1, "cpu")}
    if args.gpus:
        configs = {f"{n} process(es) x {n} GPU(s)": (n, 1, "cuda") for n in range(1, torch.cuda.device_count() + 1)}
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (processes, threads, device) in configs.items():
                out = Path(tmp) / "set"
                runs[name].append(timed_run(processes, extract_command(args, out, threads, device)))
    load_after = os.getloadavg()
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("loop", "command")}
              for name, rs in runs.items()}
    names = list(configs)
    report = {
        "mode": "gpus" if args.gpus else "cpu", "model": args.model, "weights": args.weights,
        "groups": args.groups, "images": args.images, "rounds": args.rounds, "batch_size": args.batch_size,
        "workers": args.workers, "cpus": os.cpu_count(),
        "images_per_s": {n: [{k: round(v, 1) for k, v in r.items()} for r in rs] for n, rs in runs.items()},
        "median_images_per_s": {n: {k: round(v, 1) for k, v in m.items()} for n, m in median.items()},
        "ratio_loop": round(median[names[-1]]["loop"] / median[names[0]]["loop"], 3),
        "ratio_command": round(median[names[-1]]["command"] / median[names[0]]["command"], 3),
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
        "torch": torch.__version__, "machine": platform.machine(),
    }
    print(f"{args.model} ({args.weights}), groups {args.groups}, {args.images} {args.data} images x {args.rounds} "
          f"rounds, batch {args.batch_size}; {os.cpu_count()} CPUs, load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'configuration':<28} {'loop (median)':>14} {'command (median)':>17}  rounds loop/command (images/s)")
    for name in names:
        rounds = " ".join(f"{r['loop']:.1f}/{r['command']:.1f}" for r in runs[name])
        print(f"{name:<28} {median[name]['loop']:>14.1f} {median[name]['command']:>17.1f}  {rounds}")
    print(f"{names[-1]} / {names[0]}: loop {report['ratio_loop']:.3f}, whole command {report['ratio_command']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
