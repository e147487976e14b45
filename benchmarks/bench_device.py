"""Device training speed: mist's NumPy trainer against a lean PyTorch-CPU twin of the same adaptor, side by side.

One training step = fp16 -> fp32 cast, forward, backward, gradient clipping and AdamW, at the same shape and
thread count for all. Three models per step: mist's fast path (FastLAE, what `mist-device train` runs), its
readable reference (LAE), and a lean PyTorch twin (scaled_dot_product_attention, fused AdamW where the build
has it, torch.set_num_threads = the BLAS threads). Rounds alternate between them and the table shows medians,
so background load hits all alike; the load average is reported. FLOP/s count the reference's matmuls
(lae.flops_per_image), as a fraction of a numpy sgemm peak measured in the same process.

Single-image predict latency: mist's `FastLAE.forward(x, keep_cache=False)` in a process that never imports
torch, against the twin under torch.inference_mode in another; the two kinds of process alternate.

    .venv/bin/python benchmarks/bench_device.py          # the table; JSON to benchmarks/results/bench_device.json
    .venv/bin/python benchmarks/bench_device.py --shape vit-b --threads 1 --steps 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (T, d, k): a ViT-B/16 map (the shape the goals are set at); Lite0 stage 5 as the main job ships it.
SHAPES = {"vit-b": (197, 768, 1), "lite0": (49, 192, 1)}
CLASSES = 10


def make_config(shape: str, rank: int, heads: int):
    from mist.device.lae import LAEConfig

    T, d, k = SHAPES[shape]
    return LAEConfig(dim=d, tokens=T, groups=k, num_classes=CLASSES, rank=rank, heads=heads)


def sgemm_gflops(repeats: int = 5, n: int = 1024) -> float:
    """NumPy's float32 GEMM rate on this machine right now: the peak the step is measured against."""
    import numpy as np

    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e9


