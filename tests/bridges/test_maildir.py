"""The Maildir bridge on real Maildirs in tmp_path: each change type both ways, conflicts, odd files."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from crdtmail.bridges.layout import MaildirFile, split_name
from crdtmail.bridges.maildir import EXPUNGED_AREA, MaildirBridge
from crdtmail.bridges.state import BridgeState, FileRecord
from crdtmail.bridges.write_worker import WriteWorker
from crdtmail.model.flags import FLAGGED, SEEN
from crdtmail.model.mailbox import INBOX, Mailbox
from crdtmail.model.message import parse_message
from crdtmail.replica import Replica
from crdtmail.storage.memory import MemoryBackend
from tests.conftest import make_raw


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


class Desk:
    """A desktop for tests: a Maildir, a replica and the bridge between them."""

    def __init__(self, base: Path, *, existing: bool = False) -> None:
        """A new desktop in ``base``; with ``existing``, the one already there, started again."""
        self.root = make_maildir(base / "Maildir")
        self.replica = Replica.open(base / "data") if existing else Replica.init(base / "data")
        self.box: Mailbox = self.replica.mailbox("default", create=not existing)
        blobs = self.replica.store.backend("")
        self.bridge = MaildirBridge(self.box, self.root, self.replica.store, blob=blobs.get_blob,
                                    drop_blobs=self.replica.store.delete_blobs)

    def deliver(self, raw: bytes, folder_dir: str = "", sub: str = "new", name: str | None = None) -> Path:
        directory = make_maildir(self.root / folder_dir) if folder_dir else self.root
        name = name or f"{hashlib.sha1(raw).hexdigest()[:12]}.test"
        path = directory / sub / name
        path.write_bytes(raw)
        return path

    def full(self) -> None:
        self.bridge.full_pass()

    def quick(self) -> None:
        self.bridge.quick_pass()

    def files(self) -> dict[str, list[tuple[str, str]]]:
        """message id -> [(folder dir, flag letters)] for every message file (outside the expunged area)."""
        found: dict[str, list[tuple[str, str]]] = {}
        for folder_dir in self.bridge.folder_dirs():
            for file in self.bridge.list_files(folder_dir):
                raw = self.bridge.path(file).read_bytes()
                found.setdefault(parse_message(raw).message_id, []).append((folder_dir, file.letters))
        return found

    def file_of(self, message_id: str) -> Path:
        record = self.bridge.state.primary(message_id)
        assert record is not None
        return self.bridge.path(record.file)

    def expunged_area_files(self) -> list[Path]:
        area = self.root / EXPUNGED_AREA
        return [p for p in area.rglob("*") if p.is_file()] if area.exists() else []


@pytest.fixture
def desk(tmp_path: Path) -> Desk:
    return Desk(tmp_path / "a")


def only_id(desk: Desk) -> str:
    rows = desk.box.index_rows()
    assert len(rows) == 1
    return rows[0].message_id


# ----------------------------------------------------------------------------------------- Maildir -> replica


def test_new_file_in_new_becomes_a_message_and_its_body_stays_in_the_maildir(desk: Desk) -> None:
    raw = make_raw("fresh")
    desk.deliver(raw)
    desk.full()
    message_id = only_id(desk)
    view = desk.box.message(message_id)
    assert view.folder_id == "inbox" and view.flags == frozenset()
    assert desk.box.body(message_id) is None  # not copied into the blob store
    assert desk.bridge.read_body(view.envelope.body_sha256) == raw


def test_new_file_in_cur_with_flags(desk: Desk) -> None:
    desk.deliver(make_raw("read"), sub="cur", name="1.a.host:2,FS")
    desk.full()
    assert desk.box.message(only_id(desk)).flags == {SEEN, FLAGGED}


def test_flag_rename_in_maildir_reaches_the_replica(desk: Desk) -> None:
    path = desk.deliver(make_raw("x"), sub="cur", name="1.b.host:2,")
    desk.full()
    message_id = only_id(desk)
    path.rename(path.with_name("1.b.host:2,S"))
    desk.bridge.quick_pass([str(path.with_name("1.b.host:2,S"))])
    assert desk.box.message(message_id).flags == {SEEN}
    (path.parent / "1.b.host:2,S").rename(path.parent / "1.b.host:2,")
    desk.full()
    assert desk.box.message(message_id).flags == frozenset()


def test_move_between_folder_directories_reaches_the_replica(desk: Desk) -> None:
    make_maildir(desk.root / ".Work")
    path = desk.deliver(make_raw("y"), sub="cur", name="2.c.host:2,S")
    desk.full()
    message_id = only_id(desk)
    target = desk.root / ".Work" / "cur" / path.name
    path.rename(target)
    desk.full()
    assert desk.box.folder(desk.box.message(message_id).folder_id).path == "Work"


def test_move_done_as_copy_then_delete_is_one_move(desk: Desk) -> None:
    make_maildir(desk.root / ".Work")
    raw = make_raw("copied")
    path = desk.deliver(raw, sub="cur", name="3.d.host:2,S")
    desk.full()
    message_id = only_id(desk)
    desk.deliver(raw, folder_dir=".Work", sub="cur", name="9.z.host:2,S")
    desk.full()
    path.unlink()
    desk.full()
    assert desk.box.folder(desk.box.message(message_id).folder_id).path == "Work"
    assert desk.files() == {message_id: [(".Work", "S")]}


def test_removed_file_is_expunged_and_not_brought_back(desk: Desk) -> None:
    raw = make_raw("gone")
    path = desk.deliver(raw)
    desk.full()
    message_id = only_id(desk)
    path.unlink()
    desk.full()
    assert desk.box.index_rows() == []
    assert desk.box.is_expunged(message_id, "2026-11")
    # A backup restored into the Maildir does not resurrect it: the file goes to the expunged area.
    desk.deliver(raw, sub="cur", name="restored:2,S")
    desk.full()
    assert desk.box.index_rows() == []
    assert [p.name for p in desk.expunged_area_files()] == ["restored:2,S"]


def test_folder_directories_created_renamed_and_removed(desk: Desk) -> None:
    make_maildir(desk.root / ".Projects")
    desk.full()
    assert "Projects" in [f.path for f in desk.box.folders()]
    folder_id = desk.box.folder("Projects").id
    desk.deliver(make_raw("p"), folder_dir=".Projects", sub="cur", name="4.e:2,")
    desk.full()
    (desk.root / ".Projects").rename(desk.root / ".Plans")
    desk.full()
    assert desk.box.folder(folder_id).path == "Plans"
    assert desk.box.message(only_id(desk)).folder_id == folder_id
    make_maildir(desk.root / ".Empty")
    desk.full()
    for sub in ("cur", "new", "tmp"):
        (desk.root / ".Empty" / sub).rmdir()
    (desk.root / ".Empty").rmdir()
    desk.full()
    assert "Empty" not in [f.path for f in desk.box.folders()]


def test_same_message_delivered_twice_is_one_message(desk: Desk) -> None:
    raw = make_raw("twice")
    desk.deliver(raw, name="first")
    desk.deliver(raw, name="second")
    desk.full()
    assert len(desk.box.index_rows()) == 1
    assert len(desk.files()[only_id(desk)]) == 2  # both files kept, nothing unlinked
    desk.full()
    assert len(desk.box.index_rows()) == 1


# ----------------------------------------------------------------------------------------- replica -> Maildir


def test_replica_flag_change_renames_the_file_keeping_foreign_tags(desk: Desk) -> None:
    desk.deliver(make_raw("tags"), sub="cur", name="5.f.host,U=12,S=300:2,a")
    desk.full()
    message_id = only_id(desk)
    desk.box.set_flags(message_id, add=[SEEN, FLAGGED])
    desk.quick()
    assert desk.file_of(message_id).name == "5.f.host,U=12,S=300:2,FSa"
    desk.box.set_flags(message_id, remove=[SEEN, FLAGGED])
    desk.quick()
    assert desk.file_of(message_id).name == "5.f.host,U=12,S=300:2,a"


def test_replica_flag_on_a_file_in_new_moves_it_to_cur(desk: Desk) -> None:
    desk.deliver(make_raw("new one"), name="6.g.host")
    desk.full()
    message_id = only_id(desk)
    desk.box.set_flags(message_id, add=[SEEN])
    desk.quick()
    path = desk.file_of(message_id)
    assert path.parent.name == "cur" and path.name == "6.g.host:2,S"


def test_windows_separator_is_kept(desk: Desk) -> None:
    desk.deliver(make_raw("win"), sub="cur", name="7.h.host!2,S")
    desk.full()
    message_id = only_id(desk)
    assert desk.box.message(message_id).flags == {SEEN}
    desk.box.set_flags(message_id, add=[FLAGGED])
    desk.quick()
    assert desk.file_of(message_id).name == "7.h.host!2,FS"


def test_replica_move_renames_into_the_other_folder(desk: Desk) -> None:
    desk.deliver(make_raw("mv"), sub="cur", name="8.i:2,S")
    desk.full()
    message_id = only_id(desk)
    desk.box.create_folder("Receipts/2026")
    desk.box.move(message_id, "Receipts/2026")
    desk.quick()
    path = desk.file_of(message_id)
    assert path.parent == desk.root / ".Receipts.2026" / "cur" and path.name == "8.i:2,S"


def test_message_new_to_the_desktop_is_delivered_and_its_blob_dropped(desk: Desk) -> None:
    raw = make_raw("from the phone")
    result = desk.box.add(raw, flags=[SEEN])
    desk.quick()
    path = desk.file_of(result.message_id)
    assert path.read_bytes() == raw and path.parent.name == "cur" and path.name.endswith(":2,S")
    sha256 = desk.box.message(result.message_id).envelope.body_sha256
    assert not desk.replica.store.backend("").has_blob(sha256)
    assert desk.bridge.read_body(sha256) == raw
    assert list((desk.root / "tmp").iterdir()) == []


def test_bodies_in_the_blob_store_are_found_with_one_look_up_per_group(tmp_path: Path) -> None:
    desk = Desk(tmp_path / "a")
    blobs = desk.replica.store.backend("")
    asked: list[list[str]] = []

    def stored(hashes: list[str]) -> set[str]:
        asked.append(list(hashes))
        return blobs.stored_blobs(hashes)

    desk.bridge = MaildirBridge(desk.box, desk.root, desk.replica.store, blob=blobs.get_blob,
                                drop_blobs=desk.replica.store.delete_blobs, stored_blobs=stored)
    raws = [make_raw(f"held {n}") for n in range(3)]
    held = [desk.box.add(raw).message_id for raw in raws]
    nowhere = make_raw("its body is nowhere yet")
    missing = desk.box.add(nowhere, keep_body=False).message_id
    desk.quick()
    assert len(asked) == 1 and len(asked[0]) == 4  # one look-up for the whole group, not one per message
    for message_id, raw in zip(held, raws, strict=True):
        assert desk.file_of(message_id).read_bytes() == raw
    assert desk.bridge.state.primary(missing) is None
    sha256 = hashlib.sha256(nowhere).hexdigest()
    assert desk.bridge.waiting_bodies == {sha256: missing}
    # The body arrives from a peer: the waiting message is delivered, its hash not read from the shard again.
    assert desk.bridge.take_body(sha256, nowhere)
    desk.quick()
    assert desk.file_of(missing).read_bytes() == nowhere and desk.bridge.waiting_bodies == {}


def test_replica_expunge_moves_the_file_to_the_expunged_area(desk: Desk) -> None:
    raw = make_raw("bye")
    desk.deliver(raw, sub="cur", name="9.j:2,S")
    desk.full()
    message_id = only_id(desk)
    desk.box.expunge(message_id)
    desk.quick()
    assert desk.files() == {}
    kept = desk.expunged_area_files()
    assert len(kept) == 1 and kept[0].read_bytes() == raw
    desk.full()  # and a rescan does not bring it back
    assert desk.box.index_rows() == [] and desk.files() == {}


def test_replica_folder_rename_and_delete(desk: Desk) -> None:
    desk.box.create_folder("Old")
    desk.quick()
    assert (desk.root / ".Old" / "cur").is_dir()
    desk.box.rename_folder("Old", "New")
    desk.quick()
    assert (desk.root / ".New" / "cur").is_dir() and not (desk.root / ".Old").exists()
    desk.box.delete_folder("New")
    desk.full()
    assert not (desk.root / ".New").exists()


def test_message_in_deleted_folder_moves_to_trash_directory(desk: Desk) -> None:
    desk.deliver(make_raw("orphan"), folder_dir=".Tmpf", sub="cur", name="10.k:2,")
    desk.full()
    message_id = only_id(desk)
    desk.box.delete_folder("Tmpf", move_to_trash=True)
    desk.full()
    assert desk.files() == {message_id: [(".Trash", "")]}


def test_new_file_in_the_directory_of_a_folder_deleted_meanwhile_goes_to_the_trash(desk: Desk) -> None:
    # A device deletes the folder while a mail filter delivers into its directory: the bridge raised
    # UnknownFolderError at every pass (found by tests/bridges/test_maildir_property.py).
    make_maildir(desk.root / ".Lists")
    desk.full()
    desk.box.delete_folder("Lists")
    desk.deliver(make_raw("filtered"), folder_dir=".Lists", sub="new", name="20.s")
    desk.full()
    message_id = only_id(desk)
    assert desk.box.folder(desk.box.message(message_id).folder_id).role == "trash"
    desk.quick()
    assert desk.files() == {message_id: [(".Trash", "")]}
    desk.full()
    assert not (desk.root / ".Lists").exists()


def test_file_moved_into_the_directory_of_a_folder_deleted_meanwhile_goes_to_the_trash(desk: Desk) -> None:
    make_maildir(desk.root / ".Lists")
    path = desk.deliver(make_raw("moved"), sub="cur", name="21.t:2,S")
    desk.full()
    message_id = only_id(desk)
    desk.box.delete_folder("Lists")
    path.rename(desk.root / ".Lists" / "cur" / path.name)
    desk.full()
    assert desk.box.folder(desk.box.message(message_id).folder_id).role == "trash"
    assert desk.files() == {message_id: [(".Trash", "S")]}
    desk.full()
    assert not (desk.root / ".Lists").exists()


def test_mail_for_a_folder_whose_empty_directory_was_renamed_meanwhile_brings_it_back(desk: Desk) -> None:
    # Another program renames the folder's empty directory while mail for the folder reaches the replica: the
    # pass that delivered it failed (no new/ to link into; found by tests/bridges/test_maildir_property.py).
    make_maildir(desk.root / ".Work")
    desk.full()
    (desk.root / ".Work").rename(desk.root / ".Later")
    message_id = desk.box.add(make_raw("for work"), folder="Work").message_id
    desk.full()
    assert desk.box.folder(desk.box.message(message_id).folder_id).path == "Work"
    assert desk.files() == {message_id: [(".Work", "")]}
    assert {"Work", "Later"} <= {folder.path for folder in desk.box.folders()}
    desk.full()
    assert desk.files() == {message_id: [(".Work", "")]}
    assert (desk.root / ".Later" / "cur").is_dir()


# ------------------------------------------------------------------------------------------ concurrent edits


def exchange(a: Mailbox, b: Mailbox) -> None:
    """Bring two replicas' documents in step both ways (what a sync session does)."""
    for _ in range(2):
        for source, target in ((a, b), (b, a)):
            for name in source.document_names():
                update = source.encode_document(name, target.document_state_vector(name))
                target.apply_update(name, update, origin="peer", check_causality=False)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Desk, Mailbox, str]:
    """A desktop with one message in cur/ and a second replica (a phone) in step with it."""
    desk = Desk(tmp_path / "desk")
    make_maildir(desk.root / ".Work")
    make_maildir(desk.root / ".Home")
    desk.deliver(make_raw("shared"), sub="cur", name="11.l:2,")
    desk.full()
    phone = Replica.init(tmp_path / "phone").mailbox("default", create=True)
    exchange(desk.box, phone)
    desk.quick()
    return desk, phone, only_id(desk)


