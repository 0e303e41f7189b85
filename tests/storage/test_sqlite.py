"""What only the SQLite store promises: files on disk, reopening, damage detection, isolation, pipelining."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from crdtmail.errors import BlobIntegrityError, CorruptStoreError, StorageError
from crdtmail.model.backend import CommitBatch, IndexRow
from crdtmail.storage.sqlite import SqliteStore


def _row(message_id: str) -> IndexRow:
    return IndexRow(message_id, "2026-11", "inbox", 1, (), "a@b", "s", 1)


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    data = b"raw message"
    digest = hashlib.sha256(data).hexdigest()
    with SqliteStore.open(path) as store:
        store.set_meta("peer_id", "abc")
        store.backend("m").commit(CommitBatch(rows_upsert={"x": _row("x")}, blobs={digest: data}))
    with SqliteStore.open(path, create=False) as store:
        assert store.get_meta("peer_id") == "abc" and store.get_meta("missing") is None
        assert store.backend("m").locate("x") == "2026-11"
        assert store.backend("m").get_blob(digest) == data
        assert store.integrity_check() == "ok"


def test_missing_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="crdtmail init"):
        SqliteStore.open(tmp_path / "none.sqlite3", create=False)


@pytest.mark.parametrize("content", [os.urandom(8192), b"just some text\n" * 100])
def test_a_file_that_is_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "db.sqlite3"
    path.write_bytes(content)
    with pytest.raises(CorruptStoreError, match=str(path)):
        SqliteStore.open(path)
    assert path.read_bytes() == content  # nothing was written over it


def test_another_programs_sqlite_database(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE t (x)")
    with pytest.raises(CorruptStoreError, match="not a crdtmail one"):
        SqliteStore.open(path)


def test_a_blob_damaged_on_disk_is_refused_on_read(tmp_path: Path) -> None:
    data = b"the original body"
    digest = hashlib.sha256(data).hexdigest()
    with SqliteStore.open(tmp_path / "db.sqlite3") as store:
        backend = store.backend("m")
        backend.commit(CommitBatch(blobs={digest: data}))
        store._connection.execute("UPDATE blobs SET data = ? WHERE sha256 = ?", (b"tampered", digest))
        with pytest.raises(BlobIntegrityError, match=digest):
            backend.get_blob(digest)


def test_mailboxes_share_a_file_but_not_their_data(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "db.sqlite3") as store:
        store.backend("work").commit(CommitBatch(rows_upsert={"w": _row("w")}))
        store.backend("home").commit(CommitBatch(rows_upsert={"h": _row("h")}))
        assert [r.message_id for r in store.backend("work").all_rows()] == ["w"]
        assert store.backend("home").locate("w") is None
        assert store.stats("work")["documents"] == 0


def test_pipelined_commits_are_visible_to_reads_and_durable_after_the_block(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        backend = store.backend("m")
        with backend.pipelined():
            for n in range(50):
                backend.commit(CommitBatch(rows_upsert={f"id{n}": _row(f"id{n}")}))
            assert backend.locate("id49") == "2026-11"  # a read waits for the queued writes
    with SqliteStore.open(path) as store:
        assert len(list(store.backend("m").all_rows())) == 50


def test_pipelined_write_errors_surface_on_the_callers_thread(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "db.sqlite3") as store:
        backend = store.backend("m")
        with pytest.raises(BlobIntegrityError), backend.pipelined():
            backend.commit(CommitBatch(blobs={"0" * 64: b"not that"}))
            for n in range(5):
                backend.commit(CommitBatch(rows_upsert={f"id{n}": _row(f"id{n}")}))


def test_commits_never_checkpoint_the_wal_themselves_a_thread_does(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint inside a commit stalled it 17-45 ms; the store's own thread checkpoints instead, and starts
    the WAL afresh now and then even while commits keep coming, so it does not grow without bound."""
    import sqlite3
    import time

    from crdtmail.storage import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "WAL_RESET_FRAMES", 256)
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        assert store.query("PRAGMA wal_autocheckpoint") == [(0,)]
        backend = store.backend("m")
        for n in range(2000):  # 16,800 WAL pages in all: the WAL's size if it were never started over
            body = str(n).encode() * 1000
            backend.commit(CommitBatch(rows_upsert={f"id{n % 300}": _row(f"id{n % 300}")},
                                       blobs={hashlib.sha256(body).hexdigest(): body}))
            if n % 50 == 0:
                time.sleep(0.002)
        probe = sqlite3.connect(path, isolation_level=None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the thread has copied everything once the commits stop
            busy, frames, copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy and frames == copied:
                break
            time.sleep(0.05)
        probe.close()
        assert not busy and frames == copied
        wal_pages = Path(f"{path}-wal").stat().st_size / 4096
        assert wal_pages < 5000, wal_pages  # started over along the way (about 1,500-2,100 pages measured)
        assert len(list(backend.all_rows())) == 300
    with SqliteStore.open(path) as store:
        assert store.integrity_check() == "ok"
        assert len(list(store.backend("m").all_rows())) == 300
        assert len(store.query("SELECT sha256 FROM blobs")) == 2000
