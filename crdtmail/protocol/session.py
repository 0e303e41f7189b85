"""Sans-I/O sync sessions: one ``SyncConnection`` per WebSocket connection, one ``MailboxSync`` per mailbox on it.

``SyncConnection`` turns whole WebSocket messages into events and method calls into messages, in the style of
python-websockets' protocol objects::

    connection.receive_data(message)          # one whole binary WebSocket message
    for event in connection.events_received():
        ...                                   # react; calls like send_update() queue frames
    for data in connection.data_to_send():
        await websocket.send(data)            # the transport's job; nothing here does I/O

Handshake: the client (the side that opened the WebSocket) sends HELLO; the server answers WELCOME with the
mailboxes it grants, or REFUSE. The connection then is OPEN and both sides may send CATALOG, SYNC and blob
frames for granted mailboxes. Either side ends it with CLOSE; the other echoes it.

The states and what moves between them (``_TRANSITIONS`` is the table the code checks against)::

    client:  CONNECTING --send HELLO--> HELLO_SENT --recv WELCOME--> OPEN
                                        HELLO_SENT --recv REFUSE---> CLOSED
    server:  CONNECTING --recv HELLO--> HELLO_RECEIVED --send WELCOME--> OPEN
                                        HELLO_RECEIVED --send REFUSE---> CLOSED
    both:    OPEN --send/recv SYNC, CATALOG, BLOB_*--> OPEN
             any open state --send CLOSE--> CLOSING --recv CLOSE--> CLOSED
             any open state --recv CLOSE (echoed)--> CLOSED
             any state --peer broke the protocol, or transport lost--> CLOSED

Hostile input never raises out of ``receive_data`` and never produces an event that carries its data: the
connection queues a CLOSE (a REFUSE during the handshake) with a specific ``CloseCode`` and reason, emits
``ProtocolViolation`` and ``ConnectionClosed``, and ignores everything that arrives after. A local call that
does not fit the state (sending SYNC before the handshake, for a mailbox not granted, ...) raises a
``ProtocolError`` instead: that is a bug on this side, not the peer's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from crdtmail.digest import sha256_hex
from crdtmail.errors import (
    BlobIntegrityError,
    BlobMismatchError,
    FrameError,
    FrameTooLargeError,
    InvalidUpdateError,
    LimitExceededError,
    ModelError,
    ProtocolError,
    ProtocolStateError,
    UnauthorizedMailboxError,
    UnknownFrameError,
    VersionMismatchError,
)
from crdtmail.protocol.encoding import EMPTY_STATE_VECTOR, decode_state_vector, dominates
from crdtmail.protocol.frames import (
    DEFAULT_LIMITS,
    EMPTY_UPDATE,
    PROTOCOL_VERSION,
    BlobChunkFrame,
    BlobMissingFrame,
    BlobWantFrame,
    CatalogEntry,
    CatalogFrame,
    CloseCode,
    CloseFrame,
    Feature,
    Frame,
    HelloFrame,
    Limits,
    RefuseFrame,
    SyncFrame,
    SyncType,
    WelcomeFrame,
    decode_frame,
    encode_frame,
    normalise_sha256,
)

__all__ = [
    "RELAY_MEMORY",
    "UNKNOWN_BLOB_BYTES",
    "BlobMissing",
    "BlobReceived",
    "BlobsWanted",
    "CatalogReceived",
    "ChangeLike",
    "ConnectionClosed",
    "Event",
    "HelloReceived",
    "MailboxSource",
    "MailboxSync",
    "ProtocolViolation",
    "Refused",
    "Role",
    "State",
    "SyncComplete",
    "SyncConnection",
    "SyncSource",
    "SyncStep1Received",
    "SyncStep2Received",
    "UpdateReceived",
    "Welcomed",
    "close_code_for",
]


class Role(Enum):
    """Which end of the WebSocket this is: the client sends HELLO, the server answers it."""

    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """Where a connection is in its life; see the module docstring for the transitions."""

    CONNECTING = "connecting"
    HELLO_SENT = "hello-sent"
    HELLO_RECEIVED = "hello-received"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Act(Enum):
    SEND_HELLO = "send HELLO"
    RECV_HELLO = "receive HELLO"
    SEND_WELCOME = "send WELCOME"
    RECV_WELCOME = "receive WELCOME"
    SEND_REFUSE = "send REFUSE"
    RECV_REFUSE = "receive REFUSE"
    SEND_DATA = "send data frames"
    RECV_DATA = "receive data frames"
    SEND_CLOSE = "send CLOSE"
    RECV_CLOSE = "receive CLOSE"


_LIVE = (State.CONNECTING, State.HELLO_SENT, State.HELLO_RECEIVED, State.OPEN)
_COMMON: dict[tuple[State, _Act], State] = {
    (State.OPEN, _Act.SEND_DATA): State.OPEN,
    (State.OPEN, _Act.RECV_DATA): State.OPEN,
    (State.CLOSING, _Act.RECV_CLOSE): State.CLOSED,
    **{(state, _Act.SEND_CLOSE): State.CLOSING for state in _LIVE},
    **{(state, _Act.RECV_CLOSE): State.CLOSED for state in _LIVE},
}
_TRANSITIONS: dict[Role, dict[tuple[State, _Act], State]] = {
    Role.CLIENT: {
        **_COMMON,
        (State.CONNECTING, _Act.SEND_HELLO): State.HELLO_SENT,
        (State.HELLO_SENT, _Act.RECV_WELCOME): State.OPEN,
        (State.HELLO_SENT, _Act.RECV_REFUSE): State.CLOSED,
    },
    Role.SERVER: {
        **_COMMON,
        (State.CONNECTING, _Act.RECV_HELLO): State.HELLO_RECEIVED,
        (State.HELLO_RECEIVED, _Act.SEND_WELCOME): State.OPEN,
        (State.HELLO_RECEIVED, _Act.SEND_REFUSE): State.CLOSED,
    },
}

_CODES: tuple[tuple[type[ProtocolError], CloseCode], ...] = (
    (FrameTooLargeError, CloseCode.FRAME_TOO_LARGE),
    (UnknownFrameError, CloseCode.UNKNOWN_FRAME),
    (FrameError, CloseCode.MALFORMED_FRAME),
    (VersionMismatchError, CloseCode.VERSION_MISMATCH),
    (UnauthorizedMailboxError, CloseCode.UNAUTHORIZED),
    (LimitExceededError, CloseCode.LIMIT_EXCEEDED),
    (ProtocolStateError, CloseCode.UNEXPECTED_FRAME),
    (BlobMismatchError, CloseCode.BLOB_MISMATCH),
    (InvalidUpdateError, CloseCode.INVALID_UPDATE),
)


def close_code_for(error: ProtocolError) -> CloseCode:
    """The close code that reports ``error`` to the peer."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return CloseCode.PROTOCOL_ERROR


