"""Train-step time and memory of the dense head beside the classification head, at the 14x14 shape.

The shape is Lite0's stage 4 at 224 px (k=1 map of T=196 tokens, d=112), 11 classes, label maps 56x56 (4x the
grid), batch 32, the default adaptor (rank 32, 4 heads, one block). Each round times one training step
(forward, loss, backward) of each model, the order alternating from round to round; the figures are
medians over the rounds, and the ratio is taken within each round, so a load that changes during the run
moves both alike. Memory is the peak of NumPy allocations during one step (tracemalloc), beyond the
weights and the batch held before it.

    python -m benchmarks.bench_dense --out benchmarks/results/bench_dense.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from mist.device.dense import DENSE_LAE, DENSE_PROBE, DenseConfig, build, init_dense
from mist.device.dense_layers import pixel_cross_entropy
from mist.device.lae import LAE, init_params
from mist.device.layers import softmax_cross_entropy


def blas_kernel() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i.get('internal_api')} {i.get('architecture')} x{i.get('num_threads')}"
                         for i in threadpool_info())
    except ImportError:
        return "threadpoolctl not installed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cfg = DenseConfig(dim=112, tokens=196, groups=1, num_classes=11, prefix=0, grid=[14, 14], label_size=[56, 56])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, 196, 112)).astype(np.float32)
    masks = rng.integers(0, 11, (args.batch, 56, 56)).astype(np.uint8)
    labels = rng.integers(0, 11, args.batch)
    classify = LAE(cfg.lae_config(), init_params(cfg.lae_config(), 0))
    models = {"classification LAE (pooled head)": (classify, lambda out: softmax_cross_entropy(out, labels)),
              "dense LAE (per-token head, 56x56)": (build(DENSE_LAE, cfg, init_dense(DENSE_LAE, cfg, 0)),
                                                    lambda out: pixel_cross_entropy(out, masks)),
              "dense probe (56x56)": (build(DENSE_PROBE, cfg, init_dense(DENSE_PROBE, cfg, 0, x)),
                                      lambda out: pixel_cross_entropy(out, masks))}

    def step(name: str) -> None:
        model, loss = models[name]
        model.backward(loss(model.forward(x))[1])

    peaks = {}
    for name in models:
        step(name)  # warm: caches, BLAS buffers
        tracemalloc.start()
        step(name)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    times: dict[str, list[float]] = {name: [] for name in models}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    loads.append(os.getloadavg()[0])
    base = "classification LAE (pooled head)"
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_1min": loads, "blas": blas_kernel(),
              "shape": {"batch": args.batch, "k": 1, "T": 196, "d": 112, "classes": 11, "labels": [56, 56]},
              "models": {name: {"step_ms_median": round(1000 * float(np.median(t)), 2),
                                "ratio_to_classification": round(float(np.median(np.array(t) / np.array(times[base]))),
                                                                 3),
                                "step_peak_mib": round(peaks[name] / 2**20, 2)} for name, t in times.items()}}
    for name, m in result["models"].items():
        print(f"{name:<36} {m['step_ms_median']:>8.1f} ms/step  x{m['ratio_to_classification']:<6} "
              f"peak {m['step_peak_mib']:.1f} MiB")
    print(f"load {loads[0]:.1f} -> {loads[-1]:.1f}; {result['blas']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
