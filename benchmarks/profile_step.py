"""Where a fast-path train step spends its time, line by line: the profile of docs/performance.md.

Runs the data step (fp16 batch -> prepared maps) and `train_step` of FastLAE at the ViT-B or Lite0 shape, batch
32, and charges the wall time between two executed lines of mist's device code to the first of them (a line
that calls NumPy is charged for what NumPy does). The tracer costs a microsecond or two per line, so shares are
what this is for; the absolute step time comes from bench_device.py.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py --shape vit-b --steps 10
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

SHAPES = {"vit-b": (197, 768), "lite0": (49, 192)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="vit-b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()

    import numpy as np

    import mist.device
    from mist.device.data import prepare_maps
    from mist.device.fast_lae import FastLAE
    from mist.device.lae import LAEConfig, init_params
    from mist.device.optim import AdamW
    from mist.device.step import Recipe, train_step

    try:  # as mist-device does at start (a tree from before issue 23 has no allocator.py: profiled as it ran)
        from mist.device.allocator import fix_mmap_threshold

        fix_mmap_threshold()
    except ImportError:
        pass
    T, d = SHAPES[args.shape]
    cfg = LAEConfig(dim=d, tokens=T, groups=1, num_classes=10, rank=32, heads=4)
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((32, 1, T, d)).astype(np.float16)
    y = rng.integers(0, 10, 32)
    model = FastLAE(cfg, init_params(cfg, 0))
    opt = AdamW(model.params, lr=1e-3, weight_decay=1e-4)
    recipe = Recipe(lr=1e-3, total_steps=10**9, warmup_steps=0, label_smoothing=0.1)
    maps = None

    def step(i: int) -> None:
        nonlocal maps
        maps = prepare_maps(x16, cfg.input_scale, model.dtype, maps)
        train_step(model, opt, maps, y, i, recipe)

    for i in range(3):  # warm-up: buffers, thread pool
        step(i)
    spent: collections.Counter = collections.Counter()
    last: list = [None, 0.0]
    device = str(Path(mist.device.__file__).parent)  # the tree imported: run with PYTHONPATH to profile another

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(device):
            return None

        def local(frame, event, arg):
            now = time.perf_counter()
            if last[0] is not None:
                spent[last[0]] += now - last[1]
            last[0] = (frame.f_code.co_filename, frame.f_lineno) if event == "line" else None
            last[1] = time.perf_counter()
            return local

        return local

    start = time.perf_counter()
    sys.settrace(tracer)
    for i in range(args.steps):
        step(3 + i)
    sys.settrace(None)
    wall = (time.perf_counter() - start) / args.steps
    total = sum(spent.values()) / args.steps
    print(f"{args.shape}, batch 32, {args.steps} traced steps: {1e3 * wall:.1f} ms a step (traced), "
          f"{1e3 * total:.1f} ms charged to lines; load {os.getloadavg()[0]:.1f}")
    by_file = collections.Counter()
    for (path, _), t in spent.items():
        by_file[Path(path).name] += t
    print("by file: " + ", ".join(f"{name} {100 * t / args.steps / total:.0f}%" for name, t in by_file.most_common()))
    for (path, line), t in spent.most_common(args.top):
        text = Path(path).read_text().splitlines()[line - 1].strip()
        share = 100 * t / args.steps / total
        print(f"{1e3 * t / args.steps:7.2f} ms {share:5.1f}%  {Path(path).name}:{line}  {text[:80]}")


if __name__ == "__main__":
    main()