# ------------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Server side: the client's HELLO. Answer with ``welcome(...)`` (granting some mailboxes) or ``refuse(...)``."""

    peer_id: str
    mailboxes: tuple[str, ...]
    features: int
    version: int


@dataclass(frozen=True, slots=True)
class Welcomed:
    """Client side: the server accepted; ``mailboxes`` are the ones granted. The connection is OPEN."""

    peer_id: str
    mailboxes: tuple[str, ...]
    features: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Client side: the server refused the HELLO (a ``ConnectionClosed`` follows)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CatalogReceived:
    """The peer's documents in a granted mailbox, with their state vectors (already validated)."""

    mailbox: str
    entries: tuple[CatalogEntry, ...]


@dataclass(frozen=True, slots=True)
class SyncStep1Received:
    """The peer's state vector for a document: it asks for what it lacks (answer with a step 2)."""

    mailbox: str
    document: str
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2Received:
    """A state diff for a document, normally the answer to this side's step 1."""

    mailbox: str
    document: str
    update: bytes


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """An incremental update to a document, sent as it happened on the peer (or one it relays)."""

    mailbox: str
    document: str
    update: bytes


@dataclass(frozen=True, slots=True)
class BlobsWanted:
    """The peer asks for these blobs; answer each with ``send_blob`` or ``send_blob_missing``."""

    hashes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BlobReceived:
    """A wanted blob arrived whole, and its bytes hash to ``sha256``."""

    sha256: str
    data: bytes


