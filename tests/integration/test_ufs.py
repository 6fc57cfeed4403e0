"""RemoteStore against a real local directory and a real moto S3 server.

Faults the real parts cannot produce on demand (connection resets, a hung call) are injected by
wrapping the store's real pyarrow filesystem object.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest
import trio

from cachefs import errors
from cachefs.ufs import RemoteEntry, RemoteStore, _translate, _WebHdfsHandler, parse_uri
from tests.faults import FaultyFs
from tests.store_proxy import StoreProxy


async def collect(store: RemoteStore, batch_size: int = 5000) -> dict[str, RemoteEntry]:
    """The whole tree as path -> entry; checks batch bounds and that no path repeats."""
    found: dict[str, RemoteEntry] = {}
    async for batch in store.iter_tree(batch_size=batch_size):
        assert 0 < len(batch) <= batch_size
        for entry in batch:
            assert entry.path not in found, entry.path
            assert entry.path and not entry.path.startswith("/") and not entry.path.endswith("/")
            found[entry.path] = entry
    return found


async def wait_drained(limiter: trio.CapacityLimiter, seconds: float) -> None:
    """Waits until every thread has given its token back, by taking all tokens ourselves."""
    owners = [object() for _ in range(int(limiter.total_tokens))]
    with trio.fail_after(seconds):
        for owner in owners:
            await limiter.acquire_on_behalf_of(owner)
    for owner in owners:
        limiter.release_on_behalf_of(owner)


# --- local directory ------------------------------------------------------------------------


def local_expected(root) -> dict[str, tuple[bool, int, int]]:
    """What the walk should report: lstat for dirs, stat (following links) for files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full) and (os.path.isdir(full) or not os.path.exists(full)):
                continue  # links to dirs and broken links are not part of the dataset
            if not (os.path.isdir(full) or os.path.isfile(full)):
                continue  # nor are fifos, sockets, devices
            st = os.stat(full)
            is_dir = os.path.isdir(full)
            out[rel] = (is_dir, 0 if is_dir else st.st_size, st.st_mtime_ns)
    return out


async def test_local_iter_tree_matches_source(make_tree):
    tree = make_tree()
    (tree.root / "empty_dir").mkdir()
    os.symlink("a.bin", tree.root / "link_to_file")
    os.symlink("d1", tree.root / "link_to_dir")
    os.symlink("missing", tree.root / "broken_link")
    os.mkfifo(tree.root / "fifo")
    store = RemoteStore(tree.root.as_uri())
    await store.check()

    found = await collect(store, batch_size=3)
    expected = local_expected(tree.root)
    assert {p: (e.is_dir, e.size, e.mtime_ns) for p, e in found.items()} == expected
    assert set(expected) == set(tree.files) | tree.dirs | {"empty_dir", "link_to_file"}
    assert found["link_to_file"].size == len(tree.files["a.bin"])


async def test_local_reads_match_source(make_tree):
    tree = make_tree()
    store = RemoteStore(tree.root.as_uri())
    for rel, data in tree.files.items():
        assert await store.read_file(rel) == data
        assert await store.read_range(rel, 0, len(data) + 10) == data
        if data:
            mid = len(data) // 2
            assert await store.read_range(rel, mid, 7) == data[mid : mid + 7]
            assert await store.read_range(rel, len(data) - 1, 100) == data[-1:]  # short at EOF
        assert await store.read_range(rel, len(data), 10) == b""
        assert await store.read_range(rel, len(data) + 1000, 10) == b""
        entry = await store.stat(rel)
        assert (entry.path, entry.is_dir, entry.size) == (rel, False, len(data))
        assert entry.mtime_ns == os.stat(tree.root / rel).st_mtime_ns
    assert (await store.stat("d1/d2")).is_dir
    assert await store.read_range("a.bin", 10, 0) == b""


