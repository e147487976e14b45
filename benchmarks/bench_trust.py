"""What trust costs on the device: checkpoint loads with digests (and a signature), and opening a signed set.

Side by side in one run, rounds interleaved, medians reported, load recorded; everything through the library's
own calls (`mist.formats.load_checkpoint`, `mist.formats.FeatureSet`):

- **checkpoint**: a resumable LAE checkpoint (weights and AdamW moments) at ViT-B/16's shape (k=1, T=197,
  d=768, rank 32, 4 blocks, 1000 classes), loaded three ways: as an earlier mist wrote it (no digests: the
  reference), with its digests checked (every load now), and with its signature checked under `require`;
- **set**: `FeatureSet(verify=True)` (every shard hashed, as `train` does) on an unsigned set, and on the same
  set signed and opened under `require` (the signature check added).

    .venv/bin/python benchmarks/bench_trust.py                  # writes benchmarks/results/bench_trust.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=200, help="Rows of the ViT-B-shaped set (295 KB each, fp16).")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_trust.json")
    args = parser.parse_args()

    import numpy as np
    from safetensors.numpy import load_file

    sys.path.insert(0, str(REPO / "tests"))
    from digits_sets import digits_manifest

    from mist.device.lae import LAEConfig, init_params
    from mist.formats import Checkpoint, FeatureSet, FeatureSetWriter, load_checkpoint, save_checkpoint
    from mist.formats.checkpoint import METADATA_DIGEST, TENSOR_DIGESTS
    from mist.formats.safetensors_check import read_header, write_safetensors
    from mist.formats.signing import Trust, generate_key
    from mist.formats.writer import sign_feature_set

    sys_load = os.getloadavg()
    key = generate_key("bench")
    trust = Trust("require", (key.public,))
    cfg = LAEConfig(dim=768, tokens=197, groups=1, num_classes=1000, rank=32, heads=4, blocks_per_group=4)
    params = init_params(cfg, seed=0)
    moments = {f"{m}.{n}": np.zeros_like(v) for n, v in params.items() for m in ("m", "v")}
    record = {"fingerprint": "0" * 64, "layout": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Checkpoint(params=params, config=cfg.to_dict(), classes=[f"c{i}" for i in range(1000)],
                          feature_set=record, optimizer=moments, train_state={"step": 1})
        signed, legacy = tmp / "signed.safetensors", tmp / "legacy.safetensors"
        save_checkpoint(signed, ckpt, signer=key)
        header = read_header(signed)
        old_meta = {k: v for k, v in header.metadata.items() if k not in (TENSOR_DIGESTS, METADATA_DIGEST, "signature")}
        write_safetensors(legacy, load_file(str(signed)), old_meta)  # as mist wrote it before digests

        rng = np.random.default_rng(0)
        manifest = replace(digits_manifest("train"), tokens=197, grid=None, dim=768)
        plain = tmp / "plain"
        writer = FeatureSetWriter(plain, manifest, shard_rows=64)
        writer.add(rng.standard_normal((args.rows, 1, 197, 768), dtype=np.float32),
                   rng.integers(0, 10, args.rows), np.arange(args.rows))
        writer.close()
        signed_set = tmp / "signed-set"
        shutil.copytree(plain, signed_set)
        sign_feature_set(signed_set, key)

        cases = {
            "checkpoint: no digests (reference)": lambda: load_checkpoint(legacy),
            "checkpoint: digests checked": lambda: load_checkpoint(signed),
            "checkpoint: digests + signature (require)": lambda: load_checkpoint(signed, trust),
            "set: verify, unsigned (reference)": lambda: FeatureSet(plain, verify=True),
            "set: verify + signature (require)": lambda: FeatureSet(signed_set, verify=True, trust=trust),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for run in cases.values():
            run()  # warm the page cache
        for _ in range(args.rounds):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        sizes = {"checkpoint_bytes": signed.stat().st_size,
                 "set_bytes": sum(p.stat().st_size for p in plain.iterdir())}

    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'case':<44} {'median ms':>10}  vs reference")
    for name, value in medians.items():
        ref = medians["checkpoint: no digests (reference)" if name.startswith("checkpoint") else
                      "set: verify, unsigned (reference)"]
        print(f"{name:<44} {value * 1e3:>10.1f}  {value / ref:>6.2f}x")
    print(f"checkpoint {sizes['checkpoint_bytes'] / 2**20:.1f} MiB, set {sizes['set_bytes'] / 2**20:.1f} MiB; "
          f"load average {sys_load[0]:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)")
    from threadpoolctl import threadpool_info  # hashing, not BLAS, is timed here; recorded all the same

    kernels = [{k: p.get(k) for k in ("internal_api", "architecture", "num_threads")} for p in threadpool_info()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "medians_s": medians, "rounds": args.rounds, "times_s": times, **sizes,
        "load_before": sys_load, "load_after": os.getloadavg(), "cores": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(), "blas": kernels}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
