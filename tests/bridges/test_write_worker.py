"""The bridge's write worker process: groups written durably and renamed, failures reported, names kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crdtmail.bridges.write_worker import WriteWorker, place_file, write_group


def maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def test_a_group_is_written_into_tmp_and_renamed_into_place(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    odd = os.fsdecode(b"odd.\xff:2,S")  # a name that is not UTF-8 crosses the pipe unchanged
    files = [(str(root / "tmp" / f"{n}.u"), str(root / "cur" / f"{n}.u:2,S"), f"body {n}".encode() * 100)
             for n in range(40)]
    files.append((str(root / "tmp" / "odd"), str(root / "cur" / odd), b"odd body"))
    worker = WriteWorker()
    try:
        worker.submit(files, {str(root / "cur")}).result(timeout=30)
        assert worker.pid not in (None, os.getpid())
    finally:
        worker.close()
    assert worker.pid is None
    for _, final, data in files:
        assert Path(final).read_bytes() == data
    assert os.listdir(root / "tmp") == []


def test_a_failed_step_is_reported_and_the_worker_serves_the_next_group(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    missing = root / "gone" / "cur"
    bad = [(str(root / "tmp" / f"b{n}"), str(missing / f"b{n}"), b"kept in tmp") for n in range(3)]
    good = [(str(root / "tmp" / "g"), str(root / "new" / "g"), b"good")]
    worker = WriteWorker()
    try:
        with pytest.raises(OSError, match="No such file"):
            worker.submit(bad, {str(missing)}).result(timeout=30)
        pid = worker.pid
        worker.submit(good, {str(root / "new")}).result(timeout=30)
        assert worker.pid == pid  # the same process goes on
    finally:
        worker.close()
    # The files written before the failing rename stay in tmp/, whole: the bridge's journal recovery finishes them.
    assert sorted(os.listdir(root / "tmp")) == ["b0", "b1", "b2"]
    assert all((root / "tmp" / f"b{n}").read_bytes() == b"kept in tmp" for n in range(3))
    assert (root / "new" / "g").read_bytes() == b"good"


def test_write_group_never_writes_over_an_existing_file(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    (root / "tmp" / "taken").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        write_group([(str(root / "tmp" / "taken"), str(root / "new" / "taken"), b"ours")], [])
    assert (root / "tmp" / "taken").read_bytes() == b"someone else's"
    assert os.listdir(root / "new") == []


def test_place_file_links_the_delivery_in_and_removes_its_tmp_name(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    (root / "tmp" / "one").write_bytes(b"one")
    place_file(str(root / "tmp" / "one"), str(root / "new" / "one"))
    assert (root / "new" / "one").read_bytes() == b"one" and os.listdir(root / "tmp") == []
    assert os.stat(root / "new" / "one").st_nlink == 1
    # A final name already taken is never replaced: the delivery stays in tmp/.
    (root / "tmp" / "two").write_bytes(b"ours")
    (root / "new" / "two").write_bytes(b"already there")
    with pytest.raises(FileExistsError):
        place_file(str(root / "tmp" / "two"), str(root / "new" / "two"))
    assert (root / "new" / "two").read_bytes() == b"already there" and (root / "tmp" / "two").read_bytes() == b"ours"


def test_ctrl_c_leaves_the_worker_to_the_bridge(tmp_path: Path) -> None:
    import signal
    import time

    root = maildir(tmp_path / "Maildir")
    worker = WriteWorker()
    try:
        worker.submit([(str(root / "tmp" / "a"), str(root / "new" / "a"), b"a")], set()).result(timeout=30)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
        time.sleep(0.2)
        worker.submit([(str(root / "tmp" / "b"), str(root / "new" / "b"), b"b")], set()).result(timeout=30)
        assert worker.pid == pid  # still the same process: the peer ends it, by closing its pipe
    finally:
        worker.close()
    assert sorted(os.listdir(root / "new")) == ["a", "b"]


def test_place_file_renames_where_the_file_system_has_no_hard_links(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def no_links(source: str, target: str) -> None:  # what vfat and some network file systems answer
        raise OSError(errno.EPERM, "Operation not permitted")

    root = maildir(tmp_path / "Maildir")
    (root / "tmp" / "one").write_bytes(b"one")
    monkeypatch.setattr(os, "link", no_links)
    place_file(str(root / "tmp" / "one"), str(root / "cur" / "one:2,S"))
    assert (root / "cur" / "one:2,S").read_bytes() == b"one" and os.listdir(root / "tmp") == []
