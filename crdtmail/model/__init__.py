"""The mailbox model: pycrdt documents, typed operations and change events (pure: no I/O of its own)."""

from crdtmail.model.backend import CommitBatch, DocumentUpdate, FolderCount, IndexRow, MailboxBackend
from crdtmail.model.mailbox import (
    INBOX,
    INDEX_DOC,
    LOCAL,
    TRASH,
    AddResult,
    Folder,
    Mailbox,
    MailboxChange,
    MessageView,
    is_document_name,
    is_shard_name,
)
from crdtmail.model.message import Envelope, ParsedMessage, parse_message

__all__ = [
    "INBOX",
    "INDEX_DOC",
    "LOCAL",
    "TRASH",
    "AddResult",
    "CommitBatch",
    "DocumentUpdate",
    "Envelope",
    "Folder",
    "FolderCount",
    "IndexRow",
    "Mailbox",
    "MailboxBackend",
    "MailboxChange",
    "MessageView",
    "ParsedMessage",
    "is_document_name",
    "is_shard_name",
    "parse_message",
]
