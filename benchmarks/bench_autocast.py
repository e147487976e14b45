"""Autocast against fp32: how far bf16/fp16 autocast moves the Gather* sums, and what it gains in images/s.

Per backbone family (EfficientNet-Lite0 with its real ImageNet weights; the depth-12 ViT pretrained in
benchmarks/weights/), on real Fashion-MNIST images, the same batches run in fp32 and under each autocast
dtype. The error is the relative RMS error of the stored sums, ``||a - b|| / ||b||`` over the whole batch,
against ``cloud.precision.TOLERANCE``; the speed is the median of ``--rounds`` interleaved rounds.

    .venv/bin/python benchmarks/bench_autocast.py --device cpu --json benchmarks/results/autocast_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mist.cloud.backbones import create_backbone, make_transform
from mist.cloud.datasets import open_source, select
from mist.cloud.gather import finish, parse_groups
from mist.cloud.precision import TOLERANCE, autocast, exact_fp32_on_cuda
from mist.cloud.taps import GroupTap, find_layers, recipe_for

VIT_WEIGHTS = Path(__file__).parent / "weights" / "vit_fmnist_d12.safetensors"
FAMILIES = {
    "cnn": dict(name="tf_efficientnet_lite0", weights="pretrained", weights_file=None, img_size=None,
                model_kwargs=None, groups="12-15"),
    "vit": dict(name="test_vit", weights="file", weights_file=str(VIT_WEIGHTS), img_size=64,
                model_kwargs={"depth": 12}, groups="0-12"),
}


def measure(family: str, device: torch.device, images: int, batch_size: int, rounds: int,
            modes: list[str]) -> dict:
    spec = FAMILIES[family]
    backbone = create_backbone(spec["name"], spec["weights"], spec["weights_file"], spec["img_size"],
                               log=lambda _m: None, model_kwargs=spec["model_kwargs"])
    model = backbone.model
    channels_last = recipe_for(model).layout == "NCHW"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    layers = find_layers(model)
    groups = parse_groups(spec["groups"], len(layers))
    source = open_source("fashion-mnist", "test")
    transform = make_transform(backbone.data_config)
    x = torch.stack([transform(source.load(int(i))) for i in select(source.labels, images, None, 0)])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    batches = [x[i:i + batch_size].to(device).contiguous(memory_format=layout) for i in range(0, len(x), batch_size)]

    def run(mode: str) -> tuple[torch.Tensor, float]:
        outs = []
        with GroupTap(model, layers, groups) as tap, torch.inference_mode(), autocast(mode, device):
            tap(batches[0])  # warm-up (cuDNN autotuning, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches:
                outs.append(finish(tap(b), groups, "none", "float32"))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return torch.cat(outs).float().cpu(), len(x) / seconds

    speeds: dict[str, list[float]] = {m: [] for m in ["off", *modes]}
    sums: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for mode in speeds:
            sums[mode], speed = run(mode)
            speeds[mode].append(speed)
    reference = sums["off"]
    errors = {m: float((sums[m] - reference).norm() / reference.norm()) for m in modes}
    return {
        "model": spec["name"], "weights": backbone.weights_source, "groups": spec["groups"],
        "row_shape": list(reference.shape[1:]), "images": len(x), "batch_size": batch_size,
        "relative_rms_error": {m: float(f"{e:.3g}") for m, e in errors.items()},
        "within_tolerance": {m: e <= TOLERANCE for m, e in errors.items()},
        "images_per_s": {m: [round(v, 1) for v in s] for m, s in speeds.items()},
        "median_images_per_s": {m: round(statistics.median(s), 1) for m, s in speeds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", default="cnn,vit")
    parser.add_argument("--modes", default="bf16,fp16", help="autocast dtypes to compare with fp32")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        exact_fp32_on_cuda()  # the reference is true fp32, not TF32
    load_before = os.getloadavg()
    results = [measure(f, device, args.images, args.batch_size, args.rounds, args.modes.split(","))
               for f in args.families.split(",")]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads, "rounds": args.rounds, "tolerance": TOLERANCE, "torch": torch.__version__,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()], "families": results,
    }
    print(f"autocast vs fp32 on {report['device']} ({args.device}), {args.images} Fashion-MNIST images, "
          f"tolerance {TOLERANCE:g} relative RMS; load {load_before[0]:.1f} -> {report['loadavg_after'][0]:.1f}")
    print(f"{'model':<24} {'mode':<5} {'rel. RMS error':>14} {'ok':>4} {'images/s (median)':>18}")
    for r in results:
        for mode, speed in r["median_images_per_s"].items():
            err = r["relative_rms_error"].get(mode, 0.0)
            ok = "-" if mode == "off" else ("yes" if r["within_tolerance"][mode] else "no")
            print(f"{r['model']:<24} {mode:<5} {err:>14.3g} {ok:>4} {speed:>18.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
