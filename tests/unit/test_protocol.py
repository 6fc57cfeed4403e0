"""Frame encoding/decoding and handshake message helpers (pure, no I/O)."""

import errno
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefs import errors, protocol
from cachefs.protocol import FrameDecoder, encode_frame


def wire(header, payload=b""):
    return b"".join(bytes(b) for b in encode_frame(header, payload))


def decode_all(data, **kw):
    return list(FrameDecoder(**kw).feed(data))


def test_round_trip_without_payload():
    header = {"id": 7, "m": "lookup", "a": {"path": "a/b", "n": [1, 2.5, None, True]}, "t": 1.5}
    assert decode_all(wire(header)) == [(header, b"")]


def test_round_trip_with_payload_and_bytes_in_header():
    header = {"id": 1, "r": {"blob": b"\x00\xff", "name": "ü"}}
    payload = bytes(range(256)) * 1000  # above COPY_LIMIT: sent as a separate buffer
    bufs = encode_frame(header, payload)
    assert len(bufs) == 2 and bufs[1] is payload  # not copied
    assert decode_all(b"".join(bufs)) == [(header, payload)]


def test_small_payload_is_joined_into_one_buffer():
    assert len(encode_frame({"id": 1}, b"abc")) == 1


def test_memoryview_payload_of_any_format():
    import array

    arr = array.array("I", range(10))
    frames = decode_all(b"".join(encode_frame({"id": 2}, memoryview(arr))))
    assert frames == [({"id": 2}, arr.tobytes())]


def test_int_map_keys_survive():
    assert decode_all(wire({"id": 1, "r": {5: "a", 6: "b"}})) == [
        ({"id": 1, "r": {5: "a", 6: "b"}}, b"")
    ]


def test_many_frames_in_one_feed_and_lazy_parsing():
    data = b"".join(wire({"id": i}, b"x" * i) for i in range(50))
    dec = FrameDecoder()
    it = dec.feed(data)
    assert next(it) == ({"id": 0}, b"")
    # Leaving the rest unconsumed keeps it buffered for the next feed.
    rest = list(dec.feed(b""))
    assert [h["id"] for h, _ in rest] == list(range(1, 50))
    assert all(p == b"x" * h["id"] for h, p in rest)
    assert dec.wanted() == 0


def test_wanted_reports_missing_bytes():
    data = wire({"id": 1}, b"y" * 1000)
    dec = FrameDecoder()
    assert list(dec.feed(data[:20])) == []
    assert dec.wanted() == len(data) - 20
    assert list(dec.feed(data[20:])) == [({"id": 1}, b"y" * 1000)]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
headers = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
frames = st.lists(st.tuples(headers, st.binary(max_size=3000)), min_size=1, max_size=6)


@given(frames, st.lists(st.integers(min_value=0), max_size=10))
def test_any_frames_survive_any_split(frame_list, cuts):
    data = b"".join(wire(h, p) for h, p in frame_list)
    points = sorted({c % (len(data) + 1) for c in cuts})
    dec = FrameDecoder()
    got = []
    prev = 0
    for point in [*points, len(data)]:
        got.extend(dec.feed(data[prev:point]))
        prev = point
    assert got == [(h, p) for h, p in frame_list]


def test_oversize_length_rejected_from_the_prefix_alone():
    dec = FrameDecoder(max_frame=1000)
    # Only the 8-byte prefix: the decoder must not wait for (or buffer) the huge body.
    with pytest.raises(errors.ProtocolError, match="bad frame size"):
        list(dec.feed(struct.pack(">II", 10, 5000)))
    with pytest.raises(errors.ProtocolError):
        list(FrameDecoder().feed(struct.pack(">II", protocol.MAX_HEADER + 1, 0)))
    with pytest.raises(errors.ProtocolError):
        list(FrameDecoder().feed(struct.pack(">II", 0, 0)))


