"""parse_uri: accepted forms, normalisation, option handling and one-line rejections."""

from __future__ import annotations

import pytest

from cachefs.errors import InvalidArgument
from cachefs.ufs import DatasetUri, parse_uri


@pytest.mark.parametrize(
    ("uri", "expected", "normalised"),
    [
        ("file:///data/set", DatasetUri("file", "", None, "/data/set"), "file:///data/set"),
        ("file:///data//set/./", DatasetUri("file", "", None, "/data/set"), "file:///data/set"),
        ("file:/data", DatasetUri("file", "", None, "/data"), "file:///data"),
        ("file://localhost/data", DatasetUri("file", "", None, "/data"), "file:///data"),
        ("file:///", DatasetUri("file", "", None, "/"), "file:///"),
        ("FILE:///x", DatasetUri("file", "", None, "/x"), "file:///x"),
        ("s3://bucket", DatasetUri("s3", "bucket", None, ""), "s3://bucket"),
        ("s3://bucket/", DatasetUri("s3", "bucket", None, ""), "s3://bucket"),
        (
            "s3://my.bucket-1/a/b/",
            DatasetUri("s3", "my.bucket-1", None, "a/b"),
            "s3://my.bucket-1/a/b",
        ),
        ("hdfs://nn:8020/p", DatasetUri("hdfs", "nn", 8020, "/p"), "hdfs://nn:8020/p"),
        ("hdfs://nn/p", DatasetUri("hdfs", "nn", None, "/p"), "hdfs://nn/p"),  # or a name service
        ("hdfs:///p", DatasetUri("hdfs", "", None, "/p"), "hdfs:///p"),
        # a name service's case is kept: Hadoop's keys (dfs.ha.namenodes.MyNS) are case-sensitive
        ("hdfs://MyNS/p", DatasetUri("hdfs", "MyNS", None, "/p"), "hdfs://MyNS/p"),
        ("hdfs://NN.Ex:8020/p", DatasetUri("hdfs", "NN.Ex", 8020, "/p"), "hdfs://NN.Ex:8020/p"),
        ("webhdfs://nn/p", DatasetUri("webhdfs", "nn", 9870, "/p"), "webhdfs://nn:9870/p"),
        ("webhdfs://nn:50070", DatasetUri("webhdfs", "nn", 50070, "/"), "webhdfs://nn:50070/"),
    ],
)
def test_valid_uris_normalise(uri, expected, normalised):
    parsed = parse_uri(uri)
    assert parsed == expected
    assert parsed.uri == normalised
    assert parse_uri(parsed.uri) == parsed


def test_special_characters_round_trip():
    parsed = parse_uri("file:///data/my%20set/100%25")
    assert parsed.path == "/data/my set/100%"
    assert parse_uri(parsed.uri) == parsed
    assert parsed.display("a b") == "file:///data/my set/100%/a b"


def test_query_options_merge_and_explicit_options_win():
    parsed = parse_uri(
        "s3://bkt/p?endpoint_override=127.0.0.1:9000&scheme=http",
        {"scheme": "https", "region": "eu-west-1"},
    )
    assert parsed.options == {
        "endpoint_override": "127.0.0.1:9000",
        "scheme": "https",
        "region": "eu-west-1",
    }
    assert parsed.uri == "s3://bkt/p"  # options never appear in the URI
    assert parsed.root == "bkt/p"


@pytest.mark.parametrize(
    ("uri", "options", "fragment"),
    [
        ("ftp://host/path", None, "unsupported scheme ftp://"),
        ("/abs/path", None, "unsupported scheme (none)"),
        ("data/set", None, "unsupported scheme (none)"),
        ("", None, "unsupported scheme"),
        ("file://relative/dir", None, "absolute path"),
        ("file:relative", None, "absolute path"),
        ("file:///a/../b", None, "'..'"),
        ("s3://", None, "not a valid S3 bucket name"),
        ("s3://UPPER/x", None, "not a valid S3 bucket name"),
        ("s3://key:secret@bucket/x", None, "not a valid S3 bucket name"),
        ("s3://b/x/../../y", None, "'..'"),
        ("s3://b/x#frag", None, "fragment"),
        ("s3://b/x?nonsense=1", None, "unknown option(s) nonsense"),
        ("s3://b/x", {"anonymous": "maybe"}, "anonymous='maybe' is not a valid bool"),
        ("s3://b/x", {"connect_timeout": "soon"}, "connect_timeout='soon' is not a valid float"),
        ("s3://b/x", {"scheme": "ftp"}, "must be http or https"),
        ("s3://b/x?a=1&&", None, "malformed"),
        ("file:///x", {"region": "x"}, "unknown option(s) region for file:// (none)"),
        ("hdfs://nn:abc/x", None, "malformed"),
        ("hdfs://me@nn/x", None, "user"),
        ("webhdfs:///x", None, "needs a host"),
    ],
)
def test_invalid_uris_get_one_line_errors(uri, options, fragment):
    with pytest.raises(InvalidArgument) as info:
        parse_uri(uri, options)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert repr(uri.split("?")[0]) in message  # names the URI ...
    assert "s3://bucket/prefix" in message  # ... and the supported forms


def test_error_never_echoes_query_secrets():
    with pytest.raises(InvalidArgument) as info:
        parse_uri("s3://b/x?secret_key=hunter2&bogus=1")
    assert "hunter2" not in str(info.value)
    assert "bogus" in str(info.value)


def test_bool_options_accept_common_spellings():
    for value in ("true", "1", "YES", "false", "0", "no"):
        assert parse_uri("s3://bkt", {"anonymous": value}).options["anonymous"] == value
