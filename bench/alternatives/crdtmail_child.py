"""crdtmail itself, measured in the alternatives' interleaved rounds with their commands and their topology.

``python -m bench.alternatives.crdtmail_child server none|deflate DATA_DIR`` serves a prepared replica (see
``prepare_server``) as a crdtmail peer and prints ``{"port": N}``; ``python -m bench.alternatives.crdtmail_child
client none|deflate DATA_DIR SCRATCH`` answers the orchestrator's commands (``bench/alternatives/wsstacks.py``)
the way the pycrdt-websocket and Node clients do, with the device token and room sizes that ``prepare_server``
left in DATA_DIR. Both exit when stdin closes.

The mapping onto crdtmail: a room is a mailbox on the serving peer; a client that joins a room is a crdtmail
peer of its own (a fresh data directory under SCRATCH) that dials the server for that mailbox, so a change goes
A -> serving peer (which commits it and relays it) -> B, the alternatives' A -> room server -> B. A key of
``set``/``take`` is one flag change: the n-th key a client is given toggles the keyword ``$BenchToggle`` on the
(n mod 200)-th message of the ``latency`` mailbox, and B notes the time at which its replica applied a remote
change of that message (``Mailbox.observe_updates``, before B commits it), as the alternatives' clients note
when their document has it. A peer writes the changes of a few milliseconds in one commit, so which message an
update changed is learnt later, off the measured path: ``take`` replays the updates through a shadow of each
shard, whose flags map names the keys each changed. ``sync`` is a fresh peer syncing a whole
mailbox: the time from dialing until the mailbox is in sync (every shard stored in SQLite), as the suite's
initial_sync, and until its listing rows are built too (``listed_seconds``).

A room ``sync-<N>`` holds the N sample messages of the alternatives' documents, which give each message a
distinct key; crdtmail derives a message's id from its Message-ID, so the few sample messages that share one
are one message (998 of 1,000, 9,972 of 10,000). A client reports ``entries`` = N once its mailbox holds all
the room's messages, and the count itself in ``messages``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.alternatives.pyws_child import (
    SETTLE_S,
    CommandClient,
    answer_commands,
    exit_when_stdin_closes,
    tcp_bytes,
)
from bench.common import ShadowShards
from crdtmail.model.mailbox import LOCAL

KEYWORD = "$BenchToggle"
LATENCY_ROOM = "latency"
LATENCY_MESSAGES = 200
TOKEN_FILE = "bench-token"
ROOMS_FILE = "bench-rooms.json"  # room -> messages the mailbox holds


def room_size(room: str) -> int:
    """The nominal size of a room: N for ``sync-<N>``, the sample size for ``latency``."""
    return int(room.rsplit("-", 1)[1]) if room.startswith("sync-") else LATENCY_MESSAGES


def _limits(mode: str) -> Any:
    from crdtmail.transport import TransportLimits

    return TransportLimits(compression="deflate" if mode == "deflate" else None)


def prepare_server(directory: Path, sizes: list[int]) -> tuple[Path, str, dict[str, Any]]:
    """A data directory holding the ``latency`` mailbox and one ``sync-<N>`` mailbox per size (the sample
    messages the alternatives' documents hold), built once per version of crdtmail's code; its device token."""
    from bench.common import code_fingerprint
    from crdtmail.auth import DeviceRegistry
    from crdtmail.replica import Replica
    from crdtmail.sample import generate_messages, write_maildir

    data_dir = directory / "crdtmail-server"
    stamp = data_dir / "bench-fingerprint"
    token_file = data_dir / TOKEN_FILE
    rooms_file = data_dir / ROOMS_FILE
    fingerprint = code_fingerprint(f"alternatives-server-{sizes}")
    if stamp.exists() and token_file.exists() and rooms_file.exists() and stamp.read_text() == fingerprint:
        return data_dir, token_file.read_text(), {"cached": True}
    started = time.perf_counter()
    shutil.rmtree(data_dir, ignore_errors=True)
    rooms = {LATENCY_ROOM: generate_messages(LATENCY_MESSAGES, seed=1)}
    rooms.update({f"sync-{count}": generate_messages(count, seed=0) for count in sizes})
    with Replica.init(data_dir) as replica:
        for room, messages in rooms.items():
            maildir = directory / f"crdtmail-maildir-{room}"
            shutil.rmtree(maildir, ignore_errors=True)
            write_maildir(maildir, messages)
            replica.import_path(maildir, mailbox=room)
            shutil.rmtree(maildir)
        token = DeviceRegistry(replica.store).pair("bench-alternatives", list(rooms))
        held = {room: sum(count.total for count in replica.mailbox(room).counts().values()) for room in rooms}
    token_file.write_text(token)
    rooms_file.write_text(json.dumps(held))
    stamp.write_text(fingerprint)
    return data_dir, token, {"cached": False, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ server


async def serve(mode: str, data_dir: Path) -> None:
    """Serve every mailbox of the replica at ``data_dir`` until the process ends."""
    from crdtmail.peer import Peer
    from crdtmail.replica import Replica

    replica = Replica.open(data_dir)
    peer = Peer(replica, bodies=False, limits=_limits(mode))
    for name in replica.mailbox_names():
        peer.mailbox(name)
    server = await peer.serve()
    sys.stdout.write(json.dumps({"port": server.sockets[0].getsockname()[1]}) + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


# ------------------------------------------------------------------------------------------------ client


def _extensions(session: Any) -> str:
    response = session.link.websocket.response
    return str(response.headers.get("Sec-WebSocket-Extensions") or "") if response is not None else ""


class Member:
    """One crdtmail peer (its own data directory) linked to the server for one mailbox."""

    def __init__(self, directory: Path, room: str, mode: str) -> None:
        from crdtmail.peer import Peer
        from crdtmail.replica import Replica

        self.directory = directory
        self.room = room
        self.replica = Replica.init(directory)
        self.peer = Peer(self.replica, bodies=False, limits=_limits(mode))
        self.mailbox = self.peer.mailbox(room)
        self.task: asyncio.Task[None] | None = None
        self.dialer: Any = None

    async def link(self, url: str, token: str, timeout: float) -> Any:
        """Dial the server and wait until the mailbox is in sync; returns the session."""
        self.dialer = self.peer.dial(f"{url}/sync", token, [self.room])
        self.task = asyncio.create_task(self.dialer.run())
        deadline = time.monotonic() + timeout
        while True:
            for session in list(self.peer.sessions):
                if self.room in session.synced:
                    return session
            if time.monotonic() > deadline:
                raise TimeoutError(f"mailbox {self.room} not in sync after {timeout:.0f} s: "
                                   f"{getattr(self.dialer, 'last_error', None)}")
            await asyncio.sleep(0.0005)

    def entries(self) -> int:
        return sum(count.total for count in self.mailbox.counts().values())

    async def close(self) -> None:
        if self.dialer is not None:
            self.dialer.stop()
        for session in list(self.peer.sessions):
            await session.link.close()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)
        self.replica.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class Client(CommandClient):
    """Peers joined to rooms, answering the orchestrator's commands like the other stacks' clients."""

    VERSIONS = ("crdtmail", "pycrdt", "websockets")

    def __init__(self, mode: str, server_dir: Path, scratch: Path) -> None:
        self.mode = mode
        self.token = (server_dir / TOKEN_FILE).read_text()
        self.held: dict[str, int] = json.loads((server_dir / ROOMS_FILE).read_text())
        scratch.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="crdtmail-client-", dir=scratch))
        self.members: dict[str, Member] = {}
        self.targets: list[str] = []
        self.sent_count = 0
        self.taken_count = 0
        self.arrivals: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
        self.arrived = asyncio.Event()
        self.shadows = ShadowShards()  # which message each remote update changed (see _replay)

    def _member(self, room: str) -> Member:
        return Member(Path(tempfile.mkdtemp(prefix=f"{room}-", dir=self.scratch)), room, self.mode)

    async def join(self, url: str, room: str, load: str | None, observe: bool) -> dict[str, Any]:
        """A peer of its own syncs the room's mailbox and stays linked (``load`` is not needed: the serving
        peer holds every room's mailbox already, see ``prepare_server``)."""
        member = self._member(room)
        session = await member.link(url, self.token, 120)
        self.members[room] = member
        if room == LATENCY_ROOM:
            self.targets = sorted(view.id for view in member.mailbox.all_messages())
        if observe:
            self.shadows.copy(member.mailbox)
            member.mailbox.observe_updates(self._on_update)
        return {"extensions": _extensions(session), **self._entries(member)}

    def _entries(self, member: Member) -> dict[str, int]:
        messages = member.entries()
        complete = room_size(member.room) if messages == self.held.get(member.room) else messages
        return {"entries": complete, "messages": messages}

    def _on_update(self, document: str, update: bytes, origin: Any) -> None:
        if origin is not LOCAL:  # in B's document (as theirs measure); the commit follows
            self.shadows.note(time.monotonic_ns(), document, update)
            self.arrived.set()

    def _replay(self) -> None:
        """Note, per message, when the remote updates applied so far changed it."""
        for at, message_id in self.shadows.replay():
            self.arrivals[message_id].append(at)

    def _target(self, number: int) -> str:
        return self.targets[number % len(self.targets)]

    async def set_keys(self, room: str, keys: list[str], interval_ms: float) -> dict[str, Any]:
        """One flag change per key, one every ``interval_ms``; the clock just before each."""
        mailbox = self.members[room].mailbox
        times: list[int] = []
        for _key in keys:
            target = self._target(self.sent_count)
            self.sent_count += 1
            times.append(time.monotonic_ns())
            if KEYWORD in mailbox.message(target).flags:
                mailbox.set_flags(target, remove=[KEYWORD])
            else:
                mailbox.set_flags(target, add=[KEYWORD])
            await asyncio.sleep(interval_ms / 1000)
        return {"times": times}

    async def take(self, keys: list[str], timeout: float) -> dict[str, Any]:
        """When each change arrived here (None for one that did not within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        times: list[int | None] = []
        for _key in keys:
            target = self._target(self.taken_count)
            self.taken_count += 1
            self._replay()
            while not self.arrivals[target] and time.monotonic() < deadline:
                self.arrived.clear()
                self._replay()
                if self.arrivals[target]:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), min(0.05, max(0.0, deadline - time.monotonic())))
            times.append(self.arrivals[target].popleft() if self.arrivals[target] else None)
        return {"times": times}

    async def sync(self, url: str, room: str, expect: int) -> dict[str, Any]:
        """A fresh peer syncs the room's mailbox: seconds until in sync (stored) and until listed, entries, bytes."""
        member = self._member(room)
        try:
            started = time.perf_counter()
            session = await member.link(url, self.token, 120)
            seconds = time.perf_counter() - started
            entries = self._entries(member)  # counting reads the listing, which builds the rows it lacks first
            listed = time.perf_counter() - started
            await asyncio.sleep(SETTLE_S)
            transport = session.link.websocket.transport
            wire = tcp_bytes(transport.get_extra_info("socket") if transport is not None else None)
            return {
                "seconds": seconds, "listed_seconds": listed, **entries,
                "payload_bytes_received": session.connection.bytes_received,
                "wire_bytes_received": wire[0] if wire else None, "wire_bytes_sent": wire[1] if wire else None,
                "extensions": _extensions(session),
            }
        finally:
            await member.close()

    async def leave_all(self) -> None:
        for member in self.members.values():
            await member.close()
        self.members.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)


async def run_client(mode: str, server_dir: Path, scratch: Path) -> None:
    await answer_commands(Client(mode, server_dir, scratch).handle)


def main(argv: list[str]) -> int:
    role, mode = argv[0], argv[1]
    if role == "server":
        exit_when_stdin_closes()
        asyncio.run(serve(mode, Path(argv[2])))
    elif role == "client":
        asyncio.run(run_client(mode, Path(argv[2]), Path(argv[3])))
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
