"""The Mailbox: one account's mail as pycrdt documents, with typed operations and change events.

Documents (DESIGN.md, "Data model"):

- ``index``: root maps ``meta`` (schema version, mailbox name) and ``folders`` (folder id -> plain dict
  ``{"name", "parent", "role", "deleted"}``). The standard folders (ids ``inbox``, ``sent``, ...) are there
  without an entry until one of them is changed.
- one shard per month (``"2026-11"``, or ``"undated"``): root maps ``messages`` (id -> envelope, a JSON string:
  see ``Envelope.to_crdt``; the first stores held objects, still read),
  ``placement`` (id -> folder id), ``flags`` (``"<id>/<flag>"`` -> bool) and ``expunged`` (id -> True, the
  tombstone that keeps a rescan or re-import from bringing an expunged message back).

A message is visible while its envelope is in ``messages``. Every change happens inside one transaction on one
document, so a move or a flag change is atomic and never crosses documents.

The Mailbox does no I/O of its own: it loads documents from, and commits every change to, a ``MailboxBackend``.
A local operation returns only after the backend committed it (contract 7); ``batch()`` groups many operations
into one commit for imports.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from pycrdt import Doc, Map, MapEvent, Subscription, Transaction, TransactionEvent, get_state, get_update, merge_updates

from crdtmail.errors import (
    AmbiguousMessageError,
    CorruptStoreError,
    ExpungedMessageError,
    FolderExistsError,
    FolderNotEmptyError,
    ModelError,
    StorageError,
    UnknownFolderError,
    UnknownMessageError,
)
from crdtmail.model.backend import CommitBatch, DocumentUpdate, FolderCount, IndexRow, MailboxBackend
from crdtmail.model.causal import check_update, decode_state_vector, missing_dependencies
from crdtmail.model.flags import normalise_flag
from crdtmail.model.message import UNDATED, Envelope, ParsedMessage, parse_message

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)
INDEX_DOC = "index"
LOCAL = "local"
"""Transaction origin of changes made on this replica; remote updates carry their connection as origin."""

ROLES: tuple[str, ...] = ("inbox", "sent", "drafts", "trash", "junk", "archive")
_STANDARD_FOLDERS: dict[str, str] = {
    "inbox": "INBOX",
    "sent": "Sent",
    "drafts": "Drafts",
    "trash": "Trash",
    "junk": "Junk",
    "archive": "Archive",
}

# Folder names that mail programs use for the standard roles (Maildir++ names, Outlook and Apple variants).
ROLE_ALIASES: dict[str, str] = {
    "inbox": "inbox",
    "sent": "sent",
    "sent items": "sent",
    "sent messages": "sent",
    "sent mail": "sent",
    "drafts": "drafts",
    "draft": "drafts",
    "trash": "trash",
    "deleted items": "trash",
    "deleted messages": "trash",
    "bin": "trash",
    "junk": "junk",
    "spam": "junk",
    "junk e-mail": "junk",
    "archive": "archive",
    "archives": "archive",
}
INBOX = "inbox"
TRASH = "trash"
_SHARD_NAME = re.compile(r"^(\d{4}-(0[1-9]|1[0-2])|undated)$")
_MAX_FOLDER_NAME = 200
_FLAG_SEPARATOR = "/"
MAX_HELD_UPDATES = 10_000
# Reading one message's row costs ~8 pycrdt look-ups (~140 us); reading a whole shard costs ~8 us a message.
# So a change to more than a sixteenth of a shard's messages (and a few dozen) reads the whole shard.
BULK_ROWS_MIN = 32
BULK_ROWS_FRACTION = 16
# Message id -> its shard's name, for the ids a listing or a look-up named lately: a message's shard is fixed by
# its date, so a flag change or a move of a listed message finds its shard without asking SQLite first (11-29 us,
# before the change could leave). At most this many ids (about 150 bytes each).
SHARD_NAME_CACHE = 4096
# The background listing of shards that arrived whole (``Mailbox.index_steps``) builds and writes their rows this
# many at a time, handing back between: a month shard's 12,000 rows built and written in one go held a peer's
# event loop for 0.4-0.5 s, and changes from its other links waited behind it.
INDEX_STEP_ROWS = 1000
_EMPTY_UPDATE = b"\x00\x00"  # Yrs's encoding of an update that holds nothing
_EMPTY_STATE_VECTOR = b"\x00"
_EMPTY_DELETE_SET = b"\x00"


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a month shard ("YYYY-MM") or the undated shard."""
    return bool(_SHARD_NAME.match(name))


def is_document_name(name: str) -> bool:
    """Whether ``name`` names one of a mailbox's documents."""
    return name == INDEX_DOC or is_shard_name(name)


@dataclass(frozen=True, slots=True)
class Folder:
    """A folder: a stable id, a leaf name, an optional parent folder id and an optional role."""

    id: str
    name: str
    parent: str | None
    role: str | None
    path: str  # the names from the top, joined with "/"


@dataclass(frozen=True, slots=True)
class MessageView:
    """One message as a reader sees it: envelope, effective folder and flags."""

    id: str
    shard: str
    folder_id: str
    envelope: Envelope
    flags: frozenset[str]


@dataclass(frozen=True, slots=True)
class MailboxChange:
    """What one committed transaction changed, for observers.

    ``origin`` is ``LOCAL`` for changes made here, else the origin given to ``apply_update`` (the connection).
    """

    origin: Any
    documents: frozenset[str]
    added: frozenset[str] = frozenset()
    changed: frozenset[str] = frozenset()  # flags changed
    moved: frozenset[str] = frozenset()
    expunged: frozenset[str] = frozenset()
    folders_changed: bool = False
    updates: tuple[tuple[str, bytes], ...] = ()  # (document, update) as committed, for sending to peers
    # Envelopes of added messages that the commit had at hand (a shard that arrived whole, a local add), so an
    # observer that wants them (bodies to ask for, to deliver) need not load the shard again; may be partial.
    envelopes: Mapping[str, Envelope] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """True for a change made on this replica."""
        return bool(self.origin == LOCAL)


@dataclass(frozen=True, slots=True)
class AddResult:
    """The outcome of adding a message: its id and whether it was new here."""

    message_id: str
    added: bool


@dataclass(frozen=True)
class _RowPatch:
    """A listing row to derive at commit from the committed one: flags added and removed, or a new folder.

    Reading the committed row before a change would delay the change on its way to the peers; the commit reads
    it after they have it, for all patched rows at once.
    """

    add: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()
    folder_id: str | None = None

    def with_flags(self, values: dict[str, bool]) -> _RowPatch:
        """This patch with each flag in ``values`` set (True) or cleared (False) instead."""
        changed = frozenset(values)
        return dataclasses.replace(
            self,
            add=(self.add - changed) | {flag for flag, value in values.items() if value},
            remove=(self.remove - changed) | {flag for flag, value in values.items() if not value},
        )

    def applied_to(self, row: IndexRow) -> IndexRow:
        """``row`` with this patch's changes."""
        flags = tuple(sorted((set(row.flags) | self.add) - self.remove)) if self.add or self.remove else row.flags
        folder_id = row.folder_id if self.folder_id is None else self.folder_id
        return dataclasses.replace(row, flags=flags, folder_id=folder_id)


@dataclass
class _Pending:
    """Changes made since the last commit, keyed by document."""

    updates: list[tuple[str, bytes, Any]] = field(default_factory=list)  # (document, update, origin), in order
    touched: dict[str, set[str]] = field(default_factory=dict)  # shard -> affected message ids
    added: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    expunged: set[str] = field(default_factory=set)
    folders_changed: bool = False
    blobs: dict[str, bytes] = field(default_factory=dict)
    # Rows known without reading the shard back, or to patch from the committed row (see _RowPatch).
    row_hints: dict[str, IndexRow | _RowPatch] = field(default_factory=dict)
    rows_before: dict[str, IndexRow] = field(default_factory=dict)  # the committed rows patches were applied to
    # Flags peers changed on a message with a row patch: the commit reads their values then (see _on_shard_event).
    remote_flags: dict[str, set[str]] = field(default_factory=dict)
    envelopes: set[str] = field(default_factory=set)  # remote changes to an envelope or a tombstone
    added_envelopes: dict[str, Envelope] = field(default_factory=dict)  # for MailboxChange.envelopes
    documents: set[str] = field(default_factory=set)
    origins: list[Any] = field(default_factory=list)
    # Shards that arrived whole and are stored as they came, without building their documents (see
    # Mailbox._store_whole): name -> (the update, its state vector).
    stored_whole: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    announced: int = 0  # how many of ``updates`` the update observers were given (see Mailbox._commit)


