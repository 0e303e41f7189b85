"""The models behind the simulated mobile peer: connectivity, the user, the mail a phone receives, and metrics.

Everything here is deterministic given its seed and does no network I/O, so it can be tested on its own:

- connectivity: online/offline ``Period``s, drawn from exponential durations (``random_periods``) or read from a
  trace file (``parse_trace`` / ``load_trace``, format below);
- ``UserModel``: one user action per ``step()`` on a ``Mailbox`` (read, flag, move, delete, expunge, create a
  folder, new mail arriving), chosen by a seeded generator from the derived index, so no shard is loaded to pick;
- ``MailFactory``: realistic RFC 5322 messages with unique Message-IDs, as the phone's own mail server delivers them;
- ``MetricsLog``: one JSON line per event, appended with ``O_APPEND`` so several processes may share a file.

Trace file format (one period per line; ``#`` starts a comment; blank lines are ignored)::

    # state   seconds
    online    30
    offline   12.5
    online    60
    repeat            # optional, last line only: play the trace again from the top, for ever

Without ``repeat`` the peer stays in the state of the last line once the trace has been played.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson

from crdtmail.errors import ConfigError, ModelError
from crdtmail.model.flags import FLAGGED, SEEN
from crdtmail.model.mailbox import INBOX, TRASH, Folder, Mailbox
from crdtmail.sample import DEFAULT_END, generate_messages

__all__ = [
    "ACTION_KINDS",
    "Action",
    "ActionWeights",
    "MailFactory",
    "MetricsLog",
    "Period",
    "UserModel",
    "load_trace",
    "parse_trace",
    "random_periods",
    "read_metrics",
    "trace_periods",
    "update_id",
    "window_start",
]

# --------------------------------------------------------------------------------------------- connectivity


@dataclass(frozen=True, slots=True)
class Period:
    """A stretch of time the phone spends online or offline."""

    online: bool
    seconds: float


def random_periods(rng: random.Random, mean_online: float, mean_offline: float, *,
                   start_online: bool = True) -> Iterator[Period]:
    """Alternating online/offline periods with exponentially distributed lengths, for ever.

    A ``mean_offline`` of 0 means always online (one endless period); a ``mean_online`` of 0, always offline.
    """
    if mean_online < 0 or mean_offline < 0:
        raise ConfigError("mean online and offline durations must be 0 or more seconds")
    if mean_offline == 0 or mean_online == 0:
        yield Period(mean_offline == 0, math.inf)
        return
    online = start_online
    while True:
        # expovariate never returns 0 exactly, but a draw of microseconds is as good as none: keep a floor so
        # a switch is always a real period.
        yield Period(online, max(0.01, rng.expovariate(1.0 / (mean_online if online else mean_offline))))
        online = not online


_TRACE_LINE = re.compile(r"^(online|offline)\s+([0-9]+(?:\.[0-9]*)?|\.[0-9]+)$", re.IGNORECASE)


def parse_trace(text: str, *, source: str = "trace") -> tuple[list[Period], bool]:
    """Read a trace (format in the module docstring); returns its periods and whether it repeats.

    Raises ConfigError naming the line of the first mistake.
    """
    periods: list[Period] = []
    repeat = False
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if repeat:
            raise ConfigError(f"{source} line {number}: 'repeat' must be the last line")
        if line.lower() == "repeat":
            repeat = True
            continue
        match = _TRACE_LINE.match(line)
        if match is None:
            raise ConfigError(f"{source} line {number}: expected 'online SECONDS', 'offline SECONDS' or 'repeat', "
                              f"not {line!r}")
        seconds = float(match.group(2))
        if not math.isfinite(seconds):
            raise ConfigError(f"{source} line {number}: {match.group(2)} is not a number of seconds")
        periods.append(Period(match.group(1).lower() == "online", seconds))
    if not periods:
        raise ConfigError(f"{source} holds no 'online SECONDS' or 'offline SECONDS' line")
    if repeat and sum(period.seconds for period in periods) <= 0:
        raise ConfigError(f"{source}: a repeating trace needs periods longer than 0 seconds")
    return periods, repeat


def load_trace(path: Path) -> tuple[list[Period], bool]:
    """Read a trace file; a missing or unreadable file raises ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the connectivity trace {path}: {reason}") from exc
    return parse_trace(text, source=str(path))


