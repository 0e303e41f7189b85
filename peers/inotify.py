"""Linux inotify for the desktop peer's Maildirs, read on the event loop: no thread, no tmp/ watches.

watchdog's recursive observer watches every directory under the Maildir, tmp/ included, and turns each kernel
event into Python objects on two threads of its own. A desktop that delivers a whole mailbox (a second desktop's
first mirror) made three events per message it wrote itself (created in tmp/, moved from tmp/, moved into new/),
and the GIL those threads held starved the event loop: 100k deliveries took 25 s longer with the observer than
without it (measured on this project's 2-core VM). This watcher asks the kernel only for what a pass needs:

- the Maildir's root and each folder directory: subdirectories created, deleted or moved (a folder appears,
  is renamed or goes away, or gets its cur/ and new/);
- each folder's cur/ and new/: files created, deleted or moved in or out (new mail, flags, moves, removals).

tmp/ is never watched (a delivery in progress is not mail yet; its rename into new/ or cur/ is the news), nor is
the expunged area. Events are read when the loop sees the descriptor readable, a whole buffer at a time, and
handed over as one list of paths. An overflowed queue, or a watched directory that vanished, is reported as a
folder change: the lane then runs a full pass, which finds whatever the events missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("crdtmail.desktop")

IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)

_CHANGES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_DIR_MASK = _CHANGES | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_FILE_SUBDIRS = ("new", "cur")
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; the name (NUL-padded to len bytes) follows
_READ_BYTES = 256 * 1024
_READS_PER_WAKE = 4  # the loop calls again while more is queued


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC = _libc()


def available() -> bool:
    """Whether this system has inotify (Linux); elsewhere the desktop peer uses watchdog."""
    return _LIBC is not None


class MaildirWatch:
    """Watches one Maildir's folder directories and their cur/ and new/ (see the module docstring).

    ``on_paths`` gets the absolute paths (text, as ``os.fsdecode`` gives them) of message files that appeared,
    moved or disappeared; ``on_folders`` is called when the folder structure may have changed or events were
    lost. Both run on the event loop. Call ``refresh`` with the bridge's folder directories whenever they may
    have changed, so new folders are watched.
    """

    def __init__(self, root: Path, on_paths: Callable[[list[str]], None], on_folders: Callable[[], None]) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this system")
        self.root = os.fsencode(str(root)).rstrip(b"/")
        self.on_paths = on_paths
        self.on_folders = on_folders
        fd = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._fd = fd
        self._paths: dict[int, bytes] = {}  # watch descriptor -> directory, relative to the root ("" = the root)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, folder_dirs: Iterable[str]) -> None:
        """Add the watches and start reading events on ``loop``."""
        self.refresh(folder_dirs)
        self._loop = loop
        loop.add_reader(self._fd, self._readable)

    def refresh(self, folder_dirs: Iterable[str]) -> None:
        """Watch exactly these folder directories ("" is the root) with their cur/ and new/."""
        wanted: list[tuple[bytes, int]] = [(b"", _DIR_MASK)]
        for folder_dir in folder_dirs:
            name = os.fsencode(folder_dir)
            if name:
                wanted.append((name, _DIR_MASK))
            wanted.extend((os.path.join(name, sub.encode()), _DIR_MASK) for sub in _FILE_SUBDIRS)
        assert _LIBC is not None
        paths: dict[int, bytes] = {}
        for relative, mask in wanted:
            # A directory renamed under us keeps its watch: adding the new path returns the same descriptor.
            wd = _LIBC.inotify_add_watch(self._fd, os.path.join(self.root, relative) if relative else self.root,
                                         mask)
            if wd >= 0:
                paths[wd] = relative
            elif ctypes.get_errno() == errno.ENOSPC:
                log.warning("inotify: out of watches (fs.inotify.max_user_watches); relying on periodic rescans")
        for wd in set(self._paths) - set(paths):
            _LIBC.inotify_rm_watch(self._fd, wd)  # fails harmlessly for a watch the kernel already dropped
        self._paths = paths

    def close(self) -> None:
        """Stop reading and drop every watch."""
        if self._fd < 0:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):  # the loop may be closing already
                self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1

    def _readable(self) -> None:
        files: list[str] = []
        folders = False
        for _ in range(_READS_PER_WAKE):  # bounded: a flood of events must not hold the loop
            try:
                buffer = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("inotify: cannot read events: %s; relying on rescans", exc.strerror)
                folders = True
                break
            if not buffer:
                break
            folders |= self._parse(buffer, files)
        if files:
            self.on_paths(files)
        if folders:
            self.on_folders()

    def _parse(self, buffer: bytes, files: list[str]) -> bool:
        """Append the message file paths an event buffer names; returns whether the folder structure may have
        changed (or events were lost)."""
        folders = False
        offset = 0
        size = _EVENT.size
        while offset + size <= len(buffer):
            wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
            name = buffer[offset + size : offset + size + length].rstrip(b"\0")
            offset += size + length
            if mask & IN_Q_OVERFLOW:
                folders = True
                continue
            relative = self._paths.get(wd)
            if mask & IN_IGNORED:
                self._paths.pop(wd, None)
                folders = folders or relative is not None
                continue
            if relative is None:
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                folders = True
                continue
            if os.path.basename(relative) in (b"new", b"cur"):
                if not mask & IN_ISDIR and name and not name.startswith(b"."):
                    files.append(os.fsdecode(os.path.join(self.root, relative, name)))
            elif mask & IN_ISDIR and (name.startswith(b".") or name in (b"new", b"cur")):
                folders = True  # a folder directory (or a folder's cur/ or new/) came, went or was renamed
        return folders
