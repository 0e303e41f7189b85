"""A worker process that reads and parses Maildir files for the bridge, on the other core.

``python -m crdtmail.bridges.parse_worker`` reads file paths from stdin, one JSON string per line (each byte of the
path as one latin-1 character, so any file name survives), and writes one JSON line per path: the message id,
shard and envelope, or ``{"error": why}``. Bodies stay in the files, so only envelopes cross the pipe.
"""

from __future__ import annotations

import os
import sys

import orjson

from crdtmail.errors import MessageParseError
from crdtmail.importer import _describe_os_error, _read_file
from crdtmail.model.message import parse_message


def describe(path: str) -> bytes:
    """One result line for one path."""
    raw = _read_file(path)
    if isinstance(raw, OSError):
        return orjson.dumps({"error": _describe_os_error(path, raw)})
    if isinstance(raw, str):
        return orjson.dumps({"error": raw})
    try:
        parsed = parse_message(raw)
    except MessageParseError as exc:
        return orjson.dumps({"error": str(exc)})
    return orjson.dumps({"id": parsed.message_id, "shard": parsed.shard, "envelope": parsed.envelope.to_crdt()})


def main() -> int:
    """Serve paths until stdin closes."""
    out = sys.stdout.buffer
    lines: list[bytes] = []
    for line in sys.stdin.buffer:
        path = os.fsdecode(orjson.loads(line).encode("latin-1"))
        lines.append(describe(path) + b"\n")
        if len(lines) >= 64:
            out.write(b"".join(lines))
            out.flush()
            lines.clear()
    out.write(b"".join(lines))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
