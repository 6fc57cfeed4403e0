"""cachefs.jail on a real temp tree: nothing resolves out of the root, links inside still work.

Every case runs twice: with openat2 (this kernel has it) and with the ENOSYS fallback.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from cachefs import jail


@pytest.fixture(params=["openat2", "fallback"])
def mode(request, monkeypatch):
    if request.param == "fallback":

        def no_openat2(*_args):
            raise OSError(errno.ENOSYS, "no openat2")

        monkeypatch.setattr(jail, "_openat2", no_openat2)
        monkeypatch.setattr(jail, "_have_openat2", True)  # the first ENOSYS must switch over
    return request.param


@pytest.fixture
def tree(tmp_path):
    """root/ with files, links in and out, a FIFO; `outside` files next to it."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"inside")
    (root / "sub" / "b.txt").write_bytes(b"below")
    (tmp_path / "outside").write_bytes(b"SECRET")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "file").write_bytes(b"SECRET2")
    links = {
        "abs_out": "/etc/passwd",
        "rel_out": "../outside",
        "dir_out": "../outdir",
        "rel_in": "a.txt",
        "abs_in": str(root / "a.txt"),
        "broken": "missing",
        "loop": "loop",
        "sub/up_in": "../a.txt",
        "sub/deep_out": "../../outside",
        "dir_in": "sub",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    os.mkfifo(root / "fifo")
    return root


def read_beneath(root, rel) -> bytes:
    root_fd = jail.open_root(str(root))
    try:
        fd, _ = jail.open_regular(root_fd, rel)
    finally:
        os.close(root_fd)
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "rel",
    ["abs_out", "rel_out", "dir_out/file", "sub/deep_out", "../outside", "sub/../../outside",
     "/etc/passwd", "loop"],
)  # fmt: skip
def test_escapes_are_missing_files(tree, mode, rel):
    assert jail.stat_beneath(str(tree), rel) is None
    with pytest.raises(FileNotFoundError) as info:
        read_beneath(tree, rel)
    assert isinstance(info.value, jail.Escape)


@pytest.mark.parametrize(
    ("rel", "data"),
    [("a.txt", b"inside"), ("rel_in", b"inside"), ("sub/up_in", b"inside"),
     ("dir_in/b.txt", b"below"), ("sub/../a.txt", b"inside")],
)  # fmt: skip
def test_links_and_dotdot_that_stay_inside_work(tree, mode, rel, data):
    st = jail.stat_beneath(str(tree), rel)
    assert st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data)
    assert read_beneath(tree, rel) == data


def test_absolute_link_into_the_root_is_refused_by_openat2(tree, mode):
    # RESOLVE_BENEATH rejects every absolute link; the fallback only checks where it lands.
    if mode == "openat2":
        assert jail.stat_beneath(str(tree), "abs_in") is None
    else:
        assert read_beneath(tree, "abs_in") == b"inside"


def test_missing_and_broken_are_none_and_enoent(tree, mode):
    for rel in ("nope", "broken", "sub/nope", "a.txt/x"):
        assert jail.stat_beneath(str(tree), rel) is None
    with pytest.raises(FileNotFoundError) as info:
        read_beneath(tree, "broken")
    assert not isinstance(info.value, jail.Escape)


def test_root_itself_and_directories(tree, mode):
    st = jail.stat_beneath(str(tree), "")
    assert st is not None and stat.S_ISDIR(st.st_mode)
    with pytest.raises(IsADirectoryError):
        read_beneath(tree, "sub")
    root_fd = jail.open_root(str(tree))
    try:
        fd = jail.open_beneath(root_fd, "sub", os.O_RDONLY | os.O_DIRECTORY)
        assert sorted(os.listdir(fd)) == ["b.txt", "deep_out", "up_in"]
        os.close(fd)
        with pytest.raises(jail.Escape):  # a dir link out, opened as a directory
            jail.open_beneath(root_fd, "dir_out", os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(root_fd)


def test_fifo_is_never_opened_for_reading(tree, mode):
    # stat works (O_PATH never blocks); opening it to read would block without a writer.
    st = jail.stat_beneath(str(tree), "fifo")
    assert st is not None and stat.S_ISFIFO(st.st_mode)
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        read_beneath(tree, "fifo")


def test_fallback_switches_only_on_enosys(tree, monkeypatch):
    def denied(*_args):
        raise OSError(errno.EPERM, "denied by policy")

    monkeypatch.setattr(jail, "_openat2", denied)
    monkeypatch.setattr(jail, "_have_openat2", True)
    with pytest.raises(PermissionError):
        read_beneath(tree, "a.txt")
    assert jail._have_openat2  # a denial is not a missing syscall: no weaker fallback
