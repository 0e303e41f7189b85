"""The simulated mobile peer: a phone's replica that goes online and offline, and a user who keeps using it.

``python -m peers.mobile --data-dir ~/phone --desktop ws://127.0.0.1:7878/sync --token T --duration 600`` (or, later,
``crdtmail mobile``) runs one. It holds its own data directory and store, keeps only the month shards of its sync
window (the last 3 months by default) and fetches ahead of time only the bodies its ``BodyPolicy`` names (the last
30 days, up to 256 KiB by default); any other body is fetched when the user opens the message while online.

Three models drive it (``peers._sim``), each from its own seeded generator so one does not disturb another:

- connectivity: online and offline periods of exponentially distributed length (``--mean-online``,
  ``--mean-offline``), or a scripted trace file (``--trace``; format in ``peers._sim``). While online the phone
  dials its desktop and every other peer it knows; going offline stops the dialers and closes the links, so
  nothing goes out. ``--flaky`` also drops the connection at random moments while online (the socket is aborted
  with no close handshake, as when a radio link dies), often in the middle of a sync;
- the user: ``--rate`` actions per second (exponential gaps): read messages (\\Seen; a missing body is requested
  from the peers when online), flag and unflag, move, delete to the trash, expunge from the trash, create
  folders, and new mail arriving at the phone first (its own mail server delivers it into INBOX). Every action
  commits locally at once, online or not;
- metrics (``--metrics FILE``): a JSON line per event, stamped with ``time.time()`` so lines from several
  processes can be joined.

What the metrics can and cannot say:

- ``action``: what the user did, after it committed (kind, message id, folder, whether it changed anything).
- ``change_sent``: a local change committed while a sync session with a peer was running for the mailbox; its
  updates were queued on those links at that moment. ``change_queued``: committed with no such session; it travels
  with the next sync (the peer's step 1 asks for it). Both carry the message ids and ``update_ids`` (digests of
  the CRDT update bytes; a peer that logs the same digest applied those very bytes).
- ``change_acked``: the protocol has no application-level acknowledgement, so this is the closest honest
  measure from this side: ``how="flushed"`` when every byte queued on a link that carried the change had been
  handed to the kernel's socket buffer, ``how="synced"`` for a queued change once a later session completed its
  initial sync and was flushed the same way (the peer's step 1 for what it lacked arrives before the step 2s that
  complete our sync, so by then our answer is written). Neither proves the peer received or committed it: a
  connection that dies with bytes in flight loses them, and the next session's state-vector exchange sends them
  again. ``latency`` is measured to the monitor tick that noticed (every 20 ms).
- ``remote_applied``: a change that arrived from a peer and was committed here (ids by kind, update ids).
- ``online``, ``offline``, ``drop``, ``session_open``, ``sync_complete``, ``session_closed``, ``body_requested``,
  ``body_received``, ``body_unavailable``, ``run_start``, ``run_stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from crdtmail.config import DATABASE_FILE, RemotePeer, resolve_data_dir, valid_mailbox_name
from crdtmail.errors import ConfigError, CrdtmailError, UnauthorizedMailboxError
from crdtmail.model.flags import SEEN
from crdtmail.model.mailbox import Mailbox, MailboxChange
from crdtmail.peer import BodyPolicy, Peer
from crdtmail.protocol.frames import CloseCode
from crdtmail.replica import Replica
from crdtmail.transport import Dialer, TransportLimits
from peers._sim import (
    ACTION_KINDS,
    Action,
    ActionWeights,
    MailFactory,
    MetricsLog,
    Period,
    UserModel,
    load_trace,
    parse_trace,
    random_periods,
    read_metrics,
    trace_periods,
    update_id,
    window_start,
)
from peers.mobile_args import add_arguments

__all__ = [
    "ACTION_KINDS",
    "DEFAULT_BODIES",
    "Action",
    "ActionWeights",
    "MailFactory",
    "MetricsLog",
    "MobileConfig",
    "MobilePeer",
    "MobileStats",
    "Period",
    "UserModel",
    "add_arguments",
    "build_parser",
    "config_from_args",
    "load_trace",
    "main",
    "parse_trace",
    "random_periods",
    "read_metrics",
    "run_from_args",
    "run_mobile",
    "window_start",
]

log = logging.getLogger("crdtmail.mobile")

DEFAULT_BODIES = BodyPolicy(newer_than_days=30, max_bytes=256 * 1024)
"""A phone fetches ahead of time the bodies of the last 30 days, up to 256 KiB each; the rest on demand."""
RUNS_KEY = "mobile_runs"  # meta key: how many times a mobile peer started on this data directory
MONITOR_INTERVAL = 0.02  # seconds between looks at the sessions: sync progress, flushed links, ended sessions
FLAKY_SYNC_CUT = 0.3  # flaky mode: the share of new sessions aborted before their initial sync completes
FLAKY_POLL = 0.002  # flaky mode: seconds between looks for new sessions to cut
CLOSE_TIMEOUT = 5.0  # going offline: how long a link may take to close politely before its socket is aborted


@dataclass(frozen=True)
class MobileConfig:
    """Everything a simulated phone needs besides its replica; the defaults are a plausible phone.

    ``now`` fixes the phone's clock at the start (epoch seconds), which sets the sync window, the body policy's
    cut-off and the dates of new mail; the clock then runs with real time. None means ``time.time()``.
    ``trace`` replaces the random connectivity process when given. ``rate`` 0 means no user actions.
    """

    mailbox: str = "default"
    remotes: tuple[RemotePeer, ...] = ()
    seed: int = 0
    rate: float = 1.0
    window_months: int | None = 3
    bodies: BodyPolicy = DEFAULT_BODIES
    mean_online: float = 60.0
    mean_offline: float = 30.0
    start_online: bool = True
    trace: tuple[Period, ...] | None = None
    trace_repeats: bool = False
    flaky: bool = False
    flaky_mean: float = 2.0
    metrics: Path | None = None
    now: float | None = None
    device: str = "phone"
    weights: ActionWeights = field(default_factory=ActionWeights)
    reconnect_initial: float = 0.5
    reconnect_max: float = 10.0

    def validate(self) -> None:
        """Raise ConfigError for a setting no run could use."""
        if not valid_mailbox_name(self.mailbox):
            raise ConfigError(f"invalid mailbox name {self.mailbox!r}: use 1-64 letters, digits, '.', '_' or '-'")
        checks = [
            (self.rate >= 0 and math.isfinite(self.rate), "the action rate must be 0 or more actions per second"),
            (self.window_months is None or self.window_months >= 1, "the sync window must be at least 1 month"),
            (self.mean_online >= 0 and self.mean_offline >= 0, "mean online/offline times must be 0 or more seconds"),
            (self.flaky_mean > 0, "the mean time between flaky drops must be more than 0 seconds"),
            (0 < self.reconnect_initial <= self.reconnect_max, "reconnect delays must be positive, initial <= max"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.weights.cumulative()
        for remote in self.remotes:
            if not remote.url.startswith(("ws://", "wss://")):
                raise ConfigError(f"a peer URL must start with ws:// or wss://, not {remote.url!r}")


@dataclass
class MobileStats:
    """Counts of what one mobile peer did, for the summary line and tests."""

    actions: dict[str, int] = field(default_factory=dict)
    online_periods: int = 0
    offline_periods: int = 0
    sessions: int = 0
    syncs: int = 0
    interrupted_sessions: int = 0  # sessions that ended before their initial sync completed
    drops: int = 0
    changes_sent: int = 0
    changes_queued: int = 0
    changes_acked: int = 0
    remote_changes: int = 0
    bodies_requested: int = 0
    bodies_received: int = 0

    @property
    def total_actions(self) -> int:
        """Every user action, of any kind."""
        return sum(self.actions.values())

    def summary(self) -> str:
        """One line for a person."""
        return (f"{self.total_actions} actions, {self.online_periods} online periods, {self.sessions} sync sessions "
                f"({self.syncs} synced, {self.drops} dropped), {self.changes_sent} changes sent live, "
                f"{self.changes_queued} queued offline, {self.changes_acked} acknowledged, "
                f"{self.remote_changes} remote changes applied, {self.bodies_received} bodies received")


@dataclass(eq=False)
class _Unacked:
    """A local change not yet known to have left this process towards a peer."""

    made: float
    ids: list[str]
    update_ids: list[str]
    sessions: set[Any]  # the sessions it was queued on; empty: waits for the next sync


@dataclass(eq=False)
class _SessionInfo:
    number: int
    session: Any  # crdtmail.peer's session object (its class is private; read for links, syncs, byte counts)
    opened: float
    synced_at: float | None = None


class MobilePeer:
    """A phone: its replica and sync peer, its connectivity, its user, and its metrics.

    Drive it with ``await run(duration)``, or step by step (tests): ``go_online``, ``go_offline``, ``act``,
    ``read_message``, ``drop_connections``; ``close`` when done (the replica stays open: its owner closes it).
    """

    def __init__(self, replica: Replica, config: MobileConfig, *, limits: TransportLimits | None = None) -> None:
        config.validate()
        self.replica = replica
        self.config = config
        self.started_at = time.time() if config.now is None else config.now
        self._started_monotonic = time.monotonic()
        self.oldest_shard = window_start(self.started_at, config.window_months) if config.window_months else None
        bodies = config.bodies
        if config.now is not None and bodies.now is None:
            bodies = dataclasses.replace(bodies, now=config.now)  # the policy's "30 days" counts on the phone's clock
        self.peer = Peer(replica, limits=limits, bodies=bodies, oldest_shard=self.oldest_shard)
        self.mailbox: Mailbox = self.peer.mailbox(config.mailbox)
        run = int(replica.store.get_meta(RUNS_KEY) or "0") + 1
        replica.store.set_meta(RUNS_KEY, str(run))
        self.metrics = MetricsLog(config.metrics, peer=self.peer.peer_id)
        self.user = UserModel(self.mailbox, seed=config.seed, clock=self.clock, weights=config.weights,
                              mail=MailFactory(config.seed, device=config.device, run=run),
                              has_body=self.peer.has_blob)
        self.stats = MobileStats()
        self.online = False
        # Settable at any time: the mean seconds between drops while online, or None for a steady link.
        self.flaky_mean: float | None = config.flaky_mean if config.flaky else None
        self._timing = random.Random(f"crdtmail-mobile-timing-{config.seed}")
        self._flaky_rng = random.Random(f"crdtmail-mobile-flaky-{config.seed}")
        self._periods = self._schedule()
        self._dialers: list[Dialer] = []
        self._dial_tasks: list[asyncio.Task[None]] = []
        self._flaky_task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._sessions: dict[Any, _SessionInfo] = {}
        self._unacked: list[_Unacked] = []
        self._awaiting: dict[str, tuple[str, float]] = {}  # body hash -> (message id, requested at)
        self._fatal: CrdtmailError | None = None
        self.mailbox.observe(self._on_change)
        self.peer.body_listeners.append(self._on_body)
        if config.remotes and not any(config.mailbox in remote.mailboxes for remote in config.remotes):
            log.warning("no configured peer syncs mailbox %s: its changes will stay on this phone", config.mailbox)

    # ------------------------------------------------------------------------------------------ clock

    def clock(self) -> float:
        """The phone's clock: ``config.now`` (or the real time) at the start, advancing with real time."""
        return self.started_at + (time.monotonic() - self._started_monotonic)

    def _schedule(self) -> Iterator[Period]:
        if self.config.trace is not None:
            return trace_periods(self.config.trace, self.config.trace_repeats)
        rng = random.Random(f"crdtmail-mobile-net-{self.config.seed}")
        return random_periods(rng, self.config.mean_online, self.config.mean_offline,
                              start_online=self.config.start_online)

    # ------------------------------------------------------------------------------------ connectivity

    async def go_online(self, seconds: float | None = None) -> None:
        """Start dialing every configured peer (each link syncs, then streams changes both ways)."""
        if self.online:
            return
        self.online = True
        self.stats.online_periods += 1
        self._ensure_monitor()
        for index, remote in enumerate(self.config.remotes):
            dialer = self.peer.dial_remote(
                remote, initial_delay=self.config.reconnect_initial, max_delay=self.config.reconnect_max,
                rng=random.Random(f"crdtmail-mobile-backoff-{self.config.seed}-{index}"))
            self._dialers.append(dialer)
            self._dial_tasks.append(asyncio.create_task(dialer.run(), name=f"crdtmail-mobile-dial {remote.url}"))
        if self.flaky_mean is not None:
            self._flaky_task = asyncio.create_task(self._flaky_loop(), name="crdtmail-mobile-flaky")
        span = "" if seconds is None or math.isinf(seconds) else f" for {seconds:.1f}s"
        log.info("online%s: dialing %s%s", span, ", ".join(r.url for r in self.config.remotes) or "nobody",
                 " (flaky link)" if self.flaky_mean is not None else "")
        self.metrics.emit("online", seconds=None if seconds is None or math.isinf(seconds) else seconds,
                          flaky=self.flaky_mean is not None)

    async def go_offline(self, seconds: float | None = None, *, reason: str = "offline") -> None:
        """Stop the dialers and close every link: from now on nothing goes out, and changes commit locally."""
        if not self.online:
            return
        self.online = False
        self.stats.offline_periods += 1
        if self._flaky_task is not None:
            self._flaky_task.cancel()
            await asyncio.gather(self._flaky_task, return_exceptions=True)
            self._flaky_task = None
        for dialer in self._dialers:
            dialer.stop()
        sessions = list(self.peer.sessions)
        closing = [asyncio.wait_for(s.link.close(1001, "phone went offline"), CLOSE_TIMEOUT) for s in sessions]
        await asyncio.gather(*closing, return_exceptions=True)
        for session in sessions:  # a peer that did not answer the close: the radio is off anyway
            transport = getattr(session.link.websocket, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        # A stopped dialer abandons a connection in progress and ends once its link has closed; one whose close
        # handshake hangs past CLOSE_TIMEOUT is cancelled.
        tasks, self._dial_tasks = self._dial_tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for dialer in self._dialers:
            with contextlib.suppress(ValueError):
                self.peer.dialers.remove(dialer)
            if dialer.last_error and dialer.connections == 0:
                log.info("%s was not reached while online: %s", dialer.url, dialer.last_error)
        self._dialers = []
        self._tick()
        span = "" if seconds is None or math.isinf(seconds) else f" for {seconds:.1f}s"
        log.info("%s%s: links closed; changes commit locally and wait for the next sync", reason, span)
        self.metrics.emit("offline", seconds=None if seconds is None or math.isinf(seconds) else seconds,
                          reason=reason)

    def drop_connections(self) -> int:
        """Abort every open link with no close handshake, as a dying radio link does; returns how many.

        The dialers reconnect at once, so this exercises a sync cut off at an arbitrary point.
        """
        return sum(self._drop(session) for session in list(self.peer.sessions))

    def _drop(self, session: Any) -> bool:
        transport = getattr(session.link.websocket, "transport", None)
        if transport is None or session.link.closed or transport.is_closing():
            return False
        synced = self.config.mailbox in session.synced
        self._notice(session)  # a session cut within milliseconds still counts, as interrupted
        transport.abort()
        self.stats.drops += 1
        log.info("flaky link: dropped the connection to %s %s", session.link.name,
                 "while streaming changes" if synced else "in the middle of its initial sync")
        self.metrics.emit("drop", url=session.link.name, synced=synced, bytes_sent=session.connection.bytes_sent,
                          bytes_received=session.connection.bytes_received)
        return True

    async def _flaky_loop(self) -> None:
        """Drop the links at exponentially spaced moments, and cut some initial syncs short on purpose.

        On a fast link an initial sync takes milliseconds, so drops at random moments would almost always land
        between syncs; a fraction (``FLAKY_SYNC_CUT``) of new sessions is therefore also aborted as soon as it is
        noticed, before its sync completes. Noticing takes a look every ``FLAKY_POLL`` seconds.
        """
        loop = asyncio.get_running_loop()
        rng = self._flaky_rng
        seen: set[Any] = set()
        next_drop: float | None = None
        while self.online and self.flaky_mean is not None:
            now = loop.time()
            if next_drop is None:
                next_drop = now + rng.expovariate(1.0 / self.flaky_mean)
            sessions = list(self.peer.sessions)
            seen &= set(sessions)
            for session in sessions:
                if session in seen:
                    continue
                seen.add(session)
                if self.config.mailbox not in session.synced and rng.random() < FLAKY_SYNC_CUT:
                    self._drop(session)
            if now >= next_drop:
                self.drop_connections()
                next_drop = None
            await asyncio.sleep(FLAKY_POLL)

    async def _connectivity_loop(self) -> None:
        for period in self._periods:
            if period.online:
                await self.go_online(period.seconds)
            else:
                await self.go_offline(period.seconds)
            if math.isinf(period.seconds):
                await asyncio.get_running_loop().create_future()  # for ever (until cancelled)
            await asyncio.sleep(period.seconds)
        # A trace without "repeat" is over: stay in its last state.

    # ------------------------------------------------------------------------------------------ the user

    def act(self, kind: str | None = None) -> Action:
        """One user action now (of ``kind`` when given), committed locally; a missing body is requested if online."""
        action = self.user.step(kind)
        self.stats.actions[action.kind] = self.stats.actions.get(action.kind, 0) + 1
        self.metrics.emit("action", online=self.online, **action.as_dict())
        if action.missing_body and action.message_id:
            if self.online:
                self._request_body(action.message_id, action.missing_body)
            else:
                self.metrics.emit("body_unavailable", message_id=action.message_id, sha256=action.missing_body)
        return action

    async def read_message(self, message_id: str, *, timeout: float = 15.0) -> bytes | None:
        """Open a message as the user would: mark it \\Seen, and fetch its body from a peer if the phone lacks it.

        Returns the body, or None when it is not here and no peer sent it within ``timeout`` (or we are offline).
        """
        changed = self.mailbox.set_flags(message_id, add=[SEEN])
        sha256 = self.mailbox.message(message_id).envelope.body_sha256
        body = self.peer.blob(sha256)
        self.stats.actions["read"] = self.stats.actions.get("read", 0) + 1
        self.metrics.emit("action", online=self.online, kind="read", message_id=message_id, changed=changed,
                          missing_body=None if body is not None else sha256)
        if body is not None:
            return body
        if not self.online:
            self.metrics.emit("body_unavailable", message_id=message_id, sha256=sha256)
            return None
        self._request_body(message_id, sha256)
        deadline = time.monotonic() + timeout
        while not self.peer.has_blob(sha256) and time.monotonic() < deadline and self.online:
            await asyncio.sleep(0.02)
        return self.peer.blob(sha256)

    async def open_older(self, shard: str, *, timeout: float = 15.0) -> list[str]:
        """The user scrolls to mail older than the sync window: fetch that month's shard from the peers (online
        only) and return the ids of its messages; the shard stays in step from then on, bodies on demand."""
        asked = self.peer.request_shard(self.config.mailbox, shard) if self.online else 0
        self.metrics.emit("shard_requested", shard=shard, peers=asked)
        deadline = time.monotonic() + timeout
        while asked and time.monotonic() < deadline:
            if not any(shard in session.syncs[self.config.mailbox].pending for session in self.peer.sessions
                       if self.config.mailbox in session.syncs):
                break
            await asyncio.sleep(0.02)
        return [row.message_id for row in self.mailbox.index_rows() if row.shard == shard]

    def _request_body(self, message_id: str, sha256: str) -> None:
        if sha256 in self._awaiting or self.peer.has_blob(sha256):
            return
        self._awaiting[sha256] = (message_id, time.time())
        self.peer.request_body(sha256)
        self.stats.bodies_requested += 1
        self.metrics.emit("body_requested", message_id=message_id, sha256=sha256)

    async def _user_loop(self) -> None:
        while True:
            await asyncio.sleep(self._timing.expovariate(self.config.rate))
            self.act()

    # ----------------------------------------------------------------------------------------- observing

    def _on_change(self, change: MailboxChange) -> None:
        now = time.time()
        ids = sorted(change.added | change.changed | change.moved | change.expunged)
        updates = [update_id(document, update) for document, update in change.updates]
        if not change.is_local:
            self.stats.remote_changes += 1
            self.metrics.emit("remote_applied", t=now, origin=getattr(change.origin, "peer_id", ""),
                              added=change.added, changed=change.changed, moved=change.moved,
                              expunged=change.expunged, folders_changed=change.folders_changed,
                              documents=change.documents, update_ids=updates)
            return
        if not any(self.peer.accepts_document(document) for document in change.documents):
            self.metrics.emit("change_local_only", t=now, ids=ids, documents=change.documents)
            return
        # The peer's own observer ran first (it subscribed when the mailbox was opened), so a session whose sync
        # of this mailbox has started has the update queued on its link by now.
        name = self.config.mailbox
        sessions = {s for s in self.peer.sessions
                    if s.connection.is_open and (sync := s.syncs.get(name)) is not None and sync.started}
        self._unacked.append(_Unacked(now, ids, updates, set(sessions)))
        if sessions:
            self.stats.changes_sent += 1
            self.metrics.emit("change_sent", t=now, ids=ids, update_ids=updates, folders_changed=change.folders_changed,
                              to=sorted(s.connection.peer_id for s in sessions))
        else:
            self.stats.changes_queued += 1
            self.metrics.emit("change_queued", t=now, ids=ids, update_ids=updates,
                              folders_changed=change.folders_changed)

    def _on_body(self, sha256: str) -> None:
        self.stats.bodies_received += 1
        awaited = self._awaiting.pop(sha256, None)
        if awaited is not None:
            message_id, requested = awaited
            self.metrics.emit("body_received", message_id=message_id, sha256=sha256, latency=time.time() - requested)

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="crdtmail-mobile-monitor")

    async def _monitor_loop(self) -> None:
        while True:
            self._tick()
            if self._fatal is not None:
                raise self._fatal
            await asyncio.sleep(MONITOR_INTERVAL)

    async def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        self._tick()

    @staticmethod
    def _flushed(session: Any) -> bool:
        """Whether everything queued on the session's link has been handed to the kernel."""
        link = session.link
        if link.closed or link.pending_bytes:
            return False
        transport = getattr(link.websocket, "transport", None)
        return transport is None or transport.get_write_buffer_size() == 0

    def _tick(self) -> None:
        """Log sessions that ended, opened or synced, and acknowledge changes whose bytes have left."""
        now = time.time()
        name = self.config.mailbox
        current = list(self.peer.sessions)
        live = set(current)
        for session, info in list(self._sessions.items()):
            if session in live:
                continue
            del self._sessions[session]
            connection = session.connection
            if info.synced_at is None:
                self.stats.interrupted_sessions += 1
            log.info("sync session %d with %s: ended after %.2fs%s; sent %d bytes, received %d", info.number,
                     session.link.name, now - info.opened, "" if info.synced_at else " before its sync completed",
                     connection.bytes_sent, connection.bytes_received)
            self.metrics.emit("session_closed", session=info.number, url=session.link.name,
                              seconds=now - info.opened, synced=info.synced_at is not None,
                              bytes_sent=connection.bytes_sent, bytes_received=connection.bytes_received,
                              close_code=connection.close_code, reason=connection.close_reason)
            if connection.close_code == CloseCode.UNAUTHORIZED and self._fatal is None:
                self._fatal = UnauthorizedMailboxError(
                    f"{session.link.name} refused to sync mailbox {name}: {connection.close_reason or 'not paired'}")
        for session in current:
            info = self._notice(session)
            if info.synced_at is None and name in session.synced:
                info.synced_at = session.last_sync or now
                self.stats.syncs += 1
                log.info("sync session %d with %s: mailbox %s in sync with peer %s after %.3fs", info.number,
                         session.link.name, name, session.connection.peer_id, info.synced_at - info.opened)
                self.metrics.emit("sync_complete", t=info.synced_at, session=info.number, url=session.link.name,
                                  remote_peer=session.connection.peer_id, seconds=info.synced_at - info.opened)
        for dialer in self._dialers:
            # Dialer words a 401 this way; nothing will change it but pairing the device again.
            if dialer.last_error and "(HTTP 401)" in dialer.last_error and self._fatal is None:
                self._fatal = ConfigError(dialer.last_error)
        self._acknowledge(current, now)

    def _notice(self, session: Any) -> _SessionInfo:
        """The bookkeeping of a session, begun (and logged) the first time it is seen."""
        known = self._sessions.get(session)
        if known is not None:
            return known
        self.stats.sessions += 1
        info = _SessionInfo(self.stats.sessions, session, session.connected_at)
        self._sessions[session] = info
        log.info("sync session %d with %s: connected", info.number, session.link.name)
        self.metrics.emit("session_open", t=info.opened, session=info.number, url=session.link.name)
        return info

    def _acknowledge(self, current: list[Any], now: float) -> None:
        if not self._unacked:
            return
        live = set(current)
        flushed = {s for s in current if self._flushed(s)}
        synced = {s for s in flushed if self.config.mailbox in s.synced}
        waiting: list[_Unacked] = []
        for entry in self._unacked:
            entry.sessions &= live  # a link that died before flushing: the next sync carries the change
            if entry.sessions & flushed:
                how = "flushed"
            elif not entry.sessions and synced:
                how = "synced"
            else:
                waiting.append(entry)
                continue
            self.stats.changes_acked += 1
            self.metrics.emit("change_acked", t=now, how=how, ids=entry.ids, update_ids=entry.update_ids,
                              made=entry.made, latency=now - entry.made)
        self._unacked = waiting

    @property
    def unacknowledged(self) -> int:
        """Local changes not yet known to have left towards a peer."""
        return len(self._unacked)

    async def wait_synced(self, *, timeout: float) -> bool:
        """Wait until a link reports the mailbox in sync; False on timeout."""
        return await self.peer.wait_synced(self.config.mailbox, timeout=timeout)

    # -------------------------------------------------------------------------------------------- running

    async def run(self, duration: float | None = None, *, stop: asyncio.Event | None = None) -> MobileStats:
        """Live the phone's life for ``duration`` seconds (None: until ``stop`` is set), then go offline.

        Raises what made it fail: a StorageError from the store, ConfigError when a peer refuses the device
        token, UnauthorizedMailboxError when a peer refuses the mailbox.
        """
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        self._ensure_monitor()
        assert self._monitor is not None
        self.metrics.emit("run_start", duration=duration, seed=self.config.seed, rate=self.config.rate,
                          oldest_shard=self.oldest_shard, mailbox=self.config.mailbox,
                          remotes=[remote.url for remote in self.config.remotes])
        log.info("mobile peer %s: mailbox %s, sync window from %s, %s", self.peer.peer_id, self.config.mailbox,
                 self.oldest_shard or "the beginning", "run until stopped" if duration is None
                 else f"run for {duration:.1f}s")
        workers = [asyncio.create_task(self._connectivity_loop(), name="crdtmail-mobile-connectivity")]
        if self.config.rate > 0:
            workers.append(asyncio.create_task(self._user_loop(), name="crdtmail-mobile-user"))
        stopper = asyncio.create_task(stop.wait())
        waiting: set[asyncio.Task[Any]] = {stopper, self._monitor, *workers}
        deadline = None if duration is None else loop.time() + duration
        failure: BaseException | None = None
        try:
            while failure is None:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done or stopper in done:
                    break
                for task in done:
                    waiting.discard(task)
                    if not task.cancelled() and task.exception() is not None:
                        failure = task.exception()
        finally:
            for task in (stopper, *workers):
                task.cancel()
            await asyncio.gather(stopper, *workers, return_exceptions=True)
            await self.go_offline(reason="stopping")
            await self._stop_monitor()
            self.metrics.emit("run_stop", stats=dataclasses.asdict(self.stats), unacknowledged=len(self._unacked))
        if failure is not None:
            raise failure
        return self.stats

    async def close(self) -> None:
        """Go offline, stop watching, close the metrics file; the replica stays open for its owner."""
        await self.go_offline(reason="closing")
        await self._stop_monitor()
        self.metrics.close()

    async def __aenter__(self) -> MobilePeer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# ------------------------------------------------------------------------------------------ command line
