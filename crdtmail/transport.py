"""WebSocket transport: the thin asyncio shell around the sans-I/O protocol.

A ``Link`` is one open WebSocket, from either side, carrying whole binary frames: ``send`` never blocks (it
writes to the socket at once, or queues within a byte bound); ``deliver`` hands what arrives to a callback
inside the read callback (a peer's sessions: no queue and no task switch on a hop), ``frames`` yields it from a
queue. ``serve`` accepts links after checking the device token at the HTTP upgrade (401 and not a byte more
without a valid one); ``Dialer`` keeps one outgoing link up, reconnecting with capped, jittered exponential
backoff.

Every buffer a remote peer can fill is bounded: incoming frames by ``max_frame_bytes`` and ``incoming_queue``
(a full queue stops the reading of the socket), outgoing bytes by ``max_pending_send_bytes``; a peer that reads
too slowly is closed (code 1013) rather than allowed to grow this process's memory. It resyncs when it
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl as ssl_module
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, Side, State

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_SLOW = 1013  # "try again later": the peer will reconnect and resync

Authenticator = Callable[[str], Any | None]
"""Maps a presented device token to the principal it belongs to, or None for an unknown token."""


@dataclass(frozen=True)
class TransportLimits:
    """Bounds on what one link may hold in memory; the defaults suit a desktop peer."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_pending_send_bytes: int = 64 * 1024 * 1024
    incoming_queue: int = 16  # frames received and not yet handled
    # Bytes the socket has not taken yet past which a link is ``backed_up`` (until a quarter of them are left):
    # a peer answering a first sync loads its next shard only then, so it holds about two in memory rather than
    # all of them, and the next is already on its way when the one before is read.
    write_ahead_bytes: int = 8 * 1024 * 1024
    # The kernel's send and receive buffers of a link's socket (None: Linux's autotuning from 16 and 128 KB). A
    # new connection's autotuned buffers take a first shard's megabytes a few hundred KB at a time, so most of it
    # waits in this process, and is not written while the serving peer loads the next shard (the phone-window
    # first sync of the 100k bench mailbox had its first shard 5-6 ms later). The kernel caps it at
    # net.core.[rw]mem_max.
    socket_buffer_bytes: int | None = 4 * 1024 * 1024
    open_timeout: float = 10.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    # What a dialer asks for. permessage-deflate costs more than it saves on a fast link (DESIGN.md: a 29 MB
    # initial sync took 3.7x longer on loopback with it); a slow or metered link may want "deflate", chosen per
    # remote peer in the config.
    compression: str | None = None
    # A listener agrees to permessage-deflate when a dialer asks for it: the dialer knows its link.
    accept_compression: bool = True


TEXT_FRAME_REASON = "crdtmail speaks binary frames only"
# From this size on, a listening side writes a frame's header and its payload to the socket as they are: websockets
# would first copy the payload into a new frame (1.4-3.7 ms for a 5.5 MB shard here, on the initial sync's path).
DIRECT_WRITE_BYTES = 1 << 16  # not lower: the header below is the form for payloads of 2**16 bytes and more
_LONG_BINARY_FRAME = bytes((0x80 | Opcode.BINARY, 127))  # FIN, binary, no mask, a 64-bit length follows (RFC 6455, 5.2)