def lean_twin(cfg_dict: dict):
    """The same adaptor, written the way a PyTorch user would: SDPA, fused LayerNorm and Linear."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int, rank: int, heads: int):
            super().__init__()
            self.heads = heads
            self.norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * rank), nn.Linear(rank, dim)

        def forward(self, state):
            B, T, _ = state.shape
            q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2)
                       for t in self.qkv(self.norm(state)).chunk(3, dim=-1))
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)
            return state + self.out(o)

    class Twin(nn.Module):
        def __init__(self, c: dict):
            super().__init__()
            self.c = c
            self.blocks = nn.ModuleList(Block(c["dim"], c["rank"], c["heads"])
                                        for _ in range(c["groups"] * c["blocks_per_group"]))
            self.norm, self.head = nn.LayerNorm(c["dim"]), nn.Linear(c["dim"], c["num_classes"])

        def forward(self, x):
            state, blocks = None, iter(self.blocks)
            for j in range(self.c["groups"]):
                state = x[:, j] if state is None else state + x[:, j]
                for _ in range(self.c["blocks_per_group"]):
                    state = next(blocks)(state)
            h = self.norm(state)
            return self.head(h.mean(dim=1) if self.c["pool"] == "mean" else h[:, 0])

    return Twin(cfg_dict)


def torch_adamw(model, lr: float, weight_decay: float):
    import torch

    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "norm." in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith(".bias") or "norm." in n]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True), "foreach"


def train_worker(shape: str, batch: int, steps: int, rounds: int, rank: int, heads: int) -> dict:
    """Runs in a subprocess whose thread counts the parent fixed through the environment."""
    import numpy as np
    import torch

    from mist.device.data import prepare_maps
    from mist.device.fast_lae import FastLAE
    from mist.device.lae import LAE, flops_per_image, init_params
    from mist.device.optim import AdamW
    from mist.device.step import Recipe, train_step

    as_the_cli_does()
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    cfg = make_config(shape, rank, heads)
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((batch, cfg.groups, cfg.tokens, cfg.dim)).astype(np.float16)
    y = rng.integers(0, CLASSES, batch)

    def numpy_step(model_class):
        """The trainer's data step (the fp16 batch cast into reused prepared maps, for a model that reads
        them) and its training step, as `mist-device train` runs them."""
        model = model_class(cfg, init_params(cfg, 0))
        opt = AdamW(model.params, lr=1e-3, weight_decay=1e-4)
        recipe = Recipe(lr=1e-3, total_steps=10**9, warmup_steps=0, label_smoothing=0.1, grad_clip=1.0)
        maps, count = None, 0

        def step() -> None:
            nonlocal maps, count
            if model.reads == "maps":
                maps = prepare_maps(x16, cfg.input_scale, model.dtype, maps)
            train_step(model, opt, maps if model.reads == "maps" else x16, y, count, recipe)
            count += 1

        return step

    twin = lean_twin(cfg.to_dict())
    topt, fused = torch_adamw(twin, 1e-3, 1e-4)
    tx16, ty = torch.from_numpy(x16), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def torch_step() -> None:
        topt.zero_grad(set_to_none=True)
        loss_fn(twin(tx16.float()), ty).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        topt.step()

    runners = {"fast": numpy_step(FastLAE), "reference": numpy_step(LAE), "torch": torch_step}

    def timed(step) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    for step in runners.values():  # warm-up: allocations, thread pools
        step()
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks = []
    for _ in range(rounds):
        peaks.append(sgemm_gflops())
        for name, step in runners.items():
            times[name].append(timed(step))
    med = {name: float(np.median(t)) for name, t in times.items()}
    flops, peak = flops_per_image(cfg) * batch, float(np.median(peaks))
    return {"shape": shape, "T": cfg.tokens, "d": cfg.dim, "k": cfg.groups, "batch": batch, "rank": rank,
            "heads": heads, "threads": threads, "torch_adamw": fused, "sgemm_gflops": peak, "blas": blas_kernel(),
            **{f"{name}_step_ms": 1e3 * t for name, t in med.items()},
            **{f"{name}_images_per_s": batch / t for name, t in med.items()},
            **{f"{name}_of_peak": flops / t / 1e9 / peak for name, t in med.items()},
            "fast_over_torch": med["torch"] / med["fast"], "reference_over_torch": med["torch"] / med["reference"],
            "fast_over_reference": med["reference"] / med["fast"]}


def predict_worker(side: str, shape: str, calls: int, rank: int, heads: int) -> dict:
    """One image at a time, as `mist-device predict` answers a request; side "numpy" never imports torch."""
    import numpy as np

    cfg = make_config(shape, rank, heads)
    from mist.device.lae import init_params

    params = init_params(cfg, 0)
    x16 = np.random.default_rng(0).standard_normal((1, cfg.groups, cfg.tokens, cfg.dim)).astype(np.float16)
    if side == "numpy":
        from mist.device.adaptor import build

        as_the_cli_does()

        model = build(cfg, params)

        def call() -> None:
            model.forward(x16, keep_cache=False)
    else:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        twin = lean_twin(cfg.to_dict()).eval()
        tx16 = torch.from_numpy(x16)

        def call() -> None:
            with torch.inference_mode():
                twin(tx16.float())
    for _ in range(5):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"side": side, "ms": 1e3 * float(np.median(times)), "torch_loaded": "torch" in sys.modules}


def as_the_cli_does() -> None:
    """The allocator setting mist-device makes at start; a tree from before issue 23 (profiled through
    PYTHONPATH for a before/after comparison) has none."""
    try:
        from mist.device.allocator import fix_mmap_threshold
    except ImportError:
        return
    fix_mmap_threshold()


def blas_kernel() -> str:
    """NumPy's BLAS as threadpoolctl names it (library, version, kernel architecture), for the record."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (no threadpoolctl)"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in threadpool_info()
                     if i.get("user_api") == "blas" and "numpy" in str(i.get("filepath", "")))