# The options themselves live in peers/mobile_args.py, which `crdtmail` imports without loading this module.


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one error line and exit status 1, like every other failure."""

    def error(self, message: str) -> Any:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m peers.mobile``."""
    parser = _Parser(prog="python -m peers.mobile", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace, replica: Replica) -> MobileConfig:
    """A MobileConfig from parsed options; peers come from --desktop and the data directory's [[peers]]."""
    mailbox = args.mailbox or replica.config.default_mailbox
    remotes: list[RemotePeer] = []
    if args.desktop or args.token:
        if not (args.desktop and args.token):
            raise ConfigError("--desktop URL and --token TOKEN go together")
        if not args.desktop.startswith(("ws://", "wss://")):
            raise ConfigError(f"--desktop must be a ws:// or wss:// URL, not {args.desktop!r}")
        remotes.append(RemotePeer(args.desktop, args.token, (mailbox,)))
    remotes += [peer for peer in replica.config.peers
                if mailbox in peer.mailboxes and all(peer.url != known.url for known in remotes)]
    if not remotes:
        raise ConfigError("nothing to dial: give --desktop URL --token TOKEN, or add a peer with `crdtmail connect`")
    if args.window_months < 0:
        raise ConfigError("--window-months must be 0 (everything) or more")
    if args.body_max_bytes < 0:
        raise ConfigError("--body-max-bytes must be 0 (no limit) or more")
    trace: tuple[Period, ...] | None = None
    repeats = False
    if args.trace is not None:
        periods, repeats = load_trace(args.trace)
        trace = tuple(periods)
    config = MobileConfig(
        mailbox=mailbox, remotes=tuple(remotes), seed=args.seed, rate=args.rate,
        window_months=args.window_months or None,
        bodies=BodyPolicy(newer_than_days=args.body_days or None, max_bytes=args.body_max_bytes or None),
        mean_online=args.mean_online, mean_offline=args.mean_offline, trace=trace, trace_repeats=repeats,
        flaky=args.flaky, flaky_mean=args.flaky_mean, metrics=args.metrics, now=args.now, device=args.device,
    )
    config.validate()
    return config


