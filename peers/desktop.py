"""The desktop peer: the sync peer plus a two-way Maildir bridge per mailbox, running until stopped.

``crdtmail desktop --maildir ~/Maildir`` (or ``python -m peers.desktop``) mirrors the Maildir into the replica,
then keeps both in step: watchdog (or, with ``--watcher inotify`` on Linux, peers/inotify.py) reports file
renames, deliveries and removals within milliseconds, a full rescan every ``rescan_seconds`` is the safety net,
and every change the replica receives from a phone is written back to the files. Paired devices connect to it;
configured peers are dialed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl as ssl_module
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from crdtmail.bridges.maildir import EXPUNGED_AREA, MaildirBridge, PassReport, describe
from crdtmail.config import RemotePeer, resolve_data_dir
from crdtmail.errors import ConfigError, CrdtmailError
from crdtmail.model.mailbox import MailboxChange
from crdtmail.peer import Peer
from crdtmail.replica import Replica
from peers import inotify
from peers.desktop_args import WATCHERS, add_watcher_argument

log = logging.getLogger("crdtmail.desktop")
# watchdog warns when it re-adds a watch for a directory it already watches (a folder renamed back and forth).
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)

STATUS_FILE = "status.json"
DEBOUNCE_SECONDS = 0.003  # a mail client renames several files in a burst: take them in one pass
STREAM_BATCH_SECONDS = 0.05
STREAM_BATCH_MIN = 50
CONFIRM_GONE_SECONDS = 0.5  # a vanished file is looked for everywhere after this, before it counts as removed
# What a Maildir changes by: files and folder directories appear, move and disappear (a mail file's content never
# changes). Asking inotify for these alone keeps the kernel from queueing, and watchdog's thread from decoding,
# an open, modify and close event for every file read (each body served to a peer) or written (each delivery):
# Python work that holds the GIL the event loop needs.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileDeletedEvent, FileMovedEvent, DirCreatedEvent,
                                               DirDeletedEvent, DirMovedEvent]


class _Watch(FileSystemEventHandler):
    """Hands file events from watchdog's thread to the event loop, as paths."""

    def __init__(self, lane: _Lane, loop: asyncio.AbstractEventLoop, root: Path) -> None:
        self.lane = lane
        self.loop = loop
        self.prefix = str(root).rstrip("/") + "/"

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed", "closed_no_write"):
            return
        paths = [_text(event.src_path)]
        dest = getattr(event, "dest_path", "")
        if dest:
            paths.append(_text(dest))
        if all(self._ignored(p) for p in paths):
            return
        if event.is_directory:
            if event.event_type == "modified":
                return
            self.loop.call_soon_threadsafe(self.lane.folder_event)
            return
        self.loop.call_soon_threadsafe(self.lane.file_event, paths)


    def _ignored(self, path: str) -> bool:
        """Deliveries in progress (tmp/) and the expunged area are not mail to look at."""
        parts = path[len(self.prefix):].split("/") if path.startswith(self.prefix) else []
        return not parts or parts[0] == EXPUNGED_AREA or "tmp" in parts[:2]


def _text(path: str | bytes) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


@dataclass(eq=False)
class _Lane:
    """One mailbox's bridge and the work waiting for it."""

    bridge: MaildirBridge
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    paths: set[str] = field(default_factory=set)
    folders_changed: bool = False
    full_due: float | None = None
    watch: inotify.MaildirWatch | None = None

    def refresh_watch(self) -> None:
        """Watch the folder directories there are now (inotify watches are per directory)."""
        if self.watch is not None:
            self.watch.refresh(self.bridge.folder_dirs())

    def file_event(self, paths: list[str]) -> None:
        self.paths.update(paths)
        self.wake.set()

    def folder_event(self) -> None:
        self.folders_changed = True
        self.full_due = time.monotonic() + CONFIRM_GONE_SECONDS
        self.wake.set()

    def body_arrived(self, _sha256: str) -> None:
        if self.bridge.pending():
            self.wake.set()

    def replica_changed(self, _change: MailboxChange) -> None:
        if self.bridge.pending():
            self.wake.set()