def trace_periods(periods: Sequence[Period], repeat: bool) -> Iterator[Period]:
    """The periods of a trace, played once or for ever."""
    if repeat:
        yield from itertools.cycle(periods)
    else:
        yield from periods


def window_start(now: float, months: int) -> str:
    """The oldest month shard ("YYYY-MM") of a sync window of ``months`` months ending at ``now`` (UTC).

    The window reaches back to the month holding the moment ``months`` calendar months ago, so no message younger
    than that is left out: on 2026-11-15 a 3-month window starts at "2026-08".
    """
    if months < 1:
        raise ConfigError("the sync window must be at least 1 month")
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    index = moment.year * 12 + (moment.month - 1) - months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


# --------------------------------------------------------------------------------------------------- mail


class MailFactory:
    """New mail as the phone's own mail server delivers it: realistic bytes, a unique Message-ID, dated now.

    Bodies, senders and subjects come from ``crdtmail.sample``'s generator; the delivery headers (Received,
    Date, Message-ID) are replaced by fresh ones. The Message-ID is ``<device.run.n.random@domain>``: ``run``
    (counted by the caller, e.g. once per process start) keeps ids unique across restarts, and the same seed,
    device and run give the same ids, so a seeded simulation is reproducible.
    """

    _DROPPED = frozenset((b"message-id", b"date", b"received", b"return-path", b"delivered-to"))

    def __init__(self, seed: int, *, device: str = "phone", run: int = 1, domain: str = "mobile.example.org") -> None:
        self.device = re.sub(r"[^A-Za-z0-9.-]", "-", device) or "phone"
        self.run = run
        self.domain = domain
        self.delivered = 0
        self._rng = random.Random(f"crdtmail-mobile-mail-{seed}-{run}")
        # A huge count keeps the generator going for ever; its own dates are replaced anyway.
        self._source = generate_messages(10**12, seed=seed * 7919 + run, start=DEFAULT_END, months=1)

    def make(self, now: float) -> bytes:
        """The raw bytes of the next message, delivered at ``now`` (epoch seconds)."""
        sample = next(self._source)
        head, _, body = sample.raw.partition(b"\n\n")
        kept: list[bytes] = []
        dropping = False
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t"):  # a folded continuation belongs to the field before it
                if not dropping:
                    kept.append(line)
                continue
            dropping = line.partition(b":")[0].strip().lower() in self._DROPPED
            if not dropping:
                kept.append(line)
        self.delivered += 1
        rng = self._rng
        delivered = dt.datetime.fromtimestamp(now, dt.UTC)
        sent = delivered - dt.timedelta(seconds=rng.randint(2, 120))
        relay = rng.randint(1, 250)
        message_id = f"<{self.device}.{self.run}.{self.delivered}.{rng.getrandbits(48):012x}@{self.domain}>"
        fresh = [
            "Return-Path: <sender@example.net>",
            "Delivered-To: pat@example.org",
            f"Received: from mx{relay}.example.net (mx{relay}.example.net [192.0.2.{relay}])\n"
            f"\tby imap.{self.domain} (crdtmail mobile) with ESMTPS id {rng.getrandbits(40):010X}\n"
            f"\tfor <pat@example.org>; {format_datetime(delivered)}",
            f"Date: {format_datetime(sent)}",
            f"Message-ID: {message_id}",
        ]
        return "\n".join(fresh).encode("utf-8") + b"\n" + b"\n".join(kept) + b"\n\n" + body


# --------------------------------------------------------------------------------------------------- user

ACTION_KINDS: tuple[str, ...] = ("read", "flag", "move", "delete", "expunge", "create_folder", "deliver")

_FOLDER_NAMES = ("Receipts", "Travel", "Family", "Projects", "Later", "Newsletters", "Work/Clients", "Work/Hiring",
                 "Projects/Phone", "Travel/2026", "Archive/Old", "Family/Photos")


