"""``crdtmail demo``: one virtual mailbox, shown. A sample Maildir, a desktop peer on it, two phones that use it.

On the embedded defaults, in a new temporary directory (or ``--dir``): generate a sample Maildir of a few hundred
realistic messages across folders, start a desktop peer that mirrors it, and two simulated mobile peers that go
online and offline while their users read, flag, move, delete and receive mail. After ``--duration`` seconds the
users stop, every phone comes online, and the demo checks that the phones, the desktop's replica and the Maildir
on disk all agree. It prints a summary (actions per peer, changes exchanged, convergence, latency percentiles)
and exits non-zero when they do not agree.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from crdtmail.bridges.layout import folder_dir_for_path, letters_for_flags
from crdtmail.bridges.maildir import MaildirBridge
from crdtmail.config import RemotePeer
from crdtmail.errors import ModelError
from crdtmail.model.mailbox import Mailbox
from crdtmail.replica import Replica
from crdtmail.sample import generate_messages, write_maildir
from peers._sim import read_metrics
from peers.desktop import DesktopPeer
from peers.mobile import MobileConfig, MobilePeer

log = logging.getLogger("crdtmail.demo")

MAILBOX = "default"
SETTLE_TIMEOUT = 30.0  # seconds the peers get to agree once the users stop


@dataclass
class DemoResult:
    """What the demo saw: whether everything agrees, and the figures of the summary."""

    converged: bool
    differences: list[str]
    summary: dict[str, Any]


def _maildir_view(bridge: MaildirBridge) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """message id -> (folder directory, flag letters) of each message's file, and the files that hold no message
    the bridge knows. A second copy of a message (the sample has some) is the bridge's to keep, not compared."""
    view: dict[str, tuple[str, str]] = {}
    strays: list[str] = []
    records = bridge.state.records
    for folder_dir in bridge.folder_dirs():
        for file in bridge.list_files(folder_dir):
            record = records.get(file.uid)
            if record is None:
                strays.append(str(bridge.path(file)))
            elif record.is_primary:
                view[record.message_id] = (file.folder_dir, file.letters)
    return view, strays


