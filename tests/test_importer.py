"""Reading Maildir, Maildir++ and mbox sources on real files, odd ones included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crdtmail.errors import ImportSourceError
from crdtmail.importer import ImportItem, ImportProblem, decode_mutf7, detect_source, scan
from crdtmail.model.flags import ANSWERED, DELETED, DRAFT, FLAGGED, FORWARDED, SEEN
from crdtmail.sample import generate_messages, odd_messages, write_maildir, write_mbox
from tests.conftest import make_raw


def maildir(root: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def items_of(path: Path) -> tuple[list[ImportItem], list[ImportProblem]]:
    found = list(scan(path).items())
    return ([i for i in found if isinstance(i, ImportItem)], [p for p in found if isinstance(p, ImportProblem)])


def test_round_trip_of_a_generated_maildir_plus_plus_tree(tmp_path: Path) -> None:
    messages = list(generate_messages(150, seed=5))
    write_maildir(tmp_path / "Maildir", messages)
    source = scan(tmp_path / "Maildir")
    assert source.kind == "maildir" and source.total == 150
    items, problems = items_of(tmp_path / "Maildir")
    assert not problems
    expected = sorted((m.folder, sorted(m.flags), m.raw) for m in messages)
    assert expected == sorted((i.folder, sorted(i.flags), i.raw) for i in items)
    assert {i.folder for i in items} >= {(), ("Work", "Projects"), ("Sent",)}


def test_maildir_flag_letters_and_separators(tmp_path: Path) -> None:
    root = maildir(tmp_path / "M")
    cases = {
        "1.a:2,S": {SEEN},
        "2.b:2,DFPRST": {DRAFT, FLAGGED, FORWARDED, ANSWERED, SEEN, DELETED},
        "3.c:2,Sabc": {SEEN},  # lowercase letters are other tools' keywords: ignored
        "4.d!2,FS": {FLAGGED, SEEN},  # the separator Windows tools use
        "5.e;2,R": {ANSWERED},
        "6.f": set(),  # no info part at all
        "7.g,U=12:2,S": {SEEN},  # another tool's tag before the info
        "8.h:2,": set(),
    }
    for name in cases:
        (root / "cur" / name).write_bytes(make_raw(name))
    (root / "new" / "9.new:2,S").write_bytes(make_raw("new"))  # new/ mail has no flags yet, whatever the name
    items, _ = items_of(root)
    flags = {Path(i.source).name: set(i.flags) for i in items}
    assert flags == {**cases, "9.new:2,S": set()}


def test_dot_files_tmp_leftovers_odd_names_and_unreadable_entries(tmp_path: Path) -> None:
    root = maildir(tmp_path / "M")
    (root / "cur" / ".hidden:2,S").write_bytes(make_raw("hidden"))
    (root / "tmp" / "123.half-delivered").write_bytes(b"From: x\n")
    odd_name = os.fsencode(str(root / "cur")) + b"/1.\xff\xfe-latin:2,S"
    with open(odd_name, "wb") as handle:
        handle.write(make_raw("odd name"))
    (root / "cur" / "2.directory:2,S").mkdir()
    (root / "cur" / "3.dangling:2,S").symlink_to(tmp_path / "nowhere")
    source = scan(root)
    assert any("tmp/" in skipped for skipped in source.skipped)
    items, problems = items_of(root)
    assert [b"odd name" in i.raw for i in items] == [True]
    assert sorted(Path(p.source).name for p in problems) == ["2.directory:2,S", "3.dangling:2,S"]


def test_maildir_plus_plus_folder_names(tmp_path: Path) -> None:
    root = maildir(tmp_path / "M")
    maildir(root / ".Work.Projects")
    maildir(root / ".Caf&AOk-")
    (root / ".NotAMaildir").mkdir()
    (root / ".Work.Projects" / "cur" / "1:2,S").write_bytes(make_raw())
    (root / ".Caf&AOk-" / "cur" / "1:2,S").write_bytes(make_raw())
    source = scan(root)
    assert any(".NotAMaildir" in s for s in source.skipped)
    assert {i.folder for i in items_of(root)[0]} == {("Work", "Projects"), ("Café",)}
    assert decode_mutf7("&ZeVnLIqe-") == "日本語" and decode_mutf7("a&-b") == "a&b"


def test_mbox_with_quoting_crlf_status_and_a_truncated_end(tmp_path: Path) -> None:
    path = tmp_path / "mail.mbox"
    path.write_bytes(
        b"From a@b Mon Nov  2 10:00:00 2026\n"
        b"From: a@b\nSubject: one\nStatus: RO\nX-Status: AF\n\nbody\n>From the start of a line\n\n"
        b"From c@d Mon Nov  2 11:00:00 2026\r\n"
        b"From: c@d\r\nSubject: two\r\n\r\ncrlf body\r\n\r\n"
        b"From e@f Mon Nov  2 12:00:00 2026\n"
        b"From: e@f\nSubject: cut sh"
    )
    assert detect_source(path) == "mbox"
    source = scan(path)
    assert source.total == 3
    items, problems = items_of(path)
    assert not problems and len(items) == 3
    assert items[0].raw.endswith(b"body\nFrom the start of a line\n")
    assert items[0].flags == {SEEN, ANSWERED, FLAGGED}
    assert items[1].raw == b"From: c@d\r\nSubject: two\r\n\r\ncrlf body\r\n"
    assert items[2].raw == b"From: e@f\nSubject: cut sh"


def test_generated_mbox_round_trip(tmp_path: Path) -> None:
    messages = list(generate_messages(40, seed=2))
    write_mbox(tmp_path / "x.mbox", messages)
    items, _ = items_of(tmp_path / "x.mbox")
    assert [i.raw.replace(b"\r\n", b"\n").rstrip(b"\n") for i in items] == [
        m.raw.replace(b"\r\n", b"\n").rstrip(b"\n") for m in messages
    ]


def test_odd_messages_all_import(tmp_path: Path) -> None:
    root = maildir(tmp_path / "M")
    for index, (name, raw) in enumerate(odd_messages()):
        (root / "cur" / f"{index}.{name}:2,S").write_bytes(raw)
    items, problems = items_of(root)
    assert len(items) == len(odd_messages()) and not problems


@pytest.mark.parametrize("make", ["missing", "empty-dir", "text-file", "empty-file"])
def test_sources_that_are_not_mail(tmp_path: Path, make: str) -> None:
    path = tmp_path / "thing"
    if make == "empty-dir":
        path.mkdir()
    elif make == "text-file":
        path.write_text("hello\nworld\n")
    elif make == "empty-file":
        path.write_bytes(b"")
    with pytest.raises(ImportSourceError):
        scan(path)
