"""Reading mail sources: a Maildir, a Maildir++ tree (Dovecot's layout) or an mbox file.

Pure file reading, streamed: nothing here touches the CRDT. ``scan`` counts the messages cheaply first (directory
listings; "From " separators for an mbox) so a caller can show progress with an ETA, then ``ImportScan.items``
yields them one at a time. A file that cannot be read becomes an ``ImportProblem``: reported, never fatal, never
silently dropped. Files left out on purpose (dot-files, unfinished deliveries in tmp/) are listed in
``ImportScan.skipped`` with the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from crdtmail.errors import ImportSourceError
from crdtmail.model.flags import ANSWERED, DELETED, DRAFT, FLAGGED, FORWARDED, SEEN, flags_from_maildir_info

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ImportItem",
    "ImportProblem",
    "ImportScan",
    "decode_mutf7",
    "detect_source",
    "encode_mutf7",
    "is_maildir",
    "scan",
]

SourceKind = Literal["maildir", "mbox"]

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a larger file is reported, not read into memory
# mutt and most tools write ":2,"; Windows file systems forbid ':', so some tools there (and OfflineIMAP when
# configured for them) write "!2," or ";2," instead.
_INFO_SEPARATORS = (":2,", "!2,", ";2,")
_SNIFF_BYTES = 64 * 1024  # how far detect_source looks for an mbox's first "From " line
_LINE_LIMIT = 1024 * 1024  # one readline never returns more, so a file without newlines cannot fill memory
_BLOCK = 1024 * 1024
_TAIL_BLOCK = 64 * 1024  # small: FileIO.read(n) allocates n bytes before it reads
_BLANK_LINES = (b"\n", b"\r\n")
_QUOTED_FROM = re.compile(rb">+From ")


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One message read from a source: its folder path (() is INBOX), raw bytes, flags and where it came from.

    ``source`` is for people: a file path (undecodable bytes of a file name shown as ``\\xNN`` escapes) or
    ``mbox:<path>#<n>`` with n counting from 1.
    """

    folder: tuple[str, ...]
    raw: bytes
    flags: frozenset[str]
    source: str
    sha256: str | None = None  # hex SHA-256 of raw, hashed where the file was read (often a reader thread)


@dataclass(frozen=True, slots=True)
class ImportProblem:
    """A message that could not be read, where it is (same form as ``ImportItem.source``) and why."""

    source: str
    reason: str


@dataclass
class ImportScan:
    """A source ready to import: its kind, how many messages it holds, and what was left out on purpose.

    ``total`` is counted when the scan is made; ``items`` lists the source again, so mail that arrives or is
    renamed by a mail client in between is still read, and the number of items may differ a little from
    ``total``. Progress displays should use ``max(total, done)``.
    """

    path: Path
    kind: SourceKind
    total: int
    skipped: list[str] = field(default_factory=list)
    folders: list[tuple[str, ...]] = field(default_factory=list)
    _directories: list[Path] = field(default_factory=list, init=False, repr=False)

    def items(self) -> Iterator[ImportItem | ImportProblem]:
        """Every message (or problem) in a stable order: folders by path, files by name; streamed."""
        if self.kind == "mbox":
            yield from _mbox_items(self.path)
            return
        for folder, directory in zip(self.folders, self._directories, strict=True):
            yield from _maildir_items(folder, directory)


# ---------------------------------------------------------------------------------------------------------------
# Detecting the kind of source


def is_maildir(path: Path) -> bool:
    """A directory with cur/ and new/; tmp/ may be missing (some tools create it only when they deliver)."""
    return (path / "cur").is_dir() and (path / "new").is_dir()