def test_flag_vs_flag_both_apply(pair: tuple[Desk, Mailbox, str]) -> None:
    desk, phone, message_id = pair
    path = desk.file_of(message_id)
    path.rename(path.with_name("11.l:2,S"))
    phone.set_flags(message_id, add=[FLAGGED])
    desk.full()
    exchange(desk.box, phone)
    desk.quick()
    assert desk.box.message(message_id).flags == phone.message(message_id).flags == {SEEN, FLAGGED}
    assert desk.files() == {message_id: [("", "FS")]}


def test_move_vs_move_converges_to_one_folder_and_one_file(pair: tuple[Desk, Mailbox, str]) -> None:
    desk, phone, message_id = pair
    path = desk.file_of(message_id)
    path.rename(desk.root / ".Work" / "cur" / path.name)
    phone.move(message_id, "Home")
    desk.full()
    exchange(desk.box, phone)
    desk.quick()
    winner = desk.box.message(message_id).folder_id
    assert winner == phone.message(message_id).folder_id
    files = desk.files()[message_id]
    assert len(files) == 1
    assert desk.box.folder(winner).path == {".Work": "Work", ".Home": "Home"}[files[0][0]]


@pytest.mark.parametrize("maildir_change", ["move", "flag"])
def test_expunge_wins_over_a_concurrent_maildir_change(pair: tuple[Desk, Mailbox, str], maildir_change: str) -> None:
    desk, phone, message_id = pair
    path = desk.file_of(message_id)
    if maildir_change == "move":
        path.rename(desk.root / ".Work" / "cur" / path.name)
    else:
        path.rename(path.with_name("11.l:2,F"))
    phone.expunge(message_id)
    desk.full()
    exchange(desk.box, phone)
    desk.quick()
    assert desk.box.index_rows() == [] and phone.index_rows() == []
    assert desk.files() == {}
    assert len(desk.expunged_area_files()) == 1


