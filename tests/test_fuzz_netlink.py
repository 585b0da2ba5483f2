"""Netlink framing against arbitrary bytes: a datagram the kernel sends is split into messages and attributes
without ever reading past its end, looping, or raising, however its length fields lie (issue #11's "netlink
inputs fuzzed"; the kernel's own messages are exercised on real kernels by the reconciler tests)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from greupd.netlink import nlmsg, rtnl

# Mostly well-formed headers with lying lengths, and plain noise.
header = st.builds(nlmsg.HEADER.pack, st.integers(0, 0xFFFFFFFF) | st.integers(0, 64), st.integers(0, 0xFFFF),
                   st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
datagram = st.lists(st.one_of(header, st.binary(max_size=64)), max_size=12).map(b"".join)


@given(datagram)
def test_messages_stay_inside_the_datagram(data: bytes) -> None:
    offset = 0
    for message in nlmsg.messages(data):
        start = data.index(message.raw, offset) if message.raw else offset
        assert start % 4 == 0 and start + len(message.raw) <= len(data)
        assert len(message.raw) >= nlmsg.HEADER.size and message.body == message.raw[nlmsg.HEADER.size:]
        offset = start + nlmsg.aligned(len(message.raw))
        # What the event watch does with each one before any decoding: a yes or no, never an exception.
        assert rtnl.may_concern_us(message.kind, message.raw, 222) in (True, False)


@given(st.binary(max_size=512), st.integers(0, 600))
def test_attributes_stay_inside_the_payload(data: bytes, offset: int) -> None:
    total = 0
    for kind, payload in nlmsg.attributes(data, offset):
        assert 0 <= kind <= nlmsg.ATTR_TYPE_MASK
        total += len(payload)
    assert total <= len(data)


@given(st.binary(max_size=256))
def test_an_error_message_text_is_read_or_empty(body: bytes) -> None:
    padded = body if len(body) >= 4 else body + bytes(4 - len(body))
    assert isinstance(nlmsg.ext_ack_message(padded), str)
    assert isinstance(nlmsg.error_code(padded), int)