def _replica_view(box: Mailbox, oldest_shard: str | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """message id -> (folder path, flags) of every visible message, within a sync window when given."""
    paths = {folder.id: folder.path for folder in box.folders()}
    return {row.message_id: (paths.get(row.folder_id, row.folder_id), row.flags) for row in box.index_rows()
            if oldest_shard is None or (row.shard != "undated" and row.shard >= oldest_shard)}


def compare(desktop: Mailbox, bridge: MaildirBridge, phones: list[MobilePeer]) -> list[str]:
    """Every disagreement between the desktop's replica, its Maildir and the phones (within their windows)."""
    differences: list[str] = []
    desk = _replica_view(desktop)
    files, strays = _maildir_view(bridge)
    differences.extend(f"{path} holds no message the desktop knows" for path in strays)
    dirs = {folder_id: folder_dir for folder_dir, folder_id in bridge.state.folders.items()}
    folder_ids = {folder.path: folder.id for folder in desktop.folders()}
    for message_id in sorted(set(desk) | set(files)):
        if message_id not in files:
            differences.append(f"message {message_id} is in the desktop replica but has no file in the Maildir")
            continue
        if message_id not in desk:
            differences.append(f"{files[message_id]} holds message {message_id}, which the replica does not show")
            continue
        folder_path, flags = desk[message_id]
        wanted_dir = dirs.get(folder_ids.get(folder_path, ""), folder_dir_for_path(folder_path))
        if files[message_id] != (wanted_dir, letters_for_flags(flags)):
            differences.append(f"message {message_id}: the Maildir has {files[message_id]}, the replica "
                               f"{(wanted_dir, letters_for_flags(flags))}")
    for phone in phones:
        mine = _replica_view(phone.mailbox, phone.oldest_shard)
        theirs = _replica_view(desktop, phone.oldest_shard)
        for message_id in sorted(set(mine) | set(theirs)):
            if mine.get(message_id) != theirs.get(message_id):
                differences.append(f"{phone.config.device}: message {message_id} is {mine.get(message_id)} there "
                                   f"and {theirs.get(message_id)} on the desktop")
    return differences


def _latencies(metrics_files: list[Path]) -> list[float]:
    """Milliseconds from a change sent by one phone to the same update applied on another (through the desktop)."""
    sent: dict[str, float] = {}
    applied: list[tuple[str, float, str]] = []
    for path in metrics_files:
        if not path.exists():
            continue
        for event in read_metrics(path):
            if event.get("event") == "change_sent":
                for update_id in event.get("update_ids", []):
                    sent.setdefault(update_id, float(event["t"]))
            elif event.get("event") == "remote_applied":
                for update_id in event.get("update_ids", []):
                    applied.append((update_id, float(event["t"]), str(event.get("peer", ""))))
    return sorted((t - sent[u]) * 1000 for u, t, _ in applied if u in sent and t >= sent[u])


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else 0.0


async def run_demo(base: Path, *, duration: float, count: int, seed: int, out: TextIO, phones: int = 2,
                   rate: float = 2.0, mean_online: float = 4.0, mean_offline: float = 3.0) -> DemoResult:
    """Run the whole demo in ``base`` and print its progress and summary to ``out``."""
    maildir = base / "Maildir"
    written = write_maildir(maildir, generate_messages(count, seed=seed, start=dt.datetime.now(dt.UTC)))
    out.write(f"sample Maildir: {written} messages in {maildir}\n")
    desktop_replica = Replica.init(base / "desktop")
    desktop = DesktopPeer(desktop_replica, {MAILBOX: maildir})
    started = time.perf_counter()
    report = desktop.open_bridges()[MAILBOX]
    out.write(f"desktop peer {desktop.peer.peer_id}: mirrored {report.files_seen} files in "
              f"{time.perf_counter() - started:.2f}s\n")
    stop_desktop = asyncio.Event()
    ready = asyncio.Event()
    desktop_task = asyncio.create_task(desktop.run(stop_desktop, host="127.0.0.1", port=0, remotes=[],
                                                   ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    url = f"ws://127.0.0.1:{desktop.port}/sync"
    mobiles: list[MobilePeer] = []
    replicas: list[Replica] = []
    metrics: list[Path] = []
    try:
        for number in range(1, phones + 1):
            token = desktop.peer.registry.pair(f"phone-{number}", [MAILBOX])
            replica = Replica.init(base / f"phone-{number}")
            replicas.append(replica)
            metrics.append(base / f"metrics-phone-{number}.jsonl")
            config = MobileConfig(mailbox=MAILBOX, remotes=(RemotePeer(url, token, (MAILBOX,)),), seed=seed + number,
                                  rate=rate, mean_online=mean_online, mean_offline=mean_offline,
                                  metrics=metrics[-1], device=f"phone-{number}")
            mobiles.append(MobilePeer(replica, config))
        out.write(f"{phones} phones, each online about {mean_online:g}s and offline about {mean_offline:g}s at a "
                  f"time, their users doing {rate:g} actions/s, for {duration:g}s:\n")
        runs = [asyncio.create_task(mobile.run(duration)) for mobile in mobiles]
        live = out.isatty()  # a terminal gets one line updated in place; a log gets a line every 5 seconds
        ticks = 0
        while not all(run.done() for run in runs):
            await asyncio.wait(runs, timeout=1.0)
            ticks += 1
            line = "  ".join(f"{m.config.device} {'online ' if m.online else 'offline'} "
                             f"{m.stats.total_actions:3d} actions" for m in mobiles)
            files = len(desktop.lanes[MAILBOX].bridge.state.records)
            if live:
                out.write(f"\r  {ticks:3d}s  {line}  desktop: {files} files")
                out.flush()
            elif ticks % 5 == 0:
                out.write(f"  {ticks:3d}s  {line}  desktop: {files} files\n")
        if live:
            out.write("\n")
        for run in runs:
            run.result()  # a phone that failed fails the demo, with its error
        out.write("users stopped; every phone comes online to catch up...\n")
        for mobile in mobiles:
            await mobile.go_online()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        differences: list[str] = ["not compared yet"]
        bridge = desktop.lanes[MAILBOX].bridge
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if bridge.pending():
                continue
            differences = compare(desktop.peer.mailbox(MAILBOX), bridge, mobiles)
            if not differences:
                break
        for mobile in mobiles:
            await mobile.close()
    finally:
        stop_desktop.set()
        await asyncio.gather(desktop_task, return_exceptions=True)
        for replica in replicas:
            replica.close()
        desktop_replica.close()
    latencies = _latencies(metrics)
    summary = {
        "directory": str(base),
        "phones": {m.config.device: {"actions": dict(m.stats.actions), "changes_sent": m.stats.changes_sent,
                                     "changes_queued_offline": m.stats.changes_queued,
                                     "remote_changes_applied": m.stats.remote_changes,
                                     "sync_sessions": m.stats.sessions} for m in mobiles},
        "changes_exchanged": sum(m.stats.changes_sent + m.stats.changes_queued + m.stats.remote_changes
                                 for m in mobiles),
        "phone_to_phone_ms": {"samples": len(latencies), "p50": round(_percentile(latencies, 0.5), 1),
                              "p99": round(_percentile(latencies, 0.99), 1),
                              "max": round(latencies[-1], 1) if latencies else 0.0},
    }
    _print_summary(summary, differences, out)
    return DemoResult(not differences, differences, summary)


def _print_summary(summary: dict[str, Any], differences: list[str], out: TextIO) -> None:
    out.write("\nsummary\n")
    for device, figures in summary["phones"].items():
        actions = ", ".join(f"{count} {kind}" for kind, count in sorted(figures["actions"].items())) or "none"
        out.write(f"  {device}: {actions}; {figures['changes_sent']} changes sent live, "
                  f"{figures['changes_queued_offline']} queued offline, {figures['remote_changes_applied']} "
                  f"remote changes applied, {figures['sync_sessions']} sync sessions\n")
    out.write(f"  changes exchanged: {summary['changes_exchanged']}\n")
    latency = summary["phone_to_phone_ms"]
    out.write(f"  phone -> desktop -> other phone, while both online: p50 {latency['p50']} ms, "
              f"p99 {latency['p99']} ms, max {latency['max']} ms ({latency['samples']} changes)\n")
    if differences:
        out.write(f"  converged: NO, {len(differences)} differences:\n")
        for line in differences[:20]:
            out.write(f"    {line}\n")
    else:
        out.write("  converged: yes: both phones, the desktop's replica and the Maildir on disk agree\n")
    out.write(f"  everything is in {summary['directory']} (Maildir/, desktop/, phone-N/, metrics-phone-N.jsonl)\n")


def demo_directory(explicit: str | None) -> Path:
    """The demo's directory: ``explicit`` (which must not hold an earlier demo), else a new temporary one."""
    if explicit is None:
        return Path(tempfile.mkdtemp(prefix="crdtmail-demo-"))
    base = Path(explicit).expanduser()
    if (base / "Maildir").exists():
        raise ModelError(f"{base} holds an earlier demo; pick an empty --dir or remove it")
    base.mkdir(parents=True, exist_ok=True)
    return base