def detect_source(path: Path) -> SourceKind:
    """Tell a Maildir (or Maildir++ tree) from an mbox file; anything else raises ImportSourceError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImportSourceError(
            f"{show_path(path)} does not exist; give the path of a Maildir or an mbox file") from None
    except OSError as exc:
        raise ImportSourceError(f"cannot read {show_path(path)}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        if is_maildir(path) or any(is_maildir(child) for child in _subfolder_dirs(path)):
            return "maildir"
        raise ImportSourceError(
            f"{show_path(path)} is a directory but not a Maildir: expected cur/ and new/ inside it, "
            "or Maildir++ folders such as .Sent/cur"
        )
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO would block; a device is never a mailbox.
        raise ImportSourceError(f"{show_path(path)} is not a regular file or directory; expected a Maildir or an mbox")
    try:
        with path.open("rb") as handle:
            first = _first_nonblank_line(handle)
    except OSError as exc:
        raise ImportSourceError(f"cannot read {show_path(path)}: {exc.strerror or exc}") from exc
    if first is not None and first.startswith(b"From "):
        return "mbox"
    raise ImportSourceError(
        f"{show_path(path)} is neither a Maildir nor an mbox file (an mbox starts with a 'From ' line)"
    )


def _first_nonblank_line(handle: BinaryIO) -> bytes | None:
    budget = _SNIFF_BYTES
    while budget > 0:
        line = handle.readline(min(budget, 4096))
        if not line:
            return None
        if line.strip():
            return line
        budget -= len(line)
    return None


def _subfolder_dirs(root: Path) -> list[Path]:
    """The ``.Name`` directories of a Maildir++ root, sorted; unreadable roots give none."""
    try:
        with os.scandir(root) as listing:
            names = [entry.name for entry in listing if entry.name.startswith(".") and _is_dir(entry)]
    except OSError:
        return []
    return [root / name for name in sorted(names) if name not in (".", "..")]


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Maildir++ folder names


def decode_mutf7(name: str) -> str:
    """Decode IMAP's modified UTF-7 (RFC 3501 5.1.3), as Maildir++ folder names use it: "&AMk-" is "É".

    A malformed shift sequence is kept as it stands, so a folder is never dropped for its name.
    """
    out: list[str] = []
    index = 0
    while index < len(name):
        char = name[index]
        if char != "&":
            out.append(char)
            index += 1
            continue
        end = name.find("-", index + 1)
        if end == -1:
            out.append(name[index:])
            break
        chunk = name[index + 1 : end]
        if not chunk:
            out.append("&")
        else:
            padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
            try:
                out.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
            except (binascii.Error, ValueError, UnicodeDecodeError):
                out.append(name[index : end + 1])
        index = end + 1
    return "".join(out)


def encode_mutf7(name: str) -> str:
    """Encode a folder name in IMAP's modified UTF-7, the inverse of ``decode_mutf7``: "É" is "&AMk-"."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + data.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def _folder_path(directory_name: str) -> tuple[str, ...]:
    """``.Work.Projects`` -> ("Work", "Projects"); empty parts ("..x", ".x.") are dropped, not the folder."""
    raw_name = os.fsencode(directory_name).decode("utf-8", "replace")
    return tuple(decode_mutf7(part) for part in raw_name[1:].split(".") if part)


# ---------------------------------------------------------------------------------------------------------------
# Scanning


def scan(path: Path) -> ImportScan:
    """Look at a source and count its messages without reading them; raises ImportSourceError for a bad path."""
    kind = detect_source(path)
    if kind == "mbox":
        return ImportScan(path=path, kind="mbox", total=_count_mbox(path))
    result = ImportScan(path=path, kind="maildir", total=0)
    found: list[tuple[tuple[str, ...], Path]] = []
    if is_maildir(path):
        found.append(((), path))
    for folder_dir in _subfolder_dirs(path):
        if not is_maildir(folder_dir):
            result.skipped.append(f"{show_path(folder_dir)}: not a Maildir folder (no cur/ and new/ inside)")
            continue
        parts = _folder_path(folder_dir.name)
        if parts:
            found.append((parts, folder_dir))
    found.sort(key=lambda pair: pair[0])
    for folder, directory in found:
        result.folders.append(folder)
        result._directories.append(directory)
        for entry_path, name, _sub in _message_entries(directory):
            if name.startswith("."):
                result.skipped.append(f"{show_path(entry_path)}: a dot-file, not a message")
            else:
                result.total += 1
        for entry_path in _listing(directory / "tmp"):
            result.skipped.append(f"{show_path(entry_path)}: in tmp/, a delivery that never finished")
    return result


def _listing(directory: Path) -> list[str]:
    """Paths in a directory, sorted by name; a missing or unreadable directory is empty."""
    try:
        with os.scandir(directory) as listing:
            return sorted(entry.path for entry in listing)
    except OSError:
        return []


