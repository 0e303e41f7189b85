"""The peer's durable store: one SQLite database (WAL) per data directory.

Per mailbox it keeps each document as a snapshot (table ``snapshots``) plus an append-only log of updates
(``updates``), folded into a new snapshot once the log outgrows it; each document's counters and state vector
(``documents``), so a sync can be answered without loading it; the derived index rows; and, shared by all
mailboxes, the content-addressed body blobs.

A ``commit`` is one SQLite transaction. With ``synchronous=NORMAL`` (the default) a committed transaction is in
the WAL file before ``commit`` returns, so it survives SIGKILL of the process; ``FULL`` also fsyncs it, so it
survives a power cut.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pycrdt

from crdtmail.errors import BlobIntegrityError, CorruptStoreError, StorageError
from crdtmail.model.backend import CommitBatch, FolderCount, IndexRow

# 2: snapshots moved out of the documents table; 3: the update log's ids without AUTOINCREMENT. Older stores
# are upgraded on open.
SCHEMA_VERSION = 3
APPLICATION_ID = 0x63726D6C  # "crml": marks the file as a crdtmail database
COMPACT_MIN_LOG_BYTES = 64 * 1024
# SQLite's default page cache is 2 MB: a bulk write larger than that spills pages into the WAL over and over
# (measured: 9.3 GB of write syscalls for a 1.2 GB import). 32 MB is a ceiling, not an allocation.
CACHE_SIZE = -32 * 1024
# A multi-row INSERT OR REPLACE inside a transaction keeps a statement journal (each page it changes, to undo the
# statement alone): in a temporary file by default, a 4-byte and a 4 KB write per page. strace of a 20k-message
# first mirror: 140k such writes beside 40k to the WAL. In memory, they are copies.
TEMP_STORE = "MEMORY"
# The page size of a new database (an existing one keeps its own: WAL mode fixes it). SQLite writes the WAL a
# page at a time, two write calls per page, so a whole shard of megabytes arriving on a first sync is thousands
# of them at 4 KB. Measured storing 5 MB blobs (insert and commit): 12-25 ms at 4 KB, 10-14 ms at 8 KB, with a
# one-row commit unchanged at 33-37 us; 16 KB saved little more and made that small commit 50-60 us.
PAGE_SIZE_BYTES = 8192
COMPACT_MAX_LOG_COUNT = 20_000
# WAL checkpoints run on a thread of their own (see _Checkpointer), at most this often while commits come in.
CHECKPOINT_SPACING_SECONDS = 0.02
BUSY_TIMEOUT_MS = 5000  # sqlite3.connect's default: how long a statement waits for another process's lock
RESTART_BUSY_MS = 20
WAL_RESET_FRAMES = 8192  # pages of WAL (64 MB at 8 KB pages, 32 MB in older 4 KB stores): then start it afresh

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    mailbox TEXT NOT NULL,
    name TEXT NOT NULL,
    snapshot BLOB,  -- schema 1 only, NULL from schema 2 on (see snapshots)
    snapshot_bytes INTEGER NOT NULL DEFAULT 0,
    log_bytes INTEGER NOT NULL DEFAULT 0,
    log_count INTEGER NOT NULL DEFAULT 0,
    state_vector BLOB NOT NULL,
    PRIMARY KEY (mailbox, name)
);
-- Apart from documents: SQLite rewrites a whole row, overflow pages included, when any column of it changes,
-- so a snapshot stored beside the counters every commit updates was rewritten by each commit (433 KB of WAL
-- and 9 ms for one flag on a 100k-message mailbox).
CREATE TABLE IF NOT EXISTS snapshots (
    mailbox TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (mailbox, name)
);
-- Plain rowids: AUTOINCREMENT kept its counter in sqlite_sequence, one more page written by every commit. A new
-- row still gets an id above every row in the table, so a document's rows stay in commit order.
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY,
    mailbox TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_document ON updates (mailbox, name, id);
CREATE TABLE IF NOT EXISTS rows (
    mailbox TEXT NOT NULL,
    message_id TEXT NOT NULL,
    shard TEXT NOT NULL,
    folder_id TEXT NOT NULL,
    date INTEGER NOT NULL,
    seen INTEGER NOT NULL,
    flags TEXT NOT NULL,
    sender TEXT NOT NULL,
    subject TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (mailbox, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_by_folder ON rows (mailbox, folder_id, date DESC, message_id DESC);
CREATE INDEX IF NOT EXISTS rows_by_shard ON rows (mailbox, shard);
CREATE INDEX IF NOT EXISTS rows_unread ON rows (mailbox, folder_id, seen);
CREATE TABLE IF NOT EXISTS indexed_shards (
    mailbox TEXT NOT NULL,
    shard TEXT NOT NULL,
    state_vector BLOB NOT NULL,
    PRIMARY KEY (mailbox, shard)
);
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL,
    mailboxes TEXT NOT NULL,
    created INTEGER NOT NULL
);
"""


