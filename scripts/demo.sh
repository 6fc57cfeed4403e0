#!/usr/bin/env bash
# The newcomer's first command: install, make a small rawframes-like sample (or take the URI
# given as $1), mount it read-only in embedded mode (master + worker + FUSE client in one
# process), and read it twice: cold (fetched from the store) and again (served by the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${CACHEFS_DEMO_DIR:-/tmp/cachefs-demo}
mnt=$work/mnt
mkdir -p "$mnt"
if mountpoint -q "$mnt"; then .venv/bin/cachefs umount "$mnt"; fi
uri=${1:-}
if [ -z "$uri" ]; then
    [ -d "$work/sample" ] || .venv/bin/python -m cachefs.sample "$work/sample" --videos 200
    uri="file://$work/sample"
fi
shift || true
.venv/bin/cachefs mount "$uri" "$mnt" --state "$work/state" --mem 512M "$@"
echo "--- $mnt:"
ls "$mnt" | head -5
.venv/bin/python - "$mnt" <<'PY'
import os, sys, time
root = sys.argv[1]
paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
for label in ("first read (remote store)", "second read (page cache)"):
    start = time.perf_counter()
    total = sum(len(open(p, "rb").read()) for p in paths)
    took = time.perf_counter() - start
    print(f"{label}: {len(paths)} files, {total / 2**20:.1f} MiB in {took:.2f}s "
          f"({len(paths) / took:.0f} files/s)")
print("cached bytes of one file:", os.getxattr(paths[0], "user.cachefs.cached").decode())
PY
echo "mounted on $mnt — unmount with: .venv/bin/cachefs umount $mnt"
