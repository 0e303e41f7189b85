"""The Maildir bridge's sync state, in the peer's SQLite database (as mbsync keeps its .mbsyncstate).

For every Maildir file the bridge knows: its unique name, the message it holds, and the folder and flag letters
last synced, so a difference on either side is told from one on the other by a three-way comparison. Folder
directories map to folder ids. A journal row is written before each file operation and removed with the state
change after it, so a process killed in between finishes the operation on restart.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from crdtmail.bridges.layout import MaildirFile
from crdtmail.errors import StorageError
from crdtmail.storage.sqlite import SqliteStore, in_chunks, insert_many

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bridge_files (
    mailbox TEXT NOT NULL,
    uid BLOB NOT NULL,
    message_id TEXT NOT NULL,
    folder_id TEXT NOT NULL,
    folder_dir BLOB NOT NULL,
    sub TEXT NOT NULL,
    name BLOB NOT NULL,
    letters TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    is_primary INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bridge_files_by_sha ON bridge_files (sha256);
CREATE TABLE IF NOT EXISTS bridge_folders (
    mailbox TEXT NOT NULL,
    folder_dir BLOB NOT NULL,
    folder_id TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder_dir)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bridge_journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bridge_meta (
    mailbox TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (mailbox, key)
) WITHOUT ROWID
"""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the bridge last synced for one file: where it is, its message, folder and flag letters.

    ``is_primary`` is False for a second copy of a message (delivered twice, or in two folders): the replica
    holds the message once, and only its primary file follows the replica's folder and flags.
    """

    uid: str
    message_id: str
    folder_id: str
    file: MaildirFile
    letters: str
    sha256: str
    is_primary: bool = True


class BridgeState:
    """The bridge state of one mailbox, cached in memory and written through to SQLite."""

    def __init__(self, store: SqliteStore, mailbox: str) -> None:
        self.store = store
        self.mailbox = mailbox
        with store.transaction() as connection:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
        self.records: dict[str, FileRecord] = {}
        self.by_message: dict[str, set[str]] = {}
        self.by_sha: dict[str, str] = {}
        for row in store.query(
            "SELECT uid, message_id, folder_id, folder_dir, sub, name, letters, sha256, is_primary"
            " FROM bridge_files WHERE mailbox = ?",
            (mailbox,),
        ):
            self._remember(FileRecord(_name(row[0]), row[1], row[2], MaildirFile(_name(row[3]), row[4], _name(row[5])),
                                      row[6], row[7], bool(row[8])))
        self.folders: dict[str, str] = {
            _name(row[0]): row[1]
            for row in store.query("SELECT folder_dir, folder_id FROM bridge_folders WHERE mailbox = ?", (mailbox,))
        }

    # ---------------------------------------------------------------------------------------------- memory

    def _remember(self, record: FileRecord) -> None:
        old = self.records.get(record.uid)
        if old is not None:
            self._forget(old)
        self.records[record.uid] = record
        self.by_message.setdefault(record.message_id, set()).add(record.uid)
        if record.is_primary and record.sha256:
            self.by_sha[record.sha256] = record.uid

    def _forget(self, record: FileRecord) -> None:
        self.records.pop(record.uid, None)
        uids = self.by_message.get(record.message_id)
        if uids is not None:
            uids.discard(record.uid)
            if not uids:
                del self.by_message[record.message_id]
        if self.by_sha.get(record.sha256) == record.uid:
            del self.by_sha[record.sha256]

    def primary(self, message_id: str) -> FileRecord | None:
        """The primary file record of a message."""
        for uid in self.by_message.get(message_id, ()):
            record = self.records[uid]
            if record.is_primary:
                return record
        return None

    def copies(self, message_id: str) -> list[FileRecord]:
        """The other (non-primary) file records of a message."""
        return [self.records[uid] for uid in sorted(self.by_message.get(message_id, ())) if
                not self.records[uid].is_primary]

    # ----------------------------------------------------------------------------------------------- writes

    def save(self, put: Iterable[FileRecord] = (), delete: Iterable[str] = (), *,
             done_journal: int | Iterable[int] | None = None, folders: dict[str, str | None] | None = None) -> None:
        """Record and forget files (and folder mappings; None forgets one) and close a journal entry, atomically."""
        put = list(put)
        delete = [uid for uid in delete if uid in self.records]
        with self.store.transaction() as connection:
            if delete:
                connection.executemany("DELETE FROM bridge_files WHERE mailbox = ? AND uid = ?",
                                       [(self.mailbox, os.fsencode(uid)) for uid in delete])
            if put:
                insert_many(  # a statement per 90 rows, not per row: each one lets go of the GIL
                    connection,
                    "INSERT OR REPLACE INTO bridge_files (mailbox, uid, message_id, folder_id, folder_dir, sub, name,"
                    " letters, sha256, is_primary) VALUES ",
                    [(self.mailbox, os.fsencode(r.uid), r.message_id, r.folder_id, os.fsencode(r.file.folder_dir),
                      r.file.sub, os.fsencode(r.file.name), r.letters, r.sha256, int(r.is_primary)) for r in put],
                )
            for folder_dir, folder_id in (folders or {}).items():
                if folder_id is None:
                    connection.execute("DELETE FROM bridge_folders WHERE mailbox = ? AND folder_dir = ?",
                                       (self.mailbox, os.fsencode(folder_dir)))
                else:
                    connection.execute(
                        "INSERT OR REPLACE INTO bridge_folders (mailbox, folder_dir, folder_id) VALUES (?, ?, ?)",
                        (self.mailbox, os.fsencode(folder_dir), folder_id))
            if done_journal is not None:
                done = [done_journal] if isinstance(done_journal, int) else list(done_journal)
                for chunk, marks in in_chunks(done):
                    connection.execute(f"DELETE FROM bridge_journal WHERE id IN ({marks})", chunk)
        for uid in delete:
            record = self.records.get(uid)
            if record is not None:
                self._forget(record)
        for record in put:
            self._remember(record)
        for folder_dir, folder_id in (folders or {}).items():
            if folder_id is None:
                self.folders.pop(folder_dir, None)
            else:
                self.folders[folder_dir] = folder_id

    def journal(self, entry: dict[str, Any]) -> int:
        """Write down a file operation before doing it; returns the entry's id for ``save(done_journal=...)``."""
        return self.journal_many([entry])[0]

    def journal_many(self, entries: list[dict[str, Any]]) -> list[int]:
        """Write down several file operations in one transaction; returns their ids."""
        ids: list[int] = []
        with self.store.transaction() as connection:
            for start in range(0, len(entries), _ROWS_PER_STATEMENT):
                chunk = entries[start : start + _ROWS_PER_STATEMENT]
                rows = connection.execute(
                    "INSERT INTO bridge_journal (mailbox, entry) VALUES " + ",".join(["(?, ?)"] * len(chunk))
                    + " RETURNING id",
                    [value for entry in chunk for value in (self.mailbox, orjson.dumps(entry).decode())],
                ).fetchall()
                # A multi-row VALUES inserts its rows in order and AUTOINCREMENT numbers them upwards, so the ids
                # sorted are the entries' ids in order (RETURNING itself promises no order).
                ids.extend(sorted(int(row[0]) for row in rows))
        return ids

    def open_journal(self) -> list[tuple[int, dict[str, Any]]]:
        """Operations begun and not finished (the process stopped in between), oldest first."""
        rows = self.store.query("SELECT id, entry FROM bridge_journal WHERE mailbox = ? ORDER BY id", (self.mailbox,))
        return [(int(row[0]), orjson.loads(row[1])) for row in rows]

    def set_meta(self, values: dict[str, Any]) -> None:
        """Remember facts for ``crdtmail status`` (last scan time, counts)."""
        with self.store.transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO bridge_meta (mailbox, key, value) VALUES (?, ?, ?)",
                [(self.mailbox, key, orjson.dumps(value).decode()) for key, value in values.items()],
            )


