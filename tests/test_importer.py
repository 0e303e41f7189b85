"""The importer on real files in tmp_path: Maildir, Maildir++ trees with odd names, and mbox files."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import threading
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtmail import importer
from crdtmail.errors import ImportSourceError
from crdtmail.importer import (
    ImportItem,
    ImportProblem,
    decode_mutf7,
    detect_source,
    encode_mutf7,
    scan,
)
from crdtmail.model.flags import ANSWERED, DELETED, DRAFT, FLAGGED, FORWARDED, SEEN
from crdtmail.sample import SampleMessage, odd_messages, write_maildir
from tests.conftest import make_raw

WHEN = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def maildir(path: Path, *, tmp: bool = True) -> Path:
    for sub in ("cur", "new", "tmp") if tmp else ("cur", "new"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def put(directory: Path, name: str | bytes, raw: bytes | None = None) -> bytes:
    """Write a message file; a bytes name may hold bytes that are not UTF-8."""
    raw = raw if raw is not None else make_raw(f"file {name!r}")
    target = os.path.join(os.fsencode(directory), name if isinstance(name, bytes) else os.fsencode(name))
    with open(target, "wb") as handle:
        handle.write(raw)
    return raw


def only_items(scanned: list[ImportItem | ImportProblem]) -> list[ImportItem]:
    return [item for item in scanned if isinstance(item, ImportItem)]


def only_problems(scanned: list[ImportItem | ImportProblem]) -> list[ImportProblem]:
    return [item for item in scanned if isinstance(item, ImportProblem)]


# ---------------------------------------------------------------------------------------------------------------
# detect_source


def test_detects_a_maildir_even_without_tmp(tmp_path: Path) -> None:
    assert detect_source(maildir(tmp_path / "m", tmp=False)) == "maildir"


def test_detects_a_maildirplusplus_tree_whose_root_has_no_cur(tmp_path: Path) -> None:
    maildir(tmp_path / "root" / ".Sent")
    assert detect_source(tmp_path / "root") == "maildir"


def test_detects_an_mbox_after_leading_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    path.write_bytes(b"\n\r\n  \nFrom someone Mon Nov  2 10:00:00 2026\nSubject: x\n\nbody\n")
    assert detect_source(path) == "mbox"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "not a Maildir"),
        (lambda p: (p / "cur").mkdir(parents=True), "not a Maildir"),
        (lambda p: p.write_bytes(b""), "neither a Maildir nor an mbox"),
        (lambda p: p.write_bytes(b"Subject: hello\n\nnot an mbox\n"), "neither a Maildir nor an mbox"),
        (lambda p: p.write_bytes(os.urandom(300_000).replace(b"\n", b"")), "neither a Maildir nor an mbox"),
        (lambda p: os.mkfifo(p), "not a regular file"),
    ],
    ids=["missing", "empty-dir", "cur-only", "empty-file", "plain-message", "binary", "fifo"],
)
def test_anything_else_is_one_clear_error_line(tmp_path: Path, make: object, expected: str) -> None:
    path = tmp_path / "source"
    make(path)  # type: ignore[operator]
    with pytest.raises(ImportSourceError) as caught:
        detect_source(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and str(path) in message
    with pytest.raises(ImportSourceError):
        scan(path)


# ---------------------------------------------------------------------------------------------------------------
# Maildir


def test_flags_come_from_the_info_with_every_separator(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    files = {
        "1000.A.host": ("new", frozenset()),
        "1001.B.host:2,S": ("new", frozenset()),  # new/ mail has no flags, whatever its name says
        "1002.C.host:2,FS": ("cur", frozenset({FLAGGED, SEEN})),
        "1003.D.host": ("cur", frozenset()),
        "1004.E.host!2,RS": ("cur", frozenset({ANSWERED, SEEN})),
        "1005.F.host;2,DT": ("cur", frozenset({DRAFT, DELETED})),
        "1006.G.host:2,PSXabz": ("cur", frozenset({FORWARDED, SEEN})),  # unknown and lowercase letters ignored
        "1007.H.host,S=1234:2,": ("cur", frozenset()),
        "1008.I.host,U=12:2,S": ("cur", frozenset({SEEN})),  # another tool's tag before the info
        "1009.J.host:2,DFPRST": ("cur", frozenset({DRAFT, FLAGGED, FORWARDED, ANSWERED, SEEN, DELETED})),
    }
    raws = {name: put(root / sub, name) for name, (sub, _) in files.items()}
    scanned = scan(root)
    items = list(scanned.items())
    assert scanned.kind == "maildir" and scanned.total == len(files) == len(items)
    assert [Path(item.source).name for item in only_items(items)] == sorted(files)
    for item in only_items(items):
        name = Path(item.source).name
        assert item.folder == ()
        assert item.flags == files[name][1], name
        assert item.raw == raws[name]
        assert item.sha256 == hashlib.sha256(item.raw).hexdigest()


def test_dot_files_and_tmp_leftovers_are_skipped_with_a_reason(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    kept = put(root / "cur", "1000.A.host:2,S")
    put(root / "cur", ".hidden")
    put(root / "new", ".DS_Store", b"junk")
    put(root / "tmp", "1001.B.host")
    scanned = scan(root)
    assert scanned.total == 1
    assert [item.raw for item in only_items(list(scanned.items()))] == [kept]
    reasons = "\n".join(scanned.skipped)
    assert ".hidden: a dot-file" in reasons and ".DS_Store: a dot-file" in reasons
    assert "1001.B.host: in tmp/" in reasons


def test_a_non_utf8_file_name_is_read_and_shown_safely(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    raw = put(root / "cur", b"1000.\xff\xfeweird.host:2,FS")
    [item] = list(scan(root).items())
    assert isinstance(item, ImportItem)
    assert item.raw == raw and item.flags == {FLAGGED, SEEN}
    assert "\\xff\\xfe" in item.source
    item.source.encode("utf-8")  # printable and JSON-safe: no lone surrogates


def test_unreadable_entries_become_problems_and_the_rest_is_imported(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    first = put(root / "cur", "1000.A.host:2,S")
    (root / "cur" / "1001.B.host:2,S").mkdir()
    (root / "cur" / "1002.C.host:2,S").symlink_to(tmp_path / "nowhere")
    os.mkfifo(root / "cur" / "1003.D.host:2,S")
    last = put(root / "new", "1004.E.host")
    scanned = scan(root)
    items: list[ImportItem | ImportProblem] = []
    reader = threading.Thread(target=lambda: items.extend(scanned.items()))
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "reading a FIFO must not block"
    assert scanned.total == len(items) == 5
    assert [item.raw for item in only_items(items)] == [first, last]
    problems = {Path(problem.source).name: problem.reason for problem in only_problems(items)}
    assert "directory" in problems["1001.B.host:2,S"]
    assert "symbolic link" in problems["1002.C.host:2,S"]
    assert "not a regular file" in problems["1003.D.host:2,S"]


def test_a_file_renamed_by_a_mail_client_during_the_import_is_still_read(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    put(root / "cur", "1000.A.host:2,")
    second = put(root / "cur", "1001.B.host:2,")
    doomed = put(root / "cur", "1002.C.host:2,")
    items = scan(root).items()
    next(items)  # the folder is listed now
    os.rename(root / "cur" / "1001.B.host:2,", root / "cur" / "1001.B.host:2,FS")
    os.unlink(root / "cur" / "1002.C.host:2,")
    renamed, gone = list(items)
    assert isinstance(renamed, ImportItem)
    assert renamed.raw == second and renamed.flags == {FLAGGED, SEEN}
    assert renamed.source.endswith("1001.B.host:2,FS")
    assert isinstance(gone, ImportProblem) and "disappeared" in gone.reason
    assert doomed  # written, then removed before it was read


def test_maildirplusplus_folders_with_mutf7_names(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    inbox = put(root / "cur", "1000.A.host:2,S")
    folders = {
        ".Sent": ("Sent",),
        ".Trash": ("Trash",),
        ".Work.Projects": ("Work", "Projects"),
        ".Entw&APw-rfe": ("Entwürfe",),
        ".&ZeVnLIqe-.Caf&AOk-": ("日本語", "Café"),
        ".AT&-T": ("AT&T",),
    }
    raws = {}
    for directory, path in folders.items():
        maildir(root / directory, tmp=directory != ".Sent")
        raws[path] = put(root / directory / "cur", f"2000.{len(raws)}.host:2,S")
    (root / ".notmuch" / "xapian").mkdir(parents=True)  # not a Maildir folder
    (root / "dovecot-uidlist").write_bytes(b"3 V1 N1\n")  # Dovecot's files beside the folders are no mail
    scanned = scan(root)
    assert scanned.folders == sorted([(), *folders.values()])
    assert any(".notmuch: not a Maildir folder" in reason for reason in scanned.skipped)
    items = only_items(list(scanned.items()))
    assert [item.folder for item in items] == scanned.folders
    by_folder = {item.folder: item.raw for item in items}
    assert by_folder == {(): inbox, **raws}


def test_a_tree_written_by_write_maildir_with_unicode_folders(tmp_path: Path) -> None:
    messages = [
        SampleMessage(folder=folder, flags=flags, raw=make_raw(str(index)), date=WHEN, recent=not flags)
        for index, (folder, flags) in enumerate(
            [((), frozenset()), (("Entwürfe",), frozenset({DRAFT, SEEN})), (("Ärger", "日本"), frozenset({SEEN})),
             (("Work", "Projects"), frozenset({FORWARDED, ANSWERED, SEEN})), (("A&B",), frozenset())]
        )
    ]
    root = tmp_path / "Maildir"
    assert write_maildir(root, messages) == len(messages)
    assert (root / ".Entw&APw-rfe" / "maildirfolder").exists()
    assert (root / ".A&-B" / "cur").is_dir()
    got = {(item.folder, item.raw, item.flags) for item in only_items(list(scan(root).items()))}
    assert got == {(message.folder, message.raw, message.flags) for message in messages}


def test_every_odd_message_is_read_byte_for_byte(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    odd = odd_messages()
    for index, (name, raw) in enumerate(odd):
        put(root / "cur", f"{1000 + index}.{name}:2,S", raw)
    items = list(scan(root).items())
    assert [(item.raw, item.flags) for item in only_items(items)] == [(raw, {SEEN}) for _, raw in odd]


def test_an_empty_maildir_has_nothing_to_import(tmp_path: Path) -> None:
    scanned = scan(maildir(tmp_path / "Maildir"))
    assert scanned.total == 0 and list(scanned.items()) == [] and scanned.skipped == []


@pytest.mark.parametrize(
    ("name", "text"),
    [("&AMk-", "É"), ("&-", "&"), ("Entw&APw-rfe", "Entwürfe"), ("&ZeVnLIqe-", "日本語"),
     ("&2D3eAA-", "\U0001f600"), ("plain", "plain"), ("&!!-x", "&!!-x"), ("&AMk", "&AMk"), ("&AM-", "&AM-")],
)
def test_decode_mutf7(name: str, text: str) -> None:
    assert decode_mutf7(name) == text


@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_mutf7_round_trips(text: str) -> None:
    encoded = encode_mutf7(text)
    assert encoded.isascii()
    assert decode_mutf7(encoded) == text


# ---------------------------------------------------------------------------------------------------------------
# mbox

MBOX = (
    b"From alice@example.org Mon Nov  2 10:00:00 2026\n"
    b"From: alice@example.org\nSubject: one\nStatus: RO\nX-Status: AF\n\n"
    b"body line\n>From the quoted line\n>>From twice quoted\nFrom inside a paragraph is not a separator\n\n"
    b"From bob@example.org Mon Nov  2 11:00:00 2026\r\n"
    b"From: bob@example.org\r\nSubject: two\r\nStatus: O\r\n\r\nCRLF body\r\n\r\n"
    b"From carol@example.org Mon Nov  2 12:00:00 2026\n"
    b"From: carol@example.org\nX-Status: TD\nX-Mozilla-Status: 1003\nSubj"
)
MBOX_RAWS = [
    b"From: alice@example.org\nSubject: one\nStatus: RO\nX-Status: AF\n\n"
    b"body line\nFrom the quoted line\n>From twice quoted\nFrom inside a paragraph is not a separator\n",
    b"From: bob@example.org\r\nSubject: two\r\nStatus: O\r\n\r\nCRLF body\r\n",
    b"From: carol@example.org\nX-Status: TD\nX-Mozilla-Status: 1003\nSubj",
]


def test_mbox_split_unquote_flags_and_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "inbox.mbox"
    path.write_bytes(MBOX)
    scanned = scan(path)
    assert scanned.kind == "mbox" and scanned.total == 3
    items = list(scanned.items())
    assert [item.raw for item in only_items(items)] == MBOX_RAWS
    assert [item.flags for item in only_items(items)] == [
        {SEEN, ANSWERED, FLAGGED},
        frozenset(),  # "O" is "not new", which IMAP has no flag for
        {DRAFT, DELETED, SEEN, ANSWERED, FORWARDED},
    ]
    assert [item.source for item in only_items(items)] == [f"mbox:{path}#{n}" for n in (1, 2, 3)]
    assert all(item.folder == () for item in only_items(items))
    assert all(item.sha256 == hashlib.sha256(item.raw).hexdigest() for item in only_items(items))


def reference_split(data: bytes) -> list[bytes]:
    """The mbox rules, written as plainly as possible over the whole file in memory."""
    messages: list[list[bytes]] = []
    previous_blank = True
    for line in re.findall(rb"[^\n]*\n|[^\n]+$", data):  # lines end at LF only, as in an mbox
        if previous_blank and line.startswith(b"From "):
            messages.append([])
        elif messages:
            messages[-1].append(line[1:] if re.match(rb">+From ", line) else line)
        previous_blank = line in (b"\n", b"\r\n")
    for lines in messages:
        if lines and lines[-1] in (b"\n", b"\r\n"):
            lines.pop()
    return [b"".join(lines) for lines in messages]


LINES = st.sampled_from(
    [b"From x\n", b"From y\r\n", b"\n", b"\r\n", b">From q\n", b">>From q\n", b"a: b\n", b"text\r\n",
     b"From", b"a long line that is cut into several chunks\n", b"\r"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LINES, max_size=30))
def test_mbox_counting_and_splitting_agree_with_the_rules(tmp_path_factory: pytest.TempPathFactory,
                                                         lines: list[bytes]) -> None:
    data = b"".join(lines)
    path = tmp_path_factory.mktemp("mbox") / "box"
    path.write_bytes(data)
    expected = reference_split(data)
    # Tiny chunks and blocks put every boundary case (a line cut mid-way, a pattern across blocks) in reach.
    with mock.patch.object(importer, "_LINE_LIMIT", 7), mock.patch.object(importer, "_BLOCK", 5):
        assert importer._count_mbox(path) == len(expected)
        assert [item.raw for item in only_items(list(importer._mbox_items(path)))] == expected


def test_mbox_item_count_matches_total_for_a_large_line(tmp_path: Path) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"From a\nSubject: x\n\n" + b"y" * (3 * 1024 * 1024) + b"\n\nFrom b\nSubject: z\n\nbody\n")
    scanned = scan(path)
    items = only_items(list(scanned.items()))
    assert scanned.total == len(items) == 2
    assert len(items[0].raw) == len(b"Subject: x\n\n") + 3 * 1024 * 1024 + 1


def test_read_message_file_reads_whole_files_of_every_size(tmp_path: Path) -> None:
    from crdtmail.importer import read_message_file

    for size in (0, 1, 4095, 64 * 1024 + 3, 3 * 1024 * 1024 + 17):
        path = tmp_path / f"m{size}"
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        path.write_bytes(data)
        assert read_message_file(str(path)) == data


def test_read_message_file_takes_what_a_growing_file_added_after_fstat(tmp_path: Path) -> None:
    from crdtmail.importer import read_message_file

    path = tmp_path / "growing"
    data = b"Subject: grows\n\n" + b"y" * 200_000
    path.write_bytes(data)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:
        # As if the file was 100 bytes when looked at and grew before the read.
        fields = list(real_fstat(fd))
        fields[6] = 100
        return os.stat_result(fields)

    with mock.patch.object(importer.os, "fstat", stale_fstat):
        assert read_message_file(str(path)) == data


def test_an_import_leaves_every_document_folded_into_one_snapshot(tmp_path: Path) -> None:
    from crdtmail.replica import Replica
    from crdtmail.sample import generate_messages

    write_maildir(tmp_path / "Maildir", generate_messages(300, seed=5, months=3))
    with Replica.init(tmp_path / "data") as replica:
        report = replica.import_path(tmp_path / "Maildir")
        assert report.added == 300
        store = replica.store
        assert store._query("SELECT count(*) FROM updates") == [(0,)]
        assert store._query("SELECT count(*) FROM documents WHERE log_count > 0") == [(0,)]
        assert store._query("SELECT count(*) FROM documents WHERE name NOT IN (SELECT name FROM snapshots)") == [(0,)]
    with Replica.open(tmp_path / "data") as replica:
        assert sum(count.total for count in replica.mailbox("default").counts().values()) == 300
