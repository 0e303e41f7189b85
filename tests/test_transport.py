"""The WebSocket transport on real sockets (127.0.0.1, port 0): auth at the upgrade, frames both ways,
reconnect after the server restarts, and a slow reader closed instead of growing memory."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from crdtmail.transport import CLOSE_TOO_SLOW, DIRECT_WRITE_BYTES, Dialer, Link, TransportLimits, serve_links

TOKEN = "s3cret-token"


def authenticate(token: str) -> Any:
    return {"device": "phone"} if token == TOKEN else None


def port_of(server: Any) -> int:
    return int(server.sockets[0].getsockname()[1])


async def dial_until(server: Any, client: Callable[[Link], Awaitable[None]], done: asyncio.Event) -> None:
    """Dial ``server`` with a valid token, hand the link to ``client``, and stop once ``done`` is set."""
    dialer = Dialer(f"ws://127.0.0.1:{port_of(server)}/sync", TOKEN, client)
    task = asyncio.create_task(dialer.run())
    await asyncio.wait_for(done.wait(), 10)
    dialer.stop()
    await asyncio.wait_for(task, 10)


async def echo(link: Link) -> None:
    async for frame in link.frames():
        link.send(b"echo:" + frame)


@pytest.mark.timeout(30)
def test_frames_both_ways_with_a_valid_token() -> None:
    async def main() -> None:
        server = await serve_links(echo, authenticate=authenticate)
        try:
            received: list[bytes] = []
            done = asyncio.Event()

            async def client(link: Link) -> None:
                for n in range(100):
                    link.send(bytes([n]) * 1000)
                async for frame in link.frames():
                    received.append(frame)
                    if len(received) == 100:
                        done.set()
                        return

            await dial_until(server, client, done)
            assert received == [b"echo:" + bytes([n]) * 1000 for n in range(100)]
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic xyz"}])
def test_no_token_or_a_wrong_one_gets_401_and_nothing_else(headers: dict[str, str]) -> None:
    async def main() -> None:
        reached: list[Link] = []

        async def record(link: Link) -> None:
            reached.append(link)

        server = await serve_links(record, authenticate=authenticate)
        try:
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{port_of(server)}/sync", additional_headers=headers)
            assert refused.value.response.status_code == 401
            assert TOKEN.encode() not in refused.value.response.body
            assert reached == []
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_token_in_the_query_string_for_clients_that_cannot_set_headers() -> None:
    async def main() -> None:
        server = await serve_links(echo, authenticate=authenticate)
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/m/index?token={TOKEN}") as websocket:
                await websocket.send(b"x")
                assert await asyncio.wait_for(websocket.recv(), 5) == b"echo:x"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_the_dialer_reconnects_after_the_server_restarts() -> None:
    async def main() -> None:
        server = await serve_links(echo, authenticate=authenticate)
        port = port_of(server)
        links: list[Link] = []
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def client(link: Link) -> None:
            links.append(link)
            link.send(f"hello {len(links)}".encode())
            async for frame in link.frames():
                await replies.put(frame)

        dialer = Dialer(f"ws://127.0.0.1:{port}/sync", TOKEN, client, initial_delay=0.05, max_delay=0.5)
        task = asyncio.create_task(dialer.run())
        assert await asyncio.wait_for(replies.get(), 10) == b"echo:hello 1"
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.3)  # a few failed attempts while nobody listens
        assert dialer.last_error is not None and "cannot reach" in dialer.last_error
        server = await serve_links(echo, authenticate=authenticate, port=port)
        try:
            assert await asyncio.wait_for(replies.get(), 10) == b"echo:hello 2"
            assert dialer.connections == 2
        finally:
            dialer.stop()
            if links[-1] is not None and not links[-1].closed:
                await links[-1].close()
            await asyncio.wait_for(task, 10)
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_slow_reader_is_closed_and_memory_stays_bounded() -> None:
    limits = TransportLimits(max_pending_send_bytes=2 * 1024 * 1024)
    result: dict[str, Any] = {}

    async def flood(link: Link) -> None:
        frame = b"x" * 64 * 1024
        sent = 0
        for _ in range(2000):  # 128 MB if nothing stopped it
            if not link.send(frame):
                break
            sent += 1
            result["max_pending"] = max(result.get("max_pending", 0), link.pending_bytes)
            await asyncio.sleep(0)
        result["sent"] = sent
        await link.wait_closed()

    async def main() -> None:
        server = await serve_links(flood, authenticate=authenticate, limits=limits)
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                               additional_headers={"Authorization": f"Bearer {TOKEN}"},
                               max_queue=1, max_size=None,
                               compression=None) as websocket:  # compressed, 64 KB of "x" would fill nothing
                await asyncio.sleep(2)  # never read: the server's queue fills up
                with pytest.raises(Exception):  # noqa: B017 (closed by the server: any close is fine)
                    while True:
                        await asyncio.wait_for(websocket.recv(), 5)
                assert websocket.close_code == CLOSE_TOO_SLOW
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert result["sent"] < 2000
    assert result["max_pending"] <= limits.max_pending_send_bytes


@pytest.mark.timeout(30)
def test_a_frame_goes_to_the_socket_at_once_and_order_holds_when_the_socket_is_full() -> None:
    """A send with nothing queued is written before send returns (no wait for the writer task); once the
    socket's buffer is full, frames queue, and every one arrives, in order."""
    frame_count, frame_size = 64, 256 * 1024
    result: dict[str, Any] = {}

    async def sender(link: Link) -> None:
        link.send(b"first")
        result["pending_after_first"] = link.pending_bytes
        await asyncio.sleep(0.2)  # the reader has the first frame; now fill the socket faster than it reads
        for n in range(frame_count):
            assert link.send(n.to_bytes(4, "big") * (frame_size // 4))
            result["max_pending"] = max(result.get("max_pending", 0), link.pending_bytes)
        await link.close()

    async def main() -> None:
        # The kernel's autotuned buffers: sized ones (8 MB) would take all 16 MB before anything had to queue.
        server = await serve_links(sender, authenticate=authenticate,
                                   limits=TransportLimits(socket_buffer_bytes=None))
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                               additional_headers={"Authorization": f"Bearer {TOKEN}"},
                               max_queue=1, max_size=None, compression=None) as websocket:
                assert await asyncio.wait_for(websocket.recv(), 5) == b"first"
                await asyncio.sleep(0.5)  # not reading: the server's socket buffer fills
                frames = [await asyncio.wait_for(websocket.recv(), 5) for _ in range(frame_count)]
        finally:
            server.close()
            await server.wait_closed()
        assert [int.from_bytes(frame[:4], "big") for frame in frames] == list(range(frame_count))
        assert all(len(frame) == frame_size for frame in frames)

    asyncio.run(main())
    assert result["pending_after_first"] == 0  # written, not queued
    assert result["max_pending"] > frame_size  # and later ones did queue behind a full socket


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_large_frames_from_the_listening_side_arrive_whole_and_in_order(compression: str | None) -> None:
    """Frames from DIRECT_WRITE_BYTES on leave a listener as header and payload written separately (unless
    permessage-deflate is on): a stock websockets client reads each one whole, in order with the small ones."""
    sizes = [10, DIRECT_WRITE_BYTES - 1, DIRECT_WRITE_BYTES, 3, 200_000, 5 * 1024 * 1024 + 7, 1]
    sent = [bytes([n]) * size for n, size in enumerate(sizes)]

    async def sender(link: Link) -> None:
        for frame in sent:
            assert link.send(frame)
        await asyncio.sleep(5)  # the client ends the link once it has everything

    async def main() -> list[bytes]:
        server = await serve_links(sender, authenticate=authenticate)
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                               additional_headers={"Authorization": f"Bearer {TOKEN}"},
                               max_size=None, compression=compression) as websocket:
                assert bool(websocket.protocol.extensions) == (compression is not None)
                return [await asyncio.wait_for(websocket.recv(), 5) for _ in sent]
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == sent


