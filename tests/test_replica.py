"""Replica: a data directory opened from a path given as a Path or a string."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crdtmail.errors import DataDirInUseError, StorageError
from crdtmail.replica import Replica


def test_a_data_directory_given_as_a_string_opens_like_a_path(tmp_path: Path) -> None:
    with Replica.init(str(tmp_path / "data")) as created:
        peer_id = created.peer_id
    with Replica.open(str(tmp_path / "data"), config_path=str(tmp_path / "data" / "config.toml")) as reopened:
        assert reopened.peer_id == peer_id and reopened.data_dir == tmp_path / "data"


def test_opening_a_directory_that_was_never_initialised_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="run `crdtmail init` first"):
        Replica.open(str(tmp_path / "nothing"))


def test_one_peer_at_a_time_claims_a_data_directory(tmp_path: Path) -> None:
    """A second peer on a data directory is refused with one line naming the first one's pid; once the first
    closes (or its process ends), the directory can be claimed again. Opening it for anything else still works."""
    first = Replica.init(tmp_path / "desk")
    first.claim_for_peer()
    first.claim_for_peer()  # claiming again from the same replica is a no-op
    second = Replica.open(tmp_path / "desk")  # a one-shot command beside the peer
    try:
        with pytest.raises(DataDirInUseError, match=rf"another crdtmail peer \(pid {os.getpid()}\) is running on"):
            second.claim_for_peer()
        assert second.mailbox("default", create=True).counts() is not None
        first.close()
        second.claim_for_peer()
    finally:
        first.close()
        second.close()
    with Replica.open(tmp_path / "desk") as third:
        third.claim_for_peer()