async def test_local_missing_paths_and_bad_roots(make_tree, tmp_path):
    tree = make_tree()
    store = RemoteStore(tree.root.as_uri())
    with pytest.raises(errors.NotFound, match=f"remote path {tree.root.as_uri()}/nope does not"):
        await store.stat("nope")
    with pytest.raises(errors.NotFound, match="d1/nope.bin does not exist"):
        await store.read_file("d1/nope.bin")
    with pytest.raises(errors.IsADirectory):
        await store.read_file("d1")

    missing = RemoteStore((tmp_path / "not-here").as_uri())
    with pytest.raises(errors.NotFound, match=f"remote path {tmp_path.as_uri()}/not-here does"):
        await missing.check()
    with pytest.raises(errors.NotFound):
        await collect(missing)
    with pytest.raises(errors.NotADirectory, match="is not a directory"):
        await RemoteStore((tree.root / "a.bin").as_uri()).check()


@pytest.mark.parametrize("path", ["../x", "d1/../../x", "/etc/passwd", "a\0b"])
async def test_paths_outside_the_root_are_rejected(make_tree, path):
    store = RemoteStore(make_tree().root.as_uri())
    store._fs = FaultyFs(store._fs)
    for call in (store.stat(path), store.read_file(path), store.read_range(path, 0, 1)):
        with pytest.raises(errors.InvalidArgument, match="relative to the dataset root"):
            await call
    assert store._fs.calls == 0


async def test_transient_errors_are_retried(make_tree):
    tree = make_tree()
    store = RemoteStore(tree.root.as_uri())
    store._fs = FaultyFs(store._fs, [ConnectionResetError(errno.ECONNRESET, "reset")] * 2)
    assert await store.read_file("a.bin") == tree.files["a.bin"]
    assert store._fs.calls == 3

    store._fs = FaultyFs(store._fs.real, [OSError("AWS Error SLOW_DOWN during GetObject")])
    assert (await store.stat("a.bin")).size == len(tree.files["a.bin"])
    assert store._fs.calls == 2


async def test_retries_stop_after_max_attempts(make_tree):
    store = RemoteStore(make_tree().root.as_uri(), max_attempts=3)
    store._fs = FaultyFs(store._fs, [ConnectionRefusedError(errno.ECONNREFUSED, "refused")] * 9)
    with pytest.raises(errors.Unavailable, match="cannot reach local filesystem for .*a.bin"):
        await store.read_file("a.bin")
    assert store._fs.calls == 3


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (None, errors.NotFound),  # the real missing file
        (PermissionError(errno.EACCES, "Permission denied"), errors.PermissionDenied),
        (OSError("AWS Error ACCESS_DENIED during HeadObject"), errors.PermissionDenied),
        (ValueError("something odd"), errors.CacheFsError),
    ],
)
async def test_permanent_errors_are_not_retried(make_tree, fault, kind):
    store = RemoteStore(make_tree().root.as_uri())
    store._fs = FaultyFs(store._fs, [fault] if fault else [])
    with pytest.raises(kind) as info:
        await store.read_file("nope.bin" if fault is None else "a.bin")
    assert not info.value.transient
    assert store._fs.calls == 1


async def test_hung_call_times_out_and_releases_the_caller(make_tree):
    release = threading.Event()
    limiter = trio.CapacityLimiter(4)
    store = RemoteStore(make_tree().root.as_uri(), limiter=limiter, timeout=0.5)
    store._fs = FaultyFs(store._fs, block=release)
    try:
        started = time.monotonic()
        with pytest.raises(errors.TimedOut, match=r"stat of file://.*/a.bin did not finish within"):
            await store.stat("a.bin")
        assert time.monotonic() - started < 2
        # The caller's slot is free for the next call; the abandoned thread runs on under the
        # store's thread cap until its request ends.
        assert limiter.borrowed_tokens == 0
        assert store._threads.borrowed_tokens == 1
    finally:
        release.set()
    await wait_drained(store._threads, seconds=10)


async def test_limiter_bounds_concurrent_calls(make_tree):
    tree = make_tree()
    store = RemoteStore(tree.root.as_uri(), limiter=trio.CapacityLimiter(2))
    store._fs = FaultyFs(store._fs)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(store.read_file, "d1/b.bin")
    assert store._fs.calls == 10
    assert store._fs.max_active == 2


