"""What only the SQLite store promises: files on disk, reopening, damage detection, isolation, pipelining."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pycrdt
import pytest

from crdtmail.errors import BlobIntegrityError, CorruptStoreError, StorageError
from crdtmail.model.backend import CommitBatch, IndexRow
from crdtmail.model.mailbox import Mailbox
from crdtmail.storage import sqlite as sqlite_module
from crdtmail.storage.memory import MemoryBackend
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
    monkeypatch.setattr(sqlite_module, "WAL_RESET_FRAMES", 256)
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
        # The restarts waited on other readers only briefly, then gave the connection its usual patience back.
        assert store.query("PRAGMA busy_timeout") == [(sqlite_module.BUSY_TIMEOUT_MS,)]
        assert len(list(backend.all_rows())) == 300
    with SqliteStore.open(path) as store:
        assert store.integrity_check() == "ok"
        assert len(list(store.backend("m").all_rows())) == 300
        assert len(store.query("SELECT sha256 FROM blobs")) == 2000


def _toggle_until_folded(box: Mailbox, message_id: str, times: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Toggle a flag ``times`` times; returns how often the store merged a log to fold it."""
    merges = []
    real_merge = pycrdt.merge_updates

    def counting_merge(*updates: bytes) -> bytes:
        merges.append(len(updates))
        return real_merge(*updates)

    monkeypatch.setattr(pycrdt, "merge_updates", counting_merge)
    for n in range(times):
        if n % 2:
            box.set_flags(message_id, remove=["$Toggle"])
        else:
            box.set_flags(message_id, add=["$Toggle", "\\Seen"])
    monkeypatch.setattr(pycrdt, "merge_updates", real_merge)
    return len(merges)


def _placements(box: Mailbox) -> dict[str, tuple[str, frozenset[str]]]:
    """What a mailbox holds: each message's folder and flags."""
    return {m.id: (m.folder_id, frozenset(m.flags)) for m in box.all_messages()}


def _mail(n: int) -> bytes:
    return (f"Message-ID: <fold-{n}@example.org>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
            f"From: a@example.org\r\nSubject: fold {n}\r\n\r\nbody {n}\r\n").encode()


def _folded(store: SqliteStore, count: int) -> tuple[Mailbox, list[str], str]:
    """Mailbox "m" of ``store`` with ``count`` messages of one shard, its logs folded: the box, the ids, the shard."""
    box = Mailbox("m", store.backend("m"))
    with box.batch():
        ids = [box.add(_mail(n)).message_id for n in range(count)]
    store.backend("m").fold_logs()
    return box, ids, box.rows([ids[0]])[ids[0]].shard


def test_a_fold_from_the_live_document_keeps_everything_and_drops_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "COMPACT_MIN_LOG_BYTES", 512)
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        box = Mailbox("m", store.backend("m"))
        ids = [box.add(_mail(n)).message_id for n in range(5)]
        assert _toggle_until_folded(box, ids[0], 101, monkeypatch) == 0
        shard = box.rows([ids[0]])[ids[0]].shard
        expected = _placements(box)
        snapshot_bytes, log_count = store._query(
            "SELECT snapshot_bytes, log_count FROM documents WHERE mailbox = 'm' AND name = ?", (shard,))[0]
        assert snapshot_bytes > 0 and log_count < 101  # it folded
        # The live document's encoding is what was stored: far smaller than the merged history.
        log = [row[0] for row in store._query("SELECT data FROM updates WHERE mailbox = 'm' AND name = ?", (shard,))]
        merged = pycrdt.merge_updates(store._query(
            "SELECT data FROM snapshots WHERE mailbox = 'm' AND name = ?", (shard,))[0][0], *log)
        assert pycrdt.get_state(merged) == box.document_state_vector(shard)
    with SqliteStore.open(path) as store:
        again = Mailbox("m", store.backend("m"))
        assert _placements(again) == expected


def test_a_fold_merges_the_log_when_another_writer_shared_the_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "COMPACT_MIN_LOG_BYTES", 512)
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store, SqliteStore.open(path) as other_store:
        box = Mailbox("m", store.backend("m"))
        ids = [box.add(_mail(n)).message_id for n in range(5)]
        other = Mailbox("m", other_store.backend("m"))  # another process on the same file
        assert other.set_flags(ids[1], add=["$FromElsewhere"])
        # box never saw the other writer's flag, and folds: by merging the log, or the flag would be lost.
        assert _toggle_until_folded(box, ids[0], 101, monkeypatch) >= 1
    with SqliteStore.open(path) as store:
        again = Mailbox("m", store.backend("m"))
        assert "$FromElsewhere" in again.message(ids[1]).flags
        assert "\\Seen" in again.message(ids[0]).flags


