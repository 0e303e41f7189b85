"""The multiplexed crdtmail frame format: one frame per WebSocket binary message.

Every frame is ``type:varuint`` followed by its fields, all in lib0 encoding (see ``encoding``); the byte-level
spec with a table per frame is ``docs/protocol.md``. A SYNC frame carries one y-protocols sync message
unchanged (``sync type:varuint, payload:varbytes``), so its payload is exactly what any Yjs implementation
speaks; the frame only adds the mailbox and document names in front of it.

``decode_frame`` checks everything against a ``Limits`` before it builds a frame, and raises a ``FrameError``
(or a subclass) for anything malformed; ``encode_frame`` checks the same limits so this side never sends what an
equally configured peer would reject.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from crdtmail.errors import ConfigError, FrameError, FrameTooLargeError, UnknownFrameError
from crdtmail.protocol.encoding import EMPTY_STATE_VECTOR, Reader, Writer, decode_state_vector, encode_varuint

__all__ = [
    "DEFAULT_LIMITS",
    "EMPTY_UPDATE",
    "MAX_REASON_BYTES",
    "PROTOCOL_VERSION",
    "BlobChunkFrame",
    "BlobMissingFrame",
    "BlobWantFrame",
    "CatalogEntry",
    "CatalogFrame",
    "CloseCode",
    "CloseFrame",
    "Feature",
    "Frame",
    "FrameType",
    "HelloFrame",
    "Limits",
    "RefuseFrame",
    "SyncFrame",
    "SyncType",
    "WelcomeFrame",
    "YMessage",
    "decode_frame",
    "decode_sync_data_frame",
    "decode_sync_message",
    "decode_y_websocket",
    "encode_frame",
    "encode_sync_message",
    "encode_y_websocket_sync",
    "normalise_sha256",
    "websocket_close_code",
]

PROTOCOL_VERSION = 2
"""The version this implementation speaks; HELLO and WELCOME carry it, and peers must speak the same one.

