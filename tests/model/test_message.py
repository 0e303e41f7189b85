"""Parsing raw messages into ids, shards and envelopes."""

from __future__ import annotations

import datetime as dt
import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtmail.errors import MessageParseError
from crdtmail.model.message import (
    UNDATED,
    Envelope,
    _parse_date,
    body_hash,
    message_id_for,
    normalise_message_id_header,
    parse_message,
    shard_for_date,
)
from tests.conftest import make_raw


def test_same_message_id_gives_same_id_whatever_the_bytes() -> None:
    a = parse_message(make_raw("one", message_id="<x@y>"))
    b = parse_message(make_raw("two, different bytes", message_id="  < x@y >"))
    assert a.message_id == b.message_id
    assert a.envelope.body_sha256 != b.envelope.body_sha256


def test_without_message_id_the_raw_bytes_decide() -> None:
    a = parse_message(make_raw("one", message_id=""))
    b = parse_message(make_raw("one", message_id=""))
    c = parse_message(make_raw("two", message_id=""))
    assert a.message_id == b.message_id != c.message_id
    assert a.envelope.message_id_header == ""


def test_shard_from_date_header_in_utc() -> None:
    parsed = parse_message(make_raw(date="Sun, 01 Nov 2026 00:30:00 +0200"))
    assert parsed.shard == "2026-10"  # 22:30 UTC on 31 October


def test_shard_from_newest_received_when_no_date() -> None:
    raw = (
        b"Received: from a by b; Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        b"Received: from c by d; Sat, 28 Feb 2026 10:00:00 +0000\r\n"
        b"From: x@y\r\nSubject: s\r\n\r\nbody\r\n"
    )
    assert parse_message(raw).shard == "2026-03"


def test_undated_and_invalid_dates() -> None:
    assert parse_message(make_raw(date=None)).shard == UNDATED
    assert parse_message(make_raw(date="not a date")).shard == UNDATED
    assert parse_message(make_raw(date="Mon, 01 Jan 1900 00:00:00 +0000")).shard == UNDATED
    assert shard_for_date(None) == UNDATED


def test_encoded_and_8bit_headers_decode() -> None:
    raw = "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: Zoë <z@x>\r\n\r\nb".encode()
    env = parse_message(raw).envelope
    assert env.subject == "Grüße"
    assert env.sender == "Zoë <z@x>"
    latin = "Subject: caf\xe9\r\nFrom: a@b\r\n\r\nb".encode("latin-1")
    assert parse_message(latin).envelope.subject == "café"


def test_huge_header_is_capped() -> None:
    raw = b"To: " + b"a@b.example, " * 20000 + b"\r\nSubject: s\r\n\r\nbody"
    env = parse_message(raw).envelope
    assert len(env.to) <= 512 and env.to.endswith("…")
    assert env.size == len(raw)


def test_empty_or_headerless_bytes_are_refused() -> None:
    with pytest.raises(MessageParseError):
        parse_message(b"")
    with pytest.raises(MessageParseError):
        parse_message(b"\x00\x01\x02 just binary junk without any header line")


def test_envelope_round_trips_through_its_stored_json_string_and_the_first_schema_objects() -> None:
    env = parse_message(make_raw()).envelope
    stored = env.to_crdt()
    assert isinstance(stored, str)
    assert Envelope.from_crdt(stored) == env
    # The first schema stored an object, which pycrdt gives back with floats for numbers.
    as_pycrdt_returns = {k: float(v) if isinstance(v, int) else v for k, v in env.to_dict().items()}
    assert Envelope.from_crdt(as_pycrdt_returns) == env
    assert Envelope.from_crdt("garbage").size == 0
    assert Envelope.from_crdt('["not", "an", "object"]').sender == ""
    assert Envelope.from_crdt('{"size": "big", "date": 1.5, "from": 7}') == Envelope("", "", "", "", "", None, 0, "")
    # JSON reads integers up to 2**64; SQLite's columns hold less: out of range reads as absent.
    huge = Envelope.from_crdt('{"size": 18446744073709551615, "date": -9223372036854775808}')
    assert (huge.size, huge.date) == (0, None)


def test_helpers() -> None:
    assert normalise_message_id_header(" <a@b>\r\n (comment) ") == "<a@b>"
    assert normalise_message_id_header("bare@id") == "<bare@id>"
    assert normalise_message_id_header("   ") == ""
    assert len(message_id_for("<a@b>", b"")) == 16
    assert body_hash(b"x") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


@given(
    moment=st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1)),
    offset_minutes=st.integers(-14 * 60, 14 * 60),
    with_weekday=st.booleans(),
)
def test_the_fast_date_reader_agrees_with_the_stdlib(moment: dt.datetime, offset_minutes: int,
                                                     with_weekday: bool) -> None:
    zone = dt.timezone(dt.timedelta(minutes=offset_minutes))
    text = email.utils.format_datetime(moment.replace(microsecond=0, tzinfo=zone))
    if not with_weekday:
        text = text.split(", ", 1)[1]
    expected = email.utils.parsedate_to_datetime(text).astimezone(dt.UTC)
    assert _parse_date(text) == expected
