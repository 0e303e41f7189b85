"""Reading mail sources: a Maildir, a Maildir++ tree (Dovecot's layout) or an mbox file.

Pure file reading, streamed: nothing here touches the CRDT. ``scan`` counts the messages cheaply first (directory
listings; "From " lines for an mbox) so a caller can show progress with an ETA, then ``items`` yields them one by
one. A file that cannot be read becomes an ``ImportProblem``: reported, never fatal, never silently dropped.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crdtmail.errors import ImportSourceError
from crdtmail.model.flags import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, flags_from_maildir_info

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # larger files are reported, not read into memory
_INFO_SEPARATORS = (":2,", "!2,", ";2,")
_MBOX_FROM = re.compile(rb"^>+From ")


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One message read from a source: its folder path (() is INBOX), raw bytes, flags and where it came from."""

    folder: tuple[str, ...]
    raw: bytes
    flags: frozenset[str]
    source: str
    sha256: str | None = None  # hashed where the file was read, off the importing thread


@dataclass(frozen=True, slots=True)
class ImportProblem:
    """A message that could not be read, and why."""

    source: str
    reason: str


@dataclass
class ImportScan:
    """A source ready to import: its kind, how many messages it holds, and what was skipped on purpose."""

    path: Path
    kind: Literal["maildir", "mbox"]
    total: int
    skipped: list[str] = field(default_factory=list)
    _folders: list[tuple[tuple[str, ...], Path]] = field(default_factory=list)

    def items(self) -> Iterator[ImportItem | ImportProblem]:
        """Every message (or problem) in a stable order: folders by path, files by name."""
        if self.kind == "mbox":
            yield from _mbox_items(self.path)
            return
        for folder, directory in self._folders:
            yield from _maildir_items(folder, directory)


def is_maildir(path: Path) -> bool:
    """A directory with cur/ and new/ (tmp/ may be missing: some tools create it lazily)."""
    return (path / "cur").is_dir() and (path / "new").is_dir()


def detect_source(path: Path) -> Literal["maildir", "mbox"]:
    """Tell a Maildir (or Maildir++ tree) from an mbox file; anything else raises ImportSourceError."""
    if not path.exists():
        raise ImportSourceError(f"{path} does not exist; give the path of a Maildir or an mbox file")
    if path.is_dir():
        if is_maildir(path) or any(is_maildir(child) for child in _subfolder_dirs(path)):
            return "maildir"
        raise ImportSourceError(f"{path} is a directory but not a Maildir (no cur/ and new/ inside)")
    try:
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    if line.startswith(b"From "):
                        return "mbox"
                    break
    except OSError as exc:
        raise ImportSourceError(f"cannot read {path}: {exc.strerror}") from exc
    raise ImportSourceError(f"{path} is neither a Maildir nor an mbox file (an mbox starts with a 'From ' line)")


def _subfolder_dirs(root: Path) -> list[Path]:
    try:
        return sorted(
            Path(entry.path) for entry in os.scandir(root)
            if entry.name.startswith(".") and entry.name not in (".", "..") and entry.is_dir()
        )
    except OSError:
        return []