def test_flag_vs_expunge_from_the_maildir_side(pair: tuple[Desk, Mailbox, str]) -> None:
    desk, phone, message_id = pair
    desk.file_of(message_id).unlink()
    phone.set_flags(message_id, add=[SEEN])
    desk.full()
    exchange(desk.box, phone)
    desk.quick()
    assert desk.box.index_rows() == [] and phone.index_rows() == []


# ------------------------------------------------------------------------------------------------ odd Maildirs


def test_odd_maildir_is_handled_and_nothing_is_lost(desk: Desk, caplog: pytest.LogCaptureFixture) -> None:
    plain = desk.deliver(make_raw("no info"), sub="cur", name="12.m.host")
    desk.deliver(make_raw("unknown letters"), sub="cur", name="13.n.host:2,SXyz")
    desk.deliver(b"not a message at all", sub="cur", name=".hidden")
    (desk.root / "tmp" / "half-written").write_bytes(b"From: x\r\n")
    odd_name = os.fsencode(str(desk.root / "cur")) + b"/14.o.\xff\xfe:2,S"
    with open(odd_name, "wb") as handle:
        handle.write(make_raw("non utf-8 name"))
    os.symlink(desk.root / "nowhere", desk.root / "cur" / "15.dangling:2,S")
    os.mkfifo(desk.root / "cur" / "16.fifo:2,")
    desk.full()
    subjects = {r.subject: r.flags for r in desk.box.index_rows()}
    assert subjects == {"no info": (), "unknown letters": (SEEN,), "non utf-8 name": (SEEN,)}
    assert "15.dangling" in caplog.text and "16.fifo" in caplog.text
    message_id = next(r.message_id for r in desk.box.index_rows() if r.subject == "unknown letters")
    desk.box.set_flags(message_id, add=[FLAGGED])
    desk.quick()
    assert split_name(desk.file_of(message_id).name)[1] == "FSXyz"
    odd_id = next(r.message_id for r in desk.box.index_rows() if r.subject == "non utf-8 name")
    desk.box.set_flags(odd_id, add=[FLAGGED])
    desk.quick()
    assert os.fsencode(desk.file_of(odd_id).name).endswith(b"\xff\xfe:2,FS")
    # Everything is still on disk, the odd and the unreadable included; a rescan changes nothing and logs nothing new.
    assert plain.exists() and (desk.root / "cur" / ".hidden").exists() and (desk.root / "tmp" / "half-written").exists()
    caplog.clear()
    desk.full()
    assert "16.fifo" not in caplog.text


