"""Keeps charon holding exactly greupd's connections, and tells the daemon each tunnel's IPsec state.

Level-triggered like the rest of greupd: a VICI event (ike-updown, child-updown), a reload, a lost connection
to charon or the poll timer only say "look again"; each pass lists charon's connections and SAs and fixes the
difference. So a connection unloaded by hand (`swanctl --load-conns` drops every connection its file lacks) is
put back within one poll, and a charon that restarted gets everything loaded again as soon as its socket
answers. Only connections named `greupd-*` are ever loaded, unloaded or terminated.

Lifetime: created inside the daemon's running loop, it starts at once (its first pass loads the connections
while the daemon builds its links; with `require = true` greupd's IPsec drops hold GRE back meanwhile).
When the loop ends, its task is cancelled; with `on_exit = "remove"` it first unloads every greupd connection.

The kernel's side (issue #21, I2): charon believes the SAs and policies it installed are there; an
`ip xfrm state flush` does not tell it. xfrm.py's watch hears every deletion; the next pass first looks each
connection up in the kernel (lost.py; after a deletion twice), and one whose policies or SAs are gone has its
IKE_SA terminated, is loaded again (the trap comes back) and initiated: eight VICI round trips after the flush.

Secrets: a PSK is read from its file when it is loaded, sent to charon, and kept nowhere but as a hash (to
see the file change); it is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from greupd.config import Config
from greupd.ipsec.connections import CHILD_NAME, IpsecConnection, desired_connections, tunnel_of
from greupd.ipsec.lost import expected, lost
from greupd.ipsec.vici import ViciError, ViciReply, ViciSession
from greupd.ipsec.xfrm import XfrmQuery, XfrmWatch
from greupd.status import IpsecStatus, TunnelStatus

log = logging.getLogger("greupd.ipsec")

IpsecState = Literal["established", "connecting", "down"]
POLL_INTERVAL = 5.0  # seconds between passes without events: how soon a hand-unloaded connection comes back
RETRY_INTERVAL = 2.0  # seconds between attempts to reach a charon that is not there
EVENTS = ["ike-updown", "child-updown"]
# After the kernel says an SA or policy went (xfrm.py): wait SETTLE for the rest of the burst, look; after a
# deletion (not a flush: charon never flushes) look again CONFIRM later, since charon deletes SAs itself when it
# rekeys. A connection put back is not put back again within GAP_FIRST seconds, doubling each time up to GAP_MAX,
# so that no lookup mistake could make a loop of it.
SETTLE, CONFIRM = 0.2, 0.5
GAP_FIRST, GAP_MAX = 2.0, 60.0


def _down(connection: str, error: str | None, charon: bool) -> IpsecStatus:
    return {"state": "down", "connection": connection, "ike_sa": None, "child_sa": None, "charon": charon,
            "error": error}


def tunnel_states(connections: Mapping[str, IpsecConnection], loaded: set[str], sas: list[ViciReply],
                  errors: Mapping[str, str]) -> dict[str, IpsecStatus]:
    """Each tunnel's IPsec state from charon's list-sas answer (pure).

    established: a CHILD_SA is installed (GRE is encrypted); connecting: the connection is loaded but no
    CHILD_SA is installed yet (trap waiting for traffic, IKE in progress, DPD found the peer gone);
    down: the connection is not loaded in charon (charon gone, or it refused the connection).
    """
    best: dict[str, tuple[str | None, str | None]] = {}
    for entry in sas:
        for name, ike in entry.items():
            if name not in connections or not isinstance(ike, dict):
                continue
            ike_state = str(ike.get("state")) if ike.get("state") is not None else None
            children = ike.get("child-sas")
            child_state = None
            if isinstance(children, dict):
                states = [str(c.get("state")) for c in children.values()
                          if isinstance(c, dict) and c.get("name") == CHILD_NAME]
                child_state = "INSTALLED" if "INSTALLED" in states else (states[0] if states else None)
            if best.get(name, (None, None))[1] != "INSTALLED":
                best[name] = (ike_state, child_state)
    statuses: dict[str, IpsecStatus] = {}
    for name, connection in connections.items():
        if name not in loaded:
            statuses[connection.tunnel] = _down(name, errors.get(name, "connection not loaded"), True)
            continue
        ike_state, child_state = best.get(name, (None, None))
        state: IpsecState = "established" if child_state == "INSTALLED" else "connecting"
        statuses[connection.tunnel] = {"state": state, "connection": name, "ike_sa": ike_state,
                                       "child_sa": child_state, "charon": True, "error": errors.get(name)}
    return statuses


def change_message(tunnel: str, status: IpsecStatus) -> str:
    """`tunnel My_Tunnel ipsec established: ESP SA installed (greupd-My_Tunnel)`."""
    if status["state"] == "established":
        why = "ESP SA installed"
    elif status["state"] == "connecting":
        why = f"IKE SA {status['ike_sa'].lower()}" if status["ike_sa"] else "no SA, waiting for traffic or the peer"
    else:
        why = status["error"] or "connection not loaded"
    return f"tunnel {tunnel} ipsec {status['state']}: {why} ({status['connection']})"


def _read_secret(path: Path) -> bytes:
    # The key is the file's content without surrounding whitespace (a trailing newline from an editor).
    return path.read_bytes().strip()


# on_change(tunnel, state, previous state or None, one-line message): EventLog.ipsec_changed
OnChange = Callable[[str, IpsecState, IpsecState | None, str], None]


class IpsecSupervisor:
    """The daemon's side of charon: `configure` what should be loaded, read `status`, get `on_change` calls."""

    def __init__(self, config: Config | Path, on_change: OnChange, on_error: Callable[[str], None],
                 poll_interval: float = POLL_INTERVAL) -> None:
        """`config`: the daemon's config (connections, VICI socket, on_exit), or only a VICI socket path."""
        self.socket_path = config if isinstance(config, Path) else config.daemon.vici_socket
        self.poll_interval = poll_interval
        self._on_change = on_change
        self._on_error = on_error
        self._wanted: dict[str, IpsecConnection] = {}
        self._unload_at_exit = False
        self._statuses: dict[str, IpsecStatus] = {}
        self._reported: dict[str, IpsecState] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._session: ViciSession | None = None
        self._events: ViciSession | None = None
        self._event_task: asyncio.Task[None] | None = None
        # What this charon process holds from us: connection name -> (message, hash of its secret). Emptied
        # when the connection to charon is lost: a restarted charon holds nothing.
        self._loaded: dict[str, tuple[str, str]] = {}
        # The private keys this charon holds from us: connection name -> the key id load-key answered (review
        # round 3, L3: unloaded when no connection of ours uses it any more). Emptied with _loaded.
        self._keys: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._last_error: str | None = None
        self._first_pass = asyncio.Event()
        self.passes = 0
        # Issue #21, I2: SAs or policies lost behind charon's back. The watch marks `_suspect`; the next pass
        # asks the kernel and has what is missing put back (terminate, load again, initiate).
        self._xfrm_watch: XfrmWatch | None = None
        self._xfrm = XfrmQuery()
        self._suspect = self._flushed = False
        self._reinstalled: dict[str, tuple[float, float]] = {}  # connection -> (loop time, gap) of its last
        self.reinstalls = 0
        if isinstance(config, Config):
            self.configure(config)

    # --- the daemon's API -------------------------------------------------------------------------------

    def configure(self, config: Config | Mapping[str, IpsecConnection]) -> None:
        """What charon should hold: the connections of `config` (and its VICI socket, its on_exit)."""
        if isinstance(config, Config):
            self._unload_at_exit = config.daemon.on_exit == "remove"
            if config.daemon.vici_socket != self.socket_path:
                self.socket_path = config.daemon.vici_socket
                self._disconnect()
            config = desired_connections(config)
        self._wanted = dict(config)
        for tunnel in set(self._statuses) - {c.tunnel for c in self._wanted.values()}:
            del self._statuses[tunnel]
            self._reported.pop(tunnel, None)
        self._wake.set()
        with contextlib.suppress(RuntimeError):  # outside a running loop: start() later
            self.start(asyncio.get_running_loop())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None and self._wanted:
            self._task = loop.create_task(self._run(), name="greupd-ipsec")
        if self._xfrm_watch is None and self._wanted:
            watch = XfrmWatch(lambda flushed: self._kernel_lost(loop, flushed))
            try:
                watch.start(loop)
                self._xfrm_watch = watch
            except OSError as exc:
                self._on_error(f"ipsec: cannot watch the kernel's SAs and policies ({exc.strerror}): SAs lost behind"
                               " charon's back will not be put back")

    def _kernel_lost(self, loop: asyncio.AbstractEventLoop, flushed: bool) -> None:
        self._suspect, self._flushed = True, self._flushed or flushed
        loop.call_later(SETTLE, self._wake.set)

    def annotate(self, statuses: list[TunnelStatus]) -> list[TunnelStatus]:
        """`greupd status`: each tunnel with [tunnel.ipsec] gets its `"ipsec"` part."""
        for status in statuses:
            if (ipsec := self.status(status["name"])) is not None:
                status["ipsec"] = ipsec
        return statuses

    def status(self, tunnel: str) -> IpsecStatus | None:
        connection = next((c for c in self._wanted.values() if c.tunnel == tunnel), None)
        if connection is None:
            return None
        return self._statuses.get(tunnel) or _down(connection.name, "charon not reached yet", False)

    async def settled(self, timeout: float) -> None:
        """Until the first pass (loaded, refused, or charon unreachable) is done, at most `timeout` s."""
        if self._wanted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_pass.wait(), timeout)

    def look_again(self) -> None:
        self._wake.set()

    async def close(self, unload: bool) -> None:
        """Stop; with `unload`, first take every greupd connection (and its SAs and secret) out of charon."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if unload and self._wanted:
            self._wanted = {}
            with contextlib.suppress(ViciError):
                await self._connect()  # afresh: the cancel may have cut a request short on the old connection
                await self._reconcile()
        self._disconnect()
        self._close_xfrm()

    # --- the loop ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._supervise()
        except asyncio.CancelledError:
            # The daemon's loop is ending (asyncio.run cancels what is left): on_exit = "remove" takes our
            # connections out of charon; "keep" leaves them, so the tunnels stay encrypted across a restart.
            if self._unload_at_exit and self._session is not None and self._session.connected:
                self._wanted = {}
                try:
                    # A fresh connection: the cancel may have cut a request short on the old one.
                    await self._connect()
                    await self._reconcile()
                except ViciError as exc:
                    log.warning("ipsec: could not unload greupd's connections at exit: %s", exc)
            self._disconnect()
            self._close_xfrm()
            raise

    async def _supervise(self) -> None:
        while True:
            try:
                if self._session is None or not self._session.connected:
                    if not self._wanted:
                        await self._wait(None)
                        continue
                    await self._connect()
                await self._reconcile()
                self._last_error = None
                self._first_pass.set()
                await self._wait(self.poll_interval)
            except ViciError as exc:
                self._lost(str(exc))
                self._first_pass.set()
                await self._wait(RETRY_INTERVAL)
            except OSError as exc:  # a secret file that became unreadable between validation and now
                self._lost(str(exc))
                self._first_pass.set()
                await self._wait(RETRY_INTERVAL)
            except Exception as exc:  # a bug must not silently end IPsec supervision: say it, and retry
                log.exception("ipsec: unexpected error")
                self._lost(f"unexpected error: {exc!r}")
                self._first_pass.set()
                await self._wait(RETRY_INTERVAL)

    async def _wait(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    async def _connect(self) -> None:
        self._disconnect()
        session, events = ViciSession(self.socket_path), ViciSession(self.socket_path)
        await session.connect()
        try:
            await events.connect()
            await events.subscribe(EVENTS)
        except ViciError:
            session.close()
            events.close()
            raise
        self._session, self._events = session, events
        self._event_task = asyncio.get_running_loop().create_task(self._read_events(events))
        log.info("ipsec: connected to charon at %s", self.socket_path)

    async def _read_events(self, events: ViciSession) -> None:
        try:
            while True:
                name, _ = await events.next_event()
                log.debug("ipsec: charon event %s", name)
                self._wake.set()
        except ViciError:
            # charon went away (or restarted): the main loop notices on its next request and reconnects.
            self._wake.set()

    def _disconnect(self) -> None:
        for session in (self._session, self._events):
            if session is not None:
                session.close()
        if self._event_task is not None:
            self._event_task.cancel()
            self._event_task = None
        self._session = self._events = None
        self._loaded.clear()
        self._keys.clear()

    def _close_xfrm(self) -> None:
        if self._xfrm_watch is not None:
            self._xfrm_watch.close()
            self._xfrm_watch = None
        self._xfrm.close()

    def _lost(self, error: str) -> None:
        self._disconnect()
        if error != self._last_error:
            self._last_error = error
            self._on_error(f"ipsec: {error}; retrying every {RETRY_INTERVAL:g} s")
        self._publish({c.tunnel: _down(c.name, error, False) for c in self._wanted.values()})

    # --- one pass -----------------------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        session = self._session
        if session is None or not session.connected or (self._events is not None and not self._events.connected):
            raise ViciError(f"lost the VICI connection to charon at {self.socket_path}")
        self.passes += 1
        if self._suspect:  # first, before anything else of this pass (issue #21, I2: within 5 s)
            await self._put_back_losses(session)
        present = {name for entry in await session.streamed("list-conns", "list-conn") for name in entry}
        ours = {name for name in present if tunnel_of(name) is not None}
        # Forget what charon no longer holds (unloaded by hand): it is loaded again below.
        for name in set(self._loaded) - present:
            del self._loaded[name]
            self._keys.pop(name, None)  # its key stays in charon; a new load-key of it answers the same id
        for name in sorted(ours - set(self._wanted)):
            await self._unload(session, name)
        loaded = ours & set(self._wanted)
        for name, connection in sorted(self._wanted.items()):
            try:
                if await self._load(session, connection, name in present):
                    loaded.add(name)
                self._errors.pop(name, None)
            except ViciError as exc:
                # Refused by charon (an unknown proposal, a bad certificate): this tunnel only.
                message = str(exc)
                if self._errors.get(name) != message:
                    self._on_error(f"ipsec: tunnel {connection.tunnel}: {message}")
                self._errors[name] = message
                loaded.discard(name)
        sas = await session.streamed("list-sas", "list-sa") if self._wanted else []
        self._publish(tunnel_states(self._wanted, loaded, sas, self._errors))

    async def _put_back_losses(self, session: ViciSession) -> None:
        """Put back every connection whose SAs or policies the kernel lost behind charon's back: its IKE_SA
        terminated (charon forgets the SAs it believed installed), the connection unloaded and loaded again (its
        trap comes back) and initiated (the SA now, not at the next GRE packet)."""
        flushed, self._suspect, self._flushed = self._flushed, False, False
        loaded = set(self._loaded) & set(self._wanted)
        found = await self._look(session, loaded)
        if found and not flushed:
            await asyncio.sleep(CONFIRM)
            found = {n: why for n, why in (await self._look(session, loaded)).items() if n in found}
        loop = asyncio.get_running_loop()
        for name, missing in sorted(found.items()):
            when, gap = self._reinstalled.get(name, (float("-inf"), 0.0))
            since = loop.time() - when
            if since < gap:  # put back a moment ago: look again when its gap is over
                loop.call_later(gap - since, self._kernel_lost, loop, False)
                continue
            self._reinstalled[name] = (loop.time(), GAP_FIRST if since >= GAP_MAX else min(2 * gap, GAP_MAX))
            connection = self._wanted[name]
            # Plain requests, not streamed ones: nobody reads the control-log, and each registration is two
            # more round trips (hundreds of ms each in an emulated guest).
            with contextlib.suppress(ViciError):
                await session.request("terminate", {"ike": name, "force": "yes", "timeout": "-1"})
            with contextlib.suppress(ViciError):
                await session.request("unload-conn", {"name": name})
            self._loaded.pop(name, None)
            await self._load(session, connection, False)
            with contextlib.suppress(ViciError):
                await session.request("initiate", {"child": CHILD_NAME, "ike": name, "timeout": "-1"})
            self.reinstalls += 1
            self._on_error(f"ipsec: tunnel {connection.tunnel}: the kernel lost {missing} behind charon's back:"
                           " connection loaded again and initiated")

    async def _look(self, session: ViciSession, loaded: set[str]) -> dict[str, str]:
        sas = await session.streamed("list-sas", "list-sa")
        try:
            return lost(self._xfrm, expected(self._wanted, sorted(loaded), sas))
        except OSError as exc:
            self._on_error(f"ipsec: cannot read the kernel's SAs and policies: {exc}")
            return {}

    async def _load(self, session: ViciSession, connection: IpsecConnection, present: bool) -> bool:
        """Load the connection (and its credentials) if charon lacks it or holds an older one."""
        secret = _read_secret(connection.psk_file) if connection.psk_file is not None else None
        files = [p.read_bytes() for p in (connection.key, connection.cert, connection.ca) if p is not None]
        fingerprint = hashlib.sha256(b"\0".join([secret or b"", *files])).hexdigest()
        if present and self._loaded.get(connection.name) == (connection.message_text, fingerprint):
            return True
        message: dict[str, object] = dict(connection.message)
        if secret is not None:
            owners = [connection.local_id] + ([connection.remote_id] if connection.remote_id else [])
            await session.request("load-shared", {"id": connection.secret_id, "type": "IKE", "data": secret,
                                                  "owners": owners})
        else:
            key, cert, ca = files
            loaded = await session.request("load-key", {"type": "any", "data": key})
            await self._forget_key(session, connection.name, str(loaded.get("id") or "") or None)
            # VICI takes certificates as their content (PEM or DER), as swanctl sends what it reads from files.
            message["local-1"] = {**connection.message["local-1"], "certs": [cert]}  # type: ignore[dict-item]
            message["remote-1"] = {**connection.message["remote-1"], "cacerts": [ca]}  # type: ignore[dict-item]
        await session.request("load-conn", {connection.name: message})
        self._loaded[connection.name] = (connection.message_text, fingerprint)
        log.info("ipsec: loaded connection %s", connection.name)
        return True

    async def _unload(self, session: ViciSession, name: str) -> None:
        with contextlib.suppress(ViciError):
            await session.request("unload-conn", {"name": name})
        # unload-conn leaves established SAs running; a tunnel that is gone from the config must not be.
        with contextlib.suppress(ViciError):
            await session.streamed("terminate", "control-log", {"ike": name, "force": "yes", "timeout": "-1"})
        with contextlib.suppress(ViciError):
            await session.request("unload-shared", {"id": name})
        await self._forget_key(session, name, None)
        self._loaded.pop(name, None)
        log.info("ipsec: unloaded connection %s", name)

    async def _forget_key(self, session: ViciSession, name: str, key_id: str | None) -> None:
        """`name` now uses the private key `key_id` (None: none): the key it used before leaves charon unless
        another connection of ours uses it too (two tunnels may share one key file)."""
        old = self._keys.pop(name, None)
        if key_id is not None:
            self._keys[name] = key_id
        if old is not None and old != key_id and old not in self._keys.values():
            with contextlib.suppress(ViciError):
                await session.request("unload-key", {"id": old})
                log.info("ipsec: unloaded the private key of %s", name)

    def _publish(self, statuses: dict[str, IpsecStatus]) -> None:
        for tunnel, status in statuses.items():
            self._statuses[tunnel] = status
            previous = self._reported.get(tunnel)
            if previous != status["state"]:
                self._reported[tunnel] = status["state"]
                self._on_change(tunnel, status["state"], previous, change_message(tunnel, status))
