"""SyncConnection and MailboxSync, driven through a SessionPair with no I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from crdtmail.errors import (
    BlobIntegrityError,
    FrameError,
    ProtocolStateError,
    UnauthorizedMailboxError,
)
from crdtmail.model.mailbox import Mailbox, MailboxChange, is_document_name
from crdtmail.protocol.encoding import encode_state_vector
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
    Frame,
    FrameType,
    HelloFrame,
    Limits,
    RefuseFrame,
    SyncFrame,
    SyncType,
    WelcomeFrame,
    decode_frame,
    encode_frame,
)
from crdtmail.protocol.session import (
    UNKNOWN_BLOB_BYTES,
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
    UpdateReceived,
    Welcomed,
)
from crdtmail.storage.memory import MemoryBackend
from tests.conftest import make_raw
from tests.protocol.sessionpair import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    DocSource,
    Endpoint,
    SessionPair,
    connect,
    frame_type,
    sha,
)

SMALL = Limits(max_frame_bytes=4096, blob_chunk_bytes=1000, max_pending_blob_bytes=20_000)


def raw(frame: Frame) -> bytes:
    return encode_frame(frame)


def open_pair(mailboxes: tuple[str, ...] = ("alice",), **kwargs: Any) -> SessionPair:
    """A pair whose handshake is done, granting ``mailboxes``; no sync runs."""
    pair = SessionPair(**kwargs)
    pair.client.send_hello("phone", mailboxes)
    pair.on_server = lambda event: (
        pair.server.welcome("desk", event.mailboxes) if isinstance(event, HelloReceived) else None
    )
    pair.pump()
    assert pair.client.is_open and pair.server.is_open
    pair.client_events.clear()
    pair.server_events.clear()
    pair.wire.clear()
    return pair


def doc_with(**values: Any) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    root = doc.get("m", type=Map)
    for key, value in values.items():
        root[key] = value
    return doc


def contents(doc: Doc[Any]) -> dict[str, Any]:
    return dict(doc.get("m", type=Map))


def assert_violation(connection: SyncConnection, code: CloseCode, match: str = "") -> ProtocolViolation:
    """The connection reported exactly a violation and its closing, and queued the matching CLOSE or REFUSE."""
    events = connection.events_received()
    assert [type(event) for event in events] == [ProtocolViolation, ConnectionClosed], events
    violation, closed = events
    assert isinstance(violation, ProtocolViolation) and isinstance(closed, ConnectionClosed)
    assert violation.code == code and closed.code == code and not closed.remote
    assert match in violation.reason
    assert connection.state is State.CLOSED
    last = decode_frame(connection.data_to_send()[-1])
    assert isinstance(last, CloseFrame | RefuseFrame) and last.code == code
    # Nothing the peer sends afterwards counts.
    connection.receive_data(raw(SyncFrame("alice", "index", SyncType.UPDATE, EMPTY_UPDATE)))
    connection.receive_data(b"\xff\xff")
    assert connection.events_received() == [] and connection.data_to_send() == []
    return violation


# ------------------------------------------------------------------------------------------------ handshake


def test_handshake_grants_a_subset() -> None:
    pair, client, server = connect({"alice": DocSource(), "bob": DocSource()}, {"alice": DocSource()})
    pair.pump()
    assert pair.frames()[:2] == [FrameType.HELLO, FrameType.WELCOME]
    assert pair.client.granted == pair.server.granted == frozenset({"alice"})
    assert pair.client.peer_id == "server-peer" and pair.server.peer_id == "client-peer"
    assert any(isinstance(event, Welcomed) and event.mailboxes == ("alice",) for event in client.events)
    assert any(isinstance(event, HelloReceived) and event.mailboxes == ("alice", "bob") for event in server.events)
    assert SyncComplete("alice") in client.events and SyncComplete("alice") in server.events


def test_server_refuses() -> None:
    pair = SessionPair()
    pair.client.send_hello("phone", ["alice"])
    pair.on_server = lambda event: (
        pair.server.refuse(CloseCode.UNAUTHORIZED, "device not paired") if isinstance(event, HelloReceived) else None
    )
    pair.pump()
    assert pair.client_events == [
        Refused(CloseCode.UNAUTHORIZED, "device not paired"),
        ConnectionClosed(CloseCode.UNAUTHORIZED, "device not paired", remote=True),
    ]
    assert pair.server_events[-1] == ConnectionClosed(CloseCode.UNAUTHORIZED, "device not paired", remote=False)
    assert pair.client.state is State.CLOSED and pair.server.state is State.CLOSED
    assert pair.frames() == [FrameType.HELLO, FrameType.REFUSE]


def test_version_mismatch_is_refused_naming_both_versions() -> None:
    pair = SessionPair(client_version=PROTOCOL_VERSION + 1)
    pair.client.send_hello("phone", ["alice"])
    pair.pump()
    refused = pair.client_events[0]
    assert isinstance(refused, Refused)
    assert refused.code == CloseCode.VERSION_MISMATCH
    assert f"version {PROTOCOL_VERSION + 1}" in refused.reason and f"version {PROTOCOL_VERSION}" in refused.reason
    assert isinstance(pair.server_events[0], ProtocolViolation)
    assert not any(isinstance(event, HelloReceived) for event in pair.server_events)
    assert pair.frames() == [FrameType.HELLO, FrameType.REFUSE]
    assert pair.server.state is State.CLOSED and pair.client.state is State.CLOSED


def test_client_checks_the_welcome() -> None:
    client = SyncConnection(Role.CLIENT)
    client.send_hello("phone", ["alice"])
    client.receive_data(bytes([1, PROTOCOL_VERSION + 1]))  # a WELCOME of the next version
    assert_violation(client, CloseCode.VERSION_MISMATCH, f"server speaks version {PROTOCOL_VERSION + 1}")

    client = SyncConnection(Role.CLIENT)
    client.send_hello("phone", ["alice"])
    client.receive_data(raw(WelcomeFrame(PROTOCOL_VERSION, "desk", ("alice", "carol"))))
    assert_violation(client, CloseCode.UNAUTHORIZED, "carol")


def test_server_cannot_grant_what_was_not_asked_for() -> None:
    server = SyncConnection(Role.SERVER)
    server.receive_data(raw(HelloFrame(PROTOCOL_VERSION, "phone", ("alice",))))
    with pytest.raises(UnauthorizedMailboxError):
        server.welcome("desk", ["bob"])
    assert server.state is State.HELLO_RECEIVED


def test_local_calls_in_the_wrong_state_raise() -> None:
    client = SyncConnection(Role.CLIENT)
    with pytest.raises(ProtocolStateError, match="not open"):
        client.send_update("alice", "index", EMPTY_UPDATE)
    with pytest.raises(ProtocolStateError):
        client.welcome("x", [])
    client.send_hello("phone", ["alice"])
    with pytest.raises(ProtocolStateError, match="send HELLO as client in state hello-sent"):
        client.send_hello("phone", ["alice"])
    server = SyncConnection(Role.SERVER)
    with pytest.raises(ProtocolStateError):
        server.send_hello("desk", [])
    with pytest.raises(ProtocolStateError):
        server.want_blobs([sha(b"")])
    pair = open_pair()
    with pytest.raises(UnauthorizedMailboxError, match="bob"):
        pair.client.send_sync_step1("bob", "index", b"\x00")
    with pytest.raises(FrameError):
        pair.client.send_sync_step1("alice", "index", b"\x05")  # not a state vector
    assert pair.client.is_open and pair.client.data_to_send() == []


def test_closing_handshake() -> None:
    pair = open_pair()
    pair.client.close(CloseCode.GOING_AWAY, "shutting down")
    assert pair.client.state is State.CLOSING
    pair.client.close()  # idempotent
    pair.server.send_update("alice", "index", EMPTY_UPDATE)  # crosses the CLOSE: dropped by the client
    pair.pump()
    assert pair.server_events == [ConnectionClosed(CloseCode.GOING_AWAY, "shutting down", remote=True)]
    assert pair.client_events == [ConnectionClosed(CloseCode.GOING_AWAY, "shutting down", remote=False)]
    assert pair.frames(CLIENT_TO_SERVER) == [FrameType.CLOSE]
    assert pair.frames(SERVER_TO_CLIENT) == [FrameType.SYNC, FrameType.CLOSE]
    assert (pair.client.state, pair.server.state) == (State.CLOSED, State.CLOSED)
    assert pair.client.close_code == CloseCode.GOING_AWAY


def test_connection_lost() -> None:
    pair = open_pair()
    pair.client.connection_lost()
    assert pair.client.events_received() == [
        ConnectionClosed(CloseCode.CONNECTION_LOST, "the connection was lost without a CLOSE frame", remote=True)
    ]
    pair.client.connection_lost()
    assert pair.client.events_received() == []
    pair.server.close(CloseCode.NORMAL, "bye")
    pair.server.connection_lost()  # the peer never echoed
    assert pair.server.events_received() == [ConnectionClosed(CloseCode.NORMAL, "bye", remote=False)]


# --------------------------------------------------------------------------------------------- hostile input


def test_truncated_frame() -> None:
    pair = open_pair()
    frame = raw(SyncFrame("alice", "index", SyncType.UPDATE, b"\x01\x02\x03"))
    pair.server.receive_data(frame[:-1])
    assert_violation(pair.server, CloseCode.MALFORMED_FRAME, "truncated")


def test_bad_varint() -> None:
    pair = open_pair()
    pair.server.receive_data(b"\x03\x05alice\x05index\x02" + b"\xff" * 9)
    assert_violation(pair.server, CloseCode.MALFORMED_FRAME, "longer than 8 bytes")


def test_oversized_frame() -> None:
    pair = open_pair(server_limits=SMALL)
    pair.server.receive_data(raw(SyncFrame("alice", "index", SyncType.UPDATE, b"x" * 5000)))
    assert_violation(pair.server, CloseCode.FRAME_TOO_LARGE, "over the limit of 4096")


def test_oversized_length_field() -> None:
    pair = open_pair()
    pair.server.receive_data(b"\x03" + b"\xff\xff\xff\xff\x0f" + b"alice")
    assert_violation(pair.server, CloseCode.FRAME_TOO_LARGE, "mailbox name")


def test_text_message() -> None:
    pair = open_pair()
    pair.server.receive_data("\x03hello")
    assert_violation(pair.server, CloseCode.MALFORMED_FRAME, "text WebSocket message")


def test_unknown_frame_type() -> None:
    pair = open_pair()
    pair.server.receive_data(b"\x2a\x00")
    assert_violation(pair.server, CloseCode.UNKNOWN_FRAME, "unknown frame type 42")


def test_unknown_sync_message_type() -> None:
    pair = open_pair()
    pair.server.receive_data(b"\x03\x05alice\x05index\x09\x00")
    assert_violation(pair.server, CloseCode.UNKNOWN_FRAME, "sync message type 9")


def test_sync_before_hello() -> None:
    server = SyncConnection(Role.SERVER)
    server.receive_data(raw(SyncFrame("alice", "index", SyncType.UPDATE, EMPTY_UPDATE)))
    assert_violation(server, CloseCode.UNEXPECTED_FRAME, "SYNC frame before the handshake finished")


def test_sync_before_welcome_is_refused() -> None:
    server = SyncConnection(Role.SERVER)
    server.receive_data(raw(HelloFrame(PROTOCOL_VERSION, "phone", ("alice",))))
    assert isinstance(server.events_received()[0], HelloReceived)
    server.receive_data(raw(CatalogFrame("alice", ())))
    violation = assert_violation(server, CloseCode.UNEXPECTED_FRAME, "CATALOG")
    assert "before the handshake" in violation.reason


def test_client_must_not_receive_hello_and_server_must_not_receive_welcome() -> None:
    pair = open_pair()
    pair.client.receive_data(raw(HelloFrame(PROTOCOL_VERSION, "x", ())))
    assert_violation(pair.client, CloseCode.UNEXPECTED_FRAME, "HELLO")
    server = SyncConnection(Role.SERVER)
    server.receive_data(raw(WelcomeFrame(PROTOCOL_VERSION, "x", ())))
    assert_violation(server, CloseCode.UNEXPECTED_FRAME, "WELCOME")


def test_second_hello() -> None:
    pair = open_pair()
    pair.server.receive_data(raw(HelloFrame(PROTOCOL_VERSION, "phone", ("alice",))))
    assert_violation(pair.server, CloseCode.UNEXPECTED_FRAME, "HELLO frame in state open")


def test_ungranted_mailbox() -> None:
    pair = open_pair()
    source = DocSource({"index": doc_with(a=1)})
    sync = MailboxSync(pair.server, "alice", source)
    pair.server.receive_data(raw(SyncFrame("bob", "index", SyncType.UPDATE, doc_with(x=1).get_update())))
    events = pair.server.events_received()
    for event in events:
        sync.handle(event)
    assert [type(event) for event in events] == [ProtocolViolation, ConnectionClosed]
    assert events[0] == ProtocolViolation(CloseCode.UNAUTHORIZED, "mailbox 'bob' was not granted on this connection")
    assert source.applied == []
    pair.server.data_to_send()
    pair.client.receive_data(raw(CatalogFrame("bob", ())))  # the client checks too
    assert_violation(pair.client, CloseCode.UNAUTHORIZED, "'bob'")


def test_too_many_documents() -> None:
    limits = Limits(max_documents=3)
    pair = open_pair(server_limits=limits)
    for doc in ("index", "2026-01", "2026-02"):
        pair.server.receive_data(raw(SyncFrame("alice", doc, SyncType.STEP1, b"\x00")))
    pair.server.receive_data(raw(SyncFrame("alice", "2026-01", SyncType.STEP1, b"\x00")))  # seen before: fine
    assert len(pair.server.events_received()) == 4
    pair.server.receive_data(raw(SyncFrame("alice", "2026-03", SyncType.STEP1, b"\x00")))
    assert_violation(pair.server, CloseCode.LIMIT_EXCEEDED, "more than 3 documents")


def test_too_many_documents_in_a_catalog() -> None:
    pair = open_pair(server_limits=Limits(max_documents=3))
    entries = tuple(CatalogEntry(f"2026-0{month}") for month in range(1, 4))
    pair.server.receive_data(raw(CatalogFrame("alice", entries)))
    assert isinstance(pair.server.events_received()[0], CatalogReceived)
    pair.server.receive_data(raw(CatalogFrame("alice", (CatalogEntry("2026-04"),))))
    assert_violation(pair.server, CloseCode.LIMIT_EXCEEDED, "documents")


def test_malformed_frame_during_the_handshake_is_refused() -> None:
    server = SyncConnection(Role.SERVER)
    server.receive_data(raw(HelloFrame(PROTOCOL_VERSION, "phone", ("alice",))))
    server.events_received()
    server.receive_data(b"\x03\x01")
    assert_violation(server, CloseCode.MALFORMED_FRAME)  # sent as a REFUSE: the client waits for one


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=5))
def test_random_messages_never_raise(messages: list[bytes]) -> None:
    pair = open_pair()
    for message in messages:
        pair.server.receive_data(message)
    events = pair.server.events_received()
    if pair.server.state is State.CLOSED:
        assert isinstance(events[-1], ConnectionClosed)
        closing = [decode_frame(data) for data in pair.server.data_to_send()][-1]
        assert isinstance(closing, CloseFrame)


# ----------------------------------------------------------------------------------- sync over pycrdt docs


def test_full_sync_of_diverged_documents() -> None:
    shared = doc_with(base=1)
    client_docs = {"index": doc_with(i=1), "shared": shared}
    server_shared: Doc[Any] = Doc()
    server_shared.apply_update(shared.get_update())
    server_shared.get("m", type=Map)["server"] = 2
    shared.get("m", type=Map)["client"] = 3
    server_docs = {"shared": server_shared, "only-server": doc_with(s=4)}
    client_source, server_source = DocSource(client_docs), DocSource(server_docs)
    pair, client, server = connect({"alice": client_source}, {"alice": server_source})
    pair.pump()
    for name in ("index", "shared", "only-server"):
        assert contents(client_source.docs[name]) == contents(server_source.docs[name])
    assert contents(client_source.docs["shared"]) == {"base": 1, "server": 2, "client": 3}
    assert client.syncs["alice"].is_synced and server.syncs["alice"].is_synced
    assert client.events.count(SyncComplete("alice")) == 1
    # Asked for whole: what a side had nothing of, with the items the peer holds of it; not what it had some of.
    assert client.syncs["alice"].requested_whole == {"only-server": 1}
    assert server.syncs["alice"].requested_whole == {"index": 1}
    # Every update was applied with the connection it came from as origin.
    assert {origin for _, _, origin in client_source.applied} == {pair.client}
    assert {origin for _, _, origin in server_source.applied} == {pair.server}
    # Each side pulled what it lacked, once: one step 1 and one step 2 per differing document and direction.
    sync_types = [decode_frame(data) for _, data in pair.wire if frame_type(data) is FrameType.SYNC]
    steps = sorted((frame.document, frame.sync_type.name) for frame in sync_types if isinstance(frame, SyncFrame))
    assert steps == sorted([
        ("index", "STEP1"), ("index", "STEP2"),
        ("shared", "STEP1"), ("shared", "STEP2"), ("shared", "STEP1"), ("shared", "STEP2"),
        ("only-server", "STEP1"), ("only-server", "STEP2"),
    ])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.booleans(), st.sampled_from(["k1", "k2"]), st.integers(0, 9)),
        max_size=25,
    )
)
def test_random_edits_converge_and_a_second_sync_costs_only_catalogs(edits: list[tuple[str, bool, str, int]]) -> None:
    client_docs: dict[str, Doc[Any]] = {}
    server_docs: dict[str, Doc[Any]] = {}
    for doc, on_client, key, value in edits:
        target = (client_docs if on_client else server_docs).setdefault(doc, doc_with())
        target.get("m", type=Map)[key] = value
    client_source, server_source = DocSource(client_docs), DocSource(server_docs)
    pair, client, server = connect({"alice": client_source}, {"alice": server_source})
    pair.pump()
    assert sorted(client_docs) == sorted(server_docs)
    for name in client_docs:
        assert contents(client_docs[name]) == contents(server_docs[name])
    assert client.syncs["alice"].is_synced and server.syncs["alice"].is_synced
    again, _, _ = connect({"alice": DocSource(client_docs)}, {"alice": DocSource(server_docs)})
    again.pump()
    assert again.frames() == [FrameType.HELLO, FrameType.WELCOME, FrameType.CATALOG, FrameType.CATALOG]


def test_matching_documents_cost_only_the_catalog() -> None:
    base = doc_with(a=1, b=2)
    copy: Doc[Any] = Doc()
    copy.apply_update(base.get_update())
    client_source, server_source = DocSource({"d": base}), DocSource({"d": copy})
    pair, client, server = connect({"alice": client_source}, {"alice": server_source})
    pair.pump()
    assert pair.frames() == [FrameType.HELLO, FrameType.WELCOME, FrameType.CATALOG, FrameType.CATALOG]
    assert client_source.loads == {} and server_source.loads == {}
    assert SyncComplete("alice") in client.events and SyncComplete("alice") in server.events


def test_incremental_updates_after_sync() -> None:
    client_doc, server_doc = doc_with(a=1), doc_with()
    client_source, server_source = DocSource({"d": client_doc}), DocSource({"d": server_doc})
    pair, client, _ = connect({"alice": client_source}, {"alice": server_source})
    pair.pump()
    pair.wire.clear()
    updates: list[bytes] = []
    subscription = client_doc.observe(lambda event: updates.append(event.update))
    client_doc.get("m", type=Map)["b"] = 2
    client_doc.unobserve(subscription)
    client.syncs["alice"].send_updates([("d", update) for update in updates])
    pair.pump()
    assert contents(server_source.docs["d"]) == {"a": 1, "b": 2}
    assert pair.frames() == [FrameType.SYNC]


def test_unacceptable_documents_are_skipped() -> None:
    client_source = DocSource({"x-private": doc_with(secret=1), "d": doc_with(a=1)})
    server_source = DocSource()
    pair, _, _ = connect({"alice": client_source}, {"alice": server_source})
    pair.pump()
    assert sorted(server_source.docs) == ["d"]
    # A step 1 for a document not held is answered with an empty update, without touching anything.
    pair.client.send_sync_step1("alice", "nothing-here", b"\x00")
    pair.pump()
    assert "nothing-here" not in server_source.docs and server_source.loads.get("nothing-here") is None


def test_a_bad_update_closes_the_connection_and_changes_nothing() -> None:
    server_doc = doc_with(a=1)
    server_source = DocSource({"d": server_doc})
    pair, _, server = connect({"alice": DocSource()}, {"alice": server_source})
    pair.pump()
    before = server_doc.get_state()
    pair.client.send_update("alice", "d", b"\x05garbage")
    pair.pump()
    violation = next(event for event in server.events if isinstance(event, ProtocolViolation))
    assert violation.code == CloseCode.INVALID_UPDATE
    assert server_doc.get_state() == before and contents(server_doc) == {"a": 1}
    assert pair.server.state is State.CLOSED and pair.client.state is State.CLOSED
    assert pair.client_events[-1] == ConnectionClosed(CloseCode.INVALID_UPDATE, violation.reason, remote=True)


def test_sync_events_after_close_are_not_applied() -> None:
    pair = open_pair()
    source = DocSource()
    sync = MailboxSync(pair.server, "alice", source)
    good = doc_with(a=1).get_update()
    pair.server.receive_data(raw(SyncFrame("alice", "d", SyncType.UPDATE, good)))
    update_event = pair.server.events_received()[0]
    pair.server.close()
    assert sync.handle(update_event) == []
    assert source.applied == []


# -------------------------------------------------------------------------------------------- real mailboxes


def make_mailbox(backend: MemoryBackend | None = None) -> Mailbox:
    return Mailbox("alice", backend or MemoryBackend())


def mailbox_source(mailbox: Mailbox) -> SyncSource:
    return MailboxSource(mailbox, accepts=is_document_name)


def snapshot(mailbox: Mailbox) -> tuple[Any, ...]:
    messages = sorted((m.id, m.folder_id, tuple(sorted(m.flags)), m.envelope.subject) for m in mailbox.all_messages())
    folders = sorted((f.id, f.path, f.role) for f in mailbox.folders())
    return tuple(messages), tuple(folders)


def sync_mailboxes(a: Mailbox, b: Mailbox, **kwargs: Any) -> tuple[SessionPair, Endpoint, Endpoint]:
    pair, client, server = connect({"alice": mailbox_source(a)}, {"alice": mailbox_source(b)}, **kwargs)
    pair.pump()
    return pair, client, server


def test_full_sync_of_two_mailboxes() -> None:
    a, b = make_mailbox(), make_mailbox()
    october = a.add(make_raw("october", date="Fri, 02 Oct 2026 10:00:00 +0000")).message_id
    november = a.add(make_raw("november", date="Tue, 10 Nov 2026 09:30:00 +0000"), flags=["\\Seen"]).message_id
    a.create_folder("Work")
    a.move(october, "Work")
    undated = b.add(make_raw("undated", date=None)).message_id
    b.set_flags(undated, add=["\\Flagged"])
    pair, client, server = sync_mailboxes(a, b)
    assert snapshot(a) == snapshot(b)
    assert {m.id for m in b.all_messages()} == {october, november, undated}
    assert b.message(october).folder_id == a.folder("Work").id
    assert b.message(november).flags == frozenset({"\\Seen"})
    assert a.message(undated).flags == frozenset({"\\Flagged"})
    assert SyncComplete("alice") in client.events and SyncComplete("alice") in server.events
    assert pair.client.state is State.OPEN  # the connection stays open for live updates


@pytest.mark.parametrize("forward", ["on_change", "on_update"])
def test_incremental_mailbox_updates_are_relayed_without_echo(forward: str) -> None:
    """Forwarded after each commit (on_change) or as each update is applied (on_update): the same frames."""
    a, b = make_mailbox(), make_mailbox()
    message = a.add(make_raw("hello")).message_id
    pair, client, server = sync_mailboxes(a, b)
    if forward == "on_change":
        a.observe(client.syncs["alice"].on_change)
        b.observe(server.syncs["alice"].on_change)
    else:
        a.observe_updates(client.syncs["alice"].on_update)
        b.observe_updates(server.syncs["alice"].on_update)
    pair.wire.clear()
    a.set_flags(message, add=["\\Seen"])
    pair.pump()
    assert b.message(message).flags == frozenset({"\\Seen"})
    # B applied it with the connection as origin, so B's observer did not send it back.
    assert pair.frames(CLIENT_TO_SERVER) == [FrameType.SYNC] and pair.frames(SERVER_TO_CLIENT) == []
    b.move(message, "Archive")
    pair.pump()
    assert a.message(message).folder_id == a.folder("Archive").id
    assert snapshot(a) == snapshot(b)


def test_matching_mailboxes_exchange_only_catalogs_and_load_nothing() -> None:
    backend_a, backend_b = MemoryBackend(), MemoryBackend()
    a, b = make_mailbox(backend_a), make_mailbox(backend_b)
    for day in range(1, 4):
        a.add(make_raw(f"m{day}", date=f"Fri, 0{day} Oct 2026 10:00:00 +0000"))
        b.add(make_raw(f"n{day}", date=f"Tue, 0{day} Nov 2026 10:00:00 +0000"))
    sync_mailboxes(a, b)
    assert snapshot(a) == snapshot(b)
    # Fresh Mailbox objects over the same stores: nothing but the index is in memory.
    a2, b2 = make_mailbox(backend_a), make_mailbox(backend_b)
    assert a2.loaded_shards() == [] and b2.loaded_shards() == []
    pair, client, server = sync_mailboxes(a2, b2)
    assert pair.frames() == [FrameType.HELLO, FrameType.WELCOME, FrameType.CATALOG, FrameType.CATALOG]
    assert pair.wire_bytes() < 300
    assert a2.loaded_shards() == [] and b2.loaded_shards() == []
    assert SyncComplete("alice") in client.events and SyncComplete("alice") in server.events


def test_relayed_updates_do_not_loop_around_a_cycle() -> None:
    boxes = [make_mailbox() for _ in range(3)]
    syncs: list[list[MailboxSync]] = [[], [], []]

    def relay(node: int) -> Callable[[MailboxChange], None]:
        def forward(change: MailboxChange) -> None:
            for sync in list(syncs[node]):
                sync.on_change(change)

        return forward

    for index, box in enumerate(boxes):
        box.observe(relay(index))
    pairs = []
    for left, right in ((0, 1), (1, 2), (2, 0)):  # a triangle: every update can come back round
        pair, client, server = connect({"alice": mailbox_source(boxes[left])}, {"alice": mailbox_source(boxes[right])})
        pair.pump()
        syncs[left].append(client.syncs["alice"])
        syncs[right].append(server.syncs["alice"])
        pairs.append(pair)

    def settle() -> None:
        for _ in range(50):
            before = sum(len(pair.wire) for pair in pairs)
            for pair in pairs:
                pair.pump()
            if sum(len(pair.wire) for pair in pairs) == before:
                return
        raise AssertionError("updates kept circling")

    settle()
    message = boxes[0].add(make_raw("round and round")).message_id
    settle()
    boxes[1].set_flags(message, add=["\\Seen"])
    settle()
    boxes[2].set_flags(message, add=["\\Flagged"])
    settle()
    assert snapshot(boxes[0]) == snapshot(boxes[1]) == snapshot(boxes[2])
    assert boxes[0].message(message).flags == frozenset({"\\Seen", "\\Flagged"})
    # Each update crossed each link at most once.
    for pair in pairs:
        frames = [(direction, decode_frame(data)) for direction, data in pair.wire]
        updates = [
            (direction, frame.payload) for direction, frame in frames
            if isinstance(frame, SyncFrame) and frame.sync_type is not SyncType.STEP1
        ]
        assert len(updates) == len(set(updates))


def test_an_update_with_missing_dependencies_is_held_and_repaired_by_a_step1() -> None:
    a, b = make_mailbox(), make_mailbox()
    message = a.add(make_raw("hello")).message_id
    pair, client, server = sync_mailboxes(a, b)
    changes: list[MailboxChange] = []
    a.observe(changes.append)
    a.set_flags(message, add=["\\Seen"])
    a.set_flags(message, add=["\\Flagged"])
    assert len(changes) == 2
    # Deliver only the second change: B cannot apply it yet and asks for a state diff instead.
    client.syncs["alice"].on_change(changes[1])
    pair.pump()
    assert b.message(message).flags == frozenset({"\\Seen", "\\Flagged"})
    assert b.held_updates() == 0
    assert server.syncs["alice"].pending == frozenset() and server.syncs["alice"].is_synced


def test_a_mailbox_refuses_a_document_name_it_cannot_hold() -> None:
    a = make_mailbox()
    pair = open_pair()
    sync = MailboxSync(pair.server, "alice", MailboxSource(a))  # no name filter: the Mailbox itself refuses
    pair.server.receive_data(raw(SyncFrame("alice", "not-a-shard", SyncType.UPDATE, doc_with(x=1).get_update())))
    for event in pair.server.events_received():
        sync.handle(event)
    events = pair.server.events_received()
    assert isinstance(events[0], ProtocolViolation) and events[0].code == CloseCode.INVALID_UPDATE
    assert "not-a-shard" in events[0].reason
    assert "not-a-shard" not in a.document_names()


def test_mailbox_source_filters_names() -> None:
    source = MailboxSource(make_mailbox(), accepts=is_document_name)
    assert source.accepts("index") and source.accepts("2026-11") and not source.accepts("../etc")
    assert MailboxSource(make_mailbox()).accepts("anything")


# ------------------------------------------------------------------------------------------------------ blobs


def blob_pair(server_blobs: dict[str, bytes], limits: Limits = SMALL) -> tuple[SessionPair, Endpoint, Endpoint]:
    pair, client, server = connect({"alice": DocSource()}, {"alice": DocSource()},
                                   client_limits=limits, server_limits=limits)
    server.blobs = server_blobs
    pair.pump()
    pair.wire.clear()
    return pair, client, server


def test_chunked_blob_transfer() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: 11 chunks of at most 1000
    empty = b""
    pair, client, _ = blob_pair({sha(data): data, sha(empty): empty})
    pair.client.want_blobs([sha(data).upper(), sha(empty), sha(data)])
    pair.pump()
    assert client.received_blobs == {sha(data): data, sha(empty): empty}
    chunks = [frame for frame in pair.frames(SERVER_TO_CLIENT) if frame is FrameType.BLOB_CHUNK]
    assert len(chunks) == 12
    assert pair.frames(CLIENT_TO_SERVER) == [FrameType.BLOB_WANT]
    assert all(len(message) <= SMALL.max_frame_bytes for _, message in pair.wire)
    assert pair.client.wanted_blobs == frozenset() and pair.server.owed_blobs == ()


def test_missing_blob() -> None:
    pair, client, _ = blob_pair({})
    pair.client.want_blobs([sha(b"nope")])
    pair.pump()
    assert client.missing_blobs == [sha(b"nope")]
    assert not any(isinstance(event, BlobReceived) for event in client.events)


def test_want_window() -> None:
    limits = Limits(max_frame_bytes=4096, blob_chunk_bytes=1000, max_blob_wants=2, blob_want_window=2)
    blobs = {sha(bytes([n])): bytes([n]) for n in range(5)}
    pair, client, _ = blob_pair(blobs, limits)
    pair.client.want_blobs(list(blobs))
    first = decode_frame(pair.client.data_to_send()[0])
    assert isinstance(first, BlobWantFrame) and len(first.hashes) == 2
    pair.server.receive_data(raw(first))
    pair.pump()
    assert client.received_blobs == blobs


def test_corrupt_blob_is_rejected() -> None:
    pair = open_pair(client_limits=SMALL)
    good = b"the real body"
    pair.client.want_blobs([sha(good)])
    pair.client.data_to_send()
    pair.client.receive_data(raw(BlobChunkFrame(sha(good), 0, len(good), b"the fake body")))
    violation = assert_violation(pair.client, CloseCode.BLOB_MISMATCH, sha(good))
    assert "discarded" in violation.reason


def test_corrupt_chunked_blob_is_rejected_after_the_last_chunk() -> None:
    pair = open_pair(client_limits=SMALL)
    good = b"a" * 1500
    bad = b"a" * 1499 + b"b"
    pair.client.want_blobs([sha(good)])
    pair.client.receive_data(raw(BlobChunkFrame(sha(good), 0, 1500, bad[:1000])))
    assert pair.client.events_received() == []
    pair.client.receive_data(raw(BlobChunkFrame(sha(good), 1000, 1500, bad[1000:])))
    assert_violation(pair.client, CloseCode.BLOB_MISMATCH)


def test_a_corrupt_body_of_several_kilobytes_is_still_rejected() -> None:
    # Bodies of 2 KB and more are hashed in pieces that keep the GIL (crdtmail.digest): one flipped byte anywhere,
    # the last piece included, is still caught.
    limits = Limits()
    good = bytes(range(256)) * 40  # 10,240 bytes: several 2,047-byte pieces and a short last one
    for position in (0, 2047, len(good) - 1):
        bad = bytearray(good)
        bad[position] ^= 1
        pair = open_pair(client_limits=limits)
        pair.client.want_blobs([sha(good)])
        pair.client.receive_data(raw(BlobChunkFrame(sha(good), 0, len(good), bytes(bad))))
        assert_violation(pair.client, CloseCode.BLOB_MISMATCH, sha(good))
    pair = open_pair(client_limits=limits)
    pair.client.want_blobs([sha(good)])
    pair.client.receive_data(raw(BlobChunkFrame(sha(good), 0, len(good), good)))
    assert pair.client.events_received() == [BlobReceived(sha(good), good)]


def test_want_window_counts_bytes_as_well_as_blobs() -> None:
    limits = Limits(max_blob_wants=100, blob_want_window=100, blob_want_bytes=1000)
    sizes = {sha(bytes([n])): 100 for n in range(30)}
    pair = open_pair(client_limits=limits)
    pair.client.want_blobs(list(sizes), sizes=sizes)
    first = decode_frame(pair.client.data_to_send()[0])
    assert isinstance(first, BlobWantFrame) and len(first.hashes) == 10  # 10 x 100 bytes fill the 1,000
    # Without a size a blob counts as UNKNOWN_BLOB_BYTES: the old window of 256 with the default limits.
    pair = open_pair()
    pair.client.want_blobs([sha(str(n).encode()) for n in range(300)])
    first = decode_frame(pair.client.data_to_send()[0])
    assert isinstance(first, BlobWantFrame)
    assert len(first.hashes) == DEFAULT_LIMITS.blob_want_bytes // UNKNOWN_BLOB_BYTES == 256
    # Small bodies with their sizes: the whole count window.
    small = {sha(str(n).encode()): 4000 for n in range(2000)}
    pair = open_pair()
    pair.client.want_blobs(list(small), sizes=small)
    first = decode_frame(pair.client.data_to_send()[0])
    assert isinstance(first, BlobWantFrame) and len(first.hashes) == DEFAULT_LIMITS.blob_want_window


def test_a_blob_larger_than_the_byte_window_is_asked_for_alone() -> None:
    limits = Limits(max_frame_bytes=4096, blob_chunk_bytes=1000, max_pending_blob_bytes=20_000, blob_want_bytes=1000)
    big, small = b"B" * 3000, b"s" * 10
    blobs = {sha(big): big, sha(small): small}
    pair, client, _ = blob_pair(blobs, limits)
    pair.client.want_blobs([sha(big), sha(small)], sizes={sha(big): len(big), sha(small): len(small)})
    first = decode_frame(pair.client.data_to_send()[0])
    assert isinstance(first, BlobWantFrame) and first.hashes == (sha(big),)
    pair.server.receive_data(raw(first))
    pair.pump()
    assert client.received_blobs == blobs
    assert pair.client.wanted_blobs == frozenset()


def test_unsolicited_blob_frames_are_rejected() -> None:
    pair = open_pair()
    pair.client.receive_data(raw(BlobChunkFrame(sha(b"x"), 0, 1, b"x")))
    assert_violation(pair.client, CloseCode.UNEXPECTED_FRAME, "not asked for")
    pair = open_pair()
    pair.client.receive_data(raw(BlobMissingFrame(sha(b"x"))))
    assert_violation(pair.client, CloseCode.UNEXPECTED_FRAME, "not asked for")


def test_chunks_out_of_order_are_rejected() -> None:
    pair = open_pair(client_limits=SMALL)
    data = b"z" * 1500
    pair.client.want_blobs([sha(data)])
    pair.client.receive_data(raw(BlobChunkFrame(sha(data), 1000, 1500, data[1000:])))
    assert_violation(pair.client, CloseCode.MALFORMED_FRAME, "offset 1000")
    pair = open_pair(client_limits=SMALL)
    pair.client.want_blobs([sha(data)])
    pair.client.receive_data(raw(BlobChunkFrame(sha(data), 0, 1500, data[:1000])))
    pair.client.receive_data(raw(BlobChunkFrame(sha(data), 0, 1500, data[:500])))
    assert_violation(pair.client, CloseCode.MALFORMED_FRAME, "does not follow")


def test_pending_blob_bytes_are_limited() -> None:
    limits = Limits(max_frame_bytes=4096, blob_chunk_bytes=1000, max_pending_blob_bytes=2000)
    pair = open_pair(client_limits=limits)
    one, two = b"1" * 1500, b"2" * 1500
    pair.client.want_blobs([sha(one), sha(two)])
    pair.client.receive_data(raw(BlobChunkFrame(sha(one), 0, 1500, one[:1000])))
    pair.client.receive_data(raw(BlobChunkFrame(sha(two), 0, 1500, two[:1000])))
    assert_violation(pair.client, CloseCode.LIMIT_EXCEEDED, "reassembly")


def test_too_many_blob_wants() -> None:
    limits = Limits(max_blob_wants=3, blob_want_window=3)
    pair = open_pair(server_limits=limits)
    pair.server.receive_data(raw(BlobWantFrame((sha(b"1"), sha(b"2")))))
    pair.server.receive_data(raw(BlobWantFrame((sha(b"2"),))))  # already owed: not counted twice
    assert pair.server.events_received() == [BlobsWanted((sha(b"1"), sha(b"2")))]
    pair.server.receive_data(raw(BlobWantFrame((sha(b"3"), sha(b"4")))))
    assert_violation(pair.server, CloseCode.LIMIT_EXCEEDED, "more than 3 blob requests")


def test_send_blob_checks_locally() -> None:
    pair = open_pair()
    with pytest.raises(ProtocolStateError, match="did not ask"):
        pair.server.send_blob(sha(b"x"), b"x")
    pair.server.receive_data(raw(BlobWantFrame((sha(b"x"),))))
    with pytest.raises(BlobIntegrityError):
        pair.server.send_blob(sha(b"x"), b"y")
    assert pair.server.owed_blobs == (sha(b"x"),)


def test_a_blob_over_the_limit_is_answered_missing() -> None:
    limits = Limits(max_frame_bytes=4096, blob_chunk_bytes=1000, max_pending_blob_bytes=2000)
    pair = open_pair(server_limits=limits)
    big = b"b" * 2001
    pair.server.receive_data(raw(BlobWantFrame((sha(big),))))
    assert pair.server.send_blob(sha(big), big) is False
    assert [decode_frame(data) for data in pair.server.data_to_send()] == [BlobMissingFrame(sha(big))]


def test_blob_events_are_plain_values() -> None:
    pair, client, _ = blob_pair({sha(b"body"): b"body"})
    pair.client.want_blobs([sha(b"body")])
    pair.pump()
    received: list[Event] = [event for event in client.events if isinstance(event, BlobReceived | BlobMissing)]
    assert received == [BlobReceived(sha(b"body"), b"body")]


def test_step1_event_carries_the_validated_state_vector() -> None:
    pair = open_pair()
    state_vector = encode_state_vector({5: 9})
    pair.server.receive_data(raw(SyncFrame("alice", "d", SyncType.STEP1, state_vector)))
    pair.server.receive_data(raw(SyncFrame("alice", "d", SyncType.UPDATE, EMPTY_UPDATE)))
    assert pair.server.events_received() == [
        SyncStep1Received("alice", "d", state_vector),
        UpdateReceived("alice", "d", EMPTY_UPDATE),
    ]


def test_a_malformed_step_2_for_a_shard_asked_for_closes_the_connection_and_stores_nothing() -> None:
    """The answer to a step 1 for a shard this replica lacks is stored as it comes once Yrs has decoded it
    (Mailbox._store_whole): one that does not decode closes the connection, and nothing of it is kept."""
    a = make_mailbox()
    pair = open_pair()
    sync = MailboxSync(pair.server, "alice", mailbox_source(a))
    sync.start()
    assert sync.request_document("2026-11")
    whole = doc_with(x=1).get_update()
    pair.server.receive_data(raw(SyncFrame("alice", "2026-11", SyncType.STEP2, whole[: len(whole) // 2])))
    for event in pair.server.events_received():
        sync.handle(event)
    events = pair.server.events_received()
    assert isinstance(events[0], ProtocolViolation) and events[0].code == CloseCode.INVALID_UPDATE
    assert "2026-11" not in a.document_names() and a.unindexed_shards() == []
