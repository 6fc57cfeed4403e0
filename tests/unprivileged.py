"""Acting as an unprivileged local user (`nobody`) from a test run as root.

The interpreter and the checkout may sit in directories `nobody` cannot read (/root), so
`runuser` cannot start them. Instead a child process starts as root, imports what it needs,
then drops to nobody (setgroups, setgid, setuid) before it touches anything: from then on it
is an ordinary local user with the code already loaded.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

NOBODY = pwd.getpwnam("nobody")

_PRELUDE = """
import json, os, sys
import encodings.idna, encodings.ascii, encodings.latin_1  # looked up lazily by getaddrinfo
import trio, tqdm, yaml
import cachefs.cli, cachefs.rpc
from cachefs.master import service as _master
from cachefs.worker import service as _worker
from cachefs.fuse import mount as _mount
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
assert os.geteuid() != 0
"""

_CLI = """
sys.argv = ["cachefs", *sys.argv[1:]]
cachefs.cli.main()
"""

_RPC = """
address, method, args = json.loads(sys.argv[1])

async def call():
    async with cachefs.rpc.RpcClient(address, timeout=10) as client:
        return await client.call(method, **args)

try:
    result = trio.run(call)
    print(json.dumps({"ok": True, "result": repr(result)[:200]}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
"""


def nobody_home(tmp_path: Path) -> Path:
    """A runtime dir owned by nobody (0700), as a login session would give it."""
    home = tmp_path / "nobody-runtime"
    home.mkdir(mode=0o700, exist_ok=True)
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    return home


def _run(code: str, args: list[str], runtime: Path, timeout: float):
    prelude = _PRELUDE.format(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env.update(HOME="/nonexistent", XDG_RUNTIME_DIR=str(runtime))
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd="/",
    )  # fmt: skip


def cli_as_nobody(runtime: Path, *args: str, timeout: float = 60.0):
    """`cachefs ARGS` as user nobody; the CompletedProcess (text)."""
    return _run(_CLI, list(args), runtime, timeout)


def rpc_as_nobody(runtime: Path, address: str, method: str, **args) -> dict:
    """One RPC as user nobody with no secret: {"ok": bool, "error": class, "message": ...}."""
    proc = _run(_RPC, [json.dumps([address, method, args])], runtime, 60.0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