@pytest.mark.timeout(30)
def test_frames_that_arrived_together_come_as_one_batch_in_order() -> None:
    batches: list[list[bytes]] = []
    done = asyncio.Event()

    async def burst(link: Link) -> None:
        for n in range(40):
            link.send(n.to_bytes(2, "big") * 50)
        await link.wait_closed()

    async def main() -> None:
        server = await serve_links(burst, authenticate=authenticate)
        try:
            async def client(link: Link) -> None:
                await asyncio.sleep(0.3)  # let the burst arrive
                async for batch in link.frame_batches(max_frames=16):
                    batches.append(batch)
                    if sum(map(len, batches)) == 40:
                        done.set()
                        return

            await dial_until(server, client, done)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    frames = [frame for batch in batches for frame in batch]
    assert frames == [n.to_bytes(2, "big") * 50 for n in range(40)]
    assert max(map(len, batches)) == 16  # taken together, up to the cap
    assert len(batches) < 40


@pytest.mark.timeout(30)
def test_a_text_frame_in_a_batch_closes_the_link_after_the_binary_ones_before_it() -> None:
    received: list[bytes] = []

    async def reader(link: Link) -> None:
        await asyncio.sleep(0.2)  # both frames have arrived: they come as one batch
        async for batch in link.frame_batches():
            received.extend(batch)

    async def main() -> None:
        server = await serve_links(reader, authenticate=authenticate)
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                               additional_headers={"Authorization": f"Bearer {TOKEN}"}) as websocket:
                await websocket.send(b"binary first")
                await websocket.send("then text")
                await asyncio.wait_for(websocket.wait_closed(), 5)
                assert websocket.close_code == 1003
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert received == [b"binary first"]


