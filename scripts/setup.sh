#!/usr/bin/env bash
# Set up a fresh machine for mist: a virtual environment with the cloud, test, benchmark and s3 extras, and
# (as root, on Debian) the Fashion-MNIST package that the main job and the accuracy tests read, and dosfstools.
# Idempotent: a second run only checks that everything is there. Packages come from the package index and
# the Debian sources this machine is configured with (pip's and apt's own settings); no host is named here.
# A busy package manager (another apt or dpkg holding its lock) is waited for, up to MIST_APT_WAIT seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/apt.sh
. scripts/apt.sh

VENV=${MIST_VENV:-.venv}
PY=${PYTHON:-python3}
if [ "${MIST_TORCH:-}" = cpu ] && [ -z "${MIST_TORCH_INDEX:-}" ]; then
    echo "setup: MIST_TORCH=cpu needs MIST_TORCH_INDEX, the URL of a package index that holds CPU-only torch" \
         "builds (PyTorch's install instructions name one)" >&2
    exit 2
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's dataset-fashion-mnist"
        apt_get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt_get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null
    else
        echo "setup: /usr/share/datasets/fashion-mnist is missing; as root run:" \
             "apt-get install dataset-fashion-mnist" >&2
    fi
fi

# mkfs.vfat makes the FAT32 image that the shipping tests use as a USB stick (loop-mounted where allowed).
if ! command -v mkfs.vfat >/dev/null && [ ! -x /usr/sbin/mkfs.vfat ] && [ ! -x /sbin/mkfs.vfat ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's dosfstools"
        apt_get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt_get install -y -q --no-install-recommends dosfstools >/dev/null
    else
        echo "setup: mkfs.vfat is missing (the FAT32 shipping test will skip); as root run:" \
             "apt-get install dosfstools" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import mist.cloud, mist.device, mist.kit, mist.ship, timm, sklearn, pytest, boto3, moto.server, uvicorn, starlette, python_multipart, nacl.signing" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    # timm needs torchvision; on x86_64 these two releases work together (the CPU-only torch 2.13.0 wheel
    # breaks torchvision's import). On aarch64, torch 2.9.1 + torchvision 0.24.1 is the pair known to work.
    case "$(uname -m)" in
        x86_64) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
        aarch64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
        *) TORCH="torch torchvision" ;;
    esac
    # MIST_TORCH=cpu (opt-in): the CPU-only builds of the same pair (no CUDA libraries), from the index named by
    # MIST_TORCH_INDEX (PyTorch's CPU-only index, or a mirror of it), added beside pip's configured index.
    # Off by default: such an index is not reachable on every machine (not on this one), and here the one
    # CPU-only file on the local disk, torch 2.13.0, breaks torchvision.
    TORCH_INDEX=()
    if [ "${MIST_TORCH:-}" = cpu ]; then
        TORCH_INDEX=(--extra-index-url "$MIST_TORCH_INDEX")
        # x86_64's CPU builds carry a local version tag; aarch64's wheels are CPU-only already
        [ "$(uname -m)" = x86_64 ] && TORCH=$(echo "$TORCH" | sed -E 's/(==[0-9.]+)/\1+cpu/g')
    fi
    echo "setup: installing $TORCH${MIST_TORCH:+ ($MIST_TORCH build)} and mist[cloud,test,bench,plots,s3,serve,sign]" \
         "(several GB the first time)"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} $TORCH
    "$VENV/bin/pip" install -q -e '.[cloud,test,bench,plots,s3,serve,sign]'
fi
echo "setup: ready ($VENV)"