def decode_mutf7(name: str) -> str:
    """Decode IMAP's modified UTF-7 (RFC 3501 5.1.3), as Maildir++ folder names use it: "&AMk-" is "é"."""
    out: list[str] = []
    index = 0
    while index < len(name):
        char = name[index]
        if char != "&":
            out.append(char)
            index += 1
            continue
        end = name.find("-", index)
        if end == -1:
            out.append(name[index:])
            break
        chunk = name[index + 1 : end]
        if not chunk:
            out.append("&")
        else:
            padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
            try:
                out.append(base64.b64decode(padded).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(name[index : end + 1])  # not valid mUTF-7: keep the name as it is
        index = end + 1
    return "".join(out)


def scan(path: Path) -> ImportScan:
    """Look at a source and count its messages without reading them."""
    kind = detect_source(path)
    if kind == "mbox":
        return ImportScan(path=path, kind="mbox", total=_count_mbox(path))
    result = ImportScan(path=path, kind="maildir", total=0)
    folders: list[tuple[tuple[str, ...], Path]] = []
    if is_maildir(path):
        folders.append(((), path))
    for folder_dir in _subfolder_dirs(path):
        if not is_maildir(folder_dir):
            result.skipped.append(f"{folder_dir}: not a Maildir folder (no cur/ and new/)")
            continue
        parts = tuple(decode_mutf7(part) for part in folder_dir.name[1:].split(".") if part)
        if parts:
            folders.append((parts, folder_dir))
    folders.sort(key=lambda item: item[0])
    for _, directory in folders:
        for sub in ("new", "cur"):
            for entry in _entries(directory / sub):
                if _is_message_name(entry.name):
                    result.total += 1
        for entry in _entries(directory / "tmp"):
            result.skipped.append(f"{entry.path}: in tmp/, a delivery that never finished")
    result._folders = folders
    return result


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return []


def _is_message_name(name: str) -> bool:
    return not name.startswith(".")


def _maildir_flags(name: str) -> frozenset[str]:
    for separator in _INFO_SEPARATORS:
        position = name.rfind(separator)
        if position != -1:
            return flags_from_maildir_info(name[position + len(separator) :])
    return frozenset()


def _maildir_items(folder: tuple[str, ...], directory: Path) -> Iterator[ImportItem | ImportProblem]:
    for sub in ("new", "cur"):
        for entry in _entries(directory / sub):
            if not _is_message_name(entry.name):
                continue
            source = str(entry.path)
            try:
                if not entry.is_file():
                    yield ImportProblem(source, "not a regular file (a directory, or a link to nothing)")
                    continue
                with open(entry.path, "rb") as handle:
                    raw = handle.read(MAX_MESSAGE_BYTES + 1)
            except OSError as exc:
                yield ImportProblem(source, f"cannot read it: {exc.strerror or exc}")
                continue
            if len(raw) > MAX_MESSAGE_BYTES:
                yield ImportProblem(source, f"larger than the {MAX_MESSAGE_BYTES} byte limit")
                continue
            flags = frozenset() if sub == "new" else _maildir_flags(entry.name)
            yield ImportItem(folder, raw, flags, source, hashlib.sha256(raw).hexdigest())


def _count_mbox(path: Path) -> int:
    count = 0
    previous_blank = True
    try:
        with path.open("rb") as handle:
            for line in handle:
                if previous_blank and line.startswith(b"From "):
                    count += 1
                previous_blank = line in (b"\n", b"\r\n")
    except OSError as exc:
        raise ImportSourceError(f"cannot read {path}: {exc.strerror}") from exc
    return count


def _mbox_flags(raw: bytes) -> frozenset[str]:
    """Flags from the Status and X-Status headers that mutt and Thunderbird write into mbox files."""
    end = raw.find(b"\n\n")
    crlf_end = raw.find(b"\r\n\r\n")
    header = raw[: min(p for p in (end, crlf_end, len(raw)) if p != -1)]
    flags: set[str] = set()
    for line in header.splitlines():
        lower = line.lower()
        if lower.startswith(b"status:"):
            if b"R" in line[7:]:
                flags.add(SEEN)
        elif lower.startswith(b"x-status:"):
            value = line[9:]
            for letter, flag in ((b"A", ANSWERED), (b"F", FLAGGED), (b"T", DRAFT), (b"D", DELETED)):
                if letter in value:
                    flags.add(flag)
    return frozenset(flags)


def _mbox_items(path: Path) -> Iterator[ImportItem | ImportProblem]:
    number = 0
    lines: list[bytes] = []
    size = 0
    previous_blank = True
    too_large = False

    def finish() -> ImportItem | ImportProblem:
        source = f"mbox:{path}#{number}"
        if too_large:
            return ImportProblem(source, f"larger than the {MAX_MESSAGE_BYTES} byte limit")
        # The blank line before the next "From " separator belongs to the mbox format, not the message.
        if lines and lines[-1] in (b"\n", b"\r\n"):
            lines.pop()
        raw = b"".join(lines)
        return ImportItem((), raw, _mbox_flags(raw), source)

    try:
        with path.open("rb") as handle:
            for line in handle:
                if previous_blank and line.startswith(b"From "):
                    if number:
                        yield finish()
                    number += 1
                    lines, size, too_large = [], 0, False
                    previous_blank = False
                    continue
                previous_blank = line in (b"\n", b"\r\n")
                if number == 0:
                    continue  # text before the first separator is not a message
                if _MBOX_FROM.match(line):
                    line = line[1:]  # mboxrd: one '>' was added in front of a body line starting with "From "
                size += len(line)
                if size > MAX_MESSAGE_BYTES:
                    too_large = True
                    lines = []
                if not too_large:
                    lines.append(line)
            if number:
                yield finish()
    except OSError as exc:
        yield ImportProblem(f"mbox:{path}#{number}", f"cannot read the rest of the file: {exc.strerror}")
