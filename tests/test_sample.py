"""The sample mail generator: deterministic, realistic enough, parseable, and readable back by the importer."""

from __future__ import annotations

import datetime as dt
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from crdtmail.errors import MessageParseError
from crdtmail.importer import ImportItem, scan
from crdtmail.model.flags import DRAFT, SEEN
from crdtmail.model.message import UNDATED, parse_message
from crdtmail.sample import (
    DEFAULT_END,
    SampleMessage,
    generate_messages,
    main,
    odd_messages,
    write_maildir,
    write_mbox,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def many() -> list[SampleMessage]:
    return list(generate_messages(3000, seed=1))


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = list(generate_messages(80, seed=7))
    assert first == list(generate_messages(80, seed=7))
    assert [m.raw for m in first] != [m.raw for m in generate_messages(80, seed=8)]


@pytest.mark.parametrize("count", [0, 1, 2, 257])
def test_exactly_count_messages(count: int) -> None:
    assert sum(1 for _ in generate_messages(count, seed=count)) == count


def test_folders_and_flags_look_like_a_mailbox(many: list[SampleMessage]) -> None:
    folders = Counter(m.folder for m in many)
    assert set(folders) == {(), ("Sent",), ("Archive",), ("Work",), ("Work", "Projects"), ("Lists",), ("Trash",),
                            ("Junk",), ("Drafts",)}
    assert folders.most_common(1)[0][0] == ()
    assert 0 < folders[("Drafts",)] < folders[("Sent",)] < folders[()]
    assert all(m.flags == {DRAFT, SEEN} for m in many if m.folder == ("Drafts",))
    assert all(SEEN in m.flags for m in many if m.folder == ("Sent",))
    assert not any(DRAFT in m.flags for m in many if m.folder != ("Drafts",))
    old = [m for m in many if DEFAULT_END - m.date > dt.timedelta(days=30)]
    assert sum(SEEN in m.flags for m in old) / len(old) > 0.9
    keywords = Counter(flag for m in many for flag in m.flags)
    assert keywords["\\Flagged"] > 0 and keywords["\\Answered"] > 0 and keywords["$Forwarded"] > 0
    assert all(not m.flags for m in many if m.recent)
    assert any(m.recent for m in many) and any(not m.flags and not m.recent for m in many)


def test_every_message_parses_and_the_headers_are_realistic(many: list[SampleMessage]) -> None:
    parsed = [parse_message(m.raw) for m in many]
    ids = Counter(p.message_id for p in parsed)
    assert len(ids) > 0.99 * len(parsed)  # a few list copies share their Message-ID
    missing_id = sum(not p.envelope.message_id_header for p in parsed)
    assert 0 < missing_id < 0.02 * len(parsed)
    undated = sum(p.shard == UNDATED for p in parsed)
    assert 0 < undated < 0.02 * len(parsed)
    only_received = sum(1 for m, p in zip(many, parsed, strict=True)
                        if p.shard != UNDATED and not re.search(rb"^Date:", m.raw, re.MULTILINE))
    assert only_received > 0
    assert len({p.shard for p in parsed}) >= 12
    assert any(not p.envelope.sender.isascii() for p in parsed)
    assert all(m.raw.split(b"\n\n", 1)[0].isascii() for m in many)  # non-ASCII names go in RFC 2047 words
    assert sum(p.envelope.subject.startswith("Re: ") for p in parsed) > 0.2 * len(parsed)
    assert sum(b"\nList-Id: " in m.raw for m in many) > 0.05 * len(many)
    assert sum(b"multipart/alternative" in m.raw for m in many) > 0.2 * len(many)
    assert 0 < sum(b"Content-Transfer-Encoding: base64" in m.raw for m in many) < 0.2 * len(many)
    incoming = [m for m in many if m.folder not in (("Sent",), ("Drafts",))]
    assert sum(b"\nReceived: " in m.raw for m in incoming) > 0.95 * len(incoming)


def test_replies_point_at_earlier_messages(many: list[SampleMessage]) -> None:
    seen: set[bytes] = set()
    replies = 0
    for message in many:
        header = message.raw.split(b"\n\n", 1)[0]
        parent = re.search(rb"^In-Reply-To: (<[^>]+>)", header, re.MULTILINE)
        if parent:
            replies += 1
            assert parent.group(1) in seen
        own = re.search(rb"^Message-ID: (<[^>]+>)", header, re.MULTILINE)
        if own:
            seen.add(own.group(1))
    assert replies > 0.2 * len(many)


def test_dates_fall_in_the_requested_months() -> None:
    end = dt.datetime(2024, 3, 1)  # naive: taken as UTC
    messages = list(generate_messages(400, seed=3, start=end, months=2))
    for message in messages:
        assert end.replace(tzinfo=dt.UTC) - dt.timedelta(days=61) <= message.date <= end.replace(tzinfo=dt.UTC)
    assert [m.date for m in messages] == sorted(m.date for m in messages)
    shards = {parse_message(m.raw).shard for m in messages} - {UNDATED}
    assert shards <= {"2023-12", "2024-01", "2024-02", "2024-03"}


def test_sizes_have_a_long_tail(many: list[SampleMessage]) -> None:
    sizes = [len(m.raw) for m in many]
    assert 2_500 < statistics.median(sizes) < 6_000
    assert statistics.mean(sizes) > 1.6 * statistics.median(sizes)
    assert 50_000 < max(sizes) <= 320_000


def test_maildir_round_trip(tmp_path: Path, many: list[SampleMessage]) -> None:
    root = tmp_path / "Maildir"
    messages = many[:1200]
    assert write_maildir(root, messages, hostname="host:with/odd") == len(messages)
    scanned = scan(root)
    assert scanned.total == len(messages) and scanned.skipped == []
    items = list(scanned.items())
    assert all(isinstance(item, ImportItem) for item in items)
    got = Counter((i.folder, i.raw, i.flags) for i in items if isinstance(i, ImportItem))
    assert got == Counter((m.folder, m.raw, m.flags) for m in messages)

    for folder in {m.folder for m in messages}:
        directory = root / ("." + ".".join(folder)) if folder else root
        assert all((directory / sub).is_dir() for sub in ("cur", "new", "tmp"))
        assert (directory / "maildirfolder").exists() == bool(folder)
        assert os.listdir(directory / "tmp") == []
    name_rule = re.compile(r"^\d+\.M\d+P\d+Q\d+\.host\\072with\\057odd,S=(\d+)(:2,([A-Z]*))?$")
    for item in items:
        path = Path(item.source)
        match = name_rule.match(path.name)
        assert match, path.name
        assert int(match.group(1)) == path.stat().st_size
        assert (path.parent.name == "new") == (match.group(2) is None)
        letters = match.group(3) or ""
        assert list(letters) == sorted(letters)


def test_writing_twice_into_one_tree_makes_no_name_twice(tmp_path: Path) -> None:
    messages = list(generate_messages(30, seed=4))
    write_maildir(tmp_path / "M", messages)
    write_maildir(tmp_path / "M", messages)
    assert scan(tmp_path / "M").total == 60


def test_mbox_round_trip(tmp_path: Path, many: list[SampleMessage]) -> None:
    path = tmp_path / "sample.mbox"
    odd = [SampleMessage((), frozenset(), raw, DEFAULT_END) for _, raw in odd_messages() if raw.endswith(b"\n")]
    messages = [*many[:500], *odd]
    assert write_mbox(path, messages) == len(messages)
    assert any(re.search(rb"^From ", m.raw[1:], re.MULTILINE) for m in messages)  # quoting is exercised
    scanned = scan(path)
    assert scanned.kind == "mbox" and scanned.total == len(messages)
    assert [i.raw for i in scanned.items() if isinstance(i, ImportItem)] == [m.raw for m in messages]


def test_odd_messages() -> None:
    odd = dict(odd_messages())
    assert len(odd) == len(odd_messages())
    assert {"no-message-id", "no-date", "received-date-only", "utf8-headers", "latin1-headers", "crlf",
            "huge-header", "truncated", "rfc2047-subject", "future-date", "invalid-date", "duplicate-id-a",
            "duplicate-id-b"} <= set(odd)
    assert len(odd["huge-header"]) > 200_000 and b"\r\n" in odd["crlf"]
    parsed = {}
    for name, raw in odd.items():
        try:
            parsed[name] = parse_message(raw)
        except MessageParseError:
            pytest.fail(f"{name} does not parse")
    assert parsed["duplicate-id-a"].message_id == parsed["duplicate-id-b"].message_id
    assert odd["duplicate-id-a"] != odd["duplicate-id-b"]
    assert parsed["no-date"].shard == UNDATED and parsed["received-date-only"].shard == "2026-11"
    assert parsed["future-date"].shard == UNDATED and parsed["invalid-date"].shard == UNDATED


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["maildir", str(tmp_path / "M"), "--count", "25", "--seed", "2"]) == 0
    assert "wrote 25 messages" in capsys.readouterr().out
    assert scan(tmp_path / "M").total == 25
    with pytest.raises(SystemExit) as exited:
        main(["maildir", str(tmp_path / "X"), "--count", "-1"])
    assert exited.value.code == 2
    result = subprocess.run(
        [sys.executable, "-m", "crdtmail.sample", "mbox", str(tmp_path / "box.mbox"), "--count", "12"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 12 messages" in result.stdout and scan(tmp_path / "box.mbox").total == 12