@dataclass(frozen=True, slots=True)
class BlobMissing:
    """The peer does not hold (or will not send) a wanted blob."""

    sha256: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; this side queued a CLOSE (or REFUSE) with ``code`` and ``reason``."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over (always the last event). ``remote`` says whether the peer ended it.

    Once this is emitted, send what ``data_to_send`` still returns, then close the socket with
    ``websocket_close_code(code)``.
    """

    code: int
    reason: str
    remote: bool


@dataclass(frozen=True, slots=True)
class SyncComplete:
    """Emitted by ``MailboxSync``: the initial sync of a mailbox finished (this side has what the peer had)."""

    mailbox: str


Event = (
    HelloReceived | Welcomed | Refused | CatalogReceived | SyncStep1Received | SyncStep2Received | UpdateReceived
    | BlobsWanted | BlobReceived | BlobMissing | ProtocolViolation | ConnectionClosed | SyncComplete
)
"""Anything ``SyncConnection.events_received`` or ``MailboxSync.handle`` returns."""


@dataclass(slots=True)
class _Assembly:
    total: int
    data: bytearray


_FRAME_NAMES: dict[type[Any], str] = {
    HelloFrame: "HELLO",
    WelcomeFrame: "WELCOME",
    RefuseFrame: "REFUSE",
    SyncFrame: "SYNC",
    CatalogFrame: "CATALOG",
    BlobWantFrame: "BLOB_WANT",
    BlobChunkFrame: "BLOB_CHUNK",
    BlobMissingFrame: "BLOB_MISSING",
    CloseFrame: "CLOSE",
}


# -------------------------------------------------------------------------------------------------- connection


class SyncConnection:
    """The sans-I/O state of one crdtmail WebSocket connection.

    ``role`` is ``Role.CLIENT`` on the side that opened the WebSocket, ``Role.SERVER`` on the side that accepted
    it. ``limits`` bound what is accepted and sent. ``version`` is the protocol version spoken in HELLO and
    WELCOME; only tests and future versions change it.

    The connection object is also the transaction origin of every update applied from it, so a change can be
    relayed to every other connection and never echoed to this one.
    """

    def __init__(self, role: Role, *, limits: Limits = DEFAULT_LIMITS, version: int = PROTOCOL_VERSION) -> None:
        self.role = role
        self.limits = limits
        self.version = version
        self._state = State.CONNECTING
        self._transitions = _TRANSITIONS[role]
        self._events: list[Event] = []
        self._outgoing: list[bytes] = []
        self._requested: tuple[str, ...] = ()
        self._granted: frozenset[str] = frozenset()
        self._peer_id = ""
        self._peer_features = 0
        self._documents: set[tuple[str, str]] = set()
        self._close_code: int | None = None
        self._close_reason = ""
        # Blobs this side asked for: sent on the wire and waiting for an answer, and queued behind the window.
        # Each with the bytes it counts for in the window (see ``want_blobs``).
        self._wants_sent: dict[str, int] = {}
        self._wants_sent_bytes = 0
        self._want_queue: deque[str] = deque()
        self._queued_wants: dict[str, int] = {}  # the queue's members, so a membership test is not a scan
        self._assembling: dict[str, _Assembly] = {}
        self._assembling_bytes = 0
        # Blobs the peer asked for and this side has not answered yet (a dict keeps their order).
        self._owed: dict[str, None] = {}
        self.bytes_received = 0
        """Bytes of every message given to ``receive_data``."""
        self.bytes_sent = 0
        """Bytes of every frame queued for sending."""

    def __repr__(self) -> str:
        return f"<SyncConnection {self.role.value} {self._state.value} peer={self._peer_id!r}>"

    # ------------------------------------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def is_open(self) -> bool:
        """Whether the handshake succeeded and the connection is not closing."""
        return self._state is State.OPEN

    @property
    def granted(self) -> frozenset[str]:
        """The mailboxes this connection may sync (empty until the handshake succeeded)."""
        return self._granted

    @property
    def peer_id(self) -> str:
        """The id the peer gave in its HELLO or WELCOME."""
        return self._peer_id

    @property
    def peer_features(self) -> int:
        """The ``Feature`` bits the peer announced."""
        return self._peer_features

    @property
    def close_code(self) -> int | None:
        """The code of the CLOSE or REFUSE that ended (or is ending) the connection."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The reason that came with ``close_code``."""
        return self._close_reason

    @property
    def wanted_blobs(self) -> frozenset[str]:
        """Blobs this side asked for and has not received an answer for (sent or still queued)."""
        return frozenset(self._wants_sent) | frozenset(self._queued_wants)

    def is_wanted(self, sha256: str) -> bool:
        """Whether this side asked for the blob (sent or still queued) and has no answer yet."""
        return sha256 in self._wants_sent or sha256 in self._queued_wants

    @property
    def owed_blobs(self) -> tuple[str, ...]:
        """Blobs the peer asked for that this side has not answered yet, oldest first."""
        return tuple(self._owed)

    # ------------------------------------------------------------------------------------------------ I/O

    def receive_data(self, data: bytes | str) -> None:
        """Take one whole WebSocket message; never raises for anything the peer sent.

        Frames are binary: a text message (``str``) is a protocol error like any other malformed frame.
        """
        if self._state is State.CLOSED:
            return
        self.bytes_received += len(data)
        try:
            if isinstance(data, str):
                raise FrameError("a text WebSocket message: crdtmail frames are binary messages")
            frame = decode_frame(data, limits=self.limits)
        except ProtocolError as exc:
            if self._state is not State.CLOSING:
                self._abort(exc)
            return
        if self._state is State.CLOSING and not isinstance(frame, CloseFrame):
            return  # the peer had not seen our CLOSE yet; nothing it says now counts
        try:
            self._handle(frame)
        except ProtocolError as exc:
            self._abort(exc)
        except Exception as exc:  # a bug here must not let a peer crash the caller's loop
            self._abort(ProtocolError(f"internal error while handling a {_FRAME_NAMES[type(frame)]} frame: {exc!r}"))

    def connection_lost(self) -> None:
        """The transport ended (socket closed or failed); ends the connection if no CLOSE did."""
        if self._state is State.CLOSED:
            return
        if self._state is State.CLOSING and self._close_code is not None:
            self._finish(self._close_code, self._close_reason, remote=False)
        else:
            self._finish(CloseCode.CONNECTION_LOST, "the connection was lost without a CLOSE frame", remote=True)

    def events_received(self) -> list[Event]:
        """Events since the last call, in order."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """Frames queued since the last call, in order; each is one binary WebSocket message."""
        data, self._outgoing = self._outgoing, []
        return data

    # ------------------------------------------------------------------------------------------- handshake

    def send_hello(self, peer_id: str, mailboxes: Iterable[str], *, features: int = Feature.NONE) -> None:
        """Client: open the handshake, asking for ``mailboxes``."""
        requested = tuple(dict.fromkeys(mailboxes))
        self._send(HelloFrame(self.version, peer_id, requested, int(features)), _Act.SEND_HELLO)
        self._requested = requested

    def welcome(self, peer_id: str, mailboxes: Iterable[str], *, features: int = Feature.NONE) -> None:
        """Server: accept the HELLO, granting ``mailboxes`` (a subset of those asked for)."""
        granted = tuple(dict.fromkeys(mailboxes))
        extra = [name for name in granted if name not in self._requested]
        if extra:
            raise UnauthorizedMailboxError(f"cannot grant mailboxes the client did not ask for: {extra}")
        self._send(WelcomeFrame(self.version, peer_id, granted, int(features)), _Act.SEND_WELCOME)
        self._granted = frozenset(granted)

    def refuse(self, code: int, reason: str) -> None:
        """Server: refuse the HELLO; the connection ends."""
        self._send(RefuseFrame(code, reason), _Act.SEND_REFUSE)
        self._finish(code, reason, remote=False)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; does nothing if the connection is already closing or closed."""
        if self._state in (State.CLOSING, State.CLOSED):
            return
        self._send(CloseFrame(code, reason), _Act.SEND_CLOSE)
        self._close_code, self._close_reason = code, reason
        self._drop_blob_state()

    def fail(self, error: ProtocolError) -> None:
        """Close at once because the peer broke the protocol in a way an upper layer found (a bad update).

        Queues CLOSE with the matching code, emits ``ProtocolViolation`` and ``ConnectionClosed``; everything
        that arrives afterwards is ignored.
        """
        if self._state is not State.CLOSED:
            self._abort(error)

    # ------------------------------------------------------------------------------------------------ sync

    def send_catalog(self, mailbox: str, entries: Iterable[CatalogEntry | tuple[str, bytes]]) -> None:
        """Send the documents held in ``mailbox`` with their state vectors."""
        items = tuple(entry if isinstance(entry, CatalogEntry) else CatalogEntry(*entry) for entry in entries)
        self._send_data(CatalogFrame(mailbox, items), mailbox)

    def send_sync_step1(self, mailbox: str, document: str, state_vector: bytes) -> None:
        """Ask the peer for what ``state_vector`` lacks of a document."""
        self._send_data(SyncFrame(mailbox, document, SyncType.STEP1, state_vector), mailbox)

    def send_sync_step2(self, mailbox: str, document: str, update: bytes) -> None:
        """Answer a step 1 with a state diff."""
        self._send_data(SyncFrame(mailbox, document, SyncType.STEP2, update), mailbox)

    def send_update(self, mailbox: str, document: str, update: bytes) -> None:
        """Send an incremental update of a document."""
        self._send_data(SyncFrame(mailbox, document, SyncType.UPDATE, update), mailbox)

    # ----------------------------------------------------------------------------------------------- blobs

    def want_blobs(self, hashes: Iterable[str], *, sizes: Mapping[str, int] | None = None) -> None:
        """Ask the peer for blobs by SHA-256 hex; the rest are asked for as answers come in. Blobs already wanted
        are not asked for twice.

        Outstanding at once: at most ``limits.blob_want_window`` blobs and ``limits.blob_want_bytes`` bytes (and
        always at least one), each blob counted at its expected size from ``sizes`` (keyed as given; a hint for
        pacing only, nothing is checked against it) or at ``UNKNOWN_BLOB_BYTES`` without one. So many small
        bodies stream with a deep pipeline while large ones cannot pile up in the peer's send buffer.
        """
        self._require_open("ask for blobs")
        for value in hashes:
            sha256 = normalise_sha256(value)
            if sha256 not in self._wants_sent and sha256 not in self._queued_wants:
                size = sizes.get(value) if sizes is not None else None
                self._queued_wants[sha256] = UNKNOWN_BLOB_BYTES if size is None else max(0, int(size))
                self._want_queue.append(sha256)
        self._flush_wants()

    def send_blob(self, sha256: str, data: bytes) -> bool:
        """Send a blob the peer asked for, in chunks of ``limits.blob_chunk_bytes``.

        A blob larger than ``limits.max_pending_blob_bytes`` (which the peer would refuse) is answered with
        BLOB_MISSING instead, and False is returned. Raises ``BlobIntegrityError`` if ``data`` does not hash to
        ``sha256``: a damaged local blob is never sent.
        """
        sha256 = self._owed_blob(sha256)
        if sha256_hex(data) != sha256:
            raise BlobIntegrityError(f"blob {sha256} does not hash to its name; it was not sent")
        if len(data) > self.limits.max_pending_blob_bytes:
            self.send_blob_missing(sha256)
            return False
        size = self.limits.blob_chunk_bytes
        view = memoryview(data)
        offset = 0
        while True:
            chunk = bytes(view[offset : offset + size])
            self._send_data(BlobChunkFrame(sha256, offset, len(data), chunk), None)
            offset += len(chunk)
            if offset >= len(data):
                break
        del self._owed[sha256]
        return True

    def send_blob_missing(self, sha256: str) -> None:
        """Tell the peer a blob it asked for is not here."""
        sha256 = self._owed_blob(sha256)
        self._send_data(BlobMissingFrame(sha256), None)
        del self._owed[sha256]

    def _owed_blob(self, value: str) -> str:
        self._require_open("send a blob")
        sha256 = normalise_sha256(value)
        if sha256 not in self._owed:
            raise ProtocolStateError(f"the peer did not ask for blob {sha256}")
        return sha256

    def _flush_wants(self, *, refill: bool = False) -> None:
        room = self.limits.blob_want_window - len(self._wants_sent)
        byte_room = self.limits.blob_want_bytes - self._wants_sent_bytes
        fits = fit_bytes = 0  # how many of the queue's head fit in both rooms, and their bytes
        for sha256 in self._want_queue:
            size = self._queued_wants[sha256]
            # A blob larger than the whole byte window still goes, alone, once nothing else is outstanding.
            if fits >= room or (size > byte_room - fit_bytes and (fits or self._wants_sent)):
                break
            fits += 1
            fit_bytes += size
        if (refill and fits < min(len(self._want_queue), max(1, self.limits.blob_want_window // 4))
                and fit_bytes < self.limits.blob_want_bytes // 4):
            # Refill in batches, not a frame per blob answered: each frame costs a send (and a client's mask).
            return
        batch: list[str] = []
        for _ in range(fits):
            sha256 = self._want_queue.popleft()
            size = self._queued_wants.pop(sha256)
            self._wants_sent[sha256] = size
            self._wants_sent_bytes += size
            batch.append(sha256)
        if batch:
            self._send_data(BlobWantFrame(tuple(batch)), None)

    def _answered(self, sha256: str) -> None:
        self._wants_sent_bytes -= self._wants_sent.pop(sha256)

    def _drop_blob_state(self) -> None:
        self._wants_sent.clear()
        self._wants_sent_bytes = 0
        self._want_queue.clear()
        self._queued_wants.clear()
        self._assembling.clear()
        self._assembling_bytes = 0
        self._owed.clear()

    # ------------------------------------------------------------------------------------------- internals

    def _require_open(self, what: str) -> None:
        if self._state is not State.OPEN:
            raise ProtocolStateError(f"cannot {what}: the connection is {self._state.value}, not open")

    def _next_state(self, act: _Act) -> State | None:
        return self._transitions.get((self._state, act))

    def _send(self, frame: Frame, act: _Act) -> None:
        target = self._next_state(act)
        if target is None:
            raise ProtocolStateError(f"cannot {act.value} as {self.role.value} in state {self._state.value}")
        data = encode_frame(frame, limits=self.limits)  # may raise: the state is unchanged then
        self._state = target
        self._queue(data)

    def _send_data(self, frame: Frame, mailbox: str | None) -> None:
        self._require_open(f"send {_FRAME_NAMES[type(frame)]}")
        if mailbox is not None and mailbox not in self._granted:
            raise UnauthorizedMailboxError(f"mailbox {mailbox!r} is not granted on this connection")
        self._send(frame, _Act.SEND_DATA)

    def _queue(self, data: bytes) -> None:
        self._outgoing.append(data)
        self.bytes_sent += len(data)

    def _expect(self, act: _Act, frame: Frame) -> State:
        target = self._next_state(act)
        if target is None:
            name = _FRAME_NAMES[type(frame)]
            if self._state in (State.CONNECTING, State.HELLO_SENT, State.HELLO_RECEIVED):
                raise ProtocolStateError(f"unexpected {name} frame before the handshake finished")
            raise ProtocolStateError(f"unexpected {name} frame in state {self._state.value}")
        return target

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _finish(self, code: int, reason: str, *, remote: bool) -> None:
        self._state = State.CLOSED
        self._close_code, self._close_reason = code, reason
        self._drop_blob_state()
        self._emit(ConnectionClosed(code, reason, remote))

    def _abort(self, error: ProtocolError) -> None:
        code = close_code_for(error)
        reason = str(error)
        # During the handshake the client waits for WELCOME or REFUSE, so a server refuses rather than closes.
        if self.role is Role.SERVER and self._state is State.HELLO_RECEIVED:
            self._queue(encode_frame(RefuseFrame(code, reason), limits=self.limits))
        elif self._state is not State.CLOSING:
            self._queue(encode_frame(CloseFrame(code, reason), limits=self.limits))
        self._emit(ProtocolViolation(code, reason))
        self._finish(code, reason, remote=False)

    def _handle(self, frame: Frame) -> None:
        if isinstance(frame, HelloFrame):
            self._on_hello(frame)
        elif isinstance(frame, WelcomeFrame):
            self._on_welcome(frame)
        elif isinstance(frame, RefuseFrame):
            self._expect(_Act.RECV_REFUSE, frame)
            self._emit(Refused(frame.code, frame.reason))
            self._finish(frame.code, frame.reason, remote=True)
        elif isinstance(frame, CloseFrame):
            self._on_close(frame)
        else:
            self._expect(_Act.RECV_DATA, frame)
            self._on_data(frame)

    def _on_hello(self, frame: HelloFrame) -> None:
        self._state = self._expect(_Act.RECV_HELLO, frame)
        if frame.version != self.version:
            raise VersionMismatchError(
                f"protocol version mismatch: the client speaks version {frame.version},"
                f" this server speaks version {self.version}"
            )
        self._requested = frame.mailboxes
        self._peer_id = frame.peer_id
        self._peer_features = frame.features
        self._emit(HelloReceived(frame.peer_id, frame.mailboxes, frame.features, frame.version))

    def _on_welcome(self, frame: WelcomeFrame) -> None:
        target = self._expect(_Act.RECV_WELCOME, frame)
        if frame.version != self.version:
            raise VersionMismatchError(
                f"protocol version mismatch: the server speaks version {frame.version},"
                f" this client speaks version {self.version}"
            )
        extra = [name for name in frame.mailboxes if name not in self._requested]
        if extra:
            raise UnauthorizedMailboxError(f"the server granted mailboxes that were not asked for: {extra}")
        self._state = target
        self._granted = frozenset(frame.mailboxes)
        self._peer_id = frame.peer_id
        self._peer_features = frame.features
        self._emit(Welcomed(frame.peer_id, frame.mailboxes, frame.features))

    def _on_close(self, frame: CloseFrame) -> None:
        target = self._expect(_Act.RECV_CLOSE, frame)
        if self._state is State.CLOSING and self._close_code is not None:
            self._state = target
            self._finish(self._close_code, self._close_reason, remote=False)
            return
        # Echo the code so the peer knows its CLOSE was seen, as WebSocket close frames do.
        self._queue(encode_frame(CloseFrame(frame.code, ""), limits=self.limits))
        self._state = target
        self._finish(frame.code, frame.reason, remote=True)

    def _check_mailbox(self, mailbox: str, documents: Sequence[str]) -> None:
        if mailbox not in self._granted:
            raise UnauthorizedMailboxError(f"mailbox {mailbox!r} was not granted on this connection")
        new = {(mailbox, document) for document in documents} - self._documents
        if len(self._documents) + len(new) > self.limits.max_documents:
            raise LimitExceededError(
                f"the peer named more than {self.limits.max_documents} documents on this connection"
            )
        self._documents |= new

    def _on_data(self, frame: Frame) -> None:
        if isinstance(frame, SyncFrame):
            self._check_mailbox(frame.mailbox, (frame.document,))
            if frame.sync_type is SyncType.STEP1:
                self._emit(SyncStep1Received(frame.mailbox, frame.document, frame.payload))
            elif frame.sync_type is SyncType.STEP2:
                self._emit(SyncStep2Received(frame.mailbox, frame.document, frame.payload))
            else:
                self._emit(UpdateReceived(frame.mailbox, frame.document, frame.payload))
        elif isinstance(frame, CatalogFrame):
            self._check_mailbox(frame.mailbox, [entry.document for entry in frame.entries])
            self._emit(CatalogReceived(frame.mailbox, frame.entries))
        elif isinstance(frame, BlobWantFrame):
            self._on_blob_want(frame)
        elif isinstance(frame, BlobChunkFrame):
            self._on_blob_chunk(frame)
        elif isinstance(frame, BlobMissingFrame):
            if frame.sha256 not in self._wants_sent:
                raise ProtocolStateError(f"BLOB_MISSING for blob {frame.sha256}, which was not asked for")
            self._answered(frame.sha256)
            assembly = self._assembling.pop(frame.sha256, None)
            if assembly is not None:
                self._assembling_bytes -= assembly.total
            self._emit(BlobMissing(frame.sha256))
            self._flush_wants(refill=True)

    def _on_blob_want(self, frame: BlobWantFrame) -> None:
        new = [sha256 for sha256 in frame.hashes if sha256 not in self._owed]
        if len(self._owed) + len(new) > self.limits.max_blob_wants:
            raise LimitExceededError(
                f"the peer has more than {self.limits.max_blob_wants} blob requests outstanding"
            )
        self._owed.update(dict.fromkeys(new))
        if new:
            self._emit(BlobsWanted(tuple(new)))

    def _on_blob_chunk(self, frame: BlobChunkFrame) -> None:
        sha256 = frame.sha256
        if sha256 not in self._wants_sent:
            raise ProtocolStateError(f"BLOB_CHUNK for blob {sha256}, which was not asked for")
        assembly = self._assembling.get(sha256)
        if assembly is None:
            if frame.offset != 0:
                raise FrameError(f"blob {sha256} starts at offset {frame.offset}, not 0")
            if self._assembling_bytes + frame.total > self.limits.max_pending_blob_bytes:
                raise LimitExceededError(
                    f"blob {sha256} ({frame.total} bytes) would put more than"
                    f" {self.limits.max_pending_blob_bytes} bytes of blobs in reassembly"
                )
            assembly = _Assembly(frame.total, bytearray())
            self._assembling[sha256] = assembly
            self._assembling_bytes += frame.total
        elif frame.total != assembly.total or frame.offset != len(assembly.data):
            raise FrameError(
                f"blob {sha256} chunk at offset {frame.offset} of {frame.total} bytes does not follow the"
                f" {len(assembly.data)} of {assembly.total} bytes received"
            )
        if not frame.data and frame.total:
            raise FrameError(f"empty chunk for blob {sha256}")
        assembly.data += frame.data
        if len(assembly.data) < assembly.total:
            return
        del self._assembling[sha256]
        self._assembling_bytes -= assembly.total
        self._answered(sha256)
        data = bytes(assembly.data)
        actual = sha256_hex(data)  # keeps the GIL: see crdtmail.digest
        if actual != sha256:
            raise BlobMismatchError(f"blob {sha256} arrived with bytes that hash to {actual}; it was discarded")
        self._emit(BlobReceived(sha256, data))
        self._flush_wants(refill=True)


# ------------------------------------------------------------------------------------------------ mailbox sync


class SyncSource(Protocol):
    """What ``MailboxSync`` needs from the documents of one mailbox."""

    def document_names(self) -> Iterable[str]:
        """Every document held."""
        ...

    def state_vector(self, doc: str) -> bytes:
        """A document's encoded state vector (``b"\\x00"`` for one not held); should not need to load it."""
        ...

    def diff(self, doc: str, state_vector: bytes) -> bytes:
        """The update holding what a replica at ``state_vector`` lacks of ``doc``."""
        ...

    def apply(self, doc: str, update: bytes, origin: object, *, state_diff: bool) -> bool:
        """Apply a remote update with ``origin`` as transaction origin.

        ``state_diff`` is True for a step 2 answering this side's step 1: computed against this replica's own
        state vector, it cannot lack a dependency. Return False when the update was held back because some of
        its dependencies have not arrived (MailboxSync then asks for a state diff). Raise
        ``InvalidUpdateError`` for an update that cannot be decoded or applied.
        """
        ...

    def accepts(self, doc: str) -> bool:
        """Whether ``doc`` is a document name this mailbox can hold; others are skipped, never applied."""
        ...


class ChangeLike(Protocol):
    """The part of a committed change that ``MailboxSync.on_change`` forwards (``MailboxChange`` fits)."""

    @property
    def origin(self) -> Any:
        """Where the change came from: a connection for remote updates."""
        ...

    @property
    def updates(self) -> tuple[tuple[str, bytes], ...]:
        """(document, update) pairs as committed."""
        ...


UNKNOWN_BLOB_BYTES = 64 * 1024
"""What a wanted blob counts for in ``Limits.blob_want_bytes`` when ``want_blobs`` was given no size for it."""

RELAY_MEMORY = 4096
"""How many update digests each ``MailboxSync`` remembers to keep relayed updates from looping."""


def _is_panic(error: BaseException) -> bool:
    # pyo3's PanicException derives from BaseException, so `except Exception` misses a Rust panic in Yrs.
    return type(error).__name__ == "PanicException"


class MailboxSync:
    """Drives the sync of one mailbox's documents over one open ``SyncConnection`` (sans-I/O).

    1. ``start()`` sends a CATALOG: every document with its state vector, read without loading documents.
    2. On the peer's CATALOG, each document whose state vector is not dominated by ours gets a step 1 with our
       state vector (the empty one for a document we lack); the peer answers with a step 2 holding exactly what
       we lack. Documents whose state vectors match cost nothing more. Both sides do this, so each one pulls
       what it lacks and nothing travels twice.
    3. A step 1 from the peer is answered with a step 2 diff; a step 2 or update is applied with the connection
       as origin. An update held back for missing dependencies triggers a step 1 for its document.
    4. After sync, ``on_update`` (as each update is applied) or ``on_change`` (after each commit) forwards
       local and relayed changes as updates, never echoing a change back to the connection it came from.

    Relaying makes the same update bytes reach a peer over several paths, and in a mesh with a cycle they
    would go round it for ever if a source passed on every update it applied (crdtmail's Mailbox passes on
    only those that changed something; a source need not). So each MailboxSync remembers digests of the last
    ``RELAY_MEMORY`` updates that crossed its connection, either way, and never sends or applies the same bytes
    twice on it (step 2 answers are left out: they are never relayed as themselves).

    ``is_synced`` turns True (and ``handle`` returns ``SyncComplete`` once) when the peer's CATALOG was handled
    and every step 1 sent got its step 2.

    State vectors do not cover deletions, so a document changed on one side only by a delete-only transaction
    would look unchanged in the catalog. crdtmail's model never makes one (an expunge writes a tombstone).
    """

    def __init__(self, connection: SyncConnection, mailbox: str, source: SyncSource) -> None:
        self.connection = connection
        self.mailbox = mailbox
        self.source = source
        self._started = False
        self._catalog_received = False
        self._pending: dict[str, int] = {}
        # Of the last CATALOG: the documents asked for whole (nothing of them here), each with the number of
        # items (the sum of the clocks of its state vector) the peer holds of it.
        self.requested_whole: dict[str, int] = {}
        self._complete_reported = False
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    @property
    def started(self) -> bool:
        """Whether ``start`` sent the catalog."""
        return self._started

    @property
    def is_synced(self) -> bool:
        """Whether this side has everything the peer had when it sent its catalog."""
        return self._catalog_received and not self._pending

    @property
    def pending(self) -> frozenset[str]:
        """Documents with a step 1 sent and no step 2 back yet."""
        return frozenset(self._pending)

    def start(self) -> None:
        """Send the CATALOG; call once the connection is open (after ``Welcomed`` or ``welcome``)."""
        if self._started:
            return
        entries = []
        for doc in self.source.document_names():
            if self.source.accepts(doc):
                entries.append(CatalogEntry(doc, self.source.state_vector(doc)))
        with self._guarded():
            self.connection.send_catalog(self.mailbox, entries)
        self._started = True

    def handle(self, event: Event) -> list[Event]:
        """React to one event of the connection; events for other mailboxes (or of other kinds) are ignored.

        Returns follow-up events: ``[SyncComplete(mailbox)]`` the first time the initial sync is done.
        """
        if not self.connection.is_open or getattr(event, "mailbox", None) != self.mailbox:
            return []
        with self._guarded():
            if isinstance(event, CatalogReceived):
                self._on_catalog(event.entries)
            elif isinstance(event, SyncStep1Received):
                self._on_step1(event.document, event.state_vector)
            elif isinstance(event, SyncStep2Received):
                self._on_update(event.document, event.update, reply=True)
            elif isinstance(event, UpdateReceived):
                self._on_update(event.document, event.update, reply=False)
        if self.is_synced and not self._complete_reported and self.connection.is_open:
            self._complete_reported = True
            return [SyncComplete(self.mailbox)]
        return []

    def request_document(self, doc: str) -> bool:
        """Ask the peer for one document now (a shard outside a sync window that the user opened, say).

        Returns False when it cannot be asked: not started, closing, not accepted here, or already asked for.
        """
        if not self._started or not self.connection.is_open or not self.source.accepts(doc) or self._pending.get(doc):
            return False
        with self._guarded():
            self._request(doc)
        return True

    def on_change(self, change: ChangeLike) -> None:
        """Forward a committed change's updates, unless it came from this connection."""
        if change.origin is self.connection:
            return
        self.send_updates(change.updates)

    def on_update(self, doc: str, update: bytes, origin: object) -> None:
        """Forward one update as soon as it is applied (``Mailbox.observe_updates``), unless it came from this
        connection; a peer that relays this way need not wait for its own commit."""
        if origin is not self.connection:
            self.send_updates(((doc, update),))

    def send_updates(self, updates: Iterable[tuple[str, bytes]]) -> None:
        """Send updates to the peer; ignored before ``start`` (the catalog covers them) or once closing."""
        if not self._started or not self.connection.is_open:
            return
        with self._guarded():
            for doc, update in updates:
                if update == EMPTY_UPDATE or not self.source.accepts(doc) or not self.connection.is_open:
                    continue
                if self._first_time(doc, update):
                    self.connection.send_update(self.mailbox, doc, update)

    # ------------------------------------------------------------------------------------------- internals

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """A protocol problem inside (a bad update, a frame over the limit) closes the connection."""
        try:
            yield
        except ProtocolError as exc:
            self.connection.fail(exc)
        except ValueError as exc:  # pycrdt's way of saying an update or state vector is not decodable
            self.connection.fail(InvalidUpdateError(f"mailbox {self.mailbox!r}: {exc}"))
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            self.connection.fail(InvalidUpdateError(f"mailbox {self.mailbox!r}: the CRDT library panicked: {exc}"))

    def _first_time(self, doc: str, update: bytes) -> bool:
        """Record that ``update`` crossed this connection; False if it already had (recently)."""
        hasher = hashlib.blake2b(doc.encode("utf-8", "surrogatepass") + b"\x00", digest_size=16)
        hasher.update(update)  # not concatenated: a whole shard is megabytes to copy
        key = hasher.digest()
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > RELAY_MEMORY:
            self._seen.popitem(last=False)
        return True

    def _request(self, doc: str, state_vector: bytes | None = None) -> None:
        if state_vector is None:
            state_vector = self.source.state_vector(doc)
        self.connection.send_sync_step1(self.mailbox, doc, state_vector)
        self._pending[doc] = self._pending.get(doc, 0) + 1

    def _on_catalog(self, entries: tuple[CatalogEntry, ...]) -> None:
        self.requested_whole = {}
        for entry in entries:
            doc = entry.document
            if not self.source.accepts(doc) or self._pending.get(doc):
                continue
            theirs = decode_state_vector(entry.state_vector)
            state_vector = self.source.state_vector(doc)
            ours = decode_state_vector(state_vector)
            if not dominates(ours, theirs):
                self._request(doc, state_vector)
                if not ours:
                    self.requested_whole[doc] = sum(theirs.values())
        self._catalog_received = True

    def _on_step1(self, doc: str, state_vector: bytes) -> None:
        update = EMPTY_UPDATE
        # A document not held (or not acceptable) has nothing to give; answering without loading it keeps a
        # peer's step 1 for an unknown name from creating anything here.
        if self.source.accepts(doc) and self.source.state_vector(doc) != EMPTY_STATE_VECTOR:
            update = self.source.diff(doc, state_vector)
        # Not recorded in the relay memory: a step 2 answers a step 1 and is never relayed as itself, and should
        # the peer pass its bytes on and they come back here, applying them again changes nothing. Hashing it
        # cost both sides of an initial sync a pass over every shard (50 ms for 37.5 MB).
        self.connection.send_sync_step2(self.mailbox, doc, update)

    def _on_update(self, doc: str, update: bytes, *, reply: bool) -> None:
        answered = False
        if reply and self._pending.get(doc):
            answered = True
            self._pending[doc] -= 1
            if not self._pending[doc]:
                del self._pending[doc]
        if update == EMPTY_UPDATE or not self.source.accepts(doc) or (not reply and not self._first_time(doc, update)):
            return
        applied = self.source.apply(doc, update, self.connection, state_diff=answered)
        if applied is False and not self._pending.get(doc):
            self._request(doc)


# ----------------------------------------------------------------------------------------------- the adapter


class _MailboxLike(Protocol):
    def document_names(self) -> list[str]: ...

    def document_state_vector(self, doc_name: str) -> bytes: ...

    def encode_document(self, doc_name: str, state_vector: bytes | None = None) -> bytes: ...

    def apply_update(self, doc_name: str, update: bytes, origin: Any, *, check_causality: bool = True) -> bool: ...


class MailboxSource:
    """A ``SyncSource`` over a ``crdtmail.model.mailbox.Mailbox``.

    ``accepts`` decides which document names may be synced; pass ``crdtmail.model.mailbox.is_document_name``
    (the protocol layer does not import the model). Without it every name is accepted and the Mailbox itself
    refuses bad ones, which closes the connection with INVALID_UPDATE.
    """

    def __init__(self, mailbox: _MailboxLike, *, accepts: Callable[[str], bool] | None = None) -> None:
        self.mailbox = mailbox
        self._accepts = accepts

    def document_names(self) -> list[str]:
        """The Mailbox's stored and loaded documents."""
        return self.mailbox.document_names()

    def state_vector(self, doc: str) -> bytes:
        """The document's state vector; the Mailbox reads it from its backend without loading the document."""
        return self.mailbox.document_state_vector(doc)

    def diff(self, doc: str, state_vector: bytes) -> bytes:
        """What a replica at ``state_vector`` lacks."""
        return self.mailbox.encode_document(doc, state_vector)

    def apply(self, doc: str, update: bytes, origin: object, *, state_diff: bool) -> bool:
        """Apply and commit a remote update; the Mailbox's causality check is skipped only for state diffs."""
        try:
            return self.mailbox.apply_update(doc, update, origin, check_causality=not state_diff)
        except (ModelError, ValueError) as exc:
            raise InvalidUpdateError(f"update for document {doc!r} refused: {exc}") from exc

    def accepts(self, doc: str) -> bool:
        """Whether the document name is acceptable."""
        return True if self._accepts is None else self._accepts(doc)
