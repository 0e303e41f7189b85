"""Keeping freed memory in the process while an initial sync runs (glibc's allocator; a no-op elsewhere).

An initial sync handles megabyte shards one after another: the frame, its payload, Yrs' decoding of it and the
SQLite row each take megabytes and give them back. With glibc's defaults a block that large is a fresh ``mmap``
(or the top of the heap is handed back to the system as soon as it is free), so every shard pays again for
the page faults of memory the one before it just released. While ``large_allocations`` is held, big blocks come
from the heap and freed memory stays there for the next shard; when the last ``Hold`` lets go, the thresholds
come down to settled values (see SETTLED_TRIM_THRESHOLD) and, if large blocks were taken meanwhile
(``note_large``), what is free is returned to the system (``malloc_trim``).

Measured on the 100k-message bench mailbox, interleaved runs of a fresh peer: its last 3 months in sync in
0.101-0.128 s against 0.134-0.165 s and listed in 0.91-1.05 s against 1.07-1.12 s; the whole mailbox in
0.25-0.38 s against 0.30-0.43 s; peak RSS 10 MB higher (148 against 138 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# While held: blocks up to 64 MB come from the heap, and the heap is not trimmed below 256 MB of free space.
HELD_MMAP_THRESHOLD = 64 * 1024 * 1024
HELD_TRIM_THRESHOLD = 256 * 1024 * 1024
# Set at the end. Not glibc's starting values (128 KB each): once a value is set, glibc no longer raises it by
# itself as large blocks are freed, and a long-running peer with a 128 KB trim threshold gave memory back and
# faulted it in again around every change (one hop 0.03-0.05 ms slower at p50). These are about where glibc's own
# adjustment ends after a sync of megabyte shards.
SETTLED_MMAP_THRESHOLD = 4 * 1024 * 1024
SETTLED_TRIM_THRESHOLD = 8 * 1024 * 1024


def _load_glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        # musl, bionic and the BSDs have no gnu_get_libc_version; their mallopt is absent or takes other values.
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_glibc = _load_glibc()
_lock = threading.Lock()
_holders = 0
_large_since_held = False
# From this size on a block counts as large (see ``note_large``).
LARGE_BYTES = 1024 * 1024


def supported() -> bool:
    """Whether this process's allocator is glibc's, the one ``large_allocations`` tunes."""
    return _glibc is not None


def holders() -> int:
    """How many holds (``Hold``, ``large_allocations``) are held right now."""
    return _holders


def note_large(size: int) -> None:
    """Tell that a block of ``size`` bytes was taken: once LARGE_BYTES or more were, the end of the holds
    returns free memory to the system (a trim walks the whole heap: 4 ms at 180 MB, for nothing after a
    resync of a few changes)."""
    global _large_since_held
    if size >= LARGE_BYTES:
        _large_since_held = True


class Hold:
    """One holder of the "large allocations" mode (see the module), from its creation until ``release``.

    Holds may overlap and nest; the last one released settles the thresholds and, if a large block was taken
    meanwhile (``note_large``, or ``large=True`` here), returns free memory to the system. Releasing twice is
    harmless, so a hold can be let go both when its work ends and by a timer.
    """

    __slots__ = ("_held",)

    def __init__(self, *, large: bool = False) -> None:
        global _holders, _large_since_held
        with _lock:
            _holders += 1
            _large_since_held = _large_since_held or large
            if _holders == 1 and _glibc is not None:
                _glibc.mallopt(_M_MMAP_THRESHOLD, HELD_MMAP_THRESHOLD)
                _glibc.mallopt(_M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD)
        self._held = True

    def release(self) -> None:
        """Let go (once; later calls do nothing)."""
        global _holders, _large_since_held
        with _lock:
            if not self._held:
                return
            self._held = False
            _holders -= 1
            if _holders:
                return
            if _glibc is not None:
                _glibc.mallopt(_M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
                _glibc.mallopt(_M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
                if _large_since_held:
                    _glibc.malloc_trim(0)
            _large_since_held = False


@contextmanager
def large_allocations() -> Iterator[None]:
    """A ``Hold`` for the length of a block."""
    hold = Hold()
    try:
        yield
    finally:
        hold.release()
