"""Helpers for the serving tests (test_serve.py, test_serve_guard.py): `mist-cloud serve` as a subprocess on a
loopback port, real Fashion-MNIST images as files, and the served ViT both test files share.

The `vit` fixture is session-scoped and registered in conftest.py, so the set is extracted, the adaptor trained
and the server started once for both files.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VIT_WEIGHTS = REPO / "benchmarks" / "weights" / "vit_fmnist.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TOKEN = "a-test-token-0123456789abcdef"
VIT_ARGS = ["--model", "test_vit", "--weights", str(VIT_WEIGHTS), "--img-size", "64", "--groups", "0-6",
            "--scale", "mean", "--threads", "2"]

# Served and extracted features of one image agree to within one float16 step of the value (rtol 2^-10)
# plus an absolute 1e-3 for values near zero: the fp32 sums agree to ~1e-6 (a batch of other images changes
# the order of a few float additions), and that can move a value across a float16 rounding boundary.
RTOL, ATOL = 2.0 ** -10, 1e-3


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "MIST_SERVE_TOKEN"}
    return {**base, "HF_HUB_OFFLINE": "1", **extra}


def cli(*args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env(**extra_env),
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


class Server:
    """`mist-cloud serve ARGS --port 0` as a subprocess; its port read from its 'listening on' line."""

    def __init__(self, log: Path, *args: str, token: str | None = TOKEN):
        extra = {"MIST_SERVE_TOKEN": token} if token else {}
        self.log = log
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mist.cloud", "serve", *args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, env=env(**extra))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text()
            if "listening on " in text:
                self.url = text.split("listening on ", 1)[1].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve did not start: {log.read_text()[-2000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: str | None = TOKEN) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            hdrs = dict(headers or {})
            if token:
                hdrs["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=hdrs)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def health(self) -> dict:
        status, _, body = self.request("GET", "/healthz", token=None)
        assert status == 200
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def write_fashion(folder: Path, split: str, count: int) -> list[tuple[Path, int]]:
    """Real Fashion-MNIST images of ``split`` as PNG files (every fifth one a JPEG), with their labels."""
    from PIL import Image

    from mist.cloud.datasets import read_idx

    prefix = {"train": "train", "test": "t10k"}[split]
    pixels = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
    rows = np.random.default_rng(0).permutation(len(labels))[:count]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for j, i in enumerate(rows):
        path = folder / (f"{i}.jpg" if j % 5 == 4 else f"{i}.png")
        Image.fromarray(pixels[i]).save(path)
        out.append((path, int(labels[i])))
    return out


def write_list(path: Path, items: list[tuple[Path, int]]) -> Path:
    path.write_text("".join(f"{p},{label}\n" for p, label in items))
    return path


@pytest.fixture(scope="session")
def vit(tmp_path_factory):
    if not FMNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    pytest.importorskip("uvicorn")
    root = tmp_path_factory.mktemp("serve-vit")
    train = write_list(root / "train.csv", write_fashion(root / "train", "train", 300))
    new_items = write_fashion(root / "new", "test", 24)
    new = write_list(root / "new.csv", new_items)
    for name, data in (("train-set", train), ("new-set", new)):
        cli("mist.cloud", "extract", *VIT_ARGS, "--data", str(data), "--out", str(root / name), "--progress", "none")
    cli("mist.device", "train", str(root / "train-set"), "--out", str(root / "run"), "--epochs", "10", "--rank", "16",
        "--heads", "2", "--lr", "3e-3", "--threads", "1")
    server = Server(root / "serve.log", *VIT_ARGS, "--max-body-bytes", "400000", "--client-timeout", "2",
                    "--max-images", "8")
    try:
        yield {"root": root, "server": server, "images": [p for p, _ in new_items], "set": root / "new-set",
               "ckpt": root / "run" / "best.safetensors"}
    finally:
        server.stop()