@dataclass(frozen=True, slots=True)
class ActionWeights:
    """How often each kind of user action is drawn (relative weights; 0 turns a kind off)."""

    read: float = 45.0
    flag: float = 12.0
    move: float = 8.0
    delete: float = 10.0
    expunge: float = 4.0
    create_folder: float = 1.0
    deliver: float = 20.0

    def cumulative(self) -> list[float]:
        """Cumulative weights in ``ACTION_KINDS`` order, for ``random.choices``."""
        values = [getattr(self, kind) for kind in ACTION_KINDS]
        if any(value < 0 for value in values) or not sum(values) > 0:
            raise ConfigError("action weights must be 0 or more, and at least one must be positive")
        return list(itertools.accumulate(values))


@dataclass(frozen=True, slots=True)
class Action:
    """One thing the user did (or tried to do), as recorded in metrics.

    ``kind`` is one of ``ACTION_KINDS`` (``flag`` becomes ``unflag`` when it cleared the flag). ``changed`` is
    False when the operation found nothing to change (reading a message already read). ``missing_body`` is the
    body hash of a message opened whose body this phone does not hold. ``error`` is set when the mailbox refused.
    """

    seq: int
    kind: str
    message_id: str | None = None
    folder: str | None = None
    changed: bool = True
    missing_body: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, for a metrics line."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


class UserModel:
    """A seeded user acting on one mailbox: ``step()`` does one action, commits it, and says what it was.

    Messages are picked from the derived index (``counts`` and ``list_folder``), newest ones more often for
    reading, so picking never loads a shard; acting on a message loads only its shard. The same seed, mailbox
    state and clock readings give the same actions. An action with nothing to act on (an empty trash to expunge
    from) becomes new mail arriving instead, which keeps the stream going on an empty mailbox.
    """

    def __init__(self, mailbox: Mailbox, *, seed: int, clock: Callable[[], float] | None = None,
                 weights: ActionWeights | None = None, mail: MailFactory | None = None,
                 has_body: Callable[[str], bool] | None = None) -> None:
        self.mailbox = mailbox
        self.rng = random.Random(f"crdtmail-mobile-user-{seed}")
        self.clock = clock or time.time
        self.weights = weights or ActionWeights()
        self._cumulative = self.weights.cumulative()
        self.mail = mail or MailFactory(seed)
        self._has_body = has_body
        self.seq = 0

    def step(self, kind: str | None = None) -> Action:
        """Do one action (of ``kind`` when given, else a random one) and return it."""
        if kind is not None and kind not in ACTION_KINDS:
            raise ValueError(f"unknown action kind {kind!r}; use one of {', '.join(ACTION_KINDS)}")
        self.seq += 1
        chosen = kind or self.rng.choices(ACTION_KINDS, cum_weights=self._cumulative)[0]
        try:
            handlers: dict[str, Callable[[], Action | None]] = {
                "read": self._read, "flag": self._flag, "move": self._move, "delete": self._delete,
                "expunge": self._expunge, "create_folder": self._create_folder, "deliver": self._deliver,
            }
            action = handlers[chosen]()
            if action is None:
                action = self._deliver()
        except ModelError as exc:
            # Refused by the mailbox, nothing changed (say, a folder name that collides); the user shrugs.
            action = Action(self.seq, chosen, changed=False, error=str(exc))
        return action

    # ----------------------------------------------------------------------------------------- picking

    def _pick(self, accept: Callable[[Folder], bool], *, newest_first: bool = False) -> tuple[str, Folder] | None:
        """A message id and its folder, from folders ``accept`` allows, weighted by how many messages they hold."""
        counts = self.mailbox.counts()
        candidates = [(folder, counts[folder.id].total) for folder in self.mailbox.folders()
                      if accept(folder) and folder.id in counts and counts[folder.id].total > 0]
        if not candidates:
            return None
        folder = self.rng.choices([f for f, _ in candidates], weights=[total for _, total in candidates])[0]
        total = counts[folder.id].total
        # A phone's user mostly looks at the top of a folder: skew towards offset 0 (newest) when asked.
        offset = min(total - 1, int(total * self.rng.random() ** (3 if newest_first else 1)))
        rows = self.mailbox.list_folder(folder.id, offset=offset, limit=1)
        return (rows[0].message_id, folder) if rows else None

    @staticmethod
    def _not_trash(folder: Folder) -> bool:
        return folder.role != TRASH

    # ----------------------------------------------------------------------------------------- actions

    def _read(self) -> Action | None:
        inbox_first = self.rng.random() < 0.7
        picked = self._pick((lambda f: f.role == INBOX) if inbox_first else self._not_trash, newest_first=True)
        if picked is None and inbox_first:
            picked = self._pick(self._not_trash, newest_first=True)
        if picked is None:
            return None
        message_id, folder = picked
        changed = self.mailbox.set_flags(message_id, add=[SEEN])
        sha256 = self.mailbox.message(message_id).envelope.body_sha256
        present = self._has_body(sha256) if self._has_body is not None else self.mailbox.body(message_id) is not None
        return Action(self.seq, "read", message_id, folder.path, changed, None if present else sha256)

    def _flag(self) -> Action | None:
        picked = self._pick(self._not_trash)
        if picked is None:
            return None
        message_id, folder = picked
        if FLAGGED in self.mailbox.message(message_id).flags:
            return Action(self.seq, "unflag", message_id, folder.path,
                          self.mailbox.set_flags(message_id, remove=[FLAGGED]))
        return Action(self.seq, "flag", message_id, folder.path, self.mailbox.set_flags(message_id, add=[FLAGGED]))

    def _move(self) -> Action | None:
        picked = self._pick(self._not_trash)
        if picked is None:
            return None
        message_id, source = picked
        targets = [f for f in self.mailbox.folders() if f.role != TRASH and f.id != source.id]
        if not targets:
            return None
        target = self.rng.choice(targets)
        return Action(self.seq, "move", message_id, target.path, self.mailbox.move(message_id, target.id))

    def _delete(self) -> Action | None:
        picked = self._pick(self._not_trash)
        if picked is None:
            return None
        message_id, _ = picked
        return Action(self.seq, "delete", message_id, self.mailbox.folder(TRASH).path,
                      self.mailbox.delete(message_id))

    def _expunge(self) -> Action | None:
        picked = self._pick(lambda f: f.role == TRASH)
        if picked is None:
            return None
        message_id, folder = picked
        self.mailbox.expunge(message_id)
        return Action(self.seq, "expunge", message_id, folder.path)

    def _create_folder(self) -> Action | None:
        path = self.rng.choice(_FOLDER_NAMES)
        existed = any(folder.path == path for folder in self.mailbox.folders())
        folder = self.mailbox.create_folder(path)
        return Action(self.seq, "create_folder", None, folder.path, not existed)

    def _deliver(self) -> Action:
        raw = self.mail.make(self.clock())
        result = self.mailbox.add(raw, folder=INBOX)
        return Action(self.seq, "deliver", result.message_id, self.mailbox.folder(INBOX).path, result.added)


