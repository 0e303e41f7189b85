"""The pycrdt-websocket stack's processes: a ``WebsocketServer`` room server and pycrdt ``Provider`` clients.

``python -m bench.alternatives.pyws_child server none|deflate`` prints ``{"port": N}`` and serves until its
stdin closes. ``python -m bench.alternatives.pyws_child client none|deflate`` answers one JSON command per stdin
line with one JSON line on stdout (the protocol is described in ``bench/alternatives/wsstacks.py``; the Node
client in ``node/client.mjs`` speaks the same one). Both exit when stdin closes, so an orphan never lingers.

The transport is the ``websockets`` library (what pycrdt-websocket's documentation serves it with), wrapped in
the few lines of ``pycrdt.Channel`` that both ends need: websockets' asyncio connections have no ``path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

MAX_MESSAGE = 256 * 1024 * 1024  # websockets' default (1 MiB) drops the sync step 2 of a 10k-entry document
TCP_INFO_BYTES_ACKED = 120  # offsets of tcpi_bytes_acked / tcpi_bytes_received in Linux's struct tcp_info
TCP_INFO_BYTES_RECEIVED = 128
SETTLE_S = 0.1  # after an initial sync, before its bytes are counted (the Node client waits as long)


def exit_when_stdin_closes(on_line: Any = None) -> None:
    """Read stdin on a thread: hand each line to ``on_line``; end the process at EOF (the parent is gone)."""

    def reader() -> None:
        for line in sys.stdin:
            if on_line is not None and line.strip():
                on_line(line)
        os._exit(0)

    threading.Thread(target=reader, daemon=True).start()


def _compression(mode: str) -> str | None:
    return "deflate" if mode == "deflate" else None


def tcp_bytes(sock: socket.socket | None) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) on a TCP socket, from TCP_INFO; None where unavailable."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < TCP_INFO_BYTES_RECEIVED + 8:
        return None
    received = struct.unpack_from("=Q", info, TCP_INFO_BYTES_RECEIVED)[0]
    acked = struct.unpack_from("=Q", info, TCP_INFO_BYTES_ACKED)[0]
    return received, acked


class WebsocketChannel:
    """A ``pycrdt.Channel`` over a websockets connection; counts the payload bytes it receives."""

    def __init__(self, websocket: Any, path: str) -> None:
        self._websocket = websocket
        self._path = path
        self.bytes_received = 0

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> WebsocketChannel:
        return self

    async def __anext__(self) -> bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        await self._websocket.send(message)

    async def recv(self) -> bytes:
        message = await self._websocket.recv()
        data = message.encode() if isinstance(message, str) else bytes(message)
        self.bytes_received += len(data)
        return data


def _negotiated(websocket: Any) -> str:
    header = websocket.response.headers.get("Sec-WebSocket-Extensions") if websocket.response else None
    return str(header or "")


# ------------------------------------------------------------------------------------------------ server


async def serve(mode: str) -> None:
    """A pycrdt-websocket ``WebsocketServer``: each URL path is a room."""
    from pycrdt.websocket import WebsocketServer, exception_logger
    from websockets.asyncio.server import serve as ws_serve

    log = logging.getLogger("pycrdt-websocket-bench")
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.WARNING)
    async with WebsocketServer(exception_handler=exception_logger, log=log) as room_server:

        async def handler(websocket: Any) -> None:
            await room_server.serve(WebsocketChannel(websocket, websocket.request.path.lstrip("/")))

        async with ws_serve(handler, "127.0.0.1", 0, compression=_compression(mode), max_size=MAX_MESSAGE) as server:
            port = server.sockets[0].getsockname()[1]
            sys.stdout.write(json.dumps({"port": port}) + "\n")
            sys.stdout.flush()
            await asyncio.Event().wait()  # until the process ends (stdin closed or a signal)


# ------------------------------------------------------------------------------------------------ client


class CommandClient:
    """The orchestrator's commands (see ``bench/alternatives/wsstacks.py``) dispatched to a stack's client.

    A stack's client implements ``join``, ``set_keys``, ``take``, ``sync`` and ``leave_all``, and names in
    ``VERSIONS`` the packages whose versions ``versions`` reports.
    """

    VERSIONS: tuple[str, ...] = ()

    async def join(self, url: str, room: str, load: str | None, observe: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def set_keys(self, room: str, keys: list[str], interval_ms: float) -> dict[str, Any]:
        raise NotImplementedError

    async def take(self, keys: list[str], timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    async def sync(self, url: str, room: str, expect: int) -> dict[str, Any]:
        raise NotImplementedError

    async def leave_all(self) -> None:
        raise NotImplementedError

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "join":
            return await self.join(command["url"], command["room"], command.get("load"), command.get("observe", False))
        if name == "set":
            return await self.set_keys(command["room"], command["keys"], command["interval_ms"])
        if name == "take":
            return await self.take(command["keys"], command["timeout"])
        if name == "sync":
            return await self.sync(command["url"], command["room"], command["expect"])
        if name == "versions":
            from importlib.metadata import version

            return {package: version(package) for package in self.VERSIONS}
        if name == "quit":
            await self.leave_all()
            return {}
        raise ValueError(f"unknown command {name!r}")


class Client(CommandClient):
    """Holds rooms joined through pycrdt ``Provider``s and answers the orchestrator's commands."""

    VERSIONS = ("pycrdt", "pycrdt-websocket", "websockets", "anyio")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.rooms: dict[str, tuple[Any, asyncio.Event, asyncio.Task[None], Any]] = {}
        self.received: dict[str, int] = {}  # key -> CLOCK_MONOTONIC ns when this client observed it
        self.arrived = asyncio.Event()

    async def _connect(self, url: str) -> Any:
        from websockets.asyncio.client import connect

        return await connect(url, compression=_compression(self.mode), max_size=MAX_MESSAGE, proxy=None,
                             open_timeout=30)

    async def join(self, url: str, room: str, load: str | None, observe: bool) -> dict[str, Any]:
        """Connect a document (optionally filled from an update file) to a room; return once synced."""
        from pycrdt import Doc, Map, Provider

        doc: Any = Doc()
        if load:
            with open(load, "rb") as handle:
                doc.apply_update(handle.read())
        flags = doc.get("flags", type=Map)
        # Keep the map and its subscription: pycrdt drops an observer once they are garbage-collected.
        subscription = flags.observe(self._on_flags) if observe else None
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def hold() -> None:
            try:
                websocket = await self._connect(f"{url}/{room}")
                async with websocket, Provider(doc, WebsocketChannel(websocket, room)) as provider:
                    await provider.synced.wait()
                    ready.set_result(_negotiated(websocket))
                    await stop.wait()
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)
                else:
                    sys.stderr.write(f"room {room} ended: {exc!r}\n")

        task = asyncio.create_task(hold())
        extensions = await asyncio.wait_for(ready, 60)
        self.rooms[room] = (doc, stop, task, (flags, subscription))
        return {"extensions": extensions, "entries": len(doc.get("messages", type=Map))}

    def _on_flags(self, event: Any) -> None:
        now = time.monotonic_ns()
        for key in event.keys:
            self.received[key] = now
        self.arrived.set()

    async def set_keys(self, room: str, keys: list[str], interval_ms: float) -> dict[str, Any]:
        """Set ``flags[key] = True`` for each key, one every ``interval_ms``; the clock just before each."""
        from pycrdt import Map

        flags = self.rooms[room][0].get("flags", type=Map)
        times: list[int] = []
        for key in keys:
            times.append(time.monotonic_ns())
            flags[key] = True
            await asyncio.sleep(interval_ms / 1000)
        return {"times": times}

    async def take(self, keys: list[str], timeout: float) -> dict[str, Any]:
        """When each key was observed (None for one that did not arrive within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while not all(key in self.received for key in keys):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.05))
        return {"times": [self.received.pop(key, None) for key in keys]}

    async def sync(self, url: str, room: str, expect: int) -> dict[str, Any]:
        """A fresh document joins a room: the time until it is synced and holds ``expect`` entries, and bytes."""
        from pycrdt import Doc, Map, Provider

        doc: Any = Doc()
        messages = doc.get("messages", type=Map)
        started = time.perf_counter()
        async with await self._connect(f"{url}/{room}") as websocket:
            channel = WebsocketChannel(websocket, room)
            async with Provider(doc, channel) as provider:
                await asyncio.wait_for(provider.synced.wait(), 120)
                while len(messages) < expect and time.perf_counter() - started < 120:
                    await asyncio.sleep(0.001)
                seconds = time.perf_counter() - started
                entries = len(messages)
            # The provider has sent what it queued; let the last bytes be acknowledged, then count them.
            await asyncio.sleep(SETTLE_S)
            wire = tcp_bytes(websocket.transport.get_extra_info("socket"))
            extensions = _negotiated(websocket)
        return {
            "seconds": seconds, "entries": entries, "payload_bytes_received": channel.bytes_received,
            "wire_bytes_received": wire[0] if wire else None, "wire_bytes_sent": wire[1] if wire else None,
            "extensions": extensions,
        }

    async def leave_all(self) -> None:
        for _doc, stop, task, _kept in self.rooms.values():
            stop.set()
            try:
                await asyncio.wait_for(task, 5)
            except (TimeoutError, Exception):
                task.cancel()
        self.rooms.clear()


async def answer_commands(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """One JSON reply on stdout per JSON command on stdin, until ``quit`` (or stdin closes: the process ends)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    exit_when_stdin_closes(lambda line: loop.call_soon_threadsafe(lines.put_nowait, line))
    while True:
        command = json.loads(await lines.get())
        try:
            reply = await handle(command)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if command["cmd"] == "quit":
            return


async def run_client(mode: str) -> None:
    await answer_commands(Client(mode).handle)


def main(argv: list[str]) -> int:
    role, mode = argv[0], argv[1]
    if role == "server":
        exit_when_stdin_closes()
        asyncio.run(serve(mode))
    elif role == "client":
        asyncio.run(run_client(mode))
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
