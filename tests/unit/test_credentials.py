"""Secrets, redaction and the private runtime files (cachefs.credentials, cachefs.runtime)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from cachefs import credentials, runtime
from cachefs.errors import InvalidArgument, PermissionDenied


@pytest.fixture
def own_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir(mode=0o700)
    monkeypatch.delenv(credentials.SECRET_ENV, raising=False)
    return tmp_path / "xdg" / "cachefs"


@pytest.mark.parametrize(
    "key",
    ["secret_key", "access_key", "session_token", "token", "password", "AWS_SECRET", "credential"],
)
def test_credential_keys_are_redacted(key):
    shown = credentials.redact({key: "hunter2", "endpoint_override": "h:1", "region": "x"})
    assert shown == {key: "***", "endpoint_override": "h:1", "region": "x"}


def test_created_secret_is_private_random_and_stable(tmp_path):
    path = tmp_path / "secret"
    first = credentials.load_or_create(path)
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.load_or_create(path) == first
    assert credentials.load_or_create(tmp_path / "other") != first


def test_secret_files_readable_by_others_or_short_are_refused(tmp_path):
    path = tmp_path / "s"
    path.write_bytes(b"x" * 32)
    path.chmod(0o644)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        credentials.read_secret(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(InvalidArgument, match="fewer than 16"):
        credentials.read_secret(path)


def test_client_finds_published_secret_by_port(own_runtime, tmp_path, monkeypatch):
    secret = b"a" * 40
    credentials.publish(19999, secret)
    assert credentials.client_secret(None, ("127.0.0.1", 19999)) == secret
    assert credentials.client_secret(None, ("127.0.0.1", 19998)) is None
    explicit = tmp_path / "explicit"
    explicit.write_bytes(b"b" * 40)
    explicit.chmod(0o600)
    assert credentials.client_secret(str(explicit), ("127.0.0.1", 19999)) == b"b" * 40
    monkeypatch.setenv(credentials.SECRET_ENV, str(explicit))
    assert credentials.client_secret(None, ("127.0.0.1", 19999)) == b"b" * 40
    monkeypatch.delenv(credentials.SECRET_ENV)
    credentials.unpublish(19999, b"c" * 40)  # another master's secret: left alone
    assert credentials.client_secret(None, ("127.0.0.1", 19999)) == secret
    credentials.unpublish(19999, secret)
    assert credentials.client_secret(None, ("127.0.0.1", 19999)) is None


def test_published_secret_behind_a_symlink_is_ignored(own_runtime, tmp_path):
    planted = tmp_path / "planted"
    planted.write_bytes(b"p" * 40)
    planted.chmod(0o600)
    runtime.runtime_dir()
    (own_runtime / "master-19997.secret").symlink_to(planted)
    assert credentials.client_secret(None, ("127.0.0.1", 19997)) is None


def test_runtime_dir_must_be_ours_and_not_a_link(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(PermissionDenied, match="not a directory"):
        runtime.private_dir(link)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    with pytest.raises(PermissionDenied, match="belongs to uid 65534"):
        runtime.private_dir(foreign)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    runtime.private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_open_private_refuses_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "log").symlink_to(victim)
    with pytest.raises(OSError):
        runtime.open_private(tmp_path / "log")
    assert victim.read_text() == "keep"


def test_pid_file_names_only_the_process_that_wrote_it(tmp_path):
    path = tmp_path / "mount.pid"
    code = (
        "import sys, time; from pathlib import Path; from cachefs import runtime; "
        "runtime.write_pid_file(Path(sys.argv[1]), mountpoint='/mnt/x'); print(flush=True); "
        "time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        owner.stdout.readline()  # the file is written
        record = runtime.read_pid_file(path)
        assert record is not None and record["pid"] == owner.pid
        assert record["mountpoint"] == "/mnt/x"
    finally:
        owner.kill()
        owner.wait()
    assert runtime.read_pid_file(path) is None  # that process is gone

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = runtime._start_time(sleeper.pid)
        path.write_text(json.dumps({"pid": sleeper.pid, "start": start}))
        assert runtime.read_pid_file(path) is None  # alive, right start, but not cachefs
        path.write_text(json.dumps({"pid": os.getpid(), "start": 1}))
        assert runtime.read_pid_file(path) is None  # a reused pid: wrong start time
        path.write_text("not json")
        assert runtime.read_pid_file(path) is None
    finally:
        sleeper.kill()
        sleeper.wait()
