"""The allocator's large-allocations mode: holds count, and memory freed under them returns to the system at the
last one's end when large blocks were taken (glibc; elsewhere the mode changes nothing)."""

from __future__ import annotations

import contextlib
import os

import pytest

from crdtmail import heap


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_holds_overlap_and_nest() -> None:
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first.enter_context(heap.Hold())
    second.enter_context(heap.Hold())
    with heap.Hold():
        assert heap.holders() == 3
    first.close()  # not the last one taken: they need not end in order
    assert heap.holders() == 1
    second.close()
    assert heap.holders() == 0
    hold = heap.Hold()
    assert heap.holders() == 1
    hold.release()
    hold.release()  # a second release (a timer's, after the work's own) changes nothing
    assert heap.holders() == 0


def churn(megabytes: int) -> None:
    """Take and free ``megabytes`` 1 MB blocks, all alive at once (the bytes are written, so their pages are)."""
    blocks = [b"x" * 2**20 for _ in range(megabytes)]
    del blocks


@pytest.mark.skipif(not heap.supported(), reason="tunes glibc's allocator only")
@pytest.mark.parametrize("large", [True, False])
def test_freed_memory_stays_while_held_and_goes_back_after_large_blocks(large: bool) -> None:
    before = rss_mb()
    with heap.Hold():
        churn(96)
        held = rss_mb()
        if large:
            heap.note_large(heap.LARGE_BYTES)
    after = rss_mb()
    assert held - before > 64  # freed, yet kept in the process for the next large block
    if large:
        assert after - before < 32  # returned to the system at the end
    else:
        assert after - before > 64  # no large block noted: no trim (it walks the whole heap)
        heap.note_large(heap.LARGE_BYTES)
        with heap.Hold():
            pass
        assert rss_mb() - before < 32


@pytest.mark.skipif(not heap.supported(), reason="tunes glibc's allocator only")
def test_prefault_makes_the_heap_resident_ahead_and_a_trim_gives_it_back() -> None:
    before = rss_mb()
    assert heap.prefault(64 * 2**20) is None  # no hold: the memory would go straight back
    with heap.Hold():
        done = heap.prefault(64 * 2**20)  # more than PREFAULT_MAX_BYTES: that much
        if done is None:
            pytest.skip("a prefault of this process is still running")
        assert heap.prefault(8 * 2**20) is None  # one at a time
        assert done.wait(10)
        if not heap._populate_supported:
            pytest.skip("this kernel has no MADV_POPULATE_WRITE")
        grown = rss_mb() - before
        # Resident although nothing was allocated: the allocations of a first sync find their pages there. (Less
        # than all of it where the heap's top was resident already: up to the settled trim threshold.)
        assert heap.PREFAULT_MAX_BYTES / 2**21 < grown < heap.PREFAULT_MAX_BYTES / 2**20 + 16
        heap.note_large(heap.LARGE_BYTES)
    assert rss_mb() - before < 16
