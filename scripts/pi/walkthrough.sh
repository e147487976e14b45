#!/usr/bin/env bash
# The device-side CLI walk-through that scripts/pi-check.sh runs, unchanged, on the x86_64 host and in the
# emulated arm64 Raspberry Pi userland: verify -> info -> train -> evaluate -> predict -> export.
#
#   walkthrough.sh TRAIN_SET TEST_SET OUT_DIR [train options...]
#
# mist-device must be on PATH. Writes OUT_DIR/{run/,evaluate.json,predictions.csv,adaptor.safetensors,
# evaluate-export.json,timings.txt}. Exits non-zero as soon as a command fails.
set -euo pipefail
train_set=$1 test_set=$2 out=$3
shift 3
mkdir -p "$out"
: >"$out/timings.txt"

step() {  # step NAME COMMAND... : run it, echo it, append "NAME SECONDS" to timings.txt
    local name=$1 t0 t1
    shift
    echo "\$ $*"
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s %.3f\n", n, b - a }' >>"$out/timings.txt"
}
to_file() { local file=$1; shift; "$@" >"$file"; }

step version mist-device --version
step verify-train mist-device verify "$train_set"
step verify-test mist-device verify "$test_set"
step info mist-device info "$train_set"
step train mist-device train "$train_set" --out "$out/run" "$@"
step evaluate to_file "$out/evaluate.json" mist-device evaluate --threads 1 --json "$out/run/last.safetensors" "$test_set"
step predict mist-device predict --threads 1 --format csv --out "$out/predictions.csv" \
    "$out/run/last.safetensors" "$test_set"
step export mist-device export "$out/run/last.safetensors" --out "$out/adaptor.safetensors"
step evaluate-export to_file "$out/evaluate-export.json" \
    mist-device evaluate --threads 1 --json "$out/adaptor.safetensors" "$test_set"
