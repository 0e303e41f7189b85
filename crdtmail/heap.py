"""Keeping freed memory in the process while an initial sync runs (glibc's allocator; a no-op elsewhere).

An initial sync handles megabyte shards one after another: the frame, its payload, Yrs' decoding of it and the
SQLite row each take megabytes and give them back. With glibc's defaults a block that large is a fresh ``mmap``
(or the top of the heap is handed back to the system as soon as it is free), so every shard pays again for
the page faults of memory the one before it just released. While a ``Hold`` is held, big blocks come
from the heap and freed memory stays there for the next shard; when the last ``Hold`` lets go, the thresholds
come down to settled values (see SETTLED_TRIM_THRESHOLD) and, if large blocks were taken meanwhile
(``note_large``), what is free is returned to the system (``malloc_trim``).

Measured on the 100k-message bench mailbox, interleaved runs of a fresh peer: its last 3 months in sync in
0.101-0.128 s against 0.134-0.165 s and listed in 0.91-1.05 s against 1.07-1.12 s; the whole mailbox in
0.25-0.38 s against 0.30-0.43 s; peak RSS 10 MB higher (148 against 138 MB).

Under a hold, ``prefault`` makes the heap's next megabytes resident on a helper thread, ahead of the shards that
will need them: on this VM a page faulted in costs 2-3 us, and a fresh peer's first two month shards faulted in
about 43 MB (11,000 pages, 25-30 ms of the 0.1 s) while Yrs decoded them and SQLite stored them.
"""

from __future__ import annotations

import _thread
import ctypes
import ctypes.util
import errno
import logging
import threading

log = logging.getLogger(__name__)

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
        libc = ctypes.CDLL(name, use_errno=True)
        # musl, bionic and the BSDs have no gnu_get_libc_version; their mallopt is absent or takes other values.
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_glibc = _load_glibc()
_lock = threading.Lock()
_holders = 0
_large_since_held = False
_prefaulting: threading.Event | None = None  # set once the running prefault is done
_populate_supported = True  # until the kernel says it does not know MADV_POPULATE_WRITE
# madvise advice (Linux 5.14 and later): fault the range in as writable, leaving its contents as they are.
_MADV_POPULATE_WRITE = 23
_PAGE = 4096
# The most one ``prefault`` makes resident: about what a fresh peer's biggest month shards fault in.
PREFAULT_MAX_BYTES = 48 * 1024 * 1024
PREFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# From this size on a block counts as large (see ``note_large``).
LARGE_BYTES = 1024 * 1024


def supported() -> bool:
    """Whether this process's allocator is glibc's, the one a ``Hold`` tunes."""
    return _glibc is not None


def holders() -> int:
    """How many ``Hold``s are held right now."""
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

    Holds may overlap and nest (``with Hold():`` holds for a block); the last one released settles the thresholds
    and, if a large block was taken meanwhile (``note_large``, or ``large=True`` here), returns free memory to the
    system. Releasing twice is harmless, so a hold can be let go both when its work ends and by a timer.
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

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

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


def prefault(size: int) -> threading.Event | None:
    """Make the next ``size`` bytes (at most PREFAULT_MAX_BYTES) of the heap resident, on a helper thread, while
    this thread goes on; returns an event set once that thread is done, or None when there is nothing to do: no
    hold is held (the memory would go straight back to the system), a prefault is still running, or the
    allocator is not glibc's.

    A block of ``size`` is taken from the heap and given back at once, which leaves the heap that much larger
    (a hold keeps it), and the thread faults its pages in with ``MADV_POPULATE_WRITE``, which changes no byte of
    them, so the allocator may hand them out meanwhile. Where the kernel lacks that advice nothing happens.
    """
    global _prefaulting
    size = min(size, PREFAULT_MAX_BYTES)
    with _lock:
        if (_glibc is None or not _populate_supported or not _holders or size < _PAGE
                or (_prefaulting is not None and not _prefaulting.is_set())):
            return None
        block = _glibc.malloc(size)
        if not block:
            return None
        _glibc.free(block)
        start = (block + _PAGE - 1) & ~(_PAGE - 1)
        length = (size - (start - block)) & ~(_PAGE - 1)
        done = threading.Event()
        # Not threading.Thread: its start() waits until the new thread runs, and on a first sync the other cores
        # are busy (the serving peer sends its first shard right then): 2-8 ms of this thread's time, measured.
        _thread.start_new_thread(_populate, (start, length, done))
        _prefaulting = done
        return done


def _populate(start: int, length: int, done: threading.Event) -> None:
    global _populate_supported
    assert _glibc is not None
    # ctypes lets go of the GIL for each call, so the faults are taken on another core. In chunks: the kernel
    # holds the process's mmap lock through one call, and the main thread, which needs it to map memory (a new
    # arena of Python's allocator, a thread's stack), would wait for the whole range (25 ms for 48 MB here).
    # A range the heap gave back meanwhile (a hold ended and trimmed it) fails with ENOMEM, and is no loss.
    try:
        for offset in range(0, length, PREFAULT_CHUNK_BYTES):
            size = min(PREFAULT_CHUNK_BYTES, length - offset)
            if _glibc.madvise(start + offset, size, _MADV_POPULATE_WRITE) != 0:
                if ctypes.get_errno() == errno.EINVAL:
                    _populate_supported = False
                    log.debug("this kernel has no MADV_POPULATE_WRITE (Linux 5.14 and later): no faulting in ahead")
                return
    finally:
        done.set()