async def test_closed_store_refuses_calls(make_tree):
    store = RemoteStore(make_tree().root.as_uri())
    store.close()
    with pytest.raises(errors.CacheFsError, match="is closed"):
        await store.stat("a.bin")


# --- S3 (moto server) ---------------------------------------------------------------------


@pytest.fixture
def s3_tree(make_tree, moto_server):
    """The default tree under s3://BUCKET/data, with keys beside it that must stay invisible."""
    tree = make_tree()
    bucket = moto_server.create_bucket()
    moto_server.upload(bucket, {f"data/{k}": v for k, v in tree.files.items()})
    moto_server.upload(bucket, {"data2/not-mine.bin": b"x", "other/y.bin": b"y", "top.bin": b"t"})
    return bucket, tree


async def test_s3_iter_tree_matches_source(s3_tree, moto_server, s3_uri_options):
    bucket, tree = s3_tree
    store = RemoteStore(f"s3://{bucket}/data", s3_uri_options)
    await store.check()
    found = await collect(store, batch_size=2)

    assert {p for p, e in found.items() if e.is_dir} == tree.dirs  # implied by the keys
    files = {p: e for p, e in found.items() if not e.is_dir}
    assert {p: e.size for p, e in files.items()} == {p: len(d) for p, d in tree.files.items()}
    mtimes = moto_server.mtimes(bucket, "data/")
    for path, entry in files.items():
        assert entry.mtime_ns // 10**9 == mtimes[path] // 10**9, path
        assert (await store.stat(path)).mtime_ns == entry.mtime_ns  # one resolution everywhere


async def test_s3_whole_bucket_and_uri_query_options(s3_tree, s3_uri_options):
    bucket, tree = s3_tree
    query = "&".join(f"{k}={v}" for k, v in s3_uri_options.items())
    store = RemoteStore(f"s3://{bucket}/?{query}")
    assert store.uri == f"s3://{bucket}"
    found = await collect(store)
    expected = {f"data/{p}" for p in tree.files | dict.fromkeys(tree.dirs)}
    expected |= {"data", "data2", "data2/not-mine.bin", "other", "other/y.bin", "top.bin"}
    assert set(found) == expected


async def test_s3_reads_match_source(s3_tree, s3_uri_options):
    bucket, tree = s3_tree
    store = RemoteStore(f"s3://{bucket}/data", s3_uri_options)
    for rel, data in tree.files.items():
        assert await store.read_file(rel) == data
        if data:
            assert await store.read_range(rel, 1, 5) == data[1:6]
            tail = max(0, len(data) - 3)
            assert await store.read_range(rel, tail, 100) == data[tail:]
        assert await store.read_range(rel, len(data), 10) == b""
        assert await store.read_range(rel, len(data) + 5, 10) == b""


async def test_s3_listing_is_flat_and_a_read_is_one_get(s3_tree, moto_server):
    bucket, tree = s3_tree
    with StoreProxy(moto_server.endpoint) as proxy:
        store = RemoteStore(f"s3://{bucket}/data", proxy.options)
        found = await collect(store)
        counts = proxy.counts()
        assert counts["requests"] == counts["lists"] == 1  # < 1,000 keys: one page
        for rel, data in tree.files.items():
            entry = found[rel]
            assert entry.etag  # recorded, so the cache key and the GET can use it
            proxy.reset_counts()
            got = await store.read_version(rel, 0, 1 << 20, entry.size, entry.mtime_ns, entry.etag)
            assert got == data
            assert proxy.counts()["requests"] == (1 if data else 0)  # no HEAD, before or after
        big = max(tree.files, key=lambda rel: len(tree.files[rel]))
        entry = found[big]
        proxy.reset_counts()
        part = await store.read_version(big, 3, 10, entry.size, entry.mtime_ns, entry.etag)
        assert part == tree.files[big][3:13]
        assert proxy.counts()["gets"] == 1  # a ranged GET


