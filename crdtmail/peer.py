"""The peer: the one place that glues a replica's mailboxes, its store and the sync sessions of its links.

A local change is sent to every connected peer that shares the mailbox; a remote update is applied (its origin
is the connection it came from), relayed to every other connected peer, never back to its source, and
committed. So a chain A - B - C converges with no A - C link. Updates leave before they are committed here
(``Mailbox.observe_updates``): the commit costs more than the hop.

Endpoints: ``/sync`` speaks crdtmail's multiplexed protocol (docs/protocol.md); ``/<mailbox>/<document>``
speaks plain y-websocket for one document, so a stock Yjs client can sync a shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server

from crdtmail import heap
from crdtmail.auth import Device, DeviceRegistry
from crdtmail.config import RemotePeer
from crdtmail.errors import CrdtmailError, ModelError, ProtocolError
from crdtmail.model.backend import CommitBatch
from crdtmail.model.mailbox import INDEX_DOC, UNDATED, Mailbox, MailboxChange, is_document_name
from crdtmail.model.message import Envelope
from crdtmail.protocol.frames import (
    CloseCode,
    SyncType,
    decode_y_websocket,
    encode_y_websocket_sync,
    websocket_close_code,
)
from crdtmail.protocol.session import (
    BlobMissing,
    BlobReceived,
    BlobsWanted,
    CatalogReceived,
    ConnectionClosed,
    Event,
    HelloReceived,
    MailboxSource,
    MailboxSync,
    ProtocolViolation,
    Refused,
    Role,
    SyncComplete,
    SyncConnection,
    SyncStep1Received,
    Welcomed,
)
from crdtmail.replica import Replica
from crdtmail.transport import Dialer, Link, TransportLimits, serve_links

log = logging.getLogger(__name__)

# A peer that answers "missing" for a body it holds has usually just seen its file renamed or moved by a mail
# client; the body is asked for again after these delays (then not again on this connection).
MISSING_BODY_RETRY_SECONDS = (0.25, 1.0, 4.0, 15.0, 60.0)
# A session's hold on the allocator (crdtmail.heap) ends at its SyncComplete, or after this long: a peer that
# never answers must not keep this process from giving memory back for as long as the link lives.
HEAP_HOLD_SECONDS = 60.0
# Remote changes are written in groups (Mailbox.defer_remote_writes): the first one waiting is written at most
# this long after it was applied and passed on, together with whatever arrived meanwhile. Local changes are
# written before the operation returns.
GROUP_COMMIT_SECONDS = 0.005
# A shard takes about this many bytes per unit of its state vector's clocks (an envelope, a placement or a flag
# each add one): 125-145 in the generated mailboxes of bench/. A catalog's state vectors so tell roughly how many
# bytes a first sync is about to bring, before any of them arrives.
SHARD_BYTES_PER_CLOCK = 130
# Memory a shard arriving whole faults in, per byte of it: its frame, its payload, Yrs' decoding of it (3 times
# over, measured on the bench mailbox's month shards; the ones after reuse what the first ones freed).
PREFAULT_PER_SHARD_BYTE = 3
# Below this, faulting in ahead is not worth a thread.
PREFAULT_MIN_BYTES = 4 * 1024 * 1024


async def _after_ready_io() -> None:
    """Let the event loop run the callbacks of I/O that is ready before this task goes on.

    ``asyncio.sleep(0)`` puts the task back at the head of the loop's next pass, ahead of the I/O callbacks that
    pass finds ready (they are queued after it), so a frame that arrived during one long step of the task waited for
    the next step as well. A timer due at once is queued after them.
    """
    loop = asyncio.get_running_loop()
    resumed = loop.create_future()
    loop.call_later(0, resumed.set_result, None)
    await resumed


@dataclass(frozen=True)
class BodyPolicy:
    """Which message bodies a peer fetches from the peers it syncs with (a desktop: all of them).

    A phone keeps to recent, small mail: ``newer_than_days`` and ``max_bytes`` bound what is fetched ahead of
    time; the rest stays on the peers that have it. ``now`` fixes the clock for tests.
    """

    fetch: bool = True
    newer_than_days: float | None = None
    max_bytes: int | None = None
    now: float | None = None

    def wants(self, envelope: Envelope) -> bool:
        """Whether a message's body should be fetched ahead of time."""
        if not self.fetch or not envelope.body_sha256:
            return False
        if self.max_bytes is not None and envelope.size > self.max_bytes:
            return False
        if self.newer_than_days is not None:
            now = time.time() if self.now is None else self.now
            if envelope.date is None or envelope.date < now - self.newer_than_days * 86400:
                return False
        return True