def test_frames_before_a_bad_one_are_still_delivered():
    data = wire({"id": 1}) + struct.pack(">II", 2**31, 2**31)
    it = FrameDecoder().feed(data)
    assert next(it) == ({"id": 1}, b"")
    with pytest.raises(errors.ProtocolError):
        next(it)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1\xc1\xc1",  # reserved msgpack byte
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb("hello"),
        msgpack.packb({"a": 1}) + b"\x01",  # trailing junk inside the header
        b"\x85",  # truncated map
        msgpack.packb({"a": b"x" * 10})[:-3],  # truncated bin
        msgpack.packb({(1, 2): 3}),  # array key: unhashable once decoded as a list
    ],
)
def test_garbage_header_rejected(body):
    data = struct.pack(">II", len(body), 0) + body
    with pytest.raises(errors.ProtocolError):
        list(FrameDecoder().feed(data))


def test_random_bytes_rejected_not_crashing():
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(errors.ProtocolError):
        list(FrameDecoder().feed(data))


def test_encode_rejects_unencodable_and_oversize():
    with pytest.raises(errors.ProtocolError, match="cannot encode"):
        encode_frame({"x": object()})
    with pytest.raises(errors.ProtocolError, match="too large"):
        encode_frame({"id": 1}, b"x" * 2000, max_frame=1000)
    with pytest.raises(errors.ProtocolError, match="too large"):
        encode_frame({"x": "y" * 5000}, max_header=1000)


def test_error_messages_round_trip():
    e = errors.NotFound("no such file: a/b")
    msg = protocol.error_message(e, 3)
    assert msg == {"id": 3, "e": ["NotFound", "no such file: a/b", errno.ENOENT]}
    back = protocol.error_from_message(msg)
    assert type(back) is errors.NotFound and back.message == "no such file: a/b"
    assert back.errno == errno.ENOENT
    assert "id" not in protocol.error_message(errors.ProtocolError("bad"))
    assert type(protocol.error_from_message({"e": "junk"})) is errors.ProtocolError
    assert type(protocol.error_from_message({"e": ["Nope", "m", 5]})) is errors.CacheFsError


def test_handshake_without_secret():
    protocol.check_hello(protocol.hello_message())
    nonce = protocol.new_nonce(None)
    assert nonce is None
    assert protocol.check_challenge(protocol.challenge_message(nonce)) is None


def test_handshake_with_secret():
    secret = b"s3cret"
    nonce = protocol.new_nonce(secret)
    assert protocol.check_challenge(protocol.challenge_message(nonce)) == nonce
    protocol.check_auth(secret, nonce, protocol.auth_message(secret, nonce))
    with pytest.raises(errors.AuthenticationFailed):
        protocol.check_auth(secret, nonce, protocol.auth_message(b"wrong", nonce))
    with pytest.raises(errors.AuthenticationFailed):
        protocol.check_auth(secret, nonce, {"auth": "not bytes"})
    with pytest.raises(errors.AuthenticationFailed):
        protocol.check_auth(secret, nonce, {})
    # A proof is bound to its nonce.
    other = protocol.new_nonce(secret)
    with pytest.raises(errors.AuthenticationFailed):
        protocol.check_auth(secret, other, protocol.auth_message(secret, nonce))
    protocol.check_auth_reply({"ok": True})
    with pytest.raises(errors.AuthenticationFailed):
        protocol.check_auth_reply(protocol.error_message(errors.AuthenticationFailed("no")))


def test_handshake_rejects_bad_hello_and_versions():
    with pytest.raises(errors.ProtocolError, match="not a cachefs client"):
        protocol.check_hello({"hello": "http"})
    with pytest.raises(errors.ProtocolError, match="version mismatch"):
        protocol.check_hello({"hello": "cachefs", "v": protocol.PROTOCOL_VERSION + 1})
    with pytest.raises(errors.ProtocolError, match="version mismatch"):
        protocol.check_challenge({"v": 999, "nonce": None})
    with pytest.raises(errors.ProtocolError, match="version mismatch"):
        protocol.check_challenge(protocol.error_message(errors.ProtocolError("version mismatch")))
    with pytest.raises(errors.ProtocolError, match="nonce"):
        protocol.check_challenge({"v": protocol.PROTOCOL_VERSION, "nonce": b"short"})


def test_huge_error_message_is_truncated_to_fit():
    msg = protocol.error_message(errors.NotFound("x" * (2 * protocol.MAX_HEADER)), 1)
    assert len(msg["e"][1]) == protocol.MAX_ERROR_MESSAGE
    encode_frame(msg)
