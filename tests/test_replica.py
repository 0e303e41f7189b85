"""Replica: a data directory opened from a path given as a Path or a string."""

from __future__ import annotations

from pathlib import Path

import pytest

from crdtmail.errors import StorageError
from crdtmail.replica import Replica


def test_a_data_directory_given_as_a_string_opens_like_a_path(tmp_path: Path) -> None:
    with Replica.init(str(tmp_path / "data")) as created:
        peer_id = created.peer_id
    with Replica.open(str(tmp_path / "data"), config_path=str(tmp_path / "data" / "config.toml")) as reopened:
        assert reopened.peer_id == peer_id and reopened.data_dir == tmp_path / "data"


def test_opening_a_directory_that_was_never_initialised_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="run `crdtmail init` first"):
        Replica.open(str(tmp_path / "nothing"))