class BodySource(Protocol):
    """Somewhere besides the blob store that holds message bodies (a desktop's Maildir files)."""

    def has_body(self, sha256: str) -> bool:
        """Whether this source can give the body."""
        ...

    def read_body(self, sha256: str) -> bytes | None:
        """The body, verified against its hash, or None when it is gone or does not match."""
        ...

    def take_body(self, sha256: str, data: bytes) -> bool:
        """Offer a verified body that just arrived; True when the source keeps it (the blob store need not)."""
        ...


@dataclass
class SessionStatus:
    """What ``crdtmail peers`` shows of one connection."""

    remote_peer: str
    role: str
    mailboxes: list[str]
    synced: list[str]
    connected_at: float
    last_sync: float | None
    bytes_sent: int
    bytes_received: int


@dataclass(eq=False)  # identity, not value: sessions live in a set
class _Session:
    """One link's protocol state and its per-mailbox syncs."""

    peer: Peer
    link: Link
    connection: SyncConnection
    device: Device | None = None
    wanted: Sequence[str] = ()
    syncs: dict[str, MailboxSync] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)
    connected_at: float = field(default_factory=time.time)
    last_sync: float | None = None
    missing_answers: dict[str, int] = field(default_factory=dict)  # body hash -> "missing" answers so far
    step1_waiting: deque[SyncStep1Received] = field(default_factory=deque)  # see handle_events
    # Per mailbox being synced: its hold on the allocator's large-allocations mode (crdtmail.heap), let go at
    # its SyncComplete, when the session ends, or after HEAP_HOLD_SECONDS.
    heap_holds: dict[str, heap.Hold] = field(default_factory=dict)

    async def run(self) -> None:
        self.peer.sessions.add(self)
        try:
            if self.connection.role is Role.CLIENT:
                self.connection.send_hello(self.peer.peer_id, self.wanted)
                self.flush()
            await self.link.deliver(self._take_frames)
            if self.connection.close_code is None:
                self.connection.connection_lost()
                self.handle_events()
        finally:
            self._release_heap(*self.heap_holds)
            self.peer.sessions.discard(self)
            for name in self.syncs:  # a sync cut short may have stored shards too
                self.peer.index_soon(name)

    def _take_frames(self, frames: list[bytes]) -> bool:
        """The frames one read of the link brought (called inside the transport's read callback); False once
        the connection has ended."""
        if self.heap_holds:
            heap.note_large(max(map(len, frames), default=0))
        # A burst that arrived together is applied under one commit per mailbox (relayed at that commit): a peer
        # that fell behind catches up instead of paying a commit per update.
        with self._one_commit() if len(frames) > 1 else contextlib.nullcontext():
            for frame in frames:
                self.connection.receive_data(frame)
                self.handle_events()
                # Each answer leaves as soon as it is ready: a serving peer that got the step 1s of several big
                # shards in one read would otherwise load every one before the first could start on its way.
                self.flush()
                if not self.connection.is_open and self.connection.close_code is not None:
                    break
        for name in self.synced:  # list what arrived whole: the first sync, a shard asked for after it
            self.peer.index_soon(name)
        self._release_heap(*self.synced)  # after the listing took its own hold
        return self.connection.is_open or self.connection.close_code is None

    def _one_commit(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for name in self.syncs:
            stack.enter_context(self.peer.mailbox(name).batch())
        return stack

    def handle_events(self) -> None:
        for event in self.connection.events_received():
            if isinstance(event, SyncStep1Received) and (self.step1_waiting or self.link.backed_up):
                # Answered once the peer has read the last answer: a first sync asks for every shard at once, and
                # loading them all while the first waits to be sent would delay it and hold them all in memory.
                self.step1_waiting.append(event)
                if len(self.step1_waiting) == 1:
                    self.link.when_writable(self._answer_waiting)
                continue
            if isinstance(event, HelloReceived):
                self._answer_hello(event)
            elif isinstance(event, Welcomed):
                log.info("connected to peer %s: syncing %s", event.peer_id, ", ".join(event.mailboxes) or "nothing")
                self._start(event.mailboxes)
            elif isinstance(event, Refused):
                log.warning("peer %s refused us: %s", self.link.name, event.reason)
            elif isinstance(event, BlobsWanted):
                for sha256 in event.hashes:
                    data = self.peer.blob(sha256)
                    if data is None:
                        self.connection.send_blob_missing(sha256)
                    else:
                        self.connection.send_blob(sha256, data)
            elif isinstance(event, BlobReceived):
                self.missing_answers.pop(event.sha256, None)
                self.peer.store_blob(event.sha256, event.data)
            elif isinstance(event, BlobMissing):
                self._ask_again_later(event.sha256)
            elif isinstance(event, ProtocolViolation):
                log.warning("closing link %s: %s", self.link.name, event.reason)
            elif isinstance(event, ConnectionClosed):
                self.flush()
                self.link.close_soon(websocket_close_code(event.code), event.reason[:120])
            self._to_syncs(event)
            if isinstance(event, CatalogReceived) and event.mailbox in self.heap_holds:
                self.flush()  # the step 1s first
                self._prefault_for(event)

    def _answer_waiting(self) -> None:
        """Answer the step 1s held back (``handle_events``) while the link takes what is sent."""
        try:
            while self.step1_waiting and not self.link.backed_up and not self.link.closed:
                self._to_syncs(self.step1_waiting.popleft())
                self.flush()
        except Exception:  # a loop callback: nobody else would see it
            log.exception("answering peer %s failed", self.link.name)
            self.link.close_soon(1011, "internal error")
            return
        if self.step1_waiting and not self.link.closed:
            self.link.when_writable(self._answer_waiting)

    def _to_syncs(self, event: Event) -> None:
        for sync in list(self.syncs.values()):
            for follow_up in sync.handle(event):
                if isinstance(follow_up, SyncComplete):
                    self.synced.add(follow_up.mailbox)
                    self.last_sync = time.time()
                    log.info("mailbox %s is in sync with %s", follow_up.mailbox, self.connection.peer_id)
                    missing = self.peer.missing_body_sizes(follow_up.mailbox)
                    self.want_bodies(sorted(missing), sizes={h: n for h, n in missing.items() if n is not None})

    def _answer_hello(self, hello: HelloReceived) -> None:
        device = self.device
        granted = [name for name in hello.mailboxes if device is not None and device.may_see(name)]
        refused = [name for name in hello.mailboxes if name not in granted]
        if not granted:
            self.connection.refuse(
                CloseCode.UNAUTHORIZED,
                f"this device is not paired for {', '.join(refused) or 'any mailbox'}; pair it with --for MAILBOX",
            )
            return
        if refused:
            log.info("device %s asked for mailboxes it was not paired for: %s", device and device.name,
                     ", ".join(refused))
        self.connection.welcome(self.peer.peer_id, granted)
        self._start(granted)

    def _start(self, mailboxes: Sequence[str]) -> None:
        for name in mailboxes:
            mailbox = self.peer.mailbox(name)
            sync = MailboxSync(self.connection, name, MailboxSource(mailbox, accepts=self.peer.accepts_document))
            self.syncs[name] = sync
            # A first sync brings (or sends) shards of megabytes, one after another.
            hold = self.heap_holds[name] = heap.Hold()
            asyncio.get_running_loop().call_later(HEAP_HOLD_SECONDS, hold.release)
            sync.start()

    def _prefault_for(self, catalog: CatalogReceived) -> None:
        """Before the shards this side asked for whole arrive, have the heap they will take faulted in on a helper
        thread (``heap.prefault``): the size comes from the peer's state vectors of them (``requested_whole``)."""
        clocks = sum(self.syncs[catalog.mailbox].requested_whole.values())
        size = clocks * SHARD_BYTES_PER_CLOCK * PREFAULT_PER_SHARD_BYTE
        if size >= PREFAULT_MIN_BYTES:
            heap.prefault(size)

    def _release_heap(self, *mailboxes: str) -> None:
        for name in mailboxes:
            hold = self.heap_holds.pop(name, None)
            if hold is not None:
                hold.release()

    def on_update(self, mailbox: str, document: str, update: bytes, origin: Any) -> None:
        sync = self.syncs.get(mailbox)
        if sync is not None:
            sync.on_update(document, update, origin)  # nothing goes back to the link it came from
            self.flush()

    def on_change(self, mailbox: str, change: MailboxChange) -> None:
        # The updates went out before the commit (on_update); what is left is asking for the new bodies.
        sync = self.syncs.get(mailbox)
        if sync is not None:
            if change.origin is self.connection and change.added and self.peer.bodies.fetch:
                # The peer that sent the new messages has their bodies.
                # In bulk: a shard's initial sync adds thousands of messages in one change.
                # The envelopes come with the change where it had them (a shard that arrived whole).
                known = change.envelopes
                rest = [message_id for message_id in change.added if message_id not in known]
                found = list(known.values())
                if rest:
                    found.extend(self.peer.mailbox(mailbox).envelopes(rest).values())
                envelopes = [e for e in found if self.peer.bodies.wants(e)]
                self.want_bodies(self.peer.lacking_blobs(e.body_sha256 for e in envelopes),
                                 sizes={e.body_sha256: e.size for e in envelopes})
            self.flush()

    def _ask_again_later(self, sha256: str) -> None:
        answers = self.missing_answers.get(sha256, 0)
        if answers >= len(MISSING_BODY_RETRY_SECONDS):
            self.missing_answers.pop(sha256, None)
            log.info("peer %s does not have body %s; it is asked for again on the next connection",
                     self.connection.peer_id, sha256[:16])
            return
        self.missing_answers[sha256] = answers + 1
        asyncio.get_running_loop().call_later(MISSING_BODY_RETRY_SECONDS[answers], self._ask_again, sha256)

    def _ask_again(self, sha256: str) -> None:
        if self.connection.is_open and self in self.peer.sessions and self.peer.lacking_blobs([sha256]):
            self.want_bodies([sha256])

    def want_bodies(self, hashes: Iterable[str], *, sizes: Mapping[str, int] | None = None) -> None:
        wanted = [h for h in hashes if h and not self.connection.is_wanted(h)]
        if wanted and self.connection.is_open:
            # The sizes (the envelopes' say) let the connection keep many small bodies in flight.
            self.connection.want_blobs(wanted, sizes=sizes)
            self.flush()

    def flush(self) -> None:
        for data in self.connection.data_to_send():
            self.link.send(data)

    def status(self) -> SessionStatus:
        return SessionStatus(
            remote_peer=self.connection.peer_id,
            role=self.connection.role.value,
            mailboxes=sorted(self.syncs),
            synced=sorted(self.synced),
            connected_at=self.connected_at,
            last_sync=self.last_sync,
            bytes_sent=self.connection.bytes_sent,
            bytes_received=self.connection.bytes_received,
        )


class _YSession:
    """One stock Yjs client on the single-document endpoint ``/<mailbox>/<document>`` (plain y-websocket).

    Sync messages only: awareness (presence) messages are read and dropped, as a mail replica has no cursors.
    """

    def __init__(self, peer: Peer, link: Link, mailbox: str, document: str) -> None:
        self.peer = peer
        self.link = link
        self.mailbox_name = mailbox
        self.document = document
        self.box = peer.mailbox(mailbox)

    async def run(self) -> None:
        self.peer.y_sessions.add(self)
        try:
            self.link.send(encode_y_websocket_sync(SyncType.STEP1, self.box.document_state_vector(self.document)))
            async for frame in self.link.frames():
                try:
                    message = decode_y_websocket(frame)
                    if message.sync_type is SyncType.STEP1:
                        diff = self.box.encode_document(self.document, message.payload)
                        self.link.send(encode_y_websocket_sync(SyncType.STEP2, diff))
                    elif message.sync_type is not None:
                        applied = self.box.apply_update(self.document, message.payload, self,
                                                        check_causality=message.sync_type is SyncType.UPDATE)
                        if not applied:  # it builds on something we lack: ask the client for it
                            state = self.box.document_state_vector(self.document)
                            self.link.send(encode_y_websocket_sync(SyncType.STEP1, state))
                        self.peer.index_soon(self.mailbox_name)  # a shard new here is stored whole, listed after
                except (ProtocolError, ModelError, ValueError) as exc:
                    log.warning("closing y-websocket client %s: %s", self.link.name, exc)
                    await self.link.close(websocket_close_code(CloseCode.INVALID_UPDATE), str(exc)[:120])
                    return
        finally:
            self.peer.y_sessions.discard(self)

    def on_update(self, mailbox: str, document: str, update: bytes, origin: Any) -> None:
        if mailbox == self.mailbox_name and document == self.document and origin is not self:
            self.link.send(encode_y_websocket_sync(SyncType.UPDATE, update))


class Peer:
    """A replica's mailboxes, kept in step with every peer it is linked to, listening or dialing."""

    def __init__(self, replica: Replica, *, limits: TransportLimits | None = None,
                 bodies: BodyPolicy | bool = True, oldest_shard: str | None = None) -> None:
        self.replica = replica
        # A phone's sync window: month shards older than this ("2026-09") are neither asked for nor sent.
        self.oldest_shard = oldest_shard
        self.opened_shards: set[str] = set()  # shards outside the window fetched on demand (request_shard)
        self.bodies = bodies if isinstance(bodies, BodyPolicy) else BodyPolicy(fetch=bodies)
        self._requested_bodies: set[str] = set()
        self.registry = DeviceRegistry(replica.store)
        self.limits = limits or TransportLimits()
        self.sessions: set[_Session] = set()
        self.y_sessions: set[_YSession] = set()
        self.dialers: list[Dialer] = []
        self._mailboxes: dict[str, Mailbox] = {}
        self._indexing: dict[str, asyncio.Task[None]] = {}
        self._write_timers: dict[str, asyncio.TimerHandle] = {}  # mailbox -> its group commit to come
        self.body_sources: list[BodySource] = []
        # Called with each body's hash once it is stored (a desktop then delivers the message to its Maildir).
        self.body_listeners: list[Callable[[str], None]] = []

    @property
    def peer_id(self) -> str:
        """This peer's identity."""
        return self.replica.peer_id

    def mailbox(self, name: str) -> Mailbox:
        """A mailbox of this replica (created when a peer first shares it), observed for changes to relay."""
        mailbox = self._mailboxes.get(name)
        if mailbox is None:
            mailbox = self.replica.mailbox(name, create=True)
            mailbox.observe_updates(functools.partial(self._relay, name))
            mailbox.observe(functools.partial(self._committed, name))
            mailbox.defer_remote_writes(functools.partial(self._schedule_write, name))
            self._mailboxes[name] = mailbox
        return mailbox

    def _schedule_write(self, mailbox: str) -> bool:
        """Have a mailbox's deferred remote changes written soon (``GROUP_COMMIT_SECONDS``); False when no event
        loop runs here to do it (the mailbox then writes at once)."""
        if mailbox in self._write_timers:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._write_timers[mailbox] = loop.call_later(GROUP_COMMIT_SECONDS, self._write_deferred, mailbox)
        return True

    def _write_deferred(self, name: str) -> None:
        self._write_timers.pop(name, None)
        mailbox = self._mailboxes.get(name)
        if mailbox is None:
            return
        try:
            mailbox.write_deferred()
        except CrdtmailError as exc:  # a loop callback: nobody else would see it
            log.error("mailbox %s: writing the changes peers sent failed: %s; they stay in memory, and peers send "
                      "them again on the next sync if this process stops first", name, exc)

    def _relay(self, mailbox: str, document: str, update: bytes, origin: Any) -> None:
        # Before the commit: a hop costs less than writing the rows and the SQLite transaction.
        for session in list(self.sessions):
            session.on_update(mailbox, document, update, origin)
        for y_session in list(self.y_sessions):
            y_session.on_update(mailbox, document, update, origin)

    def _committed(self, mailbox: str, change: MailboxChange) -> None:
        for session in list(self.sessions):
            session.on_change(mailbox, change)

    def index_soon(self, mailbox: str) -> None:
        """Build the listing rows of the shards that arrived whole in the background, a bounded piece per turn of
        the event loop (``Mailbox.index_steps``), so links keep being served meanwhile."""
        if mailbox in self._indexing or not self.mailbox(mailbox).unindexed_shards():
            return
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            return  # the peer is stopping: a task started now would be cut off; the next open lists them
        # Every step builds a shard of megabytes and drops it. Held from now on: the session that stored the shards
        # may let go of its own hold before the task first runs.
        hold = heap.Hold(large=True)
        task = asyncio.get_running_loop().create_task(self._index(mailbox))
        self._indexing[mailbox] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._indexing.pop(mailbox, None)
            hold.release()

        task.add_done_callback(finished)

    def index_now(self) -> None:
        """Build at once the listing rows of every shard that arrived whole (a one-shot sync, before it exits:
        the next command would otherwise build them when it opens the mailbox)."""
        for mailbox in self._mailboxes.values():
            mailbox.index_pending()

    async def _index(self, name: str) -> None:
        mailbox = self.mailbox(name)
        started = time.perf_counter()
        indexed = 0
        try:
            # A piece per turn of the loop (Mailbox.index_steps): the links are served between them.
            for done in mailbox.index_steps():
                if done is not None:
                    indexed += 1
                await _after_ready_io()
        except CrdtmailError as exc:  # a store that cannot be written, or a stored shard that cannot be decoded
            log.error("mailbox %s: building the listing of %s failed: %s; it is tried again when the mailbox is "
                      "next read or opened", name, ", ".join(mailbox.unindexed_shards()), exc)
            return
        log.info("mailbox %s: listed the messages of %d shards that arrived whole, in %.2f s", name, indexed,
                 time.perf_counter() - started)

    def accepts_document(self, name: str) -> bool:
        """Whether a document is synced with peers: every mailbox document, within the sync window if any."""
        if not is_document_name(name):
            return False
        if self.oldest_shard is None or name == INDEX_DOC or name in self.opened_shards:
            return True
        return name != UNDATED and name >= self.oldest_shard

    def request_shard(self, mailbox: str, shard: str) -> int:
        """Fetch one month shard outside the sync window (the user scrolled to older mail), from every connected
        peer that shares the mailbox; it is kept in step from then on. Returns how many peers were asked."""
        if not is_document_name(shard) or shard == INDEX_DOC:
            raise ModelError(f"{shard!r} is not a month shard (expected YYYY-MM or 'undated')")
        self.opened_shards.add(shard)
        asked = 0
        for session in list(self.sessions):
            sync = session.syncs.get(mailbox)
            if sync is not None and sync.request_document(shard):
                session.flush()
                asked += 1
        return asked

    def request_body(self, sha256: str) -> None:
        """Ask every linked peer (and every peer linked later) for one body, whatever the policy says."""
        self._requested_bodies.add(sha256)
        for session in list(self.sessions):
            session.want_bodies([sha256])

    def missing_body_sizes(self, mailbox: str) -> dict[str, int | None]:
        """Body hashes this peer wants and lacks (the policy's choice for this mailbox, and any requested), each
        with its size as its envelope gives it (None for one requested by hash)."""
        missing: dict[str, int | None] = dict.fromkeys(self.lacking_blobs(self._requested_bodies))
        if self.bodies.fetch:
            sizes = {e.body_sha256: e.size for e in self.mailbox(mailbox).all_envelopes() if self.bodies.wants(e)}
            missing.update((sha256, sizes[sha256]) for sha256 in self.lacking_blobs(sizes))
        return missing

    def lacking_blobs(self, hashes: Iterable[str]) -> list[str]:
        """The hashes among ``hashes`` of bodies this peer does not hold, each once, in order (``has_blob`` for
        many: the blob store is asked once per few hundred, not once per body)."""
        candidates = [h for h in dict.fromkeys(hashes) if h and not any(s.has_body(h) for s in self.body_sources)]
        stored = self.replica.store.backend("").stored_blobs(candidates) if candidates else set()
        return [h for h in candidates if h not in stored]

    def has_blob(self, sha256: str) -> bool:
        """Whether this peer holds a body, in its blob store or in a body source."""
        return any(s.has_body(sha256) for s in self.body_sources) or self.replica.store.backend("").has_blob(sha256)

    def blob(self, sha256: str) -> bytes | None:
        """A body this peer holds, verified."""
        # Body sources first: a desktop holds its bodies in the Maildir, and a look-up there is a dict probe.
        for source in self.body_sources:
            if source.has_body(sha256):
                data = source.read_body(sha256)
                if data is not None:
                    return data
        return self.replica.store.backend("").get_blob(sha256)

    def store_blob(self, sha256: str, data: bytes) -> None:
        """Keep a verified body received from a peer (a body source that waits for it takes it directly)."""
        if not any(source.take_body(sha256, data) for source in self.body_sources):
            self.replica.store.backend("").commit(CommitBatch(blobs={sha256: data}))
        for listener in list(self.body_listeners):
            listener(sha256)

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    ssl: ssl_module.SSLContext | None = None) -> Server:
        """Listen for paired devices (127.0.0.1 unless told otherwise)."""

        async def accept(link: Link) -> None:
            path = urlsplit(link.websocket.request.path if link.websocket.request else "/").path
            parts = [unquote(part) for part in path.strip("/").split("/")]
            if len(parts) == 2 and parts != ["", ""]:
                mailbox, document = parts
                device: Device | None = link.principal
                if device is None or not device.may_see(mailbox) or not is_document_name(document):
                    await link.close(websocket_close_code(CloseCode.UNAUTHORIZED),
                                     "this device is not paired for that mailbox, or no such document")
                    return
                await _YSession(self, link, mailbox, document).run()
                return
            await _Session(self, link, SyncConnection(Role.SERVER), device=link.principal).run()

        return await serve_links(accept, authenticate=self.registry.authenticate, host=host, port=port,
                                 limits=self.limits, ssl=ssl)

    def dial(self, url: str, token: str, mailboxes: Sequence[str], *,
             ssl: ssl_module.SSLContext | None = None, compression: str | None = None, **backoff: Any) -> Dialer:
        """A dialer that keeps a link to ``url`` up, syncing ``mailboxes``; run it with ``await dialer.run()``.

        ``compression="deflate"`` asks that peer for permessage-deflate on this link (a slow or metered one).
        """
        wanted = list(mailboxes)
        limits = dataclasses.replace(self.limits, compression=compression) if compression else self.limits

        async def on_link(link: Link) -> None:
            await _Session(self, link, SyncConnection(Role.CLIENT), wanted=wanted).run()

        dialer = Dialer(url, token, on_link, limits=limits, ssl=ssl, **backoff)
        self.dialers.append(dialer)
        return dialer

    def dial_remote(self, remote: RemotePeer, **backoff: Any) -> Dialer:
        """A dialer for a configured peer: its URL, token, mailboxes, TLS trust and compression."""
        return self.dial(remote.url, remote.token, remote.mailboxes, ssl=remote.client_tls(),
                         compression=remote.compression, **backoff)

    async def dial_until(self, remotes: Sequence[RemotePeer], done: Callable[[], bool], *, timeout: float,
                         max_delay: float = 2.0) -> list[Dialer]:
        """Dial ``remotes`` until ``done()`` holds or ``timeout`` passes, then stop and close every link.

        Returns the dialers, which tell what went wrong (``last_error``) with a peer that was not reached.
        """
        dialers = [self.dial_remote(remote, max_delay=max_delay) for remote in remotes]
        tasks = [asyncio.create_task(dialer.run()) for dialer in dialers]
        deadline = time.monotonic() + timeout
        while tasks and time.monotonic() < deadline and not done():
            await asyncio.sleep(0.05)
        for dialer in dialers:
            dialer.stop()
        for session in list(self.sessions):
            await session.link.close(1000, "done")
        await asyncio.gather(*tasks, return_exceptions=True)
        return dialers

    def status(self) -> list[SessionStatus]:
        """The connected peers, their mailboxes and sync state."""
        return [session.status() for session in self.sessions]

    def mailbox_status(self) -> dict[str, dict[str, int]]:
        """Per mailbox this peer shares: remote updates held back until the updates they depend on arrive, and
        shards that arrived whole whose messages are not listed yet (``index_soon`` is on them)."""
        return {name: {"held_updates": mailbox.held_updates(), "shards_to_list": len(mailbox.unindexed_shards())}
                for name, mailbox in sorted(self._mailboxes.items())}

    async def wait_synced(self, mailbox: str, *, timeout: float, condition: Callable[[], bool] | None = None) -> bool:
        """Wait until some link reports ``mailbox`` in sync (and ``condition`` holds); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(mailbox in s.synced for s in self.sessions) and (condition is None or condition()):
                return True
            await asyncio.sleep(0.02)
        return False
