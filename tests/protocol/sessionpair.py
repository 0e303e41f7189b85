"""Two protocol sessions joined with no I/O (h11's ConnectionPair), and a tiny pycrdt-backed SyncSource.

``SessionPair.pump`` moves every queued frame of each side into the other's ``receive_data`` and hands every
event to that side's handler, until nothing moves. ``Endpoint`` is a minimal peer for tests: it answers the
handshake, runs a ``MailboxSync`` per granted mailbox, and serves blobs from a dict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc

from crdtmail.errors import InvalidUpdateError
from crdtmail.protocol.encoding import EMPTY_STATE_VECTOR
from crdtmail.protocol.frames import DEFAULT_LIMITS, PROTOCOL_VERSION, FrameType, Limits
from crdtmail.protocol.session import (
    BlobMissing,
    BlobReceived,
    BlobsWanted,
    Event,
    HelloReceived,
    MailboxSync,
    Role,
    SyncConnection,
    SyncSource,
    Welcomed,
)

CLIENT_TO_SERVER = "c>s"
SERVER_TO_CLIENT = "s>c"


def frame_type(data: bytes) -> FrameType:
    """The type of an encoded frame (its first byte: every type is below 128)."""
    return FrameType(data[0])


class SessionPair:
    """A client and a server ``SyncConnection`` wired back to back."""

    def __init__(
        self,
        *,
        client_limits: Limits = DEFAULT_LIMITS,
        server_limits: Limits = DEFAULT_LIMITS,
        client_version: int = PROTOCOL_VERSION,
        server_version: int = PROTOCOL_VERSION,
    ) -> None:
        self.client = SyncConnection(Role.CLIENT, limits=client_limits, version=client_version)
        self.server = SyncConnection(Role.SERVER, limits=server_limits, version=server_version)
        self.on_client: Callable[[Event], None] = lambda event: None
        self.on_server: Callable[[Event], None] = lambda event: None
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.wire: list[tuple[str, bytes]] = []

    def pump(self, *, max_rounds: int = 10_000) -> None:
        """Deliver frames and events both ways until both sides are quiet."""
        for _ in range(max_rounds):
            moved = self._deliver(self.client, self.server, CLIENT_TO_SERVER)
            moved |= self._deliver(self.server, self.client, SERVER_TO_CLIENT)
            moved |= self._dispatch(self.client, self.client_events, self.on_client)
            moved |= self._dispatch(self.server, self.server_events, self.on_server)
            if not moved:
                return
        raise AssertionError("the session pair did not settle")

    def _deliver(self, source: SyncConnection, target: SyncConnection, direction: str) -> bool:
        data = source.data_to_send()
        for message in data:
            self.wire.append((direction, message))
            target.receive_data(message)
        return bool(data)

    @staticmethod
    def _dispatch(connection: SyncConnection, log: list[Event], handler: Callable[[Event], None]) -> bool:
        events = connection.events_received()
        for event in events:
            log.append(event)
            handler(event)
        return bool(events)

    def frames(self, direction: str | None = None) -> list[FrameType]:
        """The types of the frames that crossed the wire (in one direction, or both)."""
        return [frame_type(data) for way, data in self.wire if direction in (None, way)]

    def wire_bytes(self) -> int:
        """Bytes that crossed the wire, both ways."""
        return sum(len(data) for _, data in self.wire)


@dataclass
class Endpoint:
    """A minimal peer on one connection: handshake, one MailboxSync per granted mailbox, blobs from a dict."""

    connection: SyncConnection
    peer_id: str
    sources: dict[str, SyncSource]
    blobs: dict[str, bytes] = field(default_factory=dict)
    syncs: dict[str, MailboxSync] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    received_blobs: dict[str, bytes] = field(default_factory=dict)
    missing_blobs: list[str] = field(default_factory=list)
    grant: Callable[[tuple[str, ...]], Iterable[str]] | None = None

    def hello(self, mailboxes: Iterable[str] | None = None) -> None:
        """Client: send HELLO for ``mailboxes`` (default: every mailbox held)."""
        self.connection.send_hello(self.peer_id, list(self.sources) if mailboxes is None else mailboxes)

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, HelloReceived):
            chooser = self.grant or (lambda wanted: [name for name in wanted if name in self.sources])
            granted = list(chooser(event.mailboxes))
            self.connection.welcome(self.peer_id, granted)
            self._start(granted)
        elif isinstance(event, Welcomed):
            self._start(event.mailboxes)
        elif isinstance(event, BlobsWanted):
            for sha256 in event.hashes:
                if sha256 in self.blobs:
                    self.connection.send_blob(sha256, self.blobs[sha256])
                else:
                    self.connection.send_blob_missing(sha256)
        elif isinstance(event, BlobReceived):
            self.received_blobs[event.sha256] = event.data
        elif isinstance(event, BlobMissing):
            self.missing_blobs.append(event.sha256)
        for sync in list(self.syncs.values()):
            self.events.extend(sync.handle(event))

    def _start(self, mailboxes: Iterable[str]) -> None:
        for name in mailboxes:
            if name in self.sources:
                sync = MailboxSync(self.connection, name, self.sources[name])
                self.syncs[name] = sync
                sync.start()


def connect(
    client_sources: dict[str, SyncSource],
    server_sources: dict[str, SyncSource],
    **kwargs: Any,
) -> tuple[SessionPair, Endpoint, Endpoint]:
    """A session pair with an Endpoint on each side; the client has sent HELLO (call ``pump``)."""
    pair = SessionPair(**kwargs)
    client = Endpoint(pair.client, "client-peer", client_sources)
    server = Endpoint(pair.server, "server-peer", server_sources)
    pair.on_client = client
    pair.on_server = server
    client.hello()
    return pair, client, server


class DocSource:
    """A SyncSource over plain pycrdt Docs; counts how often each document's contents were read."""

    def __init__(self, docs: dict[str, Doc[Any]] | None = None) -> None:
        self.docs: dict[str, Doc[Any]] = docs if docs is not None else {}
        self.loads: dict[str, int] = {}
        self.applied: list[tuple[str, bytes, object]] = []

    def document_names(self) -> list[str]:
        return sorted(self.docs)

    def state_vector(self, doc: str) -> bytes:
        return self.docs[doc].get_state() if doc in self.docs else EMPTY_STATE_VECTOR

    def diff(self, doc: str, state_vector: bytes) -> bytes:
        self.loads[doc] = self.loads.get(doc, 0) + 1
        return self.docs[doc].get_update(state_vector)

    def apply(self, doc: str, update: bytes, origin: object, *, state_diff: bool) -> bool:
        target = self.docs.setdefault(doc, Doc())
        try:
            with target.transaction(origin=origin):
                target.apply_update(update)
        except ValueError as exc:
            raise InvalidUpdateError(str(exc)) from exc
        self.applied.append((doc, update, origin))
        return True

    def accepts(self, doc: str) -> bool:
        return not doc.startswith("x-")


def sha(data: bytes) -> str:
    """SHA-256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()
