"""cachefs.client beside a FUSE mount: an embedded mount's master serves Python readers too."""

from __future__ import annotations

import hashlib
import re

from cachefs.client import Client
from cachefs.fuse.mount import EMBEDDED_DATASET
from tests.fuse.conftest import make_files


def test_an_embedded_mounts_master_serves_the_client(mounts, tmp_path):
    src = tmp_path / "src"
    digests = make_files(src, 60, seed=4)
    with mounts.tracking_tiers():
        result = mounts.mount(f"file://{src}", "--state", str(tmp_path / "state"), "--mem",
                              "64M", name="emb", check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    master = re.search(r"its master: (\S+) \(secret: (\S+)\)", result.stdout)
    assert master, result.stdout
    # The same user on the same host finds the published secret; the printed file works too.
    for secret_file in (None, master.group(2)):
        with Client(master.group(1), secret_file=secret_file) as client:
            for rel, digest in digests.items():
                data = client.read_bytes(EMBEDDED_DATASET, rel)
                assert hashlib.sha256(data).hexdigest() == digest, rel
                assert data == (tmp_path / "emb" / rel).read_bytes()  # the mount agrees