# ------------------------------------------------------------------------------------------------ metrics


def update_id(document: str, update: bytes) -> str:
    """A short digest naming one CRDT update; the same bytes applied on another peer give the same id."""
    return hashlib.blake2b(document.encode("utf-8") + b"\x00" + update, digest_size=8).hexdigest()


class MetricsLog:
    """JSON lines, one per event: ``{"t": wall-clock seconds, "event": kind, "peer": id, ...}``.

    ``t`` is ``time.time()`` so lines written by several processes on one machine can be joined and ordered.
    Each line is one ``write`` on a file opened with ``O_APPEND``, so processes sharing a file never interleave
    within a line. Without a path nothing is written, but events are still counted.
    """

    def __init__(self, path: Path | None, *, peer: str = "") -> None:
        self.path = path
        self.peer = peer
        self.counts: dict[str, int] = {}
        self._fd: int | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot open the metrics file {path}: {exc.strerror}") from exc

    def emit(self, event: str, t: float | None = None, **fields: Any) -> None:
        """Write one event line (sets and frozensets become sorted lists)."""
        self.counts[event] = self.counts.get(event, 0) + 1
        if self._fd is None:
            return
        record = {"t": time.time() if t is None else t, "event": event, "peer": self.peer}
        for key, value in fields.items():
            record[key] = sorted(value) if isinstance(value, set | frozenset) else value
        try:
            os.write(self._fd, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        except OSError as exc:
            raise ConfigError(f"cannot write to the metrics file {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        """Close the file (every line is already written)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every event of a metrics file, in file order (for tests and analysis scripts)."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