def test_the_wal_is_checkpointed_by_the_background_thread_not_by_commits(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        # A commit on the peer's connection never runs a checkpoint.
        assert store.query("PRAGMA wal_autocheckpoint") == [(0,)]
        store.backend("m").commit(CommitBatch(rows_upsert={"x": _row("x")}))
        # Yet the rows reach the database file itself (a copy without its WAL shows them): the thread did it.
        copy = tmp_path / "copy.sqlite3"
        deadline = time.monotonic() + 60
        seen: list[Any] = []
        while time.monotonic() < deadline and not seen:
            time.sleep(0.05)
            shutil.copyfile(path, copy)
            with contextlib.closing(sqlite3.connect(copy)) as connection:
                try:
                    seen = connection.execute("SELECT message_id FROM rows").fetchall()
                except sqlite3.DatabaseError:  # not checkpointed yet (no tables in the file)
                    seen = []
        assert seen == [("x",)]


def test_an_import_writer_leaves_checkpoints_to_the_thread_and_its_wal_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipelined writer (an import) commits on a connection of its own: it does not checkpoint inside its
    commits either, and restarts the WAL when the checkpoint thread asks, as the store's connection does."""

    def largest_wal(directory: Path) -> float:
        path = directory / "db.sqlite3"
        largest = 0.0
        with SqliteStore.open(path) as store:
            backend = store.backend("m")
            with backend.pipelined():
                for n in range(1500):
                    body = str(n).encode() * 1000
                    backend.commit(CommitBatch(rows_upsert={f"id{n % 300}": _row(f"id{n % 300}")},
                                               blobs={hashlib.sha256(body).hexdigest(): body}))
                    if n % 100 == 0:
                        wal = Path(f"{path}-wal")
                        largest = max(largest, wal.stat().st_size / 4096 if wal.exists() else 0)
            assert len(store.query("SELECT sha256 FROM blobs")) == 1500
            assert store.integrity_check() == "ok"
        return largest

    (tmp_path / "never").mkdir()
    (tmp_path / "restarted").mkdir()
    monkeypatch.setattr(sqlite_module, "WAL_RESET_FRAMES", 10**9)
    never_restarted = largest_wal(tmp_path / "never")
    monkeypatch.setattr(sqlite_module, "WAL_RESET_FRAMES", 256)
    restarted = largest_wal(tmp_path / "restarted")
    assert restarted < never_restarted / 2, (restarted, never_restarted)


def test_a_document_arriving_whole_is_stored_once_as_its_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "COMPACT_MIN_LOG_BYTES", 512)
    with SqliteStore.open(tmp_path / "a.sqlite3") as source_store:
        source = Mailbox("m", source_store.backend("m"))
        ids = [source.add(_mail(n)).message_id for n in range(5)]
        shard = source.rows([ids[0]])[ids[0]].shard
        whole = source.encode_document(shard)
        assert len(whole) > 512
    path = tmp_path / "b.sqlite3"
    with SqliteStore.open(path) as store:
        box = Mailbox("m", store.backend("m"))
        store._connection.execute("CREATE TEMP TABLE logged (id INTEGER)")
        store._connection.execute("CREATE TEMP TRIGGER log_rows AFTER INSERT ON main.updates"
                                  " BEGIN INSERT INTO logged VALUES (new.id); END")
        box.apply_update(shard, whole, origin="peer")
        # Written once: never logged (and then folded at once).
        assert store._query("SELECT count(*) FROM temp.logged") == [(0,)]
        assert store._query("SELECT data FROM snapshots WHERE mailbox = 'm' AND name = ?", (shard,)) == [(whole,)]
        assert store._query("SELECT snapshot_bytes, log_count FROM documents WHERE mailbox = 'm' AND name = ?",
                            (shard,)) == [(len(whole), 0)]
        assert store._query("SELECT count(*) FROM updates WHERE mailbox = 'm' AND name = ?", (shard,)) == [(0,)]
        # Later changes are logged, and the fold still encodes the live document rather than merging the log.
        assert _toggle_until_folded(box, ids[0], 101, monkeypatch) == 0
        assert store._query("SELECT log_count FROM documents WHERE mailbox = 'm' AND name = ?", (shard,))[0][0] < 101
        expected = _placements(box)
    with SqliteStore.open(path) as store:
        again = Mailbox("m", store.backend("m"))
        assert _placements(again) == expected
        assert len(expected) == 5 and "\\Seen" in again.message(ids[0]).flags


