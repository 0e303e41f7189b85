"""The Yjs update reader behind causal hold-back: ranges, references and delete sets, and hostile bytes."""

from __future__ import annotations

import contextlib
import random

import pycrdt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtmail.model.causal import (
    UpdateDecodeError,
    check_update,
    decode_shape,
    decode_state_vector,
    missing_dependencies,
)


def _random_history(seed: int, steps: int = 300) -> list[list[bytes]]:
    """Three documents editing maps and arrays, syncing now and then; each records its own updates."""
    rng = random.Random(seed)
    docs: list[pycrdt.Doc[object]] = [pycrdt.Doc() for _ in range(3)]
    updates: list[list[bytes]] = [[] for _ in docs]
    for index, doc in enumerate(docs):
        doc.observe(lambda event, index=index: updates[index].append(event.update))
    for _ in range(steps):
        index = rng.randrange(3)
        doc = docs[index]
        values = doc.get("m", type=pycrdt.Map)
        items = doc.get("a", type=pycrdt.Array)
        op = rng.random()
        with doc.transaction():
            if op < 0.5:
                values[str(rng.randrange(20))] = rng.choice(
                    [True, False, 1.5, "é😀", {"a": [1, None, {"b": "x"}]}, 2**40, -5, b"raw"]
                )
            elif op < 0.65 and len(values):
                del values[rng.choice(list(values.keys()))]
            elif op < 0.85:
                items.append(rng.choice([1, "x", pycrdt.Map({"k": 1})]))
            elif len(items):
                del items[0]
        if rng.random() < 0.2:
            other = docs[rng.randrange(3)]
            if other is not doc:
                other.apply_update(doc.get_update(other.get_state()))
    return updates


@pytest.mark.parametrize("seed", range(5))
def test_ranges_match_what_yrs_integrates(seed: int) -> None:
    for history in _random_history(seed):
        replay: pycrdt.Doc[object] = pycrdt.Doc()
        ends: dict[int, int] = {}
        for update in history:
            assert not missing_dependencies(update, decode_state_vector(replay.get_state()))
            replay.apply_update(update)
            for client, (_, end) in decode_shape(update).ranges.items():
                ends[client] = max(ends.get(client, 0), end)
            assert ends == decode_state_vector(replay.get_state())


@pytest.mark.parametrize("seed", range(5))
def test_the_state_after_an_update_is_what_yrs_reports(seed: int) -> None:
    """Every history, applied by a replica that also has the others' updates in a random order held back until
    ready: where the update alone tells, the state after it is the document's own."""
    rng = random.Random(seed)
    histories = _random_history(seed)
    arrivals = [update for history in histories for update in history]
    rng.shuffle(arrivals)
    replay: pycrdt.Doc[object] = pycrdt.Doc()
    waiting = list(arrivals)
    told = 0
    while waiting:
        progress = len(waiting)
        for update in list(waiting):
            before = decode_state_vector(replay.get_state())
            missing, after = check_update(update, before)
            assert missing == missing_dependencies(update, before)
            if missing:
                continue
            waiting.remove(update)
            replay.apply_update(update)
            assert after == decode_state_vector(replay.get_state())
            told += 1
        assert len(waiting) < progress, "updates that every other update arrived for are still held back"
    assert told == len(arrivals)


