"""IMAP flags and keywords, and their Maildir letters.

A flag is stored under the key ``"<message id>/<flag>"`` in a shard's ``flags`` map, so a flag name must never
contain ``/`` and must be one IMAP atom (RFC 3501): no spaces, controls or ``(){%*"\\]``, except the leading
backslash of a system flag.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from crdtmail.errors import ModelError

SEEN = "\\Seen"
ANSWERED = "\\Answered"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
DRAFT = "\\Draft"
FORWARDED = "$Forwarded"

SYSTEM_FLAGS: tuple[str, ...] = (SEEN, ANSWERED, FLAGGED, DELETED, DRAFT)

# Maildir's info letters (https://cr.yp.to/proto/maildir.html), in the ASCII order a file name must use.
MAILDIR_LETTERS: dict[str, str] = {
    "D": DRAFT,
    "F": FLAGGED,
    "P": FORWARDED,
    "R": ANSWERED,
    "S": SEEN,
    "T": DELETED,
}
LETTER_FOR_FLAG: dict[str, str] = {flag: letter for letter, flag in MAILDIR_LETTERS.items()}

_FRIENDLY: dict[str, str] = {
    "seen": SEEN,
    "read": SEEN,
    "answered": ANSWERED,
    "replied": ANSWERED,
    "flagged": FLAGGED,
    "starred": FLAGGED,
    "deleted": DELETED,
    "draft": DRAFT,
    "forwarded": FORWARDED,
}
_ATOM_SPECIALS = frozenset('(){%*"\\]/ ')
MAX_FLAG_LENGTH = 64


# Remembered: a flag change names one of a few flags, and checking a keyword character by character took 12 us
# of a flag change's way to the peers (5 us warm). A refused name raises each time (exceptions are not cached).
@functools.lru_cache(maxsize=1024)
def normalise_flag(name: str) -> str:
    """Return the canonical spelling of a flag: ``seen`` and ``\\seen`` give ``\\Seen``; keywords stay as given.

    Raises ModelError for a name that is not one IMAP atom.
    """
    stripped = name.strip()
    lowered = stripped.lower()
    if lowered in _FRIENDLY:
        return _FRIENDLY[lowered]
    if stripped.startswith("\\"):
        for flag in SYSTEM_FLAGS:
            if flag.lower() == lowered:
                return flag
        raise ModelError(f"unknown system flag {stripped!r}: use one of {', '.join(SYSTEM_FLAGS)} or a keyword")
    if (
        not stripped
        or len(stripped) > MAX_FLAG_LENGTH
        or any(ch in _ATOM_SPECIALS or ord(ch) < 0x21 or ord(ch) > 0x7E for ch in stripped)
    ):
        raise ModelError(
            f"invalid keyword {name!r}: a keyword is 1-{MAX_FLAG_LENGTH} printable ASCII characters "
            "without spaces or (){%*\"\\]/"
        )
    return stripped


def flags_from_maildir_info(info: str) -> frozenset[str]:
    """Flags named by the letters after ``:2,`` in a Maildir file name; unknown letters are ignored."""
    return frozenset(MAILDIR_LETTERS[ch] for ch in info if ch in MAILDIR_LETTERS)


def maildir_info_from_flags(flags: Iterable[str]) -> str:
    """The Maildir letters for a set of flags, in ASCII order; flags without a letter are left out."""
    return "".join(sorted(LETTER_FOR_FLAG[flag] for flag in flags if flag in LETTER_FOR_FLAG))