def test_file_renamed_by_another_program_while_the_bridge_renames_it_is_found_again(desk: Desk) -> None:
    desk.deliver(make_raw("raced"), sub="cur", name="17.r.host:2,")
    desk.full()
    message_id = only_id(desk)
    path = desk.file_of(message_id)
    # The mail client marks it read at the moment a flag arrives from the phone: the bridge's rename misses.
    path.rename(path.with_name("17.r.host:2,S"))
    desk.box.set_flags(message_id, add=[FLAGGED])
    report, needs_full = desk.bridge.quick_pass()
    assert needs_full and report.renamed == 0
    desk.full()
    assert desk.box.message(message_id).flags == {SEEN, FLAGGED}
    assert desk.files() == {message_id: [("", "FS")]}


def test_expunged_area_older_than_the_retention_is_purged(desk: Desk) -> None:
    old = desk.root / EXPUNGED_AREA / "2001-01-01" / "INBOX"
    old.mkdir(parents=True)
    (old / "1.x:2,S").write_bytes(make_raw("ancient"))
    recent = desk.root / EXPUNGED_AREA / dt.datetime.now(dt.UTC).strftime("%Y-%m-%d") / "INBOX"
    recent.mkdir(parents=True)
    (recent / "2.x:2,S").write_bytes(make_raw("recent"))
    desk.full()
    assert not old.exists() and (recent / "2.x:2,S").exists()


