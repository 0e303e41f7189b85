"""Every Mailbox operation, its events, lazy loading and the derived index, on the in-memory backend."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from crdtmail.errors import (
    AmbiguousMessageError,
    CorruptStoreError,
    ExpungedMessageError,
    FolderExistsError,
    FolderNotEmptyError,
    ModelError,
    UnknownFolderError,
    UnknownMessageError,
)
from crdtmail.model import mailbox as mailbox_module
from crdtmail.model.backend import CommitBatch, DocumentUpdate, MailboxBackend
from crdtmail.model.causal import decode_state_vector
from crdtmail.model.mailbox import INBOX, INDEX_DOC, LOCAL, TRASH, Mailbox, MailboxChange, observe_keys
from crdtmail.storage.memory import MemoryBackend
from crdtmail.storage.sqlite import SqliteStore
from tests.conftest import make_raw


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> MailboxBackend:
    """Every model test runs on both backends: they promise the same contract."""
    if request.param == "memory":
        return MemoryBackend()
    store = SqliteStore.open(tmp_path / "store.sqlite3")
    request.addfinalizer(store.close)
    return store.backend("test")


@pytest.fixture
def mailbox(backend: MailboxBackend) -> Mailbox:
    return Mailbox("test", backend)


def recorded(mailbox: Mailbox) -> list[MailboxChange]:
    changes: list[MailboxChange] = []
    mailbox.observe(changes.append)
    return changes


def test_new_mailbox_has_standard_folders(mailbox: Mailbox) -> None:
    roles = {f.role: f.path for f in mailbox.folders()}
    assert roles == {"inbox": "INBOX", "sent": "Sent", "drafts": "Drafts", "trash": "Trash", "junk": "Junk",
                     "archive": "Archive"}
    assert mailbox.folders()[0].role == "inbox"


def test_add_stores_envelope_body_and_flags(mailbox: Mailbox) -> None:
    raw = make_raw("First")
    changes = recorded(mailbox)
    result = mailbox.add(raw, flags=["seen", "$Label"])
    assert result.added
    view = mailbox.message(result.message_id)
    assert view.envelope.subject == "First"
    assert view.flags == {"\\Seen", "$Label"}
    assert view.folder_id == INBOX
    assert view.shard == "2026-11"
    assert mailbox.body(result.message_id) == raw
    assert changes[-1].added == {result.message_id}
    assert changes[-1].is_local and changes[-1].origin == LOCAL
    assert changes[-1].updates and changes[-1].updates[0][0] == "2026-11"


def test_adding_again_changes_nothing(mailbox: Mailbox) -> None:
    raw = make_raw("Again", message_id="<same@x>")
    first = mailbox.add(raw)
    changes = recorded(mailbox)
    second = mailbox.add(make_raw("Again, other copy", message_id="<same@x>"), folder="Archive", flags=["seen"])
    assert first.message_id == second.message_id and not second.added
    assert changes == []
    assert mailbox.message(first.message_id).folder_id == INBOX
    assert mailbox.counts()[INBOX].total == 1


def test_move_delete_and_flags(mailbox: Mailbox) -> None:
    mid = mailbox.add(make_raw()).message_id
    changes = recorded(mailbox)
    assert mailbox.move(mid, "Archive")
    assert not mailbox.move(mid, "archive")  # by role, already there
    assert changes[-1].moved == {mid}
    assert mailbox.set_flags(mid, add=["\\flagged", "seen"])
    assert changes[-1].changed == {mid}
    assert not mailbox.set_flags(mid, add=["seen"])
    assert mailbox.set_flags(mid, remove=["flagged"])
    assert mailbox.message(mid).flags == {"\\Seen"}
    assert mailbox.delete(mid)
    assert mailbox.message(mid).folder_id == TRASH
    assert [r.message_id for r in mailbox.list_folder("Trash")] == [mid]


def test_set_flags_changes_only_what_differs_among_many_keywords(mailbox: Mailbox) -> None:
    mid = mailbox.add(make_raw(), flags=["seen"]).message_id
    other = mailbox.add(make_raw("other"), flags=[f"$K{n}" for n in range(12)]).message_id  # keywords in use
    changes = recorded(mailbox)
    assert not mailbox.set_flags(mid, add=["seen"], remove=["$K3", "flagged"])  # all as asked already
    assert changes == []
    assert mailbox.set_flags(mid, add=["$K3", "seen"], remove=["seen"])  # add wins over remove of the same
    assert mailbox.message(mid).flags == {"$K3", "\\Seen"}
    assert mailbox.set_flags(mid, add=["$K4"], remove=["$K3", "$K5"])
    assert mailbox.message(mid).flags == {"$K4", "\\Seen"}
    assert mailbox.rows([mid])[mid].flags == ("$K4", "\\Seen")
    assert mailbox.message(other).flags == {f"$K{n}" for n in range(12)}
    assert len(changes) == 2


def test_envelopes_in_bulk_skip_expunged_and_unknown_ids(mailbox: Mailbox) -> None:
    ids = [mailbox.add(make_raw(f"bulk {n}")).message_id for n in range(5)]
    mailbox.expunge(ids[0])
    envelopes = mailbox.envelopes([*ids, "no-such-id"])
    assert set(envelopes) == set(ids[1:])
    assert all(envelopes[mid] == mailbox.message(mid).envelope for mid in ids[1:])
    assert sorted(e.body_sha256 for e in mailbox.all_envelopes()) == sorted(e.body_sha256 for e in envelopes.values())
    # Read from a restarted replica, every shard is loaded only while it is read.
    again = Mailbox("test", mailbox._backend)
    assert len(list(again.all_envelopes())) == 4 and again.loaded_shards() == []


def test_invalid_flags_are_refused(mailbox: Mailbox) -> None:
    mid = mailbox.add(make_raw()).message_id
    for bad in ["\\Bogus", "has space", "a/b", "", "x" * 65, "quo\"te"]:
        with pytest.raises(ModelError):
            mailbox.set_flags(mid, add=[bad])
    assert mailbox.message(mid).flags == frozenset()


def test_expunge_leaves_tombstone_and_refuses_plain_readd(mailbox: Mailbox) -> None:
    raw = make_raw()
    mid = mailbox.add(raw, flags=["seen"]).message_id
    changes = recorded(mailbox)
    mailbox.expunge(mid)
    assert changes[-1].expunged == {mid}
    with pytest.raises(UnknownMessageError):
        mailbox.message(mid)
    with pytest.raises(UnknownMessageError):
        mailbox.expunge(mid)
    with pytest.raises(ExpungedMessageError):
        mailbox.add(raw)
    assert mailbox.counts()[INBOX].total == 0
    again = mailbox.add(raw, redeliver=True)
    assert again.added and mailbox.message(mid).flags == frozenset()
    assert changes[-1].added == {mid}


def test_unknown_ids_and_prefixes(mailbox: Mailbox) -> None:
    ids = [mailbox.add(make_raw(f"m{i}")).message_id for i in range(40)]
    assert mailbox.resolve(ids[0]) == ids[0]
    assert mailbox.resolve(ids[0][:10].upper()) == ids[0]
    with pytest.raises(UnknownMessageError):
        mailbox.resolve("zzzzzzzz")
    with pytest.raises(UnknownMessageError):
        mailbox.resolve("")
    shared = {i[:1] for i in ids}
    prefix = next(p for p in shared if sum(i.startswith(p) for i in ids) > 1)
    with pytest.raises(AmbiguousMessageError):
        mailbox.resolve(prefix)
    with pytest.raises(UnknownMessageError):
        mailbox.move("nonexistent00000", "Archive")


def test_folders_create_rename_delete(mailbox: Mailbox) -> None:
    work = mailbox.create_folder("Work/Projects")
    assert work.path == "Work/Projects"
    assert mailbox.folder("Work").id == work.parent
    assert mailbox.create_folder("Work/Projects").id == work.id
    mid = mailbox.add(make_raw(), folder="Work/Projects").message_id
    renamed = mailbox.rename_folder("Work/Projects", "Work/Clients")
    assert renamed.id == work.id and renamed.path == "Work/Clients"
    assert mailbox.message(mid).folder_id == work.id
    with pytest.raises(FolderExistsError):
        mailbox.rename_folder("Work/Clients", "Work")
    with pytest.raises(ModelError):
        mailbox.rename_folder("Work", "Work/Inner")
    with pytest.raises(FolderNotEmptyError):
        mailbox.delete_folder("Work")  # has a subfolder
    with pytest.raises(FolderNotEmptyError):
        mailbox.delete_folder("Work/Clients")
    mailbox.delete_folder("Work/Clients", move_to_trash=True)
    assert mailbox.message(mid).folder_id == TRASH
    mailbox.delete_folder("Work")
    with pytest.raises(UnknownFolderError):
        mailbox.folder("Work")
    with pytest.raises(ModelError):
        mailbox.delete_folder("INBOX")
    with pytest.raises(ModelError):
        mailbox.create_folder("a//b")
    recreated = mailbox.create_folder("Work")
    assert recreated.path == "Work"


def test_same_folder_created_on_two_replicas_is_one_folder() -> None:
    a, b = Mailbox("m", MemoryBackend()), Mailbox("m", MemoryBackend())
    assert a.create_folder("Receipts").id == b.create_folder("Receipts").id


def test_a_new_device_joining_keeps_what_was_done_to_the_standard_folders() -> None:
    """A new replica writes nothing for the standard folders: its writes would be concurrent with a rename or
    delete made before it joined, and Yrs settles those by client id, which undid them about one time in two.
    Twenty devices (new client ids each) join a mailbox whose Sent was renamed and Junk deleted."""
    for _ in range(20):
        desktop = Mailbox("m", MemoryBackend())
        desktop.rename_folder("Sent", "Sent Items")
        desktop.delete_folder("Junk")
        phone = Mailbox("m", MemoryBackend())
        theirs, ours = desktop.encode_document(INDEX_DOC), phone.encode_document(INDEX_DOC)
        phone.apply_update(INDEX_DOC, theirs, origin="desktop")
        desktop.apply_update(INDEX_DOC, ours, origin="phone")
        for replica in (desktop, phone):
            paths = {folder.role: folder.path for folder in replica.folders()}
            assert paths["sent"] == "Sent Items" and "junk" not in paths, paths
            assert sorted(paths) == ["archive", "drafts", "inbox", "sent", "trash"]


def test_listing_is_newest_first_and_paged(mailbox: Mailbox) -> None:
    ids = []
    for day in range(1, 29):
        ids.append(mailbox.add(make_raw(f"d{day}", date=f"{day:02d} Oct 2026 12:00:00 +0000")).message_id)
    ids.append(mailbox.add(make_raw("undated", date=None)).message_id)
    page1 = mailbox.list_folder("INBOX", limit=10)
    page2 = mailbox.list_folder("INBOX", offset=10, limit=10)
    assert [r.message_id for r in page1] == ids[::-1][1:11]  # undated sorts last
    assert [r.message_id for r in page2] == ids[::-1][11:21]
    assert mailbox.list_folder("INBOX", offset=28)[0].message_id == ids[-1]


def test_counts(mailbox: Mailbox) -> None:
    a = mailbox.add(make_raw()).message_id
    mailbox.add(make_raw(), flags=["seen"])
    mailbox.add(make_raw(), folder="Sent", flags=["seen"])
    counts = mailbox.counts()
    assert (counts[INBOX].total, counts[INBOX].unread) == (2, 1)
    assert (counts["sent"].total, counts["sent"].unread) == (1, 0)
    mailbox.set_flags(a, add=["seen"])
    assert mailbox.counts()[INBOX].unread == 0


def test_reads_do_not_load_every_shard(backend: MailboxBackend) -> None:
    mailbox = Mailbox("m", backend)
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    with mailbox.batch():
        for month in months:
            for i in range(5):
                mailbox.add(make_raw(f"{month}-{i}", date=f"{i + 1:02d} {month} 2025 10:00:00 +0000"))
    reopened = Mailbox("m", backend)
    assert reopened.loaded_shards() == []
    rows = reopened.list_folder("INBOX", limit=3)
    assert len(rows) == 3 and reopened.counts()[INBOX].total == 60
    assert reopened.loaded_shards() == []
    reopened.message(rows[0].message_id)
    assert reopened.loaded_shards() == ["2025-12"]


def test_remote_updates_apply_and_fire_events_with_origin() -> None:
    a, b = Mailbox("m", MemoryBackend()), Mailbox("m", MemoryBackend())
    b.apply_update("index", a.encode_document("index"), origin="peer-a")  # the first sync
    outbox: list[tuple[str, bytes]] = []
    a.observe(lambda change: outbox.extend(change.updates))
    mid = a.add(make_raw(), flags=["seen"]).message_id
    a.move(mid, "Archive")
    a.create_folder("Receipts")
    received = recorded(b)
    for doc, update in outbox:
        b.apply_update(doc, update, origin="peer-a")
    assert b.message(mid).folder_id == "archive"
    assert b.message(mid).flags == {"\\Seen"}
    assert b.folder("Receipts")
    assert all(change.origin == "peer-a" and not change.is_local for change in received)
    assert any(mid in change.added for change in received)
    assert any(change.folders_changed for change in received)
    with pytest.raises(ModelError):
        b.apply_update("not-a-doc", b"", origin="peer-a")
    with pytest.raises(ModelError):
        b.apply_update("index", outbox[0][1], origin=LOCAL)


def test_envelopes_stored_as_objects_by_the_first_schema_are_read_and_listed(backend: MailboxBackend) -> None:
    """A shard written when envelopes were objects (as version-1 peers sent them) reads and lists the same."""
    from pycrdt import Doc, Map

    source = Mailbox("m", MemoryBackend())
    added = source.add(make_raw("Old form"), flags=["seen"])
    envelope = source.message(added.message_id).envelope
    old = Doc()
    with old.transaction():
        old.get("messages", type=Map)[added.message_id] = {
            key: float(value) if isinstance(value, int) else value for key, value in envelope.to_dict().items()}
        old.get("flags", type=Map)[added.message_id + "/\\Seen"] = True
    mailbox = Mailbox("m", backend)
    mailbox.apply_update(source.message(added.message_id).shard, old.get_update(), origin="old-peer")
    assert mailbox.message(added.message_id).envelope == envelope
    assert mailbox.message(added.message_id).flags == {"\\Seen"}
    (row,) = mailbox.list_folder("INBOX")
    assert (row.message_id, row.subject, row.date, row.size) == (added.message_id, "Old form", envelope.date,
                                                                  envelope.size)
    assert list(mailbox.all_envelopes()) == [envelope]


def test_updates_are_announced_before_their_commit_with_their_origin(backend: MailboxBackend) -> None:
    """observe_updates sees each update before the store has it (a peer sends it on without waiting for the
    disk), then observe sees the committed change with the same bytes; a duplicate is announced to no one."""
    a, b = Mailbox("m", MemoryBackend()), Mailbox("m", backend)
    b.apply_update("index", a.encode_document("index"), origin="a")
    announced: list[tuple[str, bytes, object, bytes | None]] = []
    committed: list[tuple[str, bytes]] = []

    def on_update(document: str, update: bytes, origin: object) -> None:
        announced.append((document, update, origin, backend.state_vector(document)))

    b.observe_updates(on_update)
    b.observe(lambda change: committed.extend(change.updates))
    outbox: list[tuple[str, bytes]] = []
    a.observe(lambda change: outbox.extend(change.updates))
    mid = a.add(make_raw()).message_id
    a.set_flags(mid, add=["seen"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    assert [(d, u) for d, u, _, _ in announced] == committed == outbox
    assert all(origin == "a" for _, _, origin, _ in announced)
    # At the announcement the store did not have the update yet: its state vector was the one from before.
    shard = next(d for d, _ in outbox if d != "index")
    stored_before = [vector for d, _, _, vector in announced if d == shard]
    assert stored_before[0] is None and stored_before[1] != backend.state_vector(shard)
    announced.clear()
    b.apply_update(*outbox[-1], origin="someone-else")  # the same bytes again, by another path
    assert announced == []
    b.observe_updates(on_update)()  # subscribed and unsubscribed again: called once, not twice
    b.set_flags(mid, add=["flagged"])
    assert [(origin, d) for d, _, origin, _ in announced] == [(LOCAL, shard)]


def test_an_update_sent_before_a_commit_that_never_happened_comes_back(tmp_path: Path) -> None:
    """The peer sends an update before committing it; if the process dies in between, the replica restarts
    without it, gets it back from the peer that has it, and its next changes do not reuse its clocks."""
    store = SqliteStore.open(tmp_path / "a.sqlite3")
    a, b = Mailbox("m", store.backend("m")), Mailbox("m", MemoryBackend())
    mid = a.add(make_raw("kept")).message_id
    for document in a.document_names():
        b.apply_update(document, a.encode_document(document), origin="a")
    a.observe_updates(lambda document, update, origin: b.apply_update(document, update, origin="a"))

    def crash(batch: CommitBatch) -> None:
        raise RuntimeError("the process died before its commit")

    a._backend.commit = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        a.set_flags(mid, add=["flagged"])
    assert b.message(mid).flags == {"\\Flagged"}  # the peer got it before the commit failed
    store.close()
    store = SqliteStore.open(tmp_path / "a.sqlite3")
    restarted = Mailbox("m", store.backend("m"))
    assert restarted.message(mid).flags == set()  # not on disk here
    # A change made before the next sync: had it reused the lost update's client id and clock, the peer would
    # take it for the update it already has and drop it.
    outbox: list[tuple[str, bytes]] = []
    restarted.observe_updates(lambda document, update, origin: outbox.append((document, update)))
    restarted.set_flags(mid, add=["seen"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    assert b.message(mid).flags == {"\\Flagged", "\\Seen"}
    for document in b.document_names():  # the next sync
        diff = b.encode_document(document, restarted.document_state_vector(document))
        restarted.apply_update(document, diff, origin="b")
    assert restarted.message(mid).flags == {"\\Flagged", "\\Seen"}
    store.close()


def test_updates_out_of_order_are_held_until_they_apply(backend: MailboxBackend) -> None:
    a = Mailbox("m", MemoryBackend())
    b = Mailbox("m", backend)
    b.apply_update("index", a.encode_document("index"), origin="a")
    outbox: list[tuple[str, bytes]] = []
    a.observe(lambda change: outbox.extend(change.updates))
    mid = a.add(make_raw()).message_id
    a.set_flags(mid, add=["seen"])
    a.move(mid, "Archive")
    shard_updates = [(d, u) for d, u in outbox if d != "index"]
    assert len(shard_updates) == 3
    assert not b.apply_update(*shard_updates[2], origin="a")  # the move, before what it builds on
    assert not b.apply_update(*shard_updates[1], origin="a")
    assert b.held_updates() == 2 and backend.load_document("2026-11") is None
    assert b.apply_update(*shard_updates[0], origin="a")
    assert b.held_updates() == 0
    assert b.message(mid).flags == {"\\Seen"} and b.message(mid).folder_id == "archive"
    reopened = Mailbox("m", backend)  # everything applied was committed
    assert reopened.message(mid).folder_id == "archive"


def test_yrs_loses_an_overwrite_when_pending_updates_integrate_together() -> None:
    """Why the Mailbox holds updates back (crdtmail.model.causal): pycrdt 0.14.13 gets this wrong."""
    import pycrdt

    source: pycrdt.Doc[object] = pycrdt.Doc()
    values = source.get("m", type=pycrdt.Map)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    for key, value in (("k", 1), ("x", "a"), ("y", 1), ("x", "b")):
        with source.transaction():
            values[key] = value
    naive: pycrdt.Doc[object] = pycrdt.Doc()
    for index in (0, 2, 3, 1):
        naive.apply_update(updates[index])
    if "x" in naive.get("m", type=pycrdt.Map).to_py():
        pytest.skip("this pycrdt integrates pending updates correctly; the hold-back is now only a safeguard")
    careful = Mailbox("m", MemoryBackend())
    careful_doc = careful._index_doc  # any document of a mailbox goes through the same hold-back
    for index in (0, 2, 3, 1):
        careful.apply_update("index", updates[index], origin="x")
    assert careful_doc.get("m", type=pycrdt.Map).to_py()["x"] == "b"


def test_state_reloads_from_backend(backend: MailboxBackend) -> None:
    a = Mailbox("m", backend)
    mid = a.add(make_raw(), folder="Sent", flags=["flagged"]).message_id
    a.create_folder("X/Y")
    b = Mailbox("m", backend)
    assert b.message(mid).folder_id == "sent" and b.message(mid).flags == {"\\Flagged"}
    assert b.folder("X/Y").path == "X/Y"


def test_concurrent_expunge_beats_unaware_add() -> None:
    raw = make_raw()
    a, b = Mailbox("m", MemoryBackend()), Mailbox("m", MemoryBackend())
    a_out: list[tuple[str, bytes]] = []
    b_out: list[tuple[str, bytes]] = []
    a.observe(lambda c: a_out.extend(c.updates) if c.is_local else None)
    b.observe(lambda c: b_out.extend(c.updates) if c.is_local else None)
    mid = a.add(raw).message_id
    for d, u in a_out:
        b.apply_update(d, u, origin="a")
    a_out.clear()
    a.expunge(mid)
    b.set_flags(mid, add=["seen"])  # concurrently, b flags it
    for d, u in a_out:
        b.apply_update(d, u, origin="a")
    for d, u in b_out:
        a.apply_update(d, u, origin="b")
    for box in (a, b):
        assert mid not in {m.id for m in box.all_messages()}
        assert box.counts()[INBOX].total == 0


def test_derived_index_matches_recomputation_after_random_operations(backend: MailboxBackend) -> None:
    rng = random.Random(7)
    mailbox = Mailbox("m", backend)
    mailbox.create_folder("Work")
    ids: list[str] = []
    for step in range(400):
        op = rng.random()
        if op < 0.3 or not ids:
            day = rng.randint(1, 28)
            month = rng.choice(["Sep", "Oct", "Nov"])
            ids.append(mailbox.add(make_raw(f"s{step}", date=f"{day:02d} {month} 2026 08:00:00 +0000")).message_id)
            continue
        mid = rng.choice(ids)
        try:
            if op < 0.5:
                mailbox.move(mid, rng.choice(["INBOX", "Work", "Archive", "Trash"]))
            elif op < 0.8:
                flag = rng.choice(["seen", "flagged", "$Work"])
                mailbox.set_flags(mid, add=[flag] if rng.random() < 0.6 else [], remove=[flag])
            elif op < 0.9:
                mailbox.expunge(mid)
            else:
                mailbox.delete(mid)
        except UnknownMessageError:
            pass
    expected = {}
    for name in mailbox.document_names():
        if name != "index":
            expected.update(mailbox.rows_for_shard(name))
    assert {row.message_id: row for row in backend.all_rows()} == expected
    documents_only = MemoryBackend()
    documents_only.commit(CommitBatch(updates=[
        DocumentUpdate(name, backend.load_document(name) or b"", backend.state_vector(name) or b"")
        for name in backend.document_names()
    ]))
    assert list(documents_only.all_rows()) == []
    Mailbox("m", documents_only)  # opening rebuilds the missing index
    assert {row.message_id: row for row in documents_only.all_rows()} == expected


def test_batch_holding_transactions_writes_one_update_per_shard_and_commit(mailbox: Mailbox) -> None:
    changes = recorded(mailbox)
    november = [make_raw(f"Nov {n}") for n in range(5)]
    october = [make_raw(f"Oct {n}", date="Sat, 10 Oct 2026 09:00:00 +0000") for n in range(3)]
    with mailbox.batch(hold_transactions=True):
        ids = [mailbox.add(raw, flags=["seen"]).message_id for raw in november + october]
        again = mailbox.add(november[0], folder="Archive")  # seen inside the open transaction
        mailbox.move(ids[1], "Archive")  # other local operations join the held transaction
        mailbox.flush()
        late = mailbox.add(make_raw("After the flush")).message_id
    assert not again.added
    assert len(changes) == 2
    assert sorted(doc for doc, _ in changes[0].updates) == ["2026-10", "2026-11"]
    assert changes[0].added == set(ids)
    assert [doc for doc, _ in changes[1].updates] == ["2026-11"] and changes[1].added == {late}
    assert mailbox.message(ids[1]).folder_id == "archive"
    assert all(mailbox.message(mid).flags == {"\\Seen"} for mid in ids)
    assert mailbox.counts()[INBOX].total == 8


def test_batch_holding_transactions_is_durable_and_syncs_like_single_adds(backend: MailboxBackend) -> None:
    mailbox = Mailbox("test", backend)
    outbox: list[tuple[str, bytes]] = []
    mailbox.observe(lambda change: outbox.extend(change.updates))
    with mailbox.batch(hold_transactions=True):
        ids = {mailbox.add(make_raw(f"Bulk {n}"), flags=["flagged"]).message_id for n in range(4)}
    reopened = Mailbox("test", backend)
    assert {row.message_id for row in reopened.list_folder(INBOX)} == ids
    other = Mailbox("test", MemoryBackend())
    for doc, update in outbox:
        other.apply_update(doc, update, origin="peer")
    assert {mid for mid in ids if other.message(mid).flags == {"\\Flagged"}} == ids


def test_remote_update_during_a_held_batch_closes_the_local_transactions(mailbox: Mailbox) -> None:
    sender = Mailbox("test", MemoryBackend())
    mailbox.apply_update("index", sender.encode_document("index"), origin="peer")
    remote = sender.add(make_raw("From the peer")).message_id
    changes = recorded(mailbox)
    with mailbox.batch(hold_transactions=True):
        local = mailbox.add(make_raw("Local")).message_id
        mailbox.apply_update("2026-11", sender.encode_document("2026-11"), origin="peer")
        later = mailbox.add(make_raw("Local, later")).message_id
    assert {mailbox.message(mid).envelope.subject for mid in (local, remote, later)} == {
        "Local", "From the peer", "Local, later"}
    assert set().union(*(change.added for change in changes)) == {local, remote, later}


def test_a_shard_not_in_memory_is_served_from_the_store_without_loading_it(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "store.sqlite3")
    backend = store.backend("m")
    source = Mailbox("m", backend)
    ids = [source.add(make_raw(f"serve-{i}", date="02 Nov 2026 10:00:00 +0000")).message_id for i in range(6)]
    source.set_flags(ids[0], add=["$Kept"])
    source.set_flags(ids[0], remove=["$Kept"])  # a cleared flag stays a key of the map
    source.set_flags(ids[1], add=["\\Flagged"])
    source.expunge(ids[2])
    shard = source.rows([ids[0]])[ids[0]].shard
    backend.fold_logs()  # one snapshot per document, as an import leaves them
    serving = Mailbox("m", backend)  # a peer that has just started: nothing in memory
    fresh = Mailbox("m", MemoryBackend())
    fresh.apply_update("index", serving.encode_document("index"), origin="peer")
    fresh.apply_update(shard, serving.encode_document(shard, fresh.document_state_vector(shard)), origin="peer")
    assert serving.loaded_shards() == []
    assert {m.id: m.flags for m in fresh.all_messages()} == {m.id: m.flags for m in source.all_messages()}
    # A peer that has part of it gets the rest, computed from the stored bytes too.
    later = source.add(make_raw("serve-later", date="03 Nov 2026 10:00:00 +0000")).message_id
    source.set_flags(ids[3], add=["\\Seen"])
    backend.fold_logs()
    restarted = Mailbox("m", backend)
    fresh.apply_update(shard, restarted.encode_document(shard, fresh.document_state_vector(shard)), origin="peer")
    assert restarted.loaded_shards() == []
    assert fresh.message(later) and "\\Seen" in fresh.message(ids[3]).flags
    # With a log beside the snapshot, the shard is rebuilt update by update and answered from memory.
    source.set_flags(ids[4], add=["\\Answered"])
    again = Mailbox("m", backend)
    fresh.apply_update(shard, again.encode_document(shard, fresh.document_state_vector(shard)), origin="peer")
    assert again.loaded_shards() == [shard] and "\\Answered" in fresh.message(ids[4]).flags
    # The whole shard arrived at once on the fresh side; its cleared flag is known there, so an expunge
    # removes every flag key of the message and nothing of it is left to sync back.
    fresh.expunge(ids[0])
    assert fresh.document_state_vector(shard) != source.document_state_vector(shard)
    source.apply_update(shard, fresh.encode_document(shard, source.document_state_vector(shard)), origin="peer")
    assert ids[0] not in {m.id for m in source.all_messages()}
    assert {m.id: m.flags for m in fresh.all_messages()} == {m.id: m.flags for m in source.all_messages()}
    assert serving.encode_document("2001-01") == b"\x00\x00"  # a shard nobody has: an empty answer
    store.close()


def _shard_with_a_log(path: Path, count: int) -> tuple[SqliteStore, Mailbox, list[str], str]:
    """A stored November shard of ``count`` messages: a snapshot, then a log of one flag change (on the first)."""
    store = SqliteStore.open(path)
    source = Mailbox("m", store.backend("m"))
    ids = [source.add(make_raw(f"log-{i}", date="02 Nov 2026 10:00:00 +0000")).message_id for i in range(count)]
    store.backend("m").fold_logs()
    source.set_flags(ids[0], add=["\\Flagged"])
    return store, source, ids, source.rows([ids[0]])[ids[0]].shard


def test_a_full_answer_of_a_shard_with_a_log_folds_it_without_loading_it(tmp_path: Path) -> None:
    store, source, ids, shard = _shard_with_a_log(tmp_path / "store.sqlite3", 4)
    backend = store.backend("m")
    source.expunge(ids[1])
    assert len(backend.load_document_parts(shard)) == 3  # a snapshot and a log of two updates
    serving = Mailbox("m", backend)
    answer = serving.encode_document(shard, b"\x00")  # a peer with nothing of it
    assert serving.loaded_shards() == []
    assert backend.load_document_parts(shard) == [answer]  # the merge is the snapshot now, the log is gone
    fresh = Mailbox("m", MemoryBackend())
    fresh.apply_update("index", serving.encode_document("index"), origin="peer")
    fresh.apply_update(shard, answer, origin="peer")
    assert {m.id: m.flags for m in fresh.all_messages()} == {m.id: m.flags for m in source.all_messages()}
    assert {m.id for m in fresh.all_messages()} == {ids[0], ids[2], ids[3]}
    # The writer that still holds the shard keeps logging on top of the new snapshot, and nothing is lost.
    source.set_flags(ids[2], add=["\\Seen"])
    reopened = Mailbox("m", backend)
    assert "\\Seen" in reopened.message(ids[2]).flags and "\\Flagged" in reopened.message(ids[0]).flags
    again = Mailbox("m", MemoryBackend())
    again.apply_update(shard, serving.encode_document(shard, b"\x00"), origin="peer")  # folded once more
    assert len(backend.load_document_parts(shard)) == 1
    assert {m.id: m.flags for m in again.all_messages()} == {m.id: m.flags for m in reopened.all_messages()}
    store.close()


def test_a_full_answer_is_merged_in_memory_when_the_store_cannot_take_the_fold(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, source, _, shard = _shard_with_a_log(tmp_path / "store.sqlite3", 3)
    backend = store.backend("m")
    store._connection.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "store.sqlite3")
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        answer = Mailbox("m", backend).encode_document(shard, b"\x00")
    finally:
        other.rollback()
        other.close()
    assert "answering from memory" in caplog.text
    assert len(backend.load_document_parts(shard)) == 2  # nothing was written
    fresh = Mailbox("m", MemoryBackend())
    fresh.apply_update(shard, answer, origin="peer")
    assert {m.id: m.flags for m in fresh.all_messages()} == {m.id: m.flags for m in source.all_messages()}
    store.close()



def test_stored_updates_rebuild_update_by_update_as_they_would_merged(backend: MailboxBackend) -> None:
    """Two writers on one store (two processes) exchanging updates late and out of order: every document
    rebuilt from its log in commit order equals the one built from the log merged into one update."""
    import pycrdt

    rng = random.Random(7)
    a, b = Mailbox("m", backend), Mailbox("m", backend)
    b.apply_update("index", a.encode_document("index"), origin="a")
    wires: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": []}  # updates on their way to a and to b
    a.observe(lambda change: wires["b"].extend(change.updates) if change.is_local else None)
    b.observe(lambda change: wires["a"].extend(change.updates) if change.is_local else None)
    for step in range(300):
        writer, name = (a, "a") if rng.random() < 0.5 else (b, "b")
        ids = [row.message_id for row in writer.list_folder("INBOX", limit=50)]
        op = rng.random()
        if op < 0.3 or not ids:
            writer.add(make_raw(f"r{step}", date=f"{rng.randint(1, 28):02d} Nov 2026 10:00:00 +0000"))
        elif op < 0.8:
            writer.set_flags(rng.choice(ids), add=["\\Seen"] if rng.random() < 0.5 else [],
                             remove=["\\Seen"] if rng.random() < 0.5 else [])
        else:
            writer.move(rng.choice(ids), "Archive")
        inbox = wires["b" if name == "a" else "a"]
        if inbox and rng.random() < 0.3:  # deliver some, shuffled: the receiver holds back what is early
            rng.shuffle(inbox)
            receiver = b if name == "a" else a
            for doc, update in inbox[: rng.randint(1, len(inbox))]:
                receiver.apply_update(doc, update, origin=name)
            del inbox[:]
    for name in backend.document_names():
        parts = backend.load_document_parts(name)
        in_turn: pycrdt.Doc[object] = pycrdt.Doc()
        for part in parts:
            in_turn.apply_update(part)
        merged: pycrdt.Doc[object] = pycrdt.Doc()
        merged.apply_update(pycrdt.merge_updates(*parts) if len(parts) > 1 else parts[0])
        for root in ("messages", "placement", "flags", "expunged", "folders", "meta"):
            assert in_turn.get(root, type=pycrdt.Map).to_py() == merged.get(root, type=pycrdt.Map).to_py(), (name, root)
        # The same clocks (Yrs writes a state vector's clients in no fixed order).
        assert decode_state_vector(in_turn.get_state()) == decode_state_vector(merged.get_state())


@pytest.mark.parametrize("with_expunge", [False, True])
def test_rows_after_a_big_remote_change_match_a_recomputation(backend: MailboxBackend, with_expunge: bool) -> None:
    source = Mailbox("m", MemoryBackend())
    with source.batch():
        ids = [source.add(make_raw(f"big-{i}", date="05 Nov 2026 10:00:00 +0000")).message_id for i in range(200)]
    shard = source.rows([ids[0]])[ids[0]].shard
    replica = Mailbox("m", backend)
    replica.apply_update("index", source.encode_document("index"), origin="peer")
    replica.apply_update(shard, source.encode_document(shard), origin="peer")
    replica.unload(shard)  # as after a restart: the change below loads it from the store
    for n, message_id in enumerate(ids[:120]):
        source.set_flags(message_id, add=["\\Seen", f"$K{n % 3}"])
    for message_id in ids[100:150]:
        source.move(message_id, "Archive")
    if with_expunge:
        source.expunge(ids[7])
    changes = recorded(replica)
    replica.apply_update(shard, source.encode_document(shard, replica.document_state_vector(shard)), origin="peer")
    assert {row.message_id: row for row in backend.all_rows()} == replica.rows_for_shard(shard)
    assert replica.rows([ids[5]])[ids[5]].flags == ("$K2", "\\Seen")
    assert replica.rows([ids[120]])[ids[120]].folder_id == replica.folder("Archive").id
    assert (ids[7] in changes[-1].expunged) is with_expunge


def test_shards_arriving_whole_in_a_batch_are_dropped_when_it_commits(backend: MailboxBackend) -> None:
    source = Mailbox("m", MemoryBackend())
    ids = [source.add(make_raw(f"month {month}", date=f"06 {month} 2026 10:00:00 +0000")).message_id
           for month in ("Jan", "Feb", "Mar")]
    shards = sorted({row.shard for row in source.rows(ids).values()})
    replica = Mailbox("m", backend)
    changes = recorded(replica)
    with replica.batch():  # a burst of frames applied under one commit
        replica.apply_update("index", source.encode_document("index"), origin="peer")
        for shard in shards:
            replica.apply_update(shard, source.encode_document(shard), origin="peer")
        assert replica.loaded_shards() == shards and not changes  # nothing committed yet
    assert len(changes) == 1 and changes[0].added == set(ids)
    assert replica.loaded_shards() == []  # committed, then let go
    assert {m.id for m in replica.all_messages()} == set(ids)


def test_a_dropped_shard_is_freed_with_its_observers(backend: MailboxBackend) -> None:
    import gc
    import weakref

    source = Mailbox("m", MemoryBackend())
    mid = source.add(make_raw("freed", date="06 Nov 2026 10:00:00 +0000")).message_id
    shard = source.rows([mid])[mid].shard
    replica = Mailbox("m", backend)
    replica.apply_update("index", source.encode_document("index"), origin="peer")
    replica.apply_update(shard, source.encode_document(shard), origin="peer")
    # A shard that arrived whole is committed and dropped; reading it loads it again.
    assert replica.loaded_shards() == [] and replica.message(mid)
    source.set_flags(mid, add=["\\Seen"])
    replica.apply_update(shard, source.encode_document(shard, replica.document_state_vector(shard)), origin="peer")
    assert replica.message(mid).flags == {"\\Seen"} and replica.loaded_shards() == [shard]
    # Now observed (a remote change arrived): pycrdt would keep the document alive through its observers.
    document = weakref.ref(replica._shards[shard].doc)
    replica.unload(shard)
    gc.collect()
    assert document() is None
    assert replica.message(mid).flags == {"\\Seen"}


def test_a_change_brings_the_envelopes_of_the_messages_it_adds(mailbox: Mailbox) -> None:
    changes = recorded(mailbox)
    local = mailbox.add(make_raw("added here")).message_id
    assert dict(changes[-1].envelopes) == {local: mailbox.message(local).envelope}
    # A shard arriving whole (an initial sync) brings the envelopes it was read for anyway.
    sender = Mailbox("sender", MemoryBackend())
    ids = [sender.add(make_raw(f"arriving {n}", date=f"Sat, 0{n + 1} Aug 2026 10:00:00 +0000")).message_id
           for n in range(5)]
    gone = sender.add(make_raw("expunged before it travels", date="Sat, 08 Aug 2026 10:00:00 +0000")).message_id
    sender.expunge(gone)
    mailbox.apply_update("index", sender.encode_document("index"), origin="peer")
    mailbox.apply_update("2026-08", sender.encode_document("2026-08"), origin="peer")
    arrived = changes[-1]
    assert arrived.origin == "peer" and arrived.added == set(ids)
    assert dict(arrived.envelopes) == {message_id: sender.message(message_id).envelope for message_id in ids}
    # A flag change adds nothing and brings no envelope.
    mailbox.set_flags(ids[0], add=["\\Seen"])
    assert changes[-1].changed == {ids[0]} and dict(changes[-1].envelopes) == {}


def _source_with_two_months(count: int = 4) -> tuple[Mailbox, list[str], list[str]]:
    source = Mailbox("m", MemoryBackend())
    november = [source.add(make_raw(f"nov-{i}", date="02 Nov 2026 10:00:00 +0000")).message_id for i in range(count)]
    october = [source.add(make_raw(f"oct-{i}", date="02 Oct 2026 10:00:00 +0000")).message_id for i in range(count)]
    source.set_flags(november[0], add=["\\Seen", "$Work"])
    source.move(october[0], "Archive")
    source.expunge(october[1])
    return source, november, october


def _receive_whole(target: Mailbox, source: Mailbox, origin: object = "peer") -> list[str]:
    """What an initial sync does: every document as a state diff against the target's empty state."""
    shards = [name for name in source.document_names() if name != "index"]
    target.apply_update("index", source.encode_document("index", target.document_state_vector("index")), origin,
                        check_causality=False)
    for shard in shards:
        target.apply_update(shard, source.encode_document(shard, target.document_state_vector(shard)), origin,
                            check_causality=False)
    return shards