def _move_snapshots(connection: sqlite3.Connection) -> None:
    """Move schema 1's snapshots out of the documents table, inside the caller's transaction.

    A snapshot found there beside one already moved (a schema-1 process still running folded after the move)
    is merged with it: both hold only what was committed, and a merge keeps everything of each.
    """
    legacy = connection.execute(
        "SELECT documents.mailbox, documents.name, documents.snapshot, snapshots.data FROM documents"
        " LEFT JOIN snapshots USING (mailbox, name) WHERE documents.snapshot IS NOT NULL"
    ).fetchall()
    for mailbox, name, old, moved in legacy:
        data = old if moved is None else pycrdt.merge_updates(moved, old)
        connection.execute("INSERT OR REPLACE INTO snapshots (mailbox, name, data) VALUES (?, ?, ?)",
                           (mailbox, name, data))
        connection.execute("UPDATE documents SET snapshot = NULL, snapshot_bytes = ? WHERE mailbox = ? AND name = ?",
                           (len(data), mailbox, name))


def _renumber_updates(connection: sqlite3.Connection) -> None:
    """Rebuild the update log's table without AUTOINCREMENT (schema 3), ids and rows as they were, inside the
    caller's transaction. A schema-2 process still running writes to it as before: its INSERTs name no id."""
    sql = connection.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'updates'").fetchone()
    if sql is None or "AUTOINCREMENT" not in sql[0].upper():
        return
    connection.execute("CREATE TABLE updates_renumbered (id INTEGER PRIMARY KEY, mailbox TEXT NOT NULL,"
                       " name TEXT NOT NULL, data BLOB NOT NULL)")
    connection.execute("INSERT INTO updates_renumbered (id, mailbox, name, data) SELECT id, mailbox, name, data"
                       " FROM updates ORDER BY id")
    connection.execute("DROP TABLE updates")  # and its index
    connection.execute("ALTER TABLE updates_renumbered RENAME TO updates")
    connection.execute("CREATE INDEX updates_by_document ON updates (mailbox, name, id)")
    connection.execute("DELETE FROM sqlite_sequence WHERE name = 'updates'")


def _storage_error(action: str, path: Path, exc: sqlite3.Error) -> StorageError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return CorruptStoreError(
            f"{path} is damaged or is not a crdtmail database ({text}); restore it from a backup or move it away "
            "and let this peer resync from another"
        )
    hint = "free some disk space" if "full" in text else "check its permissions and that no other program locks it"
    return StorageError(f"cannot {action} {path}: {text}; {hint}")


