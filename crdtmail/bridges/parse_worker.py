"""A worker process that reads and parses Maildir files for the bridge, on the other core.

``python -m crdtmail.bridges.parse_worker`` reads file paths from stdin, one JSON string per line (each byte of the
path as one latin-1 character, so any file name survives), and writes one JSON line per path: the message id,
shard and envelope, or ``{"error": why}``. Bodies stay in the files, so only envelopes cross the pipe.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import orjson

from crdtmail.errors import MessageParseError
from crdtmail.importer import describe_os_error, read_message_file
from crdtmail.model.message import ParsedMessage, parse_message


def read_and_parse(path: str) -> ParsedMessage | str:
    """One Maildir file read and parsed, without its raw bytes (the body stays in the file), or why it cannot be."""
    raw = read_message_file(path)
    if isinstance(raw, OSError):
        return describe_os_error(path, raw)
    if isinstance(raw, str):
        return raw
    try:
        return dataclasses.replace(parse_message(raw), raw=b"")
    except MessageParseError as exc:
        return str(exc)


def describe(path: str) -> bytes:
    """One result line for one path."""
    parsed = read_and_parse(path)
    if isinstance(parsed, str):
        return orjson.dumps({"error": parsed})
    return orjson.dumps({"id": parsed.message_id, "shard": parsed.shard, "envelope": parsed.envelope.to_dict()})


def main() -> int:
    """Serve paths until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bridge ends it by closing stdin, Ctrl-C or not
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