def test_many_new_files_are_parsed_by_the_worker_process(desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    import crdtmail.bridges.maildir as bridge_module

    monkeypatch.setattr(bridge_module, "_WORKER_THRESHOLD", 1)
    raws = [make_raw(f"bulk {n}") for n in range(5)]
    for n, raw in enumerate(raws):
        desk.deliver(raw, sub="cur", name=f"{n}.bulk:2,S")
    with open(os.fsencode(str(desk.root / "cur")) + b"/odd.\xff:2,F", "wb") as handle:
        handle.write(make_raw("odd name"))
    os.mkfifo(desk.root / "cur" / "fifo:2,")
    desk.full()
    subjects = {row.subject: row.flags for row in desk.box.index_rows()}
    assert subjects == {**{f"bulk {n}": (SEEN,) for n in range(5)}, "odd name": (FLAGGED,)}
    assert desk.box.body(next(iter(desk.box.index_rows())).message_id) is None  # bodies stay in the files


def test_journal_and_state_rows_written_in_bulk_keep_their_order_and_close_together(desk: Desk) -> None:
    state = desk.bridge.state
    entries = [{"op": "deliver", "from": f"tmp/{n}", "to": f"new/{n}", "sha256": f"{n:064x}"} for n in range(950)]
    ids = state.journal_many(entries)  # more than one multi-row statement
    assert len(set(ids)) == 950 and ids == sorted(ids)
    assert [entry for _, entry in state.open_journal()] == entries
    assert [entry_id for entry_id, _ in state.open_journal()] == ids
    records = [FileRecord(f"u{n}", f"m{n}", INBOX, MaildirFile("", "new", f"u{n}"), "", f"{n:064x}")
               for n in range(950)]
    state.save(put=records, done_journal=ids[:900])
    assert [entry_id for entry_id, _ in state.open_journal()] == ids[900:]
    reloaded = BridgeState(desk.replica.store, "default")
    assert reloaded.records == {r.uid: r for r in records}
    state.save(done_journal=ids[900:])
    assert state.open_journal() == []


def test_a_large_group_of_deliveries_is_written_by_the_worker_process(desk: Desk) -> None:
    import crdtmail.bridges.maildir as bridge_module

    raws = [make_raw(f"group {n}") for n in range(bridge_module._WORKER_WRITES_MIN)]
    ids = [desk.box.add(raw, flags=[SEEN] if n % 2 else []).message_id for n, raw in enumerate(raws)]
    desk.quick()
    worker = desk.bridge._write_worker
    assert worker is not None and worker.pid not in (None, os.getpid())
    for n, (message_id, raw) in enumerate(zip(ids, raws, strict=True)):
        path = desk.file_of(message_id)
        assert path.read_bytes() == raw
        assert path.parent.name == ("cur" if n % 2 else "new")
    assert list((desk.root / "tmp").iterdir()) == [] and desk.bridge.state.open_journal() == []
    pid = worker.pid
    one = desk.box.add(make_raw("alone")).message_id
    desk.quick()  # a small group is written here, an fsync per file
    assert desk.file_of(one).exists() and worker.pid == pid
    desk.bridge.close()
    assert worker.pid is None and desk.bridge._write_worker is None


def test_a_disk_slower_than_the_link_holds_back_deliveries_instead_of_their_bodies(
        desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the writers behind, a pass hands them no more than the cap in bodies and leaves the rest for the pass
    after their writes; every message still arrives, once."""
    import threading

    import crdtmail.bridges.maildir as bridge_module

    raws = [make_raw(f"slow disk {n:02d}", body="x" * 2000) for n in range(12)]
    size = min(map(len, raws))  # they differ by a byte or two
    monkeypatch.setattr(bridge_module, "_MAX_WRITING_BYTES", 3 * size)  # three bodies
    monkeypatch.setattr(bridge_module, "_GROUP_BYTES", size)  # a group per body
    disk = threading.Event()
    settle = bridge_module._settle_group

    def slow_settle(writes: list[Any], directories: set[str]) -> None:
        disk.wait(10)
        settle(writes, directories)

    monkeypatch.setattr(bridge_module, "_settle_group", slow_settle)
    ids = [desk.box.add(raw).message_id for raw in raws]
    desk.bridge.background_writes = True
    report, _ = desk.bridge.quick_pass()
    assert report.delivered == 3 and report.waiting_for_the_disk == 9
    assert desk.bridge._writing_bytes < 4 * size
    report, _ = desk.bridge.quick_pass()  # the writers still have their hands full: nothing more taken
    assert report.delivered == 0 and report.waiting_for_the_disk == 9
    disk.set()
    for _ in range(20):
        desk.bridge.finish_deliveries(wait=True)
        if all(desk.bridge.state.primary(message_id) is not None for message_id in ids):
            break
        desk.bridge.quick_pass()
    assert [desk.file_of(message_id).read_bytes() for message_id in ids] == raws
    assert sum(len(found) for found in desk.files().values()) == len(raws)


def test_a_killed_worker_process_is_started_again_for_the_next_group(desk: Desk) -> None:
    import signal

    import crdtmail.bridges.maildir as bridge_module

    count = bridge_module._WORKER_WRITES_MIN
    [desk.box.add(make_raw(f"first {n}")) for n in range(count)]
    desk.quick()
    worker = desk.bridge._write_worker
    assert worker is not None and worker.pid is not None
    killed = worker.pid
    os.kill(killed, signal.SIGKILL)
    assert worker._process is not None and worker._process.wait(timeout=10) == -signal.SIGKILL
    ids = [desk.box.add(make_raw(f"second {n}")).message_id for n in range(count)]
    desk.quick()
    assert worker.pid not in (None, killed)
    assert all(desk.file_of(message_id).exists() for message_id in ids)
    desk.bridge.close()


def test_a_group_the_worker_could_not_rename_is_finished_by_recovery(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crdtmail.bridges.maildir as bridge_module

    original_submit = WriteWorker.submit

    def submit(worker: Any, *args: Any) -> Any:
        # Another program removes new/ while the worker writes: its renames into new/ fail after the files are
        # durable in tmp/.
        (desk.root / "new").rmdir()
        return original_submit(worker, *args)

    monkeypatch.setattr(WriteWorker, "submit", submit)
    raws = [make_raw(f"unplaced {n}") for n in range(bridge_module._WORKER_WRITES_MIN)]
    ids = [desk.box.add(raw).message_id for raw in raws]
    with pytest.raises(OSError, match="No such file"):
        desk.quick()
    assert sorted(p.read_bytes() for p in (desk.root / "tmp").iterdir()) == sorted(raws)
    assert len(desk.bridge.state.open_journal()) == len(raws)  # nothing recorded as delivered
    monkeypatch.setattr(WriteWorker, "submit", original_submit)
    desk.full()
    files = desk.files()
    assert sorted(files) == sorted(ids) and all(len(places) == 1 for places in files.values())
    for message_id, raw in zip(ids, raws, strict=True):
        assert desk.file_of(message_id).read_bytes() == raw
    assert desk.bridge.state.open_journal() == [] and list((desk.root / "tmp").iterdir()) == []
    desk.bridge.close()


def test_a_delivery_stopped_between_link_and_unlink_keeps_one_file(desk: Desk) -> None:
    raw = make_raw("linked, not yet unlinked")
    message_id = desk.box.add(raw).message_id
    sha256 = desk.box.message(message_id).envelope.body_sha256
    temporary, final = desk.root / "tmp" / "1.linked", desk.root / "new" / "1.linked"
    desk.bridge.state.journal_many([{"op": "deliver", "from": "tmp/1.linked", "to": "new/1.linked",
                                     "sha256": sha256}])
    temporary.write_bytes(raw)
    os.link(temporary, final)  # the process stopped here
    desk.full()
    assert not temporary.exists() and final.read_bytes() == raw
    assert desk.files() == {message_id: [("", "")]} and desk.bridge.state.open_journal() == []


def test_messages_of_a_shard_that_arrived_whole_wait_for_bodies_without_loading_it(desk: Desk) -> None:
    sender = Mailbox("sender", MemoryBackend())
    raws = [make_raw(f"synced {n}", date=f"Sat, 0{n + 1} Aug 2026 10:00:00 +0000") for n in range(4)]
    ids = [sender.add(raw).message_id for raw in raws]
    desk.box.apply_update("index", sender.encode_document("index"), origin="peer")
    desk.box.apply_update("2026-08", sender.encode_document("2026-08"), origin="peer")
    desk.quick()
    # The change brought the body hashes: the shard was not loaded again to learn them.
    assert "2026-08" not in desk.box.loaded_shards()
    assert sorted(desk.bridge.waiting_bodies.values()) == sorted(ids)
    for raw in raws:
        assert desk.bridge.take_body(hashlib.sha256(raw).hexdigest(), raw)
    desk.quick()
    assert desk.bridge.waiting_bodies == {}
    for message_id, raw in zip(ids, raws, strict=True):
        assert desk.file_of(message_id).read_bytes() == raw


def test_a_delivered_file_removed_before_its_event_was_read_is_looked_for(desk: Desk) -> None:
    message_id = desk.box.add(make_raw("delivered, then deleted by the mail client")).message_id
    desk.quick()
    path = desk.file_of(message_id)
    path.unlink()  # the watcher's create and delete events of this path reach the bridge as one batch
    _report, needs_full = desk.bridge.quick_pass([str(path)])
    assert needs_full  # not taken for the bridge's own, unchanged delivery
    desk.full()
    assert desk.box.rows([message_id]) == {} and desk.files() == {}