class SqliteStore:
    """One peer's SQLite database: documents, update logs, derived index rows and blobs of every mailbox."""

    def __init__(self, path: Path, connection: sqlite3.Connection, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._connection = connection
        self._checkpointer = _Checkpointer(path, synchronous)

    @classmethod
    def open(cls, path: Path, *, create: bool = True, synchronous: str = "NORMAL") -> SqliteStore:
        """Open (or create) the database at ``path``; raises CorruptStoreError for a file that is not ours."""
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise StorageError(f'synchronous must be "NORMAL" or "FULL", not {synchronous!r}')
        if not create and not path.exists():
            raise StorageError(f"no crdtmail database at {path}; run `crdtmail init` first")
        fresh = not path.exists() or path.stat().st_size == 0
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise _storage_error("open", path, exc) from exc
        try:
            if fresh:  # only before the first table exists; a database in WAL mode keeps its page size
                connection.execute(f"PRAGMA page_size={PAGE_SIZE_BYTES}")
            connection.execute("PRAGMA journal_mode=WAL")
            # No checkpoint inside a commit: one copies the WAL into the database and fsyncs it, stalling the
            # commit that triggered it (measured: 17-45 ms every ~790 one-flag commits, the whole one-hop
            # latency tail). The store's _Checkpointer thread does it instead, off the commit path.
            connection.execute("PRAGMA wal_autocheckpoint=0")
            connection.execute(f"PRAGMA synchronous={synchronous.upper()}")
            connection.execute(f"PRAGMA cache_size={CACHE_SIZE}")
            connection.execute(f"PRAGMA temp_store={TEMP_STORE}")
            application_id = connection.execute("PRAGMA application_id").fetchone()[0]
            if fresh:
                with _transaction(connection):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    connection.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    connection.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
            elif application_id != APPLICATION_ID:
                raise CorruptStoreError(
                    f"{path} is a SQLite database but not a crdtmail one; point --data-dir at a crdtmail data dir"
                )
            else:
                row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise CorruptStoreError(
                        f"{path} was written by a newer crdtmail (schema {version}, this one knows {SCHEMA_VERSION}); "
                        "upgrade crdtmail"
                    )
                if version < 1:
                    raise CorruptStoreError(f"{path} has an unknown schema version {version}; it cannot be read")
                # Tables and indexes added within a schema version are additive: create any that are missing.
                with _transaction(connection):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    # A snapshot in documents: schema 1's, or one a schema-1 process still running folded since.
                    if version < 2 or connection.execute(
                            "SELECT 1 FROM documents WHERE snapshot IS NOT NULL LIMIT 1").fetchone():
                        _move_snapshots(connection)
                    if version < 3:
                        _renumber_updates(connection)
                    if version < SCHEMA_VERSION:
                        connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                                           (str(SCHEMA_VERSION),))
        except sqlite3.Error as exc:
            connection.close()
            raise _storage_error("open", path, exc) from exc
        except CorruptStoreError:
            connection.close()
            raise
        return cls(path, connection, synchronous.upper())

    def close(self) -> None:
        """Close the database; every committed change is already durable."""
        self._checkpointer.close()
        self._connection.close()

    def committed(self) -> None:
        """Note that a transaction was committed on this store's connection (the WAL grew)."""
        if self._checkpointer.restart_due:
            self._checkpointer.restart_due = False
            # A RESTART waits for other processes' readers to leave the WAL: wait a little, never the
            # connection's 5 s (this is the event loop's thread); a busy WAL is simply restarted later.
            self._connection.execute(f"PRAGMA busy_timeout={RESTART_BUSY_MS}")
            try:
                with suppress(sqlite3.Error):
                    self._connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            finally:
                self._connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._checkpointer.wake()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._connection.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error("read", self.path, exc) from exc

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Run one read statement on the peer's connection (for tables other layers own, like the bridge's)."""
        return self._query(sql, parameters)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the peer's connection, committed when the block ends, rolled back on error."""
        try:
            with _transaction(self._connection):
                yield self._connection
        except sqlite3.Error as exc:
            raise _storage_error("write to", self.path, exc) from exc
        self.committed()

    def delete_blobs(self, hashes: Sequence[str]) -> None:
        """Drop stored bodies (a desktop does once they are safe in its Maildir files)."""
        with self.transaction() as connection:
            connection.executemany("DELETE FROM blobs WHERE sha256 = ?", [(sha256,) for sha256 in hashes])

    def get_meta(self, key: str) -> str | None:
        """A value of the meta table (peer identity and the like)."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the meta table, durably."""
        try:
            with _transaction(self._connection):
                self._connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        except sqlite3.Error as exc:
            raise _storage_error("write", self.path, exc) from exc

    def mailbox_names(self) -> list[str]:
        """Mailboxes with at least one stored document."""
        return [row[0] for row in self._query("SELECT DISTINCT mailbox FROM documents ORDER BY mailbox")]

    def backend(self, mailbox: str) -> SqliteMailboxBackend:
        """The MailboxBackend of one mailbox in this database."""
        return SqliteMailboxBackend(self, mailbox)

    def file_size(self) -> int:
        """Bytes on disk of the database and its WAL."""
        return sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal")) if p.exists())

    def stats(self, mailbox: str) -> dict[str, int]:
        """Document count and stored bytes of one mailbox."""
        documents = self._query(
            "SELECT count(*), coalesce(sum(snapshot_bytes), 0), coalesce(sum(log_bytes), 0),"
            " coalesce(sum(log_count), 0) FROM documents WHERE mailbox = ?",
            (mailbox,),
        )[0]
        return {
            "documents": int(documents[0]),
            "snapshot_bytes": int(documents[1]),
            "log_bytes": int(documents[2]),
            "log_updates": int(documents[3]),
        }

    def add_device(self, name: str, token_sha256: bytes, mailboxes: Sequence[str], created: int) -> None:
        """Record a paired device (its token only as a hash); pairing a name again replaces its token."""
        try:
            with _transaction(self._connection):
                self._connection.execute(
                    "INSERT OR REPLACE INTO devices (name, token_sha256, mailboxes, created) VALUES (?, ?, ?, ?)",
                    (name, token_sha256, "\n".join(mailboxes), created),
                )
        except sqlite3.Error as exc:
            raise _storage_error("write to", self.path, exc) from exc

    def remove_device(self, name: str) -> bool:
        """Forget a paired device; returns whether it was there."""
        try:
            with _transaction(self._connection):
                cursor = self._connection.execute("DELETE FROM devices WHERE name = ?", (name,))
        except sqlite3.Error as exc:
            raise _storage_error("write to", self.path, exc) from exc
        return cursor.rowcount > 0

    def devices(self) -> list[tuple[str, bytes, list[str], int]]:
        """Every paired device: name, token hash, mailboxes, creation time."""
        rows = self._query("SELECT name, token_sha256, mailboxes, created FROM devices ORDER BY name")
        return [(row[0], bytes(row[1]), [m for m in row[2].split("\n") if m], int(row[3])) for row in rows]

    def integrity_check(self) -> str:
        """SQLite's own integrity check ("ok" when the file is sound)."""
        return str(self._query("PRAGMA integrity_check")[0][0])


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


