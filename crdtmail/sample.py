"""A deterministic generator of realistic mail, for the demo, the tests and the benchmarks.

Messages have what real mailboxes have: about two hundred correspondents (some with non-ASCII names in RFC 2047
words), threads with In-Reply-To, References and "Re:" subjects, mailing-list headers, Received chains,
multipart/alternative bodies, a few small base64 attachments, sizes with a long tail (median about 4 KB, mean
about 10 KB, a few near 300 KB), a few messages without Message-ID or Date, and a few list copies of a message
that share its Message-ID. The same arguments always give the same bytes.

Speed matters more than MIME libraries here (a benchmark generates 100k messages), so bodies are cut from
precomputed text and the bytes are written directly.

``python -m crdtmail.sample maildir PATH --count N --seed S`` writes a Maildir++ tree; ``mbox PATH`` an mbox file.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import itertools
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.header import Header
from email.utils import format_datetime
from pathlib import Path

from crdtmail.importer import encode_mutf7
from crdtmail.model.flags import ANSWERED, DELETED, DRAFT, FLAGGED, FORWARDED, SEEN, maildir_info_from_flags

__all__ = [
    "DEFAULT_END",
    "SampleMessage",
    "generate_messages",
    "main",
    "odd_messages",
    "write_maildir",
    "write_mbox",
]

DEFAULT_END = dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)
_ME = ("Pat Example", "pat@example.org")
_RECENT = dt.timedelta(days=3)  # unread mail younger than this is still in new/ (no mail client looked yet)

_FIRST = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Radia", "Edsger", "Frances",
          "Donald", "Hedy", "Tim", "Katherine", "John", "Sophie", "Niklaus", "Joan", "Guido", "Anita", "Leslie",
          "Shafi", "Whitfield", "Martin", "Judea", "Yukihiro", "Bjarne", "Rasmus", "Fran"]
_LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Ritchie", "Liskov", "Thompson", "Perlman",
         "Dijkstra", "Allen", "Knuth", "Lamarr", "Berners-Lee", "Johnson", "McCarthy", "Wilson", "Wirth", "Clarke",
         "Borg", "Lamport", "Goldwasser", "Diffie", "Hellman", "Pearl", "Matsumoto", "Stroustrup", "Lerdorf"]
_UNICODE_NAMES = ["Zoë Ångström", "José Núñez", "Małgorzata Wójcik", "Søren Kierkegård", "Jürgen Müller",
                  "Renée Côté", "Ørjan Ødegård", "Łukasz Żółć", "田中 太郎", "Δημήτρης Παπαδόπουλος",
                  "Иван Петров", "François Lefèvre", "Ayşe Öztürk", "Nguyễn Văn An"]
_DOMAINS = ["example.org", "example.com", "mail.example.net", "corp.example.com", "uni.example.edu",
            "shop.example.com", "example.de", "example.fr"]
_TOPICS = ["quarterly report", "lunch on Friday", "release 2.4 planning", "invoice #{n}", "your order #{n}",
           "meeting notes", "travel itinerary", "build failure on main", "design review", "holiday schedule",
           "password reset", "new comment on issue #{n}", "weekly digest", "conference talk proposal",
           "server maintenance window", "budget draft", "team offsite", "contract renewal", "code review",
           "welcome aboard", "café opening ☕", "Grüße aus Berlin", "résumé attached", "数据报告", "photos",
           "Q{q} roadmap", "flaky test in CI", "offline sync is slow", "question about the API", "slides"]
_SPAM = ["You have WON!!!", "Cheap meds online", "URGENT: verify your account", "Hot singles near you",
         "Your package could not be delivered", "Investment opportunity 1000%"]
_WORDS = ("the of and to in is it that for on with as at this by from we be are an or have not you all can "
          "will one but has our more about which their if so when there some what up out do time would into "
          "mail sync replica folder message draft reply thread project deadline review change build test "
          "offline phone desktop meeting schedule budget report release server client merge conflict note "
          "café naïve über déjà").split()
_OPENERS = ["From my side, this looks fine.", "From what I remember, we agreed on Tuesday.",
            "From the logs it seems the sync stopped at 3am.", "Thanks for the quick reply!", "Hi all,", "Hello,",
            "Best regards,", "Cheers,", "See the attached file.", "Let me know what you think."]
_LISTS = ["dev@lists.example.org", "announce@lists.example.org", "users@lists.example.org"]
_MAILERS = ["Mutt/2.2.12 (2023-09-09)", "Mozilla Thunderbird 128.3.0", "Apple Mail (2.3774)",
            "Microsoft Outlook 16.0", "K-9 Mail for Android", "Evolution 3.52.1"]
_ZONES = [dt.timezone(dt.timedelta(hours=hours)) for hours in (0, 1, 2, -5, -8, 9, 5.5)]
_SPECIAL_ATTACHMENTS = [("application/pdf", "report-{n}.pdf"), ("image/png", "photo-{n}.png"),
                        ("application/zip", "logs-{n}.zip"), ("text/calendar", "invite-{n}.ics")]
# (folder path, weight): most mail sits in INBOX, then archives, Sent, lists and project folders; few drafts.
_FOLDERS: list[tuple[tuple[str, ...], int]] = [
    ((), 46), (("Archive",), 14), (("Sent",), 10), (("Work",), 8), (("Work", "Projects"), 6),
    (("Lists",), 10), (("Trash",), 3), (("Junk",), 2), (("Drafts",), 1),
]
_OUTGOING = frozenset({("Sent",), ("Drafts",)})
_MAX_ATTACHMENT = 280_000  # base64 characters: with the text, the largest messages come near 300 KB
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)  # "^" is after LF only: a lone CR starts no mbox line
_ATTACHMENT_LINE = 77  # base64 lines of 76 characters plus "\n", as encoders write them


@dataclass(frozen=True, slots=True)
class SampleMessage:
    """One generated message: the folder it belongs in, its flags and its raw bytes.

    ``date`` is when it arrived (the time in its Maildir file name); the headers may lack a date even so.
    ``recent`` marks unread mail no client has looked at yet: a delivery agent leaves it in new/.
    """

    folder: tuple[str, ...]
    flags: frozenset[str]
    raw: bytes
    date: dt.datetime
    recent: bool = False


@dataclass(slots=True)
class _Thread:
    message_id: str
    subject: str
    references: str
    sender: tuple[str, str]


class _Pools:
    """Text precomputed once per seed, so a message costs slicing and joining, not generating prose."""

    def __init__(self, rng: random.Random) -> None:
        self.people = [self._person(rng, index) for index in range(200)]
        self.headers = {person: _format_address(*person) for person in [*self.people, _ME]}
        self.text, self.paragraph_starts = self._corpus(rng)
        data = base64.encodebytes(rng.randbytes(_MAX_ATTACHMENT * 3 // 4 + 1024)).decode("ascii")
        self.attachment = data[: _MAX_ATTACHMENT - _MAX_ATTACHMENT % _ATTACHMENT_LINE]

    @staticmethod
    def _person(rng: random.Random, index: int) -> tuple[str, str]:
        if index % 11 == 0:
            name = _UNICODE_NAMES[(index // 11) % len(_UNICODE_NAMES)]
            local = f"contact{index}"
        else:
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            name = f"{first} {last}"
            local = f"{first}.{last}{index}".lower().replace("-", "")
        return name, f"{local}@{rng.choice(_DOMAINS)}"

    @staticmethod
    def _corpus(rng: random.Random) -> tuple[str, list[int]]:
        """About 200 KB of wrapped paragraphs, doubled so a slice from any line start never runs off the end."""
        lines: list[str] = []
        size = 0
        while size < 200_000:
            words: list[str] = []
            if rng.random() < 0.15:
                words.extend(rng.choice(_OPENERS).split())
            for _ in range(rng.randint(2, 6)):
                sentence = rng.choices(_WORDS, k=rng.randint(5, 16))
                words.extend([sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."])
            line: list[str] = []
            width = 0
            for word in words:
                if width + len(word) > 72 and line:
                    lines.append(" ".join(line))
                    size += width
                    line, width = [], 0
                line.append(word)
                width += len(word) + 1
            lines.append(" ".join(line))
            lines.append("")
            size += width + 1
        half = "\n".join(lines) + "\n"
        text = half + half
        # Bodies start at a paragraph, as written text does.
        starts = [0]
        position = text.find("\n\n")
        while position != -1 and position < len(half):
            starts.append(position + 2)
            position = text.find("\n\n", position + 2)
        return text, starts

    def address(self, person: tuple[str, str]) -> str:
        """The From/To form of a person, RFC 2047-encoded where needed (cached for the pool's people)."""
        cached = self.headers.get(person)
        return cached if cached is not None else _format_address(*person)

    def body_text(self, rng: random.Random, length: int) -> str:
        """About ``length`` characters of whole lines, starting at a random paragraph."""
        start = self.paragraph_starts[int(rng.random() * len(self.paragraph_starts))]
        end = self.text.find("\n", start + min(length, len(self.text) // 2 - 1))
        return self.text[start : end + 1]


def _format_address(name: str, address: str) -> str:
    if name.isascii():
        return f"{name} <{address}>"
    return f"{Header(name, 'utf-8').encode()} <{address}>"


def _encode_subject(text: str) -> str:
    return text if text.isascii() else Header(text, "utf-8").encode()


def generate_messages(
    count: int, *, seed: int = 0, start: dt.datetime | None = None, months: int = 12
) -> Iterator[SampleMessage]:
    """Yield ``count`` realistic messages dated over the ``months`` months that end at ``start``.

    ``start`` defaults to ``DEFAULT_END`` (2026-11-15) so the output never depends on today's date; dates grow
    with the index, recent months hold more mail than old ones, and the same arguments give the same bytes.
    """
    if count < 0 or months < 1:
        raise ValueError("count must be >= 0 and months >= 1")
    end = start or DEFAULT_END
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    rng = random.Random(seed)
    pools = _Pools(random.Random(f"crdtmail-sample-pools-{seed}"))
    span = dt.timedelta(days=30.4 * months).total_seconds()
    folder_paths = [folder for folder, _ in _FOLDERS]
    folder_weights = list(itertools.accumulate(weight for _, weight in _FOLDERS))
    threads: list[_Thread] = []
    pending_copy: SampleMessage | None = None
    for number in range(count):
        # Ages shrink with the index (so replies come after what they answer) and bunch up near the end.
        age = ((1 - (number + rng.random()) / count) ** 1.6) * span
        arrived = end - dt.timedelta(seconds=age)
        if pending_copy is not None:
            yield pending_copy
            pending_copy = None
            continue
        folder = rng.choices(folder_paths, cum_weights=folder_weights)[0]
        raw, thread = _compose(rng, pools, number, seed, folder, arrived, threads)
        if thread is not None:
            if len(threads) < 2000:
                threads.append(thread)
            else:
                threads[int(rng.random() * len(threads))] = thread
        flags = _flags(rng, folder, end - arrived)
        recent = not flags and end - arrived < _RECENT
        yield SampleMessage(folder=folder, flags=frozenset(flags), raw=raw, date=arrived, recent=recent)
        if folder == ("Lists",) and thread is not None and rng.random() < 0.03:
            # A list post that was also addressed to you directly arrives twice, with one Message-ID and
            # different bytes: the "no duplicates" contract must keep it one message.
            copy = f"Received: from lists.example.org by mail.example.org; {format_datetime(arrived)}\n".encode()
            pending_copy = SampleMessage(folder=(), flags=frozenset(flags), raw=copy + raw, date=arrived,
                                         recent=recent)


def _compose(
    rng: random.Random,
    pools: _Pools,
    number: int,
    seed: int,
    folder: tuple[str, ...],
    arrived: dt.datetime,
    threads: list[_Thread],
) -> tuple[bytes, _Thread | None]:
    outgoing = folder in _OUTGOING
    person = pools.people[int(rng.random() ** 1.5 * len(pools.people))]  # a few people write most of the mail
    sender, recipient = (_ME, person) if outgoing else (person, _ME)
    parent: _Thread | None = None
    if folder == ("Junk",):
        subject = rng.choice(_SPAM)
        sender = (sender[0], f"promo{rng.randint(1, 999)}@spam.example")
    elif threads and rng.random() < 0.35:
        parent = threads[int(rng.random() * len(threads))]
        subject = parent.subject if parent.subject.startswith("Re: ") else f"Re: {parent.subject}"
        if not outgoing:
            sender = parent.sender if rng.random() < 0.3 else sender
    else:
        subject = rng.choice(_TOPICS).replace("{n}", str(rng.randint(1000, 99999))).replace(
            "{q}", str(rng.randint(1, 4))
        )
    domain = sender[1].rpartition("@")[2]
    message_id = f"<{seed:x}.{number:x}.{rng.getrandbits(48):012x}@{domain}>"
    local_time = arrived.astimezone(rng.choice(_ZONES))
    sent = local_time - dt.timedelta(seconds=rng.randint(2, 300))
    roll = rng.random()
    has_date = roll >= 0.01  # ~1% carry no Date header
    has_received = not outgoing and roll >= 0.003  # ~0.3% carry no date at all: truly undated

    headers: list[str] = []
    if has_received:
        relay = rng.randint(1, 250)
        headers.append(f"Return-Path: <{sender[1]}>")
        headers.append(f"Delivered-To: {_ME[1]}")
        headers.append(
            f"Received: from mx{relay}.example.net (mx{relay}.example.net [192.0.2.{relay}])\n"
            f"\tby mail.example.org (Postfix) with ESMTPS id {rng.getrandbits(40):010X}\n"
            f"\tfor <{_ME[1]}>; {format_datetime(local_time)}"
        )
        headers.append(
            f"Received: from [198.51.100.{relay}] (helo=smtp.{domain})\n"
            f"\tby mx{relay}.example.net with esmtpsa (TLS1.3) id {rng.getrandbits(32):08x};\n"
            f"\t{format_datetime(sent + dt.timedelta(seconds=1))}"
        )
    if has_date:
        headers.append(f"Date: {format_datetime(sent)}")
    headers.append(f"From: {pools.address(sender)}")
    headers.append(f"To: {pools.address(recipient)}")
    if rng.random() < 0.2:
        extra = [pools.people[int(rng.random() * len(pools.people))] for _ in range(rng.randint(1, 4))]
        headers.append("Cc: " + ",\n ".join(pools.headers[person] for person in extra))
    headers.append(f"Subject: {_encode_subject(subject)}")
    if rng.random() >= 0.005:  # ~0.5% have no Message-ID
        headers.append(f"Message-ID: {message_id}")
    else:
        message_id = ""
    if parent is not None:
        headers.append(f"In-Reply-To: {parent.message_id}")
        headers.append("References: " + "\n ".join(f"{parent.references} {parent.message_id}".split()[-8:]))
    if folder == ("Lists",) or (not folder and rng.random() < 0.05):
        address = rng.choice(_LISTS)
        list_name, _, list_host = address.partition("@")
        headers.append(f"List-Id: {list_name.capitalize()} list <{list_name}.{list_host}>")
        headers.append(f"List-Post: <mailto:{address}>")
        headers.append(f"List-Unsubscribe: <mailto:{list_name}-unsubscribe@{list_host}>")
        headers.append("Precedence: list")
    if rng.random() < 0.6:
        headers.append(f"User-Agent: {rng.choice(_MAILERS)}")
    headers.append("MIME-Version: 1.0")

    text = pools.body_text(rng, int(min(rng.lognormvariate(7.55, 0.95), 40_000)))
    if parent is not None:
        quoted = pools.body_text(rng, int(rng.lognormvariate(6.0, 0.8)))
        text += f"\nOn {format_datetime(sent - dt.timedelta(hours=5))}, {parent.sender[0]} wrote:\n> " \
            + quoted[:-1].replace("\n", "\n> ") + "\n"
    if outgoing or rng.random() < 0.3:
        text += f"\n-- \n{sender[0]}\n"
    kind = rng.random()
    if kind < 0.11:
        boundary = f"=_m{rng.getrandbits(48):012x}"
        mime, name = rng.choice(_SPECIAL_ATTACHMENTS)
        name = name.replace("{n}", str(number))
        lines = max(2, int(min(rng.lognormvariate(10.15, 1.0), _MAX_ATTACHMENT) / _ATTACHMENT_LINE))
        offset = int(rng.random() * 64) * _ATTACHMENT_LINE
        data = pools.attachment[offset : offset + lines * _ATTACHMENT_LINE]
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        body = (
            f"This is a multi-part message in MIME format.\n\n--{boundary}\n"
            f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{text}\n"
            f'--{boundary}\nContent-Type: {mime}; name="{name}"\n'
            f'Content-Disposition: attachment; filename="{name}"\n'
            f"Content-Transfer-Encoding: base64\n\n{data}\n--{boundary}--\n"
        )
    elif kind < 0.43:
        boundary = f"=_a{rng.getrandbits(48):012x}"
        html = "<html><body><p>" + text.replace("&", "&amp;").replace("<", "&lt;").replace("\n\n", "</p>\n<p>") \
            + "</p></body></html>\n"
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
    if not message_id or folder == ("Junk",):
        return raw, None
    chain = f"{parent.references} {parent.message_id}".strip() if parent is not None else ""
    return raw, _Thread(message_id, subject, chain, sender)


def _flags(rng: random.Random, folder: tuple[str, ...], age: dt.timedelta) -> set[str]:
    if folder == ("Drafts",):
        return {DRAFT, SEEN}
    flags: set[str] = set()
    read_chance = 0.3 if folder == ("Junk",) else 0.97 if age > dt.timedelta(days=14) else 0.5
    if folder in (("Sent",), ("Archive",), ("Trash",)) or rng.random() < read_chance:
        flags.add(SEEN)
    if folder in (("Sent",), ("Junk",)):
        return flags
    if rng.random() < (0.10 if folder == ("Work", "Projects") else 0.04):
        flags.add(FLAGGED)
    if SEEN in flags and rng.random() < 0.08:
        flags.add(ANSWERED)
    if SEEN in flags and rng.random() < 0.02:
        flags.add(FORWARDED)
    if folder == ("Trash",) and rng.random() < 0.1:
        flags.add(DELETED)
    return flags


# ---------------------------------------------------------------------------------------------------------------
# Writers

# Process-wide delivery counter, like a delivery agent's: two calls in one process never make the same name.
_deliveries = itertools.count()


def _folder_directory(root: Path, folder: tuple[str, ...]) -> Path:
    if not folder:
        return root
    for part in folder:
        if not part or "." in part or "/" in part:
            raise ValueError(f"folder name part {part!r} cannot be written as a Maildir++ folder")
    return root / ("." + ".".join(encode_mutf7(part) for part in folder))


def _make_maildir(directory: Path, *, subfolder: bool) -> None:
    for sub in ("cur", "new", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    if subfolder:
        # Dovecot marks every Maildir++ folder with this empty file.
        (directory / "maildirfolder").touch()


def write_maildir(root: Path, messages: Iterable[SampleMessage], *, hostname: str = "sample") -> int:
    """Write a Maildir++ tree the way a delivery agent does; returns how many messages were written.

    Each file is written in tmp/ and renamed into place, so a program watching the tree never sees half a file.
    Names follow Dovecot: ``<time>.M<usec>P<pid>Q<n>.<host>,S=<size>``, plus ``:2,<letters>`` in cur/.
    Recent unread mail goes to new/ without info. No fsync: this is a generator, not a mail server.
    """
    # The Maildir spec's escapes for the two characters a host name part must not hold.
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    pid = os.getpid()
    made: set[tuple[str, ...]] = {()}
    _make_maildir(root, subfolder=False)
    flags_to_open = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    written = 0
    for message in messages:
        directory = _folder_directory(root, message.folder)
        if message.folder not in made:
            _make_maildir(directory, subfolder=True)
            made.add(message.folder)
        stamp = message.date.timestamp()
        seconds = int(stamp)
        unique = (
            f"{seconds}.M{int((stamp - seconds) * 1e6)}P{pid}Q{next(_deliveries)}.{host},S={len(message.raw)}"
        )
        temporary = os.path.join(directory, "tmp", unique)
        if message.recent and not message.flags:
            final = os.path.join(directory, "new", unique)
        else:
            final = os.path.join(directory, "cur", f"{unique}:2,{maildir_info_from_flags(message.flags)}")
        fd = os.open(temporary, flags_to_open, 0o600)
        try:
            os.write(fd, message.raw)
        finally:
            os.close(fd)
        os.rename(temporary, final)
        written += 1
    return written


def write_mbox(path: Path, messages: Iterable[SampleMessage]) -> int:
    """Write an mboxrd file: ``>`` in front of every body line matching ``>*From ``. Returns the count."""
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for message in messages:
            when = message.date.astimezone(dt.UTC).strftime("%a %b %d %H:%M:%S %Y")
            handle.write(f"From MAILER-DAEMON {when}\n".encode("ascii"))
            handle.write(_FROM_LINE.sub(rb">\1", message.raw))
            if not message.raw.endswith(b"\n"):
                handle.write(b"\n")
            handle.write(b"\n")
            written += 1
    return written


def odd_messages() -> list[tuple[str, bytes]]:
    """Messages real mailboxes contain and parsers trip over, each with a name for test ids."""
    return [
        ("no-message-id", b"From: a@example.org\nSubject: no id\nDate: Mon, 02 Nov 2026 10:00:00 +0000\n\nbody\n"),
        ("no-date", b"From: a@example.org\nSubject: no date\nMessage-ID: <nodate@x>\n\nbody\n"),
        ("received-date-only", b"Received: from a by b; Tue, 03 Nov 2026 09:00:00 +0000\nFrom: a@example.org\n"
                               b"Subject: received only\nMessage-ID: <received@x>\n\nbody\n"),
        ("utf8-headers", "From: Zoë <z@example.org>\nSubject: Grüße\nMessage-ID: <utf8@x>\n\nbody\n".encode()),
        ("latin1-headers", "From: Renée <r@example.org>\nSubject: café\nMessage-ID: <latin1@x>\n\nbody\n"
                           .encode("latin-1")),
        ("crlf", b"From: a@example.org\r\nSubject: crlf\r\nMessage-ID: <crlf@x>\r\n"
                 b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n\r\nbody\r\nFrom the start\r\n"),
        ("huge-header", b"From: a@example.org\nTo: " + b"b@example.org, " * 14_000 + b"c@example.org\n"
                        b"Subject: huge\nMessage-ID: <huge@x>\n\nbody\n"),
        ("truncated", b"From: a@example.org\nSubject: cut short\nMessage-ID: <truncated@x>\nDate: Mon, 02 No"),
        ("rfc2047-subject", b"From: a@example.org\nSubject: =?utf-8?q?caf=C3=A9_=E2=98=95?=\n"
                            b"Message-ID: <2047@x>\n\nbody\n"),
        ("future-date", b"From: a@example.org\nSubject: future\nDate: Fri, 01 Jan 12000 00:00:00 +0000\n"
                        b"Message-ID: <future@x>\n\nbody\n"),
        ("invalid-date", b"From: a@example.org\nSubject: bad date\nDate: yesterday-ish\nMessage-ID: <bad@x>\n\nb\n"),
        ("duplicate-id-a", b"From: a@example.org\nSubject: copy one\nMessage-ID: <dup@x>\n\nfirst copy\n"),
        ("duplicate-id-b", b"From: a@example.org\nSubject: copy two\nMessage-ID: <dup@x>\nX-Extra: 1\n\nsecond\n"),
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m crdtmail.sample {maildir,mbox} PATH [--count N] [--seed S] [--months M]``."""
    parser = argparse.ArgumentParser(
        prog="python -m crdtmail.sample", description="Write deterministic sample mail as a Maildir++ tree or mbox."
    )
    parser.add_argument("format", choices=["maildir", "mbox"], help="what to write")
    parser.add_argument("path", type=Path, help="the Maildir root or the mbox file")
    parser.add_argument("--count", type=_positive, default=300, help="messages to write (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same mail (default 0)")
    parser.add_argument("--months", type=_positive, default=12, help="months of mail up to 2026-11-15 (default 12)")
    args = parser.parse_args(argv)
    if args.months < 1:
        parser.error("--months must be at least 1")
    if args.format == "mbox" and args.path.is_dir():
        parser.error(f"{args.path} is a directory; give the path of the mbox file to write")
    started = time.perf_counter()
    size = 0

    def counted(messages: Iterator[SampleMessage]) -> Iterator[SampleMessage]:
        nonlocal size
        for message in messages:
            size += len(message.raw)
            yield message

    messages = counted(generate_messages(args.count, seed=args.seed, months=args.months))
    try:
        if args.format == "maildir":
            written = write_maildir(args.path, messages)
        else:
            written = write_mbox(args.path, messages)
    except OSError as exc:
        sys.stderr.write(f"cannot write {args.path}: {exc.strerror or exc}\n")
        return 1
    seconds = time.perf_counter() - started
    sys.stdout.write(
        f"wrote {written} messages ({size / 1e6:.1f} MB) as {args.format} to {args.path} in {seconds:.1f}s\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
