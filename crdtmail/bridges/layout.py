"""Maildir and Maildir++ names, pure: file names and their flag letters, folder directories and folder paths.

A Maildir file name is ``<unique>[:2,<info>]``: the unique part never changes while the file lives (other tools
append tags like ``,U=123`` or ``,S=4567`` to it, which are kept), and the info letters after ``:2,`` are the
flags. Windows tools write ``!`` (and some ``;``) instead of ``:``; a renamed file keeps the separator it had.
Maildir++ keeps INBOX at the root and every other folder as a ``.Parent.Child`` directory beside it, each part in
IMAP's modified UTF-7.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from crdtmail.importer import decode_mutf7, encode_mutf7, split_maildir_name
from crdtmail.model.flags import LETTER_FOR_FLAG, MAILDIR_LETTERS

ROOT_DIR = ""  # the folder directory of INBOX: the Maildir root itself
SUBDIRS = ("new", "cur")  # listed in this order, so a file a mail client moves from new/ to cur/ is not missed
FOLDER_SUBDIRS = ("tmp", *SUBDIRS)  # what a folder directory holds
_MANAGED = frozenset(MAILDIR_LETTERS)


@dataclass(frozen=True, slots=True)
class MaildirFile:
    """One file of a Maildir: its folder directory ("" for INBOX), "new" or "cur", and its name."""

    folder_dir: str
    sub: str
    name: str

    @property
    def uid(self) -> str:
        """The unique part of the name, which stays while other tools rename the file."""
        return split_name(self.name)[0]

    @property
    def letters(self) -> str:
        """The flag letters crdtmail manages (DFPRST), sorted; a file in new/ has none."""
        if self.sub == "new":
            return ""
        info = split_name(self.name)[1]
        return managed_letters(info or "")

    def relative(self) -> str:
        """The path below the Maildir root."""
        return os.path.join(self.folder_dir, self.sub, self.name)


split_name = split_maildir_name  # a name's unique part and its info letters (None without a :2, part)


def managed_letters(info: str) -> str:
    """The DFPRST letters among a name's info letters, sorted and without repeats."""
    return "".join(sorted({ch for ch in info if ch in _MANAGED}))


def letters_for_flags(flags: Iterable[str]) -> str:
    """The Maildir letters of a set of flags, sorted; keywords without a letter are left out."""
    return "".join(sorted({LETTER_FOR_FLAG[flag] for flag in flags if flag in LETTER_FOR_FLAG}))


def flags_for_letters(letters: str) -> set[str]:
    """The flags named by Maildir letters."""
    return {MAILDIR_LETTERS[ch] for ch in letters if ch in MAILDIR_LETTERS}


def renamed(file: MaildirFile, folder_dir: str, letters: str) -> MaildirFile:
    """Where a file goes to carry ``letters`` in ``folder_dir``: its unique part, separator and the letters of
    other tools (Dovecot keywords a-z) are kept; an unflagged file that stays in its folder's new/ stays there."""
    uid, info = split_name(file.name)
    if file.sub == "new" and not letters and folder_dir == file.folder_dir:
        return file
    separator = ":2,"
    if info is not None:
        separator = file.name[len(uid) : len(uid) + 3]
    foreign = "".join(ch for ch in (info or "") if ch not in _MANAGED and ch.isalpha())
    new_info = "".join(sorted(set(letters) | set(foreign)))
    return MaildirFile(folder_dir, "cur", f"{uid}{separator}{new_info}")


def folder_dir_for_path(path: str) -> str:
    """The Maildir++ directory of a folder path ("Work/Projects" -> ".Work.Projects"); INBOX is the root.

    A "." inside a name would read as a level separator, so it is written as its modified UTF-7 form "&AC4-".
    """
    if path.lower() == "inbox":
        return ROOT_DIR
    return "." + ".".join(encode_mutf7(part).replace(".", "&AC4-") for part in path.split("/"))


def folder_path_for_dir(directory: str) -> str:
    """The folder path of a Maildir++ directory (".Work.Projects" -> "Work/Projects"); the root is INBOX."""
    if directory == ROOT_DIR:
        return "INBOX"
    text = os.fsencode(directory).decode("utf-8", "replace")
    return "/".join(decode_mutf7(part).replace("/", "_") for part in text[1:].split(".") if part)


_counter_lock = threading.Lock()
_counter = 0


def new_unique_name() -> str:
    """A unique part for a file delivered here: time, microseconds, process, a counter and the host name."""
    global _counter
    with _counter_lock:
        _counter += 1
        count = _counter
    now = time.time()
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{count}.{_host()}"


@functools.cache
def _host() -> str:
    """The host name as a Maildir name part ("/" and ":" escaped as the Maildir spec says); asked once."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