async def test_s3_a_changed_object_is_refused_by_its_get(s3_tree, moto_server):
    bucket, tree = s3_tree
    rel = max(tree.files, key=lambda rel: len(tree.files[rel]))
    size = len(tree.files[rel])
    with StoreProxy(moto_server.endpoint) as proxy:
        store = RemoteStore(f"s3://{bucket}/data", proxy.options)
        entry = await store.stat(rel)
        moto_server.upload(bucket, {f"data/{rel}": b"N" * size})  # same size, new content
        proxy.reset_counts()
        with pytest.raises(errors.StaleVersion, match="changed in the remote store"):
            await store.read_version(rel, 0, size, size, entry.mtime_ns, entry.etag)
        assert proxy.counts()["requests"] == 1  # the conditional GET itself, not retried
        # A snapshot without ETags (synced by an older cachefs): size and mtime decide.
        moto_server.upload(bucket, {f"data/{rel}": b"N" * (size + 1)})
        with pytest.raises(errors.StaleVersion):
            await store.read_version(rel, 0, size, size, entry.mtime_ns, None)


async def test_s3_transient_failures_are_retried_until_they_pass(s3_tree, moto_server):
    bucket, tree = s3_tree
    rel = max(tree.files, key=lambda rel: len(tree.files[rel]))
    with StoreProxy(moto_server.endpoint, seed=3) as proxy:
        store = RemoteStore(f"s3://{bucket}/data", proxy.options)
        entry = await store.stat(rel)
        proxy.set(fail_rate=0.3, reset_rate=0.3)
        for _ in range(20):
            got = await store.read_version(rel, 0, entry.size, entry.size, entry.mtime_ns,
                                           entry.etag)  # fmt: skip
            assert got == tree.files[rel]
        counts = proxy.counts()
        assert counts["failed"] > 0 and counts["reset"] > 0  # faults really happened


async def test_s3_a_stalled_get_is_hedged(s3_tree, moto_server):
    bucket, tree = s3_tree
    rel = max(tree.files, key=lambda rel: len(tree.files[rel]))
    with StoreProxy(moto_server.endpoint) as proxy:
        store = RemoteStore(f"s3://{bucket}/data", proxy.options)
        entry = await store.stat(rel)
        args = (rel, 0, entry.size, entry.size, entry.mtime_ns, entry.etag)
        for _ in range(store._hedge.min_samples):  # the policy learns the store's latency
            await store.read_version(*args)
        proxy.set(stall_rate=1.0, stall_seconds=10.0)
        proxy.reset_counts()
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            got = []

            async def read():
                got.append(await store.read_version(*args))

            nursery.start_soon(read)
            while proxy.counts()["stalled"] == 0:  # noqa: ASYNC110 - the first GET is held ...
                await trio.sleep(0.005)
            proxy.set(stall_rate=0.0)  # ... its hedge will not be
        assert got == [tree.files[rel]]
        assert time.monotonic() - started < 5.0  # well before the stall's 10 s
        assert proxy.counts()["gets"] == 2


async def test_s3_missing_things(s3_tree, moto_server, s3_uri_options):
    bucket, _ = s3_tree
    store = RemoteStore(f"s3://{bucket}/data", s3_uri_options)
    with pytest.raises(errors.NotFound, match=f"remote path s3://{bucket}/data/nope does not"):
        await store.stat("nope")
    with pytest.raises(errors.NotFound, match=f"s3://{bucket}/data/d1/nope.bin does not"):
        await store.read_file("d1/nope.bin")
    with pytest.raises(errors.NotFound, match=f"remote path s3://{bucket}/no/such does not"):
        await RemoteStore(f"s3://{bucket}/no/such", s3_uri_options).check()
    with pytest.raises(errors.NotFound, match="remote path s3://no-such-bucket-x does not"):
        await RemoteStore("s3://no-such-bucket-x", s3_uri_options).check()
    with pytest.raises(errors.NotADirectory):
        await RemoteStore(f"s3://{bucket}/top.bin", s3_uri_options).check()

    with StoreProxy(moto_server.endpoint) as proxy:
        counted = RemoteStore(f"s3://{bucket}/data", proxy.options)
        with pytest.raises(errors.NotFound):
            await counted.read_file("nope")
        assert proxy.counts()["requests"] == 1  # not retried


