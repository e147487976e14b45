"""Device training speed: the NumPy LAE against its PyTorch-CPU twin, side by side in one run.

One training step = forward, backward, gradient clipping and AdamW, on fp16 features converted to fp32,
at the same shapes and thread count for both. Each configuration alternates NumPy and PyTorch rounds and
reports medians, so background load hits both alike. Threads are set per subprocess, before NumPy or torch
load their thread pools.

    .venv/bin/python benchmarks/bench_device.py                       # the table, JSON to runs/bench_device.json
    .venv/bin/python benchmarks/bench_device.py --shape vit-b --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (T, d, k): Lite0 stage 5 as the main job ships it; a ViT-S/16-like map; a ViT-B/16-like map.
SHAPES = {"lite0": (49, 192, 1), "vit-s": (197, 384, 1), "vit-b": (197, 768, 1)}


def worker(shape: str, batch: int, steps: int, rounds: int, rank: int, heads: int) -> dict:
    """Runs in a subprocess whose BLAS/torch thread count the parent fixed through the environment."""
    import time

    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from torch_lae import TorchLAE, adamw_param_groups, load_numpy_params

    from mist.device.lae import LAE, LAEConfig, flops_per_image, init_params, loss_and_grads
    from mist.device.optim import AdamW, clip_grad_norm

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    T, d, k = SHAPES[shape]
    cfg = LAEConfig(dim=d, tokens=T, groups=k, num_classes=10, rank=rank, heads=heads)
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((batch, k, T, d)).astype(np.float16)
    y = rng.integers(0, 10, batch)

    model = LAE(cfg, init_params(cfg, 0))
    opt = AdamW(model.params, lr=1e-3, weight_decay=1e-4)

    def numpy_step() -> None:
        _, grads, _ = loss_and_grads(model, x16, y, 0.1)
        clip_grad_norm(grads, 1.0)
        opt.step(grads)

    twin = TorchLAE(cfg.to_dict())
    load_numpy_params(twin, init_params(cfg, 0))
    topt = torch.optim.AdamW(adamw_param_groups(twin, 1e-4), lr=1e-3)
    tx16, ty = torch.from_numpy(x16), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def torch_step() -> None:
        topt.zero_grad(set_to_none=True)
        loss_fn(twin(tx16.float()), ty).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        topt.step()

    def timed(step) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    numpy_step(), torch_step()  # warm-up: allocations, thread pools
    times = {"numpy": [], "torch": []}
    for _ in range(rounds):
        times["numpy"].append(timed(numpy_step))
        times["torch"].append(timed(torch_step))
    med = {name: float(np.median(t)) for name, t in times.items()}
    flops = flops_per_image(cfg) * batch
    return {"shape": shape, "T": T, "d": d, "k": k, "batch": batch, "rank": rank, "heads": heads,
            "numpy_step_ms": 1e3 * med["numpy"], "torch_step_ms": 1e3 * med["torch"],
            "numpy_images_per_s": batch / med["numpy"], "torch_images_per_s": batch / med["torch"],
            "numpy_gflops": flops / med["numpy"] / 1e9, "numpy_over_torch": med["torch"] / med["numpy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: lite0 and vit-s")
    p.add_argument("--threads", type=int, action="append", help="default: 1 and 2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--json", type=Path, default=REPO / "runs" / "bench_device.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps, args.rounds, args.rank, args.heads)))
        return

    results = []
    for shape in args.shape or ["lite0", "vit-s"]:
        for threads in args.threads or [1, 2]:
            env = {**os.environ, **{v: str(threads) for v in (
                "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
            out = subprocess.run([sys.executable, __file__, "--worker", shape, "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--rounds", str(args.rounds), "--rank",
                                  str(args.rank), "--heads", str(args.heads)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            results.append({"threads": threads, **json.loads(out.splitlines()[-1])})

    print(f"{'shape':<7} {'T':>4} {'d':>4} {'thr':>3} {'numpy ms':>9} {'torch ms':>9} {'numpy/torch':>11} "
          f"{'numpy img/s':>11} {'numpy GFLOP/s':>13}")
    for r in results:
        print(f"{r['shape']:<7} {r['T']:>4} {r['d']:>4} {r['threads']:>3} {r['numpy_step_ms']:>9.1f} "
              f"{r['torch_step_ms']:>9.1f} {r['numpy_over_torch']:>11.2f} {r['numpy_images_per_s']:>11.0f} "
              f"{r['numpy_gflops']:>13.1f}")
    print("numpy/torch is throughput relative to PyTorch-CPU (> 1: NumPy faster)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"batch": args.batch, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