class _Shard:
    """A loaded shard document, its four root maps, and the flag names used in it."""

    __slots__ = ("doc", "expunged", "flag_names", "flagged_ids", "flags", "messages", "name", "placement")

    def __init__(self, name: str, doc: Doc[Any]) -> None:
        self.name = name
        self.doc = doc
        self.messages: Map[Any] = doc.get("messages", type=Map)
        self.placement: Map[Any] = doc.get("placement", type=Map)
        self.flags: Map[Any] = doc.get("flags", type=Map)
        self.expunged: Map[Any] = doc.get("expunged", type=Map)
        # Knowing the few flag names in use turns "flags of one message" into a handful of key look-ups
        # instead of a scan of every flag key in the month.
        keys = [key.partition(_FLAG_SEPARATOR) for key in self.flags]
        self.flag_names: set[str] = {flag for _, _, flag in keys}
        self.flagged_ids: set[str] = {message_id for message_id, _, _ in keys}  # ids with any flag key

    def visible_envelope(self, message_id: str) -> Any:
        """The stored envelope of a visible message; None if absent or expunged.

        The tombstone wins over an envelope written concurrently by a peer that had not seen the expunge, so an
        expunged message never comes back unless someone who saw the expunge delivers it again.
        """
        # One read transaction for the look-ups: each pycrdt read outside one opens (and closes) its own.
        with self.doc.transaction():
            if message_id in self.expunged or message_id not in self.messages:
                return None
            return self.messages[message_id]

    def peek(self, message_id: str, flag_keys: Iterable[str] = (), *, placement: bool = False,
             ) -> tuple[bool, list[Any], Any]:
        """Whether a message is visible, the values of ``flag_keys`` (None where unset) and, if asked, its
        placement (None if unset): what a local change reads first, in one transaction.

        The reads go straight to Yrs' map objects (pycrdt's ``integrated`` map and the transaction's ``_txn``):
        pycrdt wraps every read in a transaction context of its own, a key check and a conversion, and a
        membership test plus a get is five such calls. After an idle millisecond, as a flag change on its way to
        the peers runs, those reads took 39 us; shards hold plain values, which need no conversion.
        ``test_peek_reads_what_pycrdt_reads`` holds this to pycrdt's own reads.
        """
        with self.doc.transaction() as transaction:
            txn = transaction._txn
            messages, expunged, flags = self.messages.integrated, self.expunged.integrated, self.flags.integrated
            visible = messages.has(txn, message_id) and not expunged.has(txn, message_id)
            values = [flags.get(txn, key) if flags.has(txn, key) else None for key in flag_keys]
            where = None
            if placement:
                placements = self.placement.integrated
                where = placements.get(txn, message_id) if placements.has(txn, message_id) else None
        return visible, values, where

    def flags_of(self, message_id: str) -> frozenset[str]:
        prefix = message_id + _FLAG_SEPARATOR
        flags = self.flags
        # Most flag names are not set on a given message: a membership test costs a fifth of a ``get``.
        with self.doc.transaction():
            return frozenset(name for name in self.flag_names
                             if prefix + name in flags and flags[prefix + name] is True)

    def flag_keys_of(self, message_id: str) -> list[str]:
        prefix = message_id + _FLAG_SEPARATOR
        return [prefix + name for name in self.flag_names if prefix + name in self.flags]


def observe_keys(root: Map[Any], callback: Callable[[dict[str, dict[str, Any]]], None]) -> Subscription:
    """Call ``callback`` with the keys each transaction changed in ``root``, as pycrdt's ``MapEvent.keys`` gives
    them ({key: {"action": ..., "oldValue": ..., "newValue": ...}}), straight from Yrs' event; drop the returned
    subscription to end it.

    pycrdt's ``observe`` builds objects of its own around each event (the map, its path, every value converted)
    and opens a read transaction for the callback: 21 us of each remote flag change, against 5 this way. Shards
    hold plain values, which need no converting; ``test_observe_keys_gives_what_pycrdt_observe_gives`` holds this to
    pycrdt. As with pycrdt's, an exception in the callback is raised when the transaction ends, after the other
    observers ran.
    """
    doc = root.doc

    def on_event(event: Any) -> None:
        try:
            callback(event.keys)
        except Exception as exc:
            doc._exceptions.append(exc)

    subscription: Subscription = root.integrated.observe(on_event)
    return subscription


def _map_dict(root: Map[Any]) -> dict[str, Any]:
    """A whole map as a dict, converted in one step by Yrs (JSON), where ``to_py`` reads key by key."""
    value = orjson.loads(str(root))
    return value if isinstance(value, dict) else {}


def _lacking(whole: bytes, state_vector: bytes | None) -> bytes:
    """What a peer with ``state_vector`` (None: nothing) lacks of a document held as the one update ``whole``."""
    return whole if state_vector is None or state_vector == _EMPTY_STATE_VECTOR else get_update(whole, state_vector)


def _standard_folder(role: str) -> dict[str, Any]:
    """A standard folder's value before anything changed it (never stored as such: see ``Mailbox._initialise``)."""
    return {"name": _STANDARD_FOLDERS[role], "parent": None, "role": role, "deleted": False}


def _rows_of(shard_name: str, message_ids: Iterable[str], messages: Mapping[str, Any], placement: Mapping[str, Any],
             flags: Mapping[str, set[str]], envelopes: dict[str, Envelope] | None) -> dict[str, IndexRow]:
    """The rows of visible messages of one shard, from its maps read as dicts; their envelopes go into
    ``envelopes`` when given."""
    rows: dict[str, IndexRow] = {}
    for message_id in message_ids:
        envelope = Envelope.from_crdt(messages[message_id])
        if envelopes is not None:
            envelopes[message_id] = envelope
        folder = placement.get(message_id)
        rows[message_id] = IndexRow(
            message_id=message_id,
            shard=shard_name,
            folder_id=folder if isinstance(folder, str) else INBOX,
            date=envelope.date or 0,
            flags=tuple(sorted(flags.get(message_id, ()))),
            sender=envelope.sender,
            subject=envelope.subject,
            size=envelope.size,
        )
    return rows


def _newest_first(shard_names: Iterable[str]) -> list[str]:
    """Month shards newest first ("YYYY-MM" sorts by date), then the undated one."""
    names = set(shard_names)
    return sorted(names - {UNDATED}, reverse=True) + ([UNDATED] if UNDATED in names else [])


def _flags_by_message(shard: _Shard) -> dict[str, set[str]]:
    """Each message's set flags, from one read of the flags map; the shard's flag caches learn every key on the
    way (cleared flags too: ``flag_keys_of`` must find every key, and a shard that arrived whole has no others)."""
    result: dict[str, set[str]] = {}
    for key, value in _map_dict(shard.flags).items():  # one conversion, not a transaction per key
        message_id, _, flag = key.partition(_FLAG_SEPARATOR)
        shard.flag_names.add(flag)
        shard.flagged_ids.add(message_id)
        if value is True:
            result.setdefault(message_id, set()).add(flag)
    return result