class DesktopPeer:
    """A replica's peer with a Maildir bridge for each mailbox in ``maildirs``."""

    def __init__(self, replica: Replica, maildirs: dict[str, Path], *, rescan_seconds: float | None = None,
                 retention_days: float | None = None, watcher: str = "watchdog") -> None:
        if not maildirs:
            raise ConfigError("no Maildir to mirror: give --maildir PATH, or a [maildirs] entry in the config")
        for name, root in maildirs.items():
            if not (root / "cur").is_dir() or not (root / "new").is_dir():
                raise ConfigError(f"{root} is not a Maildir (no cur/ and new/ inside); point --maildir at one "
                                  f"for mailbox {name}")
        self.replica = replica
        self.maildirs = maildirs
        config = replica.config
        self.rescan_seconds = config.rescan_seconds if rescan_seconds is None else rescan_seconds
        self.retention_days = config.expunged_retention_days if retention_days is None else retention_days
        if watcher not in WATCHERS:
            raise ConfigError(f"unknown file watcher {watcher!r}: {', '.join(WATCHERS)}")
        # watchdog (the watcher library) by default; inotify read on the event loop when asked for and available
        # (no threads to take the GIL: a second desktop mirroring 100k messages in 29 s instead of 38-44 s).
        self.watcher = "inotify" if watcher == "inotify" and inotify.available() else "watchdog"
        if watcher == "inotify" and self.watcher != "inotify":
            log.warning("inotify is not available here; watching the Maildirs with watchdog")
        self.peer = Peer(replica, bodies=True)
        self.lanes: dict[str, _Lane] = {}
        self._blobs = replica.store.backend("")

    def open_bridges(self) -> dict[str, PassReport]:
        """Create each mailbox's bridge and run its first full pass (a first mirror reads every file)."""
        reports = {}
        for name, root in self.maildirs.items():
            mailbox = self.peer.mailbox(name)
            bridge = MaildirBridge(mailbox, root, self.replica.store, retention_days=self.retention_days,
                                   blob=self._blobs.get_blob, drop_blobs=self.replica.store.delete_blobs,
                                   stored_blobs=self._blobs.stored_blobs)
            self.peer.body_sources.append(bridge)
            self.peer.body_listeners.append(bridge.body_arrived)
            lane = _Lane(bridge)
            mailbox.observe(lane.replica_changed)
            self.peer.body_listeners.append(lane.body_arrived)
            self.lanes[name] = lane
            started = time.perf_counter()
            report = bridge.full_pass()
            reports[name] = report
            log.info("maildir %s (%s): first pass over %d files in %.2fs: %s", name, root, report.files_seen,
                     time.perf_counter() - started, report.summary())
        return reports

    async def run(self, stop: asyncio.Event, *, host: str | None = None, port: int | None = None,
                  ssl: ssl_module.SSLContext | None = None, remotes: Sequence[RemotePeer] | None = None,
                  ready: asyncio.Event | None = None) -> None:
        """Serve, dial, watch and bridge until ``stop`` is set."""
        config = self.replica.config
        if not self.lanes:
            self.open_bridges()
        loop = asyncio.get_running_loop()
        observer = Observer()
        watched = False
        for name, lane in self.lanes.items():
            if self.watcher == "inotify":
                try:
                    lane.watch = inotify.MaildirWatch(self.maildirs[name], lane.file_event, lane.folder_event)
                    lane.watch.start(loop, lane.bridge.folder_dirs())
                except OSError as exc:  # out of inotify instances (fs.inotify.max_user_instances), say
                    log.warning("maildir %s: cannot use inotify (%s); watching with watchdog", name, exc)
                    if lane.watch is not None:
                        lane.watch.close()
                        lane.watch = None
                else:
                    continue
            observer.schedule(_Watch(lane, loop, self.maildirs[name]), str(self.maildirs[name]), recursive=True,
                              event_filter=WATCHED_EVENTS)
            watched = True
        if watched:  # its threads only when a lane uses it
            observer.start()
        bind_host = host or config.listen_host
        bind_port = config.listen_port if port is None else port
        try:
            self.server = await self.peer.serve(bind_host, bind_port, ssl=ssl or config.server_tls())
        except OSError as exc:
            observer.stop()
            raise ConfigError(f"cannot listen on {bind_host}:{bind_port}: {exc.strerror}; pick another --port") from exc
        remotes = config.peers if remotes is None else remotes
        tasks = [asyncio.create_task(self.peer.dial_remote(remote).run()) for remote in remotes]
        tasks += [asyncio.create_task(self._work(name, lane, stop)) for name, lane in self.lanes.items()]
        status_path = self.replica.data_dir / STATUS_FILE
        if ready is not None:
            ready.set()
        try:
            while not stop.is_set():
                status_path.write_bytes(orjson.dumps(self.status()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        finally:
            observer.stop()
            for dialer in self.peer.dialers:
                dialer.stop()
            for session in list(self.peer.sessions):
                await session.link.close(1001, "desktop peer shutting down")
            self.server.close()
            await self.server.wait_closed()
            for lane in self.lanes.values():
                lane.wake.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            if watched:
                await asyncio.to_thread(observer.join, 5)
            for lane in self.lanes.values():
                if lane.watch is not None:
                    lane.watch.close()
            status_path.unlink(missing_ok=True)

    @property
    def port(self) -> int:
        """The port the peer listens on (useful with port 0)."""
        return int(self.server.sockets[0].getsockname()[1])

    async def _work(self, name: str, lane: _Lane, stop: asyncio.Event) -> None:
        """Run bridge passes when the watcher or the replica has news, and a full pass on schedule."""
        bridge = lane.bridge
        loop = asyncio.get_running_loop()
        bridge.background_writes = True

        def written() -> None:  # on a writer thread
            loop.call_soon_threadsafe(lane.wake.set)

        bridge.on_background_done = written
        next_full = time.monotonic() + self.rescan_seconds
        delay = DEBOUNCE_SECONDS
        while not stop.is_set():
            timeout = next_full - time.monotonic()
            if lane.full_due is not None:
                timeout = min(timeout, lane.full_due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), timeout=max(0.0, timeout))
            lane.wake.clear()
            if stop.is_set():
                break
            await asyncio.sleep(delay)
            try:
                now = time.monotonic()
                if now >= next_full or (lane.full_due is not None and now >= lane.full_due):
                    lane.paths.clear()
                    lane.folders_changed = False
                    lane.full_due = None
                    lane.refresh_watch()  # before the listing: a file arriving after it is then seen
                    report = bridge.full_pass(compare_replica=False)
                    lane.refresh_watch()  # and directories the pass made
                    next_full = time.monotonic() + self.rescan_seconds
                    if report.changed():
                        log.info("maildir %s: full pass over %d files in %.2fs: %s", name, report.files_seen,
                                 report.seconds, report.summary())
                    continue
                paths, lane.paths = lane.paths, set()
                folders, lane.folders_changed = lane.folders_changed, False
                report, needs_full = bridge.quick_pass(paths, folders_changed=folders)
                if folders or report.folders_changed:
                    lane.refresh_watch()
                # While mail streams in (a first mirror), wait a little longer for the next group: fewer, larger
                # groups cost fewer transactions; a single change still goes out after DEBOUNCE_SECONDS.
                delay = STREAM_BATCH_SECONDS if report.delivered >= STREAM_BATCH_MIN else DEBOUNCE_SECONDS
                if needs_full and lane.full_due is None:
                    lane.full_due = time.monotonic() + CONFIRM_GONE_SECONDS
                if report.changed():
                    log.info("maildir %s: %s (%.1f ms)", name, report.summary(), report.seconds * 1000)
                if bridge.pending():
                    lane.wake.set()
            except CrdtmailError as exc:
                log.error("maildir %s: %s; retrying at the next change or rescan", name, exc)
            except OSError as exc:
                log.error("maildir %s: %s; retrying at the next change or rescan", name, exc)
                lane.full_due = time.monotonic() + 1.0
        bridge.close()  # what is being written is recorded before the peer stops

    def status(self) -> dict[str, Any]:
        """What ``crdtmail status`` and ``crdtmail peers`` show of this running peer."""
        return {
            "peer_id": self.peer.peer_id,
            "written": time.time(),
            "sessions": [vars(status) for status in self.peer.status()],
            "mailboxes": self.peer.mailbox_status(),
            "dialers": [{"url": d.url, "connections": d.connections, "last_error": d.last_error}
                        for d in self.peer.dialers],
            "bridges": {name: describe(lane.bridge) for name, lane in self.lanes.items()},
        }


def maildirs_from(values: Sequence[str], replica: Replica, default_mailbox: str | None) -> dict[str, Path]:
    """``--maildir [MAILBOX=]PATH`` options (none: the config's [maildirs]) as mailbox -> path."""
    result: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name:
            name, path = default_mailbox or replica.config.default_mailbox, value
        result[name] = Path(path).expanduser().resolve()
    return result or dict(replica.config.maildirs)


async def run_desktop(replica: Replica, maildirs: dict[str, Path], *, host: str | None, port: int | None,
                      once: bool, out: Any, watcher: str = "watchdog") -> int:
    """The body of ``crdtmail desktop``: bridge (and, unless ``once``, serve and watch) until a signal."""
    replica.claim_for_peer()  # a second desktop peer on the same directory would deliver new mail twice
    desktop = DesktopPeer(replica, maildirs, watcher=watcher)
    reports = desktop.open_bridges()
    for name, report in reports.items():
        out.write(f"maildir {maildirs[name]} -> mailbox {name}: {report.files_seen} files, {report.summary()} "
                  f"({report.seconds:.2f}s)\n")
    if once:
        for lane in desktop.lanes.values():
            lane.bridge.close()
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ready = asyncio.Event()
    runner = asyncio.create_task(desktop.run(stop, host=host, port=port, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([runner, waiter], return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        waiter.cancel()
        await runner  # raises what stopped it
        return 0
    scheme = "wss" if replica.config.server_tls() else "ws"
    out.write(f"desktop peer {desktop.peer.peer_id} listening on {scheme}://{host or replica.config.listen_host}:"
              f"{desktop.port}/sync; watching {', '.join(str(p) for p in maildirs.values())}; Ctrl-C stops\n")
    out.flush()
    await runner
    out.write("stopped; every change is committed\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peers.desktop``: the same as ``crdtmail desktop``."""
    parser = argparse.ArgumentParser(prog="python -m peers.desktop", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--maildir", action="append", default=[], metavar="[MAILBOX=]PATH")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--once", action="store_true", help="one full pass, then exit")
    add_watcher_argument(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        data_dir = resolve_data_dir(args.data_dir)
        replica = Replica.open(data_dir) if (data_dir / "crdtmail.sqlite3").exists() else Replica.init(data_dir)
        with replica:
            return asyncio.run(run_desktop(replica, maildirs_from(args.maildir, replica, None), host=args.host,
                                           port=args.port, once=args.once, out=sys.stdout,
                                           watcher=args.watcher))
    except CrdtmailError as exc:
        sys.stderr.write(f"crdtmail desktop: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
