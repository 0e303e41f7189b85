"""One suite, run against every MailboxBackend: the in-memory one and the SQLite store."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pycrdt
import pytest

from crdtmail.errors import BlobIntegrityError
from crdtmail.model.backend import CommitBatch, DocumentUpdate, IndexRow, MailboxBackend
from crdtmail.storage.memory import MemoryBackend
from crdtmail.storage.sqlite import SqliteStore


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MailboxBackend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    with SqliteStore.open(tmp_path / "store.sqlite3") as store:
        yield store.backend("m")


class Writer:
    """A pycrdt document whose every change becomes a DocumentUpdate."""

    def __init__(self) -> None:
        self.doc: pycrdt.Doc[object] = pycrdt.Doc()
        self.values = self.doc.get("flags", type=pycrdt.Map)
        self.updates: list[bytes] = []
        self.doc.observe(lambda event: self.updates.append(event.update))

    def set(self, key: str, value: object) -> DocumentUpdate:
        with self.doc.transaction():
            self.values[key] = value
        return DocumentUpdate("2026-11", self.updates[-1], self.doc.get_state())


def row(message_id: str, folder: str = "inbox", date: int = 0, flags: tuple[str, ...] = ()) -> IndexRow:
    return IndexRow(message_id, "2026-11", folder, date, flags, "a@b", f"subject {message_id}", 100)


def blob(data: bytes) -> tuple[str, bytes]:
    return hashlib.sha256(data).hexdigest(), data


def test_documents_round_trip_through_many_commits(backend: MailboxBackend) -> None:
    assert backend.load_document("2026-11") is None and backend.state_vector("2026-11") is None
    writer = Writer()
    for n in range(3000):  # enough to trigger compaction in the SQLite store
        backend.commit(CommitBatch(updates=[writer.set(f"k{n % 700}", n)]))
    stored = backend.load_document("2026-11")
    assert stored is not None
    reader: pycrdt.Doc[object] = pycrdt.Doc()
    reader.apply_update(stored)
    assert reader.get("flags", type=pycrdt.Map).to_py() == writer.values.to_py()
    assert backend.state_vector("2026-11") == writer.doc.get_state()
    assert backend.document_names() == ["2026-11"]


def test_rows_upsert_delete_replace_and_queries(backend: MailboxBackend) -> None:
    rows = {f"id{n:03d}": row(f"id{n:03d}", "inbox" if n % 3 else "work", date=1000 + n % 50,
                              flags=("\\Seen",) if n % 2 else ()) for n in range(120)}
    backend.commit(CommitBatch(rows_upsert=rows, indexed_shards={"2026-11": b"\x01"}))
    assert backend.indexed_state_vectors() == {"2026-11": b"\x01"}
    listed = backend.list_folder(["inbox"], 0, 500)
    assert [r.message_id for r in listed] == [
        r.message_id for r in sorted((r for r in rows.values() if r.folder_id == "inbox"),
                                     key=lambda r: (r.date, r.message_id), reverse=True)
    ]
    assert backend.list_folder(["inbox"], 5, 10) == listed[5:15]
    both = backend.list_folder(["inbox", "work"], 0, 500)
    assert len(both) == 120 and both[0].date == 1049
    counts = backend.folder_counts()
    assert counts["inbox"].total == 80 and counts["work"].total == 40
    assert counts["inbox"].unread == sum(1 for r in rows.values() if r.folder_id == "inbox" and not r.seen)
    assert backend.locate("id007") == "2026-11" and backend.locate("nope") is None
    assert backend.find_ids("id01", 3) == ["id010", "id011", "id012"]
    assert sorted(backend.ids_in_folder("work")) == sorted(k for k, r in rows.items() if r.folder_id == "work")

    moved = row("id001", "work", date=5)
    backend.commit(CommitBatch(rows_upsert={"id001": moved}, rows_delete={"id002"}))
    assert backend.locate("id002") is None
    assert {r.message_id: r for r in backend.all_rows()}["id001"] == moved
    backend.commit(CommitBatch(replace_shards={"2026-11"}, rows_upsert={"new": row("new")}))
    assert [r.message_id for r in backend.all_rows()] == ["new"]
    assert backend.indexed_state_vectors() == {}


@pytest.mark.parametrize("before_flags", [(), ("\\Seen",), ("\\Seen", "$Other")])
@pytest.mark.parametrize("after_flags", [(), ("\\Flagged",), ("\\Seen",), ("$Other", "\\Seen")])
def test_a_patched_row_is_the_upserted_one_whatever_rows_before_says(
    backend: MailboxBackend, before_flags: tuple[str, ...], after_flags: tuple[str, ...]
) -> None:
    stored = row("id", flags=before_flags)
    backend.commit(CommitBatch(rows_upsert={"id": stored}, indexed_shards={"2026-11": b"\x01"}))
    for told in (stored, row("id", "work", flags=before_flags), row("id", flags=("\\Seen", "$Stale"))):
        # ``rows_before`` is what the committing side read; the store may have changed since (another process):
        # the row ends as upserted all the same.
        backend.commit(CommitBatch(rows_upsert={"id": row("id", flags=after_flags)}, rows_before={"id": told},
                                   indexed_shards={"2026-11": b"\x02"}))
        assert list(backend.all_rows()) == [row("id", flags=after_flags)]
        assert backend.folder_counts()["inbox"].unread == (0 if "\\Seen" in after_flags else 1)
        backend.commit(CommitBatch(rows_upsert={"id": stored}, rows_before={"id": row("id", flags=after_flags)}))
        assert list(backend.all_rows()) == [stored]
    assert backend.indexed_state_vectors() == {"2026-11": b"\x02"}
    # A row patched that is not stored (deleted meanwhile) is written whole.
    backend.commit(CommitBatch(rows_delete={"id"}))
    backend.commit(CommitBatch(rows_upsert={"id": stored}, rows_before={"id": stored}))
    assert list(backend.all_rows()) == [stored]


def test_blobs_are_verified_and_a_bad_batch_commits_nothing(backend: MailboxBackend) -> None:
    good = blob(b"From: a\r\n\r\nbody")
    backend.commit(CommitBatch(blobs=dict([good])))
    assert backend.get_blob(good[0]) == good[1] and backend.has_blob(good[0])
    assert backend.get_blob("0" * 64) is None and not backend.has_blob("0" * 64)
    writer = Writer()
    bad = CommitBatch(updates=[writer.set("k", 1)], rows_upsert={"x": row("x")}, blobs={"f" * 64: b"other"})
    with pytest.raises(BlobIntegrityError):
        backend.commit(bad)
    assert backend.load_document("2026-11") is None and backend.locate("x") is None
    assert not backend.has_blob("f" * 64)


def test_stored_blobs_answers_for_many_hashes_at_once(backend: MailboxBackend) -> None:
    stored = dict(blob(f"From: a\r\n\r\nbody {i}".encode()) for i in range(700))  # more than one chunk
    backend.commit(CommitBatch(blobs=stored))
    absent = [f"{i:064x}" for i in range(300)]
    asked = [*absent[:150], *stored, *absent[150:]]
    assert backend.stored_blobs(asked) == set(stored)
    assert backend.stored_blobs([]) == set() and backend.stored_blobs(absent) == set()


def test_an_empty_batch_writes_nothing(backend: MailboxBackend) -> None:
    backend.commit(CommitBatch())
    assert backend.document_names() == [] and list(backend.all_rows()) == []