async def test_s3_unreachable_endpoint_fails_fast():
    store = RemoteStore(
        "s3://bucket/prefix", {"endpoint_override": "127.0.0.1:1", "scheme": "http"}
    )
    started = time.monotonic()
    with pytest.raises(errors.Unavailable) as info:
        await store.check()
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert message.startswith("cannot reach S3 endpoint 127.0.0.1:1 for s3://bucket/prefix: ")
    assert "\n" not in message


async def test_s3_hung_endpoint_times_out():
    # A listening socket that never accepts: connects succeed, requests never get an answer.
    # pyarrow ignores request_timeout on Linux, so only our deadline ends the call.
    server = socket.create_server(("127.0.0.1", 0))
    limiter = trio.CapacityLimiter(4)
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"
    store = RemoteStore(
        "s3://bucket/p",
        {"endpoint_override": endpoint, "scheme": "http"},
        limiter=limiter,
        timeout=1,
    )
    try:
        started = time.monotonic()
        with pytest.raises(errors.TimedOut, match=f"within 1s \\(S3 endpoint {endpoint}\\)"):
            await store.stat("x")
        assert time.monotonic() - started < 3
    finally:
        server.close()  # resets the pending connection, so the abandoned thread ends
    await wait_drained(limiter, seconds=20)


# --- HDFS / WebHDFS (no Hadoop here: only the failure paths) ----------------------------------


async def test_webhdfs_unreachable_is_unavailable():
    store = RemoteStore("webhdfs://127.0.0.1:1/data", max_attempts=2)
    with pytest.raises(
        errors.Unavailable, match=r"cannot reach WebHDFS 127.0.0.1:1 for webhdfs://"
    ):
        await store.check()


def test_webhdfs_mtime_comes_from_modification_time():
    # fsspec's WebHDFS info has no "mtime"; without the mapping every mtime would be 0 and an
    # overwritten file of the same size would keep its old cache key.
    info = {"type": "file", "size": 3, "modificationTime": 1_700_000_000_123}
    assert _WebHdfsHandler._create_file_info("/d/x", info).mtime_ns == 1_700_000_000_123_000_000


@pytest.mark.skipif(bool(os.environ.get("JAVA_HOME")), reason="a JVM may be usable here")
def test_hdfs_libhdfs_without_its_jvm_is_a_clear_error():
    with pytest.raises(errors.CacheFsError) as info:
        RemoteStore("hdfs://127.0.0.1:1/data", {"client": "libhdfs"})
    message = str(info.value)
    assert message.startswith("cannot open hdfs://127.0.0.1:1/data: ")
    assert "Java" in message and "\n" not in message


# --- error mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind", "transient"),
    [
        (FileNotFoundError(2, "gone"), errors.NotFound, False),
        (NotADirectoryError(20, "nd"), errors.NotADirectory, False),
        (IsADirectoryError(21, "d"), errors.IsADirectory, False),
        (PermissionError(13, "no"), errors.PermissionDenied, False),
        (ConnectionResetError(104, "reset"), errors.Unavailable, True),
        (TimeoutError("timed out"), errors.Unavailable, True),
        (OSError("AWS Error NETWORK_CONNECTION during HeadObject"), errors.Unavailable, True),
        (OSError("AWS Error SLOW_DOWN during GetObject operation"), errors.Unavailable, True),
        (OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject"), errors.Unavailable, True),
        (OSError("AWS Error ACCESS_DENIED during HeadObject"), errors.PermissionDenied, False),
        (OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2"), errors.NotFound, False),
        (OSError("Cannot open for reading: path '/x' is a directory"), errors.IsADirectory, False),
        (OSError("something\nelse"), errors.CacheFsError, False),
        (ValueError("odd"), errors.CacheFsError, False),
    ],
)
def test_translate(exc, kind, transient):
    uri = parse_uri("s3://bkt/pre", {"endpoint_override": "h:9"})
    out = _translate(exc, uri, "a/b.bin")
    assert type(out) is kind
    assert out.transient is transient
    assert "s3://bkt/pre/a/b.bin" in str(out) and "\n" not in str(out)
