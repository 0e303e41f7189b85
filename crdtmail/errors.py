"""Every error crdtmail raises on purpose, rooted in one base class.

The whole hierarchy::

    CrdtmailError                   base of everything below; str() is one line a person can act on
    ├── ConfigError                 the config file or a setting is wrong
    ├── StorageError                the peer's SQLite database cannot be used
    │   ├── CorruptStoreError       the database file is damaged or is not a crdtmail database
    │   ├── BlobIntegrityError      a body blob's bytes do not hash to the name it is stored under
    │   └── DataDirInUseError       another crdtmail peer is already running on the data directory
    ├── ModelError                  a mailbox operation was refused; nothing was changed
    │   ├── UnknownMessageError     no message has that id (or the prefix matches none)
    │   ├── AmbiguousMessageError   an id prefix matches more than one message
    │   ├── UnknownFolderError      no folder has that name or id
    │   ├── FolderExistsError       a folder with that name already exists
    │   ├── FolderNotEmptyError     deleting a folder that still holds messages
    │   └── ExpungedMessageError    adding a message that was expunged, without asking to redeliver it
    ├── MessageParseError           raw bytes are not a usable RFC 5322 message
    ├── ImportSourceError           an import path is missing or is not a Maildir, Maildir++ tree or mbox
    └── ProtocolError               the peer broke the sync protocol, or a call does not fit the connection
        ├── FrameError              a frame is malformed: truncated, bad varint or UTF-8, bad field, trailing bytes
        │   ├── FrameTooLargeError  a frame, or a length or count inside it, is over its limit
        │   └── UnknownFrameError   an unknown frame type or y-protocols sync message type
        ├── VersionMismatchError    the two peers speak different protocol versions
        ├── UnauthorizedMailboxError  a frame or call names a mailbox not granted on this connection
        ├── LimitExceededError      a per-connection limit: documents, blob wants, blob bytes being reassembled
        ├── ProtocolStateError      a frame arrived, or a call was made, in a state that does not allow it
        ├── BlobMismatchError       a received blob does not hash to the SHA-256 it was asked for by
        └── InvalidUpdateError      a document update from the peer cannot be decoded or applied

Errors that come from outside (OSError, sqlite3.Error) are wrapped at the layer boundary into one of these, so
the command line can print ``str(error)`` as its single line and exit non-zero.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousMessageError",
    "BlobIntegrityError",
    "BlobMismatchError",
    "ConfigError",
    "CorruptStoreError",
    "CrdtmailError",
    "DataDirInUseError",
    "ExpungedMessageError",
    "FolderExistsError",
    "FolderNotEmptyError",
    "FrameError",
    "FrameTooLargeError",
    "ImportSourceError",
    "InvalidUpdateError",
    "LimitExceededError",
    "MessageParseError",
    "ModelError",
    "ProtocolError",
    "ProtocolStateError",
    "StorageError",
    "UnauthorizedMailboxError",
    "UnknownFolderError",
    "UnknownFrameError",
    "UnknownMessageError",
    "VersionMismatchError",
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


class DataDirInUseError(StorageError):
    """Another crdtmail peer (serve, desktop, mobile, sync) is already running on this data directory."""


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


class ProtocolError(CrdtmailError):
    """The peer broke the sync protocol, or a local call does not fit the connection's state.

    Raised by the protocol layer's decoders and by local calls; a ``SyncConnection`` never lets one escape from
    ``receive_data``: it closes the connection with a matching close code instead.
    """


class FrameError(ProtocolError):
    """A frame is malformed: truncated, a bad varint or UTF-8 string, a bad field value, or trailing bytes."""


class FrameTooLargeError(FrameError):
    """A frame, or a length or count inside it, is over its limit."""


class UnknownFrameError(FrameError):
    """A frame type or y-protocols sync message type that this version does not know."""


class VersionMismatchError(ProtocolError):
    """The two peers speak different protocol versions; the message names both."""


class UnauthorizedMailboxError(ProtocolError):
    """A frame or call names a mailbox that was not granted on this connection."""


class LimitExceededError(ProtocolError):
    """A per-connection limit was exceeded: documents, outstanding blob wants, or blob bytes being reassembled."""


class ProtocolStateError(ProtocolError):
    """A frame arrived, or a local call was made, in a connection state that does not allow it."""


class BlobMismatchError(ProtocolError):
    """A blob received from the peer does not hash to the SHA-256 it was asked for by; it was discarded."""


class InvalidUpdateError(ProtocolError):
    """A document update from the peer cannot be decoded or applied."""
