"""The desktop's two-way mirror of a Maildir (Maildir++ folders) and a mailbox replica.

Other programs (Dovecot, mutt, notmuch, mbsync) keep changing the Maildir while the bridge runs. Each pass
compares, per message, three things: the file as it is now, the replica as it is now, and what the bridge last
synced (``BridgeState``). A side that differs from the synced state changed; Maildir changes are written to the
replica as local changes (so they win over anything the replica had already seen), and the replica's resulting
state is then written back to the file by renaming it. Running a pass twice changes nothing the second time,
which is what makes every step safe to repeat after a crash.

What maps to what:
- a file in ``cur/`` or ``new/`` of a folder directory is a message placed in that folder;
- its DFPRST info letters are \\Draft, \\Flagged, $Forwarded, \\Answered, \\Seen, \\Deleted (keywords stay in the
  replica only, and other tools' letters stay in the name);
- a file removed by another program is an expunge; a message expunged in the replica has its file moved into the
  ``crdtmail-expunged/<date>/`` area of the Maildir (kept ``retention_days``), never unlinked;
- a message new to the replica is delivered the Maildir way: written to ``tmp/``, fsynced, then linked into
  place and its ``tmp/`` name removed (a large group of deliveries, a first mirror, goes to a worker process that
  makes it durable with one ``syncfs`` first).

Bodies stay in the Maildir: a message read from a file is added without copying its body into the blob store, and
the bridge serves bodies from the files, verified against their hash. A body that arrives from a peer for a message
this desktop lacks is written to the Maildir, then dropped from the blob store.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from crdtmail.bridges.layout import (
    FOLDER_SUBDIRS,
    ROOT_DIR,
    SUBDIRS,
    MaildirFile,
    flags_for_letters,
    folder_dir_for_path,
    folder_path_for_dir,
    letters_for_flags,
    new_unique_name,
    renamed,
)
from crdtmail.bridges.parse_worker import read_and_parse
from crdtmail.bridges.state import BridgeState, FileRecord, journal_path, path_from_journal
from crdtmail.bridges.write_worker import WriteWorker, fsync_directory, place_file, write_file
from crdtmail.digest import sha256_hex
from crdtmail.errors import CrdtmailError, ExpungedMessageError, ModelError
from crdtmail.importer import read_message_file, show_path
from crdtmail.model.backend import IndexRow
from crdtmail.model.mailbox import INBOX, LOCAL, ROLE_ALIASES, Mailbox, MailboxChange
from crdtmail.model.message import Envelope, ParsedMessage
from crdtmail.storage.sqlite import SqliteStore

log = logging.getLogger(__name__)

EXPUNGED_AREA = "crdtmail-expunged"  # no leading dot: Maildir++ readers do not take it for a folder
DEFAULT_RETENTION_DAYS = 30.0
EXIT_AT_ENV = "CRDTMAIL_BRIDGE_EXIT_AT"  # test hook: the process exits at this step number (see _step)
_COMMIT_EVERY = 2000
_DELIVER_EVERY = 500
_WORKER_THRESHOLD = 2000  # new files from which reading and parsing move to a worker process
_WORKER_CHUNK = 256
_MAX_ARRIVED_BYTES = 64 * 1024 * 1024  # bodies held in memory between arrival and delivery
# Bodies handed to the writers and not yet in place: past this a pass leaves the rest for the pass that follows
# the writes (a disk slower than the link would otherwise hold every body of a first mirror in memory).
_MAX_WRITING_BYTES = 64 * 1024 * 1024
_GROUP_BYTES = 16 * 1024 * 1024  # a group of deliveries goes to the writers at _DELIVER_EVERY files or this size
_WRITE_STREAMS = 8  # deliveries of a group written side by side (fsyncs in flight together), each in order
# From this many files a group goes to the write worker process (write_worker.py: one syncfs for the group, no GIL
# hand-offs in this process). A smaller one (the usual single delivery) is written here, an fsync per file, so it
# neither waits for a process to start nor for whatever else the file system has to write.
_WORKER_WRITES_MIN = 32


@dataclass
class PassReport:
    """What one bridge pass did, for the log line and ``crdtmail status``."""

    files_seen: int = 0
    added_to_replica: int = 0
    flags_to_replica: int = 0
    moves_to_replica: int = 0
    expunged_in_replica: int = 0
    delivered: int = 0
    renamed: int = 0
    moved_to_expunged_area: int = 0
    copies: int = 0
    folders_changed: int = 0
    waiting_for_bodies: int = 0
    waiting_for_the_disk: int = 0  # deliveries left for the next pass: the writers had enough in hand
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def changed(self) -> bool:
        """Whether the pass changed either side."""
        return any((self.added_to_replica, self.flags_to_replica, self.moves_to_replica, self.expunged_in_replica,
                    self.delivered, self.renamed, self.moved_to_expunged_area, self.folders_changed))

    def summary(self) -> str:
        """One log line's worth."""
        parts = [f"{value} {name.replace('_', ' ')}" for name, value in (
            ("added_to_replica", self.added_to_replica), ("flags_to_replica", self.flags_to_replica),
            ("moves_to_replica", self.moves_to_replica), ("expunged_in_replica", self.expunged_in_replica),
            ("delivered", self.delivered), ("renamed", self.renamed),
            ("moved_to_expunged_area", self.moved_to_expunged_area), ("copies", self.copies),
            ("folders_changed", self.folders_changed), ("waiting_for_bodies", self.waiting_for_bodies),
            ("waiting_for_the_disk", self.waiting_for_the_disk),
        ) if value]
        if self.problems:
            parts.append(f"{len(self.problems)} problems")
        return ", ".join(parts) or "no changes"


class _ExitHook:
    """Counts bridge steps; exits the process at step N when $CRDTMAIL_BRIDGE_EXIT_AT says so (crash tests)."""

    def __init__(self) -> None:
        value = os.environ.get(EXIT_AT_ENV, "")
        self.exit_at = int(value) if value.isdigit() else None
        self.count = 0

    def __call__(self, label: str) -> None:
        self.count += 1
        if self.exit_at is not None and self.count >= self.exit_at:
            log.warning("test hook: exiting at bridge step %d (%s)", self.count, label)
            logging.shutdown()
            os._exit(75)


