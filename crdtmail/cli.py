"""The ``crdtmail`` command line: every command works offline, on this peer's own replica.

Each failure prints one line on stderr (``crdtmail: error: ...``) saying what failed and what to do, and exits
non-zero: 1 for a refused operation or bad input, 2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import email
import email.policy
import logging
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from crdtmail import __version__
from crdtmail.auth import DeviceRegistry
from crdtmail.bridges.state import body_from_maildir, read_meta
from crdtmail.config import Config, RemotePeer, resolve_data_dir
from crdtmail.errors import ConfigError, CrdtmailError, ModelError
from crdtmail.model.backend import IndexRow
from crdtmail.model.flags import LETTER_FOR_FLAG
from crdtmail.model.mailbox import Folder, Mailbox, MessageView
from crdtmail.peer import BodyPolicy, Peer
from crdtmail.replica import ImportReport, Replica

log = logging.getLogger("crdtmail")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------------ output


def _emit_json(value: Any, out: TextIO) -> None:
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode("utf-8") + "\n")


def _format_date(epoch: int | None) -> str:
    if not epoch:
        return "(no date)       "
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _flag_letters(flags: Sequence[str] | frozenset[str]) -> str:
    """Compact flags for a listing: N for unread, then Maildir letters, then a + for keywords."""
    letters = "" if "\\Seen" in flags else "N"
    letters += "".join(sorted(LETTER_FOR_FLAG[f] for f in flags if f in LETTER_FOR_FLAG and f != "\\Seen"))
    if any(f not in LETTER_FOR_FLAG for f in flags):
        letters += "+"
    return letters


def _row_json(row: IndexRow) -> dict[str, Any]:
    return {
        "id": row.message_id,
        "date": row.date or None,
        "from": row.sender,
        "subject": row.subject,
        "size": row.size,
        "flags": list(row.flags),
        "folder": row.folder_id,
    }


def _message_json(message: MessageView, folder: Folder) -> dict[str, Any]:
    env = message.envelope
    return {
        "id": message.id,
        "shard": message.shard,
        "folder": folder.path,
        "folder_id": folder.id,
        "flags": sorted(message.flags),
        "message_id": env.message_id_header,
        "from": env.sender,
        "to": env.to,
        "cc": env.cc,
        "subject": env.subject,
        "date": env.date,
        "size": env.size,
        "body_sha256": env.body_sha256,
    }


class Progress:
    """A one-line progress bar with rate and ETA on a terminal; silent otherwise."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = label
        self._stream = stream
        self._enabled = stream.isatty()
        self._started = time.perf_counter()
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1 and done < total:
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        fraction = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else 0.0
        width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - 60))
        filled = int(width * fraction)
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(
            f"\r{self._label} [{bar}] {fraction:4.0%} {done}/{total} {rate:,.0f} msg/s ETA {eta:4.0f}s "
        )
        self._stream.flush()

    def finish(self) -> None:
        """End the progress line."""
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()


# ---------------------------------------------------------------------------------------------- commands


def _open(args: argparse.Namespace) -> Replica:
    return Replica.open(args.data_dir, config_path=args.config)


def cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    with Replica.init(args.data_dir, config_path=args.config) as replica:
        out.write(f"initialised {replica.data_dir} (peer {replica.peer_id})\n")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    path = Path(args.path).expanduser()
    with _open(args) as replica:
        progress = Progress("importing", sys.stderr)
        try:
            report = replica.import_path(path, mailbox=args.mailbox, progress=progress)
        finally:
            progress.finish()
    return _print_import_report(report, path, args, out)


