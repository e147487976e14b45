#!/usr/bin/env bash
# The main job on a fresh machine: set up, then cloud extract -> device train -> evaluate on the embedded
# real default (ImageNet EfficientNet-Lite0 on Fashion-MNIST). Extra arguments go to scripts/main_job.py,
# e.g. `bash scripts/main-job.sh --train-data ./my_images/train --test-data ./my_images/test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MIST_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" scripts/main_job.py "$@"
