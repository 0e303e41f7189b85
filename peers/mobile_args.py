"""The command-line options of the simulated mobile peer, apart from the peer itself.

``crdtmail`` builds its parser for every command; importing these options alone keeps ``crdtmail ls`` from
loading the mobile peer (peers/mobile.py), which it never runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a number of 0 or more")
    return value


def _moment(text: str) -> float:
    """Epoch seconds, or an ISO 8601 date and time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is neither epoch seconds nor an ISO 8601 date") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def add_arguments(parser: argparse.ArgumentParser, *, common: bool = True) -> None:
    """Add the mobile peer's options to ``parser`` (``common=False`` leaves out --data-dir, --mailbox and -v,
    for a command line that has them already)."""
    if common:
        parser.add_argument("--data-dir", default=None, help="the phone's data directory (created if missing)")
        parser.add_argument("--mailbox", default=None, help="the mailbox to use (default: the config's)")
        parser.add_argument("-v", "--verbose", action="store_true", help="log the sync layers too")
    parser.add_argument("--desktop", metavar="URL", help="the desktop peer to dial, e.g. ws://127.0.0.1:7878/sync")
    parser.add_argument("--token", help="this phone's device token on the desktop (from `crdtmail pair`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user, connectivity and mail models (0)")
    parser.add_argument("--rate", type=_non_negative, default=1.0, help="user actions per second (1; 0: none)")
    parser.add_argument("--duration", type=_positive, default=None, help="seconds to run (default: until a signal)")
    parser.add_argument("--mean-online", type=_non_negative, default=60.0, help="mean seconds online (60)")
    parser.add_argument("--mean-offline", type=_non_negative, default=30.0,
                        help="mean seconds offline (30; 0: always online)")
    parser.add_argument("--trace", type=Path, default=None,
                        help="a connectivity trace ('online SECONDS' / 'offline SECONDS' lines) instead of random")
    parser.add_argument("--flaky", action="store_true", help="drop the connection at random moments while online")
    parser.add_argument("--flaky-mean", type=_positive, default=2.0, help="mean seconds between drops (2)")
    parser.add_argument("--metrics", type=Path, default=None, help="append a JSON line per event to this file")
    parser.add_argument("--window-months", type=int, default=3,
                        help="months of mail kept on the phone (3; 0: all of it)")
    parser.add_argument("--body-days", type=_non_negative, default=30.0,
                        help="fetch bodies of mail younger than this many days ahead of time (30; 0: no age limit)")
    parser.add_argument("--body-max-bytes", type=int, default=256 * 1024,
                        help="fetch ahead of time only bodies up to this size (262144; 0: no limit)")
    parser.add_argument("--now", type=_moment, default=None,
                        help="the phone's clock at the start (epoch seconds or ISO 8601; default: now)")
    parser.add_argument("--device", default="phone", help="the device name in Message-IDs of new mail (phone)")