def _message_entries(directory: Path) -> list[tuple[str, str, str]]:
    """(path, name, "new" or "cur") for everything in new/ and cur/, sorted by file name across both.

    Delivery agents start names with the delivery time, so name order is arrival order wherever a file is.
    """
    entries: list[tuple[str, str, str]] = []
    for sub in ("new", "cur"):
        try:
            with os.scandir(directory / sub) as listing:
                entries.extend((entry.path, entry.name, sub) for entry in listing)
        except OSError:
            continue
    entries.sort(key=lambda entry: (entry[1], entry[2]))
    return entries


def split_maildir_name(name: str) -> tuple[str, str | None]:
    """A Maildir file name's unique part and its info (the letters after ":2,"), or None without info."""
    best = -1
    for separator in _INFO_SEPARATORS:
        best = max(best, name.rfind(separator))
    if best == -1:
        return name, None
    return name[:best], name[best + 3 :]


def _maildir_items(folder: tuple[str, ...], directory: Path) -> Iterator[ImportItem | ImportProblem]:
    for path, name, sub in _message_entries(directory):
        if name.startswith("."):
            continue
        result = read_message_file(path)
        if isinstance(result, FileNotFoundError):
            # A running mail client renames cur/x:2, to cur/x:2,S when the mail is read: look for the file
            # under its new name before calling it lost.
            renamed = _find_renamed(directory, name)
            if renamed is not None:
                path, name, sub = renamed
                result = read_message_file(path)
        source = show_path(path)
        if isinstance(result, bytes):
            _, info = split_maildir_name(name)
            flags = flags_from_maildir_info(info) if sub == "cur" and info is not None else frozenset()
            yield ImportItem(folder, result, flags, source, hashlib.sha256(result).hexdigest())
        elif isinstance(result, OSError):
            yield ImportProblem(source, describe_os_error(path, result))
        else:
            yield ImportProblem(source, result)


def _find_renamed(directory: Path, name: str) -> tuple[str, str, str] | None:
    unique, _ = split_maildir_name(name)
    for path, other, sub in _message_entries(directory):
        if other != name and split_maildir_name(other)[0] == unique:
            return path, other, sub
    return None


def read_message_file(path: str) -> bytes | OSError | str:
    """The file's bytes, the OSError that stopped the read, or why the entry is not a readable message."""
    try:
        # O_NONBLOCK: a FIFO dropped into cur/ must not hang the import; regular files ignore the flag.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return "a directory where a message file should be"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file (a FIFO, socket or device)"
        if info.st_size > MAX_MESSAGE_BYTES:
            return f"larger than the {MAX_MESSAGE_BYTES} byte limit ({info.st_size} bytes)"
        # Ask for the size fstat gave, plus one byte to see growth: a read of MAX_MESSAGE_BYTES + 1 made Python
        # allocate (and give back) a 256 MiB buffer per file, 4.5x slower than the read itself.
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            parts = [handle.read(info.st_size + 1)]
            got = len(parts[0])
            # Go on to the end of the file in small blocks: a file may grow while being read, and some file
            # systems (network, FUSE) return short reads.
            while got <= MAX_MESSAGE_BYTES:
                more = handle.read(min(_TAIL_BLOCK, MAX_MESSAGE_BYTES + 1 - got))
                if not more:
                    break
                parts.append(more)
                got += len(more)
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    if len(raw) > MAX_MESSAGE_BYTES:
        return f"larger than the {MAX_MESSAGE_BYTES} byte limit (it grew while being read)"
    return raw


