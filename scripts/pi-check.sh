#!/usr/bin/env bash
# pi-check: prove the device side on a Raspberry Pi userland (Debian bookworm arm64, Python 3.11), emulated
# with qemu-user and binfmt_misc in a debootstrap chroot. See docs/raspberry-pi.md.
#
#   sudo bash scripts/pi-check.sh
#
# 1. installs qemu-user-static, debootstrap, binfmt-support and enables qemu-aarch64 in binfmt_misc;
# 2. on the host: builds the project's wheel and makes a small Fashion-MNIST feature set with the real cloud
#    extractor (mist-cloud extract);
# 3. debootstraps bookworm arm64 (minbase + python3, venv, pip) from apt's mirror, or unpacks the cached
#    root filesystem ${MIST_CACHE:-~/.cache/mist}/pi-rootfs-bookworm-arm64.tar.zst;
# 4. `pip install --only-binary=:all:`s the wheel into a venv in the chroot: the base install (numpy, click,
#    safetensors), and checks that torch did not come along;
# 5. runs scripts/pi/walkthrough.sh (mist-device verify, info, train, evaluate, predict, export) in the
#    chroot and on the host, same seed and options, each in a venv holding only the base install;
# 6. compares: loss curve, accuracy, evaluate vs predict file; writes ${PI_REPORT:-runs/pi-check/report.json}.
# Exits non-zero, with a line saying why, on any failure. Must run as root (binfmt, debootstrap, chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PI_SUITE=${PI_SUITE:-bookworm}
PI_CPU=${PI_CPU:-cortex-a72}
PI_FEATURES=${PI_FEATURES:-real}  # real: mist-cloud extract; digits: tests/digits_sets.py (no backbone)
PI_EPOCHS=${PI_EPOCHS:-5}
PI_REPORT=${PI_REPORT:-runs/pi-check/report.json}
PI_LOSS_RTOL=${PI_LOSS_RTOL:-1e-3}
PI_ACC_TOL=${PI_ACC_TOL:-0.01}
PI_KEEP=${PI_KEEP:-0}
PI_TMPFS_SIZE=${PI_TMPFS_SIZE:-3G}  # the work dir lives in RAM: dpkg's fsyncs and rm -rf are slow on disk; 0: disk
CACHE_DIR=${MIST_CACHE:-${HOME:-/root}/.cache/mist}
ROOTFS_TAR=$CACHE_DIR/pi-rootfs-$PI_SUITE-arm64.tar.zst
MAIN_VENV=${MIST_VENV:-.venv}
PY=${PYTHON:-python3}
HELPER=$REPO/scripts/pi/pi_check.py
# The training run both architectures must agree on: small, since emulation runs at ~0.3 GFLOP/s.
TRAIN_ARGS=(--rank 16 --heads 4 --epochs "$PI_EPOCHS" --batch-size 32 --lr 5e-3 --warmup 1 --seed 0 --threads 1)
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'pi-check: %s\n' "$*"; }
die() { printf 'pi-check: FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
T_START=$(now)
declare -A TIMES=()
timed() {  # timed NAME COMMAND... : run, and keep its wall time for the report
    local name=$1 t0 rc=0
    shift
    t0=$(now)
    "$@" || rc=$?
    TIMES[$name]=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
    return $rc
}

[ "$(id -u)" = 0 ] || die "run as root: binfmt_misc, debootstrap and chroot need it"
[ "$(uname -s)" = Linux ] || die "needs Linux (binfmt_misc, chroot)"

# ---- mounts and cleanup -------------------------------------------------------------------------------------
# A bind-mounted /dev under the root would be emptied by rm -rf, taking the host's /dev with it. So every exit
# path unmounts everything below the root first, checks with findmnt that nothing is left, and only then
# deletes, with --one-file-system as a second guard.

mounts_below() { findmnt -rn -o TARGET | awk -v r="$1" '$0 == r || index($0, r "/") == 1' | sort -r; }

unmount_below() {  # unmount_below DIR: 0 when nothing is mounted at or below DIR afterwards
    local dir=$1 m _
    for _ in 1 2 3; do
        [ -z "$(mounts_below "$dir")" ] && return 0
        while read -r m; do
            [ -n "$m" ] || continue
            umount "$m" 2>/dev/null || umount -R "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done <<<"$(mounts_below "$dir")"
    done
    [ -z "$(mounts_below "$dir")" ]
}

remove_workdir() {  # remove_workdir DIR: unmount below it, verify, then delete
    local dir=$1
    if ! unmount_below "$dir"; then
        printf 'pi-check: FAIL: still mounted below %s, NOT deleting it:\n%s\n' "$dir" "$(mounts_below "$dir")" >&2
        return 1
    fi
    if mountpoint -q "$dir/root/dev" 2>/dev/null || mountpoint -q "$dir/root/proc" 2>/dev/null; then
        printf 'pi-check: FAIL: %s/root/dev or /proc is still a mount point, NOT deleting\n' "$dir" >&2
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$PI_KEEP" = 1 ]; then
            if unmount_below "$WORK/root"; then
                say "kept $WORK (PI_KEEP=1; proc and dev unmounted). Remove it with:" \
                    "umount $WORK 2>/dev/null; rm -rf --one-file-system $WORK (the next run also does)"
            else
                echo "pi-check: FAIL: still mounted below $WORK/root" >&2
                rc=1
            fi
        else
            remove_workdir "$WORK" || rc=1
        fi
    fi
    exit $rc
}
trap cleanup EXIT
trap 'echo "pi-check: FAIL: interrupted (SIGINT)" >&2; exit 130' INT
trap 'echo "pi-check: FAIL: terminated (SIGTERM)" >&2; exit 143' TERM

# Work dirs of earlier runs that were killed (kill -9, power loss) may still hold mounts: clean those whose
# process is gone. A run still in progress keeps its pid file alive and is left alone.
for old in "${TMPDIR:-/tmp}"/mist-pi-check.*; do
    [ -d "$old" ] || continue
    old=$(realpath "$old")
    pid=$(cat "$old/pid" 2>/dev/null || echo)
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
        say "cleaning up $old, left by an earlier run (pid $pid)"
        remove_workdir "$old" || die "could not clean up $old"
    fi
done

# realpath: findmnt reports canonical paths, and mounts_below must see every mount below the work dir.
WORK=$(realpath "$(mktemp -d "${TMPDIR:-/tmp}/mist-pi-check.XXXXXX")")
echo $$ >"$WORK/pid"
if [ "$PI_TMPFS_SIZE" != 0 ]; then
    if mount -t tmpfs -o "size=$PI_TMPFS_SIZE,mode=0700" mist-pi-check "$WORK"; then
        echo $$ >"$WORK/pid"
    else
        say "could not mount a tmpfs on $WORK; working on disk"
    fi
fi
ROOT=$WORK/root
mkdir -p "$ROOT" "$WORK/dist" "$WORK/data" "$WORK/host"

# ---- 1. qemu-user and binfmt_misc ---------------------------------------------------------------------------

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v zstd >/dev/null || need+=(zstd)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    # apt_get (scripts/apt.sh) waits for a busy package manager, up to MIST_APT_WAIT seconds
    timed apt_install bash -c ". scripts/apt.sh && apt_get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
        apt_get install -y -q --no-install-recommends ${need[*]} >/dev/null" || die "apt-get install ${need[*]} failed"
fi
HOST_ARCH=$(uname -m)
[ "$HOST_ARCH" = x86_64 ] || say "warning: the host is $HOST_ARCH, not x86_64; the comparison is still made"
if [ "$HOST_ARCH" != aarch64 ]; then
    mountpoint -q /proc/sys/fs/binfmt_misc ||
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
    head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null | grep -qx enabled ||
        die "binfmt_misc has no enabled qemu-aarch64 entry (update-binfmts --enable qemu-aarch64 failed)"
fi
QEMU_VERSION=$(qemu-aarch64-static --version 2>/dev/null | head -n1 | awk '{ print $3 }')

# ---- 2. the host side first (it fails fast): wheel, base-only venv, feature sets ---------------------------

say "setting up the host venv ($MAIN_VENV) with scripts/setup.sh"
timed setup bash scripts/setup.sh || die "scripts/setup.sh failed"
case $MAIN_VENV in /*) ;; *) MAIN_VENV=$REPO/$MAIN_VENV ;; esac
MAIN_PY=$MAIN_VENV/bin/python

say "building the wheel"
"$PY" "$HELPER" copy-source "$REPO" "$WORK/src"
if ! timed wheel "$MAIN_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" 2>"$WORK/wheel.log"; then
    timed wheel "$MAIN_PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src" 2>>"$WORK/wheel.log" ||
        { cat "$WORK/wheel.log" >&2; die "could not build the project's wheel"; }
fi
WHEELS=("$WORK"/dist/mist_tuning-*.whl)
[ ${#WHEELS[@]} = 1 ] && [ -f "${WHEELS[0]}" ] || die "expected one mist_tuning wheel in $WORK/dist, got: ${WHEELS[*]}"
WHEEL=$(basename "${WHEELS[0]}")
say "built $WHEEL"

say "installing $WHEEL into a host venv with only the base install"
HOST_VENV=$WORK/host-venv
host_install() { "$PY" -m venv "$HOST_VENV" && "$HOST_VENV/bin/pip" install -q --only-binary=:all: "$WORK/dist/$WHEEL"; }
timed host_install host_install || die "pip install of the base wheel failed on the host"

EXTRACT=(--model tf_efficientnet_lite0 --pretrained --data fashion-mnist --groups 12-15 --seed 0)
case "$PI_FEATURES" in
real)
    "$MAIN_VENV/bin/mist-cloud" extract --help >/dev/null 2>&1 ||
        die "mist-cloud extract does not run in $MAIN_VENV (PI_FEATURES=digits checks without a backbone)"
    say "extracting features with the real backbone: mist-cloud extract ${EXTRACT[*]}"
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    extract_sets() {
        "$MAIN_VENV/bin/mist-cloud" extract "${EXTRACT[@]}" --split train --per-class 20 \
            --out "$WORK/data/train" >"$WORK/data/extract.log" 2>&1 &&
            "$MAIN_VENV/bin/mist-cloud" extract "${EXTRACT[@]}" --split test --limit 200 \
                --out "$WORK/data/test" >>"$WORK/data/extract.log" 2>&1
    }
    timed extract extract_sets || { tail -n 20 "$WORK/data/extract.log" >&2; die "mist-cloud extract failed"; }
    FEATURE_CMD="mist-cloud extract ${EXTRACT[*]} --split train --per-class 20 / --split test --limit 200"
    ;;
digits)
    say "writing sklearn digits feature sets (PI_FEATURES=digits: no backbone)"
    timed extract "$MAIN_PY" -c 'import sys; sys.path.insert(0, "tests")
from digits_sets import write_digits_set
write_digits_set(sys.argv[1] + "/train", slice(0, 600))
write_digits_set(sys.argv[1] + "/test", slice(1500, 1700), split="test")' "$WORK/data" ||
        die "could not write the digits feature sets"
    FEATURE_CMD="tests/digits_sets.py write_digits_set train[0:600] test[1500:1700]"
    ;;
*) die "PI_FEATURES must be real or digits, not $PI_FEATURES" ;;
esac

# ---- 3. the arm64 root filesystem ---------------------------------------------------------------------------

MIRROR=${PI_MIRROR:-$("$PY" "$HELPER" mirror "$PI_SUITE" || true)}
[ -n "$MIRROR" ] || die "no Debian mirror configured in /etc/apt/sources.list(.d); set PI_MIRROR to one that carries arm64"
ROOTFS_FROM=cache
if [ -f "$ROOTFS_TAR" ]; then
    say "unpacking the cached root filesystem $ROOTFS_TAR"
    if ! timed rootfs tar --zstd -xpf "$ROOTFS_TAR" --numeric-owner -C "$ROOT" || [ ! -x "$ROOT/usr/bin/python3" ]; then
        say "the cache is unusable; removing it and debootstrapping again"
        rm -f "$ROOTFS_TAR"
        remove_workdir "$WORK/root" || die "could not clear $ROOT"
        mkdir -p "$ROOT"
    fi
fi
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    ROOTFS_FROM=debootstrap
    say "debootstrapping $PI_SUITE arm64 from $MIRROR (a few minutes; log: $WORK/debootstrap.log)"
    if ! timed rootfs debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
        "$PI_SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
        tail -n 20 "$WORK/debootstrap.log" >&2
        [ -f "$ROOT/debootstrap/debootstrap.log" ] && tail -n 20 "$ROOT/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (mirror $MIRROR; set PI_MIRROR to use another)"
    fi
    unmount_below "$ROOT" || die "debootstrap left mounts below $ROOT"
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
    mkdir -p "$CACHE_DIR"
    say "caching the root filesystem as $ROOTFS_TAR"
    timed rootfs_cache tar --zstd -cpf "$ROOTFS_TAR.tmp.$$" --numeric-owner -C "$ROOT" . ||
        { rm -f "$ROOTFS_TAR.tmp.$$"; die "could not write $ROOTFS_TAR"; }
    mv -f "$ROOTFS_TAR.tmp.$$" "$ROOTFS_TAR"
fi

# ---- 4. the chroot: clean environment, mounts, pip ----------------------------------------------------------

in_pi() {  # run a command in the arm64 userland, with nothing of the host's environment
    env -i PATH="$CHROOT_PATH" HOME=/root LANG=C.UTF-8 QEMU_CPU="$PI_CPU" chroot "$ROOT" "$@"
}

mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
CA=$("$PY" "$HELPER" ca-bundle)
mkdir -p "$ROOT/etc/ssl/certs"
cp -L "$CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"
rm -f "$ROOT/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
cp -L /etc/hosts "$ROOT/etc/hosts" 2>/dev/null || true
"$PY" "$HELPER" pip-conf /etc/ssl/certs/ca-certificates.crt >"$ROOT/etc/pip.conf"

PI_ARCH=$(in_pi uname -m) || die "cannot run arm64 binaries in $ROOT (binfmt_misc / qemu-aarch64)"
[ "$PI_ARCH" = aarch64 ] || die "the chroot reports $PI_ARCH, not aarch64"
say "chroot: $(in_pi /usr/bin/python3 --version) on $PI_ARCH, QEMU_CPU=$PI_CPU, qemu $QEMU_VERSION"

mkdir -p "$ROOT/work/dist"
cp "$WORK/dist/$WHEEL" "$ROOT/work/dist/"
cp -r "$WORK/data" "$ROOT/work/data"
cp "$HELPER" "$REPO/scripts/pi/walkthrough.sh" "$ROOT/work/"

say "chroot: python3 -m venv /opt/mist && pip install --only-binary=:all: $WHEEL"
timed pi_install in_pi /bin/sh -c "python3 -m venv /opt/mist &&
    /opt/mist/bin/pip install -q --only-binary=:all: /work/dist/$WHEEL" ||
    die "pip install --only-binary=:all: of the base wheel failed on arm64"
if in_pi /opt/mist/bin/pip show -q torch >/dev/null 2>&1 || in_pi /opt/mist/bin/python -c 'import torch' 2>/dev/null; then
    die "torch was installed in the arm64 device venv by the base install"
fi
say "chroot: torch is not installed: ok"

# ---- 5. the walk-through, on both architectures -------------------------------------------------------------

say "arm64: running scripts/pi/walkthrough.sh (train: ${TRAIN_ARGS[*]})"
in_pi /opt/mist/bin/python /work/pi_check.py probe >"$WORK/pi-probe.json" || die "probe failed on arm64"
timed pi_walkthrough in_pi env PATH="/opt/mist/bin:$CHROOT_PATH" bash /work/walkthrough.sh \
    /work/data/train /work/data/test /work/out "${TRAIN_ARGS[@]}" > >(sed -u 's/^/  [arm64] /') 2>&1 ||
    { wait $!; die "the device walk-through failed on arm64"; }
wait $!
cp -r "$ROOT/work/out" "$WORK/pi"
mv "$WORK/pi-probe.json" "$WORK/pi/probe.json"

say "x86_64: running the same walk-through on the host"
"$HOST_VENV/bin/python" "$HELPER" probe >"$WORK/host/probe.json" || die "probe failed on the host"
timed host_walkthrough env -i PATH="$HOST_VENV/bin:/usr/bin:/bin" HOME="$WORK" LANG=C.UTF-8 bash \
    "$REPO/scripts/pi/walkthrough.sh" "$WORK/data/train" "$WORK/data/test" "$WORK/host" "${TRAIN_ARGS[@]}" \
    > >(sed -u 's/^/  [x86_64] /') 2>&1 || { wait $!; die "the device walk-through failed on the host"; }
wait $!

# ---- 6. compare and report ----------------------------------------------------------------------------------

TIMES[total]=$(awk -v a="$T_START" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
META=(--set "suite=$PI_SUITE" --set "pi_cpu=$PI_CPU" --set "qemu=$QEMU_VERSION" --set "mirror=$MIRROR"
    --set "rootfs=$ROOTFS_FROM" --set "wheel=$WHEEL" --set "features=$PI_FEATURES"
    --set "feature_command=$FEATURE_CMD" --set "train_args=${TRAIN_ARGS[*]}"
    --set "host_venv=fresh venv with only the base install ($("$PY" --version 2>&1))")
for k in "${!TIMES[@]}"; do META+=(--time "$k=${TIMES[$k]}"); done
"$PY" "$HELPER" compare --host "$WORK/host" --pi "$WORK/pi" --out "$PI_REPORT" "${META[@]}" \
    --loss-rtol "$PI_LOSS_RTOL" --acc-tol "$PI_ACC_TOL" || die "arm64 and x86_64 disagree (see above, and $PI_REPORT)"
say "ok: the device side installs, runs and agrees on arm64 (${TIMES[total]} s; report $PI_REPORT)"
