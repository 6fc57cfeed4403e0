#!/usr/bin/env bash
# Installs what cachefs needs on a fresh Debian/Ubuntu machine: FUSE 3, Chromium (for the
# console test) and a venv in .venv with the [test,torch] extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
pkg-config --exists fuse3 2>/dev/null || need_apt+=(libfuse3-dev)
command -v ip >/dev/null || need_apt+=(iproute2)  # network namespaces for tests/cluster
command -v chromium >/dev/null || need_apt+=(chromium)  # the web console's browser test
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
.venv/bin/python -c 'import cachefs.master, cachefs.worker, cachefs.fuse, pyfuse3'
