"""One-hop sync latency: a flag change on one peer until it is applied (and committed) on another.

Two processes on 127.0.0.1. The sender makes a change every ``--interval`` ms and notes the monotonic clock
just before; the receiver notes it when the change is committed on its side (CLOCK_MONOTONIC is one clock for
every process on Linux). Beside it, the floor: raw websockets messages between two processes, measured the
same way, so the figures can be read against what one hop costs in Python on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import WORK_DIR, machine, write_results

ROLE_ENV = "CRDTMAIL_BENCH_ROLE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the sync latency benchmark."""
    parser.add_argument("--changes", type=int, default=2000, help="measured changes (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=500, help="changes made first and not measured")
    parser.add_argument("--interval", type=float, default=1.0, help="milliseconds between changes")
    parser.add_argument("--quick", action="store_true", help="200 changes, for checking the suite works")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    return {
        "samples": len(latencies_ms),
        "p50_ms": _percentile(latencies_ms, 0.50),
        "p99_ms": _percentile(latencies_ms, 0.99),
        "max_ms": max(latencies_ms),
    }


# ------------------------------------------------------------------------------------------------ children


async def _floor_receiver(count: int, out: Path) -> None:
    from websockets.asyncio.server import serve

    times: list[int] = []
    done = asyncio.Event()

    async def handler(websocket: Any) -> None:
        async for _ in websocket:
            times.append(time.monotonic_ns())
            if len(times) == count:
                done.set()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await done.wait()
    out.write_text(json.dumps(times))


async def _floor_sender(port: int, count: int, interval: float, out: Path) -> None:
    from websockets.asyncio.client import connect

    times: list[int] = []
    async with connect(f"ws://127.0.0.1:{port}", compression=None) as websocket:
        for n in range(count):
            times.append(time.monotonic_ns())
            await websocket.send(n.to_bytes(20, "big"))  # about the size of a flag update
            await asyncio.sleep(interval)
        await asyncio.sleep(0.5)
    out.write_text(json.dumps(times))


async def _peer_sender(data_dir: Path, count: int, interval: float, out: Path) -> None:
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    replica = Replica.open(data_dir)
    peer = Peer(replica, bodies=False)
    box = peer.mailbox("default")
    server = await peer.serve()
    print(server.sockets[0].getsockname()[1], flush=True)
    target = next(iter(box.all_messages())).id
    ready = out.with_suffix(".ready")  # written by the receiver once its own sync is done
    while not ready.exists():
        await asyncio.sleep(0.01)
    times: list[int] = []
    for n in range(count):
        times.append(time.monotonic_ns())
        # A keyword no sample message carries, so every one of these calls is a real change.
        if n % 2:
            box.set_flags(target, remove=["$BenchToggle"])
        else:
            box.set_flags(target, add=["$BenchToggle"])
        await asyncio.sleep(interval)
    await asyncio.sleep(1.0)
    out.write_text(json.dumps(times))
    server.close()


async def _peer_receiver(data_dir: Path, port: int, token: str, count: int, out: Path, ready: Path) -> None:
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    replica = Replica.open(data_dir)
    peer = Peer(replica, bodies=False)
    box = peer.mailbox("default")
    times: list[int] = []
    done = asyncio.Event()

    def on_change(change: Any) -> None:
        if not change.is_local and change.changed:
            times.append(time.monotonic_ns())
            if len(times) == count:
                done.set()

    box.observe(on_change)
    dialer = peer.dial(f"ws://127.0.0.1:{port}/sync", token, ["default"])
    task = asyncio.create_task(dialer.run())
    while not any("default" in s.synced for s in peer.sessions):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # let a relay in between finish its own sync first
    ready.write_text("ready")
    try:
        await asyncio.wait_for(done.wait(), timeout=max(60.0, count * 0.01))
    except TimeoutError:
        raise SystemExit(f"only {len(times)} of {count} changes arrived") from None
    dialer.stop()
    for session in list(peer.sessions):
        await session.link.close()
    await task
    out.write_text(json.dumps(times))


async def _peer_relay(data_dir: Path, upstream_port: int, token: str) -> None:
    """The middle peer of a chain: serves its own port (printed) and dials the sender; runs until killed."""
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    replica = Replica.open(data_dir)
    peer = Peer(replica, bodies=False)
    peer.mailbox("default")
    server = await peer.serve()
    print(server.sockets[0].getsockname()[1], flush=True)
    await peer.dial(f"ws://127.0.0.1:{upstream_port}/sync", token, ["default"]).run()


async def _peer_server(data_dir: Path) -> None:
    """A peer that only serves (printing its port) until killed."""
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    peer = Peer(Replica.open(data_dir), bodies=False)
    peer.mailbox("default")
    server = await peer.serve()
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


async def _peer_resync(data_dir: Path, port: int, token: str, out: Path, oldest_shard: str = "") -> None:
    """Dial, and report how long the mailbox took to be in sync both ways, and the bytes each way."""
    import resource

    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    peer = Peer(Replica.open(data_dir), bodies=False, oldest_shard=oldest_shard or None)
    peer.mailbox("default")
    started = time.perf_counter()
    dialer = peer.dial(f"ws://127.0.0.1:{port}/sync", token, ["default"])
    task = asyncio.create_task(dialer.run())
    while not any("default" in s.synced for s in peer.sessions):
        await asyncio.sleep(0.0005)
    seconds = time.perf_counter() - started
    session = next(iter(peer.sessions))
    figures = {"seconds": seconds, "bytes_sent": session.connection.bytes_sent,
               "bytes_received": session.connection.bytes_received,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    dialer.stop()
    await session.link.close()
    await task
    out.write_text(json.dumps(figures))


def child_main(argv: list[str]) -> int:
    """Entry point of the benchmark's child processes (chosen by $CRDTMAIL_BENCH_ROLE)."""
    role = os.environ[ROLE_ENV]
    if role == "floor-receiver":
        asyncio.run(_floor_receiver(int(argv[0]), Path(argv[1])))
    elif role == "floor-sender":
        asyncio.run(_floor_sender(int(argv[0]), int(argv[1]), float(argv[2]), Path(argv[3])))
    elif role == "peer-sender":
        asyncio.run(_peer_sender(Path(argv[0]), int(argv[1]), float(argv[2]), Path(argv[3])))
    elif role == "peer-server":
        asyncio.run(_peer_server(Path(argv[0])))
    elif role == "peer-resync":
        asyncio.run(_peer_resync(Path(argv[0]), int(argv[1]), argv[2], Path(argv[3]), *argv[4:]))
    elif role == "peer-relay":
        asyncio.run(_peer_relay(Path(argv[0]), int(argv[1]), argv[2]))
    elif role == "peer-receiver":
        asyncio.run(_peer_receiver(Path(argv[0]), int(argv[1]), argv[2], int(argv[3]), Path(argv[4]),
                                   Path(argv[5])))
    return 0


# ------------------------------------------------------------------------------------------------ harness


def _spawn(role: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.sync_bench", *map(str, args)],
        env={**os.environ, ROLE_ENV: role}, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _pair_latencies(sent: Path, received: Path, skip: int) -> list[float]:
    sent_times = json.loads(sent.read_text())
    received_times = json.loads(received.read_text())
    pairs = list(zip(sent_times, received_times, strict=True))[skip:]
    return [(r - s) / 1e6 for s, r in pairs]


def _reconnect(work: Path, changes: int) -> dict[str, Any]:
    """Two synced peers each make ``changes`` flag changes offline, then reconnect: time and bytes to resync."""
    from crdtmail.auth import DeviceRegistry
    from crdtmail.replica import Replica
    from crdtmail.sample import generate_messages, write_maildir

    messages = 5000
    for name in ("r-a", "r-b", "r-maildir"):
        shutil.rmtree(work / name, ignore_errors=True)
    write_maildir(work / "r-maildir", generate_messages(messages, seed=3))
    with Replica.init(work / "r-a") as a:
        a.import_path(work / "r-maildir")
        token = DeviceRegistry(a.store).pair("b", ["default"])
    Replica.init(work / "r-b").close()
    server = _spawn("peer-server", work / "r-a")
    assert server.stdout is not None
    port = int(server.stdout.readline())
    first = _spawn("peer-resync", work / "r-b", port, token, work / "r-first.json")  # the initial full sync
    first.wait(timeout=600)
    server.kill()
    server.wait(timeout=10)
    for name, flag in (("r-a", "flagged"), ("r-b", "seen")):
        with Replica.open(work / name) as replica:
            box = replica.mailbox()
            ids = [row.message_id for row in box.list_folder("INBOX", limit=changes)]
            for n in range(changes):
                box.set_flags(ids[n % len(ids)], add=[flag]) if n % 2 == 0 else box.set_flags(
                    ids[n % len(ids)], remove=[flag])
    server = _spawn("peer-server", work / "r-a")
    assert server.stdout is not None
    port = int(server.stdout.readline())
    again = _spawn("peer-resync", work / "r-b", port, token, work / "r-again.json")
    again.wait(timeout=600)
    server.kill()
    server.wait(timeout=10)
    initial = json.loads((work / "r-first.json").read_text())
    figures: dict[str, Any] = json.loads((work / "r-again.json").read_text())
    figures.update(changes_each_side=changes, mailbox_messages=messages,
                   initial_sync_bytes=initial["bytes_sent"] + initial["bytes_received"],
                   initial_sync_seconds=initial["seconds"])
    return figures


def _initial_sync(work: Path) -> dict[str, Any]:
    """A fresh peer replicates the 100k-message peer that `python -m bench import` left: all of it, then only
    its last three months."""
    from crdtmail.auth import DeviceRegistry
    from crdtmail.replica import Replica

    source = WORK_DIR / "peer-100000"
    if not (source / "crdtmail.sqlite3").exists():
        return {"skipped": "run `python -m bench import` first: it leaves the 100k-message peer this replicates"}
    with Replica.open(source) as replica:
        token = DeviceRegistry(replica.store).pair("bench-initial", ["default"])
        months = sorted(n for n in replica.store.backend("default").document_names() if n[:1].isdigit())
    server = _spawn("peer-server", source)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    figures: dict[str, Any] = {}
    try:
        for label, oldest in (("full", ""), ("last_3_months", months[-3])):
            target = work / f"initial-{label}"
            shutil.rmtree(target, ignore_errors=True)
            Replica.init(target).close()
            out = work / f"initial-{label}.json"
            _spawn("peer-resync", target, port, token, out, oldest).wait(timeout=600)
            figures[label] = json.loads(out.read_text())
    finally:
        server.kill()
        server.wait(timeout=10)
    return figures


def run(args: argparse.Namespace) -> int:
    """Measure the floor and one-hop convergence; write the result file."""
    changes = 200 if args.quick else args.changes
    warmup = 50 if args.quick else args.warmup
    total = changes + warmup
    interval = args.interval / 1000
    work = WORK_DIR / "sync"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    receiver = _spawn("floor-receiver", total, work / "floor-recv.json")
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline())
    sender = _spawn("floor-sender", port, total, interval, work / "floor-sent.json")
    sender.wait(timeout=600)
    receiver.wait(timeout=60)
    floor = _summary(_pair_latencies(work / "floor-sent.json", work / "floor-recv.json", warmup))

    from crdtmail.replica import Replica
    from crdtmail.sample import generate_messages, write_maildir

    write_maildir(work / "Maildir", generate_messages(200, seed=1))
    from crdtmail.auth import DeviceRegistry

    with Replica.init(work / "a") as a:
        a.import_path(work / "Maildir")
        token = DeviceRegistry(a.store).pair("b", ["default"])
    Replica.init(work / "b").close()
    sender = _spawn("peer-sender", work / "a", total, interval, work / "peer-sent.json")
    assert sender.stdout is not None
    port = int(sender.stdout.readline())
    receiver = _spawn("peer-receiver", work / "b", port, token, total, work / "peer-recv.json",
                      work / "peer-sent.ready")
    receiver.wait(timeout=600)
    sender.wait(timeout=60)
    one_hop = _summary(_pair_latencies(work / "peer-sent.json", work / "peer-recv.json", warmup))

    # Two hops: a -> relay -> c, with no a - c link.
    for name in ("relay", "c"):
        shutil.rmtree(work / name, ignore_errors=True)
        Replica.init(work / name).close()
    with Replica.open(work / "relay") as relay_replica:
        token_c = DeviceRegistry(relay_replica.store).pair("c", ["default"])
    sender = _spawn("peer-sender", work / "a", total, interval, work / "relay-sent.json")
    assert sender.stdout is not None
    port = int(sender.stdout.readline())
    relay = _spawn("peer-relay", work / "relay", port, token)
    assert relay.stdout is not None
    relay_port = int(relay.stdout.readline())
    receiver = _spawn("peer-receiver", work / "c", relay_port, token_c, total, work / "relay-recv.json",
                      work / "relay-sent.ready")
    receiver.wait(timeout=600)
    sender.wait(timeout=60)
    relay.kill()
    relay.wait(timeout=10)
    two_hops = _summary(_pair_latencies(work / "relay-sent.json", work / "relay-recv.json", warmup))

    reconnect = _reconnect(work, 200 if args.quick else 1000)
    initial = _initial_sync(work) if not args.quick else {"skipped": "--quick"}

    results = {
        "scenario": "sync-latency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "interval_ms": args.interval,
        "warmup": warmup,
        "floor_raw_websockets": floor,
        "one_hop_flag_change": one_hop,
        "two_hops_through_a_relay": two_hops,
        "reconnect_after_offline_changes": reconnect,
        "initial_sync_100k": initial,
        "targets": {"one_hop_p50_ms": 0.2, "one_hop_p99_ms": 0.5, "two_hops_p50_ms": 0.35,
                    "reconnect_after_1000_changes_s": 0.1},
        "note": "one hop = set_flags committed on A until the update is applied and committed on B",
    }
    path = write_results("sync", results)
    print(
        f"floor (raw websockets, one way): p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms; "
        f"one-hop flag change: p50 {one_hop['p50_ms']:.3f} ms, p99 {one_hop['p99_ms']:.3f} ms, "
        f"max {one_hop['max_ms']:.2f} ms ({one_hop['samples']} samples); two hops: p50 {two_hops['p50_ms']:.3f} ms, "
        f"p99 {two_hops['p99_ms']:.3f} ms; reconnect after {reconnect['changes_each_side']} offline changes on "
        f"each side of a {reconnect['mailbox_messages']}-message mailbox: {reconnect['seconds'] * 1000:.0f} ms, "
        f"{reconnect['bytes_sent'] + reconnect['bytes_received']} bytes; initial sync of 100k: {initial}\nwrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