class SqliteMailboxBackend:
    """The MailboxBackend of one mailbox inside a SqliteStore."""

    def __init__(self, store: SqliteStore, mailbox: str) -> None:
        self._store = store
        self._connection = store._connection
        self.mailbox = mailbox
        self._writer: _Writer | None = None
        # Per document this backend loaded: the snapshot size and last log id it read, and how many log rows it
        # wrote since. They tell whether the loader's in-memory document still holds everything stored, so a
        # fold may take its encoding (see _fold_hint); another process writing the same file breaks the match.
        self._baselines: dict[str, tuple[int, int, int]] = {}
        # SQLite's data_version when the baselines were last known good: it changes when any other connection
        # commits (another process on this data directory, the import writer), which voids every baseline.
        self._data_version: int | None = None

    def load_document(self, doc_name: str) -> bytes | None:
        """The snapshot and every logged update, merged into one update."""
        parts = self.load_document_parts(doc_name)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else pycrdt.merge_updates(*parts)

    def load_document_parts(self, doc_name: str) -> list[bytes]:
        """The snapshot, then every logged update in commit order."""
        self._others_wrote()  # before reading: a write after this shows at the fold, which then merges
        self._settle()
        rows = self._store._query(
            "SELECT documents.snapshot_bytes, snapshots.data, documents.snapshot FROM documents"
            " LEFT JOIN snapshots USING (mailbox, name) WHERE documents.mailbox = ? AND documents.name = ?",
            (self.mailbox, doc_name),
        )
        if not rows:
            self._baselines[doc_name] = (0, 0, 0)
            return []
        snapshot_bytes, snapshot, legacy = rows[0]
        # A schema-1 snapshot is only ever here if a schema-1 process wrote one after the upgrade: keep it too.
        parts = [part for part in (snapshot, legacy) if part]
        log = self._store._query(
            "SELECT id, data FROM updates WHERE mailbox = ? AND name = ? ORDER BY id", (self.mailbox, doc_name)
        )
        parts.extend(row[1] for row in log)
        self._baselines[doc_name] = (int(snapshot_bytes), int(log[-1][0]) if log else 0, 0)
        return parts

    def document_names(self) -> list[str]:
        """Every stored document of the mailbox."""
        self._settle()
        rows = self._store._query("SELECT name FROM documents WHERE mailbox = ? ORDER BY name", (self.mailbox,))
        return [row[0] for row in rows]

    def state_vector(self, doc_name: str) -> bytes | None:
        """The state vector stored with the document's last update."""
        self._settle()
        rows = self._store._query(
            "SELECT state_vector FROM documents WHERE mailbox = ? AND name = ?", (self.mailbox, doc_name)
        )
        return bytes(rows[0][0]) if rows else None

    def commit(self, batch: CommitBatch) -> None:
        """Write the batch in one transaction; blobs are verified first, so a bad one leaves nothing behind.

        Inside ``pipelined()`` the batch is handed to a writer thread instead and is durable when the block ends.
        """
        if batch.is_empty():
            return
        if self._writer is not None:
            # The writer thread must not touch the caller's documents: it folds by merging the log.
            self._writer.submit(dataclasses.replace(batch, encode_document=None))  # verified on the writer thread
            return
        _verify_blobs(batch)
        folded: dict[str, int] = {}  # document -> the bytes of the snapshot its log was folded into
        hint = None if batch.encode_document is None else functools.partial(self._fold_hint, batch, folded)
        try:
            snapshots = _write_batch(self._connection, self.mailbox, batch, hint)
        except sqlite3.Error as exc:
            raise _storage_error("write to", self._store.path, exc) from exc
        for update in batch.updates:
            baseline = self._baselines.get(update.doc_name)
            if baseline is not None:
                if update.doc_name in snapshots:  # no log row of it; every row after id 0 is a later one
                    self._baselines[update.doc_name] = (len(update.update), 0, 0)
                else:
                    self._baselines[update.doc_name] = (baseline[0], baseline[1], baseline[2] + 1)
        for name, snapshot_bytes in folded.items():
            # A fold deletes every logged row of the document: any row after it is a later one. (Not "after the
            # last id folded": without AUTOINCREMENT, a row logged next may take an id a deleted one had.)
            self._baselines[name] = (snapshot_bytes, 0, 0)
        self._store.committed()

    def _others_wrote(self) -> bool:
        """Whether another connection committed since the last look; if so the baselines are forgotten."""
        version = int(self._connection.execute("PRAGMA data_version").fetchone()[0])
        if version == self._data_version:
            return False
        changed = self._data_version is not None
        self._data_version = version
        self._baselines.clear()
        return changed

    def _fold_hint(self, batch: CommitBatch, folded: dict[str, int],
                   connection: sqlite3.Connection, name: str, snapshot_bytes: int) -> bytes | None:
        """The committing document's encoding, if it provably holds everything stored for ``name``.

        It does when nothing but this backend wrote the document since it loaded it: the snapshot is the one it
        read (or folded) and the log rows after the last id it read are exactly the ones it wrote, this batch's
        included. Otherwise (another process shares the file, or the fold merged rows we never read) None: merge.
        """
        if self._others_wrote():  # inside the write transaction: nobody can commit between this and the fold
            return None
        baseline = self._baselines.get(name)
        if baseline is None or batch.encode_document is None or baseline[0] != snapshot_bytes:
            self._baselines.pop(name, None)
            return None
        written_here = baseline[2] + sum(1 for update in batch.updates if update.doc_name == name)
        newer = connection.execute(
            "SELECT count(*) FROM updates WHERE mailbox = ? AND name = ? AND id > ?", (self.mailbox, name, baseline[1])
        ).fetchone()[0]
        encoded = batch.encode_document(name) if newer == written_here else None
        if encoded is None:
            self._baselines.pop(name, None)
            return None
        folded[name] = len(encoded)
        return encoded

    @contextmanager
    def pipelined(self) -> Iterator[None]:
        """Let commits overlap with the caller's work (bulk imports): SQLite writes on its own thread.

        ``commit`` returns once the batch is queued; every read first waits until the queued batches are written,
        so reads see them. Leaving the block waits for the last batch and re-raises the first write error. Nothing
        committed inside the block may be acknowledged to anyone before the block has ended.
        """
        writer = _Writer(self._store, self.mailbox)
        self._writer = writer
        try:
            yield
        finally:
            self._writer = None
            writer.close()

    def fold_document(self, doc_name: str) -> bytes | None:
        """Fold one document's log (and a schema-1 snapshot, if one is left) into its snapshot, in one
        transaction, and return the snapshot; None if the document was never stored. For a document stored in
        more than one part: one part alone is merged again for nothing."""
        self._settle()
        try:
            with _transaction(self._connection):
                if self._connection.execute(
                    "SELECT 1 FROM documents WHERE mailbox = ? AND name = ?", (self.mailbox, doc_name)
                ).fetchone() is None:
                    return None
                snapshot = _compact(self._connection, self.mailbox, doc_name)
        except sqlite3.Error as exc:
            raise _storage_error("write to", self._store.path, exc) from exc
        self._baselines.pop(doc_name, None)
        self._store.committed()
        return snapshot

    def fold_logs(self) -> list[str]:
        """Fold every document's log into its snapshot; returns their names.

        A bulk import leaves logs of up to a snapshot's size behind; folded, each later load or full answer to a
        peer is one stored snapshot instead of a merge.
        """
        self._settle()
        names = [row[0] for row in self._store._query(
            "SELECT name FROM documents WHERE mailbox = ? AND log_count > 0 ORDER BY name", (self.mailbox,))]
        for name in names:
            self.fold_document(name)
        return names

    def _settle(self) -> None:
        if self._writer is not None:
            self._writer.drain()

    def indexed_state_vectors(self) -> dict[str, bytes]:
        """For each shard with rows, the state vector they were derived at."""
        self._settle()
        rows = self._store._query(
            "SELECT shard, state_vector FROM indexed_shards WHERE mailbox = ?", (self.mailbox,)
        )
        return {row[0]: bytes(row[1]) for row in rows}

    def locate(self, message_id: str) -> str | None:
        """The shard of a visible message."""
        self._settle()
        rows = self._store._query(
            "SELECT shard FROM rows WHERE mailbox = ? AND message_id = ?", (self.mailbox, message_id)
        )
        return str(rows[0][0]) if rows else None

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        """Visible ids starting with ``prefix`` (a range scan on the primary key)."""
        self._settle()
        rows = self._store._query(
            "SELECT message_id FROM rows WHERE mailbox = ? AND message_id >= ? AND message_id < ?"
            " ORDER BY message_id LIMIT ?",
            (self.mailbox, prefix, prefix + "\U0010ffff", limit),
        )
        return [row[0] for row in rows]

    def list_folder(self, folder_ids: Sequence[str], offset: int, limit: int) -> list[IndexRow]:
        """Rows of the folders, newest first, from the folder index."""
        if not folder_ids:
            return []
        marks = ",".join("?" * len(folder_ids))
        self._settle()
        rows = self._store._query(
            "SELECT message_id, shard, folder_id, date, flags, sender, subject, size FROM rows"
            f" WHERE mailbox = ? AND folder_id IN ({marks}) ORDER BY date DESC, message_id DESC LIMIT ? OFFSET ?",
            (self.mailbox, *folder_ids, limit, offset),
        )
        return [_row(row) for row in rows]

    def rows(self, message_ids: Sequence[str]) -> dict[str, IndexRow]:
        """The rows of the visible messages among ``message_ids``, looked up by primary key in chunks."""
        self._settle()
        found: dict[str, IndexRow] = {}
        for chunk, marks in in_chunks(message_ids):
            for row in self._store._query(
                "SELECT message_id, shard, folder_id, date, flags, sender, subject, size FROM rows"
                f" WHERE mailbox = ? AND message_id IN ({marks})",
                (self.mailbox, *chunk),
            ):
                found[row[0]] = _row(row)
        return found

    def ids_in_folder(self, folder_id: str) -> list[str]:
        """Every visible id placed in the folder."""
        self._settle()
        rows = self._store._query(
            "SELECT message_id FROM rows WHERE mailbox = ? AND folder_id = ?", (self.mailbox, folder_id)
        )
        return [row[0] for row in rows]

    def folder_counts(self) -> dict[str, FolderCount]:
        """Total and unread per folder id, counted by SQLite."""
        self._settle()
        rows = self._store._query(
            "SELECT folder_id, count(*), count(*) - sum(seen) FROM rows WHERE mailbox = ? GROUP BY folder_id",
            (self.mailbox,),
        )
        return {row[0]: FolderCount(int(row[1]), int(row[2])) for row in rows}

    def all_rows(self) -> Iterable[IndexRow]:
        """Every derived row of the mailbox."""
        self._settle()
        rows = self._store._query(
            "SELECT message_id, shard, folder_id, date, flags, sender, subject, size FROM rows WHERE mailbox = ?",
            (self.mailbox,),
        )
        return [_row(row) for row in rows]

    def get_blob(self, sha256: str) -> bytes | None:
        """A blob by hash, verified on the way out."""
        self._settle()
        rows = self._store._query("SELECT data FROM blobs WHERE sha256 = ?", (sha256,))
        if not rows:
            return None
        data = bytes(rows[0][0])
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError(
                f"blob {sha256} in {self._store.path} is corrupt (its bytes do not match its SHA-256); "
                "it will be fetched again from a peer that has it"
            )
        return data

    def has_blob(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        self._settle()
        return bool(self._store._query("SELECT 1 FROM blobs WHERE sha256 = ?", (sha256,)))

    def stored_blobs(self, hashes: Sequence[str]) -> set[str]:
        """Which of the blobs are stored, looked up by primary key in chunks (a statement per 500, not per blob:
        each statement lets go of the GIL, and taking it back can wait a switch interval)."""
        self._settle()
        found: set[str] = set()
        for chunk, marks in in_chunks(hashes):
            found.update(row[0] for row in self._store._query(f"SELECT sha256 FROM blobs WHERE sha256 IN ({marks})",
                                                              tuple(chunk)))
        return found


def _verify_blobs(batch: CommitBatch) -> None:
    for sha256, data in batch.blobs.items():
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError(f"blob {sha256} does not hash to its name; nothing of its batch was committed")


_PATCHED_ROWS_MAX = 8
# A listing row patched in place: only where every column but the ones set is as the patch expects.
_ROW_AS_EXPECTED = (" WHERE mailbox = ? AND message_id = ? AND shard = ? AND folder_id = ? AND date = ? AND sender = ?"
                    " AND subject = ? AND size = ?")
_PATCH_FLAGS = "UPDATE rows SET flags = ?" + _ROW_AS_EXPECTED + " AND seen = ?"
_PATCH_SEEN_AND_FLAGS = "UPDATE rows SET seen = ?, flags = ?" + _ROW_AS_EXPECTED

_FoldHint = Callable[[sqlite3.Connection, str, int], "bytes | None"]


def _write_batch(connection: sqlite3.Connection, mailbox: str, batch: CommitBatch,
                 fold_hint: _FoldHint | None = None, *, on_writer_thread: bool = False) -> set[str]:
    """One batch as one transaction on ``connection``; returns the new documents stored as snapshots.

    Many rows go in as multi-row statements on the writer thread (see ``insert_many``), and row by row through
    ``executemany`` on the caller's thread, where nothing competes for the GIL: 100k listing rows 0.61-0.65 s
    against 0.97-1.02 s.
    """
    with _transaction(connection):
        snapshots = _append_updates(connection, mailbox, batch, fold_hint)
        if batch.replace_shards:
            shards = [(mailbox, shard) for shard in batch.replace_shards]
            connection.executemany("DELETE FROM rows WHERE mailbox = ? AND shard = ?", shards)
            connection.executemany("DELETE FROM indexed_shards WHERE mailbox = ? AND shard = ?", shards)
        if batch.rows_delete:
            connection.executemany(
                "DELETE FROM rows WHERE mailbox = ? AND message_id = ?",
                [(mailbox, message_id) for message_id in batch.rows_delete],
            )
        upsert = batch.rows_upsert
        if 0 < len(upsert) <= _PATCHED_ROWS_MAX:
            # A few rows (a live change): where only flags differ, an UPDATE of those two columns rewrites the
            # table's page and the unread index's, where INSERT OR REPLACE rewrites all four of the row's B-trees.
            upsert = {}
            for message_id, r in batch.rows_upsert.items():
                flags = " ".join(r.flags)
                parameters: tuple[Any, ...]
                unchanged = (mailbox, message_id, r.shard, r.folder_id, r.date, r.sender, r.subject, r.size)
                before = batch.rows_before.get(message_id)
                if before is not None and before.seen == r.seen:
                    # \Seen as it was: flags alone, which leaves the unread index's page as it is (a page fewer
                    # per flag change); seen stays in the WHERE, so a row changed meanwhile gets the whole write.
                    sql, parameters = _PATCH_FLAGS, (flags, *unchanged, int(r.seen))
                else:
                    sql, parameters = _PATCH_SEEN_AND_FLAGS, (int(r.seen), flags, *unchanged)
                patched = connection.execute(sql, parameters).rowcount
                if not patched:
                    upsert[message_id] = r
        if upsert:
            # In key order: a shard's rows then fill the table's B-tree page by page instead of touching a random
            # page per row (a 100k-message initial sync inserted them twice as fast).
            values = [
                (mailbox, r.message_id, r.shard, r.folder_id, r.date, int(r.seen), " ".join(r.flags), r.sender,
                 r.subject, r.size)
                for _, r in sorted(upsert.items())
            ]
            head = ("INSERT OR REPLACE INTO rows (mailbox, message_id, shard, folder_id, date, seen, flags, sender,"
                    " subject, size) VALUES ")
            if on_writer_thread:
                insert_many(connection, head, values)
            else:
                connection.executemany(head + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        if batch.indexed_shards:
            # An UPDATE first: it rewrites the table's page alone, where INSERT OR REPLACE deletes and inserts the
            # row and so rewrites its primary key's index page too (one of the 8 pages a flag change wrote).
            missing = [
                (mailbox, shard, vector) for shard, vector in batch.indexed_shards.items()
                if not connection.execute(
                    "UPDATE indexed_shards SET state_vector = ? WHERE mailbox = ? AND shard = ?",
                    (vector, mailbox, shard),
                ).rowcount
            ]
            if missing:
                connection.executemany(
                    "INSERT INTO indexed_shards (mailbox, shard, state_vector) VALUES (?, ?, ?)", missing
                )
        if batch.blobs:
            insert_many(
                connection,
                "INSERT OR IGNORE INTO blobs (sha256, size, data) VALUES ",
                [(sha256, len(data), data) for sha256, data in batch.blobs.items()],
            )
    return snapshots


_T = TypeVar("_T")


def in_chunks(values: Sequence[_T], size: int = 500) -> Iterator[tuple[Sequence[_T], str]]:
    """``values`` in slices of at most ``size``, each with its ``?,?,...`` for an ``IN (...)`` clause: a statement
    per few hundred keys, not per key (each statement lets go of the GIL), under SQLite's bound-value limit."""
    for start in range(0, len(values), size):
        chunk = values[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


def insert_many(connection: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert many rows with a few multi-row statements rather than one statement per row (``head`` ends with
    ``VALUES ``; the bridge's state uses it too).

    Each statement step releases and re-takes the GIL; a writer thread doing that per row waits a switch
    interval behind the importing thread every time, which made pipelined imports several times slower.
    """
    width = len(rows[0])
    per_statement = max(1, 900 // width)  # well under SQLite's bound-parameter limit
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        marks = ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk))
        connection.execute(head + marks, [value for row in chunk for value in row])


def _append_updates(connection: sqlite3.Connection, mailbox: str, batch: CommitBatch,
                    fold_hint: _FoldHint | None = None) -> set[str]:
    """Log the batch's updates and fold a log that outgrew its snapshot, inside the caller's transaction.

    A document new to the store that arrives as one update (a shard of an initial sync) is stored as its
    snapshot straight away, rather than logged and then folded at once (which wrote it twice, and encoded the
    document again); returns those documents' names.
    """
    touched: dict[str, tuple[int, int, bytes]] = {}  # name -> (added bytes, added count, state vector)
    for update in batch.updates:
        added_bytes, added_count, _ = touched.get(update.doc_name, (0, 0, b""))
        touched[update.doc_name] = (added_bytes + len(update.update), added_count + 1, update.state_vector)
    if not touched:
        return set()
    snapshots: set[str] = set()
    for name, (added_bytes, added_count, _) in touched.items():
        if added_count == 1 and added_bytes > COMPACT_MIN_LOG_BYTES and connection.execute(
            "SELECT 1 FROM documents WHERE mailbox = ? AND name = ?", (mailbox, name)
        ).fetchone() is None:
            snapshots.add(name)
    if snapshots:
        whole = [u for u in batch.updates if u.doc_name in snapshots]
        connection.executemany(
            "INSERT INTO documents (mailbox, name, snapshot, snapshot_bytes, log_bytes, log_count, state_vector)"
            " VALUES (?, ?, NULL, ?, 0, 0, ?)",
            [(mailbox, u.doc_name, len(u.update), u.state_vector) for u in whole],
        )
        connection.executemany(
            "INSERT OR REPLACE INTO snapshots (mailbox, name, data) VALUES (?, ?, ?)",
            [(mailbox, u.doc_name, u.update) for u in whole],
        )
    rows = [(mailbox, u.doc_name, u.update) for u in batch.updates if u.doc_name not in snapshots]
    if rows:
        insert_many(connection, "INSERT INTO updates (mailbox, name, data) VALUES ", rows)
    for name, (added_bytes, added_count, state_vector) in touched.items():
        if name in snapshots:
            continue
        current = connection.execute(
            "SELECT snapshot_bytes, log_bytes, log_count FROM documents WHERE mailbox = ? AND name = ?",
            (mailbox, name),
        ).fetchone()
        if current is None:
            connection.execute(
                "INSERT INTO documents (mailbox, name, snapshot, snapshot_bytes, log_bytes, log_count,"
                " state_vector) VALUES (?, ?, NULL, 0, ?, ?, ?)",
                (mailbox, name, added_bytes, added_count, state_vector),
            )
            snapshot_bytes, log_bytes, log_count = 0, added_bytes, added_count
        else:
            snapshot_bytes = current[0]
            log_bytes, log_count = current[1] + added_bytes, current[2] + added_count
            connection.execute(
                "UPDATE documents SET log_bytes = ?, log_count = ?, state_vector = ?"
                " WHERE mailbox = ? AND name = ?",
                (log_bytes, log_count, state_vector, mailbox, name),
            )
        if log_bytes > max(snapshot_bytes, COMPACT_MIN_LOG_BYTES) or log_count > COMPACT_MAX_LOG_COUNT:
            _compact(connection, mailbox, name, fold_hint)
    return snapshots

def _compact(connection: sqlite3.Connection, mailbox: str, name: str, fold_hint: _FoldHint | None = None) -> bytes:
    """Fold the log into a new snapshot, inside the caller's transaction; returns the snapshot.

    Merging the log costs milliseconds per fold on the commit path (the one-hop latency tail) and keeps every
    overwritten flag value; the in-memory document's encoding, when ``fold_hint`` can vouch for it, costs
    microseconds and has dropped them.
    """
    snapshot_bytes, last_id = connection.execute(
        "SELECT documents.snapshot_bytes, (SELECT max(id) FROM updates WHERE mailbox = ? AND name = ?)"
        " FROM documents WHERE mailbox = ? AND name = ?", (mailbox, name, mailbox, name)
    ).fetchone()
    merged = None if fold_hint is None else fold_hint(connection, name, int(snapshot_bytes))
    if merged is None:
        snapshot = connection.execute(
            "SELECT data FROM snapshots WHERE mailbox = ? AND name = ?", (mailbox, name)
        ).fetchone()
        legacy = connection.execute(
            "SELECT snapshot FROM documents WHERE mailbox = ? AND name = ?", (mailbox, name)
        ).fetchone()[0]
        log = connection.execute(
            "SELECT data FROM updates WHERE mailbox = ? AND name = ? AND id <= ? ORDER BY id",
            (mailbox, name, last_id),
        ).fetchall()
        parts = [part for part in (snapshot[0] if snapshot else None, legacy) if part]
        merged = pycrdt.merge_updates(*parts, *(row[0] for row in log))
    connection.execute(
        "INSERT OR REPLACE INTO snapshots (mailbox, name, data) VALUES (?, ?, ?)", (mailbox, name, merged)
    )
    connection.execute(
        "UPDATE documents SET snapshot = NULL, snapshot_bytes = ?, log_bytes = 0, log_count = 0"
        " WHERE mailbox = ? AND name = ?",
        (len(merged), mailbox, name),
    )
    connection.execute(
        "DELETE FROM updates WHERE mailbox = ? AND name = ? AND id <= ?", (mailbox, name, last_id)
    )
    return bytes(merged)


class _Checkpointer:
    """A thread with its own connection that copies the WAL into the database after commits (PASSIVE
    checkpoints: they never block a writer, and their fsyncs happen here instead of inside a commit).

    Woken by each commit, it checkpoints at most every CHECKPOINT_SPACING_SECONDS, so a burst of commits
    costs one checkpoint, and each copies little (its cost grows with the WAL written since the last one:
    0.8 ms after 10 one-flag commits, 43 ms after 1,000). Once the WAL reaches WAL_RESET_FRAMES it has the
    store's next commit run a RESTART checkpoint (``restart_due``), so that the WAL starts over. A checkpoint
    that fails (another process's checkpoint is running, say) is tried again at the next commit;
    the last connection to close checkpoints what is left.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._wakeup = threading.Event()
        self._stopping = False
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
        # Set when the WAL is long though copied: the store's next commit then runs a RESTART checkpoint itself,
        # which has only the last few commits to copy (a millisecond or two, once per WAL_RESET_FRAMES pages),
        # and the commit after it starts the WAL over. From this thread it would wait on a busy writer for ever.
        self.restart_due = False

    def wake(self) -> None:
        if self._thread is None:  # started lazily: a read-only command never pays for the thread
            with self._starting:  # the store's thread and an import's writer thread may both wake it
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="crdtmail-sqlite-checkpoint", daemon=True)
                    thread.start()
                    self._thread = thread
        self._wakeup.set()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            connection.execute(f"PRAGMA synchronous={self._synchronous}")  # its fsyncs are as the store's
            while True:
                self._wakeup.wait()
                if self._stopping:
                    return
                self._wakeup.clear()
                try:
                    frames = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
                    # Copied, yet the WAL keeps growing: a commit arriving while a checkpoint runs (they take
                    # about a millisecond, fsyncs included) stops SQLite from starting it afresh, and under a
                    # steady stream of commits one always does. The writer restarts it (see ``restart_due``).
                    self.restart_due = frames >= WAL_RESET_FRAMES
                except sqlite3.Error:
                    pass  # busy or locked by another process: the next commit wakes us again
                time.sleep(CHECKPOINT_SPACING_SECONDS)
        finally:
            connection.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wakeup.set()
            self._thread.join()
            self._thread = None


class _Writer:
    """A thread with its own connection that writes queued batches in order (see ``pipelined``)."""

    def __init__(self, store: SqliteStore, mailbox: str) -> None:
        self._store = store
        self._mailbox = mailbox
        self._queue: queue.Queue[CommitBatch | None] = queue.Queue(maxsize=2)  # bounds memory to two batches
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="crdtmail-sqlite-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = sqlite3.connect(self._store.path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute(f"PRAGMA synchronous={self._store.synchronous}")
            connection.execute(f"PRAGMA cache_size={CACHE_SIZE}")
            connection.execute(f"PRAGMA temp_store={TEMP_STORE}")
            connection.execute("PRAGMA wal_autocheckpoint=0")  # the store's checkpoint thread does it
            checkpointer = self._store._checkpointer
            while True:
                batch = self._queue.get()
                try:
                    if batch is None:
                        return
                    if self._error is None:
                        _verify_blobs(batch)
                        _write_batch(connection, self._mailbox, batch, on_writer_thread=True)
                        if checkpointer.restart_due:
                            checkpointer.restart_due = False
                            with suppress(sqlite3.Error):
                                connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                        checkpointer.wake()
                except BaseException as exc:  # kept, and raised again on the caller's thread
                    self._error = exc
                finally:
                    self._queue.task_done()
        finally:
            connection.close()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, sqlite3.Error):
                raise _storage_error("write to", self._store.path, error) from error
            raise error

    def submit(self, batch: CommitBatch) -> None:
        self._raise()
        self._queue.put(batch)

    def drain(self) -> None:
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.join()
        self._queue.put(None)
        self._thread.join()
        self._raise()


def _row(row: Sequence[Any]) -> IndexRow:
    return IndexRow(
        message_id=row[0],
        shard=row[1],
        folder_id=row[2],
        date=int(row[3]),
        flags=tuple(row[4].split()) if row[4] else (),
        sender=row[5],
        subject=row[6],
        size=int(row[7]),
    )
