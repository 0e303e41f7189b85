"""What a Mailbox needs from the place it is kept: documents, the derived index, blobs, and atomic commits.

The model stays free of I/O by talking to a ``MailboxBackend``. Two implementations share one conformance suite
(tests/storage/test_backend_conformance.py): ``crdtmail.storage.memory.MemoryBackend`` for tests and
``crdtmail.storage.sqlite.SqliteStore`` (one SQLite database per peer data directory) for real peers.

The derived index holds one ``IndexRow`` per visible message, so listing a folder's newest messages and counting
unread mail never loads a shard. It is derived state: the backend remembers, per shard, the state vector the rows
were computed at, and the Mailbox recomputes a shard whose remembered vector differs from the stored document's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from crdtmail.model.flags import SEEN


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One visible message as the derived index lists it; ``folder_id`` is the raw placement."""

    message_id: str
    shard: str
    folder_id: str
    date: int  # epoch seconds; 0 for an undated message so it sorts last
    flags: tuple[str, ...]  # sorted
    sender: str
    subject: str
    size: int

    @property
    def seen(self) -> bool:
        """Whether the message carries \\Seen."""
        return SEEN in self.flags


@dataclass(frozen=True, slots=True)
class FolderCount:
    """Messages placed in one folder id, and how many of them are not \\Seen."""

    total: int
    unread: int


@dataclass(frozen=True, slots=True)
class DocumentUpdate:
    """One update to persist for a document, with the document's state vector after it."""

    doc_name: str
    update: bytes
    state_vector: bytes


@dataclass(slots=True)
class CommitBatch:
    """Everything one local or remote change writes, to be made durable in one atomic step.

    ``indexed_shards`` maps each shard whose derived rows are now up to date to the state vector they reflect.
    """

    updates: list[DocumentUpdate] = field(default_factory=list)
    rows_upsert: dict[str, IndexRow] = field(default_factory=dict)
    rows_delete: set[str] = field(default_factory=set)
    indexed_shards: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    replace_shards: set[str] = field(default_factory=set)  # drop every row of these shards first (a rebuild)
    # The committed rows some of ``rows_upsert`` were derived from (a flag change patches the stored row): the
    # store may then write only the columns that differ.
    rows_before: dict[str, IndexRow] = field(default_factory=dict)
    # The committing side's whole in-memory document, encoded on demand: a store folding its log may use it
    # instead of merging the log, which costs milliseconds per fold and keeps every overwritten value.
    encode_document: Callable[[str], bytes | None] | None = None

    def is_empty(self) -> bool:
        """True when committing would write nothing."""
        return not (
            self.updates or self.rows_upsert or self.rows_delete or self.indexed_shards or self.blobs
            or self.replace_shards
        )


class MailboxBackend(Protocol):
    """Durable home of one mailbox's documents, derived index and body blobs."""

    def load_document(self, doc_name: str) -> bytes | None:
        """The document's whole stored state as one update, or None if it was never stored."""
        ...

    def load_document_parts(self, doc_name: str) -> list[bytes]:
        """The document's stored state as updates in commit order (a snapshot first; empty if never stored).

        Applied in turn to an empty document they rebuild it, each after everything it depends on: several
        times faster than merging them into one update first.
        """
        ...

    def fold_document(self, doc_name: str) -> bytes | None:
        """Fold the document's stored updates into one snapshot, durably, and return it (None if never stored).

        For a full answer to a peer that has nothing of a document: merged once, it is one read from then on.
        """
        ...

    def document_names(self) -> list[str]:
        """Every stored document of this mailbox."""
        ...

    def state_vector(self, doc_name: str) -> bytes | None:
        """The stored document's state vector (without loading it), or None if it was never stored."""
        ...

    def commit(self, batch: CommitBatch) -> None:
        """Make the batch durable atomically: after return it survives SIGKILL; on error nothing of it is kept."""
        ...

    def indexed_state_vectors(self) -> dict[str, bytes]:
        """For each shard with derived rows, the state vector those rows were computed at."""
        ...

    def locate(self, message_id: str) -> str | None:
        """The shard holding a visible message, from the derived index."""
        ...

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        """Visible message ids starting with ``prefix``, at most ``limit`` of them, sorted."""
        ...

    def list_folder(self, folder_ids: Sequence[str], offset: int, limit: int) -> list[IndexRow]:
        """Rows placed in any of ``folder_ids``, newest first (date, then id, descending), paged."""
        ...

    def rows(self, message_ids: Sequence[str]) -> dict[str, IndexRow]:
        """The rows of the visible messages among ``message_ids``."""
        ...

    def ids_in_folder(self, folder_id: str) -> list[str]:
        """Every visible message id placed in ``folder_id``."""
        ...

    def folder_counts(self) -> dict[str, FolderCount]:
        """Total and unread messages per raw placement folder id."""
        ...

    def all_rows(self) -> Iterable[IndexRow]:
        """Every derived row (for checks and rebuild comparisons)."""
        ...

    def get_blob(self, sha256: str) -> bytes | None:
        """A body blob by its SHA-256 hex, verified; None if absent."""
        ...

    def has_blob(self, sha256: str) -> bool:
        """Whether a body blob is stored."""
        ...

    def stored_blobs(self, hashes: Sequence[str]) -> set[str]:
        """Which of ``hashes`` are stored (one look-up for many, where ``has_blob`` is one per blob)."""
        ...
