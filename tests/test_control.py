"""The intravisor's end of a control channel, over a real socket pair and over a stream pair."""
from __future__ import annotations

import asyncio
import socket

import pytest

from capfaas.core import wire
from capfaas.core.control import (MAX_QUEUED, ChannelClosed, ControlChannel, ProtocolViolation,
                                  StreamControlChannel)


async def _native() -> tuple[ControlChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    channel = ControlChannel(1 << 20)
    await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=ours)
    theirs.setblocking(False)
    return channel, theirs


async def _over_streams() -> tuple[ControlChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    theirs.setblocking(False)
    return StreamControlChannel(reader, writer, 1 << 20), theirs


KINDS = [pytest.param(_native, id="native"), pytest.param(_over_streams, id="streams")]


async def _next(channel: ControlChannel) -> dict:
    message = channel.next_message()
    return message if message is not None else await asyncio.wait_for(channel.wait(), 5)


@pytest.mark.parametrize("make", KINDS)
async def test_messages_arrive_whole_in_order_however_the_bytes_are_cut(make) -> None:
    channel, peer = await make()
    data = b"".join(wire.pack({"op": "result", "n": n, "body": b"x" * n}) for n in range(0, 3000, 300))
    for start in range(0, len(data), 7):  # 7-byte pieces, each its own write
        peer.send(data[start:start + 7])
        await asyncio.sleep(0)
    assert [(await _next(channel))["n"] for _ in range(10)] == list(range(0, 3000, 300))
    peer.sendall(wire.pack({"op": "result", "n": "last"}))
    assert (await _next(channel))["n"] == "last"
    channel.close()
    peer.close()


async def test_whole_messages_and_pieces_mixed_in_reads_decode_in_order() -> None:
    """A read holding one whole message is decoded at once; anything else goes through the
    streaming decoder, and a whole message after it is whole again."""
    channel, peer = await _native()
    a, b, c, d = (wire.pack({"op": "result", "n": n, "body": b"y" * 50}) for n in "abcd")
    for read in (a, b + c[:20], c[20:], d, a + b, c[:1], c[1:] + d[:-1], d[-1:], b):
        channel.feed(read)
    got = []
    while (message := channel.next_message()) is not None:
        got.append(message["n"])
    assert got == list("abcdabcdb")
    channel.feed(b"\xc1")  # never a valid msgpack byte
    with pytest.raises(ProtocolViolation):
        channel.next_message()
    channel.close()
    peer.close()


@pytest.mark.parametrize("make", KINDS)
async def test_the_end_comes_after_the_messages_sent_before_it(make) -> None:
    channel, peer = await make()
    peer.sendall(wire.pack({"op": "a"}) + wire.pack({"op": "b"}))
    peer.close()
    assert (await _next(channel))["op"] == "a"
    assert (await _next(channel))["op"] == "b"
    with pytest.raises(ChannelClosed):
        await _next(channel)
    assert channel.ended
    channel.close()


@pytest.mark.parametrize("make", KINDS)
@pytest.mark.parametrize("bad", [b"\x93\x01\x02\x03", b"\xc1"], ids=["not-a-map", "malformed"])
async def test_a_message_that_breaks_the_protocol_ends_the_channel(make, bad: bytes) -> None:
    channel, peer = await make()
    peer.sendall(wire.pack({"op": "fine"}) + bad + wire.pack({"op": "never"}))
    assert (await _next(channel))["op"] == "fine"
    with pytest.raises(ProtocolViolation):
        await _next(channel)
    channel.close()
    peer.close()


@pytest.mark.parametrize("make", KINDS)
async def test_a_waiter_is_woken_by_the_next_message_or_the_end(make) -> None:
    channel, peer = await make()
    waiting = channel.wait()
    peer.sendall(wire.pack({"op": "late"}))
    assert (await asyncio.wait_for(waiting, 5))["op"] == "late"
    waiting = channel.wait()
    peer.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 5)
    channel.close()


@pytest.mark.parametrize("make", KINDS)
async def test_a_cvm_flooding_its_channel_is_not_buffered_without_bound(make) -> None:
    channel, peer = await make()
    message = wire.pack({"op": "spam", "pad": b"p" * 100})
    sent = 0
    for _ in range(200):  # far more than anyone asked for
        for _ in range(50):
            try:
                peer.send(message)
                sent += 1
            except BlockingIOError:
                break
        await asyncio.sleep(0.01)
    assert sent > 2 * MAX_QUEUED
    queued = len(channel._messages)  # noqa: SLF001 -- what the intravisor holds for nobody
    assert MAX_QUEUED < queued <= MAX_QUEUED + 1 + 64 * 1024 // len(message)  # at most one more read's worth
    received = 0
    while received < sent:  # taking them lets the rest in, all of them, in order
        got = await _next(channel)
        assert got["op"] == "spam"
        received += 1
    assert channel.next_message() is None
    channel.close()
    peer.close()


@pytest.mark.parametrize("make", KINDS)
async def test_messages_held_from_a_flood_are_still_taken_after_the_cvm_is_gone(make) -> None:
    channel, peer = await make()
    message = wire.pack({"op": "spam"})
    peer.sendall(message * (MAX_QUEUED + 10))
    for _ in range(50):
        if len(channel._messages) > MAX_QUEUED:  # noqa: SLF001 -- paused by now
            break
        await asyncio.sleep(0.01)
    peer.close()
    channel.close()
    taken = 0
    with pytest.raises(ChannelClosed):
        while True:
            await _next(channel)
            taken += 1
    assert taken > MAX_QUEUED