def test_a_shard_arriving_whole_is_stored_as_it_came_and_indexed_later(backend: MailboxBackend) -> None:
    source, november, october = _source_with_two_months()
    fresh = Mailbox("m", backend)
    changes = recorded(fresh)
    shards = _receive_whole(fresh, source)
    assert fresh.loaded_shards() == [] and fresh.unindexed_shards() == ["2026-11", "2026-10"]
    assert not any(change.added for change in changes)  # stored, not listed yet
    assert {fresh.document_state_vector(s) for s in shards} == {source.document_state_vector(s) for s in shards}
    assert fresh.index_pending(limit=1) == ["2026-11"]  # newest month first
    assert changes[-1].added == set(november) and changes[-1].origin == "peer"
    assert set(changes[-1].envelopes) == set(november)
    assert fresh.unindexed_shards() == ["2026-10"] and fresh.loaded_shards() == []
    # A read of the listing builds what is left first: nothing stored is ever missing from it.
    assert {row.message_id for row in fresh.index_rows()} == set(november) | {october[0], *october[2:]}
    assert changes[-1].added == {october[0], *october[2:]}
    assert fresh.unindexed_shards() == [] and fresh.repair_index() == []
    assert {m.id: (m.flags, m.folder_id) for m in fresh.all_messages()} == {
        m.id: (m.flags, m.folder_id) for m in source.all_messages()}


