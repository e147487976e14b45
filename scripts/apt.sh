# shellcheck shell=bash
# apt_get ARGS... : apt-get, but a busy package manager is waited for instead of failing.
#
# Sourced by scripts/setup.sh and scripts/pi-check.sh. When another apt or dpkg holds its lock (unattended
# upgrades, a second shell, another set-up), apt-get exits 100 at once with "Could not get lock". This
# retries every 5 s for up to MIST_APT_WAIT seconds (default 600), says once that it is waiting and for
# whom, and at the deadline fails with one line that names the holder and the variable. Any other apt-get
# failure passes through unchanged. apt-get uses the sources this machine is configured with.

apt_get() {
    local wait=${MIST_APT_WAIT:-600} start=$SECONDS said="" err rc holder
    case "$wait" in '' | *[!0-9]*) echo "setup: MIST_APT_WAIT must be a number of seconds, got '$wait'" >&2; return 2 ;; esac
    err=$(mktemp)
    while :; do
        rc=0
        apt-get "$@" 2>"$err" || rc=$?
        if [ "$rc" = 0 ]; then
            rm -f "$err"
            return 0
        fi
        if ! grep -qE "Could not get lock|Unable to acquire the dpkg frontend lock|Unable to lock" "$err"; then
            cat "$err" >&2
            rm -f "$err"
            return "$rc"
        fi
        # apt names the holder: "It is held by process 1234 (unattended-upgr)"
        holder=$(grep -oE "held by process [0-9]+ \([^)]*\)" "$err" | head -1)
        holder=${holder:-"held by another apt or dpkg"}
        if ((SECONDS - start >= wait)); then
            echo "setup: the package manager is still busy after ${wait}s (its lock is $holder); rerun when it" \
                 "has finished, or set MIST_APT_WAIT to wait longer" >&2
            rm -f "$err"
            return "$rc"
        fi
        if [ -z "$said" ]; then
            echo "setup: the package manager is busy (its lock is $holder); waiting up to ${wait}s" \
                 "(MIST_APT_WAIT)" >&2
            said=1
        fi
        sleep "$((wait - (SECONDS - start) < 5 ? 1 : 5))"
    done
}
