"""Load test of ``mist-cloud serve`` on loopback: dynamic batching against one image per forward.

Two real servers run side by side, the same backbone, groups and threads: ``--max-batch 16 --max-wait-ms 5``
(dynamic batching) and ``--max-batch 1`` (one at a time). For each N in ``--clients``, N client threads,
each on its own keep-alive connection, send real Fashion-MNIST test images (PNG, one per request) until
``--requests`` requests have been answered. Rounds interleave the two servers and the medians are
reported, so a machine busy with other work biases neither. Bounded: a fixed number of requests, a 60 s
timeout per request.

Reported per (server, N): requests/s, p50 and p99 latency, errors (any answer but 200, or no answer), and
the server's RSS at start (after a warm-up at the largest load), after each round and at the end. The
machine load (os.getloadavg) is recorded.

    .venv/bin/python benchmarks/bench_serve.py                 # EfficientNet-Lite0, real weights
    .venv/bin/python benchmarks/bench_serve.py --model vit     # the small ViT in benchmarks/weights
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "lite0": ["--model", "tf_efficientnet_lite0", "--pretrained", "--groups", "12-15"],
    "vit": ["--model", "test_vit", "--weights", str(REPO / "benchmarks" / "weights" / "vit_fmnist.safetensors"),
            "--img-size", "64", "--groups", "0-6", "--scale", "mean"],
}
MODES = {"batched": ["--max-batch", "16", "--max-wait-ms", "5"], "one-at-a-time": ["--max-batch", "1"]}


def fashion_mnist_pngs(count: int) -> list[bytes]:
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from mist.cloud.datasets import FASHION_MNIST_DIR, read_idx

    pixels = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Server:
    def __init__(self, args: list[str], log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mist.cloud", "serve", *args, "--port", "0",
                                      "--max-queue", "256", "--max-connections", "128"],
                                     stdout=subprocess.DEVNULL, stderr=self.log,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = log.read_text()
            if "listening on " in text:
                self.port = int(text.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited: {text[-1000:]}")
            time.sleep(0.2)
        raise SystemExit("serve did not start")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load(port: int, images: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` threads share ``requests`` requests; requests/s over the whole run, latencies per request."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/features", images[i % len(images)], {"Content-Type": "image/png"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"requests_per_s": len(latencies) / seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "errors": errors[0], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lite0")
    parser.add_argument("--clients", default="1,4,16", help="Comma-separated numbers of concurrent clients.")
    parser.add_argument("--requests", type=int, default=64, help="Requests per (server, clients, round).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server.")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_serve.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    images = fashion_mnist_pngs(64)
    load_before = os.getloadavg()
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for mode, extra in MODES.items():
                servers[mode] = Server([*MODELS[args.model], "--threads", str(args.threads), *extra],
                                       Path(tmp) / f"{mode}.log")
            for server in servers.values():  # warm-up at the largest load, so full batches have run once
                load(server.port, images, max(clients), 2 * max(clients))
            rss_start = {mode: s.rss_mib() for mode, s in servers.items()}
            rss_rounds: dict[str, list[float]] = {mode: [] for mode in servers}
            runs: dict[tuple[str, int], list[dict]] = {}
            for _ in range(args.rounds):
                for n in clients:
                    for mode, server in servers.items():
                        runs.setdefault((mode, n), []).append(load(server.port, images, n, args.requests))
                for mode, server in servers.items():
                    rss_rounds[mode].append(server.rss_mib())
            rss_end = {mode: s.rss_mib() for mode, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    load_after = os.getloadavg()

    rows = []
    for (mode, n), results in runs.items():
        row = {"server": mode, "clients": n, "rounds": len(results)}
        for key in ("requests_per_s", "p50_ms", "p99_ms"):
            row[key] = statistics.median(r[key] for r in results)
        row["errors"] = sum(r["errors"] for r in results)
        row["rss_start_mib"], row["rss_end_mib"] = rss_start[mode], rss_end[mode]
        rows.append(row)
    rows.sort(key=lambda r: (r["clients"], r["server"]))
    print(f"{args.model}, {args.requests} requests x {args.rounds} rounds, torch threads {args.threads}; "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'server':<14} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'RSS MiB':>15}")
    for r in rows:
        print(f"{r['server']:<14} {r['clients']:>7} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['errors']:>6} {r['rss_start_mib']:>7.0f}->{r['rss_end_mib']:<7.0f}")
    for n in clients:
        batched = next(r for r in rows if r["server"] == "batched" and r["clients"] == n)
        single = next(r for r in rows if r["server"] == "one-at-a-time" and r["clients"] == n)
        print(f"{n} clients: dynamic batching x{batched['requests_per_s'] / single['requests_per_s']:.2f} requests/s")
    for mode, values in rss_rounds.items():
        print(f"RSS of the {mode} server after warm-up, then after each round (MiB): {rss_start[mode]:.0f} "
              + " ".join(f"{v:.0f}" for v in values))
    report = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "rss_after_each_round_mib": rss_rounds,
              "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
              "machine": platform.platform(), "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
