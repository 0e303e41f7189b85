"""Pairing, revoking and checking device tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from crdtmail.auth import DeviceRegistry
from crdtmail.errors import ConfigError
from crdtmail.storage.sqlite import SqliteStore


def test_pair_authenticate_and_unpair(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "db.sqlite3") as store:
        registry = DeviceRegistry(store)
        token = registry.pair("phone", ["personal"])
        other = registry.pair("tablet", ["personal", "work"])
        assert token != other and len(token) >= 40
        device = registry.authenticate(token)
        assert device is not None and device.name == "phone"
        assert device.may_see("personal") and not device.may_see("work")
        assert registry.authenticate(token + "x") is None
        assert registry.authenticate("") is None
        assert [d.name for d in registry.devices()] == ["phone", "tablet"]
        assert token.encode() not in (tmp_path / "db.sqlite3").read_bytes()  # only its hash is stored
        new_token = registry.pair("phone", ["personal"])  # pairing again replaces the token
        assert registry.authenticate(token) is None and registry.authenticate(new_token) is not None
        assert registry.unpair("phone") and not registry.unpair("phone")
        assert registry.authenticate(new_token) is None


def test_tokens_never_look_like_options(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "db.sqlite3") as store:
        registry = DeviceRegistry(store)
        assert not any(registry.pair(f"d{n}", ["m"]).startswith("-") for n in range(300))


def test_bad_pairing_requests(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "db.sqlite3") as store:
        registry = DeviceRegistry(store)
        for name, mailboxes in [("", ["m"]), ("phone", []), ("phone", ["bad name"]), ("x\n", ["m"])]:
            with pytest.raises(ConfigError):
                registry.pair(name, mailboxes)
