"""lib0 encoding: round trips, compatibility with pycrdt's encoder, and every malformed input rejected."""

from __future__ import annotations

from typing import Any

import pycrdt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycrdt import Doc, Map

from crdtmail.errors import FrameError, FrameTooLargeError
from crdtmail.protocol.encoding import (
    MAX_SAFE_INTEGER,
    Reader,
    Writer,
    decode_state_vector,
    dominates,
    encode_state_vector,
    encode_varbytes,
    encode_varstring,
    encode_varuint,
)

# ------------------------------------------------------------------------------------------------- varuint


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**14, b"\x80\x80\x01"),
        (MAX_SAFE_INTEGER, b"\xff\xff\xff\xff\xff\xff\xff\x0f"),
    ],
)
def test_varuint_known_encodings(value: int, encoded: bytes) -> None:
    assert encode_varuint(value) == encoded
    reader = Reader(encoded)
    assert reader.varuint() == value
    reader.finish()


@given(st.integers(0, MAX_SAFE_INTEGER))
def test_varuint_round_trip_and_matches_pycrdt(value: int) -> None:
    encoded = encode_varuint(value)
    assert encoded == pycrdt.write_var_uint(value)  # lib0-compatible
    assert len(encoded) <= 8
    assert Reader(encoded).varuint() == value


@pytest.mark.parametrize("value", [-1, MAX_SAFE_INTEGER + 1, 2**64])
def test_varuint_out_of_range_is_not_written(value: int) -> None:
    with pytest.raises(FrameError, match="outside"):
        encode_varuint(value)


def test_varuint_rejects_non_ints() -> None:
    with pytest.raises(FrameError):
        encode_varuint(True)
    with pytest.raises(FrameError):
        encode_varuint(1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"\x80", "truncated"),
        (b"\xff\xff\xff", "truncated"),
        (b"\xff" * 8 + b"\x01", "longer than 8 bytes"),
        (b"\xff" * 20, "longer than 8 bytes"),
        (b"\x80\x80\x80\x80\x80\x80\x80\x10", "above 2\\*\\*53-1"),  # 2**53
        (b"\x80\x00", "not minimally encoded"),
        (b"\xff\x80\x00", "not minimally encoded"),
    ],
)
def test_bad_varuints_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        Reader(data).varuint("test value")


def test_varuint_maximum_is_checked() -> None:
    with pytest.raises(FrameTooLargeError, match="over the limit of 10"):
        Reader(encode_varuint(11)).varuint("count", maximum=10)
    assert Reader(encode_varuint(10)).varuint("count", maximum=10) == 10


# ------------------------------------------------------------------------------------------- bytes, strings


@given(st.binary(max_size=5000))
def test_varbytes_round_trip(data: bytes) -> None:
    encoded = encode_varbytes(data)
    reader = Reader(encoded)
    assert reader.varbytes(maximum=len(data)) == data
    reader.finish()


@pytest.mark.parametrize(
    ("text", "byte_length"),
    [("", 0), ("INBOX", 5), ("é", 2), ("Entwürfe", 9), ("📬", 4), ("日本語", 9), ("a📬é", 7)],
)
def test_varstring_counts_utf8_bytes(text: str, byte_length: int) -> None:
    encoded = encode_varstring(text)
    assert encoded == encode_varuint(byte_length) + text.encode("utf-8")
    assert Reader(encoded).varstring(maximum=100) == text


def test_pycrdt_encoder_counts_characters_and_this_one_does_not() -> None:
    # The gap in pycrdt's _sync.Encoder that made this module necessary: a lib0 decoder would misread this.
    encoder = pycrdt.Encoder()
    encoder.write_var_string("é")
    assert encoder.to_bytes()[0] == 1
    assert encode_varstring("é")[0] == 2


@given(st.text(max_size=300))
def test_varstring_round_trip(text: str) -> None:
    try:
        encoded = encode_varstring(text)
    except FrameError:
        assert any(0xD800 <= ord(char) <= 0xDFFF for char in text)  # lone surrogates have no UTF-8
        return
    assert Reader(encoded).varstring(maximum=len(encoded)) == text


def test_lone_surrogate_is_not_encoded() -> None:
    with pytest.raises(FrameError, match="UTF-8"):
        encode_varstring("bad\udc80")


@given(st.lists(st.one_of(st.integers(0, MAX_SAFE_INTEGER), st.binary(max_size=50), st.text(max_size=20))))
def test_mixed_sequence_round_trip(values: list[int | bytes | str]) -> None:
    writer = Writer()
    for value in values:
        if isinstance(value, int):
            writer.varuint(value)
        elif isinstance(value, bytes):
            writer.varbytes(value)
        else:
            try:
                encode_varstring(value)
            except FrameError:
                continue
            writer.varstring(value)
    reader = Reader(writer.to_bytes())
    for value in values:
        if isinstance(value, int):
            assert reader.varuint() == value
        elif isinstance(value, bytes):
            assert reader.varbytes(maximum=1000) == value
        elif not any(0xD800 <= ord(char) <= 0xDFFF for char in value):
            assert reader.varstring(maximum=1000) == value
    reader.finish()