def describe_os_error(path: str, error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        if os.path.islink(path):
            return "a symbolic link to a file that does not exist"
        return "the file disappeared before it could be read (moved or deleted by another program)"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot read it: {error.strerror or error}"


def show_path(path: str | Path) -> str:
    """A path as text that can always be printed or put in JSON: undecodable bytes become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------------------------
# mbox
#
# A separator is a line starting with "From " whose previous line is blank, or that only blank lines precede.
# Counting and splitting must agree on that exactly, or the progress bar lies: both are written against it.


def _count_mbox(path: Path) -> int:
    """Count separators in 1 MiB blocks: C-speed ``bytes.count``, not a Python loop per line."""
    # A virtual line end and blank line in front of the file make a first "From " line (after any blank
    # lines) match the same patterns as every later separator.
    patterns = (b"\n\nFrom ", b"\n\r\nFrom ")
    tails = {pattern: b"\n\n"[-(len(pattern) - 1) :] for pattern in patterns}
    count = 0
    try:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK):
                for pattern in patterns:
                    # The carried tail is one byte shorter than the pattern: each match is counted once.
                    joined = tails[pattern] + block
                    count += joined.count(pattern)
                    tails[pattern] = joined[-(len(pattern) - 1) :]
    except OSError as exc:
        raise ImportSourceError(f"cannot read {show_path(path)}: {exc.strerror or exc}") from exc
    return count


def _mbox_lines(handle: BinaryIO) -> Iterator[tuple[bytes, bool, bool]]:
    """(chunk, starts a line, is a separator) for every chunk of at most ``_LINE_LIMIT`` bytes."""
    at_line_start = True
    previous_blank = True  # the start of the file counts as "after a blank line"
    while chunk := handle.readline(_LINE_LIMIT):
        yield chunk, at_line_start, at_line_start and previous_blank and chunk.startswith(b"From ")
        # A chunk cut at _LINE_LIMIT is not a whole line: the chunks after it continue the same line, which
        # therefore is not blank.
        previous_blank = at_line_start and chunk in _BLANK_LINES
        at_line_start = chunk.endswith(b"\n")


def _mbox_flags(raw: bytes) -> frozenset[str]:
    """Flags from the Status and X-Status headers mutt, Pine and Thunderbird write, and X-Mozilla-Status."""
    end = len(raw)
    for marker in (b"\n\n", b"\n\r\n"):
        position = raw.find(marker)
        if position != -1:
            end = min(end, position)
    flags: set[str] = set()
    for line in raw[:end].split(b"\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        key = name.strip().lower()
        value = value.strip()
        if key == b"status":
            # "O" (old: seen by a mail reader, not read) maps to no IMAP flag; "R" is read.
            if b"R" in value:
                flags.add(SEEN)
        elif key == b"x-status":
            for letter, flag in ((b"A", ANSWERED), (b"F", FLAGGED), (b"T", DRAFT), (b"D", DELETED)):
                if letter in value:
                    flags.add(flag)
        elif key == b"x-mozilla-status":
            flags.update(_mozilla_flags(value))
    return frozenset(flags)


def _mozilla_flags(value: bytes) -> set[str]:
    try:
        bits = int(value, 16)
    except ValueError:
        return set()
    # Thunderbird's nsMsgMessageFlags: Read 0x1, Replied 0x2, Marked 0x4, Expunged 0x8, Forwarded 0x1000.
    table = ((0x1, SEEN), (0x2, ANSWERED), (0x4, FLAGGED), (0x8, DELETED), (0x1000, FORWARDED))
    return {flag for bit, flag in table if bits & bit}


def _mbox_items(path: Path) -> Iterator[ImportItem | ImportProblem]:
    number = 0
    chunks: list[bytes] = []
    size = 0
    too_large = False
    last_was_blank_line = False

    def finish() -> ImportItem | ImportProblem:
        source = f"mbox:{show_path(path)}#{number}"
        if too_large:
            return ImportProblem(source, f"larger than the {MAX_MESSAGE_BYTES} byte limit")
        # The blank line in front of the next separator belongs to the mbox format, not to the message.
        if chunks and last_was_blank_line:
            chunks.pop()
        raw = b"".join(chunks)
        return ImportItem((), raw, _mbox_flags(raw), source, hashlib.sha256(raw).hexdigest())

    try:
        with path.open("rb") as handle:
            in_separator = False
            for chunk, line_start, separator in _mbox_lines(handle):
                if separator:
                    if number:
                        yield finish()
                    number += 1
                    chunks, size, too_large, last_was_blank_line = [], 0, False, False
                    in_separator = not chunk.endswith(b"\n")
                    continue
                if in_separator:
                    in_separator = not chunk.endswith(b"\n")  # the rest of an overlong separator line
                    continue
                if number == 0:
                    continue  # blank lines before the first separator are not a message
                if line_start and chunk[:1] == b">" and _QUOTED_FROM.match(chunk):
                    chunk = chunk[1:]  # mboxrd: the writer put one '>' in front of ">*From " body lines
                last_was_blank_line = line_start and chunk in _BLANK_LINES
                size += len(chunk)
                if size > MAX_MESSAGE_BYTES:
                    too_large = True
                    chunks = []
                if not too_large:
                    chunks.append(chunk)
    except OSError as exc:
        yield ImportProblem(
            f"mbox:{show_path(path)}#{number}", f"cannot read the rest of the file: {exc.strerror or exc}"
        )
        return
    if number:
        yield finish()
