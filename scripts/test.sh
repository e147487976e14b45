#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, lint, then every test. Exit status is non-zero on any
# failure, including pytest finding no tests (its exit status 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MIST_VENV:-.venv}
"$VENV/bin/ruff" check .
export HF_HUB_OFFLINE=1
# -rs: why each skipped test skipped; --durations: the 25 slowest, to see where the time goes.
"$VENV/bin/python" -m pytest -q -rs --durations=25 "$@"