_ROWS_PER_STATEMENT = 400  # journal rows per statement (two bound values each): under 900 bound values


def _name(value: bytes | str) -> str:
    """A file or directory name as stored: bytes, since a Maildir name need not be UTF-8."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def journal_path(path: str) -> str:
    """A path as journal text: every byte kept, whatever the name's encoding (see ``path_from_journal``)."""
    return os.fsencode(path).decode("latin-1")


def path_from_journal(text: str) -> str:
    """The path ``journal_path`` wrote."""
    return os.fsdecode(text.encode("latin-1"))


def body_from_maildir(store: SqliteStore, mailbox: str, sha256: str) -> bytes | None:
    """A body from the Maildir file the bridge recorded for it, verified; None when there is none (or it changed)."""
    meta = read_meta(store, mailbox)
    if not meta.get("maildir") or not sha256:
        return None
    rows = store.query("SELECT folder_dir, sub, name FROM bridge_files WHERE mailbox = ? AND sha256 = ?",
                       (mailbox, sha256))
    for folder_dir, sub, name in rows:
        path = os.path.join(str(meta["maildir"]), _name(folder_dir), sub, _name(name))
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    return None


def read_meta(store: SqliteStore, mailbox: str) -> dict[str, Any]:
    """The bridge facts of a mailbox, or {} when no bridge ever ran for it."""
    try:
        rows = store.query("SELECT key, value FROM bridge_meta WHERE mailbox = ?", (mailbox,))
    except StorageError:  # the table exists only once a desktop peer has run
        return {}
    return {row[0]: orjson.loads(row[1]) for row in rows}