def test_an_update_with_a_skipped_range_needs_the_range() -> None:
    """A merge of updates with a gap between them holds a Skip: what follows it is left pending in Yrs unless the
    document has the skipped range, so it waits for the range like any other dependency."""
    source: pycrdt.Doc[object] = pycrdt.Doc()
    values = source.get("m", type=pycrdt.Map)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    for key in ("a", "b", "c"):
        values[key] = key
    merged = pycrdt.merge_updates(updates[0], updates[2])  # b is missing: Yrs writes a Skip for it
    assert decode_shape(merged).skipped == {source.client_id: 2}
    assert check_update(merged, {}) == (True, None)
    assert missing_dependencies(merged, {})
    replica: pycrdt.Doc[object] = pycrdt.Doc()
    replica.apply_update(merged)
    assert decode_state_vector(replica.get_state()) == {source.client_id: 1}  # Yrs holds c as pending
    known = decode_state_vector(pycrdt.get_state(pycrdt.merge_updates(updates[0], updates[1])))
    full = decode_state_vector(source.get_state())
    assert check_update(merged, known) == (False, full)
    replica = pycrdt.Doc()
    replica.apply_update(pycrdt.merge_updates(updates[0], updates[1]))
    replica.apply_update(merged)
    assert replica.get("m", type=pycrdt.Map).to_py() == {"a": "a", "b": "b", "c": "c"}
    assert decode_state_vector(replica.get_state()) == full


def test_gaps_references_and_deletes_are_missing_dependencies() -> None:
    source: pycrdt.Doc[object] = pycrdt.Doc()
    values = source.get("m", type=pycrdt.Map)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    for key, value in (("k", 1), ("x", "a"), ("x", "b")):
        with source.transaction():
            values[key] = value
    empty: dict[int, int] = {}
    assert not missing_dependencies(updates[0], empty)
    assert missing_dependencies(updates[1], empty)  # a clock gap
    after_first = decode_state_vector(pycrdt.get_state(updates[0]))
    assert not missing_dependencies(updates[1], after_first)
    assert missing_dependencies(updates[2], after_first)  # overwrites (deletes) an item not known yet

    # Another client's overwrite refers to the first client's item through its origin.
    other: pycrdt.Doc[object] = pycrdt.Doc()
    other.apply_update(source.get_update())
    later: list[bytes] = []
    other.observe(lambda event: later.append(event.update))
    with other.transaction():
        other.get("m", type=pycrdt.Map)["x"] = "c"
    assert missing_dependencies(later[0], empty)
    assert not missing_dependencies(later[0], decode_state_vector(source.get_state()))


def test_merged_updates_decode() -> None:
    history = _random_history(9)
    merged = pycrdt.merge_updates(*[u for updates in history for u in updates])
    assert decode_shape(merged).ranges


@given(st.binary(max_size=200))
def test_hostile_bytes_never_crash_the_reader(data: bytes) -> None:
    with contextlib.suppress(UpdateDecodeError):
        decode_shape(data)


def test_truncated_updates_are_rejected() -> None:
    update = _random_history(1, steps=20)[0][0]
    decode_shape(update)
    for cut in range(len(update)):
        with pytest.raises(UpdateDecodeError):
            decode_shape(update[:cut])


@pytest.mark.parametrize(("data", "value"), [
    (b"\x00", 0), (b"\x05", 5), (b"\xac\x02", 300), (b"\xff\xff\xff\xff\xff\xff\xff\x7f", (1 << 56) - 1),
])
def test_state_vector_varints_decode(data: bytes, value: int) -> None:
    # A state vector of one client: count 1, then client and clock, both the varint under test.
    assert decode_state_vector(b"\x01" + data + data) == {value: value}


@pytest.mark.parametrize(("data", "error"), [
    (b"\x01\x80", "truncated"), (b"\x01", "truncated"), (b"\x01" + b"\xff" * 7, "truncated"),
    (b"\x01" + b"\xff" * 8, "too long"), (b"\x01" + b"\xff" * 9, "too long"),
])
def test_bad_varints_say_what_is_wrong(data: bytes, error: str) -> None:
    with pytest.raises(UpdateDecodeError, match=error):
        decode_state_vector(data)


def test_a_string_that_is_not_utf8_is_a_decode_error() -> None:
    # One client, one struct: a string item (kind 4, with an origin) whose 8 bytes end in a stray 0x80.
    data = b"\x01\x01\x00\x00\x84\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x80"
    with pytest.raises(UpdateDecodeError, match="not UTF-8"):
        decode_shape(data)