class _Inbox:
    """What a link has read and not handed over yet, and whom to hand it to (``Link.deliver``'s callback, or
    ``Link.frame_batches`` through the queue). Bounded: past ``high`` queued messages the socket is not read
    until the queue drains to half of it."""

    def __init__(self, transport: asyncio.Transport, high: int) -> None:
        self.transport = transport
        self.high = max(1, high)
        self.messages: deque[bytes | str] = deque()
        self.fragments: list[bytes] = []
        self.fragmented_text = False
        self.sink: Callable[[list[bytes | str]], bool] | None = None
        self.ready = asyncio.Event()
        self.closed = False
        self.error: BaseException | None = None
        self.reading_paused = False

    def frame(self, frame: Frame) -> None:
        """A data frame the protocol parsed (websockets checked its size against max_size and its order)."""
        # Kept as websockets made it (a bytearray for an unmasked frame): the protocol reads a view of it, where a
        # copy would cost a shard's megabytes once more.
        data = cast(bytes, frame.data)
        if frame.opcode is not Opcode.CONT:
            self.fragments.clear()
            self.fragmented_text = frame.opcode is Opcode.TEXT
        if not frame.fin:
            self.fragments.append(data)
            return
        if self.fragments:
            self.fragments.append(data)
            data = b"".join(self.fragments)
            self.fragments.clear()
        self.messages.append(bytes(data).decode("utf-8", "replace") if self.fragmented_text else data)

    def hand_over(self) -> None:
        """After a read: give what it brought to the sink, or queue it (and stop reading when the queue is full)."""
        if not self.messages:
            return
        if self.sink is None:
            if len(self.messages) >= self.high and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            self.ready.set()
            return
        messages = list(self.messages)
        self.messages.clear()
        self.taken()
        if not self.sink(messages):
            self.sink = None
            self.ready.set()

    def taken(self) -> None:
        """Some messages were taken off the queue: read the socket again once it is half empty."""
        if self.reading_paused and len(self.messages) <= self.high // 2:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.ready.set()


class _LinkConnection(Connection):
    """A websockets connection whose data frames go to its link's ``_Inbox`` instead of websockets' own
    message queue, so a link can handle them inside the read callback (``Link.deliver``)."""

    inbox: _Inbox
    on_writable: Callable[[], None] | None = None  # called when the transport's buffer drains (the link's)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.inbox = _Inbox(cast(asyncio.Transport, transport), self.max_queue_high or 16)

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            self.inbox.frame(event)
        else:
            super().process_event(event)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.inbox.hand_over()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.inbox.close()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()


class _LinkServerConnection(_LinkConnection, ServerConnection):
    """The server side of a link."""


class _LinkClientConnection(_LinkConnection, ClientConnection):
    """The dialing side of a link."""


def _size_socket_buffers(transport: asyncio.BaseTransport | None, size: int) -> None:
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError as exc:  # a platform that refuses it keeps its own sizes: slower, not wrong
            log.debug("could not size the socket buffers of a link: %s", exc)
            return


