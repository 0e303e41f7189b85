"""Shared test helpers: raw messages built on the fly."""

from __future__ import annotations

import itertools

_counter = itertools.count()


def make_raw(
    subject: str = "Hello",
    *,
    message_id: str | None = None,
    date: str | None = "Tue, 10 Nov 2026 09:30:00 +0000",
    sender: str = "Ada Lovelace <ada@example.org>",
    body: str = "Hi there.\n",
) -> bytes:
    """A small RFC 5322 message; a unique Message-ID unless one is given ("" leaves the header out)."""
    if message_id is None:
        message_id = f"<m{next(_counter)}@test.example>"
    lines = [f"From: {sender}", "To: Bob <bob@example.org>", f"Subject: {subject}"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    if date:
        lines.append(f"Date: {date}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")
