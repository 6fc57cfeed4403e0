"""The error hierarchy shared by every cachefs component.

Each error carries the errno that the FUSE layer returns for it, and travels over RPC by its
class name, so a `NotFound` raised by the master is a `NotFound` in the client too.
"""

from __future__ import annotations

import errno as _errno


class CacheFsError(Exception):
    """Base of all expected failures; `errno` is what a POSIX caller sees."""

    errno: int = _errno.EIO
    #: True when retrying the same call later may succeed (network blips, throttling).
    transient: bool = False

    def __init__(self, message: str = "", *, errno: int | None = None):
        super().__init__(message or self.__class__.__name__)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class NotFound(CacheFsError):
    errno = _errno.ENOENT


class AlreadyExists(CacheFsError):
    errno = _errno.EEXIST


class InvalidArgument(CacheFsError):
    """Bad input from a user or a peer: a malformed URI, option, path or request."""

    errno = _errno.EINVAL


class NotADirectory(CacheFsError):
    errno = _errno.ENOTDIR


class IsADirectory(CacheFsError):
    errno = _errno.EISDIR


class NoAttribute(CacheFsError):
    """No such extended attribute (ENODATA, which is ENOATTR on Linux)."""

    errno = _errno.ENODATA


class ReadOnly(CacheFsError):
    errno = _errno.EROFS


class PermissionDenied(CacheFsError):
    errno = _errno.EACCES


class AuthenticationFailed(PermissionDenied):
    """The peer did not prove knowledge of the shared secret."""


class NoSpace(CacheFsError):
    errno = _errno.ENOSPC


class Unavailable(CacheFsError):
    """A peer or the remote store could not be reached or answered with a transient failure."""

    errno = _errno.EIO
    transient = True


class TimedOut(Unavailable):
    errno = _errno.ETIMEDOUT


class StaleVersion(CacheFsError):
    """The remote file is no longer the version the namespace snapshot recorded."""

    errno = _errno.ESTALE


class ProtocolError(CacheFsError):
    """A peer sent something that is not valid cachefs protocol."""

    errno = _errno.EPROTO


class CorruptData(CacheFsError):
    """Cached bytes failed their checksum."""

    errno = _errno.EIO


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_from_wire(kind: str, message: str, errno: int | None = None) -> CacheFsError:
    """Rebuild an error that a peer reported by class name (unknown names become the base)."""
    by_name = {cls.__name__: cls for cls in _all_subclasses(CacheFsError)}
    cls = by_name.get(kind, CacheFsError)
    return cls(message, errno=errno)