def test_backoff_grows_jittered_and_capped() -> None:
    async def noop(link: Link) -> None:
        return None

    dialer = Dialer("ws://127.0.0.1:1/", TOKEN, noop, initial_delay=0.1, max_delay=5.0, rng=random.Random(1))
    delays = [dialer.next_delay(n) for n in range(12)]
    assert all(0.05 <= d <= 5.0 for d in delays)
    assert delays[0] <= 0.1 and delays[5] > delays[0] and max(delays[8:]) <= 5.0
    assert len({round(d, 6) for d in delays[8:]}) > 1  # jittered, not a constant cap


@pytest.mark.timeout(30)
def test_a_peer_that_ends_every_link_at_once_is_not_dialed_in_a_loop() -> None:
    async def refuse(link: Link) -> None:
        await link.close(4403, "mailbox not granted")

    async def main() -> None:
        server = await serve_links(refuse, authenticate=authenticate)
        url = f"ws://127.0.0.1:{port_of(server)}/sync"
        links: list[Link] = []

        async def client(link: Link) -> None:
            links.append(link)
            async for _ in link.frames():
                pass

        dialer = Dialer(url, TOKEN, client, initial_delay=0.1, max_delay=0.8, rng=random.Random(3))
        task = asyncio.create_task(dialer.run())
        await asyncio.sleep(2.0)
        dialer.stop()
        await asyncio.wait_for(task, 5)
        server.close()
        await server.wait_closed()
        # Delays of 0.05-0.1, 0.1-0.2, 0.2-0.4, 0.4-0.8, then 0.4-0.8 s: at most 8 links in 2 s, not hundreds.
        assert 2 <= len(links) <= 8, len(links)
        assert dialer.last_error == f"{url} closed the link: mailbox not granted"

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_stop_abandons_a_connection_attempt_in_progress() -> None:
    async def main() -> None:
        # A listener that accepts TCP connections and never answers the WebSocket upgrade.
        silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]

        async def client(link: Link) -> None:
            raise AssertionError("no link can open")

        dialer = Dialer(f"ws://127.0.0.1:{port}/sync", TOKEN, client, limits=TransportLimits(open_timeout=60))
        task = asyncio.create_task(dialer.run())
        await asyncio.sleep(0.3)  # the upgrade request is out, its answer never comes
        began = asyncio.get_running_loop().time()
        dialer.stop()
        await asyncio.wait_for(task, 5)  # not the 60 s open_timeout
        assert asyncio.get_running_loop().time() - began < 5
        assert dialer.connections == 0
        silent.close()
        await silent.wait_closed()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_deliver_hands_frames_over_inside_the_read_callback_in_order() -> None:
    """Frames that arrived before ``deliver`` come first; later ones are handed over as they are read (no task
    is running: the transport's callback calls the handler); a fragmented message arrives whole."""
    received: list[bytes] = []
    in_a_task: list[bool] = []
    done = asyncio.Event()

    async def reader(link: Link) -> None:
        await asyncio.sleep(0.3)  # the first burst is queued by now

        def handle(frames: list[bytes]) -> bool:
            in_a_task.append(asyncio.current_task() is not None)
            received.extend(frames)
            if len(received) == 21:
                done.set()
            return True

        await link.deliver(handle)

    async def main() -> None:
        server = await serve_links(reader, authenticate=authenticate)
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                               additional_headers={"Authorization": f"Bearer {TOKEN}"}) as websocket:
                for n in range(10):
                    await websocket.send(bytes([n]) * 100)
                await asyncio.sleep(0.6)
                for n in range(10, 20):
                    await websocket.send(bytes([n]) * 100)
                await websocket.send([b"frag", b"mented"])  # three frames: two fragments and the end
                await asyncio.wait_for(done.wait(), 5)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert received == [bytes([n]) * 100 for n in range(20)] + [b"fragmented"]
    assert in_a_task[0] is True  # what was queued is handed over from deliver itself
    assert not any(in_a_task[1:])  # the rest from the read callback