def test_fold_logs_leaves_one_snapshot_per_document_and_the_same_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        box = Mailbox("m", store.backend("m"))
        ids = [box.add(_mail(n)).message_id for n in range(10)]
        box.set_flags(ids[3], add=["\\Flagged"])
        expected = _placements(box)
        assert store._query("SELECT count(*) FROM updates")[0][0] > 0
        folded = store.backend("m").fold_logs()
        assert folded and store._query("SELECT count(*) FROM updates") == [(0,)]
        assert store._query("SELECT count(*) FROM documents WHERE log_count > 0 OR log_bytes > 0") == [(0,)]
        assert store.backend("m").fold_logs() == []
    with SqliteStore.open(path) as store:
        again = Mailbox("m", store.backend("m"))
        assert _placements(again) == expected


def test_a_flag_change_does_not_rewrite_the_shards_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        box, ids, shard = _folded(store, 2000)
        snapshot_bytes = store._query("SELECT snapshot_bytes FROM documents WHERE name = ?", (shard,))[0][0]
        assert snapshot_bytes > 300_000
        wal = Path(f"{path}-wal")
        box.set_flags(ids[0], add=["\\Seen"])
        before = wal.stat().st_size
        for message_id in ids[1:21]:
            box.set_flags(message_id, add=["\\Seen"])
        # Each commit writes about ten pages (the log row, the counters, the listing row and their indexes),
        # never the snapshot again.
        written = wal.stat().st_size - before
        assert 0 <= written < 20 * snapshot_bytes / 4, written


def _wal_pages(path: Path) -> list[int]:
    """The page number of every frame in the WAL file next to ``path``, in order."""
    data = Path(f"{path}-wal").read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    return [int.from_bytes(data[offset:offset + 4], "big") for offset in range(32, len(data) - 23, 24 + page_size)
            if offset + 24 + page_size <= len(data)]


def test_a_flag_change_writes_only_the_pages_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module._Checkpointer, "wake", lambda self: None)  # the WAL keeps every frame
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        box, ids, _shard = _folded(store, 40)
        for message_id in ids[:20]:
            box.set_flags(message_id, add=["\\Seen"])
        # The b-tree each page belongs to, from SQLite's own page map.
        try:
            owners = dict(store._query("SELECT pageno, name FROM dbstat"))
        except StorageError:
            pytest.skip("this SQLite was built without the dbstat table (SQLITE_ENABLE_DBSTAT_VTAB)")

        def written_by(change: Any) -> list[list[str]]:
            per_commit = []
            for message_id in ids[:20]:
                before = len(_wal_pages(path))
                change(message_id)
                per_commit.append(sorted(owners.get(page, "?") for page in _wal_pages(path)[before:]))
            return per_commit

        flagged = written_by(lambda message_id: box.set_flags(message_id, add=["\\Flagged"]))
        unseen = written_by(lambda message_id: box.set_flags(message_id, remove=["\\Seen"]))
        rows = box.rows(ids[:20])
    assert sorted(rows[i].flags for i in ids[:20]) == [("\\Flagged",)] * 20
    for pages in flagged:
        # \Seen as it was: the unread index is not rewritten, nor the index of indexed_shards' key.
        assert "rows_unread" not in pages and "sqlite_autoindex_indexed_shards_1" not in pages, pages
        assert {"updates", "documents", "rows", "indexed_shards"} <= set(pages), pages
    for pages in unseen:
        assert "rows_unread" in pages and "sqlite_autoindex_indexed_shards_1" not in pages, pages


def test_folds_after_folds_still_take_the_live_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each fold deletes the newest rows of the log, so the next row logged may take an id a deleted one had
    # (no AUTOINCREMENT): the store must still know those rows are its own and fold from the live document.
    monkeypatch.setattr(sqlite_module, "COMPACT_MIN_LOG_BYTES", 512)
    folds = []
    real_compact = sqlite_module._compact

    def counting_compact(*args: Any, **kwargs: Any) -> bytes:
        folds.append(1)
        return real_compact(*args, **kwargs)

    monkeypatch.setattr(sqlite_module, "_compact", counting_compact)
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        box = Mailbox("m", store.backend("m"))
        ids = [box.add(_mail(n)).message_id for n in range(3)]
        reused = []
        for _ in range(4):
            top = store._query("SELECT max(id) FROM updates")[0][0]
            assert _toggle_until_folded(box, ids[0], 60, monkeypatch) == 0
            reused.append(store._query("SELECT min(id) FROM updates")[0][0] <= (top or 0))
        assert len(folds) >= 4 and any(reused)
        expected = _placements(box)
    with SqliteStore.open(path) as store:
        assert _placements(Mailbox("m", store.backend("m"))) == expected


