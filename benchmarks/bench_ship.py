"""Pull throughput: `mist-device pull` (verified, resumable, fsynced) against unverified copies, same run.

A moto S3 server runs as its own process on 127.0.0.1 (like a real store, it does not share this process's
GIL). A feature set of float16 shards is pushed there once. Then, round after round, in rotating order:

- ``plain``: the same boto3 client streams each object into a file: no hash, no temp name, no fsync;
- ``plain+fsync``: the same, plus an fsync of each file (as durable as mist, still unverified);
- ``mist pull``: ``copy_set`` into an empty folder: streaming sha256, temp name + rename, fsync, manifest last;
- ``mist resume``: ``copy_set`` into a folder that already holds the whole set (every shard hashed, skipped).

It reports medians over the rounds, the machine load before and after, and writes JSON. It also measures the
sha256 rate of this machine as OpenSSL runs it natively and with the CPU's SHA instructions masked
(OPENSSL_ia32cap), a proxy for a Raspberry Pi 4, whose cores have none; run the whole benchmark under such a
mask to see a pull whose hashing is slow:

    OPENSSL_ia32cap=":~0x20000000" .venv/bin/python benchmarks/bench_ship.py --out /tmp/bench_ship_nosha.json

    .venv/bin/python benchmarks/bench_ship.py                        # table + benchmarks/results/bench_ship.json
    .venv/bin/python benchmarks/bench_ship.py --shards 6 --shard-mib 16 --rounds 7    # a small set: fixed costs show
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto server did not start within 60 s")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# OPENSSL_ia32cap values: the SHA extensions off (CPUID 7 EBX bit 29); and SHA, AVX2 and AVX off (plain SSE code)
SHA_MASKS = {"native": None, "no SHA instructions": ":~0x20000000", "no SHA, no AVX": "~0x1000000000000000:~0x20000020"}
SHA_RATE = ("import hashlib, os, time; b = os.urandom(64 << 20); hashlib.sha256(b[:1 << 20]).digest(); "
            "t = time.perf_counter(); hashlib.sha256(b).digest(); print(64 / (time.perf_counter() - t))")


def sha256_rates(rounds: int = 3) -> dict[str, float]:
    """MiB/s of one sha256 over 64 MiB, per OpenSSL CPU mask, median of ``rounds`` fresh processes."""
    rates = {}
    for name, mask in SHA_MASKS.items():
        env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
        if mask:
            env["OPENSSL_ia32cap"] = mask
        runs = [float(subprocess.run([sys.executable, "-c", SHA_RATE], env=env, capture_output=True, text=True,
                                     check=True).stdout) for _ in range(rounds)]
        rates[name] = statistics.median(runs)
    return rates


def write_set(directory: Path, shards: int, shard_mib: int) -> None:
    from mist.formats import FeatureSetWriter, Manifest

    tokens, dim = 197, 384  # a ViT-S/16 map, one group
    row_bytes = tokens * dim * 2
    shard_rows = max((shard_mib << 20) // row_bytes, 1)
    manifest = Manifest(
        backbone={"name": "bench", "weights_sha256": "0" * 64, "weights_source": "none"}, groups=[[0]],
        scale="none", tokens=tokens, prefix_tokens=1, grid=[14, 14], dim=dim, dtype="float16",
        data_config={"input_size": [3, 224, 224]}, classes=["a", "b"], split="train",
        dataset={"source": "random", "hash": "bench"})
    writer = FeatureSetWriter(directory, manifest, shard_rows=shard_rows)
    rng = np.random.default_rng(0)
    for _ in range(shards):
        rows = rng.standard_normal((shard_rows, 1, tokens, dim), dtype=np.float32).astype(np.float16)
        writer.add(rows, rng.integers(0, 2, shard_rows), np.arange(shard_rows))
    writer.close()


def plain_copy(store, dest: Path, names: list[str], fsync: bool) -> None:
    """The unverified reference: the same client, the same chunk size, straight into the final names."""
    from mist.ship.store import CHUNK

    dest.mkdir(parents=True)
    for name in names:
        body = store.client.get_object(Bucket=store.bucket, Key=store.key(name))["Body"]
        with open(dest / name, "wb") as f:
            for block in body.iter_chunks(CHUNK):
                f.write(block)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--shard-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_ship.json")
    args = parser.parse_args()

    import boto3
    import botocore

    from mist.ship.copy import copy_set
    from mist.ship.local import LocalStore
    from mist.ship.s3 import S3Store, s3_client

    port = free_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    endpoint = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    server = start_moto(port)
    work = Path(tempfile.mkdtemp(prefix="bench_ship_"))
    try:
        source = work / "source"
        write_set(source, args.shards, args.shard_mib)
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        remote = S3Store(BUCKET, "sets/bench", client)
        copy_set(LocalStore(source), remote)
        names = sorted(p.name for p in source.glob("shard-*.safetensors"))
        total = sum((source / n).stat().st_size for n in names)

        def run(variant: str) -> tuple[float, float]:
            dest = work / "dest"
            if variant != "mist resume":
                shutil.rmtree(dest, ignore_errors=True)
            start, cpu, served = time.perf_counter(), time.process_time(), process_cpu(server.pid)
            if variant == "plain":
                plain_copy(remote, dest, names, fsync=False)
            elif variant == "plain+fsync":
                plain_copy(remote, dest, names, fsync=True)
            else:
                report = copy_set(remote, LocalStore(dest))
                expected = "skipped" if variant == "mist resume" else "copied"
                assert all(s.status == expected for s in report.shards), (variant, report.shards)
            wall = time.perf_counter() - start
            return wall, time.process_time() - cpu, process_cpu(server.pid) - served

        variants = ["plain", "plain+fsync", "mist pull", "mist resume"]
        run("mist pull")  # warm-up: the server's first reads, the page cache, the client's connections
        times: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        server_cpu: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % 3:3] + variants[:r % 3]  # rotate the three full copies
            # The folder then holds whole shards from the last copy (all three write the same bytes): resume
            # hashes them and skips.
            for variant in [*order, "mist resume"]:
                wall, used, served = run(variant)
                times[variant].append(wall)
                cpu[variant].append(used)
                server_cpu[variant].append(served)
        load_after = os.getloadavg()
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    medians = {v: statistics.median(t) for v, t in times.items()}
    mib = total / (1 << 20)
    rows = []
    for v in variants:
        rows.append({"variant": v, "median_s": medians[v], "mib_per_s": mib / medians[v],
                     "client_cpu_s": statistics.median(cpu[v]), "server_cpu_s": statistics.median(server_cpu[v]),
                     "vs_plain": medians["plain"] / medians[v], "vs_plain_fsync": medians["plain+fsync"] / medians[v],
                     "runs_s": times[v]})
    print(f"pull of {len(names)} shards, {mib:.1f} MiB, from moto on 127.0.0.1; medians of {args.rounds} rounds")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'variant':<13} {'median s':>9} {'MiB/s':>8} {'throughput vs plain':>20} {'vs plain+fsync':>15} "
          f"{'client CPU s':>13} {'server CPU s':>13}")
    for row in rows:
        print(f"{row['variant']:<13} {row['median_s']:>9.3f} {row['mib_per_s']:>8.1f} {row['vs_plain']:>20.1%} "
              f"{row['vs_plain_fsync']:>15.1%} {row['client_cpu_s']:>13.3f} {row['server_cpu_s']:>13.3f}")
    cost = 1 - medians["plain+fsync"] / medians["mist pull"]
    by_name = {row["variant"]: row for row in rows}

    def total_cpu(v: str) -> float:
        return by_name[v]["client_cpu_s"] + by_name[v]["server_cpu_s"]

    cpu_cost = total_cpu("mist pull") / total_cpu("plain+fsync") - 1
    rates = sha256_rates()
    print(f"verification cost (mist pull vs plain+fsync, throughput lost): {cost:.1%}  (goal <= 10%)")
    print(f"extra CPU of mist pull over plain+fsync, client and server together: {cpu_cost:.1%}; the "
          f"wall-clock figure swings with the machine's load (above)")
    print(f"mist pull / plain+fsync throughput: {medians['plain+fsync'] / medians['mist pull']:.2f} (goal >= 0.9); "
          f"this run's OPENSSL_ia32cap: {os.environ.get('OPENSSL_ia32cap', 'unset')}")
    print("sha256 MiB/s: " + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items()))
    result = {"benchmark": "bench_ship", "command": "python benchmarks/bench_ship.py " + " ".join(sys.argv[1:]),
              "shards": len(names), "bytes": total, "rounds": args.rounds, "rows": rows,
              "verification_cost": cost, "extra_cpu": cpu_cost, "sha256_mib_per_s": rates,
              "pull_over_plain_fsync": medians["plain+fsync"] / medians["mist pull"],
              "openssl_ia32cap": os.environ.get("OPENSSL_ia32cap"),
              "load_before": load_before, "load_after": load_after,
              "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
              "boto3": boto3.__version__, "botocore": botocore.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
