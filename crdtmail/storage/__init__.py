"""Where replicas live: the SQLite store of a peer, and an in-memory backend for tests."""

from crdtmail.storage.memory import MemoryBackend
from crdtmail.storage.sqlite import SqliteMailboxBackend, SqliteStore

__all__ = ["MemoryBackend", "SqliteMailboxBackend", "SqliteStore"]