def run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: vit-b and lite0")
    p.add_argument("--threads", type=int, action="append", help="default: 1 and 2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--predict-calls", type=int, default=30, help="one-image forwards per predict round")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_device.json")
    p.add_argument("--train-worker", help=argparse.SUPPRESS)
    p.add_argument("--predict-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train_worker:
        print(json.dumps(train_worker(args.train_worker, args.batch, args.steps, args.rounds, args.rank, args.heads)))
        return
    if args.predict_worker:
        side, shape = args.predict_worker
        print(json.dumps(predict_worker(side, shape, args.predict_calls, args.rank, args.heads)))
        return

    shapes, thread_counts = args.shape or ["vit-b", "lite0"], args.threads or [1, 2]
    load_before = os.getloadavg()
    common = ["--batch", str(args.batch), "--steps", str(args.steps), "--rounds", str(args.rounds),
              "--rank", str(args.rank), "--heads", str(args.heads), "--predict-calls", str(args.predict_calls)]
    train = [run_child(["--train-worker", shape, *common], threads) for shape in shapes for threads in thread_counts]
    predict = []
    for shape in shapes:
        for threads in thread_counts:
            runs: dict[str, list[dict]] = {"numpy": [], "torch": []}
            for _ in range(args.rounds):  # alternate the torch-free and the torch process
                for side in runs:
                    runs[side].append(run_child(["--predict-worker", side, shape, *common], threads))
            assert not any(r["torch_loaded"] for r in runs["numpy"]), "the NumPy predict process loaded torch"
            ms = {side: sorted(r["ms"] for r in rs)[len(rs) // 2] for side, rs in runs.items()}
            predict.append({"shape": shape, "threads": threads, "numpy_ms": ms["numpy"], "torch_ms": ms["torch"],
                            "numpy_over_torch_speed": ms["torch"] / ms["numpy"]})
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}

    print(f"train step, batch {args.batch}, rank {args.rank}, {args.heads} heads, {CLASSES} classes; "
          f"medians of {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'shape':<6} {'thr':>3} {'fast ms':>8} {'ref ms':>8} {'torch ms':>9} {'fast/torch':>10} "
          f"{'ref/torch':>9} {'fast/ref':>8} {'fast peak':>9} {'torch peak':>10} {'sgemm GF/s':>10}")
    for r in train:
        print(f"{r['shape']:<6} {r['threads']:>3} {r['fast_step_ms']:>8.1f} {r['reference_step_ms']:>8.1f} "
              f"{r['torch_step_ms']:>9.1f} {r['fast_over_torch']:>10.2f} {r['reference_over_torch']:>9.2f} "
              f"{r['fast_over_reference']:>8.2f} {r['fast_of_peak']:>9.2f} {r['torch_of_peak']:>10.2f} "
              f"{r['sgemm_gflops']:>10.1f}")
    print("x/torch: throughput relative to the lean PyTorch twin (> 1: faster); peak: step FLOP/s / sgemm FLOP/s")
    print(f"\none-image predict, medians of {args.rounds} alternating processes x {args.predict_calls} calls")
    print(f"{'shape':<6} {'thr':>3} {'numpy ms':>9} {'torch ms':>9} {'numpy speed/torch':>17}")
    for r in predict:
        print(f"{r['shape']:<6} {r['threads']:>3} {r['numpy_ms']:>9.2f} {r['torch_ms']:>9.2f} "
              f"{r['numpy_over_torch_speed']:>17.2f}")
    print(f"\nBLAS: {train[0]['blas'] if train else '?'}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    print(f"load average (1, 5, 15 min) before {_load(load['before'])}, after {_load(load['after'])}, "
          f"{load['cpus']} CPUs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "when": time.strftime("%Y-%m-%d %H:%M UTC",
              time.gmtime()), "load": load, "batch": args.batch, "train": train, "predict": predict}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


def _load(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if all(math.isfinite(v) for v in values) else str(values)


if __name__ == "__main__":
    main()
