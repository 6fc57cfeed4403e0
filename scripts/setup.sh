#!/usr/bin/env bash
# Installs what cachefs needs on a fresh Debian/Ubuntu machine: FUSE 3, Chromium (for the
# console test), a venv in .venv with the [test,torch] extras and the HDFS test cluster's jars.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
pkg-config --exists fuse3 2>/dev/null || need_apt+=(libfuse3-dev)
command -v ip >/dev/null || need_apt+=(iproute2)  # network namespaces for tests/cluster
command -v chromium >/dev/null || need_apt+=(chromium)  # the web console's browser test
# Building the patched pyfuse3 (below): a C compiler, Python's headers, patch(1).
command -v gcc >/dev/null || need_apt+=(gcc)
command -v patch >/dev/null || need_apt+=(patch)
py_include=$("${PYTHON:-python3}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$py_include/Python.h" ] || need_apt+=(python3-dev)
if ((${#need_apt[@]})); then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
log=$(mktemp)
# Editable install: the top-level master/ worker/ fuse/ folders map to cachefs.master etc.
.venv/bin/pip install -q -e ".[test,torch]" >"$log" 2>&1 \
    || { cat "$log"; exit 1; }
rm -f "$log"

# pyfuse3 3.5.0 with scripts/pyfuse3-3.5.0.patch (docs/performance.md): read() by inode for
# files opened without OPEN (zero-message open), attach() so several processes serve one
# mount, and a session loop that takes a waiting request before it waits through trio's
# scheduler (non-blocking /dev/fuse) and starts another task only for a handler that waits.
# Built once from the pinned sdist; later runs see the marker and skip it.
if ! .venv/bin/python -c 'import pyfuse3; assert pyfuse3.CACHEFS_PATCH >= 6' 2>/dev/null; then
    build=$(mktemp -d) log=$(mktemp)
    .venv/bin/pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$build" >"$log" 2>&1 \
        || { cat "$log"; exit 1; }
    tar xzf "$build/pyfuse3-3.5.0.tar.gz" -C "$build"
    patch -s -p1 -d "$build/pyfuse3-3.5.0" <scripts/pyfuse3-3.5.0.patch
    .venv/bin/pip install -q --no-deps --force-reinstall "$build/pyfuse3-3.5.0" >"$log" 2>&1 \
        || { cat "$log"; exit 1; }
    rm -rf "$build" "$log"
fi
# A real HDFS for the tests (tests/hdfs.py): Java if missing, Hadoop 2.7.3's jars from pyspark's
# sdist and Jersey from Debian, cached in ~/.cache/cachefs-hdfs (nothing to do once there).
bash scripts/hdfs-test-cluster.sh install
.venv/bin/python -c 'import cachefs.master, cachefs.worker, cachefs.fuse, pyfuse3'
