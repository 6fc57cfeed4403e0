"""`mount.cachefs`: lets `mount -t cachefs` and /etc/fstab mount cachefs datasets.

mount(8) runs `mount.cachefs SOURCE DIR [-o a=b,c,...]` (plus -s -f -n -v flags it may add).
Options become `cachefs mount` flags: `master=H:P` -> `--master H:P`, `allow_other` ->
`--allow-other`, `mem=1G` -> `--mem 1G`; mount(8)'s own generic options (defaults, _netdev,
noauto, nofail, x-systemd.*, ...) are ignored. Example fstab line:

    frames /mnt/frames cachefs master=10.0.0.5:19470,secret_file=/etc/cachefs/secret,_netdev 0 0

(`secret_file=` becomes `--secret-file`: on a host other than the master's, the mount needs the
cluster's secret.)
"""

from __future__ import annotations

import os
import sys

GENERIC = {"defaults", "_netdev", "auto", "noauto", "nofail", "user", "users", "nouser", "ro",
           "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async", "sync", "atime",
           "noatime", "relatime", "owner", "group"}  # fmt: skip


def to_cli(argv: list[str]) -> list[str]:
    """mount.cachefs arguments -> `cachefs` arguments."""
    positional, options, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o" and i + 1 < len(argv):
            options.extend(o for o in argv[i + 1].split(",") if o)
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.extend(o for o in arg[2:].split(",") if o)
        elif arg in ("-s", "-f", "-n", "-v") or arg.startswith("-t"):
            pass  # sloppy / fake / no-mtab / verbose / type: nothing for cachefs to do
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise SystemExit("usage: mount.cachefs SOURCE MOUNTPOINT [-o OPTIONS]")
    out = ["mount", *positional]
    for option in options:
        key, sep, value = option.partition("=")
        if key in GENERIC or key.startswith("x-"):
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag, value] if sep else [flag]
    return out


def main() -> None:
    args = to_cli(sys.argv[1:])
    os.execvp(sys.executable, [sys.executable, "-m", "cachefs.cli", *args])


if __name__ == "__main__":
    main()
