"""Closed by default (issue #12): a local user without the secret gets nothing through; no
credential shows in any output; backups, logs and pid files stay where they belong.

Everything runs as real processes started with defaults, as root; the unprivileged user is
`nobody` (tests/unprivileged.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import trio

from cachefs.errors import AuthenticationFailed
from cachefs.rpc import RpcClient
from tests.procs import master_process, run_cli, worker_process
from tests.unprivileged import cli_as_nobody, nobody_home, rpc_as_nobody


def _assert_private_tree(root: Path) -> None:
    """Every dir under root 0700 (no group/other bits), every file 0600 or stricter."""
    for dirpath, _, filenames in os.walk(root):
        assert stat.S_IMODE(os.lstat(dirpath).st_mode) & 0o077 == 0, dirpath
        for name in filenames:
            mode = stat.S_IMODE(os.lstat(Path(dirpath) / name).st_mode)
            assert mode & 0o077 == 0, (Path(dirpath) / name, oct(mode))


def _refused(proc: subprocess.CompletedProcess) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("cachefs: error:"), proc.stderr
    assert "secret" in lines[0], lines[0]


def test_defaults_keep_an_unprivileged_user_out(tmp_path, make_tree):
    tree = make_tree({"a.bin": 4000, "d/b.bin": 100})
    (tmp_path / "master-state").mkdir()
    (tmp_path / "master-state").chmod(0o755)  # an operator's pre-made, too open state dir
    master = master_process(tmp_path)
    address = master.start()
    worker = worker_process(tmp_path, address, "w1", "64M")
    runtime = nobody_home(tmp_path)
    try:
        worker.start()
        # root on the master's host: no flag needed
        added = run_cli("dataset", "add", "d", tree.root.as_uri(), "--master", address)
        assert added.returncode == 0, added.stderr
        assert run_cli("load", "d", "--master", address).returncode == 0
        status = json.loads(run_cli("status", "--json", "--master", address).stdout)
        worker_address = status["workers"][0]["address"]

        for args in (
            ["dataset", "add", "etc", "file:///etc"],
            ["dataset", "ls"],
            ["status"],
            ["master", "backup", "stolen"],
            ["load", "d"],
        ):
            _refused(cli_as_nobody(runtime, *args, "--master", address))
        spec = {"path": "a.bin", "size": 4000, "mtime_ns": 0}
        for target, method, args in (
            (address, "dataset_add", {"name": "etc", "uri": "file:///etc"}),
            (address, "dataset_spec", {"name": "d"}),
            (address, "backup", {"path": "x"}),
            (worker_address, "read", {"dataset": "d", **spec}),
            (worker_address, "evict", {"dataset": "d"}),
        ):
            outcome = rpc_as_nobody(runtime, target, method, **args)
            assert not outcome["ok"] and outcome["error"] == "AuthenticationFailed", outcome
        assert run_cli("dataset", "ls", "--master", address).stdout.count("\n") == 1  # no "etc"
    finally:
        worker.stop()
        master.stop()
    _assert_private_tree(tmp_path / "master-state")
    _assert_private_tree(tmp_path / "worker-w1" / "state")


async def _unauthenticated_call(port: int) -> BaseException | None:
    try:
        async with RpcClient(("127.0.0.1", port), timeout=5) as client:
            await client.call("status")
    except Exception as exc:  # noqa: BLE001 - the test inspects what came back
        return exc
    return None


def test_embedded_mount_offers_no_unauthenticated_endpoint(mounts, make_tree):
    tree = make_tree({"a.bin": 1000})
    mountpoint = mounts.embedded(tree.root.as_uri())
    assert (mountpoint / "a.bin").read_bytes() == tree.files["a.bin"]
    pid = next(
        p.pid for p in psutil.process_iter(["cmdline"])
        if str(mountpoint) in (p.info["cmdline"] or []) and "--foreground" in p.info["cmdline"]
    )  # fmt: skip
    conns = psutil.Process(pid).net_connections(kind="all")
    ports = sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr})
    unix = [c.laddr for c in conns if c.family == 1 and c.laddr]
    assert len(ports) == 2, conns  # the embedded master and worker, both on loopback
    assert not unix, unix
    for port in ports:
        error = trio.run(_unauthenticated_call, port)
        assert isinstance(error, AuthenticationFailed), (port, error)


def test_credentials_are_never_shown(tmp_path, moto_server):
    key_id, secret = "AKIDSHOWNOWHERE0001", "s3cr3t-never-printed-0123456789"
    bucket = moto_server.create_bucket()
    moto_server.upload(bucket, {"p/a.bin": b"x" * 100})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http = f"127.0.0.1:{probe.getsockname()[1]}"
    master = master_process(tmp_path, "--http", http)
    address = master.start()
    worker = worker_process(tmp_path, address, "w1", "64M")
    outputs = []
    try:
        worker.start()
        uri = f"s3://{bucket}/p?access_key={key_id}&secret_key={secret}"
        opts = [f"-o{k}={v}" for k, v in moto_server.options.items()]
        for args in (
            ["dataset", "add", "d", uri, *opts],
            ["dataset", "add", "d", uri, *opts],  # the error of a repeated add
            ["dataset", "add", "e", f"s3://{bucket}/p", *opts, f"-osecret_key={secret}",
             f"-oaccess_key={key_id}"],
            ["dataset", "add", "bad", f"s3://{bucket}/p?secret_key={secret}&nope=1"],
            ["load", "d"],
            ["dataset", "ls"],
            ["status"],
            ["status", "--json"],
            ["job", "ls"],
            ["affinity", "d"],
        ):  # fmt: skip
            proc = run_cli(*args, "--master", address)
            outputs += [proc.stdout, proc.stderr]
        assert "***" in run_cli("status", "--json", "--master", address).stdout
        # the data still flows: workers got the real credentials over an authenticated call
        loaded = run_cli("load", "e", "--check", "--master", address)
        assert "1/1 files cached" in run_cli("load", "d", "--check", "--master", address).stdout
        outputs += [loaded.stdout, loaded.stderr]
        token = (tmp_path / "master-state" / "console-token").read_text().strip()
        for route in ("/api/status", "/api/datasets"):
            request = urllib.request.Request(
                f"http://{http}{route}", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(request, timeout=10) as reply:
                body = reply.read().decode()
            assert '"***"' in body
            outputs.append(body)
    finally:
        worker.stop()
        master.stop()
    outputs += [master.log(), worker.log()]
    for text in outputs:
        assert secret not in text and key_id not in text, text[-3000:]


def test_backup_stays_in_the_state_dir(tmp_path):
    master = master_process(tmp_path)
    address = master.start()
    outside = tmp_path / "outside.lmdb"
    try:
        for target in (str(outside), "../../outside.lmdb", "sub/../../x.lmdb"):
            proc = run_cli("master", "backup", target, "--master", address)
            assert proc.returncode == 1 and "only into the master's state dir" in proc.stderr
        assert not outside.exists() and not (tmp_path / "x.lmdb").exists()
        proc = run_cli("master", "backup", "nightly.lmdb", "--master", address)
        assert proc.returncode == 0, proc.stderr
        backup = tmp_path / "master-state" / "backups" / "nightly.lmdb"
        assert str(backup) in proc.stdout and backup.stat().st_size > 0
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    finally:
        master.stop()


def test_planted_log_link_and_forged_pid_file(tmp_path, make_tree):
    tree = make_tree({"a.bin": 10})
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    from cachefs.fuse.mount import pid_file

    os.environ["XDG_RUNTIME_DIR"] = str(runtime)  # pid_file() computes the same path
    try:
        log_path = pid_file(mountpoint).with_suffix(".log")
        pid_path = pid_file(mountpoint)
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
    log_path.symlink_to(victim)
    state = ["--state", str(tmp_path / "state"), "--mem", "16M"]
    proc = run_cli("mount", tree.root.as_uri(), str(mountpoint), *state, env=env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.ismount(mountpoint) and victim.read_text() == "untouched\n"
    log_path.unlink()

    bystander = subprocess.Popen(["sleep", "300"])
    shm_before = set(Path("/dev/shm").glob("cachefs-*"))
    try:
        proc = run_cli("mount", tree.root.as_uri(), str(mountpoint), *state, env=env)
        assert proc.returncode == 0, proc.stderr
        record = json.loads(pid_path.read_text())
        forged = {**record, "pid": bystander.pid}  # right mountpoint, someone else's pid
        pid_path.write_text(json.dumps(forged))
        mount_process = psutil.Process(record["pid"])
        proc = run_cli("umount", str(mountpoint), env=env)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.ismount(mountpoint)
        assert bystander.poll() is None  # not signalled
        mount_process.wait(timeout=30)  # the real mount process ended on its own
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        bystander.kill()
        bystander.wait()
        for path in set(Path("/dev/shm").glob("cachefs-*")) - shm_before:
            subprocess.run(["rm", "-rf", str(path)], check=False)


def test_runtime_dir_planted_by_another_user_is_refused(tmp_path, make_tree):
    tree = make_tree({"a.bin": 10})
    planted = tmp_path / "runtime"
    (planted / "cachefs").mkdir(parents=True)
    os.chown(planted / "cachefs", 65534, 65534)  # made by nobody before root came
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    started = time.monotonic()
    proc = run_cli(
        "mount", tree.root.as_uri(), str(mountpoint), "--state", str(tmp_path / "state"),
        env={"XDG_RUNTIME_DIR": str(planted)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "belongs to uid 65534" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not os.path.ismount(mountpoint) and time.monotonic() - started < 60


def test_tls_cluster_end_to_end(tmp_path, make_tree, mounts):
    """--tls-* on master, worker, commands and a cluster mount: data flows; a command without
    them is refused in one line."""
    import trustme

    tree = make_tree({"a.bin": 5000, "d/b.bin": 70})
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    node = ca.issue_cert("127.0.0.1", "node.cluster")
    node.cert_chain_pems[0].write_to_path(str(tmp_path / "node.pem"))
    node.private_key_pem.write_to_path(str(tmp_path / "node.key"))
    tls = ["--tls-cert", str(tmp_path / "node.pem"), "--tls-key", str(tmp_path / "node.key"),
           "--tls-ca", str(tmp_path / "ca.pem")]  # fmt: skip
    master = master_process(tmp_path, *tls)
    address = master.start()
    worker = worker_process(tmp_path, address, "w1", "64M", *tls)
    try:
        worker.start()
        added = run_cli("dataset", "add", "d", tree.root.as_uri(), "--master", address, *tls)
        assert added.returncode == 0, added.stderr
        plain = run_cli("dataset", "ls", "--master", address)
        assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1
        assert "requires TLS" in plain.stderr, plain.stderr
        mnt = mounts.mount("d", "--master", address, *tls)
        assert (mnt / "a.bin").read_bytes() == tree.files["a.bin"]
        assert (mnt / "d" / "b.bin").read_bytes() == tree.files["d/b.bin"]
        status = json.loads(run_cli("status", "--json", "--master", address, *tls).stdout)
        assert status["workers"][0]["stats"]["remote_reads"] >= 1  # served by the TLS worker
    finally:
        worker.stop()
        master.stop()
