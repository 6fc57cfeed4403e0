"""Dataset URIs: which remote store and root a dataset names, and the options each scheme takes.

Kept apart from cachefs.ufs (the store itself) so that parsing needs no store client.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from cachefs import errors

SCHEMES = ("file", "s3", "hdfs", "webhdfs")
_FORMS = (
    "file:///abs/dir, s3://bucket/prefix, hdfs://namenode:8020/path, hdfs://nameservice/path, "
    "webhdfs://host:9870/path"
)

# Options each scheme accepts (URI query or `-o KEY=VALUE`), with their value types.
_OPTIONS: dict[str, dict[str, type]] = {
    "file": {},
    "s3": {
        **dict.fromkeys(
            ("endpoint_override", "scheme", "region", "access_key", "secret_key")
            + ("session_token", "role_arn", "session_name", "external_id")
            + ("proxy_options", "tls_ca_file_path"),
            str,
        ),
        **dict.fromkeys(("anonymous", "force_virtual_addressing"), bool),
        **dict.fromkeys(("connect_timeout", "request_timeout"), float),
    },
    # client: native (hdfs-native, the default) or libhdfs (pyarrow's, needs a JVM); user,
    # kerb_ticket and buffer_size are libhdfs's; dfs.*, fs.* and hadoop.* keys are Hadoop
    # client settings (hdfs-site.xml names) for the native client.
    "hdfs": {"client": str, "user": str, "kerb_ticket": str, "buffer_size": int},
    "webhdfs": {
        **dict.fromkeys(("user", "password", "token"), str),
        **dict.fromkeys(("kerberos", "use_https", "session_verify"), bool),
    },
}
HADOOP_PREFIXES = ("dfs.", "fs.", "hadoop.")
_URI_SAFE = "/:@!$&'()*+,;=-._~"  # characters that stay literal in a normalised URI
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    path: str  # relative POSIX path below the dataset root, never "" in listings
    is_dir: bool
    size: int  # 0 for directories
    mtime_ns: int  # 0 if unknown
    etag: str | None = None
    # Permission bits and numeric owner of a file:// entry (of a link's target); None elsewhere.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class DatasetUri:
    scheme: str
    host: str  # S3 bucket or namenode; "" for file:// (and for hdfs:// = fs.defaultFS)
    port: int | None
    path: str  # absolute dir for file/hdfs/webhdfs; key prefix without edge slashes for s3
    options: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> str:
        """The dataset root as a path for the pyarrow filesystem."""
        if self.scheme == "s3":
            return f"{self.host}/{self.path}" if self.path else self.host
        return self.path

    def display(self, rel: str = "") -> str:
        """A readable URI of `rel` below the root, for messages (never shows options)."""
        if self.scheme == "s3":
            key = "/".join(p for p in (self.path, rel) if p)
            return f"s3://{self.host}/{key}" if key else f"s3://{self.host}"
        netloc = f"{self.host}:{self.port}" if self.host and self.port else self.host
        return f"{self.scheme}://{netloc}{posixpath.join(self.path, rel) if rel else self.path}"

    @property
    def uri(self) -> str:
        """The normalised URI: it parses back to the same root (options are kept apart)."""
        scheme, rest = self.display().split("://", 1)
        return f"{scheme}://{quote(rest, safe=_URI_SAFE)}"


def _invalid(uri: str, why: str) -> errors.InvalidArgument:
    shown = uri.split("?", 1)[0]  # the query may carry secret_key: never echo it
    return errors.InvalidArgument(f"invalid dataset URI {shown!r}: {why} (supported: {_FORMS})")


def _clean_parts(path: str) -> list[str] | None:
    """Path components without "" and "."; None if there is a ".." (we never climb out)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if ".." in parts else parts


def _typed_options(scheme: str, options: dict[str, str]) -> dict[str, Any]:
    """Options converted to the types pyarrow/fsspec expect; ValueError names the bad one."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        kind = str if _hadoop_key(scheme, key) else _OPTIONS[scheme][key]
        try:
            out[key] = _BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise ValueError(f"option {key}={value!r} is not a valid {kind.__name__}") from None
    if out.get("scheme", "https") not in ("http", "https"):
        raise ValueError(f"option scheme={out['scheme']!r} must be http or https")
    if out.get("client", "native") not in ("native", "libhdfs"):
        raise ValueError(f"option client={out['client']!r} must be native or libhdfs")
    return out


def _hadoop_key(scheme: str, key: str) -> bool:
    """A Hadoop client setting passed through to hdfs-native (dfs.client.socket-timeout...)."""
    return scheme == "hdfs" and key.startswith(HADOOP_PREFIXES) and len(key) < 200


def parse_uri(uri: str, options: dict[str, str] | None = None) -> DatasetUri:
    """Validate a dataset URI; query parameters merge with `options` (options win)."""
    try:
        parts = urlsplit(uri.strip())
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
        port = parts.port
    except (AttributeError, ValueError) as exc:
        raise _invalid(str(uri), f"malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _invalid(uri, f"unsupported scheme {scheme + '://' if scheme else '(none)'}")
    if parts.fragment:
        raise _invalid(uri, "a '#fragment' is not allowed")
    merged = {**query, **(options or {})}
    unknown = sorted(k for k in set(merged) - set(_OPTIONS[scheme]) if not _hadoop_key(scheme, k))
    if unknown:
        known = ", ".join(sorted(_OPTIONS[scheme])) or "none"
        raise _invalid(uri, f"unknown option(s) {', '.join(unknown)} for {scheme}:// ({known})")
    try:
        _typed_options(scheme, merged)
    except ValueError as exc:
        raise _invalid(uri, str(exc)) from None
    clean = _clean_parts(unquote(parts.path))
    if clean is None:
        raise _invalid(uri, "'..' is not allowed in the path")
    host = parts.netloc
    if scheme == "file":
        if host not in ("", "localhost") or not parts.path.startswith("/"):
            raise _invalid(uri, "file:// needs an absolute path, e.g. file:///data/set")
        return DatasetUri("file", "", None, "/" + "/".join(clean), merged)
    if scheme == "s3":
        # Credentials go in options or the AWS env vars, never in the URI authority.
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,62}", host):
            raise _invalid(uri, f"{host!r} is not a valid S3 bucket name")
        return DatasetUri("s3", host, None, "/".join(clean), merged)
    if "@" in host:
        raise _invalid(uri, "put the user in options (user=...), not in the URI")
    hostname = parts.hostname or ""
    if scheme == "hdfs" and hostname:  # a name service's case counts: dfs.ha.namenodes.MyNS
        start = host.lower().find(hostname)
        hostname = host[start : start + len(hostname)]
    if scheme == "webhdfs" and not hostname:
        raise _invalid(uri, "webhdfs:// needs a host, e.g. webhdfs://namenode:9870/path")
    # hdfs://NAME without a port may be a name service (HA NameNodes from dfs.* options or
    # HADOOP_CONF_DIR): it keeps no port, and the client falls back to 8020 for a plain host.
    default_port = 9870 if scheme == "webhdfs" else None
    return DatasetUri(scheme, hostname, port or default_port, "/" + "/".join(clean), merged)