@pytest.mark.timeout(30)
def test_deliver_stops_at_a_text_frame_and_a_failing_handler_closes_the_link() -> None:
    outcomes: list[Any] = []

    async def reader(link: Link) -> None:
        def handle(frames: list[bytes]) -> bool:
            outcomes.extend(frames)
            if b"fail" in frames:
                raise ValueError("handler failed")
            return True

        try:
            await link.deliver(handle)
        except ValueError as exc:
            outcomes.append(exc)

    async def main() -> list[int | None]:
        server = await serve_links(reader, authenticate=authenticate)
        codes: list[int | None] = []
        try:
            for last in ("then text", b"fail"):
                async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                                   additional_headers={"Authorization": f"Bearer {TOKEN}"}) as websocket:
                    await websocket.send(b"binary first")
                    await websocket.send(last)
                    await asyncio.wait_for(websocket.wait_closed(), 5)
                    codes.append(websocket.close_code)
        finally:
            server.close()
            await server.wait_closed()
        return codes

    assert asyncio.run(main()) == [1003, 1011]
    assert outcomes[:3] == [b"binary first", b"binary first", b"fail"]
    assert isinstance(outcomes[3], ValueError)


@pytest.mark.timeout(30)
def test_frames_nobody_takes_stop_the_reading_instead_of_growing_memory() -> None:
    """With ``incoming_queue`` frames waiting the socket is not read: the queue holds at most that and what one
    read brought, and every frame arrives, in order, once the link is read."""
    limits = TransportLimits(incoming_queue=4)
    seen: dict[str, Any] = {"max_waiting": 0}
    frame_count, frame_size = 200, 16 * 1024

    async def reader(link: Link) -> None:
        for _ in range(20):  # not reading for a while; the sender keeps sending
            await asyncio.sleep(0.05)
            seen["max_waiting"] = max(seen["max_waiting"], link.frames_waiting)
        frames = []
        async for frame in link.frames():
            frames.append(frame)
            if len(frames) == frame_count:
                break
        seen["frames"] = frames

    async def main() -> None:
        server = await serve_links(reader, authenticate=authenticate, limits=limits)
        try:
            async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                               additional_headers={"Authorization": f"Bearer {TOKEN}"},
                               compression=None) as websocket:
                for n in range(frame_count):
                    await websocket.send(n.to_bytes(4, "big") * (frame_size // 4))
                await asyncio.wait_for(websocket.wait_closed(), 10)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert [int.from_bytes(frame[:4], "big") for frame in seen["frames"]] == list(range(frame_count))
    assert 4 <= seen["max_waiting"] <= 4 + 256 * 1024 // frame_size + 1


@pytest.mark.timeout(30)
def test_both_ends_size_their_socket_buffers_unless_told_to_leave_them_to_the_kernel() -> None:
    """A first shard of megabytes then fits in the kernel's buffers instead of waiting in the serving process,
    which would not write it while it loads the next one."""

    def buffers(link: Link) -> tuple[int, int]:
        sock = link.websocket.transport.get_extra_info("socket")
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    async def sizes(limits: TransportLimits) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        done = asyncio.Event()

        async def on_server_link(link: Link) -> None:
            found["listener"] = buffers(link)
            await link.wait_closed()

        async def client(link: Link) -> None:
            found["dialer"] = buffers(link)
            done.set()

        server = await serve_links(on_server_link, authenticate=authenticate, limits=limits)
        try:
            dialer = Dialer(f"ws://127.0.0.1:{port_of(server)}/sync", TOKEN, client, limits=limits)
            task = asyncio.create_task(dialer.run())
            await asyncio.wait_for(done.wait(), 10)
            dialer.stop()
            await asyncio.wait_for(task, 10)
        finally:
            server.close()
            await server.wait_closed()
        return found

    sized = asyncio.run(sizes(TransportLimits(socket_buffer_bytes=1024 * 1024)))
    kernel = asyncio.run(sizes(TransportLimits(socket_buffer_bytes=None)))
    with open("/proc/sys/net/core/rmem_max") as rmem, open("/proc/sys/net/core/wmem_max") as wmem:
        expected = min(1024 * 1024, int(rmem.read()), int(wmem.read()))
    for end in ("listener", "dialer"):
        send, receive = sized[end]
        assert send >= expected and receive >= expected, (end, sized[end], expected)  # Linux reports it doubled
        assert kernel[end][1] < receive, (end, kernel[end], sized[end])