def test_length_beyond_the_buffer_is_rejected() -> None:
    with pytest.raises(FrameError, match="truncated: the bytes needs 5 bytes, 3 left"):
        Reader(b"\x05abc").varbytes(maximum=100)


def test_length_over_its_maximum_is_rejected_before_reading() -> None:
    huge = encode_varuint(2**40) + b"x"
    with pytest.raises(FrameTooLargeError, match="over the limit of 255"):
        Reader(huge).varstring("mailbox name", maximum=255)


def test_invalid_utf8_is_rejected() -> None:
    with pytest.raises(FrameError, match="not valid UTF-8"):
        Reader(b"\x02\xc3\x28").varstring("name", maximum=10)


def test_trailing_bytes_are_detected() -> None:
    reader = Reader(b"\x01\x02")
    assert reader.varuint() == 1
    with pytest.raises(FrameError, match="1 unexpected bytes after the end of the frame"):
        reader.finish()


def test_raw_and_byte_are_bounds_checked() -> None:
    reader = Reader(b"\x01")
    assert reader.byte() == 1
    with pytest.raises(FrameError, match="truncated"):
        reader.byte()
    with pytest.raises(FrameError, match="truncated"):
        Reader(b"ab").raw(3)
    with pytest.raises(FrameError, match="truncated"):
        Reader(b"ab").raw(-1)


def test_count_larger_than_the_buffer_can_hold_is_rejected_at_once() -> None:
    with pytest.raises(FrameError, match="1000 items announced"):
        Reader(encode_varuint(1000) + b"\x00" * 10).count("items", maximum=10_000)
    with pytest.raises(FrameTooLargeError):
        Reader(encode_varuint(11)).count("items", maximum=10)


# ------------------------------------------------------------------------------------------ state vectors


def _doc_with_writes(*keys: str) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    root = doc.get("m", type=Map)
    for key in keys:
        root[key] = key
    return doc


def test_state_vector_of_real_documents_round_trips() -> None:
    a = _doc_with_writes("x", "y")
    b: Doc[Any] = Doc()
    b.apply_update(a.get_update())
    b.get("m", type=Map)["z"] = "z"
    clocks = decode_state_vector(b.get_state())
    assert clocks == {a.client_id: 2, b.client_id: 1}
    assert decode_state_vector(encode_state_vector(clocks)) == clocks
    # pycrdt accepts the re-encoded vector: the diff against it is what b has beyond a.
    other: Doc[Any] = Doc()
    other.apply_update(a.get_update())
    other.apply_update(b.get_update(encode_state_vector(decode_state_vector(a.get_state()))))
    assert dict(other.get("m", type=Map)) == {"x": "x", "y": "y", "z": "z"}


def test_empty_state_vector() -> None:
    assert decode_state_vector(Doc().get_state()) == {}
    assert encode_state_vector({}) == b"\x00"


@given(st.dictionaries(st.integers(0, MAX_SAFE_INTEGER), st.integers(0, 2**32), max_size=30))
def test_state_vector_round_trip(clocks: dict[int, int]) -> None:
    assert decode_state_vector(encode_state_vector(clocks)) == clocks


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"\x01\x05", "announced"),
        (b"\x02\x05\x01\x06", "announced"),
        (b"\x01\x05\x01\x00", "unexpected bytes"),
        (b"\x02\x05\x01\x05\x02", "twice"),
        (b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "longer than 8 bytes"),
    ],
)
def test_malformed_state_vectors_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_state_vector(data)


def test_state_vector_client_limit() -> None:
    data = encode_state_vector({client: 1 for client in range(5)})
    assert len(decode_state_vector(data, max_clients=5)) == 5
    with pytest.raises(FrameTooLargeError):
        decode_state_vector(data, max_clients=4)


def test_dominates() -> None:
    assert dominates({}, {})
    assert dominates({1: 3}, {})
    assert not dominates({}, {1: 1})
    assert dominates({1: 3, 2: 1}, {1: 3})
    assert dominates({1: 3}, {1: 3, 2: 0})  # a zero clock asks for nothing
    assert not dominates({1: 3}, {1: 4})
    assert not dominates({1: 3}, {2: 1})
    assert dominates({1: 3, 2: 5}, {1: 2, 2: 5}) and not dominates({1: 2, 2: 5}, {1: 3, 2: 5})


@given(
    st.dictionaries(st.integers(0, 5), st.integers(0, 5)),
    st.dictionaries(st.integers(0, 5), st.integers(0, 5)),
)
def test_dominates_matches_its_definition(a: dict[int, int], b: dict[int, int]) -> None:
    merged = {client: max(a.get(client, 0), b.get(client, 0)) for client in a.keys() | b.keys()}
    assert dominates(merged, a) and dominates(merged, b)
    assert dominates(a, b) == all(a.get(client, 0) >= clock for client, clock in b.items())