async def run_mobile(replica: Replica, config: MobileConfig, *, duration: float | None, out: TextIO) -> int:
    """Run a mobile peer until ``duration`` passes or SIGINT/SIGTERM arrives; print a summary line."""
    replica.claim_for_peer()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    mobile = MobilePeer(replica, config)
    try:
        stats = await mobile.run(duration, stop=stop)
    finally:
        await mobile.close()
        for signum in handled:
            loop.remove_signal_handler(signum)
    out.write(f"mobile peer {mobile.peer.peer_id}: {stats.summary()}; every change is committed\n")
    out.flush()
    return 0


def run_from_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Open (or create) the data directory and run; the body of ``main`` once options are parsed."""
    data_dir = resolve_data_dir(args.data_dir)
    replica = Replica.open(data_dir) if (data_dir / DATABASE_FILE).exists() else Replica.init(data_dir)
    with replica:
        config = config_from_args(args, replica)
        return asyncio.run(run_mobile(replica, config, duration=args.duration, out=out or sys.stdout))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peers.mobile``: exit 0 after a clean run, 1 with one error line on stderr otherwise."""
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:
        sys.stderr.write(f"crdtmail mobile: error: {exc}\n")
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # a line per online/offline switch and per sync session, always
    try:
        return run_from_args(args)
    except CrdtmailError as exc:
        sys.stderr.write(f"crdtmail mobile: error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"crdtmail mobile: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
