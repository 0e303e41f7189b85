"""Device pairing: random tokens, stored only as SHA-256 hashes, checked in constant time.

A token is 32 random bytes (base64url). Its hash is what the store keeps, so a copy of the database does not
let anyone in; the token itself is shown once, when the device is paired, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from crdtmail.config import valid_mailbox_name
from crdtmail.errors import ConfigError
from crdtmail.storage.sqlite import SqliteStore

TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class Device:
    """A paired device and the mailboxes it may sync."""

    name: str
    mailboxes: frozenset[str]
    created: int

    def may_see(self, mailbox: str) -> bool:
        """Whether this device was paired for ``mailbox``."""
        return mailbox in self.mailboxes


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class DeviceRegistry:
    """The paired devices of one peer, kept in its store."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def pair(self, name: str, mailboxes: Sequence[str]) -> str:
        """Pair (or re-pair) a device for ``mailboxes``; returns its new token, which is not stored."""
        if not name or len(name) > 100 or not name.isprintable():
            raise ConfigError(f"invalid device name {name!r}: use 1-100 printable characters")
        if not mailboxes:
            raise ConfigError("name at least one mailbox the device may sync (--mailbox NAME)")
        for mailbox in mailboxes:
            if not valid_mailbox_name(mailbox):
                raise ConfigError(f"invalid mailbox name {mailbox!r}")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        while token.startswith("-"):  # a leading "-" would read as an option on a command line
            token = secrets.token_urlsafe(TOKEN_BYTES)
        self._store.add_device(name, _hash(token), sorted(set(mailboxes)), int(time.time()))
        return token

    def unpair(self, name: str) -> bool:
        """Revoke a device's token; returns whether the device was paired."""
        return self._store.remove_device(name)

    def devices(self) -> list[Device]:
        """Every paired device (without tokens: only their hashes are kept)."""
        return [Device(name, frozenset(mailboxes), created) for name, _, mailboxes, created in self._store.devices()]

    def authenticate(self, token: str) -> Device | None:
        """The device a token belongs to, or None; every stored hash is compared, in constant time."""
        presented = _hash(token)
        found: Device | None = None
        for name, stored, mailboxes, created in self._store.devices():
            if hmac.compare_digest(presented, stored):
                found = Device(name, frozenset(mailboxes), created)
        return found
