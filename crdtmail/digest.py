"""SHA-256 digests for the event loop's thread, computed without handing the GIL to other threads.

CPython's hashlib releases the GIL while it hashes a buffer of 2,048 bytes or more. On a thread that must keep
going (a peer's event loop) that is a trap when other Python threads are busy (the bridge's writer threads,
watchdog's observer): taking the GIL back waits for one of them to give it up, up to a whole switch interval
(5 ms) for a hash that takes microseconds. Measured on this project's VM with one busy thread beside it: 2.7 ms
per 10 KB body hashed in one call, 16 us in updates below the threshold. Updates of less than 2,048 bytes keep
the GIL; between them the interpreter still lets other threads run at its usual switch points.
"""

from __future__ import annotations

import hashlib

_GIL_RELEASE_BYTES = 2048  # hashlib hashes this many bytes or more with the GIL released (HASHLIB_GIL_MINSIZE)
_PIECE = _GIL_RELEASE_BYTES - 1


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The SHA-256 of ``data`` as lowercase hex, the same as ``hashlib.sha256(data).hexdigest()``.

    For code on an event loop's thread; a worker thread that wants its hashing to run beside Python code should
    call hashlib directly, which lets go of the GIL.
    """
    if len(data) < _GIL_RELEASE_BYTES:
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    view = memoryview(data).cast("B")
    for offset in range(0, len(view), _PIECE):
        digest.update(view[offset : offset + _PIECE])
    return digest.hexdigest()
