#!/bin/sh
# Make the perf_analyzer binary from the tritonclient==2.51.0 wheel runnable: it links
# libb64.so.0d, which no wheel ships (Debian's libb64-0d has it). libcudart.so.12 comes from the
# nvidia-cuda-runtime-cu12 wheel in requirements.txt; bench/perf_analyzer.py puts both on
# LD_LIBRARY_PATH.
#
# Why unpack into the venv rather than `apt-get install`: it works without root and leaves the
# system alone; `apt-get download` needs no privileges. As root with stale package lists, the
# lists are refreshed once. A machine that already has the library (ldconfig) is left as it is.
#
#   sh bench/install_perf_analyzer_deps.sh VENV
set -eu
VENV=${1:?usage: $0 VENV}
DEST="$VENV/perf_analyzer_libs"

if [ -e "$DEST/libb64.so.0d" ] || /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "note: libb64.so.0d is missing and this is not a Debian/Ubuntu system;" \
         "perf_analyzer will not run (install libb64 from your distribution)" >&2
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if ! (cd "$TMP" && apt-get download -q libb64-0d >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null
        (cd "$TMP" && apt-get download -q libb64-0d >/dev/null)
    else
        echo "note: could not download libb64-0d (run 'apt-get update' as root, or" \
             "'apt-get install libb64-0d'); perf_analyzer will not run" >&2
        exit 0
    fi
fi
dpkg-deb -x "$TMP"/libb64-0d_*.deb "$TMP/root"
mkdir -p "$DEST"
cp -a "$TMP"/root/usr/lib/*/libb64.so.0d* "$DEST/"
echo "libb64.so.0d unpacked into $DEST"
