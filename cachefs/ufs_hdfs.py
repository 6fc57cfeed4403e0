"""HDFS through hdfs-native: a Rust client of the NameNode and DataNode protocols, no JVM.

pyarrow's HadoopFileSystem needs a JVM, libhdfs and the Hadoop jars on every node; hdfs-native
needs nothing but its wheel. Its defaults can wait forever (on a paused DataNode, on a dead
NameNode, which it retries without end), so cachefs sets a socket timeout and bounded failover;
a dataset's `dfs.*` / `fs.*` / `hadoop.*` options override them, and HADOOP_CONF_DIR's
core-site.xml / hdfs-site.xml are read as usual (name services, HA NameNodes). cachefs.ufs runs
every call in a thread under its own deadline too (a paused NameNode still hangs a call).

HDFS has no conditional reads: a read is checked against the recorded (size, mtime) by a stat
after it, as on a local tree.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

from cachefs.ufs_uri import HADOOP_PREFIXES, DatasetUri, RemoteEntry

#: Under these no hdfs-native call waits on a silent DataNode past 10 s (it moves to another
#: replica) or retries a refused NameNode for long (by default: forever); cachefs.ufs retries
#: on top, with backoff, within each call's deadline.
CLIENT_DEFAULTS = {
    "dfs.client.socket-timeout": "10000",
    "dfs.client.failover.max.attempts": "1",
    "dfs.client.failover.sleep.base.millis": "100",
    "dfs.client.failover.sleep.max.millis": "200",
}


def client_config(options: dict[str, str]) -> dict[str, str]:
    passed = {k: v for k, v in options.items() if k.startswith(HADOOP_PREFIXES)}
    return {**CLIENT_DEFAULTS, **passed}


class HdfsObjects:
    """Blocking HDFS calls below one dataset root (paths are relative to it)."""

    def __init__(self, u: DatasetUri):
        from hdfs_native import Client  # a Rust extension: loaded only for hdfs:// datasets

        # No host: fs.defaultFS of HADOOP_CONF_DIR. A name service has no port.
        url = f"hdfs://{u.host}:{u.port}" if u.port else (f"hdfs://{u.host}" if u.host else None)
        self._client = Client(url, client_config(u.options))
        self._root = u.path.rstrip("/") or "/"

    def _full(self, rel: str) -> str:
        return posixpath.join(self._root, rel) if rel else self._root

    def _entry(self, status: Any, rel: str) -> RemoteEntry:
        mtime_ns = status.modification_time * 1_000_000  # milliseconds on the wire
        if status.isdir:
            return RemoteEntry(rel, True, 0, mtime_ns)
        return RemoteEntry(rel, False, status.length, mtime_ns)

    def stat(self, rel: str) -> RemoteEntry | None:
        try:
            return self._entry(self._client.get_file_info(self._full(rel)), rel)
        except FileNotFoundError:
            return None

    def walk(self) -> Iterator[RemoteEntry]:
        """Everything below the root (the NameNode's listings, page by page)."""
        prefix = self._root.rstrip("/") + "/"
        for status in self._client.list_status(self._root, recursive=True):
            path = status.path
            rel = path[len(prefix) :] if path.startswith(prefix) else path.lstrip("/")
            if rel and ".." not in rel.split("/"):
                yield self._entry(status, rel)

    def read(self, rel: str, offset: int, length: int | None) -> bytes:
        with self._client.read(self._full(rel)) as f:
            size = len(f)  # the file's length, from the open
            if length is None:
                length = size - offset
            if offset >= size or length <= 0:
                return b""
            return f.read_range(offset, min(length, size - offset))