class Link:
    """One open WebSocket carrying binary frames, with a bounded outgoing queue."""

    def __init__(self, websocket: ServerConnection | ClientConnection, limits: TransportLimits, *,
                 principal: Any = None, name: str = "") -> None:
        if not isinstance(websocket, _LinkConnection):
            raise TypeError("a Link needs a connection made by serve_links or a Dialer")
        self.websocket = websocket
        self.limits = limits
        self.principal = principal
        self.name = name or str(websocket.remote_address)
        self._outgoing: deque[bytes] = deque()
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writing = False  # the writer task is inside websocket.send
        self._writer = asyncio.create_task(self._write_loop(), name=f"crdtmail-link-writer {self.name}")
        self._inbox = websocket.inbox
        if limits.socket_buffer_bytes:
            _size_socket_buffers(websocket.transport, limits.socket_buffer_bytes)
        self._when_writable: list[Callable[[], None]] = []
        websocket.on_writable = self._writable_again

    @property
    def frames_waiting(self) -> int:
        """Frames received and not handed over yet (at most ``incoming_queue`` and what one read brings)."""
        return len(self._inbox.messages)

    @property
    def backed_up(self) -> bool:
        """Whether what was sent is still waiting for the socket (the transport's buffer is over its high-water
        mark, or frames queue behind it): a good time to hold back work that only makes more to send."""
        return self.websocket.paused or bool(self._outgoing)

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from the event loop) as soon as the link is not ``backed_up``; at once if it
        is not now. Not called if the link closes first."""
        self._when_writable.append(callback)
        if not self.backed_up:
            asyncio.get_running_loop().call_soon(self._writable_again)

    def _writable_again(self) -> None:
        if self.backed_up or self.closed:
            return
        callbacks, self._when_writable = self._when_writable, []
        for callback in callbacks:
            callback()

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for sending and not yet handed to the socket."""
        return self._pending_bytes

    @property
    def close_reason(self) -> str:
        """The reason the other side gave when it closed the link ("" if it gave none or has not closed it)."""
        received = self.websocket.protocol.close_rcvd
        return received.reason if received is not None else ""

    @property
    def closed_by_remote(self) -> bool:
        """Whether the other side began the closing handshake (rather than this side, or a lost connection)."""
        return bool(self.websocket.protocol.close_rcvd_then_sent)

    @property
    def compressed(self) -> bool:
        """Whether the two ends agreed on permessage-deflate for this link."""
        return any(extension.name == "permessage-deflate" for extension in self.websocket.protocol.extensions)

    @property
    def closed(self) -> bool:
        """Whether the link is closing or closed; sends are then dropped."""
        return self._closing or self.websocket.close_code is not None

    def send(self, frame: bytes) -> bool:
        """Queue a frame; returns False (and closes the link) when the peer has fallen too far behind."""
        if self.closed:
            return False
        if self._pending_bytes + len(frame) > self.limits.max_pending_send_bytes:
            log.warning("closing link %s: the peer reads too slowly (%d bytes waiting)", self.name,
                        self._pending_bytes)
            self.close_soon(CLOSE_TOO_SLOW, "you read too slowly; reconnect to resync")
            return False
        if not self._outgoing and not self._writing and self._write_now(frame):
            return True
        # Behind a full socket buffer (or a closing connection): the writer task sends it, after what waits.
        self._pending_bytes += len(frame)
        self._outgoing.append(frame)
        self._wakeup.set()
        return True

    def _write_now(self, frame: bytes) -> bool:
        """Write a frame straight to the socket when nothing stands in the way (open, the transport's buffer
        below its high-water mark): what websockets' ``send`` does then, without its coroutine and context
        manager, which cost more than the rest of the write. It goes before whatever the caller does next (a
        commit takes longer than the hop), where the writer task would run only after that. False: queue it."""
        websocket = self.websocket
        protocol = websocket.protocol
        if protocol.state is not State.OPEN or websocket.paused or websocket.transport.is_closing():
            return False
        if len(frame) >= DIRECT_WRITE_BYTES and protocol.side is Side.SERVER and not protocol.extensions:
            # A server's frame is not masked (RFC 6455, 5.1), so its bytes are the header, then the payload.
            websocket.transport.write(_LONG_BINARY_FRAME + len(frame).to_bytes(8, "big"))
            websocket.transport.write(frame)
            return True
        protocol.send_binary(frame)
        try:
            websocket.send_data()
        except Exception as exc:  # as websockets' send does: the connection is lost, end it
            websocket.set_connection_exc(exc)
            websocket.transport.abort()
        return True

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._outgoing:
                    frame = self._outgoing.popleft()
                    self._writing = True
                    try:
                        await self.websocket.send(frame)
                    finally:
                        self._writing = False
                        self._pending_bytes -= len(frame)
                if self._closing:
                    return
                self._writable_again()  # the queue is empty: whoever waits for that may go on
        except ConnectionClosed:
            pass
        finally:
            self._outgoing.clear()
            self._pending_bytes = 0

    async def frames(self) -> AsyncIterator[bytes]:
        """The binary frames the peer sends, one at a time, until the link closes (``frame_batches``, unbatched)."""
        async for batch in self.frame_batches():
            for frame in batch:
                yield frame

    async def frame_batches(self, *, max_frames: int = 64, max_bytes: int = 256 * 1024) -> AsyncIterator[list[bytes]]:
        """The binary frames the peer sends, until the link closes; a text frame closes the link (after the binary
        frames before it are given).

        Each step yields every frame that has already arrived (at least one; at most ``max_frames``, and no more
        once ``max_bytes`` are reached), so a busy peer can handle a burst as one. ``deliver`` is the faster
        way: it hands the frames over as they are read, with no task switch.
        """
        inbox = self._inbox
        while True:
            while not inbox.messages:
                if inbox.closed:
                    return
                inbox.ready.clear()
                await inbox.ready.wait()
            batch: list[bytes] = []
            size = 0
            while inbox.messages and len(batch) < max_frames and size < max_bytes:
                message = inbox.messages.popleft()
                if isinstance(message, str):
                    if batch:
                        yield batch
                    await self.close(1003, TEXT_FRAME_REASON)
                    return
                batch.append(message)
                size += len(message)
            inbox.taken()
            yield batch

    async def deliver(self, handle: Callable[[list[bytes]], bool]) -> None:
        """Hand the binary frames the peer sends to ``handle`` as they are read off the socket (every frame one
        read brought, in one call, inside the transport's callback: no queue, no task switch), until the link
        closes or ``handle`` returns False; frames that arrived before are handed over first. A text frame
        closes the link (after the binary frames before it). An exception ``handle`` raises closes the link
        (1011) and is raised here.
        """
        inbox = self._inbox

        def take(messages: list[bytes | str]) -> bool:
            text_at = next((i for i, message in enumerate(messages) if isinstance(message, str)), None)
            binary = cast(list[bytes], messages if text_at is None else messages[:text_at])
            try:
                if binary and not handle(binary):
                    return False
            except Exception as exc:  # raised again below, in the task of deliver's caller
                inbox.error = exc
                self.close_soon(1011, "internal error")
                return False
            if text_at is not None:
                self.close_soon(1003, TEXT_FRAME_REASON)
                return False
            return True

        inbox.sink = take
        try:
            inbox.hand_over()
            while inbox.sink is not None and not inbox.closed:
                inbox.ready.clear()
                await inbox.ready.wait()
        finally:
            inbox.sink = None
        if inbox.error is not None:
            error, inbox.error = inbox.error, None
            raise error

    def close_soon(self, code: int, reason: str) -> None:
        """Close without waiting (from synchronous code)."""
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().create_task(self.websocket.close(code, reason))
            self._wakeup.set()

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send what is queued, then close the WebSocket."""
        self._closing = True
        self._wakeup.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._writer), timeout=self.limits.open_timeout)
        await self.websocket.close(code, reason)

    async def wait_closed(self) -> None:
        """Return when the WebSocket is closed."""
        await self.websocket.wait_closed()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer


def presented_token(request: Request) -> str | None:
    """The device token of an upgrade request: ``Authorization: Bearer T``, else a ``token`` query parameter
    (browsers and y-websocket cannot set headers)."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    values = parse_qs(urlsplit(request.path).query).get("token")
    return values[0] if values else None


