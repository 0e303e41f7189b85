"""A deterministic generator of realistic mail, for the demo, the tests and the benchmarks.

Messages have what real mailboxes have: a few hundred correspondents (some with non-ASCII names in RFC 2047
words), threads with In-Reply-To and "Re:" subjects, mailing-list headers, Received chains, multipart bodies,
small attachments, sizes with a long tail (median about 4 KB, mean about 10 KB), a few without Message-ID or
Date. The same seed always gives the same bytes.

``python -m crdtmail.sample maildir PATH --count N`` writes a Maildir++ tree; ``mbox PATH`` an mbox file.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.header import Header
from email.utils import format_datetime
from pathlib import Path

from crdtmail.model.flags import ANSWERED, DRAFT, FLAGGED, FORWARDED, SEEN, maildir_info_from_flags

DEFAULT_END = dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)

_FIRST = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Radia", "Edsger", "Frances",
          "Donald", "Hedy", "Tim", "Katherine", "John", "Sophie", "Niklaus", "Joan", "Guido"]
_LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Ritchie", "Liskov", "Thompson", "Perlman",
         "Dijkstra", "Allen", "Knuth", "Lamarr", "Berners-Lee", "Johnson", "McCarthy", "Wilson", "Wirth", "Clarke"]
_UNICODE_NAMES = ["Zoë Ångström", "José Núñez", "Małgorzata Wójcik", "Søren Kierkegård", "Jürgen Müller",
                  "Renée Côté", "Ørjan Ødegård", "Łukasz Żółć", "田中 太郎", "Δημήτρης Παπαδόπουλος"]
_DOMAINS = ["example.org", "example.com", "mail.example.net", "lists.example.org", "corp.example.com"]
_TOPICS = ["quarterly report", "lunch on Friday", "release 2.4 planning", "invoice #{n}", "your order #{n}",
           "meeting notes", "travel itinerary", "build failure on main", "design review", "holiday schedule",
           "password reset", "new comment on issue #{n}", "weekly digest", "conference talk proposal",
           "server maintenance window", "budget draft", "team offsite", "contract renewal", "code review",
           "welcome aboard", "café opening ☕", "Grüße aus Berlin", "résumé attached", "数据报告", "photos"]
_WORDS = ("the of and to in is it that for on with as at this by from we be are an or have not you all can "
          "will one but has our more about which their if so when there some what up out do time would into "
          "mail sync replica folder message draft reply thread project deadline review change build test").split()
_LISTS = ["dev@lists.example.org", "announce@lists.example.org", "users@lists.example.org"]
# (folder path, weight): most mail sits in INBOX, then archives and project folders.
_FOLDERS: list[tuple[tuple[str, ...], int]] = [
    ((), 46), (("Archive",), 14), (("Sent",), 10), (("Work",), 8), (("Work", "Projects"), 6),
    (("Lists",), 10), (("Trash",), 3), (("Junk",), 2), (("Drafts",), 1),
]


@dataclass(frozen=True, slots=True)
class SampleMessage:
    """One generated message: the folder it belongs in, its flags and its raw bytes."""

    folder: tuple[str, ...]
    flags: frozenset[str]
    raw: bytes
    date: dt.datetime | None


def _address_pool(rng: random.Random, size: int = 200) -> list[tuple[str, str]]:
    people: list[tuple[str, str]] = []
    for index in range(size):
        if index % 12 == 0:
            name = rng.choice(_UNICODE_NAMES)
            local = f"user{index}"
        else:
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            name = f"{first} {last}"
            local = f"{first}.{last}".lower().replace("-", "")
        domain = rng.choice(_DOMAINS)
        people.append((name, f"{local}{index}@{domain}"))
    return people


def _format_address(name: str, address: str) -> str:
    if name.isascii():
        return f'"{name}" <{address}>' if "," in name else f"{name} <{address}>"
    return f"{Header(name, 'utf-8').encode()} <{address}>"


def _subject_header(text: str) -> str:
    return text if text.isascii() else Header(text, "utf-8").encode()


def _paragraphs(rng: random.Random, target: int) -> str:
    lines: list[str] = []
    length = 0
    while length < target:
        words = rng.choices(_WORDS, k=rng.randint(8, 14))
        line = " ".join(words).capitalize() + "."
        lines.append(line)
        length += len(line) + 1
        if rng.random() < 0.2:
            lines.append("")
    return "\n".join(lines) + "\n"


def _body_size(rng: random.Random) -> int:
    # Log-normal body sizes: median about 3 KB of text, a long tail of larger mail.
    return int(min(rng.lognormvariate(8.0, 0.9), 60_000))


def generate_messages(
    count: int, *, seed: int = 0, start: dt.datetime | None = None, months: int = 12
) -> Iterator[SampleMessage]:
    """Yield ``count`` realistic messages dated over the ``months`` months that end at ``start``."""
    rng = random.Random(seed)
    end = start or DEFAULT_END
    span = dt.timedelta(days=30.4 * months).total_seconds()
    me = ("Pat Example", "pat@example.org")
    people = _address_pool(rng)
    folder_paths = [folder for folder, _ in _FOLDERS]
    folder_weights = [weight for _, weight in _FOLDERS]
    threads: list[tuple[str, str]] = []  # (message-id, subject) of earlier messages to reply to
    attachment = base64.encodebytes(random.Random(seed + 1).randbytes(48_000)).decode("ascii")
    for number in range(count):
        folder = rng.choices(folder_paths, folder_weights)[0]
        age = rng.random() ** 1.6 * span  # more recent mail than old mail
        date = end - dt.timedelta(seconds=age)
        sender, recipient = rng.choice(people), me
        if folder in (("Sent",), ("Drafts",)):
            sender, recipient = me, rng.choice(people)
        topic = rng.choice(_TOPICS).replace("{n}", str(rng.randint(1000, 99999)))
        headers: list[str] = []
        in_reply_to = None
        if threads and rng.random() < 0.3:
            in_reply_to, parent_subject = rng.choice(threads)
            topic = parent_subject if parent_subject.startswith("Re: ") else f"Re: {parent_subject}"
        domain = sender[1].split("@", 1)[1]
        message_id = f"<{seed}.{number}.{rng.getrandbits(40):x}@{domain}>"
        relay = rng.randint(1, 250)
        headers.append(
            f"Received: from mx{relay}.example.net (mx{relay}.example.net [192.0.2.{relay}])\n"
            f"\tby mail.example.org with ESMTPS id {rng.getrandbits(48):x}\n"
            f"\tfor <{recipient[1]}>; {format_datetime(date + dt.timedelta(seconds=rng.randint(1, 90)))}"
        )
        if number % 97 != 13:
            headers.append(f"Date: {format_datetime(date)}")
        headers.append(f"From: {_format_address(*sender)}")
        headers.append(f"To: {_format_address(*recipient)}")
        if rng.random() < 0.2:
            extra = rng.sample(people, rng.randint(1, 4))
            headers.append("Cc: " + ",\n ".join(_format_address(*person) for person in extra))
        headers.append(f"Subject: {_subject_header(topic)}")
        if number % 211 != 7:
            headers.append(f"Message-ID: {message_id}")
        if in_reply_to:
            headers.append(f"In-Reply-To: {in_reply_to}")
            headers.append(f"References: {in_reply_to}")
        if folder == ("Lists",):
            mailing_list = rng.choice(_LISTS)
            headers.append(f"List-Id: <{mailing_list.replace('@', '.')}>")
            headers.append(f"List-Unsubscribe: <mailto:{mailing_list.replace('@', '-unsubscribe@')}>")
        headers.append("MIME-Version: 1.0")
        text = _paragraphs(rng, _body_size(rng))
        roll = rng.random()
        if roll < 0.12:
            boundary = f"=_b{rng.getrandbits(32):x}"
            size = rng.choices([2_000, 8_000, 20_000, 60_000, 250_000], [30, 30, 20, 15, 5])[0]
            chunk = attachment[: min(size, len(attachment))]
            data = chunk * max(1, size // max(len(chunk), 1))
            headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
            body = (
                f"This is a multi-part message in MIME format.\n\n--{boundary}\n"
                f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{text}\n"
                f"--{boundary}\nContent-Type: application/pdf; name=\"document-{number}.pdf\"\n"
                f"Content-Disposition: attachment; filename=\"document-{number}.pdf\"\n"
                f"Content-Transfer-Encoding: base64\n\n{data}--{boundary}--\n"
            )
        elif roll < 0.45:
            boundary = f"=_a{rng.getrandbits(32):x}"
            html = "<html><body>" + "".join(f"<p>{line}</p>" for line in text.splitlines() if line) + "</body></html>"
            headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
            body = (
                f"--{boundary}\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
                f"{text}\n--{boundary}\nContent-Type: text/html; charset=utf-8\n"
                f"Content-Transfer-Encoding: 8bit\n\n{html}\n--{boundary}--\n"
            )
        else:
            headers.append("Content-Type: text/plain; charset=utf-8")
            headers.append("Content-Transfer-Encoding: 8bit")
            body = text
        raw = ("\n".join(headers) + "\n\n" + body).encode("utf-8")
        flags: set[str] = set()
        age_days = age / 86400
        if folder in (("Sent",), ("Archive",), ("Trash",)) or age_days > 14 or rng.random() < 0.6:
            flags.add(SEEN)
        if rng.random() < 0.05:
            flags.add(FLAGGED)
        if rng.random() < 0.08 and folder != ("Drafts",):
            flags.add(ANSWERED)
        if rng.random() < 0.02:
            flags.add(FORWARDED)
        if folder == ("Drafts",):
            flags = {DRAFT, SEEN}
        if len(threads) < 5000 and rng.random() < 0.5:
            threads.append((message_id, topic))
        yield SampleMessage(folder=folder, flags=frozenset(flags), raw=raw, date=date)


def _maildir_folder(root: Path, folder: tuple[str, ...]) -> Path:
    if not folder:
        return root
    # Maildir++ folder names are ASCII here; a real tree could hold modified UTF-7.
    return root / ("." + ".".join(folder))


def write_maildir(root: Path, messages: Iterable[SampleMessage], *, hostname: str = "sample") -> int:
    """Write a Maildir++ tree the way a delivery agent does; recent unread mail lands in new/. Returns the count."""
    made: set[Path] = set()
    written = 0
    pid = os.getpid()
    for number, message in enumerate(messages):
        directory = _maildir_folder(root, message.folder)
        if directory not in made:
            for sub in ("cur", "new", "tmp"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
            if message.folder:
                (directory / "maildirfolder").touch()
            made.add(directory)
        stamp = int(message.date.timestamp()) if message.date else 1_700_000_000
        unique = f"{stamp}.M{number}P{pid}Q{number % 1000}.{hostname},S={len(message.raw)}"
        if not message.flags:
            path = directory / "new" / unique
        else:
            path = directory / "cur" / f"{unique}:2,{maildir_info_from_flags(message.flags)}"
        path.write_bytes(message.raw)
        written += 1
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return written


def write_mbox(path: Path, messages: Iterable[SampleMessage]) -> int:
    """Write an mbox file (mboxrd quoting of body lines that start with "From "). Returns the count."""
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for message in messages:
            when = (message.date or DEFAULT_END).strftime("%a %b %d %H:%M:%S %Y")
            handle.write(f"From sample@example.org {when}\n".encode())
            for line in message.raw.splitlines(keepends=True):
                stripped = line.lstrip(b">")
                if stripped.startswith(b"From "):
                    line = b">" + line
                handle.write(line)
            if not message.raw.endswith(b"\n"):
                handle.write(b"\n")
            handle.write(b"\n")
            written += 1
    return written


def odd_messages() -> list[tuple[str, bytes]]:
    """Messages real mailboxes contain and parsers trip over, named for tests."""
    return [
        ("no-message-id", b"From: a@example.org\nSubject: no id\nDate: Mon, 02 Nov 2026 10:00:00 +0000\n\nbody\n"),
        ("no-date", b"From: a@example.org\nSubject: no date\nMessage-ID: <nodate@x>\n\nbody\n"),
        ("received-date-only", b"Received: from a by b; Tue, 03 Nov 2026 09:00:00 +0000\nFrom: a@example.org\n"
                               b"Subject: received only\nMessage-ID: <received@x>\n\nbody\n"),
        ("utf8-headers", "From: Zoë <z@example.org>\nSubject: Grüße\nMessage-ID: <utf8@x>\n\nbody\n".encode()),
        ("latin1-headers", "From: Renée <r@example.org>\nSubject: café\nMessage-ID: <latin1@x>\n\nbody\n"
                           .encode("latin-1")),
        ("crlf", b"From: a@example.org\r\nSubject: crlf\r\nMessage-ID: <crlf@x>\r\n\r\nbody\r\n"),
        ("huge-header", b"From: a@example.org\nTo: " + b"b@example.org, " * 14_000 + b"\nSubject: huge\n"
                        b"Message-ID: <huge@x>\n\nbody\n"),
        ("truncated", b"From: a@example.org\nSubject: cut short\nMessage-ID: <truncated@x>\nDate: Mon, 02 No"),
        ("rfc2047-subject", b"From: a@example.org\nSubject: =?utf-8?q?caf=C3=A9_=E2=98=95?=\n"
                            b"Message-ID: <2047@x>\n\nbody\n"),
        ("future-date", b"From: a@example.org\nSubject: future\nDate: Fri, 01 Jan 12000 00:00:00 +0000\n"
                        b"Message-ID: <future@x>\n\nbody\n"),
        ("invalid-date", b"From: a@example.org\nSubject: bad date\nDate: yesterday-ish\nMessage-ID: <bad@x>\n\nb\n"),
        ("duplicate-id-a", b"From: a@example.org\nSubject: copy one\nMessage-ID: <dup@x>\n\nfirst copy\n"),
        ("duplicate-id-b", b"From: a@example.org\nSubject: copy two\nMessage-ID: <dup@x>\nX-Extra: 1\n\nsecond\n"),
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m crdtmail.sample {maildir,mbox} PATH [--count N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m crdtmail.sample", description=__doc__)
    parser.add_argument("format", choices=["maildir", "mbox"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    messages = generate_messages(args.count, seed=args.seed)
    if args.format == "maildir":
        written = write_maildir(args.path, messages)
    else:
        written = write_mbox(args.path, messages)
    sys.stdout.write(f"wrote {written} messages to {args.path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
