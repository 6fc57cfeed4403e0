"""The `cachefs` command line: one module per command group, shared helpers in `common`.

Exit codes: 0 ok, 1 runtime failure, 2 usage error (click's own, or InvalidArgument). Every
failure is one line on stderr: `cachefs: error: ...`.
"""

from cachefs.cli import datasets, gc, jobs, mount, servers, status  # noqa: F401 - they register
from cachefs.cli.app import main

__all__ = ["main"]
