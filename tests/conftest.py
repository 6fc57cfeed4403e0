"""Fixtures shared by all cachefs test layers.

- `moto_server` (session): a real moto S3 server subprocess on 127.0.0.1, with boto3 helpers.
- `s3_uri_options`: the dataset options (`-o KEY=VALUE`) that point S3 at that server.
- `make_tree`: writes a small local tree of files with random content.
- `hdfs_cluster` (session), `hdfs`: a real HDFS on 127.0.0.1 (tests/hdfs.py).

Add new fixtures in their own section, with a docstring saying what they give a test.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.hdfs import hdfs, hdfs_cluster  # noqa: F401 - fixtures for every test

# --- S3 (moto server) ----------------------------------------------------------------------

MOTO_READY_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    """A running moto S3 server; `endpoint` is "127.0.0.1:PORT" (plain HTTP)."""

    endpoint: str
    _client: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def options(self) -> dict[str, str]:
        """Dataset options for an s3:// URI on this server."""
        return {"endpoint_override": self.endpoint, "scheme": "http"}

    @property
    def client(self) -> Any:
        """A boto3 S3 client for this server (for setting up and checking remote state)."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (a fresh unique one if no name) and returns its name; idempotent."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def upload(self, bucket: str, files: Mapping[str, bytes]) -> None:
        """Puts each key -> bytes into the bucket."""
        for key, data in files.items():
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def mtimes(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """LastModified (ns) of every key under `prefix`, keyed by the path after the prefix."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) :]] = int(obj["LastModified"].timestamp() * 10**9)
        return out


def _start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Starts moto on a free port and waits until it answers HTTP; retries if the port was lost."""
    for _ in range(3):
        endpoint = f"127.0.0.1:{_free_port()}"
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed after it exits
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.split(":")[1]],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + MOTO_READY_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{endpoint}/", timeout=1):
                    return proc, endpoint
            except urllib.error.HTTPError:
                return proc, endpoint  # any HTTP answer means it is serving
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)  # poll interval while the server starts, not a readiness wait
        proc.kill()
        proc.wait()
    raise RuntimeError(f"moto server did not start; log:\n{log_path.read_text()[-2000:]}")


def set_fake_aws_credentials() -> None:
    """Fake credentials for boto3 and pyarrow; no EC2 metadata lookups when none are found."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real moto S3 server process for the whole session (buckets persist between tests)."""
    set_fake_aws_credentials()
    proc, endpoint = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield MotoServer(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_uri_options(moto_server: MotoServer) -> dict[str, str]:
    """{"endpoint_override": "127.0.0.1:PORT", "scheme": "http"} for the moto server."""
    return moto_server.options


# --- local trees -----------------------------------------------------------------------------

# relative path -> size; covers nesting, an empty file, a name with a space, a large-ish file
DEFAULT_TREE: dict[str, int] = {
    "a.bin": 1000,
    "empty.bin": 0,
    "name with space.txt": 12,
    "d1/b.bin": 5000,
    "d1/d2/c.bin": 70_000,
    "d1/d2/d3/deep.bin": 10,
    "e/x.bin": 1,
    "e/y.bin": 2,
}


@dataclass
class LocalTree:
    root: Path
    files: dict[str, bytes]  # relative POSIX path -> content

    @property
    def dirs(self) -> set[str]:
        """Every directory implied by the files (relative, without the root)."""
        out = set()
        for rel in self.files:
            parts = rel.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return out


@pytest.fixture
def make_tree(tmp_path: Path):
    """make_tree(sizes=DEFAULT_TREE, *, seed=0, root=None) -> LocalTree with random content.

    Each call without `root` writes into a new directory under tmp_path.
    """
    counter = iter(range(1_000_000))

    def make(
        sizes: Mapping[str, int] | None = None, *, seed: int = 0, root: Path | None = None
    ) -> LocalTree:
        rng = random.Random(seed)
        root = root or tmp_path / f"tree{next(counter)}"
        files = {}
        for rel, size in (DEFAULT_TREE if sizes is None else sizes).items():
            files[rel] = rng.randbytes(size)
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[rel])
        root.mkdir(parents=True, exist_ok=True)
        return LocalTree(root, files)

    return make


# --- a counting / fault-injecting proxy in front of the S3 server ---------------------------


@pytest.fixture
def s3_proxy(moto_server: MotoServer):
    """A StoreProxy (tests/store_proxy.py) in front of the session's moto server; stopped at
    the end."""
    from tests.store_proxy import StoreProxy

    proxy = StoreProxy(moto_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