def _print_import_report(report: ImportReport, path: Path, args: argparse.Namespace, out: TextIO) -> int:
    if args.json:
        _emit_json(
            {
                "path": str(path),
                "total": report.total,
                "added": report.added,
                "already_present": report.already_present,
                "expunged_skipped": report.expunged_skipped,
                "problems": [{"source": p.source, "reason": p.reason} for p in report.problems],
                "skipped": report.skipped,
                "seconds": round(report.seconds, 3),
            },
            out,
        )
    else:
        out.write(
            f"imported {report.added} new messages from {path} ({report.already_present} already present, "
            f"{report.expunged_skipped} kept expunged, {len(report.problems)} problems) "
            f"in {report.seconds:.1f}s, {report.rate:,.0f} msg/s\n"
        )
    for problem in report.problems:
        sys.stderr.write(f"crdtmail: warning: not imported: {problem.source}: {problem.reason}\n")
    for skipped in report.skipped:
        log.info("skipped %s", skipped)
    if report.problems:
        sys.stderr.write(
            f"crdtmail: error: {len(report.problems)} files could not be imported (listed above); the rest were "
            "imported; fix or remove those files and run the import again\n"
        )
        return EXIT_ERROR
    return EXIT_OK


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailbox = replica.mailbox(args.mailbox)
        folder = mailbox.folder(args.folder)
        rows = mailbox.list_folder(folder.id, offset=args.offset, limit=args.limit)
        count = mailbox.counts().get(folder.id)
        if args.json:
            _emit_json(
                {
                    "folder": folder.path,
                    "total": count.total if count else 0,
                    "unread": count.unread if count else 0,
                    "offset": args.offset,
                    "messages": [_row_json(row) for row in rows],
                },
                out,
            )
            return EXIT_OK
        total = count.total if count else 0
        unread = count.unread if count else 0
        out.write(f"{folder.path}: {total} messages, {unread} unread\n")
        columns = shutil.get_terminal_size((120, 20)).columns
        for row in rows:
            sender = row.sender[:24].ljust(24)
            line = f"{row.message_id}  {_format_date(row.date)}  {_flag_letters(row.flags):4} {sender}  {row.subject}"
            out.write(line[: max(columns, 80)] + "\n")
        if args.offset + len(rows) < total:
            out.write(f"... {total - args.offset - len(rows)} more: --offset {args.offset + len(rows)}\n")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailbox = replica.mailbox(args.mailbox)
        message = mailbox.message(mailbox.resolve(args.id))
        body = mailbox.body(message.id)
        if body is None:  # a desktop keeps bodies in its Maildir files
            body = body_from_maildir(replica.store, mailbox.name, message.envelope.body_sha256)
        missing = "the body is not stored on this peer"
        if body is None and replica.config.peers:
            # Fetched on demand: a phone keeps only recent bodies, and asks a peer that has the rest.
            sha256 = message.envelope.body_sha256
            if asyncio.run(_fetch_body(replica, mailbox.name, sha256, args.wait)):
                body = mailbox.body(message.id)
            else:
                missing = "the body is not available offline: no peer that has it could be reached"
        elif body is None:
            missing += ", and no peer is configured to fetch it from"
        if args.raw:
            if body is None:
                raise ModelError(f"message {message.id}: {missing}")
            sys.stdout.buffer.write(body)
            sys.stdout.flush()
            return EXIT_OK
        folder = mailbox.folder(message.folder_id)
        if args.json:
            value = _message_json(message, folder)
            value["body_available"] = body is not None
            _emit_json(value, out)
            return EXIT_OK
        env = message.envelope
        out.write(
            f"Id:      {message.id}\nFolder:  {folder.path}\nFlags:   {' '.join(sorted(message.flags)) or '-'}\n"
            f"Date:    {_format_date(env.date)}\nFrom:    {env.sender}\nTo:      {env.to}\n"
        )
        if env.cc:
            out.write(f"Cc:      {env.cc}\n")
        out.write(f"Subject: {env.subject}\nSize:    {env.size} bytes\n\n")
        out.write(_body_text(body) if body is not None else f"({missing})\n")
    return EXIT_OK


async def _fetch_body(replica: Replica, mailbox: str, sha256: str, timeout: float) -> bool:
    """Dial the configured peers until one of them sends the body, or ``timeout`` passes."""
    peer = Peer(replica, bodies=BodyPolicy(fetch=False))
    peer.request_body(sha256)
    remotes = [remote for remote in replica.config.peers if mailbox in remote.mailboxes]
    await peer.dial_until(remotes, lambda: peer.has_blob(sha256), timeout=timeout, max_delay=1.0)
    return peer.has_blob(sha256)


