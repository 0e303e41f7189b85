"""An in-memory MailboxBackend: the same contract as the SQLite store, for unit and property tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import pycrdt

from crdtmail.errors import BlobIntegrityError
from crdtmail.model.backend import CommitBatch, FolderCount, IndexRow


class MemoryBackend:
    """Documents, derived rows and blobs in dicts; a commit is all-or-nothing like the SQLite store's."""

    def __init__(self) -> None:
        self._documents: dict[str, list[bytes]] = {}
        self._state_vectors: dict[str, bytes] = {}
        self._rows: dict[str, IndexRow] = {}
        self._indexed: dict[str, bytes] = {}
        self._blobs: dict[str, bytes] = {}

    def load_document(self, doc_name: str) -> bytes | None:
        """Everything committed for the document, merged into one update."""
        updates = self._documents.get(doc_name)
        if not updates:
            return None
        merged = pycrdt.merge_updates(*updates) if len(updates) > 1 else updates[0]
        self._documents[doc_name] = [merged]  # compaction, as the SQLite store does it
        return merged

    def fold_document(self, doc_name: str) -> bytes | None:
        """Everything committed for the document, merged into one update that replaces them."""
        return self.load_document(doc_name)

    def load_document_parts(self, doc_name: str) -> list[bytes]:
        """Everything committed for the document, update by update."""
        return list(self._documents.get(doc_name, ()))

    def document_names(self) -> list[str]:
        """Every stored document."""
        return sorted(self._documents)

    def state_vector(self, doc_name: str) -> bytes | None:
        """The state vector recorded with the document's last update."""
        return self._state_vectors.get(doc_name)

    def commit(self, batch: CommitBatch) -> None:
        """Apply the batch; blobs are verified first so a bad one leaves everything unchanged."""
        for sha256, data in batch.blobs.items():
            if hashlib.sha256(data).hexdigest() != sha256:
                raise BlobIntegrityError(f"blob {sha256} does not hash to its name; nothing was committed")
        for update in batch.updates:
            self._documents.setdefault(update.doc_name, []).append(update.update)
            self._state_vectors[update.doc_name] = update.state_vector
        if batch.replace_shards:
            self._rows = {k: v for k, v in self._rows.items() if v.shard not in batch.replace_shards}
            for shard in batch.replace_shards:
                self._indexed.pop(shard, None)
        for message_id in batch.rows_delete:
            self._rows.pop(message_id, None)
        self._rows.update(batch.rows_upsert)
        self._indexed.update(batch.indexed_shards)
        self._blobs.update(batch.blobs)

    def indexed_state_vectors(self) -> dict[str, bytes]:
        """The state vector each shard's rows were derived at."""
        return dict(self._indexed)

    def locate(self, message_id: str) -> str | None:
        """The shard of a visible message."""
        row = self._rows.get(message_id)
        return row.shard if row else None

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        """Visible ids starting with ``prefix``."""
        return sorted(mid for mid in self._rows if mid.startswith(prefix))[:limit]

    def list_folder(self, folder_ids: Sequence[str], offset: int, limit: int) -> list[IndexRow]:
        """Rows in the folders, newest first."""
        wanted = set(folder_ids)
        rows = [row for row in self._rows.values() if row.folder_id in wanted]
        rows.sort(key=lambda row: (row.date, row.message_id), reverse=True)
        return rows[offset : offset + limit]

    def rows(self, message_ids: Sequence[str]) -> dict[str, IndexRow]:
        """The rows of the visible messages among ``message_ids``."""
        return {m: self._rows[m] for m in message_ids if m in self._rows}

    def ids_in_folder(self, folder_id: str) -> list[str]:
        """Every visible id placed in the folder."""
        return [row.message_id for row in self._rows.values() if row.folder_id == folder_id]

    def folder_counts(self) -> dict[str, FolderCount]:
        """Total and unread per folder id."""
        totals: dict[str, list[int]] = {}
        for row in self._rows.values():
            entry = totals.setdefault(row.folder_id, [0, 0])
            entry[0] += 1
            entry[1] += not row.seen
        return {folder: FolderCount(total, unread) for folder, (total, unread) in totals.items()}

    def all_rows(self) -> Iterable[IndexRow]:
        """Every derived row."""
        return list(self._rows.values())

    def get_blob(self, sha256: str) -> bytes | None:
        """A blob, verified against its name."""
        data = self._blobs.get(sha256)
        if data is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError(f"blob {sha256} is corrupt: its bytes do not match its SHA-256")
        return data

    def has_blob(self, sha256: str) -> bool:
        """Whether the blob is held."""
        return sha256 in self._blobs

    def stored_blobs(self, hashes: Sequence[str]) -> set[str]:
        """Which of the blobs are held."""
        return {sha256 for sha256 in hashes if sha256 in self._blobs}
