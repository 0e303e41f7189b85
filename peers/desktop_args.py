"""The desktop peer's ``--watcher`` option, apart from the peer itself.

``crdtmail`` builds its parser for every command; importing this alone keeps ``crdtmail ls`` from loading the
desktop peer (peers/desktop.py) and watchdog, which it never runs.
"""

from __future__ import annotations

import argparse

WATCHERS = ("watchdog", "inotify")
WATCHER_HELP = ("how to notice Maildir changes: watchdog (default), or inotify read on the event loop (Linux; "
                "faster when a whole mailbox is delivered at once)")


def add_watcher_argument(parser: argparse.ArgumentParser) -> None:
    """``--watcher {watchdog,inotify}``, watchdog by default."""
    parser.add_argument("--watcher", choices=WATCHERS, default="watchdog", help=WATCHER_HELP)