def _body_text(raw: bytes) -> str:
    """The first text/plain part, decoded, for reading in a terminal."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return "(no text part)\n"
    try:
        text = part.get_content()
    except (LookupError, ValueError, AssertionError):
        payload = part.get_payload(decode=True)
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
    return text if isinstance(text, str) and text.endswith("\n") else f"{text}\n"


def cmd_flag(args: argparse.Namespace, out: TextIO) -> int:
    add: list[str] = []
    remove: list[str] = []
    for change in args.changes:
        # "-seen" looks like an option to argparse, so the changes are taken verbatim; pick out real options.
        if change == "--json":
            args.json = True
            continue
        if change.startswith("+") and len(change) > 1:
            add.append(change[1:])
        elif change.startswith("-") and len(change) > 1:
            remove.append(change[1:])
        else:
            raise ModelError(f"flag change {change!r} must start with + or -, e.g. +seen -flagged")
    if not add and not remove:
        raise ModelError("name at least one flag change, e.g. `crdtmail flag ID +seen -flagged`")
    with _open(args) as replica:
        mailbox = replica.mailbox(args.mailbox)
        message_id = mailbox.resolve(args.id)
        changed = mailbox.set_flags(message_id, add=add, remove=remove)
        flags = mailbox.message(message_id).flags
        if args.json:
            _emit_json({"id": message_id, "changed": changed, "flags": sorted(flags)}, out)
        else:
            out.write(f"{message_id}: {' '.join(sorted(flags)) or 'no flags'}{'' if changed else ' (unchanged)'}\n")
    return EXIT_OK


def cmd_move(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailbox = replica.mailbox(args.mailbox)
        message_id = mailbox.resolve(args.id)
        folder = mailbox.folder(args.folder)
        moved = mailbox.move(message_id, folder.id)
        out.write(f"{message_id}: in {folder.path}{'' if moved else ' already'}\n")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailbox = replica.mailbox(args.mailbox)
        message_id = mailbox.resolve(args.id)
        mailbox.delete(message_id)
        out.write(f"{message_id}: moved to {mailbox.folder(mailbox.message(message_id).folder_id).path}\n")
    return EXIT_OK


def cmd_expunge(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailbox = replica.mailbox(args.mailbox)
        message_id = mailbox.resolve(args.id)
        mailbox.expunge(message_id)
        out.write(f"{message_id}: expunged\n")
    return EXIT_OK


def cmd_folders(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        action = args.action or "list"
        mailbox = replica.mailbox(args.mailbox, create=action == "create")
        if action == "create":
            folder = mailbox.create_folder(args.name, role=args.role)
            out.write(f"created {folder.path} ({folder.id})\n")
        elif action == "rename":
            folder = mailbox.rename_folder(args.name, args.new_name)
            out.write(f"renamed to {folder.path} ({folder.id})\n")
        elif action == "delete":
            mailbox.delete_folder(args.name, move_to_trash=args.move_to_trash)
            out.write(f"deleted {args.name}\n")
        else:
            _list_folders(mailbox, args, out)
    return EXIT_OK


def _list_folders(mailbox: Mailbox, args: argparse.Namespace, out: TextIO) -> None:
    counts = mailbox.counts()
    folders = mailbox.folders()
    if args.json:
        _emit_json(
            [
                {
                    "id": f.id,
                    "path": f.path,
                    "role": f.role,
                    "total": counts[f.id].total if f.id in counts else 0,
                    "unread": counts[f.id].unread if f.id in counts else 0,
                }
                for f in folders
            ],
            out,
        )
        return
    width = max((len(f.path) for f in folders), default=10)
    for f in folders:
        count = counts.get(f.id)
        out.write(
            f"{f.path.ljust(width)}  {count.total if count else 0:>7} total {count.unread if count else 0:>7} unread"
            f"  {f.role or ''}\n"
        )


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailboxes = []
        for name in replica.mailbox_names():
            mailbox = replica.mailbox(name)
            counts = mailbox.counts()
            stats = replica.store.stats(name)
            mailboxes.append(
                {
                    "name": name,
                    "messages": sum(c.total for c in counts.values()),
                    "unread": sum(c.unread for c in counts.values()),
                    "folders": len(mailbox.folders()),
                    **stats,
                }
            )
        replica_bytes = replica.store.file_size()
        bridges = {name: meta for name in replica.mailbox_names() if (meta := read_meta(replica.store, name))}
        running = _running_status(replica.data_dir)
        for name, live in (running or {}).get("bridges", {}).items():
            bridges.setdefault(name, {}).update(live, running=True)
        status = {
            "data_dir": str(replica.data_dir),
            "peer_id": replica.peer_id,
            "database_bytes": replica.store.file_size(),
            "mailboxes": mailboxes,
            "bridges": bridges,
            "sessions": (running or {}).get("sessions", []),
        }
    if args.json:
        _emit_json(status, out)
        return EXIT_OK
    out.write(f"data dir: {status['data_dir']}\npeer id:  {status['peer_id']}\n")
    out.write(f"database: {replica_bytes / 1e6:.1f} MB\n")
    for entry in mailboxes:
        details = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("name", "messages", "unread"))
        out.write(f"mailbox {entry['name']}: {entry['messages']} messages, {entry['unread']} unread ({details})\n")
    if not mailboxes:
        out.write("no mailboxes yet: `crdtmail import PATH` adds one\n")
    for name, bridge in bridges.items():
        when = _format_date(int(bridge["last_full_pass"])) if bridge.get("last_full_pass") else "never"
        out.write(f"maildir bridge {name}: {bridge.get('maildir')}, {bridge.get('files', 0)} files, "
                  f"{'running' if bridge.get('running') else 'not running'}, last full pass {when}, "
                  f"last pass: {bridge.get('last_pass') or '-'}, waiting for bodies: "
                  f"{bridge.get('waiting_for_bodies', 0)}\n")
    for session in status["sessions"]:
        out.write(f"connected to {session['remote_peer']} ({session['role']}): synced "
                  f"{', '.join(session['synced']) or 'nothing yet'}\n")
    return EXIT_OK


def _running_status(data_dir: Path) -> dict[str, Any] | None:
    """What a running `crdtmail serve` or `crdtmail desktop` last wrote about itself, if it is running."""
    try:
        payload: dict[str, Any] = orjson.loads((data_dir / STATUS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return payload if time.time() - float(payload.get("written", 0)) < 10 else None


def cmd_pair(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailboxes = args.mailboxes or [args.mailbox or replica.config.default_mailbox]
        token = DeviceRegistry(replica.store).pair(args.device, mailboxes)
    if args.json:
        _emit_json({"device": args.device, "mailboxes": sorted(set(mailboxes)), "token": token}, out)
    else:
        out.write(
            f"paired {args.device} for {', '.join(sorted(set(mailboxes)))}; its token (shown only now, store it on "
            f"the device):\n{token}\n"
        )
    return EXIT_OK


def cmd_unpair(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        if not DeviceRegistry(replica.store).unpair(args.device):
            raise ConfigError(f"no paired device named {args.device!r}; `crdtmail devices` lists them")
    out.write(f"unpaired {args.device}: its token no longer opens a connection\n")
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        devices = DeviceRegistry(replica.store).devices()
    if args.json:
        _emit_json([{"device": d.name, "mailboxes": sorted(d.mailboxes), "created": d.created} for d in devices], out)
        return EXIT_OK
    for device in devices:
        out.write(f"{device.name}: {', '.join(sorted(device.mailboxes))} (paired {_format_date(device.created)})\n")
    if not devices:
        out.write("no paired devices: `crdtmail pair NAME --mailbox M` pairs one\n")
    return EXIT_OK


STATUS_FILE = "status.json"


def _status_payload(peer: Peer) -> dict[str, Any]:
    return {
        "peer_id": peer.peer_id,
        "written": time.time(),
        "sessions": [vars(status) for status in peer.status()],
        "mailboxes": peer.mailbox_status(),
        "dialers": [{"url": d.url, "connections": d.connections, "last_error": d.last_error} for d in peer.dialers],
    }


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    host = args.host or None
    with _open(args) as replica:
        config = replica.config
        return asyncio.run(_serve(replica, host or config.listen_host,
                                  config.listen_port if args.port is None else args.port, out))


def _body_policy(config: Config) -> BodyPolicy:
    return BodyPolicy(fetch=config.fetch_bodies, newer_than_days=config.bodies_newer_than_days,
                      max_bytes=config.bodies_max_bytes)


async def _serve(replica: Replica, host: str, port: int, out: TextIO) -> int:
    replica.claim_for_peer()
    peer = Peer(replica, bodies=_body_policy(replica.config))
    tls = replica.config.server_tls()
    try:
        server = await peer.serve(host, port, ssl=tls)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from exc
    bound = server.sockets[0].getsockname()
    scheme = "wss" if tls else "ws"
    out.write(f"listening on {scheme}://{bound[0]}:{bound[1]}/sync (peer {peer.peer_id}); Ctrl-C stops\n")
    out.flush()
    tasks = [asyncio.create_task(peer.dial_remote(remote).run()) for remote in replica.config.peers]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    status_path = replica.data_dir / STATUS_FILE
    try:
        while not stop.is_set():
            status_path.write_bytes(orjson.dumps(_status_payload(peer)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        for dialer in peer.dialers:
            dialer.stop()
        for session in list(peer.sessions):
            await session.link.close(1001, "peer shutting down")
        server.close()
        await server.wait_closed()
        await asyncio.gather(*tasks, return_exceptions=True)
        status_path.unlink(missing_ok=True)
    out.write("stopped; every change is committed\n")
    return EXIT_OK


def cmd_desktop(args: argparse.Namespace, out: TextIO) -> int:
    from peers.desktop import maildirs_from, run_desktop

    with Replica.open(args.data_dir) if (args.data_dir / "crdtmail.sqlite3").exists() else Replica.init(
            args.data_dir, config_path=args.config) as replica:
        maildirs = maildirs_from(args.maildirs or [], replica, args.mailbox)
        return asyncio.run(run_desktop(replica, maildirs, host=args.host or None, port=args.port, once=args.once,
                                       out=out, watcher=args.watcher))


def cmd_connect(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        mailboxes = tuple(args.mailboxes or [args.mailbox or replica.config.default_mailbox])
        remote = RemotePeer(args.url, args.token, mailboxes, Path(args.ca).expanduser() if args.ca else None,
                            "deflate" if args.compress else None)
        RemotePeer.from_toml({"url": remote.url, "token": remote.token, "mailboxes": list(mailboxes)},
                             replica.config.path)
        replica.config.add_peer(remote)
    compressed = ", compressed" if remote.compression else ""
    out.write(f"will sync {', '.join(mailboxes)} with {args.url}{compressed} (saved in {replica.config.path})\n")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        if not replica.config.peers:
            raise ConfigError("no peers configured: `crdtmail connect URL --token T` adds one")
        results = asyncio.run(_sync_once(replica, args.timeout))
    failed = [r for r in results if not r["synced"]]
    if args.json:
        _emit_json(results, out)
    else:
        for r in results:
            state = "in sync" if r["synced"] else f"NOT in sync ({r['error'] or 'timed out'})"
            compressed = " (compressed)" if r["compressed"] else ""
            out.write(f"{r['url']}: {', '.join(r['mailboxes'])} {state}; sent {r['bytes_sent']} B, "
                      f"received {r['bytes_received']} B{compressed}\n")
    if failed:
        sys.stderr.write(f"crdtmail: error: {len(failed)} of {len(results)} peers could not be synced; local "
                         "changes are kept and go out at the next sync\n")
        return EXIT_ERROR
    return EXIT_OK


async def _sync_once(replica: Replica, timeout: float) -> list[dict[str, Any]]:
    replica.claim_for_peer()
    peer = Peer(replica, bodies=_body_policy(replica.config))
    remotes = replica.config.peers
    figures: dict[str, dict[str, Any]] = {}

    def all_synced() -> bool:
        # Synced means every mailbox caught up and every body it asked for arrived.
        for session in peer.sessions:
            remote = next((r for r in remotes if r.url == session.link.name), None)
            if remote and set(remote.mailboxes) <= session.synced and not session.connection.wanted_blobs:
                figures[remote.url] = {"bytes_sent": session.connection.bytes_sent,
                                       "bytes_received": session.connection.bytes_received,
                                       "compressed": session.link.compressed}
        return len(figures) == len(remotes)

    dialers = await peer.dial_until(remotes, all_synced, timeout=timeout)
    peer.index_now()
    return [
        {"url": remote.url, "mailboxes": list(remote.mailboxes), "synced": remote.url in figures,
         "error": dialer.last_error,
         **figures.get(remote.url, {"bytes_sent": 0, "bytes_received": 0, "compressed": False})}
        for remote, dialer in zip(remotes, dialers, strict=True)
    ]


def cmd_peers(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as replica:
        configured = [{"url": r.url, "mailboxes": list(r.mailboxes), "compression": r.compression or "none"}
                      for r in replica.config.peers]
        status_path = replica.data_dir / STATUS_FILE
        live: dict[str, Any] | None = None
        if status_path.exists():
            live = orjson.loads(status_path.read_bytes())
            if time.time() - float(live.get("written", 0)) > 10:
                live = None  # left by a peer that was killed
    if args.json:
        _emit_json({"configured": configured, "running": live}, out)
        return EXIT_OK
    for entry in configured:
        compressed = ", compressed" if entry["compression"] != "none" else ""
        out.write(f"dials {entry['url']} for {', '.join(entry['mailboxes'])}{compressed}\n")
    if live is None:
        out.write("no `crdtmail serve` is running for this data directory\n")
        return EXIT_OK
    for session in live["sessions"]:
        last = _format_date(int(session["last_sync"])) if session["last_sync"] else "never"
        out.write(f"connected ({session['role']}) to {session['remote_peer']}: {', '.join(session['mailboxes'])}; "
                  f"in sync: {', '.join(session['synced']) or 'not yet'}; last sync {last}\n")
    for name, pending in live.get("mailboxes", {}).items():
        waiting = [f"{count} {what.replace('_', ' ')}" for what, count in pending.items() if count]
        if waiting:
            out.write(f"mailbox {name}: {', '.join(waiting)}\n")
    for dialer in live["dialers"]:
        if dialer["last_error"]:
            out.write(f"{dialer['url']}: {dialer['last_error']}\n")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """A sample Maildir, a desktop peer on it and two simulated phones; exit 1 unless they all agree."""
    from peers.demo import demo_directory, run_demo

    base = demo_directory(args.dir)
    result = asyncio.run(run_demo(base, duration=args.duration, count=args.count, seed=args.seed, out=out,
                                  phones=args.phones))
    return EXIT_OK if result.converged else EXIT_ERROR


def cmd_mobile(args: argparse.Namespace, out: TextIO) -> int:
    """A simulated phone (peers/mobile.py) on this data directory."""
    from peers.mobile import run_from_args

    args.data_dir = str(args.data_dir)
    return run_from_args(args, out)


# ------------------------------------------------------------------------------------------------ parser


def _common_options(*, top_level: bool) -> argparse.ArgumentParser:
    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=default(None),
                        help="peer data directory (default: $CRDTMAIL_DATA_DIR or the platform data dir)")
    common.add_argument("--config", type=Path, default=default(None),
                        help="config file (default: DATA_DIR/config.toml)")
    common.add_argument("--mailbox", default=default(None), help="mailbox to act on (default: from the config)")
    common.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of text")
    common.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log what happens on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="crdtmail", description="One virtual mailbox across desktop and phone; offline-first, no server.",
        parents=[_common_options(top_level=True)],
    )
    # Options may also follow the command; there they must not reset what was given before it.
    common = _common_options(top_level=False)
    parser.add_argument("--version", action="version", version=f"crdtmail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace, TextIO], int], help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        command.set_defaults(func=func)
        return command

    add("init", cmd_init, "create the data directory, its config and a peer identity")
    p = add("import", cmd_import, "import a Maildir, Maildir++ tree or mbox file")
    p.add_argument("path")
    p = add("ls", cmd_ls, "list a folder, newest first")
    p.add_argument("folder", nargs="?", default="INBOX")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p = add("show", cmd_show, "show one message (an id or a unique prefix of one)")
    p.add_argument("id")
    p.add_argument("--raw", action="store_true", help="print the raw RFC 5322 bytes")
    p.add_argument("--wait", type=float, default=15.0,
                   help="seconds to wait for a peer when the body has to be fetched (default 15)")
    p = add("flag", cmd_flag, "set (+) and clear (-) flags: crdtmail flag ID +seen -flagged +$Label")
    p.add_argument("id")
    p.add_argument("changes", nargs=argparse.REMAINDER, help="+flag or -flag, one or more")
    p = add("move", cmd_move, "move a message to a folder")
    p.add_argument("id")
    p.add_argument("folder")
    p = add("delete", cmd_delete, "move a message to the trash")
    p.add_argument("id")
    p = add("expunge", cmd_expunge, "remove a message for good")
    p.add_argument("id")
    p = add("folders", cmd_folders, "list, create, rename or delete folders")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[common], help="list folders with counts")
    a = actions.add_parser("create", parents=[common], help="create a folder (a/b creates parents)")
    a.add_argument("name")
    a.add_argument("--role", default=None, help="inbox, sent, drafts, trash, junk or archive")
    a = actions.add_parser("rename", parents=[common], help="rename a folder (its messages stay in it)")
    a.add_argument("name")
    a.add_argument("new_name")
    a = actions.add_parser("delete", parents=[common], help="delete an empty folder")
    a.add_argument("name")
    a.add_argument("--move-to-trash", action="store_true", help="move its messages to the trash first")
    add("status", cmd_status, "documents, sizes and message totals of this peer")
    p = add("pair", cmd_pair, "pair a device: make a token that lets it sync the given mailboxes")
    p.add_argument("device", help="a name for the device, e.g. phone")
    p.add_argument("--for", dest="mailboxes", action="append", metavar="MAILBOX",
                   help="a mailbox the device may sync (repeatable; default: --mailbox or the default mailbox)")
    p = add("unpair", cmd_unpair, "revoke a device's token")
    p.add_argument("device")
    add("devices", cmd_devices, "list paired devices (their tokens are not stored, only hashes)")
    p = add("serve", cmd_serve, "run this peer: accept paired devices and dial configured peers until stopped")
    p.add_argument("--host", default=None, help="address to listen on (default: [listen] host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: [listen] port, 7878)")
    p = add("desktop", cmd_desktop, "run the desktop peer: mirror a Maildir both ways and sync it with devices")
    p.add_argument("--maildir", dest="maildirs", action="append", metavar="[MAILBOX=]PATH",
                   help="a Maildir to mirror (repeatable; default: [maildirs] in the config)")
    p.add_argument("--host", default=None, help="address to listen on (default: [listen] host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: [listen] port, 7878)")
    p.add_argument("--once", action="store_true", help="one full pass between Maildir and replica, then exit")
    from peers.desktop_args import add_watcher_argument

    add_watcher_argument(p)
    p = add("connect", cmd_connect, "add a peer to dial, with the token it paired for this device")
    p.add_argument("url", help="ws://host:port/sync or wss://...")
    p.add_argument("--token", required=True, help="the token `crdtmail pair` printed on that peer")
    p.add_argument("--for", dest="mailboxes", action="append", metavar="MAILBOX", help="mailbox to sync (repeatable)")
    p.add_argument("--ca", default=None, help="a CA or self-signed certificate (PEM) to trust for a wss:// URL")
    p.add_argument("--compress", action="store_true",
                   help="ask that peer for permessage-deflate: fewer bytes, more CPU (for a slow or metered link)")
    p = add("sync", cmd_sync, "sync once with every configured peer, then exit")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every peer")
    add("peers", cmd_peers, "configured peers, and what a running `crdtmail serve` is connected to")
    p = add("demo", cmd_demo, "a sample Maildir, a desktop peer on it and two simulated phones; checks they agree")
    p.add_argument("--dir", default=None, help="where to put the demo (default: a new temporary directory)")
    p.add_argument("--count", type=int, default=300, help="messages in the sample Maildir (300)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds the phones' users act (20)")
    p.add_argument("--phones", type=int, default=2, help="simulated phones (2)")
    p.add_argument("--seed", type=int, default=1)
    p = add("mobile", cmd_mobile, "run a simulated phone: online/offline periods, a user, mail arriving")
    from peers.mobile_args import add_arguments as add_mobile_arguments

    add_mobile_arguments(p, common=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crdtmail`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args.data_dir = resolve_data_dir(args.data_dir)
    try:
        return int(args.func(args, sys.stdout))
    except CrdtmailError as exc:
        sys.stderr.write(f"crdtmail: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("crdtmail: interrupted; every change acknowledged so far is kept\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
