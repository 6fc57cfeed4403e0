#!/usr/bin/env bash
# The newcomer's first command: install, make a small rawframes-like sample (or use the URI
# given as $1), start a master, register the dataset and show what cachefs sees.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${CACHEFS_DEMO_DIR:-$(mktemp -d /tmp/cachefs-demo.XXXXXX)}
uri=${1:-}
if [ -z "$uri" ]; then
    .venv/bin/python -m cachefs.sample "$work/sample" --videos 50
    uri="file://$work/sample"
fi
port=${CACHEFS_DEMO_PORT:-19471}
.venv/bin/cachefs master --listen "127.0.0.1:$port" --state "$work/master" >"$work/master.out" 2>"$work/master.log" &
master_pid=$!
trap 'kill $master_pid 2>/dev/null; wait $master_pid 2>/dev/null || true' EXIT
until grep -q "listening on" "$work/master.out" 2>/dev/null; do
    kill -0 $master_pid 2>/dev/null || { cat "$work/master.log"; exit 1; }
    sleep 0.1
done
export CACHEFS_MASTER=127.0.0.1:$port
.venv/bin/cachefs dataset add demo "$uri"
.venv/bin/cachefs status
echo "state and logs in $work"