async def serve_links(
    on_link: Callable[[Link], Awaitable[None]],
    *,
    authenticate: Authenticator,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: TransportLimits | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> Server:
    """Listen for peers; each authenticated upgrade becomes a Link handed to ``on_link``.

    Listens on 127.0.0.1 unless told otherwise. A missing or unknown token gets HTTP 401 and the connection
    ends there. Returns the running server (``server.sockets`` tells the port when ``port=0``).
    """
    limits = limits or TransportLimits()
    principals: dict[int, Any] = {}

    def check_token(connection: ServerConnection, request: Request) -> Response | None:
        token = presented_token(request)
        principal = authenticate(token) if token else None
        if principal is None:
            log.info("refused a connection from %s: %s device token", connection.remote_address,
                     "no" if not token else "unknown")
            return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid device token is required\n")
        principals[id(connection)] = principal
        return None

    async def handler(websocket: ServerConnection) -> None:
        link = Link(websocket, limits, principal=principals.pop(id(websocket), None))
        try:
            await on_link(link)
        finally:
            if not link.closed:
                await link.close(CLOSE_NORMAL, "")
            await link.wait_closed()

    return await serve(
        handler, host, port,
        process_request=check_token,
        create_connection=_LinkServerConnection,
        ssl=ssl,
        compression="deflate" if limits.accept_compression or limits.compression else None,
        max_size=limits.max_frame_bytes,
        max_queue=limits.incoming_queue,
        write_limit=(limits.write_ahead_bytes, limits.write_ahead_bytes // 4),
        open_timeout=limits.open_timeout,
        ping_interval=limits.ping_interval,
        ping_timeout=limits.ping_timeout,
    )


# A link that stayed up this long ended for a reason of its own: the dialer reconnects at once.
STABLE_LINK_SECONDS = 10.0


class Dialer:
    """Keeps one outgoing link to ``url`` up: connects, hands the link to ``on_link``, reconnects when it ends.

    Delays between attempts grow exponentially from ``initial_delay`` to ``max_delay``, each drawn at random
    between half and all of the nominal delay (so peers that lost a relay together do not return together).
    A link that stays up ``STABLE_LINK_SECONDS``, or that ends for another reason than the other side closing
    it (a lost connection), is dialed again at once and resets the delay; one that the other side closes
    sooner counts as a failed attempt, so a peer that keeps refusing us is not dialed in a tight loop.
    ``stop`` also abandons a connection attempt in progress.
    """

    def __init__(
        self,
        url: str,
        token: str,
        on_link: Callable[[Link], Awaitable[None]],
        *,
        limits: TransportLimits | None = None,
        ssl: ssl_module.SSLContext | None = None,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self._on_link = on_link
        self._limits = limits or TransportLimits()
        self._ssl = ssl
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._rng = rng or random.Random()
        self._stopped = asyncio.Event()
        self.connections = 0
        self.last_error: str | None = None

    def next_delay(self, attempt: int) -> float:
        """The pause before reconnect attempt ``attempt`` (0-based), jittered and capped."""
        nominal = min(self._max_delay, self._initial_delay * 2.0 ** min(attempt, 32))
        return nominal * (0.5 + 0.5 * self._rng.random())

    def stop(self) -> None:
        """Stop reconnecting; a running link is closed by its owner."""
        self._stopped.set()

    async def _connect(self) -> ClientConnection | None:
        """Open the WebSocket, or None when ``stop`` came first (a connect in progress is abandoned then)."""
        connecting = asyncio.ensure_future(connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self._token}"},
            ssl=self._ssl,
            create_connection=_LinkClientConnection,
            compression=self._limits.compression,
            max_size=self._limits.max_frame_bytes,
            max_queue=self._limits.incoming_queue,
            write_limit=(self._limits.write_ahead_bytes, self._limits.write_ahead_bytes // 4),
            open_timeout=self._limits.open_timeout,
            ping_interval=self._limits.ping_interval,
            ping_timeout=self._limits.ping_timeout,
            proxy=None,
        ))
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            return None
        return connecting.result()

    async def run(self) -> None:
        """Connect and reconnect until ``stop``."""
        attempt = 0
        while not self._stopped.is_set():
            try:
                websocket = await self._connect()
            except InvalidStatus as exc:
                status = exc.response.status_code
                self.last_error = (
                    f"{self.url} refused our device token (HTTP {status}); pair this device again"
                    if status == HTTPStatus.UNAUTHORIZED else f"{self.url} answered HTTP {status}"
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.last_error = f"cannot reach {self.url}: {exc}"
            else:
                if websocket is None:  # stopped while connecting
                    return
                self.connections += 1
                self.last_error = None
                link = Link(websocket, self._limits, name=self.url)
                began = time.monotonic()
                try:
                    await self._on_link(link)
                finally:
                    if not link.closed:
                        await link.close(CLOSE_GOING_AWAY, "")
                    await link.wait_closed()
                # A link lost to the network, closed from this side, or that lived a while: reconnect at once.
                # One the other side ends straight away (it refused a mailbox, or fails on us) must not become
                # a loop of connections: back off as after a failed attempt.
                if not link.closed_by_remote or time.monotonic() - began >= STABLE_LINK_SECONDS:
                    attempt = 0
                    continue
                self.last_error = f"{self.url} closed the link: {link.close_reason or 'no reason given'}"
            delay = self.next_delay(attempt)
            attempt += 1
            log.info("%s; retrying in %.1fs", self.last_error, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=delay)