def _listing_of(box: Mailbox) -> dict[str, tuple[str, str, tuple[str, ...], str]]:
    return {row.message_id: (row.shard, row.folder_id, row.flags, row.subject) for row in box.index_rows()}


def _added(changes: list[MailboxChange]) -> list[str]:
    return sorted(message_id for change in changes for message_id in change.added)


def _whole_with_small_steps(backend: MailboxBackend, monkeypatch: pytest.MonkeyPatch,
                            ) -> tuple[Mailbox, list[str], list[str], Mailbox, list[MailboxChange]]:
    """Two months of 8 messages received whole by a new replica, listed 3 rows per step: the source, the ids of
    each month, the new replica and the changes it announces."""
    monkeypatch.setattr(mailbox_module, "INDEX_STEP_ROWS", 3)
    source, november, october = _source_with_two_months(8)
    fresh = Mailbox("m", backend)
    changes = recorded(fresh)
    _receive_whole(fresh, source)
    return source, november, october, fresh, changes


def test_index_steps_list_shards_stored_whole_a_piece_at_a_time(
    backend: MailboxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, november, october, fresh, changes = _whole_with_small_steps(backend, monkeypatch)
    steps = fresh.index_steps()
    assert next(steps) is None  # November decoded, nothing written yet
    partial = []
    done = []
    for step in steps:
        if step is None and not done:
            partial.append(len(backend.rows(november)))
        if step is not None:
            done.append(step)
            assert set(changes[-1].added) == {r for r in (november if step == "2026-11" else october)} - {october[1]}
            assert changes[-1].origin == "peer" and set(changes[-1].envelopes) == set(changes[-1].added)
    assert done == ["2026-11", "2026-10"]  # newest month first
    assert partial[-1] in (6, 8) and 3 in partial  # its rows were written a few at a time
    assert fresh.unindexed_shards() == [] and fresh.loaded_shards() == [] and fresh.repair_index() == []
    assert _added(changes) == sorted(set(november) | set(october) - {october[1]})
    assert _listing_of(fresh) == _listing_of(source)


@pytest.mark.parametrize("meanwhile", ["flag change", "listing read", "remote update", "move"])
def test_whatever_needs_a_shard_while_index_steps_list_it_lists_it_at_once(
    backend: MailboxBackend, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    source, november, october, fresh, changes = _whole_with_small_steps(backend, monkeypatch)
    steps = fresh.index_steps()
    while len(backend.rows(november)) < 6:  # decoded, its maps read, two pieces of rows written
        assert next(steps) is None
    assert len(backend.rows(november)) < len(november)
    if meanwhile == "flag change":
        fresh.set_flags(november[7], add=["\\Flagged"])
        source.set_flags(november[7], add=["\\Flagged"])
    elif meanwhile == "listing read":
        assert fresh.counts()[INBOX].total == source.counts()[INBOX].total
    elif meanwhile == "remote update":
        before = source.document_state_vector("2026-11")
        source.set_flags(november[6], add=["$Later"])
        fresh.apply_update("2026-11", source.encode_document("2026-11", before), "peer")
    else:
        fresh.move(november[5], "Archive")
        source.move(november[5], "Archive")
    # October is left to the steps when only November was needed; a read of the listing (or a look-up) lists both.
    listed_by_steps = [step for step in steps if step is not None]
    assert listed_by_steps in ([], ["2026-10"])
    if meanwhile == "remote update":
        assert listed_by_steps == ["2026-10"]
    assert fresh.unindexed_shards() == [] and fresh.repair_index() == []
    # Each message was announced as added once, whoever listed it.
    assert _added(changes) == sorted(set(november) | set(october) - {october[1]})
    assert _listing_of(fresh) == _listing_of(source)


def test_every_read_of_the_listing_sees_shards_stored_whole(backend: MailboxBackend) -> None:
    source, november, october = _source_with_two_months()
    reads = {
        "counts": lambda box: box.counts()[INBOX].total,
        "list_folder": lambda box: len(box.list_folder("INBOX")),
        "message": lambda box: box.message(november[1]).envelope.subject,
        "resolve": lambda box: box.resolve(october[2][:10]),
        "envelopes": lambda box: len(box.envelopes([november[2], october[3]])),
        "rows": lambda box: len(box.rows(november)),
    }
    expected = {name: read(source) for name, read in reads.items()}
    for name, read in reads.items():
        # Each read on a replica of its own, where it is the first read after the sync.
        empty = MemoryBackend() if isinstance(backend, MemoryBackend) else backend._store.backend(name)  # type: ignore[attr-defined]
        fresh = Mailbox("m", empty)
        _receive_whole(fresh, source)
        assert fresh.unindexed_shards()
        assert read(fresh) == expected[name], name


def test_an_update_to_a_shard_stored_whole_indexes_it_first(backend: MailboxBackend) -> None:
    source, november, _ = _source_with_two_months()
    fresh = Mailbox("m", backend)
    changes = recorded(fresh)
    _receive_whole(fresh, source)
    before = source.document_state_vector("2026-11")
    source.set_flags(november[1], add=["\\Flagged"])
    fresh.apply_update("2026-11", source.encode_document("2026-11", before), "peer")
    assert [sorted(change.added) for change in changes if change.added] == [sorted(november)]
    assert changes[-1].changed == {november[1]}  # after the change that listed it
    assert "2026-11" not in fresh.unindexed_shards() and fresh.repair_index() == []
    assert fresh.rows([november[1]])[november[1]].flags == ("\\Flagged",)


def test_a_malformed_whole_shard_is_refused_and_nothing_is_stored(backend: MailboxBackend) -> None:
    source, _, _ = _source_with_two_months()
    whole = source.encode_document("2026-11")
    fresh = Mailbox("m", backend)
    for broken in (whole[: len(whole) // 2], b"\xff" * 40):
        with pytest.raises(ValueError):
            fresh.apply_update("2026-11", broken, "peer", check_causality=False)
    assert fresh.document_names() == ["index"] and fresh.unindexed_shards() == []


def test_a_shard_stored_whole_then_updated_in_one_batch(backend: MailboxBackend) -> None:
    source, november, _ = _source_with_two_months()
    fresh = Mailbox("m", backend)
    whole = source.encode_document("2026-11")
    state = source.document_state_vector("2026-11")
    source.set_flags(november[2], add=["\\Answered"])
    with fresh.batch():  # a burst of frames: the state diff, then an update on top of it
        fresh.apply_update("2026-11", whole, "peer", check_causality=False)
        assert fresh.document_state_vector("2026-11") == state
        assert fresh.encode_document("2026-11") == whole  # a third peer asking meanwhile gets it
        fresh.apply_update("2026-11", source.encode_document("2026-11", state), "peer")
    assert "\\Answered" in fresh.message(november[2]).flags and fresh.repair_index() == []


def test_a_shard_stored_whole_and_never_indexed_is_listed_after_a_restart(tmp_path: Path) -> None:
    source, november, _ = _source_with_two_months()
    store = SqliteStore.open(tmp_path / "store.sqlite3")
    fresh = Mailbox("m", store.backend("m"))
    _receive_whole(fresh, source)
    store.close()  # the process stops before the rows are built
    store = SqliteStore.open(tmp_path / "store.sqlite3")
    reopened = Mailbox("m", store.backend("m"))
    assert reopened.unindexed_shards() == []
    assert set(november) <= {row.message_id for row in reopened.index_rows()}
    store.close()


def test_shards_listed_inside_a_batch_leave_memory_when_it_ends(backend: MailboxBackend) -> None:
    source, november, october = _source_with_two_months()
    fresh = Mailbox("m", backend)
    with fresh.batch():
        _receive_whole(fresh, source)
        assert fresh.counts()[INBOX].total == len(november) + len(october) - 2  # one archived, one expunged
        assert fresh.unindexed_shards() == []
    assert fresh.loaded_shards() == []


def test_a_stored_shard_that_cannot_be_decoded_is_a_clear_store_error(tmp_path: Path) -> None:
    source, _, _ = _source_with_two_months()
    store = SqliteStore.open(tmp_path / "store.sqlite3")
    _receive_whole(Mailbox("m", store.backend("m")), source)
    for table in ("snapshots", "updates"):  # a small shard arrives as a log row, a big one as a snapshot
        store._connection.execute(f"UPDATE {table} SET data = ? WHERE name = '2026-11'", (b"\xff" * 64,))
    with pytest.raises(CorruptStoreError, match=r"2026-11 in the store cannot be decoded.*resync"):
        Mailbox("m", store.backend("m"))  # its rows are built when it opens
    store.close()


def test_a_flag_change_or_move_patches_the_stored_row_as_a_recomputation_would(backend: MailboxBackend) -> None:
    """set_flags and move patch the committed row instead of reading the shard: in a batch, after a remote
    change to the same message, and with several flags at once, the rows still equal a recomputation."""
    mailbox = Mailbox("m", backend)
    mailbox.create_folder("Work")
    other = Mailbox("m", MemoryBackend())
    ids = [mailbox.add(make_raw(f"patch-{i}", date="05 Nov 2026 10:00:00 +0000")).message_id for i in range(4)]
    other.apply_update("index", mailbox.encode_document("index"), "peer")
    other.apply_update("2026-11", mailbox.encode_document("2026-11"), "peer")
    rng = random.Random(3)
    names = ["\\Seen", "\\Flagged", "$Work", "$Later", "\\Answered"]
    for step in range(60):
        message_id = rng.choice(ids)
        add, remove = rng.sample(names, 2), rng.sample(names, 1)
        folder = rng.choice(["INBOX", "Archive", "Work", "Junk"])
        if step % 5 == 0:  # a remote change to the same message, then local ones, under one commit
            before = mailbox.document_state_vector("2026-11")
            other.set_flags(message_id, add=[rng.choice(names)], remove=[rng.choice(names)])
            other.move(message_id, rng.choice(["INBOX", "Archive", "Work", "Junk"]))
            with mailbox.batch():
                mailbox.apply_update("2026-11", other.encode_document("2026-11", before), "peer")
                mailbox.set_flags(message_id, add=add, remove=remove)
                mailbox.move(message_id, folder)
        elif step % 2:
            mailbox.set_flags(message_id, add=add, remove=remove)
        else:
            mailbox.move(message_id, folder)
        other.apply_update("2026-11", mailbox.encode_document("2026-11", other.document_state_vector("2026-11")),
                           "peer")
        assert mailbox.rows(ids) == mailbox.rows_for_shard("2026-11"), step
        assert mailbox.rows(ids)[message_id].flags == tuple(sorted(mailbox.message(message_id).flags))


def test_peek_reads_what_pycrdt_reads(mailbox: Mailbox) -> None:
    """``_Shard.peek`` reads Yrs' maps directly (for speed): it must agree with pycrdt's own reads."""
    ids = [mailbox.add(make_raw(f"peek {n}"), flags=["seen"] if n % 2 else []).message_id for n in range(6)]
    mailbox.set_flags(ids[1], remove=["seen"], add=["$Later"])  # a flag cleared is stored as False
    mailbox.move(ids[2], "Archive")
    mailbox.expunge(ids[3])
    shard = mailbox._shard_of(ids[0])
    # What a concurrent add from a peer that had not seen an expunge leaves: an envelope beside the tombstone.
    mailbox.expunge(ids[4])
    shard.messages[ids[4]] = shard.messages[ids[5]]
    names = ["\\Seen", "$Later", "\\Flagged"]
    for message_id in [*ids, "no-such-id"]:
        keys = [f"{message_id}/{name}" for name in names]
        visible, values, placement = shard.peek(message_id, keys, placement=True)
        assert visible == (shard.visible_envelope(message_id) is not None)
        assert values == [shard.flags.get(key) for key in keys]
        assert placement == shard.placement.get(message_id)
    assert shard.peek(ids[0]) == (True, [], None)  # placement only when asked


def test_observe_keys_gives_what_pycrdt_observe_gives() -> None:
    """``observe_keys`` reads Yrs' events directly (for speed): the keys must be pycrdt's, for every kind of change a
    shard's maps see (add, update, clear to False, delete; several keys in one transaction), from a peer too; an
    exception in the callback reaches the caller, after the other observers ran; a dropped subscription ends."""
    writer: Doc[Any] = Doc()
    reader: Doc[Any] = Doc()
    for doc in (writer, reader):
        doc.get("flags", type=Map)
    target = reader.get("flags", type=Map)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    subscription = observe_keys(target, ours.append)
    target.observe(lambda event: theirs.append(event.keys))
    source = writer.get("flags", type=Map)

    def send() -> None:
        reader.apply_update(writer.get_update(reader.get_state()))

    source["m1/\\Seen"] = True
    send()
    with writer.transaction():
        source["m1/\\Seen"] = False
        source["m2/$Later"] = True
        source["m3"] = '{"subj": "an envelope"}'
    send()
    del source["m2/$Later"]
    send()
    target["local"] = 1  # a local write is reported too
    assert ours == theirs and len(ours) == 4
    assert ours[1]["m1/\\Seen"] == {"action": "update", "oldValue": True, "newValue": False}

    def failing(keys: dict[str, Any]) -> None:
        raise RuntimeError("observer failed")

    subscription.drop()
    failing_subscription = observe_keys(target, failing)
    with pytest.raises(ExceptionGroup) as raised:  # pycrdt's way, for its observers' errors as for ours
        target["again"] = 2
    assert [str(error) for error in raised.value.exceptions] == ["observer failed"]
    assert len(theirs) == 5 and len(ours) == 4  # pycrdt's observer still ran; the dropped one did not
    failing_subscription.drop()
    target["after"] = 3
    assert len(theirs) == 6


def test_changes_batched_together_leave_the_listing_rows_a_recomputation_gives(mailbox: Mailbox) -> None:
    """Local changes patch the committed row at commit; several changes to one message in one commit, a message
    added in the same commit, and a message listed before, all end with the rows the shard gives."""
    listed = [mailbox.add(make_raw(f"listed {n}")).message_id for n in range(4)]
    assert {row.message_id for row in mailbox.list_folder("INBOX")} == set(listed)  # listed: shards remembered
    with mailbox.batch():
        mailbox.set_flags(listed[0], add=["seen"])
        mailbox.move(listed[0], "Archive")
        mailbox.set_flags(listed[0], add=["flagged"], remove=["seen"])
        mailbox.move(listed[1], "Archive")
        mailbox.set_flags(listed[1], add=["$Work"])
        new = mailbox.add(make_raw("added in the batch")).message_id
        mailbox.set_flags(new, add=["seen"])
        mailbox.move(new, "Archive")
    mailbox.set_flags(listed[2], add=["seen"])
    mailbox.move(listed[3], "Trash")
    expected = mailbox.rows_for_shard(mailbox._shard_of(listed[0]).name)
    assert mailbox.rows([*listed, new]) == expected
    assert expected[listed[0]].flags == ("\\Flagged",) and expected[listed[0]].folder_id == "archive"
    assert expected[new].flags == ("\\Seen",) and expected[new].folder_id == "archive"


def test_a_listed_message_expunged_since_is_unknown_to_flag_changes_and_moves(mailbox: Mailbox) -> None:
    mid = mailbox.add(make_raw()).message_id
    assert [row.message_id for row in mailbox.list_folder("INBOX")] == [mid]  # its shard is remembered
    mailbox.expunge(mid)
    with pytest.raises(UnknownMessageError):
        mailbox.set_flags(mid, add=["seen"])
    with pytest.raises(UnknownMessageError):
        mailbox.move(mid, "Archive")
    assert mailbox.rows([mid]) == {}


def test_a_remembered_state_vector_is_always_the_documents_own(backend: MailboxBackend) -> None:
    """The causality check reads a document's state vector as decoded at its last commit: after every local or
    remote change, whatever is remembered must equal the document's state vector."""
    rng = random.Random(3)
    a, b = Mailbox("m", backend), Mailbox("m", MemoryBackend())
    wires: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": []}
    a.observe(lambda change: wires["b"].extend(change.updates) if change.is_local else None)
    b.observe(lambda change: wires["a"].extend(change.updates) if change.is_local else None)
    b.apply_update(INDEX_DOC, a.encode_document(INDEX_DOC), origin="a")
    ids = [a.add(make_raw(f"m{n}")).message_id for n in range(8)]
    remembered = 0
    for _ in range(200):
        name, replica = ("a", a) if rng.random() < 0.5 else ("b", b)
        arriving, wires[name] = wires[name][:3], wires[name][3:]
        # Inside a batch, as a read that brought several frames is applied: no commit between the changes.
        with replica.batch():
            message_id = rng.choice(ids)
            for doc, update in arriving:
                assert replica.apply_update(doc, update, origin="other")  # each one's dependencies came first
                remembered += remembered_states_checked(replica)
                with contextlib.suppress(UnknownMessageError):  # not arrived on this replica yet
                    replica.set_flags(message_id, add=["seen"] if rng.random() < 0.5 else [], remove=["flagged"])
                remembered += remembered_states_checked(replica)
        remembered += remembered_states_checked(replica)
    assert remembered > 100  # the check ran on something


def remembered_states_checked(mailbox: Mailbox) -> int:
    """Assert every state vector the mailbox remembers is its document's own; how many there were."""
    for doc, known in mailbox._known_states.items():
        document = mailbox._index_doc if doc == INDEX_DOC else mailbox._shards[doc].doc
        assert known == decode_state_vector(document.get_state()), doc
    return len(mailbox._known_states)


def deferring_pair(backend: MailboxBackend) -> tuple[Mailbox, Mailbox, list[tuple[str, bytes]], list[int]]:
    """A sender and a receiver whose remote writes are deferred (the receiver's scheduler counts its calls);
    the sender holds three messages the receiver has, and what it sends goes to the returned outbox."""
    a, b = Mailbox("m", MemoryBackend()), Mailbox("m", backend)
    outbox: list[tuple[str, bytes]] = []
    a.observe(lambda change: outbox.extend(change.updates))
    for n in range(3):
        a.add(make_raw(f"deferred {n}"))
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    outbox.clear()
    scheduled: list[int] = []
    b.defer_remote_writes(lambda: scheduled.append(1) is None)
    return a, b, outbox, scheduled


def test_remote_changes_are_passed_on_at_once_and_written_together_later(backend: MailboxBackend) -> None:
    a, b, outbox, scheduled = deferring_pair(backend)
    ids = sorted(row.message_id for row in a.list_folder("INBOX"))
    announced: list[bytes] = []
    committed: list[MailboxChange] = []
    b.observe_updates(lambda document, update, origin: announced.append(update))
    b.observe(committed.append)
    for message_id in ids:
        a.set_flags(message_id, add=["seen"])
    shard = next(document for document, _ in outbox if document != INDEX_DOC)
    stored = backend.state_vector(shard)
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    assert announced == [update for _, update in outbox]  # passed on as each arrived
    assert committed == [] and b.has_deferred_writes and len(scheduled) == 1  # one write asked for, not three
    assert backend.state_vector(shard) == stored  # nothing written yet
    b.write_deferred()
    assert not b.has_deferred_writes and backend.state_vector(shard) != stored
    assert len(committed) == 1 and committed[0].changed == set(ids) and committed[0].origin == "a"
    assert [update for _, update in committed[0].updates] == announced
    assert all(row.flags == ("\\Seen",) for row in Mailbox("m", backend).rows(ids).values())  # as a restart reads


def test_a_local_change_or_a_listing_writes_what_waits_first(backend: MailboxBackend) -> None:
    a, b, outbox, _ = deferring_pair(backend)
    first, second, third = sorted(row.message_id for row in a.list_folder("INBOX"))
    a.set_flags(first, add=["flagged"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    assert b.has_deferred_writes
    assert b.rows([first])[first].flags == ("\\Flagged",)  # a read of the listing wrote it first
    assert not b.has_deferred_writes
    outbox.clear()
    a.set_flags(second, add=["seen"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    b.move(third, "Archive")  # a local change: written with the remote one before it returns
    assert not b.has_deferred_writes
    rows = Mailbox("m", backend).rows([second, third])
    assert rows[second].flags == ("\\Seen",) and rows[third].folder_id == "archive"


def test_unloading_a_shard_writes_what_waits_and_a_refusing_scheduler_writes_at_once(backend: MailboxBackend) -> None:
    a, b, outbox, _ = deferring_pair(backend)
    message_id = a.list_folder("INBOX")[0].message_id
    a.set_flags(message_id, add=["seen"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    for shard in b.loaded_shards():
        b.unload(shard)  # its rows are read from the document: written before it goes
    assert not b.has_deferred_writes
    assert Mailbox("m", backend).rows([message_id])[message_id].flags == ("\\Seen",)
    outbox.clear()
    b.defer_remote_writes(lambda: False)  # nobody to write later: written at once
    a.set_flags(message_id, add=["flagged"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    assert not b.has_deferred_writes
    assert Mailbox("m", backend).rows([message_id])[message_id].flags == ("\\Flagged", "\\Seen")


def test_a_remote_update_that_changes_nothing_leaves_no_trace_in_the_next_change() -> None:
    """A no-op remote update (one already applied) must not lend its origin to the local change that follows."""
    a, b = Mailbox("m", MemoryBackend()), Mailbox("m", MemoryBackend())
    update = b.encode_document(INDEX_DOC)
    a.apply_update(INDEX_DOC, update, origin="b")
    a.apply_update(INDEX_DOC, update, origin="b")  # changes nothing now
    changes: list[MailboxChange] = []
    a.observe(changes.append)
    added = a.add(make_raw("after a no-op"), redeliver=True)
    assert added.added and [change.origin for change in changes] == [LOCAL]
    assert changes[0].is_local and changes[0].added == {added.message_id}


@pytest.mark.parametrize("deferred", [False, True])
def test_remote_changes_leave_the_rows_a_recomputation_gives_alone_or_in_a_group(
        backend: MailboxBackend, deferred: bool) -> None:
    """Remote flag changes and moves, several to one message, a message added meanwhile: written one at a time
    or in one group, the stored rows are what the shard gives."""
    a, b, outbox, _ = deferring_pair(backend)
    if not deferred:
        b.defer_remote_writes(None)
    first, second, third = sorted(row.message_id for row in a.list_folder("INBOX"))
    a.set_flags(first, add=["seen", "flagged", "$Work"])
    a.set_flags(first, remove=["seen"])
    a.set_flags(second, add=["answered"])
    a.move(third, "Archive")  # not a flag: its row is read from the shard
    a.set_flags(third, add=["seen"])
    fourth = a.add(make_raw("new in the group"), flags=["seen"]).message_id  # no committed row yet
    a.set_flags(fourth, add=["flagged"])
    for document, update in outbox:
        b.apply_update(document, update, origin="a")
    b.write_deferred()
    ids = [first, second, third, fourth]
    stored = Mailbox("m", backend).rows(ids)  # what a restart reads
    shards = {row.shard for row in stored.values()}
    recomputed = {message_id: row for shard in shards for message_id, row in b.rows_for_shard(shard).items()}
    assert stored == {message_id: recomputed[message_id] for message_id in ids}
    assert stored[first].flags == ("$Work", "\\Flagged") and not stored[first].seen
    assert stored[third].folder_id == "archive" and stored[third].seen
    assert stored[fourth].flags == ("\\Flagged", "\\Seen")


@pytest.mark.parametrize("deferred", [False, True])
def test_rows_after_concurrent_and_mixed_flag_changes_are_what_the_shard_gives(
        backend: MailboxBackend, deferred: bool) -> None:
    """A remote flag change that loses to a concurrent local one, one that wins, and local and remote flag changes
    to one message in one commit: the stored rows (patched at commit, not read from the shard) are what the shard
    gives."""
    a, b, outbox, _ = deferring_pair(backend)
    if not deferred:
        b.defer_remote_writes(None)
    first, second, third = sorted(row.message_id for row in a.list_folder("INBOX"))
    # Concurrent: each side sets the same flag its own way before seeing the other's.
    a.set_flags(first, add=["seen"])
    b.set_flags(first, remove=["seen"], add=["$Mine"])
    a.set_flags(second, remove=["flagged"], add=["flagged"])  # sets it
    b.set_flags(second, remove=["flagged"])
    with b.batch():  # a local change and a remote one to the same message, in one commit
        b.set_flags(third, add=["answered", "$Local"])
        a.set_flags(third, remove=["answered"], add=["$Remote"])
        for document, update in outbox:
            b.apply_update(document, update, origin="a")
        outbox.clear()
    b.write_deferred()
    ids = [first, second, third]
    stored = Mailbox("m", backend).rows(ids)  # what a restart reads
    shards = {row.shard for row in stored.values()}
    recomputed = {message_id: row for shard in shards for message_id, row in b.rows_for_shard(shard).items()}
    assert stored == {message_id: recomputed[message_id] for message_id in ids}
    assert "$Mine" in stored[first].flags and "$Remote" in stored[third].flags and "$Local" in stored[third].flags
