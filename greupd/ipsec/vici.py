"""A VICI session with charon on the daemon's asyncio loop: requests, streamed listings, and events.

The `vici` package (strongSwan's own Python client) encodes and decodes the protocol; its `Session` does
blocking socket reads, which would stall the loop whenever charon is slow, so the frames are read and written
here on an asyncio unix connection instead. The wire format (VICI, strongSwan's `src/libcharon/plugins/vici/
README.md`): a 4-byte big-endian length, then a packet whose first byte is its type.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vici.exception import DeserializationException
from vici.protocol import Message, Packet

# What a decoded VICI message holds: values, lists of values, sections.
ViciReply = dict[str, Any]

log = logging.getLogger("greupd.ipsec")

REQUEST_TIMEOUT = 10.0  # seconds; charon answers in milliseconds, a stuck one must not stall the daemon


class ViciError(Exception):
    """charon could not be reached, refused a command, or sent something we cannot read."""


# How deep sections and lists may nest in a message from charon. Its deepest answer (list-sas: IKE SA, its
# child SAs, one child, its traffic selectors) is about 5 levels; a stream nested hundreds deep would otherwise
# exhaust Python's recursion limit in _text (a RecursionError, not a ViciError, that killed the event reader).
MAX_DEPTH = 64


def _text(value: object, depth: int = 0) -> object:
    """VICI values are bytes; ours are ASCII names, states and numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping | list) and depth > MAX_DEPTH:  # the message itself is depth 0
        raise ViciError(f"unreadable VICI message from charon: sections or lists nested deeper than {MAX_DEPTH}")
    if isinstance(value, Mapping):
        return {str(k): _text(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v, depth + 1) for v in value]
    return value


def _decode(payload: Any) -> ViciReply:
    try:
        decoded = _text(Message.deserialize(payload))
    except (struct.error, DeserializationException, UnicodeDecodeError) as exc:
        raise ViciError(f"unreadable VICI message from charon: {exc}") from None
    if not isinstance(decoded, dict):
        raise ViciError("unreadable VICI message from charon")
    return decoded


class ViciSession:
    """One connection to charon's VICI socket; requests are serialized (VICI answers in order)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), REQUEST_TIMEOUT)
        except PermissionError as exc:
            # charon makes its socket 0770, owned by its own user and group (root:root unless strongswan.conf says
            # `charon { group = ... }`): a daemon running as user greupd must share that group (greupd(8), IPSEC).
            raise ViciError(f"cannot reach charon at {self.path}: {exc.strerror}: give charon a group greupd is in"
                            " (strongswan.conf: charon { group = vici }; greupd: SupplementaryGroups=vici)") from None
        except (OSError, TimeoutError) as exc:
            raise ViciError(f"cannot reach charon at {self.path}: {getattr(exc, 'strerror', None) or exc}") from None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    # --- framing ------------------------------------------------------------------------------------------

    async def _send(self, packet: bytes) -> None:
        if self._writer is None:
            raise ViciError("not connected to charon")
        self._writer.write(struct.pack("!I", len(packet)) + packet)
        await self._writer.drain()

    async def receive(self) -> Any:
        """The next packet from charon (a ParsedPacket or ParsedEventPacket of vici.protocol)."""
        if self._reader is None:
            raise ViciError("not connected to charon")
        try:
            (length,) = struct.unpack("!I", await self._reader.readexactly(4))
            return Packet.parse(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise ViciError(f"charon closed the VICI connection ({exc.__class__.__name__})") from None
        except (struct.error, DeserializationException) as exc:
            self.close()
            raise ViciError(f"unreadable VICI packet from charon: {exc}") from None

    async def _event_registration(self, event: str, register: bool) -> None:
        await self._send(Packet.register_event(event) if register else Packet.unregister_event(event))
        while True:
            reply = await self.receive()
            if reply.response_type == Packet.EVENT:
                continue  # an event of an earlier registration still on its way
            if reply.response_type != Packet.EVENT_CONFIRM:
                raise ViciError(f"charon does not know the event {event!r}")
            return

    # --- commands -----------------------------------------------------------------------------------------

    async def request(self, command: str, message: Mapping[str, object] | None = None) -> ViciReply:
        """One command and its answer; a `success = no` answer raises ViciError with charon's errmsg."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._request(command, message), REQUEST_TIMEOUT)
            except TimeoutError:
                self.close()
                raise ViciError(f"charon did not answer {command} within {REQUEST_TIMEOUT:g} s") from None

    async def _request(self, command: str, message: Mapping[str, object] | None) -> ViciReply:
        body = Message.serialize(message) if message is not None else None
        await self._send(Packet.request(command, body))
        reply = await self.receive()
        return self._result(command, reply)

    async def streamed(self, command: str, event: str, message: Mapping[str, object] | None = None
                       ) -> list[ViciReply]:
        """A command whose results come as events before its answer (list-sas, list-conns, terminate)."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._streamed(command, event, message), REQUEST_TIMEOUT)
            except TimeoutError:
                self.close()
                raise ViciError(f"charon did not answer {command} within {REQUEST_TIMEOUT:g} s") from None

    async def _streamed(self, command: str, event: str, message: Mapping[str, object] | None) -> list[ViciReply]:
        await self._event_registration(event, True)
        body = Message.serialize(message) if message is not None else None
        await self._send(Packet.request(command, body))
        results: list[ViciReply] = []
        while True:
            reply = await self.receive()
            if reply.response_type != Packet.EVENT:
                break
            results.append(_decode(reply.payload))
        self._result(command, reply)
        await self._event_registration(event, False)
        return results

    @staticmethod
    def _result(command: str, reply: Any) -> ViciReply:
        if reply.response_type == Packet.CMD_UNKNOWN:
            raise ViciError(f"charon does not know the command {command!r}")
        if reply.response_type != Packet.CMD_RESPONSE:
            raise ViciError(f"{command}: unexpected VICI packet type {reply.response_type}")
        decoded = _decode(reply.payload)
        if decoded.get("success", "yes") != "yes":
            raise ViciError(f"{command}: {decoded.get('errmsg') or 'charon refused it'}")
        return decoded

    # --- events -------------------------------------------------------------------------------------------

    async def subscribe(self, events: list[str]) -> None:
        """Register for events; read them with `next_event` (on a session used for nothing else)."""
        async with self._lock:
            for event in events:
                await asyncio.wait_for(self._event_registration(event, True), REQUEST_TIMEOUT)

    async def next_event(self) -> tuple[str, ViciReply]:
        """The next event's name and message. An event whose message cannot be read (nested too deep) comes with
        an empty message and a warning: the event itself still tells the supervisor to look again, and a
        ViciError here would end its event reader as if charon had gone away. ViciError: the connection ended."""
        while True:
            packet = await self.receive()
            if packet.response_type == Packet.EVENT:
                name = packet.event_type.decode("utf-8", errors="replace")
                try:
                    return name, _decode(packet.payload)
                except ViciError as exc:
                    log.warning("ipsec: charon's %s event: %s", name, exc)
                    return name, {}
