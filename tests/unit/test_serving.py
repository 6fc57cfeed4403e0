"""The pure parts of several serving processes per mount (fuse/serving.py)."""

from __future__ import annotations

import json
from pathlib import Path

from cachefs.fuse import serving
from cachefs.fuse.client import MountOptions
from cachefs.tls import TlsConfig


def test_default_procs_is_half_the_cores_between_one_and_four(monkeypatch):
    for cores, expected in [(None, 1), (1, 1), (2, 1), (4, 2), (6, 3), (8, 4), (64, 4)]:
        monkeypatch.setattr(serving.os, "cpu_count", lambda cores=cores: cores)
        assert serving.default_procs() == expected


def test_helper_spec_carries_what_a_helper_needs_as_json():
    opts = MountOptions(
        entry_timeout=5.0, attr_timeout=6.0, op_timeout=7.0, change_poll=0.5,
        allow_other=True, secret=b"\x01\xff", tls=TlsConfig(cert="c.pem", key="k.pem", ca="ca"),
    )  # fmt: skip
    spec = json.loads(
        json.dumps(serving.helper_spec("ds", ("::1", 9000), opts, Path("/run/m.meta")))
    )
    assert spec["dataset"] == "ds" and spec["master"] == "[::1]:9000"
    assert bytes.fromhex(spec["secret"]) == b"\x01\xff"
    assert spec["tls"] == {"cert": "c.pem", "key": "k.pem", "ca": "ca", "check_hostname": None}
    assert (spec["entry_timeout"], spec["attr_timeout"], spec["op_timeout"]) == (5.0, 6.0, 7.0)
    assert spec["change_poll"] == 0.5 and spec["allow_other"] is True
    assert spec["meta"] == "/run/m.meta"


def test_resend_pending_on_a_gone_connection_is_reported_not_raised():
    assert serving.resend_pending(-1) is False  # EBADF, as ENODEV after an unmount
