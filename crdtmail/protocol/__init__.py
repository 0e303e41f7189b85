"""The sans-I/O sync protocol: lib0 encoding, crdtmail frames, and per-connection sync sessions.

No asyncio, sockets, files or threads here: bytes go in, events and bytes come out. The wire format is
specified byte by byte in ``docs/protocol.md``.
"""

from __future__ import annotations

from crdtmail.protocol.frames import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    CatalogEntry,
    CloseCode,
    Feature,
    Limits,
    SyncType,
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
    State,
    SyncComplete,
    SyncConnection,
    SyncSource,
    SyncStep1Received,
    SyncStep2Received,
    UpdateReceived,
    Welcomed,
)

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "BlobMissing",
    "BlobReceived",
    "BlobsWanted",
    "CatalogEntry",
    "CatalogReceived",
    "CloseCode",
    "ConnectionClosed",
    "Event",
    "Feature",
    "HelloReceived",
    "Limits",
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
    "SyncType",
    "UpdateReceived",
    "Welcomed",
    "websocket_close_code",
]
