"""Every error crdtmail raises on purpose, rooted in one base class.

The whole hierarchy::

    CrdtmailError                   base of everything below; str() is one line a person can act on
    ├── ConfigError                 the config file or a setting is wrong
    ├── StorageError                the peer's SQLite database cannot be used
    │   ├── CorruptStoreError       the database file is damaged or is not a crdtmail database
    │   └── BlobIntegrityError      a body blob's bytes do not hash to the name it is stored under
    ├── ModelError                  a mailbox operation was refused; nothing was changed
    │   ├── UnknownMessageError     no message has that id (or the prefix matches none)
    │   ├── AmbiguousMessageError   an id prefix matches more than one message
    │   ├── UnknownFolderError      no folder has that name or id
    │   ├── FolderExistsError       a folder with that name already exists
    │   ├── FolderNotEmptyError     deleting a folder that still holds messages
    │   └── ExpungedMessageError    adding a message that was expunged, without asking to redeliver it
    ├── MessageParseError           raw bytes are not a usable RFC 5322 message
    └── ImportSourceError           an import path is missing or is not a Maildir, Maildir++ tree or mbox

Errors that come from outside (OSError, sqlite3.Error) are wrapped at the layer boundary into one of these, so
the command line can print ``str(error)`` as its single line and exit non-zero.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousMessageError",
    "BlobIntegrityError",
    "ConfigError",
    "CorruptStoreError",
    "CrdtmailError",
    "ExpungedMessageError",
    "FolderExistsError",
    "FolderNotEmptyError",
    "ImportSourceError",
    "MessageParseError",
    "ModelError",
    "StorageError",
    "UnknownFolderError",
    "UnknownMessageError",
]


class CrdtmailError(Exception):
    """Base class of every error crdtmail raises on purpose; its message says what failed and what to do."""


class ConfigError(CrdtmailError):
    """The config file or one of its settings is invalid."""


class StorageError(CrdtmailError):
    """The peer's database cannot be opened, read or written."""


class CorruptStoreError(StorageError):
    """The database file is damaged or is not a crdtmail database."""


class BlobIntegrityError(StorageError):
    """A body blob's bytes do not hash to the SHA-256 it is named by."""


class ModelError(CrdtmailError):
    """A mailbox operation was refused; the mailbox is unchanged."""


class UnknownMessageError(ModelError):
    """No message has the given id, or no id starts with the given prefix."""


class AmbiguousMessageError(ModelError):
    """An id prefix matches more than one message."""


class UnknownFolderError(ModelError):
    """No folder has the given name or id."""


class FolderExistsError(ModelError):
    """A folder with the requested name already exists."""


class FolderNotEmptyError(ModelError):
    """A folder that still holds messages cannot be deleted unless its messages go to the trash."""


class ExpungedMessageError(ModelError):
    """The message was expunged; adding it again needs an explicit redelivery."""


class MessageParseError(CrdtmailError):
    """The bytes are not a usable RFC 5322 message."""


class ImportSourceError(CrdtmailError):
    """An import path is missing, unreadable, or not a Maildir, Maildir++ tree or mbox file."""
