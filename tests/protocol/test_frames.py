"""crdtmail frames: exact bytes (as in docs/protocol.md), round trips, y-protocols compatibility, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from crdtmail.errors import ConfigError, FrameError, FrameTooLargeError, UnknownFrameError
from crdtmail.protocol import frames as frames_module
from crdtmail.protocol.encoding import encode_state_vector, encode_varuint
from crdtmail.protocol.frames import (
    DEFAULT_LIMITS,
    MAX_REASON_BYTES,
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
    decode_sync_data_frame,
    decode_sync_message,
    decode_y_websocket,
    encode_frame,
    encode_sync_message,
    encode_y_websocket_sync,
    normalise_sha256,
    websocket_close_code,
)

EMPTY_SHA = hashlib.sha256(b"").hexdigest()
SV = encode_state_vector({7: 3})

# Every example of docs/protocol.md, byte for byte.
GOLDEN: list[tuple[Frame, bytes]] = [
    (
        HelloFrame(2, "phone", ("alice",), Feature.BLOBS),
        bytes.fromhex("00 02 05") + b"phone" + bytes.fromhex("01 05") + b"alice" + bytes.fromhex("01"),
    ),
    (
        WelcomeFrame(2, "desk", ("alice",), 0),
        bytes.fromhex("01 02 04") + b"desk" + bytes.fromhex("01 05") + b"alice" + bytes.fromhex("00"),
    ),
    (
        RefuseFrame(CloseCode.VERSION_MISMATCH, "v"),
        bytes.fromhex("02 06 01") + b"v",
    ),
    (
        SyncFrame("alice", "2026-11", SyncType.STEP1, SV),
        bytes.fromhex("03 05") + b"alice" + bytes.fromhex("07") + b"2026-11" + bytes.fromhex("00 03 01 07 03"),
    ),
    (
        SyncFrame("alice", "index", SyncType.UPDATE, b"\x00\x00"),
        bytes.fromhex("03 05") + b"alice" + bytes.fromhex("05") + b"index" + bytes.fromhex("02 02 00 00"),
    ),
    (
        CatalogFrame("alice", (CatalogEntry("index", SV), CatalogEntry("2026-11", b"\x00"))),
        bytes.fromhex("04 05") + b"alice" + bytes.fromhex("02 05") + b"index" + bytes.fromhex("03 01 07 03 07")
        + b"2026-11" + bytes.fromhex("01 00"),
    ),
    (BlobWantFrame((EMPTY_SHA,)), bytes.fromhex("05 01") + bytes.fromhex(EMPTY_SHA)),
    (
        BlobChunkFrame(EMPTY_SHA, 0, 0, b""),
        bytes.fromhex("06") + bytes.fromhex(EMPTY_SHA) + bytes.fromhex("00 00 00"),
    ),
    (BlobMissingFrame(EMPTY_SHA), bytes.fromhex("07") + bytes.fromhex(EMPTY_SHA)),
    (CloseFrame(CloseCode.NORMAL, ""), bytes.fromhex("08 00 00")),
]


@pytest.mark.parametrize(("frame", "data"), GOLDEN)
def test_golden_bytes(frame: Frame, data: bytes) -> None:
    assert encode_frame(frame) == data
    assert decode_frame(data) == frame


@pytest.mark.parametrize(("frame", "data"), GOLDEN)
def test_every_strict_prefix_of_a_frame_is_rejected(frame: Frame, data: bytes) -> None:
    for end in range(len(data)):
        with pytest.raises(FrameError):
            decode_frame(data[:end])


@pytest.mark.parametrize(("frame", "data"), GOLDEN)
def test_trailing_garbage_is_rejected(frame: Frame, data: bytes) -> None:
    with pytest.raises(FrameError, match="unexpected bytes after the end"):
        decode_frame(data + b"\x00")


names = st.text(min_size=1, max_size=20).filter(lambda text: not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
hashes = st.binary(min_size=32, max_size=32).map(bytes.hex)
state_vectors = st.dictionaries(st.integers(0, 2**53 - 1), st.integers(0, 2**32), max_size=5).map(encode_state_vector)
frames = st.one_of(
    st.builds(HelloFrame, st.just(PROTOCOL_VERSION), names | st.just(""), st.lists(names, unique=True, max_size=5)
              .map(tuple), st.integers(0, 2**53 - 1)),
    st.builds(WelcomeFrame, st.just(PROTOCOL_VERSION), names, st.lists(names, unique=True, max_size=5).map(tuple),
              st.integers(0, 3)),
    st.builds(RefuseFrame, st.integers(0, 1000), st.text(max_size=50).filter(lambda t: t.isprintable())),
    st.builds(CloseFrame, st.integers(0, 1000), st.text(max_size=50).filter(lambda t: t.isprintable())),
    st.builds(SyncFrame, names, names, st.just(SyncType.STEP1), state_vectors),
    st.builds(SyncFrame, names, names, st.sampled_from([SyncType.STEP2, SyncType.UPDATE]), st.binary(max_size=200)),
    st.builds(
        CatalogFrame,
        names,
        st.dictionaries(names, state_vectors, max_size=5).map(
            lambda entries: tuple(CatalogEntry(doc, sv) for doc, sv in entries.items())
        ),
    ),
    st.builds(BlobWantFrame, st.lists(hashes, unique=True, max_size=5).map(tuple)),
    st.builds(BlobMissingFrame, hashes),
    st.tuples(hashes, st.binary(max_size=100), st.integers(0, 100), st.integers(0, 100)).map(
        lambda t: BlobChunkFrame(t[0], t[2], t[2] + len(t[1]) + t[3], t[1])
    ),
)


@given(frames)
def test_frame_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    assert encode_frame(decode_frame(data)) == data
    # What websockets reads a frame into (a bytearray) decodes the same, into fields that are bytes.
    from_buffer = decode_frame(bytearray(data))  # type: ignore[arg-type]
    assert from_buffer == frame
    assert not any(isinstance(value, bytearray | memoryview) for value in _leaves(from_buffer))


def _leaves(value: Any) -> list[Any]:
    """Every field value of a frame, inside its tuples and dataclasses too."""
    if dataclasses.is_dataclass(value):
        return [leaf for field in dataclasses.fields(value) for leaf in _leaves(getattr(value, field.name))]
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_frame_error(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except FrameError:
        return
    if isinstance(frame, HelloFrame | WelcomeFrame) and frame.version != PROTOCOL_VERSION:
        return  # only the version of another version's handshake is read
    assert encode_frame(frame) == data  # minimal encodings everywhere: what decodes re-encodes identically


@settings(max_examples=300)
@given(frames, st.data())
def test_mutated_frames_decode_or_raise_frame_error(frame: Frame, data: st.DataObject) -> None:
    encoded = bytearray(encode_frame(frame))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(FrameError):
        decode_frame(bytes(encoded))


def _fully_decoded(data: bytes | bytearray, limits: Limits) -> Frame | type[FrameError]:
    """What the full decoder makes of ``data``: the frame, or the type of error it raises."""
    try:
        if len(data) > limits.max_frame_bytes:
            raise FrameTooLargeError("over the frame limit")
        if not data:
            raise FrameError("empty")
        return frames_module._decode_frame(data, limits)  # type: ignore[arg-type]
    except FrameError as exc:
        return type(exc)


long_names = st.text(min_size=1, max_size=70).filter(lambda text: not any(0xD800 <= ord(c) <= 0xDFFF for c in text))


@settings(max_examples=600)
@given(
    st.builds(SyncFrame, long_names, long_names, st.sampled_from([SyncType.STEP2, SyncType.UPDATE]),
              st.binary(max_size=300))
    | st.builds(SyncFrame, long_names, long_names, st.just(SyncType.STEP1), state_vectors),
    st.lists(st.tuples(st.sampled_from(["set", "drop", "insert"]), st.integers(0, 10_000), st.integers(0, 255)),
             max_size=3),
    st.sampled_from([DEFAULT_LIMITS, Limits(max_name_bytes=8, max_frame_bytes=100, blob_chunk_bytes=40)]),
)
def test_the_fast_sync_decoder_agrees_with_the_full_one(
        frame: SyncFrame, mutations: list[tuple[str, int, int]], limits: Limits) -> None:
    """Update and step 2 frames take a short way through decode_frame: it must accept exactly what the full
    decoder accepts and give the same frame, for names past a one-byte length, every sync type, the limits, and
    frames with bytes changed, dropped or added anywhere."""
    encoded = bytearray(encode_frame(frame))
    for kind, at, value in mutations:
        at %= len(encoded) + 1
        if kind == "insert":
            encoded.insert(at, value)
        elif at < len(encoded):
            if kind == "set":
                encoded[at] = value
            else:
                del encoded[at]
    for data in (bytes(encoded), encoded):
        full = _fully_decoded(data, limits)
        fast = decode_sync_data_frame(data, limits)  # type: ignore[arg-type]
        if fast is not None:
            assert fast == full and type(fast.payload) is bytes
        try:
            assert decode_frame(data, limits=limits) == full  # type: ignore[arg-type]
        except FrameError as exc:
            assert type(exc) is full
    short_way = decode_sync_data_frame(encode_frame(frame))
    assert (short_way == frame) is (frame.sync_type is not SyncType.STEP1 and
                                    max(len(frame.mailbox.encode()), len(frame.document.encode())) < 0x80)


def _fully_encoded(frame: Frame, limits: Limits) -> bytes | type[Exception]:
    try:
        return frames_module._encode_frame(frame, limits)
    except (FrameError, ValueError) as exc:
        return type(exc)


@settings(max_examples=300)
@given(
    st.builds(SyncFrame, st.text(max_size=70), st.text(max_size=70), st.sampled_from([1, 2, 7]),
              st.binary(max_size=300)),
    st.sampled_from([DEFAULT_LIMITS, Limits(max_name_bytes=8, max_frame_bytes=100, blob_chunk_bytes=40)]),
)
def test_the_fast_sync_encoder_agrees_with_the_full_one(frame: SyncFrame, limits: Limits) -> None:
    """Update and step 2 frames are written with their checked names' bytes kept: the same bytes as the full
    encoder, and the same refusals (an empty or overlong name, a lone surrogate, an unknown type, a frame too
    large), the second time too."""
    for _ in range(2):
        try:
            assert encode_frame(frame, limits=limits) == _fully_encoded(frame, limits)
        except (FrameError, ValueError) as exc:
            assert type(exc) is _fully_encoded(frame, limits)


def test_the_fast_sync_decoder_leaves_odd_lengths_to_the_full_one() -> None:
    """A payload length written with a trailing zero group, or longer than the frame, is the full decoder's to
    refuse."""
    frame = encode_frame(SyncFrame("m", "d", SyncType.UPDATE, b"\x01"))
    assert frame == b"\x03\x01m\x01d\x02\x01\x01"
    for odd in (b"\x03\x01m\x01d\x02\x81\x00\x01", b"\x03\x01m\x01d\x02\x02\x01", b"\x03\x01m\x01d\x02\x80"):
        assert decode_sync_data_frame(odd) is None
        with pytest.raises(FrameError):
            decode_frame(odd)



# ------------------------------------------------------------------------------------- y-protocols payloads


def _doc() -> Doc[Any]:
    doc: Doc[Any] = Doc()
    doc.get("flags", type=Map)["m1/\\Seen"] = True
    return doc


def test_sync_message_is_exactly_y_protocols() -> None:
    doc = _doc()
    # pycrdt's create_sync_message is a y-websocket message: messageSync (0), then the y-protocols sync message.
    assert encode_y_websocket_sync(SyncType.STEP1, doc.get_state()) == pycrdt.create_sync_message(doc)
    assert encode_sync_message(SyncType.UPDATE, b"\x00\x00") == pycrdt.create_update_message(b"\x00\x00")[1:]


def test_pycrdt_answers_a_sync_frames_payload() -> None:
    theirs = _doc()
    frame = SyncFrame("alice", "2026-11", SyncType.STEP1, Doc().get_state())
    decoded = decode_frame(encode_frame(frame))
    assert isinstance(decoded, SyncFrame)
    reply = pycrdt.handle_sync_message(encode_sync_message(decoded.sync_type, decoded.payload), theirs)
    assert reply is not None
    message = decode_y_websocket(reply)
    assert message.kind == 0 and message.sync_type is SyncType.STEP2
    mine: Doc[Any] = Doc()
    mine.apply_update(message.payload)
    assert mine.get("flags", type=Map)["m1/\\Seen"] is True


def test_y_websocket_messages() -> None:
    assert decode_y_websocket(b"\x01\x02ab").kind == 1
    assert decode_y_websocket(b"\x01\x02ab").payload == b"ab"
    with pytest.raises(UnknownFrameError, match="y-websocket message type 5"):
        decode_y_websocket(b"\x05")
    with pytest.raises(UnknownFrameError, match="sync message type 3"):
        decode_y_websocket(b"\x00\x03\x00")
    with pytest.raises(FrameError):
        decode_y_websocket(b"\x00\x00\x02\x01")  # truncated
    with pytest.raises(FrameTooLargeError):
        decode_y_websocket(b"\x01" * 100, limits=Limits(max_frame_bytes=99, blob_chunk_bytes=10))


def test_decode_sync_message_checks_the_state_vector() -> None:
    assert decode_sync_message(b"\x00\x01\x00") == (SyncType.STEP1, b"\x00")
    with pytest.raises(FrameError, match="state vector"):
        decode_sync_message(b"\x00\x02\x05\x01")
    with pytest.raises(FrameError, match="unexpected bytes"):
        decode_sync_message(b"\x02\x00\x00")


# ------------------------------------------------------------------------------------------ malformed frames


def _sync(mailbox: bytes = b"\x05alice", document: bytes = b"\x05index", rest: bytes = b"\x02\x02\x00\x00") -> bytes:
    return b"\x03" + mailbox + document + rest


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", FrameError, "empty frame"),
        (b"\x2a", UnknownFrameError, "unknown frame type 42"),
        (b"\x80\x01", UnknownFrameError, "unknown frame type 128"),
        (b"\xff" * 9, FrameError, "longer than 8 bytes"),
        (b"\x80\x00", FrameError, "not minimally encoded"),
        (_sync(rest=b"\x07\x00"), UnknownFrameError, "sync message type 7"),
        (_sync(mailbox=b"\x00"), FrameError, "mailbox name is empty"),
        (_sync(document=b"\x00"), FrameError, "document name is empty"),
        (_sync(mailbox=b"\x02\xc3\x28"), FrameError, "not valid UTF-8"),
        (_sync(mailbox=encode_varuint(256) + b"a" * 256), FrameTooLargeError, "over the limit of 255"),
        (_sync(mailbox=encode_varuint(2**50)), FrameTooLargeError, "over the limit"),
        (_sync(rest=b"\x02" + encode_varuint(2**40)), FrameTooLargeError, "over the limit"),
        (_sync(rest=b"\x02\x05\x00"), FrameError, "truncated"),
        (_sync(rest=b"\x00\x02\x05\x01"), FrameError, "state vector"),
        (bytes([0, PROTOCOL_VERSION]) + b"\x00\x02\x01a\x01a\x00", FrameError, "listed twice"),
        (bytes([0, PROTOCOL_VERSION, 0]) + encode_varuint(65) + b"\x01a" * 65 + b"\x00", FrameTooLargeError,
         "over the limit of 64"),
        (b"\x04\x01m\x02\x01d\x01\x00\x01d\x01\x00", FrameError, "listed twice"),
        (b"\x04\x01m\x01\x01d\x02\x01\x05", FrameError, "state vector of 'd'"),
        (b"\x05\x02" + b"\x11" * 64, FrameError, "wanted twice"),
        (b"\x05\x02" + b"\x11" * 40, FrameError, "announced"),
        (b"\x06" + b"\x11" * 32 + b"\x00\x02\x03abc", FrameError, "does not fit"),
        (b"\x06" + b"\x11" * 32 + b"\x00" + encode_varuint(2**30) + b"\x00", FrameTooLargeError, "over the limit"),
        (b"\x07" + b"\x11" * 31, FrameError, "truncated"),
        (b"\x08\x00" + encode_varuint(1025) + b"x" * 1025, FrameTooLargeError, "over the limit of 1024"),
    ],
)
def test_malformed_frames(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_frame(data)


def test_oversized_frame_is_rejected_before_decoding() -> None:
    limits = Limits(max_frame_bytes=100, blob_chunk_bytes=10)
    frame = encode_frame(SyncFrame("a", "b", SyncType.UPDATE, b"x" * 200))
    with pytest.raises(FrameTooLargeError, match="frame is 208 bytes, over the limit of 100"):
        decode_frame(frame, limits=limits)
    with pytest.raises(FrameTooLargeError, match="over the frame limit of 100"):
        encode_frame(SyncFrame("a", "b", SyncType.UPDATE, b"x" * 200), limits=limits)


def test_hello_of_another_version_is_read_only_up_to_its_version() -> None:
    future = b"\x00\x03" + b"whatever version 3 puts here \xff\xff"
    assert decode_frame(future) == HelloFrame(3, "", ())
    assert decode_frame(b"\x01\x07\x00") == WelcomeFrame(7, "", ())


def test_limits_apply_on_decode() -> None:
    limits = Limits(max_documents=1, max_mailboxes=1, max_blob_wants=1, blob_want_window=1,
                    max_state_vector_clients=1, max_name_bytes=3)
    with pytest.raises(FrameTooLargeError):
        decode_frame(encode_frame(CatalogFrame("m", (CatalogEntry("a"), CatalogEntry("b")))), limits=limits)
    with pytest.raises(FrameTooLargeError):
        decode_frame(encode_frame(HelloFrame(PROTOCOL_VERSION, "", ("a", "b"))), limits=limits)
    with pytest.raises(FrameTooLargeError):
        decode_frame(encode_frame(BlobWantFrame(("11" * 32, "22" * 32))), limits=limits)
    with pytest.raises(FrameTooLargeError):
        decode_frame(encode_frame(SyncFrame("m", "d", SyncType.STEP1, encode_state_vector({1: 1, 2: 2}))),
                     limits=limits)
    with pytest.raises(FrameTooLargeError):
        decode_frame(encode_frame(SyncFrame("long", "d", SyncType.UPDATE, b"")), limits=limits)


# ---------------------------------------------------------------------------------------------- encode side


def test_encode_validates_fields() -> None:
    with pytest.raises(FrameError, match="empty"):
        encode_frame(SyncFrame("", "d", SyncType.UPDATE, b""))
    with pytest.raises(FrameTooLargeError):
        encode_frame(SyncFrame("m" * 256, "d", SyncType.UPDATE, b""))
    with pytest.raises(FrameError, match="state vector"):
        encode_frame(SyncFrame("m", "d", SyncType.STEP1, b"\x01"))
    with pytest.raises(FrameError, match="listed twice"):
        encode_frame(HelloFrame(PROTOCOL_VERSION, "p", ("a", "a")))
    with pytest.raises(FrameError, match="listed twice"):
        encode_frame(CatalogFrame("m", (CatalogEntry("d"), CatalogEntry("d"))))
    with pytest.raises(FrameError, match="SHA-256"):
        encode_frame(BlobMissingFrame("xyz"))
    with pytest.raises(FrameError, match="does not fit"):
        encode_frame(BlobChunkFrame(EMPTY_SHA, 1, 1, b"a"))
    with pytest.raises(FrameError, match="UTF-8"):
        encode_frame(SyncFrame("m\udc80", "d", SyncType.UPDATE, b""))


def test_long_reasons_are_cut_at_a_character() -> None:
    frame = CloseFrame(CloseCode.PROTOCOL_ERROR, "é" * 600)  # 1200 bytes
    decoded = decode_frame(encode_frame(frame))
    assert isinstance(decoded, CloseFrame)
    assert decoded.reason == "é" * (MAX_REASON_BYTES // 2)


def test_sha256_normalisation() -> None:
    assert normalise_sha256(EMPTY_SHA.upper()) == EMPTY_SHA
    for bad in ["", "g" * 64, EMPTY_SHA[:-1], " " + EMPTY_SHA[1:], EMPTY_SHA + "0"]:
        with pytest.raises(FrameError):
            normalise_sha256(bad)


def test_websocket_close_codes() -> None:
    assert websocket_close_code(CloseCode.NORMAL) == 1000
    assert websocket_close_code(CloseCode.GOING_AWAY) == 1001
    assert websocket_close_code(CloseCode.MALFORMED_FRAME) == 4002
    assert websocket_close_code(CloseCode.INVALID_UPDATE) == 4010
    assert websocket_close_code(123_456) == 4999


def test_limits_are_validated() -> None:
    assert DEFAULT_LIMITS.max_frame_bytes == 16 * 1024 * 1024
    with pytest.raises(ConfigError, match="max_documents"):
        Limits(max_documents=0)
    with pytest.raises(ConfigError, match="blob_chunk_bytes"):
        Limits(max_frame_bytes=1000, blob_chunk_bytes=1000)
    with pytest.raises(ConfigError, match="blob_want_window"):
        Limits(max_blob_wants=10, blob_want_window=11)