2: the frames of 1, with shard envelopes stored as JSON strings (a version-1 peer would read them as empty)."""

MAX_REASON_BYTES = 1024
"""Longest refusal or close reason on the wire (UTF-8 bytes); longer local reasons are cut at a character."""

EMPTY_UPDATE = b"\x00\x00"
"""The Yjs v1 update that changes nothing (no structs, empty delete set)."""

_SHA256_BYTES = 32
_HEX_DIGITS = frozenset("0123456789abcdef")
# Room for a BLOB_CHUNK's fixed fields around its data: type, hash, offset, total and data length.
_BLOB_CHUNK_OVERHEAD = 1 + _SHA256_BYTES + 3 * 8


class FrameType(IntEnum):
    """The first varuint of every frame."""

    HELLO = 0
    WELCOME = 1
    REFUSE = 2
    SYNC = 3
    CATALOG = 4
    BLOB_WANT = 5
    BLOB_CHUNK = 6
    BLOB_MISSING = 7
    CLOSE = 8


class SyncType(IntEnum):
    """The y-protocols sync message types (y-protocols ``sync.js``)."""

    STEP1 = 0  # payload: the sender's state vector
    STEP2 = 1  # payload: an update holding what the step 1 sender lacks
    UPDATE = 2  # payload: an incremental update


class Feature(IntFlag):
    """Optional abilities announced in HELLO and WELCOME; unknown bits are ignored for forward compatibility."""

    NONE = 0
    BLOBS = 1  # this side answers BLOB_WANT with chunks or BLOB_MISSING


class CloseCode(IntEnum):
    """Codes of REFUSE and CLOSE frames; ``websocket_close_code`` maps them to WebSocket close codes."""

    NORMAL = 0  # finished; nothing went wrong
    PROTOCOL_ERROR = 1  # a protocol error without a more specific code
    MALFORMED_FRAME = 2  # truncated frame, bad varint or UTF-8, bad field, trailing bytes
    FRAME_TOO_LARGE = 3  # a frame, length or count over its limit
    UNKNOWN_FRAME = 4  # unknown frame type or sync message type
    UNEXPECTED_FRAME = 5  # a frame the connection's state does not allow (SYNC before the handshake, ...)
    VERSION_MISMATCH = 6  # the peers speak different protocol versions
    UNAUTHORIZED = 7  # a mailbox that was not granted, or a refused HELLO
    LIMIT_EXCEEDED = 8  # too many documents, blob wants, or blob bytes in flight
    BLOB_MISMATCH = 9  # a blob whose bytes do not hash to its name
    INVALID_UPDATE = 10  # a document update that cannot be decoded or applied
    INTERNAL_ERROR = 11  # this side failed for a reason of its own
    GOING_AWAY = 12  # this side is shutting down
    CONNECTION_LOST = 100  # never sent: reported locally when the transport ends without a CLOSE


def websocket_close_code(code: int) -> int:
    """The WebSocket close code to end the socket with after a CLOSE or REFUSE carrying ``code``.

    NORMAL maps to 1000 and GOING_AWAY to 1001; every other code goes to the private range as 4000 + code.
    """
    if code == CloseCode.NORMAL:
        return 1000
    if code == CloseCode.GOING_AWAY:
        return 1001
    return 4000 + min(max(code, 0), 999)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one connection accepts; every field has a documented default.

    The defaults are also the minimum every crdtmail peer must accept, so a peer that sends within them is
    never refused by another peer using the defaults.
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    """Largest frame (WebSocket message) accepted or sent. The transport must let messages this large through
    (websockets' ``max_size`` defaults to 1 MiB). A document's whole state must fit in one SYNC frame."""

    max_name_bytes: int = 255
    """Longest mailbox name, document name or peer id, in UTF-8 bytes."""

    max_mailboxes: int = 64
    """Most mailboxes one HELLO may ask for (and one WELCOME may grant)."""

    max_documents: int = 10_000
    """Most distinct (mailbox, document) pairs the peer may name on one connection (CATALOG and SYNC frames)."""

    max_state_vector_clients: int = 100_000
    """Most clients in one state vector (a step 1 payload or a CATALOG entry)."""

    max_blob_wants: int = 1024
    """Most blob requests the peer may have outstanding with this side (asked for, not yet answered)."""

    blob_want_window: int = 1024
    """Most of this side's own blob requests kept outstanding at once; the rest wait in a queue. Must not be
    above what the peer accepts (its ``max_blob_wants``). A deep window keeps small bodies streaming while the
    receiver is busy writing the last ones (1024 rather than 256: a second desktop's 100k-message mirror took
    about 50-60 s instead of 62, on a shared machine); ``blob_want_bytes`` bounds what that asks the peer to
    send at once."""

    blob_want_bytes: int = 16 * 1024 * 1024
    """Most bytes of this side's own blob requests outstanding at once, each blob counted at the size it was
    wanted with (``SyncConnection.want_blobs``), so a window of large bodies stays well inside the peer's
    send buffer (a transport's ``max_pending_send_bytes``, 64 MiB by default). One blob larger than this is
    still asked for, alone."""

    max_pending_blob_bytes: int = 128 * 1024 * 1024
    """Most bytes of blobs being reassembled at once, reserved at each blob's first chunk; also the largest
    blob that can be received (and that ``send_blob`` will send)."""

    blob_chunk_bytes: int = 1024 * 1024
    """Data bytes per BLOB_CHUNK frame sent; larger blobs go in several chunks."""

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes", "max_name_bytes", "max_mailboxes", "max_documents", "max_state_vector_clients",
            "max_blob_wants", "blob_want_window", "blob_want_bytes", "max_pending_blob_bytes", "blob_chunk_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"protocol limit {name} must be a positive integer, not {value!r}")
        if self.blob_chunk_bytes + _BLOB_CHUNK_OVERHEAD > self.max_frame_bytes:
            raise ConfigError(
                f"blob_chunk_bytes ({self.blob_chunk_bytes}) plus {_BLOB_CHUNK_OVERHEAD} bytes of header must fit"
                f" in max_frame_bytes ({self.max_frame_bytes})"
            )
        if self.blob_want_window > self.max_blob_wants:
            raise ConfigError(
                f"blob_want_window ({self.blob_want_window}) must not exceed max_blob_wants ({self.max_blob_wants})"
            )


DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------------------------------------ frames


@dataclass(frozen=True, slots=True)
class HelloFrame:
    """Client -> server, first frame: who I am and which mailboxes I want to sync.

    A HELLO of another version is decoded only up to its version (later versions may lay out the rest
    differently), so ``peer_id`` and ``mailboxes`` are then empty.
    """

    version: int
    peer_id: str
    mailboxes: tuple[str, ...]
    features: int = Feature.NONE


@dataclass(frozen=True, slots=True)
class WelcomeFrame:
    """Server -> client, answer to HELLO: the handshake succeeded; ``mailboxes`` are the ones granted."""

    version: int
    peer_id: str
    mailboxes: tuple[str, ...]
    features: int = Feature.NONE


@dataclass(frozen=True, slots=True)
class RefuseFrame:
    """Server -> client, answer to HELLO: the handshake failed; the connection is over."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class SyncFrame:
    """One y-protocols sync message (step 1, step 2 or update) for one document of one mailbox."""

    mailbox: str
    document: str
    sync_type: SyncType
    payload: bytes


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One document the sender holds, with its encoded Yjs state vector."""

    document: str
    state_vector: bytes = EMPTY_STATE_VECTOR


@dataclass(frozen=True, slots=True)
class CatalogFrame:
    """Every document the sender holds in a mailbox, with state vectors, so matching ones need no more bytes."""

    mailbox: str
    entries: tuple[CatalogEntry, ...]


@dataclass(frozen=True, slots=True)
class BlobWantFrame:
    """A request for body blobs by SHA-256 (lower-case hex here, 32 raw bytes each on the wire)."""

    hashes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BlobChunkFrame:
    """Bytes ``offset .. offset+len(data)`` of the ``total``-byte blob named ``sha256``; chunks come in order."""

    sha256: str
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BlobMissingFrame:
    """The answer to a wanted blob that the sender does not hold (or will not send)."""

    sha256: str


@dataclass(frozen=True, slots=True)
class CloseFrame:
    """The end of the connection: a ``CloseCode`` (or a newer code) and a human-readable reason."""

    code: int
    reason: str = ""


Frame = (
    HelloFrame | WelcomeFrame | RefuseFrame | SyncFrame | CatalogFrame | BlobWantFrame | BlobChunkFrame
    | BlobMissingFrame | CloseFrame
)
"""Any crdtmail frame."""


# ------------------------------------------------------------------------------------------------ helpers


def normalise_sha256(value: str) -> str:
    """``value`` in lower case, checked to be a SHA-256 hex digest; FrameError otherwise."""
    lowered = value.lower() if isinstance(value, str) else ""
    if len(lowered) != 2 * _SHA256_BYTES or not _HEX_DIGITS.issuperset(lowered):
        raise FrameError(f"{value!r} is not a SHA-256 hex digest (64 hex digits)")
    return lowered


def _truncate_utf8(text: str, limit: int) -> bytes:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    # Cut at a character boundary so the peer's strict UTF-8 decoding accepts the reason.
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def _check_name(name: str, what: str, limits: Limits, *, allow_empty: bool = False) -> None:
    if not isinstance(name, str):
        raise FrameError(f"the {what} must be a str, not {type(name).__name__}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size == 0 and not allow_empty:
        raise FrameError(f"the {what} is empty")
    if size > limits.max_name_bytes:
        raise FrameTooLargeError(f"the {what} is {size} bytes, over the limit of {limits.max_name_bytes}")


def _check_names(names: tuple[str, ...], what: str, limits: Limits) -> None:
    if len(names) > limits.max_mailboxes:
        raise FrameTooLargeError(f"{len(names)} {what}s, over the limit of {limits.max_mailboxes}")
    for name in names:
        _check_name(name, what, limits)
    if len(set(names)) != len(names):
        raise FrameError(f"a {what} is listed twice")


def _check_state_vector(data: bytes, what: str, limits: Limits) -> None:
    try:
        decode_state_vector(data, max_clients=limits.max_state_vector_clients)
    except FrameError as exc:
        raise type(exc)(f"{what}: {exc}") from None


def encode_sync_message(sync_type: SyncType, payload: bytes) -> bytes:
    """A y-protocols sync message: ``sync type:varuint, payload:varbytes`` (exactly what y-protocols writes)."""
    return Writer().varuint(SyncType(sync_type)).varbytes(payload).to_bytes()


def _read_sync_message(reader: Reader, limits: Limits) -> tuple[SyncType, bytes]:
    raw_type = reader.varuint("sync message type")
    try:
        sync_type = SyncType(raw_type)
    except ValueError:
        raise UnknownFrameError(f"unknown y-protocols sync message type {raw_type}") from None
    payload = reader.varbytes("sync payload", maximum=limits.max_frame_bytes)
    if sync_type is SyncType.STEP1:
        _check_state_vector(payload, "sync step 1 state vector", limits)
    return sync_type, payload


def decode_sync_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> tuple[SyncType, bytes]:
    """Decode a whole y-protocols sync message; a step 1 payload must be a valid state vector."""
    reader = Reader(data)
    result = _read_sync_message(reader, limits)
    reader.finish("sync message")
    return result


@dataclass(frozen=True, slots=True)
class YMessage:
    """One message of the plain y-websocket protocol (the single-document endpoint).

    ``kind`` is 0 (sync) or 1 (awareness); ``sync_type`` is None for awareness, whose payload is the opaque
    awareness update.
    """

    kind: int
    sync_type: SyncType | None
    payload: bytes


_Y_SYNC = 0
_Y_AWARENESS = 1


def encode_y_websocket_sync(sync_type: SyncType, payload: bytes) -> bytes:
    """A y-websocket sync message: ``0:varuint`` then the y-protocols sync message."""
    return b"\x00" + encode_sync_message(sync_type, payload)


def decode_y_websocket(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> YMessage:
    """Decode a y-websocket message (sync or awareness) with the same bounds checks as crdtmail frames."""
    if len(data) > limits.max_frame_bytes:
        raise FrameTooLargeError(f"message is {len(data)} bytes, over the limit of {limits.max_frame_bytes}")
    reader = Reader(data)
    kind = reader.varuint("y-websocket message type")
    if kind == _Y_SYNC:
        sync_type, payload = _read_sync_message(reader, limits)
        reader.finish("y-websocket sync message")
        return YMessage(kind, sync_type, payload)
    if kind == _Y_AWARENESS:
        payload = reader.varbytes("awareness update", maximum=limits.max_frame_bytes)
        reader.finish("y-websocket awareness message")
        return YMessage(kind, None, payload)
    raise UnknownFrameError(f"unknown y-websocket message type {kind}")


# ----------------------------------------------------------------------------------------------- encoding


_SYNC_DATA_TYPES = {SyncType.STEP2.value: SyncType.STEP2, SyncType.UPDATE.value: SyncType.UPDATE}
"""The sync types of frames that carry an update, by value."""


def encode_frame(frame: Frame, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The bytes of ``frame``; FrameError if a field is invalid or the frame would break ``limits``."""
    if (type(frame) is SyncFrame and frame.sync_type in _SYNC_DATA_TYPES and type(frame.mailbox) is str
            and type(frame.document) is str):
        # Every change a peer sends or relays: its names were checked and written once (3 us a frame less).
        payload = frame.payload if type(frame.payload) is bytes else bytes(frame.payload)
        header = _sync_data_header(frame.mailbox, frame.document, _SYNC_DATA_TYPES[frame.sync_type], limits)
        data = header + encode_varuint(len(payload)) + payload
        if len(data) > limits.max_frame_bytes:
            raise FrameTooLargeError(
                f"SyncFrame is {len(data)} bytes, over the frame limit of {limits.max_frame_bytes}"
            )
        return data
    return _encode_frame(frame, limits)


def _encode_frame(frame: Frame, limits: Limits) -> bytes:
    writer = Writer()
    if isinstance(frame, HelloFrame | WelcomeFrame):
        kind = "mailbox"
        _check_name(frame.peer_id, "peer id", limits, allow_empty=True)
        _check_names(tuple(frame.mailboxes), kind, limits)
        writer.varuint(FrameType.HELLO if isinstance(frame, HelloFrame) else FrameType.WELCOME)
        writer.varuint(frame.version).varstring(frame.peer_id).varuint(len(frame.mailboxes))
        for mailbox in frame.mailboxes:
            writer.varstring(mailbox)
        writer.varuint(int(frame.features))
    elif isinstance(frame, RefuseFrame | CloseFrame):
        writer.varuint(FrameType.REFUSE if isinstance(frame, RefuseFrame) else FrameType.CLOSE)
        writer.varuint(int(frame.code)).varbytes(_truncate_utf8(frame.reason, MAX_REASON_BYTES))
    elif isinstance(frame, SyncFrame):
        _check_name(frame.mailbox, "mailbox", limits)
        _check_name(frame.document, "document name", limits)
        if SyncType(frame.sync_type) is SyncType.STEP1:
            _check_state_vector(frame.payload, "sync step 1 state vector", limits)
        writer.varuint(FrameType.SYNC).varstring(frame.mailbox).varstring(frame.document)
        # The sync message's fields written in place: a shard's payload is copied once, into the frame.
        writer.varuint(SyncType(frame.sync_type)).varbytes(frame.payload)
    elif isinstance(frame, CatalogFrame):
        _check_name(frame.mailbox, "mailbox", limits)
        if len(frame.entries) > limits.max_documents:
            raise FrameTooLargeError(f"{len(frame.entries)} catalog entries, over the limit of {limits.max_documents}")
        if len({entry.document for entry in frame.entries}) != len(frame.entries):
            raise FrameError("a document is listed twice in the catalog")
        writer.varuint(FrameType.CATALOG).varstring(frame.mailbox).varuint(len(frame.entries))
        for entry in frame.entries:
            _check_name(entry.document, "document name", limits)
            _check_state_vector(entry.state_vector, f"state vector of {entry.document!r}", limits)
            writer.varstring(entry.document).varbytes(entry.state_vector)
    elif isinstance(frame, BlobWantFrame):
        hashes = [normalise_sha256(value) for value in frame.hashes]
        if len(hashes) > limits.max_blob_wants:
            raise FrameTooLargeError(f"{len(hashes)} blob wants, over the limit of {limits.max_blob_wants}")
        if len(set(hashes)) != len(hashes):
            raise FrameError("a blob is wanted twice in one BLOB_WANT")
        writer.varuint(FrameType.BLOB_WANT).varuint(len(hashes))
        for value in hashes:
            writer.raw(bytes.fromhex(value))
    elif isinstance(frame, BlobChunkFrame):
        if frame.total > limits.max_pending_blob_bytes:
            raise FrameTooLargeError(f"blob is {frame.total} bytes, over the limit of {limits.max_pending_blob_bytes}")
        if frame.offset < 0 or frame.offset + len(frame.data) > frame.total:
            raise FrameError(f"chunk {frame.offset}+{len(frame.data)} does not fit in a {frame.total}-byte blob")
        writer.varuint(FrameType.BLOB_CHUNK).raw(bytes.fromhex(normalise_sha256(frame.sha256)))
        writer.varuint(frame.offset).varuint(frame.total).varbytes(frame.data)
    elif isinstance(frame, BlobMissingFrame):
        writer.varuint(FrameType.BLOB_MISSING).raw(bytes.fromhex(normalise_sha256(frame.sha256)))
    else:
        raise FrameError(f"not a crdtmail frame: {type(frame).__name__}")
    data = writer.to_bytes()
    if len(data) > limits.max_frame_bytes:
        raise FrameTooLargeError(
            f"{type(frame).__name__} is {len(data)} bytes, over the frame limit of {limits.max_frame_bytes}"
        )
    return data


@functools.lru_cache(maxsize=1024)
def _sync_data_header(mailbox: str, document: str, sync_type: SyncType, limits: Limits) -> bytes:
    """The bytes of a SYNC frame before its payload's length, its names checked (FrameError if invalid)."""
    _check_name(mailbox, "mailbox", limits)
    _check_name(document, "document name", limits)
    return Writer().varuint(FrameType.SYNC).varstring(mailbox).varstring(document).varuint(sync_type).to_bytes()


# ----------------------------------------------------------------------------------------------- decoding


def decode_frame(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode one whole frame, checking every field against ``limits``; FrameError (or a subclass) if invalid."""
    if len(data) > limits.max_frame_bytes:
        raise FrameTooLargeError(f"frame is {len(data)} bytes, over the limit of {limits.max_frame_bytes}")
    if not data:
        raise FrameError("empty frame")
    if data[0] == FrameType.SYNC:
        frame = decode_sync_data_frame(data, limits)
        if frame is not None:
            return frame
    return _decode_frame(data, limits)


def decode_sync_data_frame(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SyncFrame | None:
    """A SYNC frame carrying an update or a step 2, laid out as nearly all are (names shorter than 128 bytes),
    read with no ``Reader``; None for anything else, which the full decoder then reads (errors included).

    Every change a peer receives or relays is such a frame: this way takes 2-3 us where the full decoder takes 13.
    It accepts exactly what the full decoder accepts and returns the same frame
    (``test_the_fast_sync_decoder_agrees_with_the_full_one``).
    """
    size = len(data)
    if size < 6 or data[0] != FrameType.SYNC:
        return None
    mailbox_size = data[1]
    document_at = 2 + mailbox_size
    if not 0 < mailbox_size < 0x80 or mailbox_size > limits.max_name_bytes or document_at >= size:
        return None
    document_size = data[document_at]
    type_at = document_at + 1 + document_size
    if not 0 < document_size < 0x80 or document_size > limits.max_name_bytes or type_at + 1 >= size:
        return None
    sync_type = _SYNC_DATA_TYPES.get(data[type_at])
    if sync_type is None:
        return None
    # The payload's length: a minimal varuint of up to 4 bytes (2**28), and exactly the rest of the frame.
    at = type_at + 1
    length = 0
    for shift in (0, 7, 14, 21):
        value = data[at]
        at += 1
        length |= (value & 0x7F) << shift
        if value < 0x80:
            if value == 0 and shift:
                return None
            break
        if at >= size:
            return None
    else:
        return None
    if length != size - at or length > limits.max_frame_bytes:
        return None
    view = memoryview(data)
    try:
        mailbox = str(view[2:document_at], "utf-8")
        document = str(view[document_at + 1 : type_at], "utf-8")
    except UnicodeDecodeError:
        return None
    return SyncFrame(mailbox, document, sync_type, bytes(view[at:]))


def _decode_frame(data: bytes, limits: Limits) -> Frame:
    reader = Reader(data)
    raw_type = reader.varuint("frame type")
    try:
        frame_type = FrameType(raw_type)
    except ValueError:
        raise UnknownFrameError(f"unknown frame type {raw_type}") from None
    frame = _DECODERS[frame_type](reader, limits)
    reader.finish(f"{frame_type.name} frame")
    return frame


def _read_name(reader: Reader, what: str, limits: Limits, *, allow_empty: bool = False) -> str:
    name = reader.varstring(what, maximum=limits.max_name_bytes)
    if not name and not allow_empty:
        raise FrameError(f"the {what} is empty")
    return name


def _read_handshake(reader: Reader, limits: Limits) -> tuple[int, str, tuple[str, ...], int] | int:
    version = reader.varuint("protocol version")
    if version != PROTOCOL_VERSION:
        reader.rest()  # laid out by a version this one does not know: only the version is read
        return version
    peer_id = _read_name(reader, "peer id", limits, allow_empty=True)
    mailboxes = tuple(
        _read_name(reader, "mailbox name", limits)
        for _ in range(reader.count("mailboxes", maximum=limits.max_mailboxes))
    )
    if len(set(mailboxes)) != len(mailboxes):
        raise FrameError("a mailbox is listed twice")
    features = reader.varuint("feature flags")
    return version, peer_id, mailboxes, features


def _decode_hello(reader: Reader, limits: Limits) -> Frame:
    fields = _read_handshake(reader, limits)
    if isinstance(fields, int):
        return HelloFrame(fields, "", ())
    return HelloFrame(*fields)


def _decode_welcome(reader: Reader, limits: Limits) -> Frame:
    fields = _read_handshake(reader, limits)
    if isinstance(fields, int):
        return WelcomeFrame(fields, "", ())
    return WelcomeFrame(*fields)


def _read_code_and_reason(reader: Reader) -> tuple[int, str]:
    code = reader.varuint("close code")
    reason = reader.varstring("reason", maximum=MAX_REASON_BYTES)
    return code, reason


def _decode_refuse(reader: Reader, limits: Limits) -> Frame:
    return RefuseFrame(*_read_code_and_reason(reader))


def _decode_close(reader: Reader, limits: Limits) -> Frame:
    return CloseFrame(*_read_code_and_reason(reader))


def _decode_sync(reader: Reader, limits: Limits) -> Frame:
    mailbox = _read_name(reader, "mailbox name", limits)
    document = _read_name(reader, "document name", limits)
    sync_type, payload = _read_sync_message(reader, limits)
    return SyncFrame(mailbox, document, sync_type, payload)


def _decode_catalog(reader: Reader, limits: Limits) -> Frame:
    mailbox = _read_name(reader, "mailbox name", limits)
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    # Each entry is at least a 1-byte name, its length and a 1-byte state vector with its length.
    for _ in range(reader.count("catalog entries", maximum=limits.max_documents, min_item_bytes=4)):
        document = _read_name(reader, "document name", limits)
        if document in seen:
            raise FrameError(f"document {document!r} is listed twice in the catalog")
        seen.add(document)
        state_vector = reader.varbytes("state vector", maximum=limits.max_frame_bytes)
        _check_state_vector(state_vector, f"state vector of {document!r}", limits)
        entries.append(CatalogEntry(document, state_vector))
    return CatalogFrame(mailbox, tuple(entries))


def _decode_blob_want(reader: Reader, limits: Limits) -> Frame:
    count = reader.count("wanted blobs", maximum=limits.max_blob_wants, min_item_bytes=_SHA256_BYTES)
    hashes = tuple(reader.raw(_SHA256_BYTES, "blob hash").hex() for _ in range(count))
    if len(set(hashes)) != len(hashes):
        raise FrameError("a blob is wanted twice in one BLOB_WANT")
    return BlobWantFrame(hashes)


def _decode_blob_chunk(reader: Reader, limits: Limits) -> Frame:
    sha256 = reader.raw(_SHA256_BYTES, "blob hash").hex()
    offset = reader.varuint("chunk offset")
    total = reader.varuint("blob size", maximum=limits.max_pending_blob_bytes)
    data = reader.varbytes("chunk data", maximum=limits.max_frame_bytes)
    if offset + len(data) > total:
        raise FrameError(f"chunk {offset}+{len(data)} does not fit in a {total}-byte blob")
    return BlobChunkFrame(sha256, offset, total, data)


def _decode_blob_missing(reader: Reader, limits: Limits) -> Frame:
    return BlobMissingFrame(reader.raw(_SHA256_BYTES, "blob hash").hex())


_DECODERS = {
    FrameType.HELLO: _decode_hello,
    FrameType.WELCOME: _decode_welcome,
    FrameType.REFUSE: _decode_refuse,
    FrameType.SYNC: _decode_sync,
    FrameType.CATALOG: _decode_catalog,
    FrameType.BLOB_WANT: _decode_blob_want,
    FrameType.BLOB_CHUNK: _decode_blob_chunk,
    FrameType.BLOB_MISSING: _decode_blob_missing,
    FrameType.CLOSE: _decode_close,
}