class MaildirBridge:
    """Keeps one Maildir and one mailbox of a replica in step, both ways; see the module docstring."""

    def __init__(self, mailbox: Mailbox, root: Path, store: SqliteStore, *,
                 retention_days: float = DEFAULT_RETENTION_DAYS,
                 blob: Callable[[str], bytes | None] | None = None,
                 drop_blobs: Callable[[list[str]], None] | None = None,
                 stored_blobs: Callable[[list[str]], set[str]] | None = None) -> None:
        self.mailbox = mailbox
        self.root = root
        self._root_text = str(root)
        self.state = BridgeState(store, mailbox.name)
        self.retention_days = retention_days
        self._blob = blob or (lambda sha256: None)
        self._drop_blobs = drop_blobs or (lambda hashes: None)
        # Which bodies the blob store holds, asked for a whole delivery group at once; without it, each is fetched.
        self._stored_blobs = stored_blobs
        self._step = _ExitHook()
        self._applying = 0  # our own replica changes are not news to us (a depth: operations nest)
        self.dirty_messages: set[str] = set()
        self.dirty_folders = False
        self.waiting_bodies: dict[str, str] = {}  # body sha256 -> message id to deliver once it arrives
        # The other way round: an envelope never changes, so a waiting message's body hash need not be read from
        # its shard again when the body comes (nor at all when the change that added it brought its envelope).
        self._waiting_hash: dict[str, str] = {}
        self._arrived: dict[str, bytes] = {}  # bodies taken from peers, not yet written (see take_body)
        self._arrived_bytes = 0
        self._jobs: list[_DeliveryJob] = []
        self._in_flight: set[str] = set()  # messages whose delivery is being written
        self._writing_bytes = 0  # the bodies of self._jobs (see _MAX_WRITING_BYTES)
        self._write_worker: WriteWorker | None = None  # started by the first large group
        self._own_paths: set[str] = set()  # files this bridge delivered, whose watcher events are no news
        self._changed_in_flight: set[str] = set()
        self._from_store: set[str] = set()  # bodies being delivered that came from the blob store
        # A running peer lets deliveries be written while it goes on (it calls finish_deliveries when told);
        # a one-shot pass waits for them.
        self.background_writes = False
        self.on_background_done: Callable[[], None] | None = None
        self._listing_failed = False
        self._problem_files: set[tuple[str, int]] = set()  # (path, mtime) already reported, not reported again
        self.last_report: PassReport | None = None
        mailbox.observe(self.note_replica_change)

    # ------------------------------------------------------------------------------------------- plumbing

    def path(self, file: MaildirFile) -> Path:
        """The absolute path of a Maildir file."""
        return Path(self.path_text(file))

    def path_text(self, file: MaildirFile) -> str:
        """The absolute path of a Maildir file, as text (cheaper than a Path where many are made)."""
        return os.path.join(self._root_text, file.folder_dir, file.sub, file.name)

    @contextlib.contextmanager
    def _replica_ops(self) -> Iterator[None]:
        self._applying += 1
        try:
            with self.mailbox.batch(hold_transactions=True):
                yield
        finally:
            self._applying -= 1

    def note_replica_change(self, change: MailboxChange) -> None:
        """Observer of the replica: remember what a pass must write to the Maildir."""
        if self._applying and change.origin == LOCAL:
            return
        touched = change.added | change.changed | change.moved | change.expunged
        for message_id, envelope in change.envelopes.items():
            # The body hash comes with the change: the delivery need not load the shard to learn it.
            if envelope.body_sha256 and self.state.primary(message_id) is None:
                self._waiting_hash.setdefault(message_id, envelope.body_sha256)
        for message_id in change.expunged:
            sha256 = self._waiting_hash.pop(message_id, None)
            if sha256 is not None and self.waiting_bodies.get(sha256) == message_id:
                del self.waiting_bodies[sha256]
        if self._in_flight:
            self._changed_in_flight |= touched & self._in_flight
        self.dirty_messages |= touched
        if change.folders_changed:
            self.dirty_folders = True

    def has_body(self, sha256: str) -> bool:
        """Whether a body is in the Maildir (a BodySource for the peer)."""
        return sha256 in self.state.by_sha

    def read_body(self, sha256: str) -> bytes | None:
        """A body read from its Maildir file and verified against its hash; None when the file is gone or changed."""
        uid = self.state.by_sha.get(sha256)
        if uid is None:
            return None
        record = self.state.records[uid]
        result = read_message_file(str(self.path(record.file)))
        if not isinstance(result, bytes):
            self.dirty_messages.add(record.message_id)
            return None
        if sha256_hex(result) != sha256:  # on the event loop's thread: see crdtmail.digest
            log.warning("%s no longer matches the body of message %s; not serving it",
                        show_path(self.path(record.file)), record.message_id)
            return None
        return result

    def take_body(self, sha256: str, data: bytes) -> bool:
        """A body from a peer, already verified against its hash by the sync session, for a message waiting to be
        delivered: kept in memory (bounded) until the next pass writes it to the Maildir, instead of a round trip
        through the blob store. Lost with the process, it is simply fetched again."""
        if sha256 not in self.waiting_bodies or self._arrived_bytes + len(data) > _MAX_ARRIVED_BYTES:
            return False
        self._arrived[sha256] = data
        self._arrived_bytes += len(data)
        self.dirty_messages.add(self.waiting_bodies[sha256])
        return True

    def body_arrived(self, sha256: str) -> None:
        """A body reached the blob store: deliver the message waiting for it on the next pass."""
        message_id = self.waiting_bodies.get(sha256)
        if message_id is not None:
            self.dirty_messages.add(message_id)

    def close(self) -> None:
        """Wait for the deliveries being written, record them, and end the write worker (if one was started)."""
        try:
            self.finish_deliveries(wait=True)
        finally:
            if self._write_worker is not None:
                self._write_worker.close()
                self._write_worker = None

    def pending(self) -> bool:
        """Whether replica changes wait to be written to the Maildir (or written deliveries to be recorded)."""
        return bool(self.dirty_messages or self.dirty_folders or (self._jobs and self._jobs[0].done.done()))

    # ---------------------------------------------------------------------------------------------- scanning

    def folder_dirs(self) -> list[str]:
        """The Maildir++ folder directories on disk ("" for the root), with cur/ and new/ inside."""
        found = [ROOT_DIR]
        try:
            with os.scandir(self.root) as listing:
                for entry in listing:
                    if entry.name.startswith(".") and entry.name not in (".", "..") and _is_maildir(entry.path):
                        found.append(entry.name)
        except OSError as exc:
            raise CrdtmailError(f"cannot read the Maildir {self.root}: {exc.strerror or exc}; check the path") from exc
        return sorted(found)

    def list_files(self, folder_dir: str) -> list[MaildirFile]:
        """Every message file of one folder directory, new/ listed before cur/."""
        files: list[MaildirFile] = []
        for sub in SUBDIRS:
            try:
                with os.scandir(self.root / folder_dir / sub) as listing:
                    files.extend(MaildirFile(folder_dir, sub, entry.name) for entry in listing
                                 if not entry.name.startswith("."))
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._listing_failed = True
                self._problem(f"{show_path(self.root / folder_dir / sub)}: cannot list it: {exc.strerror or exc}")
        return files

    def file_at(self, path: str) -> MaildirFile | None:
        """The MaildirFile for an absolute path inside the Maildir, or None for a path that is not a message."""
        try:
            relative = Path(path).relative_to(self.root)
        except ValueError:
            return None
        parts = relative.parts
        if len(parts) == 2 and parts[0] in SUBDIRS:
            folder_dir, sub, name = ROOT_DIR, parts[0], parts[1]
        elif len(parts) == 3 and parts[0].startswith(".") and parts[1] in SUBDIRS:
            folder_dir, sub, name = parts
        else:
            return None
        if name.startswith("."):
            return None
        return MaildirFile(folder_dir, sub, name)

    # ---------------------------------------------------------------------------------------------- passes

    def recover(self) -> None:
        """Finish the file operations a stopped process had begun (the journal), before anything else."""
        for entry_id, entry in self.state.open_journal():
            op = entry.get("op")
            source = self.root / path_from_journal(entry["from"])
            target = self.root / path_from_journal(entry["to"])
            if op in ("rename", "expunge") and source.exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)
            elif op == "deliver" and source.exists() and not target.exists():
                result = read_message_file(str(source))
                if isinstance(result, bytes) and hashlib.sha256(result).hexdigest() == entry.get("sha256"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    place_file(str(source), str(target))
                else:  # our own half-written copy; the body is still in the blob store
                    self._to_expunged_area(source, "a delivery cut short")
            elif op == "deliver" and source.exists() and _same_file(source, target):
                os.unlink(source)  # linked into place, stopped before its tmp/ name was removed: one file, two names
            log.info("bridge %s: finished an interrupted %s of %s", self.mailbox.name, op, show_path(target))
            # The state is brought up to date by the pass that follows, from what is on disk now.
            self.state.save(done_journal=entry_id)

    def full_pass(self, *, compare_replica: bool = True) -> PassReport:
        """Compare the whole Maildir, the replica and the state; write each side's changes to the other.

        ``compare_replica=False`` (the periodic rescan of a running peer, whose observer already tracks every
        replica change) compares only the Maildir's names with the state: listings and names, no replica rows
        beyond those of the files that changed.
        """
        started = time.perf_counter()
        report = PassReport()
        self.finish_deliveries(wait=True)  # before recover(): its journal entries are not leftovers
        self.recover()
        vanished_dirs = self._sync_folders(self.folder_dirs(), report)
        seen: dict[str, MaildirFile] = {}
        self._listing_failed = False
        for folder_dir in self.folder_dirs():  # again: the folder step may have renamed directories
            for file in self.list_files(folder_dir):
                seen.setdefault(file.uid, file)
        report.files_seen = len(seen)
        dirty = set(self.dirty_messages)
        self.dirty_messages.clear()
        records = self.state.records
        if compare_replica:
            rows = {row.message_id: row for row in self.mailbox.index_rows()}
        else:
            changed = {uid for uid, file in seen.items() if uid in records and records[uid].file != file}
            gone = {uid for uid in records if uid not in seen}
            dirty |= {records[uid].message_id for uid in changed | gone}
            seen_known = {uid: file for uid, file in seen.items()
                          if uid not in records or uid in changed or records[uid].message_id in dirty}
            rows = self.mailbox.rows(dirty)
        # A directory that could not be listed must not make its files look removed.
        self._reconcile_files(seen, rows, report, complete=not self._listing_failed,
                              only=None if compare_replica else seen_known)
        self.finish_deliveries(wait=True)
        missing = [row for message_id, row in rows.items() if self.state.primary(message_id) is None]
        self._deliver(missing, report)
        self._finish_folders(vanished_dirs, report)
        self._purge_expunged_area()
        report.seconds = time.perf_counter() - started
        self.last_report = report
        self.state.set_meta({"maildir": str(self.root), "last_full_pass": time.time(),
                             "files": len(self.state.records), "waiting_for_bodies": len(self.waiting_bodies),
                             "last_pass": report.summary()})
        return report

    def quick_pass(self, paths: Iterable[str] = (), *, folders_changed: bool = False) -> tuple[PassReport, bool]:
        """Handle the files named by watcher events and the replica's recent changes.

        Returns the report and whether a full pass is needed to confirm that some file is really gone (a file can
        vanish from one listing on its way to another folder, so a missing file is never expunged on one look).
        """
        started = time.perf_counter()
        report = PassReport()
        needs_full = False
        if self.dirty_folders or folders_changed:
            self.dirty_folders = False
            vanished = self._sync_folders(self.folder_dirs(), report)
            self._finish_folders(vanished, report)
        seen: dict[str, MaildirFile] = {}
        missing: list[MaildirFile] = []
        if len(self._own_paths) > 100_000:
            self._own_paths.clear()
        for path in paths:
            own = path in self._own_paths
            if own:
                self._own_paths.discard(path)
            file = self.file_at(path)
            if file is None:
                continue
            if os.path.lexists(self.path_text(file)):
                if not own:  # a file this bridge delivered, still where it was put: no news
                    seen[file.uid] = file
            elif own:
                # A file this bridge delivered and another program removed or renamed at once (both events in one
                # batch): its state may not be recorded yet, so only a full pass can tell where it went.
                needs_full = True
            else:
                missing.append(file)
        for file in missing:
            # The old name of a rename is missing and its new name is seen; only a file gone from every name it
            # had is looked for by a full pass.
            record = self.state.records.get(file.uid)
            if file.uid not in seen and record is not None and not os.path.lexists(self.path_text(record.file)):
                needs_full = True
        dirty = set(self.dirty_messages) - self._in_flight
        self.dirty_messages.clear()
        for uid in seen:
            record = self.state.records.get(uid)
            if record is not None:
                dirty.add(record.message_id)
        # Files of dirty messages that no event named are where the state says, or the full pass finds them.
        for message_id in dirty:
            for uid in self.state.by_message.get(message_id, ()):
                if uid not in seen:
                    file = self.state.records[uid].file
                    if os.path.lexists(self.path(file)):
                        seen[uid] = file
                    else:
                        needs_full = True
        rows = self.mailbox.rows(dirty | {self.state.records[u].message_id for u in seen if u in self.state.records})
        report.files_seen = len(seen)
        self._reconcile_files(seen, rows, report, complete=False)
        self.finish_deliveries()
        undelivered = [row for message_id, row in rows.items()
                       if message_id not in self._in_flight and self.state.primary(message_id) is None]
        self._deliver(undelivered, report)
        report.seconds = time.perf_counter() - started
        self.last_report = report
        return report, needs_full

    # ---------------------------------------------------------------------------------------------- folders

    def _folder_for_dir(self, folder_dir: str) -> str:
        folder_id = self.state.folders.get(folder_dir)
        if folder_id is not None:
            return folder_id
        path = folder_path_for_dir(folder_dir)
        role = "inbox" if folder_dir == ROOT_DIR else ROLE_ALIASES.get(path.lower()) if "/" not in path else None
        with self._replica_ops():
            folder_id = self.mailbox.role_folder(role) if role else self.mailbox.create_folder(path).id
        self.state.save(folders={folder_dir: folder_id})
        return folder_id

    def _make_folder_dir(self, folder_dir: str) -> None:
        for sub in FOLDER_SUBDIRS:
            (self.root / folder_dir / sub).mkdir(parents=True, exist_ok=True)

    def _dir_for_folder(self, folder_id: str) -> str:
        for folder_dir, mapped in self.state.folders.items():
            if mapped == folder_id:
                return folder_dir
        if folder_id == INBOX:
            return ROOT_DIR
        try:
            folder = self.mailbox.folder(folder_id)
        except ModelError:
            folder = self.mailbox.folder(self.mailbox.role_folder("trash"))
        folder_dir = folder_dir_for_path(folder.path)
        self._make_folder_dir(folder_dir)
        self.state.save(folders={folder_dir: folder.id})
        log.info("bridge %s: created folder directory %s for %s", self.mailbox.name, folder_dir, folder.path)
        return folder_dir

    def _sync_folders(self, dirs: list[str], report: PassReport) -> list[str]:
        """Map folder directories and folders both ways; returns directories that vanished (handled after files)."""
        on_disk = set(dirs)
        live = {folder.id: folder for folder in self.mailbox.folders()}
        new_dirs = [d for d in dirs if d not in self.state.folders]
        vanished = [d for d in self.state.folders if d not in on_disk]
        # A directory another program renamed: a new directory holding files the state knows in a vanished one.
        for old_dir in list(vanished):
            known = {uid for uid, r in self.state.records.items() if r.file.folder_dir == old_dir}
            for new_dir in new_dirs:
                if known and any(f.uid in known for f in self.list_files(new_dir)):
                    folder_id = self.state.folders[old_dir]
                    if folder_id in live and live[folder_id].role is None:
                        with self._replica_ops():
                            self.mailbox.rename_folder(folder_id, folder_path_for_dir(new_dir))
                    self._move_records_dir(old_dir, new_dir)
                    self.state.save(folders={old_dir: None, new_dir: folder_id})
                    vanished.remove(old_dir)
                    new_dirs.remove(new_dir)
                    report.folders_changed += 1
                    log.info("bridge %s: folder directory %s was renamed to %s", self.mailbox.name, old_dir, new_dir)
                    break
        for new_dir in new_dirs:
            self._folder_for_dir(new_dir)
        live = {folder.id: folder for folder in self.mailbox.folders()}
        for folder_dir, folder_id in list(self.state.folders.items()):
            folder = live.get(folder_id)
            if folder is None or folder.role is not None or folder_dir in vanished:
                continue
            if folder_path_for_dir(folder_dir) == folder.path:
                continue
            wanted = folder_dir_for_path(folder.path)
            if wanted != folder_dir and not (self.root / wanted).exists():
                # Renamed in the replica (here or on another device): rename the directory to match.
                os.rename(self.root / folder_dir, self.root / wanted)
                self._move_records_dir(folder_dir, wanted)
                self.state.save(folders={folder_dir: None, wanted: folder_id})
                report.folders_changed += 1
                log.info("bridge %s: renamed folder directory %s to %s", self.mailbox.name, folder_dir, wanted)
        mapped = set(self.state.folders.values())
        for folder in live.values():
            if folder.id not in mapped:
                self._dir_for_folder(folder.id)
                report.folders_changed += 1
        return vanished

    def _move_records_dir(self, old_dir: str, new_dir: str) -> None:
        moved = [replace(r, file=MaildirFile(new_dir, r.file.sub, r.file.name))
                 for r in self.state.records.values() if r.file.folder_dir == old_dir]
        self.state.save(put=moved)

    def _finish_folders(self, vanished: list[str], report: PassReport) -> None:
        """After the files: delete in the replica the folders whose directory is gone, and remove the empty
        directories of folders the replica deleted."""
        live = {folder.id: folder for folder in self.mailbox.folders()}
        for folder_dir in vanished:
            if os.path.isdir(self.root / folder_dir):
                # Made again by a delivery of this pass: its folder got mail meanwhile (an empty directory renamed
                # by another program looks like one removed and another created), so the folder stays.
                log.info("bridge %s: folder directory %s was gone but mail for it arrived; it is back",
                         self.mailbox.name, folder_dir)
                continue
            folder_id = self.state.folders[folder_dir]
            folder = live.get(folder_id)
            if folder is not None and folder.role is None:
                with contextlib.suppress(ModelError), self._replica_ops():
                    self.mailbox.delete_folder(folder_id, move_to_trash=True)
                    report.folders_changed += 1
                    log.info("bridge %s: folder directory %s is gone; deleted folder %s", self.mailbox.name,
                             folder_dir, folder.path)
            self.state.save(folders={folder_dir: None})
        for folder_dir, folder_id in list(self.state.folders.items()):
            if folder_id in live or folder_dir == ROOT_DIR:
                continue
            if any(r.file.folder_dir == folder_dir for r in self.state.records.values()):
                continue  # its files move to the trash first
            directory = self.root / folder_dir
            leftovers = [p for sub in FOLDER_SUBDIRS for p in _entries(directory / sub)]
            if leftovers:
                log.warning("bridge %s: folder %s was deleted but %s still holds %d files; keeping it",
                            self.mailbox.name, folder_dir, show_path(directory), len(leftovers))
            else:
                for sub in FOLDER_SUBDIRS:
                    with contextlib.suppress(OSError):
                        (directory / sub).rmdir()
                with contextlib.suppress(OSError):
                    directory.rmdir()
                log.info("bridge %s: removed the empty directory of deleted folder %s", self.mailbox.name, folder_dir)
            self.state.save(folders={folder_dir: None})
            report.folders_changed += 1

    # ------------------------------------------------------------------------------------------------ files

    def _reconcile_files(self, seen: dict[str, MaildirFile], rows: dict[str, IndexRow], report: PassReport, *,
                         complete: bool, only: dict[str, MaildirFile] | None = None) -> None:
        """Three-way compare every seen file (or those in ``only``: the rest are known unchanged), and, when the
        listing is ``complete``, every vanished one."""
        state = self.state
        candidates = seen if only is None else only
        known = [(state.records[uid], file) for uid, file in candidates.items() if uid in state.records]
        new_files = [file for uid, file in candidates.items() if uid not in state.records]
        with self._replica_ops():
            for record, file in known:
                if record.uid not in state.records:
                    continue
                record = state.records[record.uid]
                if record.is_primary:
                    self._reconcile(record, file, rows.get(record.message_id), report)
                elif record.file != file:
                    state.save(put=[replace(record, file=file)])
            if new_files:
                self._take_new_files(new_files, seen, rows, report, rows_complete=complete and only is None)
            if complete:
                gone = [record for uid, record in list(state.records.items()) if uid not in seen]
                for record in gone:
                    if record.uid in state.records:
                        self._vanished(state.records[record.uid], seen, rows, report)

    def _take_new_files(self, files: list[MaildirFile], seen: dict[str, MaildirFile], rows: dict[str, IndexRow],
                        report: PassReport, *, rows_complete: bool) -> None:
        """Read files the state does not know: a new message, a copy, a move by another program, or a file
        this bridge had delivered before a crash."""
        pending: dict[str, FileRecord] = {}  # by uid, added to the replica and not yet in the state
        taken: dict[str, str] = {}  # message id -> uid of its pending primary
        for file, parsed in _parsed_files(self, files):
            if isinstance(parsed, str):
                self._problem(f"{show_path(self.path(file))}: {parsed}", file)
                continue
            message_id = parsed.message_id
            if message_id in taken:
                report.copies += 1
                log.info("bridge %s: %s is another copy of message %s; it stays one message", self.mailbox.name,
                         show_path(self.path(file)), message_id)
                pending[file.uid] = FileRecord(file.uid, message_id, self._folder_for_dir(file.folder_dir), file,
                                               file.letters, parsed.envelope.body_sha256, is_primary=False)
                continue
            record = self._take_new_file(file, parsed, seen, rows, report, rows_complete=rows_complete)
            if record is not None:
                pending[file.uid] = record
                if record.is_primary:
                    taken[message_id] = file.uid
            if len(pending) >= _COMMIT_EVERY:
                self._save_taken(pending, taken)
        self._save_taken(pending, taken)

    def _save_taken(self, pending: dict[str, FileRecord], taken: dict[str, str]) -> None:
        if not pending:
            return
        self.mailbox.flush()
        self._step("replica commit of new files")
        self.state.save(put=pending.values())
        self._step("state of new files")
        pending.clear()
        taken.clear()

    def _take_new_file(self, file: MaildirFile, parsed: ParsedMessage, seen: dict[str, MaildirFile],
                       rows: dict[str, IndexRow], report: PassReport, *, rows_complete: bool) -> FileRecord | None:
        state = self.state
        message_id = parsed.message_id
        sha256 = parsed.envelope.body_sha256
        folder_id = self._folder_for_dir(file.folder_dir)
        row = rows.get(message_id)
        if row is None and not rows_complete:
            row = self._row(message_id)
        primary = state.primary(message_id)
        if primary is not None:
            if primary.uid not in seen and not os.path.lexists(self.path(primary.file)):
                # The old file is gone and this one holds the same message: another program moved it.
                state.save(put=[replace(primary, uid=file.uid, file=file)], delete=[primary.uid])
                self._reconcile(state.records[file.uid], file, row, report)
                return None
            report.copies += 1
            log.info("bridge %s: %s is another copy of message %s (%s); it stays one message", self.mailbox.name,
                     show_path(self.path(file)), message_id, show_path(self.path(primary.file)))
            return FileRecord(file.uid, message_id, folder_id, file, file.letters, sha256, is_primary=False)
        if row is not None:
            # The replica has it and no file was recorded for it: a first mirror of an existing replica, or our
            # own delivery cut short by a crash. What the file says differs from the replica as a local change.
            record = FileRecord(file.uid, message_id, row.folder_id, file, letters_for_flags(row.flags), sha256)
            state.save(put=[record])
            self._reconcile(record, file, row, report)
            return None
        # A device may have deleted the directory's folder since the last pass: the message then goes where the
        # replica shows whatever is placed in a deleted folder, the trash, and its file follows at the next pass.
        placed = self.mailbox.effective_folder(folder_id)
        try:
            result = self.mailbox.add(parsed, folder=placed, flags=flags_for_letters(file.letters), keep_body=False)
        except ExpungedMessageError:
            self._to_expunged_area(self.path(file), f"message {message_id} was expunged on a device")
            report.moved_to_expunged_area += 1
            return None
        if result.added:
            report.added_to_replica += 1
        if placed != folder_id:
            log.info("bridge %s: %s is in the directory of a deleted folder; message %s is in the trash",
                     self.mailbox.name, show_path(self.path(file)), message_id)
            self.dirty_messages.add(message_id)
        return FileRecord(file.uid, message_id, folder_id, file, file.letters, sha256)

    def _row(self, message_id: str) -> IndexRow | None:
        return self.mailbox.rows([message_id]).get(message_id)

    def _reconcile(self, record: FileRecord, file: MaildirFile, row: IndexRow | None, report: PassReport) -> None:
        """One message: Maildir changes since the last sync go to the replica, then the replica's state to the file."""
        message_id = record.message_id
        if row is None:
            # Expunged in the replica (tombstones win over a concurrent flag or move in the Maildir).
            for copy in [record, *self.state.copies(message_id)]:
                current = file if copy.uid == record.uid else copy.file
                self._expunge_file(copy, current, report)
            return
        if (file == record.file and row.folder_id == record.folder_id == self.state.folders.get(file.folder_dir)
                and file.letters == record.letters == letters_for_flags(row.flags)):
            return  # nothing changed on either side since the last sync
        flags = set(row.flags)
        changed_replica = False
        if file.letters != record.letters:
            add = flags_for_letters("".join(set(file.letters) - set(record.letters)))
            remove = flags_for_letters("".join(set(record.letters) - set(file.letters)))
            if self.mailbox.set_flags(message_id, add, remove):
                report.flags_to_replica += 1
                changed_replica = True
            flags = (flags | add) - remove
        target_folder = row.folder_id
        file_folder = self._folder_for_dir(file.folder_dir)
        if file_folder != record.folder_id:
            # Moved in the Maildir since the last sync: that move is the newest word on the message's folder. Into
            # the directory of a folder a device has deleted since, it is a move to the trash (as in the replica).
            file_folder = self.mailbox.effective_folder(file_folder)
            if file_folder != row.folder_id:
                self.mailbox.move(message_id, file_folder)
                report.moves_to_replica += 1
                changed_replica = True
            target_folder = file_folder
        if changed_replica:
            self.mailbox.flush()
            self._step("replica commit of a file's change")
        letters = letters_for_flags(flags)
        target = renamed(file, self._dir_for_folder(target_folder), letters)
        if target != file:
            if not self._rename(record, file, target, report):
                return
            file = target
        updated = replace(record, folder_id=target_folder, file=file, letters=letters)
        if updated != self.state.records.get(record.uid):
            self.state.save(put=[updated])
            self._step("state after reconcile")

    def _rename(self, record: FileRecord, file: MaildirFile, target: MaildirFile, report: PassReport) -> bool:
        source, destination = self.path(file), self.path(target)
        if os.path.lexists(destination):
            self._problem(f"{show_path(destination)} exists already; not renaming {show_path(source)} over it")
            return False
        entry = self.state.journal({"op": "rename", "from": journal_path(file.relative()),
                                    "to": journal_path(target.relative())})
        self._step("journal before rename")
        try:
            os.rename(source, destination)
        except FileNotFoundError:
            # Another program renamed or moved the file in the meantime: the next pass finds its new name.
            self.state.save(done_journal=entry)
            self.dirty_messages.add(record.message_id)
            log.info("bridge %s: %s moved under us; looking for it again", self.mailbox.name, show_path(source))
            return False
        self._step("rename")
        self.state.save(put=[replace(record, file=target)], done_journal=entry)
        self._step("state after rename")
        report.renamed += 1
        return True

    def _expunge_file(self, record: FileRecord, file: MaildirFile, report: PassReport) -> None:
        source = self.path(file)
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        target = self.root / EXPUNGED_AREA / day / (file.folder_dir or "INBOX") / file.name
        entry = self.state.journal({"op": "expunge", "from": journal_path(file.relative()),
                                    "to": journal_path(str(target.relative_to(self.root)))})
        self._step("journal before expunge")
        if os.path.lexists(source):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(source, target)
            except FileNotFoundError:
                self.state.save(done_journal=entry)
                self.dirty_messages.add(record.message_id)
                return
            log.info("bridge %s: message %s was expunged; its file is kept in %s for %g days", self.mailbox.name,
                     record.message_id, show_path(target), self.retention_days)
            report.moved_to_expunged_area += 1
        self._step("expunge rename")
        self.state.save(delete=[record.uid], done_journal=entry)
        self._step("state after expunge")

    def _vanished(self, record: FileRecord, seen: dict[str, MaildirFile], rows: dict[str, IndexRow],
                  report: PassReport) -> None:
        """A known file is in no listing: another program removed it (or moved it outside the Maildir)."""
        if os.path.lexists(self.path(record.file)):
            return  # listed before it arrived there; the next pass sees it
        if not record.is_primary:
            self.state.save(delete=[record.uid])
            return
        for copy in self.state.copies(record.message_id):
            if copy.uid in seen:
                # Another copy lives on (a move done as copy-then-delete): it becomes the message's file.
                promoted = replace(copy, is_primary=True, folder_id=record.folder_id, letters=record.letters)
                self.state.save(put=[promoted], delete=[record.uid])
                self._reconcile(promoted, seen[copy.uid], rows.get(record.message_id), report)
                return
        if record.message_id in rows:
            self.mailbox.expunge(record.message_id)
            report.expunged_in_replica += 1
            log.info("bridge %s: %s was removed from the Maildir; message %s expunged", self.mailbox.name,
                     show_path(self.path(record.file)), record.message_id)
        self.mailbox.flush()
        self._step("replica expunge")
        self.state.save(delete=[record.uid])
        self._step("state after vanish")

    # ------------------------------------------------------------------------------------------- deliveries

    def _deliver(self, rows: list[IndexRow], report: PassReport) -> None:
        """Write messages new to this desktop into the Maildir: tmp/, fsync, rename into new/ or cur/.

        Deliveries go in groups: one journal transaction, the files, one directory fsync per folder, one state
        transaction; the bodies then leave the blob store, as the Maildir holds them now.
        """
        ready: list[tuple[IndexRow, str, bytes]] = []
        hashes: list[tuple[IndexRow, str]] = []
        for row in rows:
            known = self._waiting_hash.get(row.message_id)
            if known is not None:
                hashes.append((row, known))
                continue
            envelope = self.mailbox.envelope_in(row.message_id, row.shard)
            if envelope is not None:
                hashes.append((row, envelope.body_sha256))
        stored = None
        if self._stored_blobs is not None:
            # One look-up for the bodies that did not come straight from a peer, not one per message (most of
            # a first mirror's messages wait for bodies that are nowhere yet).
            stored = self._stored_blobs([sha256 for _, sha256 in hashes if sha256 and sha256 not in self._arrived])
        ready_bytes = 0
        for index, (row, sha256) in enumerate(hashes):
            if self._writing_bytes + ready_bytes >= _MAX_WRITING_BYTES:
                self.finish_deliveries()
                if self._writing_bytes + ready_bytes >= _MAX_WRITING_BYTES:
                    # The writers are behind: the rest waits (its bodies where they are) for the pass that
                    # follows their writes (on_background_done).
                    deferred = [later.message_id for later, _ in hashes[index:]]
                    self.dirty_messages.update(deferred)
                    report.waiting_for_the_disk += len(deferred)
                    break
            body = self._arrived.pop(sha256, None)
            if body is not None:
                self._arrived_bytes -= len(body)
            elif sha256 and (stored is None or sha256 in stored):
                body = self._blob(sha256)
                if body is not None:
                    self._from_store.add(sha256)
            if body is None:
                self.waiting_bodies[sha256] = row.message_id
                self._waiting_hash[row.message_id] = sha256
                report.waiting_for_bodies += 1
                continue
            self.waiting_bodies.pop(sha256, None)
            self._waiting_hash.pop(row.message_id, None)
            ready.append((row, sha256, body))
            ready_bytes += len(body)
            if len(ready) >= _DELIVER_EVERY or ready_bytes >= _GROUP_BYTES:
                self._deliver_group(ready, report)
                ready = []
                ready_bytes = 0
        if ready:
            self._deliver_group(ready, report)

    def _deliver_group(self, group: list[tuple[IndexRow, str, bytes]], report: PassReport) -> None:
        planned: list[_Planned] = []
        for row, sha256, body in group:
            folder_dir = self._dir_for_folder(row.folder_id)
            letters = letters_for_flags(row.flags)
            unique = new_unique_name()
            final = MaildirFile(folder_dir, "cur", f"{unique}:2,{letters}") if letters else MaildirFile(
                folder_dir, "new", unique)
            planned.append(_Planned(row, sha256, body, os.path.join(folder_dir, "tmp", unique), final, letters))
        entries = self.state.journal_many([
            {"op": "deliver", "from": journal_path(p.temporary), "to": journal_path(p.final.relative()),
             "sha256": p.sha256} for p in planned])
        self._step("journal before delivery")
        for folder_dir in {p.final.folder_dir for p in planned}:
            # All of it: another program may have removed or renamed the directory since the last pass.
            self._make_folder_dir(folder_dir)
        # fsync waits on the disk, not the CPU: several in flight let the file system commit them together, and
        # a running peer goes on receiving while they are written (see finish_deliveries). A task per stream of
        # files rather than per file: a future and a thread hand-off per file cost the event loop's thread more
        # than the writing does.
        files = [(os.path.join(self._root_text, p.temporary), self.path_text(p.final), p.body) for p in planned]
        directories = {os.path.dirname(self.path_text(p.final)) for p in planned}
        if len(files) >= _WORKER_WRITES_MIN:
            if self._write_worker is None:
                self._write_worker = WriteWorker()
            done = self._write_worker.submit(files, directories)
        else:
            writes = [_writers().submit(_deliver_files, files[start::_WRITE_STREAMS])
                      for start in range(min(_WRITE_STREAMS, len(files)))]
            # The directory fsyncs run on a writer thread too, once every file of the group is in place.
            done = _writers().submit(_settle_group, writes, directories)
        job = _DeliveryJob(planned, entries, done, sum(len(p.body) for p in planned))
        self._writing_bytes += job.size
        for item in planned:
            self._in_flight.add(item.row.message_id)
            self._own_paths.add(self.path_text(item.final))
        self._jobs.append(job)
        if self.on_background_done is not None:
            job.done.add_done_callback(lambda _future: self.on_background_done() if self.on_background_done
                                       else None)
        report.delivered += len(planned)
        if not self.background_writes:
            self.finish_deliveries(wait=True)

    def finish_deliveries(self, *, wait: bool = False) -> int:
        """Move written deliveries into place and record them; returns how many. With ``wait``, waits for every
        delivery still being written (a pass of a one-shot run ends with none in flight)."""
        done = 0
        while self._jobs:
            job = self._jobs[0]
            if not wait and not job.done.done():
                break
            self._jobs.pop(0)
            self._writing_bytes -= job.size
            try:
                job.done.result()
            except BaseException:
                # Its journal entries stay open: the next full pass (recover) finishes or sets aside each file.
                for item in job.planned:
                    self._in_flight.discard(item.row.message_id)
                raise
            self._step("delivery written and put in place")
            self.state.save(put=[FileRecord(p.final.uid, p.row.message_id, p.row.folder_id, p.final, p.letters,
                                            p.sha256) for p in job.planned], done_journal=job.entries)
            self._step("state after delivery")
            stored = [p.sha256 for p in job.planned if p.sha256 in self._from_store]
            if stored:  # bodies that went through the blob store leave it, now that the Maildir holds them
                self._drop_blobs(stored)
                self._from_store.difference_update(stored)
            for item in job.planned:
                message_id = item.row.message_id
                self._in_flight.discard(message_id)
                if message_id in self._changed_in_flight:
                    # A change that came while the file was being written is applied by the next pass.
                    self._changed_in_flight.discard(message_id)
                    self.dirty_messages.add(message_id)
            done += len(job.planned)
        return done

    # --------------------------------------------------------------------------------------- expunged area

    def _to_expunged_area(self, source: Path, why: str) -> None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        target = self.root / EXPUNGED_AREA / day / "kept" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        counter = 1
        while target.exists():
            counter += 1
            target = target.with_name(f"{source.name}.{counter}")
        os.rename(source, target)
        log.info("bridge %s: moved %s to %s: %s", self.mailbox.name, show_path(source), show_path(target), why)

    def _purge_expunged_area(self) -> None:
        """Remove the days of the expunged area older than the retention period, the one deletion the user
        configured; everything younger stays recoverable."""
        area = self.root / EXPUNGED_AREA
        if not area.is_dir():
            return
        oldest = dt.datetime.now(dt.UTC) - dt.timedelta(days=self.retention_days)
        for day_dir in _entries(area):
            try:
                day = dt.datetime.strptime(day_dir.name, "%Y-%m-%d").replace(tzinfo=dt.UTC)
            except ValueError:
                continue
            if day + dt.timedelta(days=1) < oldest:
                shutil.rmtree(day_dir, ignore_errors=True)
                log.info("bridge %s: retention of %g days passed: removed %s", self.mailbox.name,
                         self.retention_days, show_path(day_dir))

    def _problem(self, text: str, file: MaildirFile | None = None) -> None:
        if file is not None:
            try:
                key = (str(self.path(file)), os.lstat(self.path(file)).st_mtime_ns)
            except OSError:
                key = (str(self.path(file)), 0)
            if key in self._problem_files:
                return
            self._problem_files.add(key)
        log.warning("bridge %s: %s; left as it is", self.mailbox.name, text)
        if self.last_report is not None:
            self.last_report.problems.append(text)


@dataclass(frozen=True, slots=True)
class _Planned:
    """One delivery: the message, its body, where it is written and where it goes."""

    row: IndexRow
    sha256: str
    body: bytes
    temporary: str  # relative to the Maildir root
    final: MaildirFile
    letters: str


@dataclass
class _DeliveryJob:
    """A group of deliveries being written by the writer threads."""

    planned: list[_Planned]
    entries: list[int]
    done: concurrent.futures.Future[None]  # every file written, fsynced and renamed, and the directories fsynced
    size: int  # bytes of the bodies


def _parsed_files(bridge: MaildirBridge, files: list[MaildirFile]) -> Iterator[tuple[MaildirFile, ParsedMessage | str]]:
    """Each file parsed, in order. Many files (a first mirror) are read and parsed by a worker process on the
    other core while this one adds them to the replica; a few are read here, where no hand-off costs more."""
    paths = [bridge.path_text(file) for file in files]
    if len(files) < _WORKER_THRESHOLD:
        for file, path in zip(files, paths, strict=True):
            yield file, read_and_parse(path)
        return
    worker = subprocess.Popen([sys.executable, "-m", "crdtmail.bridges.parse_worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    feed_error: list[BaseException] = []

    def feed() -> None:
        assert worker.stdin is not None
        try:
            for start in range(0, len(paths), _WORKER_CHUNK):
                worker.stdin.write(b"".join(orjson.dumps(os.fsencode(path).decode("latin-1")) + b"\n"
                                            for path in paths[start : start + _WORKER_CHUNK]))
            worker.stdin.close()
        except (OSError, ValueError) as exc:  # the worker died: reported below
            feed_error.append(exc)

    feeder = threading.Thread(target=feed, name="crdtmail-bridge-feeder", daemon=True)
    feeder.start()
    try:
        for file in files:
            line = worker.stdout.readline()
            if not line:
                raise CrdtmailError(f"the bridge's parser process stopped early (exit {worker.poll()}); "
                                    "the next pass retries")
            result = orjson.loads(line)
            if "error" in result:
                yield file, str(result["error"])
            else:
                yield file, ParsedMessage(result["id"], result["shard"], Envelope.from_crdt(result["envelope"]), b"")
    finally:
        worker.stdout.close()
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        feeder.join(5)


_writer_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _writers() -> concurrent.futures.ThreadPoolExecutor:
    global _writer_pool
    if _writer_pool is None:
        _writer_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="crdtmail-deliver")
    return _writer_pool


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def _is_maildir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "cur")) and os.path.isdir(os.path.join(path, "new"))


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _deliver_files(files: list[tuple[str, str, bytes]]) -> None:
    """Write each delivery to tmp/, fsync it, put it in place, one after the other (on a writer thread)."""
    for temporary, final, data in files:
        write_file(temporary, data, sync=True)
        place_file(temporary, final)


def _settle_group(writes: list[concurrent.futures.Future[None]], directories: set[str]) -> None:
    """Wait for a group's files, then fsync the directories they were put in (on a writer thread)."""
    for future in writes:
        future.result()
    for directory in directories:
        fsync_directory(directory)


def describe(bridge: MaildirBridge) -> dict[str, Any]:
    """What ``crdtmail status`` shows of a running bridge."""
    report = bridge.last_report
    return {
        "maildir": str(bridge.root),
        "files": len(bridge.state.records),
        "waiting_for_bodies": len(bridge.waiting_bodies),
        "last_pass": report.summary() if report else None,
    }