def _folded_with_a_log(path: Path, logged: int) -> tuple[list[str], str, dict[str, tuple[str, frozenset[str]]]]:
    """A store at ``path`` with 6 messages folded into a snapshot and ``logged`` flag changes in the log after it:
    the ids, the shard and what the mailbox holds."""
    with SqliteStore.open(path) as store:
        box, ids, shard = _folded(store, 6)
        for message_id in ids[1:1 + logged]:
            box.set_flags(message_id, add=["\\Flagged"])
        return ids, shard, _placements(box)


def test_a_schema_2_store_is_upgraded_on_open_and_keeps_its_log(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    ids, _shard, expected = _folded_with_a_log(path, 4)
    # What schema 2 looked like: the update log's ids under AUTOINCREMENT.
    connection = sqlite3.connect(path, isolation_level=None)
    log = connection.execute("SELECT id, mailbox, name, data FROM updates ORDER BY id").fetchall()
    assert len(log) >= 4
    connection.execute("DROP TABLE updates")
    connection.execute("CREATE TABLE updates (id INTEGER PRIMARY KEY AUTOINCREMENT, mailbox TEXT NOT NULL,"
                       " name TEXT NOT NULL, data BLOB NOT NULL)")
    connection.execute("CREATE INDEX updates_by_document ON updates (mailbox, name, id)")
    connection.executemany("INSERT INTO updates (id, mailbox, name, data) VALUES (?, ?, ?, ?)", log)
    connection.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    connection.close()
    with SqliteStore.open(path) as store:
        assert store._query("SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
        table = store._query("SELECT sql FROM sqlite_master WHERE name = 'updates'")[0][0]
        assert "AUTOINCREMENT" not in table.upper()
        assert store._query("SELECT id, mailbox, name, data FROM updates ORDER BY id") == log
        assert store._query("SELECT count(*) FROM sqlite_master WHERE name = 'updates_by_document'") == [(1,)]
        assert store._query("SELECT count(*) FROM sqlite_sequence WHERE name = 'updates'") == [(0,)]
        again = Mailbox("m", store.backend("m"))
        assert _placements(again) == expected
        again.set_flags(ids[5], add=["\\Seen"])
        expected = _placements(again)
    with SqliteStore.open(path) as store:
        assert _placements(Mailbox("m", store.backend("m"))) == expected


def test_a_schema_1_store_is_upgraded_on_open_and_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    _ids, shard, expected = _folded_with_a_log(path, 1)
    # What schema 1 looked like: the snapshots inside the documents table.
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("UPDATE documents SET snapshot = (SELECT data FROM snapshots"
                       " WHERE snapshots.mailbox = documents.mailbox AND snapshots.name = documents.name)")
    connection.execute("DROP TABLE snapshots")
    connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    connection.close()
    with SqliteStore.open(path) as store:
        assert store._query("SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
        assert store._query("SELECT count(*) FROM documents WHERE snapshot IS NOT NULL") == [(0,)]
        assert store._query("SELECT count(*) FROM snapshots WHERE name = ?", (shard,)) == [(1,)]
        again = Mailbox("m", store.backend("m"))
        assert _placements(again) == expected


def test_a_snapshot_a_schema_1_process_folds_after_the_upgrade_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SqliteStore.open(path) as store:
        _box, (first,), shard = _folded(store, 1)
    # A schema-1 process that read no snapshot (it looks in documents) adds a message and folds: its snapshot
    # lands in the old column and lacks the first message.
    other = Mailbox("m", MemoryBackend())
    second = other.add(_mail(2)).message_id
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("UPDATE documents SET snapshot = ? WHERE mailbox = 'm' AND name = ?",
                       (other.encode_document(shard), shard))
    connection.close()
    with SqliteStore.open(path) as store:
        again = Mailbox("m", store.backend("m"))
        assert {m.id for m in again.all_messages()} == {first, second}
        assert store._query("SELECT count(*) FROM documents WHERE snapshot IS NOT NULL") == [(0,)]
