"""One-hop sync latency: a flag change on one peer until it is applied (and committed) on another.

Two processes on 127.0.0.1. The sender makes a change every ``--interval`` ms and notes the monotonic clock
just before; the receiver notes when the update is applied in its memory and relayed on (the headline figure,
what a Yjs peer measures) and when it is committed to its store after that (CLOCK_MONOTONIC is one clock for
every process on Linux). Beside it, the floor: raw websockets messages between two processes, measured the
same way, so the figures can be read against what one hop costs in Python on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from bench.common import WORK_DIR, ShadowShards, machine, peak_rss_mb, write_results

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
        start = time.monotonic_ns()
        for n in range(count):
            delay = start + int(n * interval * 1e9) - time.monotonic_ns()  # due times fixed in advance
            await asyncio.sleep(delay / 1e9 if delay > 0 else 0)
            times.append(time.monotonic_ns())
            await websocket.send(n.to_bytes(20, "big"))  # about the size of a flag update
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
    start = time.monotonic_ns()
    for n in range(count):
        # Due times fixed in advance, as the suite paces: a slow change must not lower the offered rate (and
        # hide the latency of the changes that would have queued behind it).
        delay = start + int(n * interval * 1e9) - time.monotonic_ns()
        await asyncio.sleep(delay / 1e9 if delay > 0 else 0)
        times.append(time.monotonic_ns())
        # A keyword no sample message carries, so every one of these calls is a real change.
        if n % 2:
            box.set_flags(target, remove=["$BenchToggle"])
        else:
            box.set_flags(target, add=["$BenchToggle"])
    await asyncio.sleep(1.0)
    out.write_text(json.dumps(times))
    server.close()


async def _peer_receiver(data_dir: Path, port: int, token: str, count: int, out: Path, ready: Path) -> None:
    from crdtmail.model.mailbox import LOCAL
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    replica = Replica.open(data_dir)
    peer = Peer(replica, bodies=False)
    box = peer.mailbox("default")
    times: list[int] = []  # committed here
    applied: list[int] = []  # in memory and relayed on (before the commit)
    done = asyncio.Event()

    def on_update(document: str, update: bytes, origin: Any) -> None:
        # One update per change, also when a burst of them is applied under one commit.
        if origin is not LOCAL and document != "index":
            applied.append(time.monotonic_ns())

    def on_change(change: Any) -> None:
        if not change.is_local and change.changed:
            now = time.monotonic_ns()
            times.extend([now] * (len(applied) - len(times)))
            if len(times) >= count:
                done.set()

    box.observe_updates(on_update)
    box.observe(on_change)
    dialer = peer.dial(f"ws://127.0.0.1:{port}/sync", token, ["default"])
    task = asyncio.create_task(dialer.run())
    while not any("default" in s.synced for s in peer.sessions):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # let a relay in between finish its own sync first
    while box.unindexed_shards():  # and this peer list what it received: hops are measured in steady state
        await asyncio.sleep(0.01)
    applied.clear()  # the initial sync's updates
    times.clear()
    ready.write_text("ready")
    try:
        await asyncio.wait_for(done.wait(), timeout=max(60.0, count * 0.01))
    except TimeoutError:
        raise SystemExit(f"only {len(times)} of {count} changes arrived") from None
    dialer.stop()
    for session in list(peer.sessions):
        await session.link.close()
    await task
    out.write_text(json.dumps(times[:count]))
    out.with_suffix(".applied").write_text(json.dumps(applied[:count]))


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
    """Dial, and report how long the mailbox took to be in sync both ways (every document durable) and to be
    listed (every arrived shard's rows built), and the bytes each way."""
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    peer = Peer(Replica.open(data_dir), bodies=False, oldest_shard=oldest_shard or None)
    peer.mailbox("default")
    started = time.perf_counter()
    started_wall = time.time()
    dialer = peer.dial(f"ws://127.0.0.1:{port}/sync", token, ["default"])
    task = asyncio.create_task(dialer.run())
    while not any("default" in s.synced for s in peer.sessions):
        await asyncio.sleep(0.0005)
    session = next(s for s in peer.sessions if "default" in s.synced)
    # When the session recorded the sync complete: a poll of this task can come a listing step (~0.25 s)
    # later, as the background listing starts at that moment too.
    assert session.last_sync is not None
    seconds = session.last_sync - started_wall
    # Shards that arrived whole are durable now; their listing rows are built next, in the background.
    mailbox = peer.mailbox("default")
    while mailbox.unindexed_shards():
        await asyncio.sleep(0.0005)
    listed = time.perf_counter() - started
    figures = {"seconds": seconds, "listed_seconds": listed,
               "listed_messages": sum(count.total for count in mailbox.counts().values()),
               "bytes_sent": session.connection.bytes_sent,
               "bytes_received": session.connection.bytes_received,
               "peak_rss_mb": peak_rss_mb()}
    tcp = _tcp_bytes(session.link)
    if tcp is not None:
        figures["tcp_bytes_received"], figures["tcp_bytes_sent"] = tcp
    dialer.stop()
    await session.link.close()
    await task
    out.write_text(json.dumps(figures))


def _cpu_seconds() -> float:
    """CPU time this process used so far, every thread, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tcp_bytes(link: Any) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) on a link's TCP socket (Linux TCP_INFO); None elsewhere."""
    from bench.alternatives.pyws_child import tcp_bytes

    return tcp_bytes(link.websocket.transport.get_extra_info("socket") if link.websocket.transport else None)


async def _peer_node(config_path: Path) -> None:
    """A peer driven by JSON commands on stdin, answering with JSON lines on stdout (see ``Node``).

    It serves (when asked to) and dials whom it is told, records when every remote flag change is applied and
    committed here, and makes paced flag changes of its own on command. It ends at ``stop`` or when stdin closes.
    """
    import threading

    from crdtmail.model.mailbox import LOCAL
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    config = json.loads(config_path.read_text())
    replica = Replica.open(Path(config["data_dir"]))
    peer = Peer(replica, bodies=False, oldest_shard=config.get("oldest_shard"))
    box = peer.mailbox("default")
    keyword = config.get("keyword", "$BenchToggle")
    commits: list[tuple[int, list[str]]] = []  # (committed at, message ids) of each remote change committed
    sent: list[tuple[int, str]] = []
    last_arrival = [time.monotonic()]
    shadows = ShadowShards()  # which message each announced update changed, for its own applied time
    applied: dict[str, deque[int]] = defaultdict(deque)  # message id -> when its remote changes were announced

    def received() -> list[tuple[int, list[str], int]]:
        """(committed at, [message id], applied at) per remote change committed since the last call."""
        for at, message_id in shadows.replay():
            applied[message_id].append(at)
        records = []
        for committed_at, ids in commits:
            for message_id in ids:
                times = applied.get(message_id)
                records.append((committed_at, [message_id], times.popleft() if times else committed_at))
        commits.clear()
        return records

    def on_update(document: str, update: bytes, origin: Any) -> None:
        # In memory and passed on to the other links; the commit follows.
        shadows.note(time.monotonic_ns(), document, update, remote=origin is not LOCAL)

    def on_change(change: Any) -> None:
        if not change.is_local and change.changed:
            commits.append((time.monotonic_ns(), sorted(change.changed)))
            last_arrival[0] = time.monotonic()

    box.observe_updates(on_update)  # after the peer's own: the time it was relayed on
    box.observe(on_change)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()

    def emit(**answer: Any) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    server = await peer.serve() if config.get("serve") else None
    emit(port=server.sockets[0].getsockname()[1] if server is not None else None)
    dialers: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    targets: list[str] = []
    state: dict[str, bool] = {}

    def total_messages() -> int:
        return sum(count.total for count in box.counts().values())

    while (command := await commands.get()) is not None:
        kind = command["cmd"]
        if kind == "dial":
            for url, token in command["remotes"]:
                dialer = peer.dial(url, token, ["default"], max_delay=1.0)
                dialers.append(dialer)
                tasks.append(asyncio.create_task(dialer.run()))
            emit(dialing=len(dialers))
        elif kind == "ready":  # every link up and in sync, and every message here
            deadline = time.monotonic() + float(command.get("timeout", 120))
            while time.monotonic() < deadline:
                sessions = list(peer.sessions)
                if (len(sessions) >= command["links"] and all("default" in s.synced for s in sessions)
                        and total_messages() >= command["messages"]):
                    break
                await asyncio.sleep(0.01)
            shadows.copy(box)
            emit(ready=time.monotonic() < deadline, messages=total_messages(), links=len(peer.sessions))
        elif kind == "send":  # paced flag changes: one every interval_ms, due times fixed in advance
            if not targets:
                views = sorted(box.all_messages(), key=lambda view: view.id)
                targets = [view.id for view in views]
                state = {view.id: keyword in view.flags for view in views}
            interval_ns = int(float(command["interval_ms"]) * 1e6)
            first = len(sent)
            start = time.monotonic_ns()
            for n in range(int(command["count"])):
                delay = start + n * interval_ns - time.monotonic_ns()
                await asyncio.sleep(delay / 1e9 if delay > 0 else 0)
                target = targets[len(sent) % len(targets)]
                now = time.monotonic_ns()
                if state[target]:
                    box.set_flags(target, remove=[keyword])
                else:
                    box.set_flags(target, add=[keyword])
                state[target] = not state[target]
                sent.append((now, target))
            await asyncio.sleep(0)
            span = (sent[-1][0] - sent[first][0]) / 1e9 if len(sent) - first > 1 else 0.0
            emit(sent=len(sent) - first, seconds=span)
        elif kind == "quiet":  # wait until nothing arrived for quiet_s (or ``changes`` arrived), bounded
            deadline = time.monotonic() + float(command.get("timeout", 60))
            wanted = int(command.get("changes", 0))
            while time.monotonic() < deadline:
                arrived = sum(len(ids) for _, ids in commits)
                if wanted and arrived >= wanted:
                    break
                if time.monotonic() - last_arrival[0] > float(command.get("quiet_s", 1.0)):
                    break
                await asyncio.sleep(0.01)
            emit(arrived=sum(len(ids) for _, ids in commits))
        elif kind == "dump":  # hand over (and forget) what was sent and received since the last dump
            # This process's CPU time (every thread, user and system) on entry and on the way out: the replay of
            # the shadows below is the bench's own work, and falls between the two.
            cpu_in = _cpu_seconds()
            records = received()
            Path(command["path"]).write_text(json.dumps({"sent": sent, "received": records, "cpu_in": cpu_in,
                                                         "cpu_out": _cpu_seconds()}))
            sent = []
            emit(dumped=command["path"])
        elif kind == "stop":
            break
    for dialer in dialers:
        dialer.stop()
    for session in list(peer.sessions):
        await session.link.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    if server is not None:
        server.close()
    replica.close()
    emit(stopped=True)


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
    elif role == "peer-node":
        asyncio.run(_peer_node(Path(argv[0])))
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


class NodeError(RuntimeError):
    """A peer-node child failed, went silent or answered unexpectedly."""


class Node:
    """A ``peer-node`` child process: a crdtmail Peer on 127.0.0.1, driven by JSON lines on its stdin.

    Use as a context manager (or call ``close``): the child is stopped, and killed if it does not stop in time.
    """

    def __init__(self, name: str, work: Path, data_dir: Path, *, serve: bool, keyword: str = "$BenchToggle",
                 oldest_shard: str | None = None) -> None:
        import queue
        import threading

        self.name = name
        config = work / f"{name}.node.json"
        config.write_text(json.dumps({"data_dir": str(data_dir), "serve": serve, "keyword": keyword,
                                      "oldest_shard": oldest_shard}))
        self.log = work / f"{name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.sync_bench", str(config)], env={**os.environ, ROLE_ENV: "peer-node"},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                cwd=Path(__file__).resolve().parent.parent)
        self._lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.port: int | None = self.expect("port", timeout=60)["port"]

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sync"

    def command(self, answer: str, *, wait: float | None = None, **command: Any) -> dict[str, Any]:
        """Send one command and wait for the answer line that carries the key ``answer`` (by default as long
        as the command's own ``timeout`` and a minute)."""
        timeout = wait if wait is not None else float(command.get("timeout", 60)) + 60
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise NodeError(f"{self.name}: {exc}; its log: {self._log_tail()}") from None
        return self.expect(answer, timeout=timeout)

    def expect(self, key: str, *, timeout: float) -> dict[str, Any]:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise NodeError(f"{self.name}: no {key!r} within {timeout:.0f} s; log: {self._log_tail()}") from None
            if line is None:
                raise NodeError(f"{self.name} exited ({self.process.poll()}); log: {self._log_tail()}")
            answer: dict[str, Any] = json.loads(line)
            if key in answer:
                return answer

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:].strip() or "(empty)"
        except OSError:
            return "(none)"

    def close(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def match_latencies(sent: list[list[Any]], received: dict[str, list[list[Any]]], *,
                    committed: bool = False) -> tuple[list[float], int]:
    """Per change sent, the latency in ms until the last of the receivers applied it (in memory, and relayed
    on), or with ``committed`` until it was committed there too; and how many were lost.

    Changes to one message are matched in order (first send to first arrival); the sender cycles through every
    message, so two changes to one message are hundreds of changes apart and never arrive in one update.
    """
    from collections import defaultdict, deque

    arrival: dict[str, list[int | None]] = {}
    for receiver, records in received.items():
        pending: dict[str, deque[int]] = defaultdict(deque)
        for index, (_, message_id) in enumerate(sent):
            pending[message_id].append(index)
        times: list[int | None] = [None] * len(sent)
        for record in records:
            at = record[0] if committed or len(record) < 3 else record[2]
            for message_id in record[1]:
                queue_ = pending.get(message_id)
                if queue_ and sent[queue_[0]][0] <= at:
                    times[queue_.popleft()] = at
        arrival[receiver] = times
    latencies: list[float] = []
    lost = 0
    for index, (at, _) in enumerate(sent):
        got = [times[index] for times in arrival.values()]
        if any(t is None for t in got):
            lost += 1
        else:
            latencies.append((max(t for t in got if t is not None) - at) / 1e6)
    return latencies, lost


def summary(latencies_ms: list[float], lost: int = 0) -> dict[str, Any]:
    """p50 / p90 / p99 / max / mean, and the CDF as 201 quantiles (0, 0.5, ... 100 %) for plots."""
    if not latencies_ms:
        return {"samples": 0, "lost": lost}
    ordered = sorted(latencies_ms)
    size = len(ordered)

    def at(fraction: float) -> float:
        return round(ordered[min(size - 1, int(fraction * size))], 4)

    return {"samples": size, "lost": lost, "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1], 4), "mean_ms": round(sum(ordered) / size, 4),
            "quantiles_ms": [at(i / 200) if i < 200 else round(ordered[-1], 4) for i in range(201)]}


def _sample_peer(work: Path, name: str, messages: int, seed: int = 1) -> Path:
    """A fresh data dir holding a generated mailbox of ``messages`` messages."""
    from crdtmail.replica import Replica
    from crdtmail.sample import generate_messages, write_maildir

    maildir = work / f"maildir-{messages}-s{seed}"
    if not maildir.exists():
        write_maildir(maildir, generate_messages(messages, seed=seed))
    data = work / name
    shutil.rmtree(data, ignore_errors=True)
    with Replica.init(data) as replica:
        replica.import_path(maildir)
    return data


def _message_count(data_dir: Path) -> int:
    from crdtmail.replica import Replica

    with Replica.open(data_dir) as replica:
        return sum(count.total for count in replica.mailbox("default").counts().values())


def _empty_peer(work: Path, name: str) -> Path:
    from crdtmail.replica import Replica

    data = work / name
    shutil.rmtree(data, ignore_errors=True)
    Replica.init(data).close()
    return data


def _pair(data_dir: Path, device: str) -> str:
    from crdtmail.auth import DeviceRegistry
    from crdtmail.replica import Replica

    with Replica.open(data_dir) as replica:
        return DeviceRegistry(replica.store).pair(device, ["default"])


class Network:
    """Peer-node children joined in a topology: ``edges`` (i, j) means node i dials node j.

    Node 0 starts with a generated mailbox; the others start empty and sync it from their links.
    """

    def __init__(self, work: Path, count: int, edges: list[tuple[int, int]], *, messages: int = 200) -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self.work = work
        self.edges = edges
        servers = {j for _, j in edges}
        dirs = [_sample_peer(work, "n0", messages)] + [_empty_peer(work, f"n{i}") for i in range(1, count)]
        self.messages = messages = _message_count(dirs[0])
        tokens = {(i, j): _pair(dirs[j], f"n{i}") for i, j in edges}
        self.nodes: list[Node] = []
        try:
            for i in range(count):
                self.nodes.append(Node(f"n{i}", work, dirs[i], serve=i in servers, keyword=f"$BenchN{i}"))
            for i in range(count):
                remotes = [[self.nodes[j].url(), tokens[(a, j)]] for a, j in edges if a == i]
                if remotes:
                    self.nodes[i].command("dialing", cmd="dial", remotes=remotes)
            for i, node in enumerate(self.nodes):
                links = sum(1 for a, b in edges if i in (a, b))
                answer = node.command("ready", cmd="ready", links=links, messages=messages, timeout=180)
                if not answer["ready"]:
                    raise NodeError(f"{node.name} not in sync within 180 s: {answer}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def changes(self, sender: int, receivers: list[int], count: int, interval_ms: float) -> dict[str, Any]:
        """``count`` paced flag changes on ``sender``; per change the latency until every receiver applied it."""
        cpu_from = {}
        for i, node in enumerate(self.nodes):  # start clean
            path = self.work / f"{node.name}.discard.json"
            node.command("dumped", cmd="dump", path=str(path))
            cpu_from[i] = json.loads(path.read_text())["cpu_out"]
        sending = self.nodes[sender].command("sent", cmd="send", count=count, interval_ms=interval_ms,
                                             wait=120 + count * max(interval_ms, 1.0) / 1000 * 3)
        for r in receivers:
            self.nodes[r].command("arrived", cmd="quiet", changes=count, quiet_s=2.0, timeout=60)
        records: dict[int, dict[str, Any]] = {}
        for i in range(len(self.nodes)):  # every node, for its CPU time: a relaying peer's too
            path = self.work / f"{self.nodes[i].name}.records.json"
            self.nodes[i].command("dumped", cmd="dump", path=str(path))
            records[i] = json.loads(path.read_text())
        received = {str(r): records[r]["received"] for r in receivers}
        latencies, lost = match_latencies(records[sender]["sent"], received)
        committed, _ = match_latencies(records[sender]["sent"], received, committed=True)
        # CPU per change: what each node spent from the first change until the last had arrived everywhere,
        # commits and checkpoints included, divided by the changes. Unlike a latency it hardly moves with how
        # busy the VM's host is, so it shows work saved (or added) above one run's noise.
        cpu_us = {str(i): round((records[i]["cpu_in"] - cpu_from[i]) / max(count, 1) * 1e6, 1)
                  for i in range(len(self.nodes))}
        return {"latencies_ms": latencies, "committed_latencies_ms": committed, "lost": lost, "sent": sending["sent"],
                "send_seconds": sending["seconds"], "cpu_us_per_change": cpu_us,
                "offered_per_s": round(1000 / interval_ms) if interval_ms else None,
                "achieved_per_s": round((sending["sent"] - 1) / sending["seconds"]) if sending["seconds"] else None}


def topology_edges(kind: str, count: int) -> list[tuple[int, int]]:
    """``chain``: node i dials node i - 1 (so node count - 1 is count - 1 hops from node 0); ``mesh``: all pairs."""
    if kind == "chain":
        return [(i, i - 1) for i in range(1, count)]
    if kind == "mesh":
        return [(j, i) for i in range(count) for j in range(i + 1, count)]
    raise ValueError(f"unknown topology {kind!r}")


def floor_latencies(work: Path, total: int, interval_ms: float) -> list[float]:
    """Raw websockets messages of a flag update's size between two processes: every latency in ms."""
    receiver = _spawn("floor-receiver", total, work / "floor-recv.json")
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        sender = _spawn("floor-sender", port, total, interval_ms / 1000, work / "floor-sent.json")
        sender.wait(timeout=120 + total * interval_ms / 1000 * 3)
        receiver.wait(timeout=60)
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return _pair_latencies(work / "floor-sent.json", work / "floor-recv.json", 0)


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


OFFLINE_CHANGES = """
import sys
from pathlib import Path
from crdtmail.replica import Replica
data_dir, flag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with Replica.open(data_dir) as replica:
    box = replica.mailbox()
    ids = [row.message_id for row in box.list_folder("INBOX", limit=min(count, 2000))]
    made = 0
    for n in range(count):
        target = ids[n % len(ids)]
        if flag in box.message(target).flags:
            made += box.set_flags(target, remove=[flag])
        else:
            made += box.set_flags(target, add=[flag])
report(changes=made)
"""


class _Server:
    """A ``peer-server`` child on a data dir; stopped on exit."""

    def __init__(self, data_dir: Path) -> None:
        self.process = _spawn("peer-server", data_dir)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip():
            self.close()
            raise NodeError(f"peer-server on {data_dir} did not start ({self.process.poll()})")
        self.port = int(line)

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def resync(data_dir: Path, port: int, token: str, out: Path, oldest_shard: str = "",
           timeout: float = 900) -> dict[str, Any]:
    """A ``peer-resync`` child dials ``port``: seconds until in sync, bytes each way, its peak RSS."""
    out.unlink(missing_ok=True)
    process = _spawn("peer-resync", data_dir, port, token, out, oldest_shard)
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    if process.returncode != 0 or not out.exists():
        raise NodeError(f"peer-resync failed ({process.returncode})")
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def initial_sync_runs(source: Path, work: Path, windows: dict[str, str], runs: int) -> dict[str, Any]:
    """A fresh peer replicates ``source`` ``runs`` times per window (label -> oldest month shard, "" for all):
    each run's figures and the medians."""
    from crdtmail.replica import Replica

    token = _pair(source, "bench-initial")
    figures: dict[str, Any] = {}
    with _Server(source) as server:
        for label, oldest in windows.items():
            results = []
            for run in range(runs):
                target = work / f"fresh-{label}"
                shutil.rmtree(target, ignore_errors=True)
                Replica.init(target).close()
                results.append(resync(target, server.port, token, work / f"fresh-{label}-{run}.json", oldest))
            shutil.rmtree(work / f"fresh-{label}", ignore_errors=True)

            def median(key: str, results: list[dict[str, Any]] = results) -> float:
                values = sorted(r[key] for r in results if key in r)
                return values[len(values) // 2] if values else 0

            figures[label] = {"oldest_shard": oldest or None, "runs": results, "seconds": median("seconds"),
                              "listed_seconds": median("listed_seconds"),
                              "bytes_received": median("bytes_received"), "bytes_sent": median("bytes_sent"),
                              "tcp_bytes_received": median("tcp_bytes_received"),
                              "peak_rss_mb": median("peak_rss_mb")}
    return figures


def reconnect_series(work: Path, messages: int, sizes: list[int]) -> dict[str, Any]:
    """Two synced peers of a ``messages``-message mailbox go offline, each makes N flag changes, reconnect:
    time to converge and bytes each way, for each N in ``sizes`` (in turn, on the same pair of peers)."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.common import python_child

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    a = _sample_peer(work, "a", messages, seed=3)
    b = _empty_peer(work, "b")
    token = _pair(a, "b")
    with _Server(a) as server:
        first = resync(b, server.port, token, work / "first.json")
    result: dict[str, Any] = {"mailbox_messages": messages,
                              "initial_sync": {"seconds": first["seconds"],
                                               "bytes": first["bytes_sent"] + first["bytes_received"]},
                              "by_changes": {}}
    for count in sizes:
        with ThreadPoolExecutor(2) as pool:
            made = list(pool.map(lambda side, n=count: python_child(OFFLINE_CHANGES, str(side[0]), side[1], str(n),
                                                                    timeout=600),
                                 [(a, "\\Flagged"), (b, "\\Seen")]))
        with _Server(a) as server:
            again = resync(b, server.port, token, work / f"again-{count}.json")
        again.update(changes_each_side=count, changes_made=[m["changes"] for m in made],
                     bytes=again["bytes_sent"] + again["bytes_received"])
        result["by_changes"][str(count)] = again
    return result


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
    one_hop = _summary(_pair_latencies(work / "peer-sent.json", work / "peer-recv.applied", warmup))
    one_hop_committed = _summary(_pair_latencies(work / "peer-sent.json", work / "peer-recv.json", warmup))

    # The other direction: the dialing peer (a phone) changes a flag, the listening one (a desktop) applies it.
    with Network(work / "reverse", 2, [(1, 0)]) as net:
        net.changes(1, [0], warmup, args.interval)
        reverse = net.changes(1, [0], changes, args.interval)
    one_hop_reverse = summary(reverse["latencies_ms"], reverse["lost"])
    one_hop_reverse.pop("quantiles_ms", None)

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
    two_hops = _summary(_pair_latencies(work / "relay-sent.json", work / "relay-recv.applied", warmup))
    two_hops_committed = _summary(_pair_latencies(work / "relay-sent.json", work / "relay-recv.json", warmup))

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
        "one_hop_committed": one_hop_committed,
        "one_hop_dialer_to_listener": one_hop_reverse,
        "two_hops_through_a_relay": two_hops,
        "two_hops_committed": two_hops_committed,
        "reconnect_after_offline_changes": reconnect,
        "initial_sync_100k": initial,
        "targets": {"one_hop_p50_ms": 0.2, "one_hop_p99_ms": 0.5, "two_hops_p50_ms": 0.35,
                    "reconnect_after_1000_changes_s": 0.1},
        "note": "one hop = set_flags called on A until the update is applied on B (in memory, relayed on); "
                "committed = until B's store commit after it",
    }
    path = write_results("sync", results)
    print(
        f"floor (raw websockets, one way): p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms; "
        f"one-hop flag change: p50 {one_hop['p50_ms']:.3f} ms, p99 {one_hop['p99_ms']:.3f} ms, "
        f"max {one_hop['max_ms']:.2f} ms ({one_hop['samples']} samples), committed p50 "
        f"{one_hop_committed['p50_ms']:.3f} ms, p99 {one_hop_committed['p99_ms']:.3f} ms; the other way: p50 "
        f"{one_hop_reverse['p50_ms']:.3f} ms, p99 {one_hop_reverse['p99_ms']:.3f} ms; "
        f"two hops: p50 {two_hops['p50_ms']:.3f} ms (committed {two_hops_committed['p50_ms']:.3f} ms), "
        f"p99 {two_hops['p99_ms']:.3f} ms; reconnect after {reconnect['changes_each_side']} offline changes on "
        f"each side of a {reconnect['mailbox_messages']}-message mailbox: {reconnect['seconds'] * 1000:.0f} ms, "
        f"{reconnect['bytes_sent'] + reconnect['bytes_received']} bytes; initial sync of 100k: {initial}\nwrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
