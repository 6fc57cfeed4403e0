"""The RPC server's resource policies (pure): byte budget, connection table, decoder hooks."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefs import errors
from cachefs.protocol import PREFIX_SIZE, FrameDecoder, encode_frame
from cachefs.rpc_limits import ByteBudget, ConnectionTable, ServerLimits

MiB = 1 << 20


def test_budget_charges_holders_and_refuses_what_does_not_fit():
    budget = ByteBudget(100)
    assert budget.reserve("a", 60) and budget.reserve("b", 40)
    assert not budget.reserve("c", 1)  # full: refused, and nothing charged
    assert budget.used == 100 and budget.held("c") == 0
    budget.release("a", 30)
    assert budget.reserve("c", 30)
    assert budget.release_all("a") == 30 and budget.used == 70
    budget.release("a", 5)  # already gone with its holder: no-op, never negative
    assert budget.used == 70 and budget.held("b") == 40


def test_small_frames_keep_a_reserve_large_ones_cannot_touch():
    budget = ByteBudget(100, small_frame=10, small_reserve=20)
    assert budget.reserve("big", 80)
    assert not budget.reserve("big2", 11)  # large frames stop at limit - reserve
    for i in range(2):
        assert budget.reserve(f"small{i}", 10)  # small ones may use the reserve
    assert not budget.reserve("small", 1)  # but not more than the limit


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 50), st.booleans())))
def test_budget_accounting_never_drifts(ops):
    budget = ByteBudget(120, small_frame=10, small_reserve=30)
    held = {}
    for holder, n, take in ops:
        if take:
            if budget.reserve(holder, n):
                held[holder] = held.get(holder, 0) + n
        else:
            budget.release(holder, n)
            held[holder] = max(0, held.get(holder, 0) - n)
        assert 0 <= budget.used <= 120
        assert budget.used == sum(held.values())
        assert all(budget.held(h) == n for h, n in held.items())


def test_table_admits_until_full_then_evicts_the_longest_idle():
    table = ConnectionTable(3)
    for t, key in enumerate("abc"):
        assert table.admit(key, float(t)).admitted
    table.call_started("a")  # a is busy: not evictable however old
    table.touch("b", 5.0)  # b authenticated late: its idle clock restarts
    admission = table.admit("d", 6.0)
    assert admission.admitted and admission.victim == "c"
    assert "c" not in table and len(table) == 3
    assert table.admit("e", 7.0).victim == "b"


def test_table_refuses_when_every_connection_has_a_call_in_flight():
    table = ConnectionTable(2)
    for key in "ab":
        table.admit(key, 0.0)
        table.call_started(key)
    assert not table.admit("c", 1.0).admitted
    table.call_finished("a", 2.0)
    assert table.idle_since("a") == 2.0 and table.in_flight("a") == 0
    assert table.admit("c", 3.0).victim == "a"


def test_table_idle_clock_counts_calls():
    table = ConnectionTable(4)
    table.admit("a", 0.0)
    table.call_started("a")
    table.call_started("a")
    table.call_finished("a", 1.0)
    assert table.idle_since("a") is None and table.in_flight("a") == 1
    table.call_finished("a", 2.0)
    assert table.idle_since("a") == 2.0
    table.call_finished("a", 3.0)  # spurious: ignored
    table.remove("a")
    table.remove("a")  # idempotent (an evicted connection removes itself again)
    table.call_started("a")  # a removed connection is not resurrected
    assert "a" not in table and len(table) == 0


def test_limits_are_validated():
    assert ServerLimits().large_frame_budget == 112 * MiB
    with pytest.raises(ValueError):
        ServerLimits(max_connections=0)
    with pytest.raises(ValueError):
        ServerLimits(max_buffered=MiB, small_reserve=MiB)
    with pytest.raises(ValueError):
        ServerLimits(idle_timeout=0)


def wire(header, payload=b""):
    return b"".join(bytes(b) for b in encode_frame(header, payload))


def test_decoder_admits_each_frame_once_as_soon_as_its_lengths_arrive():
    seen = []
    decoder = FrameDecoder(admit=seen.append)
    frame = wire({"id": 1}, b"x" * 1000)
    assert list(decoder.feed(frame[:PREFIX_SIZE])) == []
    assert seen == [len(frame)]  # before any of the body
    for i in range(PREFIX_SIZE, len(frame), 100):  # more pieces: not admitted again
        got = list(decoder.feed(frame[i : i + 100]))
    assert got == [({"id": 1}, b"x" * 1000)] and seen == [len(frame)]
    assert decoder.buffered() == 0
    list(decoder.feed(frame + frame[:3]))
    assert seen == [len(frame)] * 2 and decoder.buffered() == 3


def test_decoder_refusal_comes_before_the_body_and_close_frees_the_buffer():
    def refuse(size):
        raise errors.Unavailable(f"no room for {size}")

    decoder = FrameDecoder(admit=refuse)
    with pytest.raises(errors.Unavailable, match="no room"):
        list(decoder.feed(wire({"id": 1}, b"y" * 5000)[:20]))
    assert decoder.head(1) != b""
    decoder.close()
    assert decoder.buffered() == 0 and decoder.head(1) == b""


def test_frames_parsed_without_admit_are_admitted_once_it_is_set():
    # The handshake decoder has no budget; requests pipelined behind it must still be charged.
    seen = []
    decoder = FrameDecoder()
    hello, request = wire({"hello": 1}), wire({"id": 1}, b"z" * 10)
    assert next(decoder.feed(hello + request[:6])) == ({"hello": 1}, b"")
    assert list(decoder.feed(request[6:12])) == []  # its lengths parsed, nobody to admit them
    decoder.admit = seen.append
    assert list(decoder.feed(request[12:])) == [({"id": 1}, b"z" * 10)]
    assert seen == [len(request)]


@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=30),
    large=st.sampled_from([1, 16, 64, 1 << 20]),
)
def test_large_payloads_collected_in_pieces_survive_any_split(payloads, cuts, large):
    frames = [({"id": i, "pad": "h" * i}, p) for i, p in enumerate(payloads)]
    data = b"".join(wire(h, p) for h, p in frames)
    sizes = []
    decoder = FrameDecoder(large=large, admit=sizes.append)
    got, pos = [], 0
    for cut in [*cuts, len(data)]:
        piece = data[pos : pos + cut]
        pos += len(piece)
        # Feed bytes, bytearray or memoryview, as the transports do.
        got.extend(decoder.feed([bytes, bytearray, memoryview][cut % 3](piece)))
        assert decoder.buffered() == pos - sum(len(wire(h, p)) for h, p in got)
    got.extend(decoder.feed(b""))
    assert got == frames
    assert all(type(p) is bytes for _, p in got)
    assert sizes == [len(wire(h, p)) for h, p in frames]
    assert decoder.buffered() == 0 and decoder.wanted() == 0


def test_wanted_counts_down_while_a_large_payload_is_collected():
    frame = wire({"id": 1}, b"q" * 1000)
    decoder = FrameDecoder(large=100)
    assert list(decoder.feed(frame[:300])) == []
    assert decoder.wanted() == len(frame) - 300 and decoder.buffered() == 300
    assert list(decoder.feed(frame[300:900])) == []
    assert decoder.wanted() == len(frame) - 900
    decoder.close()  # frees the collected pieces too
    assert decoder.buffered() == 0 and decoder.wanted() == 0


def test_idle_for_lists_the_expired_oldest_first():
    table = ConnectionTable(10)
    for t, key in enumerate("abcd"):
        table.admit(key, float(t))
    table.call_started("b")  # busy: never idle-expired
    assert table.idle_for(2.0, now=4.0) == ["a", "c"]
    assert table.idle_for(10.0, now=3.5) == []
    assert sorted(table) == ["a", "b", "c", "d"]
    for key in table:  # iteration is over a copy: closing while visiting is fine
        table.remove(key)
    assert len(table) == 0