class Mailbox:
    """One account's mail over pycrdt documents, stored in a MailboxBackend.

    Shards are loaded lazily: reads of listings and counts go to the backend's derived index; a shard is loaded
    only when one of its messages is read or changed, or a remote update for it arrives.
    """

    def __init__(self, name: str, backend: MailboxBackend) -> None:
        self.name = name
        self._backend = backend
        self._shards: dict[str, _Shard] = {}
        self._observers: list[Callable[[MailboxChange], None]] = []
        self._update_observers: list[Callable[[str, bytes, Any], None]] = []
        self._pending = _Pending()
        self._batch_depth = 0
        self._remote_origin: Any = None
        self._folder_cache: tuple[list[Folder], list[Folder], frozenset[str]] | None = None  # all, live, live ids
        self._held: dict[str, list[tuple[bytes, Any]]] = {}
        self._remote_changed = False
        self._watched: set[str] = set()  # documents whose maps are observed (see _watch_roots)
        # Every observer a loaded shard has, to take back when it is dropped: pycrdt frees neither a Doc nor its
        # memory while one is subscribed (measured: 28 MB a 5 MB shard, never returned).
        self._subscriptions: dict[str, list[tuple[Doc[Any] | Map[Any] | None, Subscription]]] = {}
        self._bulk_document: str | None = None
        self._drop_after_commit: set[str] = set()  # shards that arrived whole, to unload once committed
        # Shards stored as they arrived whose rows are not built yet -> the origin they came from; and the
        # changes their indexing announces at the next commit (see _store_whole and index_pending).
        self._unindexed: dict[str, Any] = {}
        self._indexed_changes: list[MailboxChange] = []
        self._hold_depth = 0  # inside batch(hold_transactions=True)
        self._held_transactions: dict[str, Transaction] = {}  # shard -> its open LOCAL transaction
        self._shard_names: OrderedDict[str, str] = OrderedDict()  # see SHARD_NAME_CACHE
        # A loaded document's state vector, decoded at its last commit and dropped at its next transaction: the
        # causality check of a remote update reads it here instead of encoding and decoding it again on the way
        # to the peers (off that way, the commit decodes it after the update was passed on).
        self._known_states: dict[str, dict[int, int]] = {}
        # Group commit of remote changes (see defer_remote_writes): who writes them soon, and whether some wait.
        self._write_scheduler: Callable[[], bool] | None = None
        self._deferred = False
        self._index_doc: Doc[Any] = self._rebuild(INDEX_DOC)
        stored = self._index_doc.get_state() != _EMPTY_STATE_VECTOR
        self._meta: Map[Any] = self._index_doc.get("meta", type=Map)
        self._folders: Map[Any] = self._index_doc.get("folders", type=Map)
        self._watch(INDEX_DOC, self._index_doc)
        if not stored:
            self._initialise()
        self.repair_index()

    # ----------------------------------------------------------------------------------------------- plumbing

    def _initialise(self) -> None:
        """Write the schema version; peers that do it concurrently write equal values.

        Not the standard folders: they exist without being written (``_folder_values``). Written by every new
        replica, they were writes concurrent with whatever the others had done to them, and Yrs settles those by
        client id: a phone joining a mailbox whose Sent folder was renamed, or whose Junk was deleted, undid that
        about one time in two (23 of 40 in a test).
        """
        with self._operation(), self._index_doc.transaction(origin=LOCAL):
            self._meta["schema"] = SCHEMA_VERSION
            self._meta["name"] = self.name

    def _watch(self, doc_name: str, doc: Doc[Any]) -> None:
        def on_transaction(event: TransactionEvent) -> None:
            self._known_states.pop(doc_name, None)
            if self._remote_origin is not None:
                # Only whether it changed anything: the caller stores the update it applied, and encoding this
                # transaction's (a whole shard, when one arrives) costs nearly half as much again as applying it.
                states: Any = event  # pycrdt's stubs declare only .update; the event has the states and deletions
                if states.after_state != states.before_state or states.delete_set != _EMPTY_DELETE_SET:
                    self._remote_changed = True
                return
            update = event.update
            if update == _EMPTY_UPDATE:
                return
            self._pending.updates.append((doc_name, update, LOCAL))
            self._pending.documents.add(doc_name)

        self._subscriptions.setdefault(doc_name, []).append((doc, doc.observe(on_transaction)))

    def _load_shard(self, name: str, parts: list[bytes] | None = None) -> _Shard:
        """The shard in memory, loading it from the backend (or from ``parts``, its stored updates, if read)."""
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        if not is_shard_name(name):
            raise ModelError(f"{name!r} is not a shard name (expected YYYY-MM or 'undated')")
        if name in self._pending.stored_whole:
            self._commit()  # it is in the store once committed, and loads from there
            parts = None
            shard = self._shards.get(name)  # an observer of that commit may have read it meanwhile
            if shard is not None:
                return shard
        doc = self._rebuild(name, parts)
        shard = _Shard(name, doc)
        self._watch(name, doc)
        self._shards[name] = shard
        if name in self._unindexed:
            try:
                self._index_shard(shard)  # before anything changes it: a commit writes rows only for what changed
            except BaseException:
                self._forget(name)  # not indexed: loaded again, it is indexed again
                raise
        return shard

    def _rebuild(self, doc_name: str, parts: list[bytes] | None = None) -> Doc[Any]:
        """A document rebuilt from the backend: its stored updates applied in commit order.

        Every writer logs an update after everything it depends on (its document held those before it made
        or integrated the update, and they came from the store or were logged first), so no update waits in
        Yrs, whose pending updates can lose data (``crdtmail.model.causal``). Merging the updates into one
        first, as loads once did, costs several times more.
        """
        doc: Doc[Any] = Doc()
        try:
            for part in self._backend.load_document_parts(doc_name) if parts is None else parts:
                doc.apply_update(part)
        except ValueError as exc:  # pycrdt: the stored bytes are not an update
            raise CorruptStoreError(
                f"mailbox {self.name}: document {doc_name} in the store cannot be decoded ({exc}); restore the data "
                "directory from a backup, or move it away and let this peer resync from another"
            ) from exc
        return doc

    def _touch(self, shard: _Shard, message_id: str, kind: set[str]) -> None:
        """Record a local change; remote ones are found by map observers instead (``_integrate``)."""
        pending = self._pending
        pending.touched.setdefault(shard.name, set()).add(message_id)
        pending.documents.add(shard.name)
        kind.add(message_id)

    def _on_shard_event(self, shard: _Shard, root: str, keys: dict[str, dict[str, Any]]) -> None:
        if self._remote_origin is None or self._bulk_document == shard.name:
            return  # a local operation records its own changes; a whole shard is read once after it arrives
        pending = self._pending
        touched = pending.touched.setdefault(shard.name, set())
        pending.documents.add(shard.name)
        hints = pending.row_hints
        if root == "flags":
            remote_flags = pending.remote_flags
            for key in keys:
                message_id, _, flag = key.partition(_FLAG_SEPARATOR)
                shard.flag_names.add(flag)
                shard.flagged_ids.add(message_id)
                # A message whose flags alone changed keeps its committed row, patched at commit with those flags'
                # values then: working the row out of the shard (its envelope, placement and every flag) cost
                # more than the rest of applying the update. Anything else pending for it: the row is read whole.
                hint = hints.get(message_id)
                if isinstance(hint, _RowPatch) or (hint is None and message_id not in touched):
                    if hint is None:
                        hints[message_id] = _RowPatch()
                    remote_flags.setdefault(message_id, set()).add(flag)
                elif hint is not None:
                    del hints[message_id]
                touched.add(message_id)
                pending.changed.add(message_id)
            return
        if root in ("messages", "expunged"):
            pending.envelopes.update(keys)
        for key, change in keys.items():
            touched.add(key)
            hints.pop(key, None)
            action = change.get("action")
            if root == "messages":
                if action == "add":
                    pending.added.add(key)
                elif action == "delete":
                    pending.expunged.add(key)
            elif root == "expunged":
                if action == "add":
                    pending.expunged.add(key)
                elif action == "delete":
                    pending.added.add(key)
            elif root == "placement" and action == "update":
                pending.moved.add(key)

    def _on_folders_event(self, _event: MapEvent) -> None:
        self._folder_cache = None
        if self._remote_origin is None:
            return
        self._pending.folders_changed = True
        self._pending.documents.add(INDEX_DOC)

    @contextmanager
    def _operation(self) -> Iterator[None]:
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            # Commit even when the operation failed part-way: whatever reached the documents must be durable
            # before anything else happens, or memory and disk would disagree.
            if self._batch_depth == 0:
                try:
                    self._commit()
                finally:
                    self._drop_arrivals()

    @contextmanager
    def batch(self, *, hold_transactions: bool = False) -> Iterator[None]:
        """Group many operations into one durable commit (used by imports). Nested batches join the outer one.

        ``hold_transactions`` makes ``add`` keep each shard's pycrdt transaction open until the next commit
        (``flush`` or the end of the batch), so a bulk add writes one update per shard and commit instead of
        one per message. Remote updates may still be applied meanwhile: they close the held transactions first.
        """
        if hold_transactions:
            self._hold_depth += 1
        try:
            with self._operation():
                yield
        finally:
            if hold_transactions:
                self._hold_depth -= 1

    def flush(self) -> None:
        """Commit what a running batch holds so far (an import calls this every few hundred messages), and any
        remote changes whose write was deferred."""
        self._commit(defer=False)

    def defer_remote_writes(self, scheduler: Callable[[], bool] | None) -> None:
        """Let remote changes be written in groups: a commit holding only remote updates passes them on to the
        update observers at once and leaves the SQLite write for later, when ``scheduler()`` returns True (it
        promises a ``write_deferred()`` soon); None turns it off (and writes what waits).

        A peer receiving a change a millisecond wrote each one in a transaction of its own (200-300 us of its
        event loop, while the next change waited); in a group the cost is shared. Local changes are written
        before the operation returns, with anything deferred; so is everything before any read of the listing.
        Nothing deferred is lost if the process dies: the peer it came from holds it, and the next sync brings
        it back.
        """
        self._write_scheduler = scheduler
        if scheduler is None:
            self.write_deferred()

    @property
    def has_deferred_writes(self) -> bool:
        """Whether remote changes wait to be written (``defer_remote_writes``)."""
        return self._deferred

    def write_deferred(self) -> None:
        """Write the remote changes whose write was deferred, if any (outside a batch; a batch writes them at its
        end)."""
        if self._deferred and self._batch_depth == 0:
            self._commit(defer=False)

    def _hold_transaction(self, shard: _Shard) -> None:
        if shard.name not in self._held_transactions:
            transaction = shard.doc.transaction(origin=LOCAL)
            transaction.__enter__()
            self._held_transactions[shard.name] = transaction

    def _release_transactions(self) -> None:
        """Close the transactions ``add`` holds open; their observers record the updates for the next commit."""
        while self._held_transactions:
            _, transaction = self._held_transactions.popitem()
            transaction.__exit__(None, None, None)

    def _commit(self, *, defer: bool = True) -> None:
        self._release_transactions()
        pending = self._pending
        if not (pending.updates or pending.touched or pending.folders_changed or pending.blobs):
            self._pending = _Pending()  # an operation that changed nothing may still have left notes
            self._announce_indexed()
            return
        new_updates = pending.updates[pending.announced:]  # the ones before were announced by a deferred commit
        try:
            # Peers get the updates before the disk does: the rows and the SQLite commit below take longer than
            # the hop itself. Nothing is lost if this process dies before committing: the peers hold the update,
            # and the next sync brings it back (a document reloaded from the store gets a new client id).
            for document, update, origin in new_updates:
                pending.announced += 1
                for update_observer in list(self._update_observers):
                    update_observer(document, update, origin)
            if defer and self._may_defer(pending, new_updates):
                self._deferred = True
                for document in pending.documents:  # as _commit_pending would (the next causality check reads it)
                    if document not in self._known_states:
                        self._remember_state(document)
                return
        except BaseException:
            self._write(pending)  # what reached the documents is written even when an observer failed
            raise
        self._write(pending)

    def _write(self, pending: _Pending) -> None:
        self._pending = _Pending()
        self._deferred = False
        self._commit_pending(pending)

    def _may_defer(self, pending: _Pending, new_updates: list[tuple[str, bytes, Any]]) -> bool:
        """Whether a commit's write may wait (``defer_remote_writes``): only remote updates are pending (those
        before ``new_updates`` were checked when their own commit was deferred), and nothing that arrived whole is
        to be dropped once written."""
        if self._write_scheduler is None or pending.blobs or pending.stored_whole or self._drop_after_commit:
            return False
        if any(origin == LOCAL for _, _, origin in new_updates):
            return False
        return self._deferred or self._write_scheduler()

    def _remember_state(self, document: str, vector: bytes | None = None) -> None:
        """Keep a loaded document's decoded state vector (``vector``, or read from it) for the next causality
        check (see ``_known_states``); a document not in memory is skipped."""
        if document == INDEX_DOC:
            doc = self._index_doc
        elif document in self._shards:
            doc = self._shards[document].doc
        else:
            return
        self._known_states[document] = decode_state_vector(doc.get_state() if vector is None else vector)

    def _commit_pending(self, pending: _Pending) -> None:
        self._resolve_row_patches(pending)
        batch = CommitBatch(blobs=pending.blobs, encode_document=self._encode_for_fold, rows_before=pending.rows_before)
        vectors = {name: pending.stored_whole[name][1] if name in pending.stored_whole else self._state_vector(name)
                   for name in {document for document, _, _ in pending.updates}}
        for document, update, _ in pending.updates:
            # Every update of a document in the batch gets the vector after the batch: the store keeps the last.
            batch.updates.append(DocumentUpdate(document, update, vectors[document]))
        for document, vector in vectors.items():
            if document not in self._known_states:  # present: known since the document's last transaction
                self._remember_state(document, vector)
        for shard_name, ids in pending.touched.items():
            shard = self._shards[shard_name]
            # A big remote change (a whole shard arriving) reads each map once instead of once per message.
            # Rows an add hinted need no read at all: a bulk import hints nearly every one, and reading the whole
            # shard at each flush made an import quadratic in the shard's size.
            unhinted = [message_id for message_id in ids if message_id not in pending.row_hints]
            bulk = None
            if len(unhinted) > BULK_ROWS_MIN and len(unhinted) * BULK_ROWS_FRACTION > len(shard.messages):
                bulk = self._rows_after_change(shard, unhinted, pending)
            for message_id in ids:
                hint = pending.row_hints.get(message_id)
                row = hint if isinstance(hint, IndexRow) else (
                    bulk.get(message_id) if bulk is not None else self._row(shard, message_id))
                if row is None:
                    batch.rows_delete.add(message_id)
                    batch.rows_upsert.pop(message_id, None)
                else:
                    batch.rows_upsert[message_id] = row
                    batch.rows_delete.discard(message_id)
            batch.indexed_shards[shard_name] = shard.doc.get_state()
        self._backend.commit(batch)
        for document, _, document_origin in pending.updates:
            if document in pending.stored_whole:
                self._unindexed[document] = document_origin
        origin = pending.origins[0] if pending.origins else LOCAL
        visible = set(batch.rows_upsert)
        added = (pending.added & visible) - pending.expunged
        change = MailboxChange(
            origin=origin,
            documents=frozenset(pending.documents),
            added=frozenset(added),
            changed=frozenset((pending.changed & visible) - added),
            moved=frozenset((pending.moved & visible) - added),
            expunged=frozenset((pending.expunged | pending.added) & batch.rows_delete),
            folders_changed=pending.folders_changed,
            updates=tuple((document, update) for document, update, _ in pending.updates),
            envelopes={message_id: envelope for message_id, envelope in pending.added_envelopes.items()
                       if message_id in added},
        )
        self._announce_indexed()  # the messages of shards indexed meanwhile, before any change to them
        for observer in list(self._observers):
            observer(change)

    def _resolve_row_patches(self, pending: _Pending) -> None:
        """Turn the row patches into rows, from the committed rows read in one query; a message without one (not
        listed yet) has its row read from its shard instead."""
        patches = {message_id: hint for message_id, hint in pending.row_hints.items() if isinstance(hint, _RowPatch)}
        if not patches:
            return
        stored = self._backend.rows(list(patches))
        for message_id, patch in patches.items():
            row = stored.get(message_id)
            if row is None or message_id not in pending.touched.get(row.shard, ()):
                del pending.row_hints[message_id]
                continue
            remote = pending.remote_flags.get(message_id)
            if remote:
                names = sorted(remote)
                prefix = message_id + _FLAG_SEPARATOR
                # Touched, so in memory: the commit reads every touched shard (see _commit_pending).
                visible, values, _ = self._shards[row.shard].peek(message_id, [prefix + name for name in names])
                if not visible:
                    del pending.row_hints[message_id]
                    continue
                patch = patch.with_flags({name: value is True for name, value in zip(names, values, strict=True)})
            pending.row_hints[message_id] = patch.applied_to(row)
            pending.rows_before[message_id] = row

    def _announce_indexed(self) -> None:
        while self._indexed_changes:
            change = self._indexed_changes.pop(0)
            for observer in list(self._observers):
                observer(change)

    def _encode_for_fold(self, doc_name: str) -> bytes | None:
        """A document's whole state for the store to fold its log into (None when it is not in memory).

        Every change to a loaded document is in the store's log by the time it folds (held updates are in
        neither), so the encoding holds everything; Yrs has dropped overwritten values from it, too.
        """
        if doc_name == INDEX_DOC:
            return self._index_doc.get_update()
        shard = self._shards.get(doc_name)
        return None if shard is None else shard.doc.get_update()

    def _state_vector(self, doc_name: str) -> bytes:
        if doc_name == INDEX_DOC:
            return self._index_doc.get_state()
        return self._shards[doc_name].doc.get_state()

    def observe(self, callback: Callable[[MailboxChange], None]) -> Callable[[], None]:
        """Call ``callback`` after every committed change; returns a function that unsubscribes it."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)

    def observe_updates(self, callback: Callable[[str, bytes, Any], None]) -> Callable[[], None]:
        """Call ``callback(document, update, origin)`` for every update as soon as it is in memory, before it
        is committed (``observe`` sees it after); returns a function that unsubscribes it.

        For passing updates on to peers without waiting for the disk. The callback runs in the middle of a
        commit: it must not read or change this mailbox.
        """
        self._update_observers.append(callback)
        return lambda: self._update_observers.remove(callback)

    # ------------------------------------------------------------------------------------- derived index

    def _row(self, shard: _Shard, message_id: str, flags: Iterable[str] | None = None) -> IndexRow | None:
        with shard.doc.transaction():  # the reads below share it
            value = shard.visible_envelope(message_id)
            if value is None:
                return None
            folder = shard.placement.get(message_id)
            flags = shard.flags_of(message_id) if flags is None else flags
        envelope = Envelope.from_crdt(value)
        return IndexRow(
            message_id=message_id,
            shard=shard.name,
            folder_id=folder if isinstance(folder, str) else INBOX,
            date=envelope.date or 0,
            flags=tuple(sorted(flags)),
            sender=envelope.sender,
            subject=envelope.subject,
            size=envelope.size,
        )

    def _rows_after_change(self, shard: _Shard, ids: list[str], pending: _Pending) -> dict[str, IndexRow]:
        """The rows of many changed messages of one shard (a missing row: the message is not visible).

        An envelope never changes once added, so when only flags and placements changed (a resync after flag
        changes, say) each stored row keeps everything but those two, read from two small maps; otherwise the
        whole shard is read.
        """
        if any(message_id in pending.envelopes or message_id in pending.added or message_id in pending.expunged
               for message_id in ids):
            return self._bulk_rows(shard)
        stored = self._backend.rows(ids)
        if len(stored) < len(ids) or any(row.shard != shard.name for row in stored.values()):
            return self._bulk_rows(shard)  # a row missing or elsewhere: the index cannot be trusted to patch
        placement = _map_dict(shard.placement)
        flags = _flags_by_message(shard)
        rows: dict[str, IndexRow] = {}
        for message_id, row in stored.items():
            folder = placement.get(message_id)
            rows[message_id] = dataclasses.replace(
                row, folder_id=folder if isinstance(folder, str) else INBOX,
                flags=tuple(sorted(flags.get(message_id, ()))))
        return rows

    def rows_for_shard(self, shard_name: str) -> dict[str, IndexRow]:
        """Recompute the derived rows of one shard from its document."""
        return self._bulk_rows(self._load_shard(shard_name))

    def _bulk_rows(self, shard: _Shard) -> dict[str, IndexRow]:
        """Every visible message's row, reading each map once (a pycrdt look-up per key costs a transaction)."""
        return self._read_shard(shard)[0]

    def _read_shard(self, shard: _Shard, envelopes: dict[str, Envelope] | None = None,
                    ) -> tuple[dict[str, IndexRow], set[str]]:
        """Every visible message's row, and every message id the shard holds (expunged ones too); the visible
        envelopes go into ``envelopes`` when given.

        Each map is read once.
        """
        messages = _map_dict(shard.messages)
        placement = _map_dict(shard.placement)
        expunged = _map_dict(shard.expunged)
        flags = _flags_by_message(shard)
        rows = _rows_of(shard.name, [message_id for message_id in messages if message_id not in expunged], messages,
                        placement, flags, envelopes)
        return rows, set(messages) | set(expunged)

    def repair_index(self) -> list[str]:
        """Rebuild the derived rows of every shard whose rows are missing or stale; returns the shards rebuilt
        (shards stored whole in a sync are indexed first, as ``index_pending`` does, and are not among them)."""
        indexed = self._listing().indexed_state_vectors()
        stored = set(self._backend.document_names())
        stale = sorted(
            {name for name in stored if is_shard_name(name) and indexed.get(name) != self._backend.state_vector(name)}
            | (set(indexed) - stored)
        )
        for name in stale:
            batch = CommitBatch(replace_shards={name})
            if name in stored:
                batch.rows_upsert = self.rows_for_shard(name)
                batch.indexed_shards[name] = self._backend.state_vector(name) or b"\x00"
            self._backend.commit(batch)
            self._drop_if_idle(name)
        if stale:
            log.info("mailbox %s: rebuilt the derived index of %s", self.name, ", ".join(stale))
        return stale

    def unindexed_shards(self) -> list[str]:
        """Shards stored as they arrived whose listing rows are not built yet (``index_pending`` builds them)."""
        if not (self._unindexed or self._pending.stored_whole):
            return []  # the usual answer, asked after every burst of frames a peer applies
        return _newest_first([*self._unindexed, *self._pending.stored_whole])

    def index_pending(self, limit: int | None = None) -> list[str]:
        """Build the rows of shards that arrived whole (newest month first, at most ``limit`` of them) and tell
        observers of their messages; returns the shards indexed.

        A peer calls this once a sync is done; every read of the derived index calls it first, so no listing
        ever misses a stored message.
        """
        if self._pending.stored_whole:
            self._commit()
        done: list[str] = []
        for name in _newest_first(self._unindexed)[:limit]:
            loaded = name in self._shards
            self._load_shard(name)  # which indexes it
            if not loaded:
                self._drop_after_commit.add(name)  # now, or when the running batch ends
            done.append(name)
        self._drop_arrivals()
        if not self._batch_depth:
            self._announce_indexed()
        return done

    def index_steps(self) -> Iterator[str | None]:
        """What ``index_pending`` does, a bounded piece per step, for a caller that has other work between them (a
        peer's event loop): decoding a shard, reading its maps, building and writing INDEX_STEP_ROWS of its rows.
        Yields after each piece: the shard's name once all its rows are written and observers told, else None;
        ends when no shard is left to list.

        Between steps anything may happen. Whatever needs one of these shards meanwhile (a change to it, a remote
        update, any listing or look-up) lists it at once, replacing the rows written so far, and the steps go on
        with the next shard; observers hear of each message once either way.
        """
        while True:
            if self._pending.stored_whole:
                self._commit()
            waiting = _newest_first(self._unindexed)
            if not waiting:
                return
            name = waiting[0]
            # Never loaded meanwhile: a load lists a shard at once (_load_shard), which takes it out of _unindexed.
            shard = _Shard(name, self._rebuild(name))
            yield None
            if name not in self._unindexed:  # listed meanwhile
                continue
            messages = _map_dict(shard.messages)
            yield None
            if name not in self._unindexed:  # listed meanwhile
                continue
            placement, expunged = _map_dict(shard.placement), _map_dict(shard.expunged)
            yield None
            if name not in self._unindexed:  # listed meanwhile
                continue
            flags = _flags_by_message(shard)
            # In key order, as one batch would write them: each piece then fills the rows table's pages in turn
            # instead of touching pages all over it (a piece in the map's order made the listing 40% slower).
            visible = sorted(message_id for message_id in messages if message_id not in expunged)
            envelopes: dict[str, Envelope] = {}
            for start in range(0, max(len(visible), 1), INDEX_STEP_ROWS):
                yield None
                if name not in self._unindexed:
                    break
                last = start + INDEX_STEP_ROWS >= len(visible)
                batch = CommitBatch(
                    rows_upsert=_rows_of(name, visible[start:start + INDEX_STEP_ROWS], messages, placement, flags,
                                         envelopes),
                    replace_shards={name} if start == 0 else set(),
                )
                if last:  # the rows are complete once this commits
                    batch.indexed_shards[name] = shard.doc.get_state()
                self._backend.commit(batch)
            else:
                # Freed here, a step of its own, rather than at the start of the next shard's decoding.
                del shard, messages, placement, expunged, flags
                self._listed(name, visible, envelopes)
                if not self._batch_depth:
                    self._announce_indexed()
                yield name

    def _listing(self) -> MailboxBackend:
        """The backend, for a read of the derived index: the rows of shards that arrived whole are built first,
        and remote changes whose write waits are written, so no listing or look-up ever misses a stored message
        or shows one as it was."""
        self.write_deferred()
        if self._unindexed or self._pending.stored_whole:
            self.index_pending()
        return self._backend

    def _index_shard(self, shard: _Shard) -> None:
        """Write the rows of a shard stored as it arrived; its messages are announced as added, with the origin
        they came from, at the next commit (or by ``index_pending``)."""
        envelopes: dict[str, Envelope] = {}
        rows, _ = self._read_shard(shard, envelopes)
        batch = CommitBatch(replace_shards={shard.name}, rows_upsert=rows)
        batch.indexed_shards[shard.name] = shard.doc.get_state()
        self._backend.commit(batch)
        self._listed(shard.name, rows, envelopes)

    def _listed(self, name: str, added: Iterable[str], envelopes: dict[str, Envelope]) -> None:
        """A shard stored whole has its rows: its messages are announced as added, with the origin it came from, at
        the next commit (or ``_announce_indexed``)."""
        origin = self._unindexed.pop(name)
        self._indexed_changes.append(MailboxChange(
            origin=origin, documents=frozenset({name}), added=frozenset(added), changed=frozenset(),
            moved=frozenset(), expunged=frozenset(), folders_changed=False, updates=(), envelopes=envelopes))

    def _drop_if_idle(self, name: str) -> None:
        """Unload a shard loaded only for a read (or that arrived whole), to keep memory small."""
        if self._batch_depth == 0 and name in self._shards:
            self.write_deferred()  # its rows are written from the loaded document
            self._forget(name)

    # --------------------------------------------------------------------------------------------- folders

    def folders(self, *, include_deleted: bool = False) -> list[Folder]:
        """Every folder, sorted by path (INBOX first)."""
        if self._folder_cache is None:
            raw = self._folder_values()
            every = [(bool(value.get("deleted")), self._folder_from(key, value, raw)) for key, value in raw.items()]
            every.sort(key=lambda item: (item[1].role != "inbox", item[1].path.lower(), item[1].id))
            live = [folder for deleted, folder in every if not deleted]
            self._folder_cache = [folder for _, folder in every], live, frozenset(folder.id for folder in live)
        return list(self._folder_cache[0] if include_deleted else self._folder_cache[1])

    def _folder_values(self) -> dict[str, dict[str, Any]]:
        """Each folder's stored value by id: the standard folders as they start out, unless a change was stored."""
        values = {role: _standard_folder(role) for role in _STANDARD_FOLDERS}
        values.update((key, value) for key, value in self._folders.items() if isinstance(value, dict))
        return values

    def _folder_value(self, folder_id: str) -> dict[str, Any]:
        """One live folder's value, as ``_folder_values`` has it, for a change to it to start from."""
        value = self._folders.get(folder_id)
        return dict(value) if isinstance(value, dict) else _standard_folder(folder_id)

    def _folder_from(self, folder_id: str, value: dict[str, Any], raw: dict[str, Any]) -> Folder:
        names = [str(value.get("name", folder_id))]
        parent = value.get("parent")
        seen = {folder_id}
        while isinstance(parent, str) and parent in raw and parent not in seen:
            seen.add(parent)
            names.append(str(raw[parent].get("name", parent)))
            parent = raw[parent].get("parent")
        role = value.get("role")
        return Folder(
            id=folder_id,
            name=names[0],
            parent=value.get("parent") if isinstance(value.get("parent"), str) else None,
            role=role if isinstance(role, str) else None,
            path="/".join(reversed(names)),
        )

    def folder(self, name_or_id: str) -> Folder:
        """Find a live folder by id, path (case-insensitive for INBOX) or role."""
        folders = self.folders()
        for folder in folders:
            if folder.id == name_or_id:
                return folder
        for folder in folders:
            if folder.path == name_or_id:
                return folder
        lowered = name_or_id.lower()
        for folder in folders:
            if folder.path.lower() == lowered or folder.role == lowered:
                return folder
        raise UnknownFolderError(f"no folder named {name_or_id!r}; `crdtmail folders` lists them")

    def role_folder(self, role: str) -> str:
        """The id of the live folder with ``role``, falling back to the standard id."""
        for folder in self.folders():
            if folder.role == role:
                return folder.id
        return role

    def _effective_folder(self, folder_id: str) -> str:
        # From the folder cache, not the index map: a pycrdt read is 4.6 us, and this runs per message of
        # ``all_messages`` and per new file of a Maildir mirror.
        if self._folder_cache is None:
            self.folders()
        assert self._folder_cache is not None
        if folder_id in self._folder_cache[2]:
            return folder_id
        # A message placed in a deleted or unknown folder (a concurrent delete) is shown in the trash, not lost.
        return self.role_folder(TRASH)

    def create_folder(self, path: str, *, role: str | None = None) -> Folder:
        """Create a folder (and missing parents) from a "/"-separated path; an existing one is returned as is."""
        parts = [part.strip() for part in path.split("/")]
        if not parts or any(not part or len(part) > _MAX_FOLDER_NAME for part in parts):
            raise ModelError(f"invalid folder name {path!r}: use non-empty names separated by '/'")
        if role is not None and role not in ROLES:
            raise ModelError(f"unknown folder role {role!r}: use one of {', '.join(ROLES)}")
        parent: str | None = None
        folder: Folder | None = None
        with self._operation(), self._index_doc.transaction(origin=LOCAL):
            for depth, part in enumerate(parts):
                prefix = "/".join(parts[: depth + 1])
                existing = self._find_live(prefix)
                if existing is not None:
                    folder = existing
                else:
                    folder_id = self._new_folder_id(prefix)
                    is_leaf = depth == len(parts) - 1
                    self._set_folder(folder_id, {
                        "name": part,
                        "parent": parent,
                        "role": role if is_leaf else None,
                        "deleted": False,
                    })
                    folder = self.folder(folder_id)
                parent = folder.id
        assert folder is not None
        return folder

    def _set_folder(self, folder_id: str, value: dict[str, Any]) -> None:
        self._folders[folder_id] = value
        self._folder_cache = None
        self._pending.folders_changed = True
        self._pending.documents.add(INDEX_DOC)

    def _find_live(self, path: str) -> Folder | None:
        for folder in self.folders():
            if folder.path == path or (folder.role == INBOX and path.lower() == "inbox"):
                return folder
        return None

    def _new_folder_id(self, path: str) -> str:
        # Derived from the path, so two peers that create the same folder while apart create one folder.
        base = "f" + hashlib.sha256(path.encode("utf-8")).hexdigest()[:11]
        candidate, counter = base, 1
        while True:
            value = self._folders.get(candidate)
            if value is None or (isinstance(value, dict) and value.get("deleted")):
                return candidate
            counter += 1
            candidate = f"{base}{counter}"

    def rename_folder(self, name_or_id: str, new_path: str) -> Folder:
        """Rename (and possibly re-parent) a folder; its id, and so every message in it, stays."""
        folder = self.folder(name_or_id)
        parts = [part.strip() for part in new_path.split("/")]
        if any(not part or len(part) > _MAX_FOLDER_NAME for part in parts):
            raise ModelError(f"invalid folder name {new_path!r}: use non-empty names separated by '/'")
        if self._find_live(new_path) is not None:
            raise FolderExistsError(f"a folder named {new_path!r} already exists; pick another name")
        if folder.role == INBOX:
            raise ModelError("INBOX cannot be renamed")
        if "/".join(parts).startswith(folder.path + "/"):
            raise ModelError(f"cannot move folder {folder.path!r} inside itself")
        with self._operation():
            parent = self.create_folder("/".join(parts[:-1])).id if len(parts) > 1 else None
            with self._index_doc.transaction(origin=LOCAL):
                value = self._folder_value(folder.id)
                value.update(name=parts[-1], parent=parent)
                self._set_folder(folder.id, value)
        return self.folder(folder.id)

    def delete_folder(self, name_or_id: str, *, move_to_trash: bool = False) -> None:
        """Delete a folder. One that holds messages (or subfolders) is refused unless ``move_to_trash``."""
        folder = self.folder(name_or_id)
        if folder.role in (INBOX, TRASH):
            raise ModelError(f"the {folder.path} folder cannot be deleted")
        children = [f for f in self.folders() if f.parent == folder.id]
        if children:
            raise FolderNotEmptyError(
                f"folder {folder.path!r} has subfolders ({', '.join(c.path for c in children)}); delete them first"
            )
        ids = self._listing().ids_in_folder(folder.id)
        if ids and not move_to_trash:
            raise FolderNotEmptyError(
                f"folder {folder.path!r} holds {len(ids)} messages; move them first or delete with --move-to-trash"
            )
        trash = self.role_folder(TRASH)
        with self._operation():
            for message_id in ids:
                self.move(message_id, trash)
            with self._index_doc.transaction(origin=LOCAL):
                value = self._folder_value(folder.id)
                value["deleted"] = True
                self._set_folder(folder.id, value)

    # -------------------------------------------------------------------------------------------- messages

    def add(
        self,
        raw: bytes | ParsedMessage,
        *,
        folder: str = INBOX,
        flags: Iterable[str] = (),
        redeliver: bool = False,
        keep_body: bool = True,
    ) -> AddResult:
        """Add a message from its raw bytes into ``folder`` with ``flags``; a message already here is unchanged.

        An expunged message is refused with ExpungedMessageError unless ``redeliver`` says it arrived again.
        ``keep_body=False`` leaves the body out of the blob store: a desktop serves it from its Maildir file.
        """
        parsed = raw if isinstance(raw, ParsedMessage) else parse_message(raw)
        folder_id = self.folder(folder).id
        normalised = tuple(sorted({normalise_flag(flag) for flag in flags}))
        shard = self._load_shard(parsed.shard)
        message_id = parsed.message_id
        if self._hold_depth:
            self._hold_transaction(shard)
        with self._operation(), shard.doc.transaction(origin=LOCAL):
            tombstoned = message_id in shard.expunged
            if not tombstoned and message_id in shard.messages:
                return AddResult(message_id, added=False)
            if tombstoned and not redeliver:
                raise ExpungedMessageError(
                    f"message {message_id} was expunged; deliver it again explicitly to bring it back"
                )
            if tombstoned:
                del shard.expunged[message_id]
            trustworthy_hint = not tombstoned and message_id not in shard.flagged_ids
            envelope = parsed.envelope
            if keep_body:
                self._pending.blobs[envelope.body_sha256] = parsed.raw
            shard.messages[message_id] = envelope.to_crdt()
            shard.placement[message_id] = folder_id
            for flag in normalised:
                shard.flags[message_id + _FLAG_SEPARATOR + flag] = True
            shard.flag_names.update(normalised)
            if normalised:
                shard.flagged_ids.add(message_id)
            self._touch(shard, message_id, self._pending.added)
            self._pending.added_envelopes[message_id] = envelope
            if not trustworthy_hint:
                return AddResult(message_id, added=True)  # flags from elsewhere exist: read the row back
            self._pending.row_hints[message_id] = IndexRow(
                message_id=message_id, shard=shard.name, folder_id=folder_id, date=envelope.date or 0,
                flags=normalised, sender=envelope.sender, subject=envelope.subject, size=envelope.size,
            )
        return AddResult(message_id, added=True)

    def resolve(self, id_or_prefix: str) -> str:
        """The full id of the one visible message whose id is or starts with ``id_or_prefix``."""
        prefix = id_or_prefix.strip().lower()
        if not prefix:
            raise UnknownMessageError("an empty message id matches nothing; `crdtmail ls` shows ids")
        matches = self._listing().find_ids(prefix, 2)
        if not matches:
            raise UnknownMessageError(f"no message with id {id_or_prefix!r}; `crdtmail ls` shows ids")
        if len(matches) > 1:
            raise AmbiguousMessageError(f"message id prefix {id_or_prefix!r} matches several messages; type more of it")
        return matches[0]

    def _remember_shard(self, message_id: str, shard_name: str) -> None:
        names = self._shard_names
        if message_id in names:
            names.move_to_end(message_id)
            return
        names[message_id] = shard_name
        if len(names) > SHARD_NAME_CACHE:
            names.popitem(last=False)

    def _shard_of(self, message_id: str) -> _Shard:
        """A message's shard (also of an expunged one: callers check), without asking SQLite when a listing or a
        look-up named it lately (SHARD_NAME_CACHE)."""
        shard_name = self._shard_names.get(message_id) or self._listing().locate(message_id)
        if shard_name is None:
            for shard in self._shards.values():  # added in a batch not yet committed
                if shard.visible_envelope(message_id) is not None:
                    return shard
            raise UnknownMessageError(f"no message with id {message_id!r}; `crdtmail ls` shows ids")
        self._remember_shard(message_id, shard_name)
        return self._load_shard(shard_name)

    def message(self, message_id: str) -> MessageView:
        """One message's envelope, effective folder and flags."""
        shard = self._shard_of(message_id)
        value = shard.visible_envelope(message_id)
        if value is None:
            raise UnknownMessageError(f"no message with id {message_id!r}; `crdtmail ls` shows ids")
        folder = shard.placement.get(message_id)
        return MessageView(
            id=message_id,
            shard=shard.name,
            folder_id=self._effective_folder(folder if isinstance(folder, str) else INBOX),
            envelope=Envelope.from_crdt(value),
            flags=shard.flags_of(message_id),
        )

    def envelope_in(self, message_id: str, shard_name: str) -> Envelope | None:
        """A visible message's envelope from the shard a derived row names (no look-up of the shard first)."""
        value = self._load_shard(shard_name).visible_envelope(message_id)
        return None if value is None else Envelope.from_crdt(value)

    def envelopes(self, message_ids: Iterable[str]) -> dict[str, Envelope]:
        """The envelopes of the visible messages among ``message_ids`` (committed ones: their shards are looked
        up in the derived index a few hundred at a time, where ``message`` costs a look-up per message)."""
        rows = self._listing().rows(list(message_ids))
        found = {}
        for message_id, row in rows.items():
            envelope = self.envelope_in(message_id, row.shard)
            if envelope is not None:
                found[message_id] = envelope
        return found

    def body(self, message_id: str) -> bytes | None:
        """The raw message from the blob store, or None if this replica does not hold the body."""
        return self._backend.get_blob(self.message(message_id).envelope.body_sha256)

    def move(self, message_id: str, folder: str) -> bool:
        """Place a message in ``folder``; returns False when it was already there."""
        folder_id = self.folder(folder).id
        shard = self._shard_of(message_id)
        visible, _, placed = shard.peek(message_id, placement=True)
        self._check_visible(visible, message_id)
        if placed == folder_id:
            return False

        def write() -> None:
            shard.placement[message_id] = folder_id

        self._change(shard, message_id, self._pending.moved, _RowPatch(folder_id=folder_id), write)
        return True

    def _check_visible(self, visible: bool, message_id: str) -> None:
        """Raise UnknownMessageError unless the message is visible in its shard here or listed in the store (which
        another process sharing it may have written first)."""
        if not visible and message_id not in self._listing().rows([message_id]):
            raise UnknownMessageError(f"no message with id {message_id!r}; `crdtmail ls` shows ids")

    def _change(self, shard: _Shard, message_id: str, kind: set[str], patch: _RowPatch,
                write: Callable[[], None]) -> None:
        """Make a local change to one message in one transaction and commit it; its listing row is the committed
        one patched at commit, unless something else of the message is pending (then it is read from the shard)."""
        patchable = message_id not in self._pending.touched.get(shard.name, ())
        with self._operation(), shard.doc.transaction(origin=LOCAL):
            self._pending.row_hints.pop(message_id, None)
            write()
            self._touch(shard, message_id, kind)
            if patchable:
                self._pending.row_hints[message_id] = patch

    def delete(self, message_id: str) -> bool:
        """Move a message to the trash folder (it stays recoverable until expunged)."""
        return self.move(message_id, self.role_folder(TRASH))

    def set_flags(self, message_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> bool:
        """Set and clear flags or keywords; returns whether anything changed."""
        to_add = {normalise_flag(flag) for flag in add}
        to_remove = {normalise_flag(flag) for flag in remove} - to_add
        shard = self._shard_of(message_id)
        # Only the keys this call may change are read: a mailbox with many keywords would otherwise pay a read
        # per keyword in use.
        prefix = message_id + _FLAG_SEPARATOR
        adds, removes = sorted(to_add), sorted(to_remove)
        visible, values, _ = shard.peek(message_id, [prefix + flag for flag in adds + removes])
        self._check_visible(visible, message_id)
        changes = [(flag, True) for flag, value in zip(adds, values, strict=False) if value is not True]
        changes += [(flag, False) for flag, value in zip(removes, values[len(adds):], strict=True) if value is True]
        if not changes:
            return False
        flags = shard.flags

        def write() -> None:
            for flag, value in changes:
                # A cleared flag is written as False, not deleted, so a concurrent set and clear resolve by
                # last-writer-wins instead of "set always wins".
                flags[prefix + flag] = value
                shard.flag_names.add(flag)
            shard.flagged_ids.add(message_id)

        patch = _RowPatch(add=frozenset(flag for flag, value in changes if value),
                          remove=frozenset(flag for flag, value in changes if not value))
        self._change(shard, message_id, self._pending.changed, patch, write)
        return True

    def expunge(self, message_id: str) -> None:
        """Remove a message for good (its envelope, placement and flags) and leave a tombstone."""
        shard = self._shard_of(message_id)
        if shard.visible_envelope(message_id) is None:
            raise UnknownMessageError(f"no message with id {message_id!r}; `crdtmail ls` shows ids")
        with self._operation(), shard.doc.transaction(origin=LOCAL):
            self._pending.row_hints.pop(message_id, None)
            for key in shard.flag_keys_of(message_id):
                del shard.flags[key]
            if message_id in shard.placement:
                del shard.placement[message_id]
            if message_id in shard.messages:
                del shard.messages[message_id]
            shard.expunged[message_id] = True
            self._touch(shard, message_id, self._pending.expunged)

    def rows(self, message_ids: Iterable[str]) -> dict[str, IndexRow]:
        """The derived rows of the visible messages among ``message_ids`` (absent ids are expunged or unknown).

        ``folder_id`` in a row is the effective folder: a message placed in a deleted folder shows in the trash.
        """
        rows = self._listing().rows(list(message_ids))
        live = {folder.id for folder in self.folders()}
        trash = self.role_folder(TRASH)
        return {
            message_id: row if row.folder_id in live else dataclasses.replace(row, folder_id=trash)
            for message_id, row in rows.items()
        }

    def index_rows(self) -> list[IndexRow]:
        """Every visible message's derived row, with effective folders as ``rows`` gives them."""
        live = {folder.id for folder in self.folders()}
        trash = self.role_folder(TRASH)
        return [row if row.folder_id in live else dataclasses.replace(row, folder_id=trash)
                for row in self._listing().all_rows()]

    def effective_folder(self, folder_id: str) -> str:
        """The folder a message placed in ``folder_id`` shows in (the trash when that folder was deleted)."""
        return self._effective_folder(folder_id)

    def is_expunged(self, message_id: str, shard_name: str) -> bool:
        """Whether the message was expunged (and not redelivered) in ``shard_name``."""
        return message_id in self._load_shard(shard_name).expunged

    # ------------------------------------------------------------------------------------------ listings

    def list_folder(self, folder: str, *, offset: int = 0, limit: int = 50) -> list[IndexRow]:
        """A folder's messages newest first, from the derived index (no shard is loaded)."""
        target = self.folder(folder)
        folder_ids = [target.id]
        if target.role == TRASH:
            folder_ids.extend(self._orphan_folder_ids())
        rows = self._listing().list_folder(folder_ids, max(0, offset), max(0, limit))
        for row in rows:
            self._remember_shard(row.message_id, row.shard)
        return rows

    def _orphan_folder_ids(self) -> list[str]:
        live = {folder.id for folder in self.folders()}
        return [folder_id for folder_id in self._listing().folder_counts() if folder_id not in live]

    def counts(self) -> dict[str, FolderCount]:
        """Total and unread messages per live folder id (messages of deleted folders count in the trash)."""
        live = {folder.id for folder in self.folders()}
        result = {folder_id: FolderCount(0, 0) for folder_id in live}
        trash = self.role_folder(TRASH)
        for folder_id, count in self._listing().folder_counts().items():
            target = folder_id if folder_id in live else trash
            prior = result.get(target, FolderCount(0, 0))
            result[target] = FolderCount(prior.total + count.total, prior.unread + count.unread)
        return result

    # ------------------------------------------------------------------------------------ sync interface

    def document_names(self) -> list[str]:
        """Every document this replica stores (the index first)."""
        names = set(self._backend.document_names()) | set(self._shards) | set(self._pending.stored_whole) | {INDEX_DOC}
        return sorted(names, key=lambda name: (name != INDEX_DOC, name))

    def document_state_vector(self, doc_name: str) -> bytes:
        """A document's state vector, from the backend when the document is not loaded."""
        if doc_name == INDEX_DOC:
            return self._index_doc.get_state()
        if doc_name in self._shards:
            return self._shards[doc_name].doc.get_state()
        if doc_name in self._pending.stored_whole:
            return self._pending.stored_whole[doc_name][1]
        return self._backend.state_vector(doc_name) or b"\x00"

    def encode_document(self, doc_name: str, state_vector: bytes | None = None) -> bytes:
        """The update a peer with ``state_vector`` lacks for ``doc_name`` (everything when None)."""
        if doc_name == INDEX_DOC:
            return self._index_doc.get_update(state_vector)
        if doc_name in self._pending.stored_whole:  # arrived whole in a batch not committed yet
            return _lacking(self._pending.stored_whole[doc_name][0], state_vector)
        if doc_name not in self._shards and is_shard_name(doc_name):
            # Serving a shard this replica does not have in memory: the stored bytes answer without building a
            # document (for a peer that has nothing of it, they are the answer as they are), which keeps a
            # serving peer's memory flat and an initial sync's first answers fast.
            parts = self._backend.load_document_parts(doc_name)
            if not parts:
                return _EMPTY_UPDATE
            if len(parts) == 1:
                return _lacking(parts[0], state_vector)
            if state_vector in (None, _EMPTY_STATE_VECTOR):
                # A snapshot and its log, for a peer that has nothing of the shard (an initial sync): Yrs merges
                # them without building a document (half the time, and no memory kept), and the merge becomes
                # the stored snapshot, so the next such answer is one read again.
                try:
                    return self._backend.fold_document(doc_name) or _EMPTY_UPDATE
                except StorageError as exc:
                    log.warning("mailbox %s: could not store the merged %s (%s); answering from memory",
                                self.name, doc_name, exc)
                    return merge_updates(*parts)
            # A snapshot and its log: rebuilding the document update by update beats merging them (and a
            # resync that asks for a diff usually brings changes to apply to it next).
            return self._load_shard(doc_name, parts).doc.get_update(state_vector)
        return self._load_shard(doc_name).doc.get_update(state_vector)

    def apply_update(self, doc_name: str, update: bytes, origin: Any, *, check_causality: bool = True) -> bool:
        """Apply a remote update to a document and commit it; observers see ``origin``.

        An update whose dependencies have not arrived yet is held back in memory (never handed to Yrs, whose
        pending-update handling loses data; see ``crdtmail.model.causal``) and applied as soon as they arrive;
        the call then returns False, and the caller should ask the sender for a state diff. A state diff
        computed against this replica's state vector cannot miss anything, so the sync layer passes
        ``check_causality=False`` for those and skips the decoding.
        """
        if origin == LOCAL or origin is None:
            raise ModelError("a remote update needs the origin it came from (not LOCAL)")
        if not is_document_name(doc_name):
            raise ModelError(f"{doc_name!r} is not a document of a mailbox")
        self._release_transactions()  # a remote origin cannot join a held LOCAL transaction
        if (not check_causality and doc_name not in self._shards and doc_name not in self._pending.stored_whole
                and is_shard_name(doc_name) and not self._held.get(doc_name)
                and self._backend.state_vector(doc_name) is None and self._store_whole(doc_name, update, origin)):
            return True
        doc = self._index_doc if doc_name == INDEX_DOC else self._load_shard(doc_name).doc
        state_before = self._known_states.get(doc_name)
        if state_before is None:
            state_before = decode_state_vector(doc.get_state())
        missing, state_after = check_update(update, state_before) if check_causality else (False, None)
        if missing:
            held = self._held.setdefault(doc_name, [])
            if len(held) >= MAX_HELD_UPDATES:
                # The oldest is dropped, not lost: the state-vector exchange of the next sync brings it again.
                held.pop(0)
            held.append((update, origin))
            return False
        arrived_whole = doc_name != INDEX_DOC and not state_before
        with self._operation():
            self._integrate(doc_name, doc, update, origin, whole=arrived_whole)
            if state_after is not None and not self._held.get(doc_name):
                self._known_states[doc_name] = state_after  # what the commit would decode from the document
            waiting = self._held.get(doc_name)
            while waiting:
                state = decode_state_vector(doc.get_state())
                ready = [entry for entry in waiting if not missing_dependencies(entry[0], state)]
                if not ready:
                    break
                for entry in ready:
                    waiting.remove(entry)
                    self._integrate(doc_name, doc, entry[0], entry[1], whole=False)
        if arrived_whole:
            # A shard that arrived whole (an initial sync's history) is dropped once committed; kept in memory,
            # every shard of the mailbox would be at once (385 MB for a 100k-message initial sync). It reloads
            # when needed. Inside a batch that is when the batch ends.
            self._drop_after_commit.add(doc_name)
            self._drop_arrivals()
        return True

    def _store_whole(self, doc_name: str, update: bytes, origin: Any) -> bool:
        """Store a shard this replica has nothing of as it arrived (an initial sync's state diff), without building
        its document; its rows are built after the sync (``index_pending``). False if there is nothing in it.

        Building the document, reading its maps into rows and freeing it cost four times what the sync itself
        does (a fresh replica of 100k messages: 3.6 s against 0.9). Yrs decodes the whole update to compute its
        state vector, so a malformed one is refused here, before anything is stored.
        """
        state_vector = get_state(update)
        if state_vector == _EMPTY_STATE_VECTOR:
            return False  # a delete set alone, or nothing: the ordinary path decides
        with self._operation():
            pending = self._pending
            pending.origins.append(origin)
            pending.updates.append((doc_name, update, origin))
            pending.documents.add(doc_name)
            pending.stored_whole[doc_name] = (update, state_vector)
        return True

    def _drop_arrivals(self) -> None:
        if self._batch_depth:
            return
        while self._drop_after_commit:
            name = self._drop_after_commit.pop()
            if not self._held.get(name):
                self._drop_if_idle(name)

    def _integrate(self, doc_name: str, doc: Doc[Any], update: bytes, origin: Any, *, whole: bool) -> None:
        """Apply one remote update; ``whole``: the document was empty (a shard arriving whole)."""
        self._pending.origins.append(origin)
        self._remote_origin = origin
        self._remote_changed = False
        # A shard arriving whole (an initial sync) would raise an event per key, and pycrdt builds each event
        # from the whole map: its maps are observed only after it arrived, and read once instead.
        self._bulk_document = doc_name if whole else None
        if self._bulk_document is None:
            self._watch_roots(doc_name)
        try:
            with doc.transaction(origin=origin):
                doc.apply_update(update)
        finally:
            self._remote_origin = None
            bulk, self._bulk_document = self._bulk_document, None
        # A shard that arrived whole has its maps observed from its next remote update on (_watch_roots is called
        # then) if it is still in memory: apply_update drops it once it is committed.
        if bulk is not None and self._remote_changed:
            # The rows become hints, so the commit reads none of the shard's maps again.
            pending = self._pending
            rows, arrived = self._read_shard(self._shards[doc_name], pending.added_envelopes)
            pending.touched.setdefault(doc_name, set()).update(arrived)
            pending.added.update(arrived)
            pending.row_hints.update(rows)
        if not self._remote_changed:
            # Everything in it was here already (a relay brought it twice): nothing to store or pass on, which
            # also stops an update from circling a loop of peers.
            return
        self._pending.updates.append((doc_name, update, origin))
        self._pending.documents.add(doc_name)

    def _watch_roots(self, doc_name: str) -> None:
        """Observe a document's maps, from its first remote update on: only remote changes need telling apart.

        Local operations record what they change themselves, so a replica that only imports never pays for map
        events; subscribing is expensive too (pycrdt inspects each callback), hence once per loaded document.
        """
        if doc_name in self._watched:
            return
        self._watched.add(doc_name)
        if doc_name == INDEX_DOC:
            self._folders.observe(self._on_folders_event)
            return
        shard = self._shards[doc_name]
        for root_name, root in (("messages", shard.messages), ("placement", shard.placement),
                                ("flags", shard.flags), ("expunged", shard.expunged)):
            subscription = observe_keys(root, functools.partial(self._on_shard_event, shard, root_name))
            self._subscriptions.setdefault(doc_name, []).append((None, subscription))

    def held_updates(self) -> int:
        """Remote updates waiting for their dependencies."""
        return sum(len(held) for held in self._held.values())

    def loaded_shards(self) -> list[str]:
        """The shards held in memory now."""
        return sorted(self._shards)

    def unload(self, shard_name: str) -> None:
        """Drop a loaded shard from memory (it reloads from the backend when next needed)."""
        if self._batch_depth == 0:
            self._release_transactions()
            self.write_deferred()
            self._forget(shard_name)

    def _forget(self, shard_name: str) -> None:
        """Drop a shard from memory, with its observers (or pycrdt would keep it alive)."""
        for target, subscription in self._subscriptions.pop(shard_name, []):
            if target is None:  # observe_keys
                subscription.drop()
            else:
                target.unobserve(subscription)
        self._shards.pop(shard_name, None)
        self._known_states.pop(shard_name, None)
        self._watched.discard(shard_name)

    # ---------------------------------------------------------------------------------- full-state reads

    def all_messages(self) -> Iterator[MessageView]:
        """Every visible message of every stored shard (loads them all: for checks and exports)."""
        for name in self.document_names():
            if not is_shard_name(name):
                continue
            shard = self._load_shard(name)
            flags = _flags_by_message(shard)
            for message_id, value in shard.messages.items():
                if message_id in shard.expunged:
                    continue
                folder = shard.placement.get(message_id)
                yield MessageView(
                    id=message_id,
                    shard=name,
                    folder_id=self._effective_folder(folder if isinstance(folder, str) else INBOX),
                    envelope=Envelope.from_crdt(value),
                    flags=frozenset(flags.get(message_id, ())),
                )

    def all_envelopes(self) -> Iterator[Envelope]:
        """The envelope of every visible message of every stored shard (no folders or flags).

        Each shard is read in one conversion; one loaded only for this is dropped again, so that a peer looking
        for the bodies it lacks does not end up holding every shard in memory.
        """
        for name in self.document_names():
            if not is_shard_name(name):
                continue
            was_loaded = name in self._shards
            shard = self._load_shard(name)
            messages, expunged = _map_dict(shard.messages), _map_dict(shard.expunged)
            if not was_loaded:
                self._drop_if_idle(name)
            for message_id, value in messages.items():
                if message_id not in expunged:
                    yield Envelope.from_crdt(value)

    def expunged_ids(self) -> set[str]:
        """Ids with a tombstone, across every stored shard."""
        result: set[str] = set()
        for name in self.document_names():
            if is_shard_name(name):
                shard = self._load_shard(name)
                result.update(shard.expunged.keys())
        return result


__all__ = [
    "INBOX",
    "INDEX_DOC",
    "LOCAL",
    "ROLES",
    "SCHEMA_VERSION",
    "TRASH",
    "UNDATED",
    "AddResult",
    "Folder",
    "Mailbox",
    "MailboxChange",
    "MessageView",
    "is_document_name",
    "is_shard_name",
]
