"""Peers over real sockets on 127.0.0.1: convergence both ways after offline edits, relaying through a middle
peer, and refusal of mailboxes a device was not paired for."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server

from crdtmail import heap
from crdtmail import peer as peer_module
from crdtmail.model.mailbox import Mailbox
from crdtmail.peer import Peer
from crdtmail.protocol.encoding import decode_state_vector
from crdtmail.protocol.frames import EMPTY_STATE_VECTOR, SyncType, encode_y_websocket_sync
from crdtmail.protocol.session import CatalogReceived, Role, SyncConnection, SyncStep2Received
from crdtmail.replica import Replica
from crdtmail.sample import generate_messages, write_maildir
from crdtmail.transport import Dialer, TransportLimits
from tests.conftest import make_raw


def snapshot(mailbox: Mailbox) -> tuple[object, ...]:
    folders = sorted((f.id, f.path) for f in mailbox.folders())
    messages = sorted((m.id, m.folder_id, tuple(sorted(m.flags))) for m in mailbox.all_messages())
    return folders, messages


async def until(condition: object, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("peers did not converge in time")
        await asyncio.sleep(0.02)


def port_of(server: object) -> int:
    return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]


def run_closing(main: Coroutine[Any, Any, None], *replicas: Replica) -> None:
    """Run a test's peers to the end, then close their replicas (also when an assertion failed)."""
    try:
        asyncio.run(main)
    finally:
        for replica in replicas:
            replica.close()


async def hang_up(dialer: Dialer, task: asyncio.Task[None], peer: Peer, server: Server) -> None:
    """Stop a dialing peer and the server it reached: no reconnect, its links closed, the server gone."""
    dialer.stop()
    for session in list(peer.sessions):
        await session.link.close()
    await asyncio.wait_for(task, 10)
    server.close()
    await server.wait_closed()


async def phone_dials_desktop(desktop: Peer, phone: Peer) -> tuple[Server, Dialer, asyncio.Task[None]]:
    """The desktop pairs the phone for "default" and serves; the phone dials it."""
    token = desktop.registry.pair("phone", ["default"])
    server = await desktop.serve()
    dialer = phone.dial(f"ws://127.0.0.1:{port_of(server)}/sync", token, ["default"], initial_delay=0.05)
    return server, dialer, asyncio.create_task(dialer.run())


def record_loads(mailbox: Mailbox, order: list[str], prefix: str = "") -> None:
    """Append to ``order`` each document the mailbox encodes for a peer (what answering a step 1 loads)."""
    encode = mailbox.encode_document

    def spy(doc_name: str, state_vector: bytes | None = None) -> bytes:
        order.append(prefix + doc_name)
        return encode(doc_name, state_vector)

    mailbox.encode_document = spy  # type: ignore[method-assign]


async def greet_as_phone(websocket: Any, client: SyncConnection) -> None:
    """Open the protocol as a raw client on ``websocket`` and read until the peer's catalog has come."""
    client.send_hello("phone-peer", ["default"])
    for data in client.data_to_send():
        await websocket.send(data)
    while not any(isinstance(e, CatalogReceived) for e in client.events_received()):
        client.receive_data(await asyncio.wait_for(websocket.recv(), 5))


@pytest.mark.timeout(60)
def test_two_peers_converge_both_ways_after_offline_edits(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    write_maildir(maildir, generate_messages(40, seed=4))
    desktop_replica = Replica.init(tmp_path / "desktop")
    desktop_replica.import_path(maildir)
    phone_replica = Replica.init(tmp_path / "phone")

    async def main() -> None:
        desktop, phone = Peer(desktop_replica), Peer(phone_replica)
        token = desktop.registry.pair("phone", ["default"])
        server = await desktop.serve()
        url = f"ws://127.0.0.1:{port_of(server)}/sync"
        dialer = phone.dial(url, token, ["default"], initial_delay=0.05, max_delay=0.2)
        task = asyncio.create_task(dialer.run())
        desk_box = desktop.mailbox("default")
        await until(lambda: "default" in phone_replica.mailbox_names()
                    and snapshot(phone.mailbox("default")) == snapshot(desk_box))
        phone_box = phone.mailbox("default")
        ids = [m.id for m in desk_box.all_messages()]
        # Bodies follow the documents: the phone asks for every one it lacks, and checks each hash.
        await until(lambda: all(phone_box.body(i) is not None for i in ids))
        assert all(phone_box.body(i) == desk_box.body(i) for i in ids)

        # Online: a change on either side reaches the other.
        desk_box.set_flags(ids[0], add=["flagged"])
        await until(lambda: "\\Flagged" in phone_box.message(ids[0]).flags)
        phone_box.move(ids[1], "Archive")
        await until(lambda: desk_box.message(ids[1]).folder_id == "archive")

        # Offline: the phone drops off, both sides change things, then it comes back.
        dialer.stop()
        for session in list(phone.sessions):
            await session.link.close()
        await asyncio.wait_for(task, 10)
        desk_box.set_flags(ids[2], add=["seen", "$Desk"])
        desk_box.create_folder("FromDesktop")
        phone_box.delete(ids[3])
        phone_box.set_flags(ids[4], add=["answered"])
        phone_box.expunge(ids[5])
        assert snapshot(desk_box) != snapshot(phone_box)
        dialer = phone.dial(url, token, ["default"], initial_delay=0.05, max_delay=0.2)
        task = asyncio.create_task(dialer.run())
        await until(lambda: snapshot(desk_box) == snapshot(phone_box))
        assert desk_box.message(ids[3]).folder_id == "trash"
        assert ids[5] not in {m.id for m in desk_box.all_messages()}
        assert "$Desk" in phone_box.message(ids[2]).flags
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


@pytest.mark.timeout(60)
def test_a_chain_converges_through_the_middle_peer(tmp_path: Path) -> None:
    replicas = [Replica.init(tmp_path / name) for name in ("a", "b", "c")]

    async def main() -> None:
        a, b, c = (Peer(replica) for replica in replicas)
        server_a = await a.serve()
        server_b = await b.serve()
        token_b = a.registry.pair("b", ["default"])
        token_c = b.registry.pair("c", ["default"])
        dial_b = b.dial(f"ws://127.0.0.1:{port_of(server_a)}/sync", token_b, ["default"], initial_delay=0.05)
        dial_c = c.dial(f"ws://127.0.0.1:{port_of(server_b)}/sync", token_c, ["default"], initial_delay=0.05)
        tasks = [asyncio.create_task(dial_b.run()), asyncio.create_task(dial_c.run())]
        box_a, box_c = a.mailbox("default"), c.mailbox("default")
        raw = (b"From: x@y\r\nSubject: through the chain\r\nMessage-ID: <chain@x>\r\n"
               b"Date: 02 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n")
        mid = box_a.add(raw).message_id
        await until(lambda: mid in {m.id for m in box_c.all_messages()})
        await until(lambda: box_c.body(mid) == raw)  # fetched from b, which fetched it from a
        box_c.set_flags(mid, add=["seen"])
        await until(lambda: "\\Seen" in box_a.message(mid).flags)
        assert snapshot(box_a) == snapshot(b.mailbox("default")) == snapshot(box_c)
        for dialer in (dial_b, dial_c):
            dialer.stop()
        for peer in (b, c):
            for session in list(peer.sessions):
                if session.connection.role.value == "client":
                    await session.link.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for server in (server_a, server_b):
            server.close()
            await server.wait_closed()

    run_closing(main(), *replicas)


@pytest.mark.timeout(60)
def test_a_device_gets_nothing_of_a_mailbox_it_was_not_paired_for(tmp_path: Path) -> None:
    owner, other = Replica.init(tmp_path / "owner"), Replica.init(tmp_path / "other")

    async def main() -> None:
        a, b = Peer(owner), Peer(other)
        secret = a.mailbox("secret")
        secret.add(b"From: x@y\r\nSubject: private\r\nMessage-ID: <p@x>\r\n\r\nhush\r\n")
        token = a.registry.pair("other", ["default"])
        server = await a.serve()
        dialer = b.dial(f"ws://127.0.0.1:{port_of(server)}/sync", token, ["secret"], initial_delay=0.05,
                        max_delay=0.1)
        task = asyncio.create_task(dialer.run())
        await asyncio.sleep(0.5)
        dialer.stop()
        await asyncio.wait_for(task, 10)
        assert "secret" not in other.mailbox_names()
        server.close()
        await server.wait_closed()

    run_closing(main(), owner, other)


@pytest.mark.timeout(60)
def test_a_phone_fetches_only_recent_small_bodies(tmp_path: Path) -> None:
    import datetime as dt

    from crdtmail.peer import BodyPolicy

    maildir = tmp_path / "Maildir"
    write_maildir(maildir, generate_messages(60, seed=6))
    desktop_replica = Replica.init(tmp_path / "desktop")
    desktop_replica.import_path(maildir)
    phone_replica = Replica.init(tmp_path / "phone")
    now = dt.datetime(2026, 11, 15, 12, tzinfo=dt.UTC).timestamp()
    policy = BodyPolicy(newer_than_days=60, max_bytes=20_000, now=now)

    async def main() -> None:
        desktop, phone = Peer(desktop_replica), Peer(phone_replica, bodies=policy)
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        desk_box = desktop.mailbox("default")
        await until(lambda: "default" in phone_replica.mailbox_names()
                    and snapshot(phone.mailbox("default")) == snapshot(desk_box))
        messages = list(desk_box.all_messages())
        wanted = {m.id for m in messages if policy.wants(m.envelope)}
        assert 0 < len(wanted) < len(messages)
        phone_box = phone.mailbox("default")
        await until(lambda: all(phone_box.body(i) is not None for i in wanted))
        await asyncio.sleep(0.3)  # nothing else trickles in afterwards
        assert {m.id for m in messages if phone_box.body(m.id) is not None} == wanted
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


@pytest.mark.timeout(60)
def test_the_dialing_peer_resyncs_both_ways_after_the_server_restarts(tmp_path: Path) -> None:
    desktop_replica, phone_replica = Replica.init(tmp_path / "desktop"), Replica.init(tmp_path / "phone")

    async def main() -> None:
        desktop, phone = Peer(desktop_replica), Peer(phone_replica)
        desk_box = desktop.mailbox("default")
        first = desk_box.add(b"From: a@b\r\nSubject: one\r\nMessage-ID: <one@x>\r\n\r\n1\r\n").message_id
        token = desktop.registry.pair("phone", ["default"])
        server = await desktop.serve()
        port = port_of(server)
        dialer = phone.dial(f"ws://127.0.0.1:{port}/sync", token, ["default"], initial_delay=0.05, max_delay=0.3)
        task = asyncio.create_task(dialer.run())
        await until(lambda: first in {m.id for m in phone.mailbox("default").all_messages()})

        # The desktop goes away; both sides change things meanwhile.
        server.close()
        for session in list(desktop.sessions):
            await session.link.close(1001, "restarting")
        await server.wait_closed()
        second = desk_box.add(b"From: a@b\r\nSubject: two\r\nMessage-ID: <two@x>\r\n\r\n2\r\n").message_id
        phone.mailbox("default").set_flags(first, add=["seen"])
        await asyncio.sleep(0.5)  # the dialer retries while nobody listens
        assert dialer.last_error is not None

        server = await desktop.serve(port=port)
        await until(lambda: second in {m.id for m in phone.mailbox("default").all_messages()}
                    and "\\Seen" in desk_box.message(first).flags)
        assert dialer.connections == 2
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


@pytest.mark.timeout(60)
def test_a_sync_window_keeps_old_shards_off_the_phone(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    write_maildir(maildir, generate_messages(80, seed=8))
    desktop_replica = Replica.init(tmp_path / "desktop")
    desktop_replica.import_path(maildir)
    phone_replica = Replica.init(tmp_path / "phone")

    async def main() -> None:
        desktop, phone = Peer(desktop_replica), Peer(phone_replica, oldest_shard="2026-09")
        token = desktop.registry.pair("phone", ["default"])
        server = await desktop.serve()
        dialer = phone.dial(f"ws://127.0.0.1:{port_of(server)}/sync", token, ["default"], initial_delay=0.05)
        task = asyncio.create_task(dialer.run())
        await phone.wait_synced("default", timeout=15)
        desk_box = desktop.mailbox("default")
        recent = {m.id for m in desk_box.all_messages() if m.shard >= "2026-09" and m.shard != "undated"}
        phone_box = phone.mailbox("default")
        await until(lambda: {m.id for m in phone_box.all_messages()} == recent)
        assert all(name == "index" or name >= "2026-09" for name in phone_box.document_names())
        old = next(m for m in desk_box.all_messages() if m.shard < "2026-09")
        desk_box.set_flags(old.id, add=["flagged"])  # a change to an old shard does not reach the phone
        newest = max(recent, key=lambda i: desk_box.message(i).envelope.date or 0)
        desk_box.set_flags(newest, add=["$Later"])
        await until(lambda: "$Later" in phone_box.message(newest).flags)
        assert all(name == "index" or name >= "2026-09" for name in phone_box.document_names())
        # The user scrolls back: the old month is fetched on demand, stored whole and listed by itself.
        listed: list[frozenset[str]] = []
        phone_box.observe(lambda change: listed.append(change.added) if change.added else None)
        assert phone.request_shard("default", old.shard) == 1
        await until(lambda: old.shard in phone_box.document_names() and not phone_box.unindexed_shards())
        assert old.id in set().union(*listed)
        assert "\\Flagged" in phone_box.message(old.id).flags
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


def test_lacking_blobs_asks_the_store_in_bulk_and_keeps_order(tmp_path: Path) -> None:
    replica = Replica.init(tmp_path / "peer")
    try:
        peer = Peer(replica)
        box = peer.mailbox("default")
        held = [box.add(make_raw(f"held {n}")).message_id for n in range(3)]
        hashes = [box.message(message_id).envelope.body_sha256 for message_id in held]
        absent = [f"{n:064x}" for n in range(600)]  # more than one look-up's worth
        asked = [absent[0], hashes[0], *absent[1:], hashes[1], absent[0], "", hashes[2]]
        assert peer.lacking_blobs(asked) == absent
        assert all(peer.has_blob(h) for h in hashes) and not peer.has_blob(absent[5])
        assert peer.missing_body_sizes("default") == {}
    finally:
        replica.close()


@pytest.mark.timeout(60)
def test_a_body_answered_missing_is_asked_for_again(tmp_path: Path) -> None:
    from crdtmail.model.backend import CommitBatch

    desktop_replica = Replica.init(tmp_path / "desktop")
    desk_box = desktop_replica.mailbox("default", create=True)
    raws = [make_raw(f"body {n}") for n in range(3)]
    ids = [desk_box.add(raw).message_id for raw in raws]
    late = desk_box.message(ids[0]).envelope.body_sha256
    # The desktop cannot give this body at first (its file was being moved by a mail client, say).
    desktop_replica.store.delete_blobs([late])
    phone_replica = Replica.init(tmp_path / "phone")

    async def main() -> None:
        desktop, phone = Peer(desktop_replica), Peer(phone_replica, bodies=True)
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        await until(lambda: any(late in s.missing_answers for s in phone.sessions))
        phone_box = phone.mailbox("default")
        assert phone_box.body(ids[0]) is None and phone_box.body(ids[1]) == raws[1]
        desktop_replica.store.backend("").commit(CommitBatch(blobs={late: raws[0]}))  # the file is found again
        await until(lambda: phone_box.body(ids[0]) == raws[0])
        assert all(not s.missing_answers for s in phone.sessions)
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


def desktop_and_new_phone(tmp_path: Path, subject: str, count: int) -> tuple[Replica, Mailbox, list[str], Replica]:
    """A desktop replica holding ``count`` messages (their ids returned) and an empty phone replica."""
    desktop_replica = Replica.init(tmp_path / "desktop")
    desk_box = desktop_replica.mailbox("default", create=True)
    ids = [desk_box.add(make_raw(f"{subject} {n}")).message_id for n in range(count)]
    return desktop_replica, desk_box, ids, Replica.init(tmp_path / "phone")


def remote_commits_and_updates(box: Mailbox) -> tuple[list[int], list[str]]:
    """Lists that fill as ``box`` commits remote changes (how many messages each changed) and announces updates
    (their documents)."""
    commits: list[int] = []
    announced: list[str] = []
    box.observe(lambda change: commits.append(len(change.changed)) if not change.is_local else None)
    box.observe_updates(lambda document, update, origin: announced.append(document))
    return commits, announced


@pytest.mark.timeout(60)
def test_a_burst_of_updates_is_applied_under_few_commits_and_converges(tmp_path: Path) -> None:
    """Updates that arrive together are applied under one commit (and relayed at it), not one commit each; the
    result is the same, and every update is still announced on its own."""
    desktop_replica, desk_box, ids, phone_replica = desktop_and_new_phone(tmp_path, "burst", 20)

    async def main() -> None:
        desktop, phone = Peer(desktop_replica, bodies=False), Peer(phone_replica, bodies=False)
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        phone_box = phone.mailbox("default")
        await until(lambda: any("default" in s.synced for s in phone.sessions))
        commits, announced = remote_commits_and_updates(phone_box)
        # One synchronous burst: every frame is on the socket before the phone's side of the loop runs.
        for message_id in ids:
            desk_box.set_flags(message_id, add=["flagged"])
        await until(lambda: sum(commits) == len(ids))
        assert len(commits) < len(ids)  # batched: fewer commits than updates
        assert len(announced) == len(ids)
        assert snapshot(phone_box) == snapshot(desk_box)
        assert all(phone_box.message(m).flags == {"\\Flagged"} for m in ids)
        await hang_up(dialer, task, phone, server)

    asyncio.run(main())
    # The commits were durable: a fresh open sees every flag.
    phone_replica.close()
    with Replica.open(tmp_path / "phone") as reopened:
        box = reopened.mailbox("default")
        assert all(box.message(m).flags == {"\\Flagged"} for m in ids)
    desktop_replica.close()


@pytest.mark.timeout(60)
def test_a_peer_writes_the_changes_peers_send_by_itself_in_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes that arrive one read at a time are applied and passed on at once, and written later in one group
    (GROUP_COMMIT_SECONDS, long here so the group is certain), by the peer itself: nothing reads its listing."""
    monkeypatch.setattr(peer_module, "GROUP_COMMIT_SECONDS", 0.5)
    desktop_replica, desk_box, ids, phone_replica = desktop_and_new_phone(tmp_path, "group", 10)

    async def main() -> None:
        desktop, phone = Peer(desktop_replica, bodies=False), Peer(phone_replica, bodies=False)
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        phone_box = phone.mailbox("default")
        await until(lambda: any("default" in s.synced for s in phone.sessions))
        await until(lambda: not phone_box.has_deferred_writes)  # the sync's own remote changes, if any
        commits, announced = remote_commits_and_updates(phone_box)
        for message_id in ids:
            desk_box.set_flags(message_id, add=["flagged"])
            await asyncio.sleep(0.005)  # a read of its own for each
        await until(lambda: len(announced) == len(ids))
        assert commits == [] and phone_box.has_deferred_writes  # applied and passed on; not written yet
        await until(lambda: sum(commits) == len(ids))
        assert len(commits) < len(ids) and not phone_box.has_deferred_writes
        stored = phone_replica.store.backend("default")
        for document in phone_box.loaded_shards():
            assert decode_state_vector(stored.state_vector(document) or b"\x00") == decode_state_vector(
                phone_box.document_state_vector(document))
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)
    with Replica.open(tmp_path / "phone") as reopened:
        box = reopened.mailbox("default")
        assert all(box.message(m).flags == {"\\Flagged"} for m in ids)


@pytest.mark.timeout(60)
def test_a_fresh_phone_lists_the_shards_of_its_first_sync_by_itself(tmp_path: Path) -> None:
    """An initial sync stores each shard as it arrives; the peer then builds their listing rows in the
    background, newest month first, and tells observers of every message it listed, with the link as origin."""
    desktop_replica = Replica.init(tmp_path / "desktop")
    desk_box = desktop_replica.mailbox("default", create=True)
    ids = [desk_box.add(make_raw(f"month {n}", date=f"02 {month} 2026 10:00:00 +0000")).message_id
           for n, month in enumerate(["Sep", "Oct", "Nov"] * 4)]
    phone_replica = Replica.init(tmp_path / "phone")

    async def main() -> None:
        desktop, phone = Peer(desktop_replica, bodies=False), Peer(phone_replica, bodies=False)
        phone_box = phone.mailbox("default")
        listed: list[tuple[frozenset[str], object]] = []
        phone_box.observe(lambda change: listed.append((change.added, change.origin)) if change.added else None)
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        await until(lambda: any("default" in s.synced for s in phone.sessions) and not phone_box.unindexed_shards())
        assert set().union(*(added for added, _ in listed)) == set(ids)
        session = next(iter(phone.sessions))
        assert all(origin is session.connection for _, origin in listed)
        assert phone_box.loaded_shards() == []  # stored and listed without keeping any shard in memory
        assert phone_box.counts() == desk_box.counts() and phone_box.repair_index() == []
        # Both sides in sync and the listing done: no hold on the allocator is left (its thresholds settled).
        await until(lambda: not phone._indexing and all(s.synced for s in desktop.sessions))
        assert heap.holders() == 0
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


def test_a_first_sync_has_the_heap_for_the_shards_it_lacks_faulted_in_ahead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The phone's session sizes ``heap.prefault`` from the catalog's state vectors of the shards it lacks
    altogether (inside its sync window), and asks for none once it holds them all."""
    desktop_replica = Replica.init(tmp_path / "desktop")
    desk_box = desktop_replica.mailbox("default", create=True)
    for n, month in enumerate(["Sep", "Oct", "Nov"] * 4):
        desk_box.add(make_raw(f"month {n}", date=f"02 {month} 2026 10:00:00 +0000"))
    phone_replica = Replica.init(tmp_path / "phone")
    asked: list[int] = []
    prefault = heap.prefault
    monkeypatch.setattr(heap, "prefault", lambda size: asked.append(size) or prefault(size))
    monkeypatch.setattr(peer_module, "PREFAULT_MIN_BYTES", 1)  # the real floor is megabytes

    async def main() -> None:
        desktop, phone = Peer(desktop_replica, bodies=False), Peer(phone_replica, bodies=False,
                                                                   oldest_shard="2026-10")
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        await phone.wait_synced("default", timeout=15)
        clocks = sum(sum(decode_state_vector(desk_box.document_state_vector(name)).values())
                     for name in ("2026-10", "2026-11"))  # not 2026-09 (outside the window), nor the index
        assert asked == [clocks * peer_module.SHARD_BYTES_PER_CLOCK * peer_module.PREFAULT_PER_SHARD_BYTE]
        await hang_up(dialer, task, phone, server)
        desk_box.set_flags(next(iter(desk_box.all_messages())).id, add=["flagged"])
        server, dialer, task = await phone_dials_desktop(desktop, phone)
        await until(lambda: any(s.synced for s in phone.sessions))
        assert len(asked) == 1  # a resync of what it holds already brings a few changes, not shards
        await hang_up(dialer, task, phone, server)

    run_closing(main(), desktop_replica, phone_replica)


def test_index_now_lists_every_shard_that_arrived_whole(tmp_path: Path) -> None:
    """What `crdtmail sync` does before it exits, where the background listing would be cut short."""
    source = Replica.init(tmp_path / "source")
    box = source.mailbox("default", create=True)
    ids = [box.add(make_raw(f"m{n}", date=f"02 {month} 2026 10:00:00 +0000")).message_id
           for n, month in enumerate(["Oct", "Nov"] * 3)]
    replica = Replica.init(tmp_path / "fresh")
    peer = Peer(replica, bodies=False)
    fresh = peer.mailbox("default")
    for name in box.document_names():
        fresh.apply_update(name, box.encode_document(name), "a link", check_causality=False)
    assert fresh.unindexed_shards() == ["2026-11", "2026-10"]
    assert peer.mailbox_status() == {"default": {"held_updates": 0, "shards_to_list": 2}}
    peer.index_now()
    assert fresh.unindexed_shards() == [] and fresh.loaded_shards() == []
    assert peer.mailbox_status() == {"default": {"held_updates": 0, "shards_to_list": 0}}
    assert {row.message_id for row in fresh.index_rows()} == set(ids)
    replica.close()
    source.close()


@pytest.mark.timeout(60)
def test_a_shard_a_yjs_client_brings_whole_is_stored_and_listed(tmp_path: Path) -> None:
    """The y-websocket endpoint takes a step 2 for a shard this peer lacks as a sync does: stored whole, then
    listed by itself."""
    source = Replica.init(tmp_path / "source")
    source_box = source.mailbox("default", create=True)
    ids = {source_box.add(make_raw(f"y{n}", date="03 Nov 2026 10:00:00 +0000")).message_id for n in range(4)}
    replica = Replica.init(tmp_path / "desktop")

    async def main() -> None:
        peer = Peer(replica, bodies=False)
        box = peer.mailbox("default")
        token = peer.registry.pair("yjs", ["default"])
        server = await peer.serve()
        url = f"ws://127.0.0.1:{port_of(server)}/default/2026-11?token={token}"
        async with connect(url) as websocket:
            await websocket.recv()  # the peer's step 1
            await websocket.send(encode_y_websocket_sync(SyncType.STEP2, source_box.encode_document("2026-11")))
            await until(lambda: "2026-11" in box.document_names() and not box.unindexed_shards())
        assert {row.message_id for row in box.index_rows()} == ids
        server.close()
        await server.wait_closed()

    run_closing(main(), replica, source)


def test_a_peer_that_is_stopping_starts_no_listing(tmp_path: Path) -> None:
    """A session cut off by the peer's shutdown does not start a background listing that would be destroyed
    unfinished with the event loop; the next open lists what is left."""
    source = Replica.init(tmp_path / "source")
    box = source.mailbox("default", create=True)
    box.add(make_raw("stopping", date="02 Nov 2026 10:00:00 +0000"))
    replica = Replica.init(tmp_path / "fresh")
    peer = Peer(replica, bodies=False)
    fresh = peer.mailbox("default")
    for name in box.document_names():
        fresh.apply_update(name, box.encode_document(name), "a link", check_causality=False)

    async def main() -> list[str]:
        started: list[str] = []

        async def session() -> None:
            try:
                await asyncio.sleep(10)
            finally:  # as _Session.run ends
                peer.index_soon("default")
                started.extend(peer._indexing)

        task = asyncio.create_task(session())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        peer.index_soon("default")  # not stopping: this one starts
        started.extend(peer._indexing)
        return started

    assert asyncio.run(main()) == ["default"]
    replica.close()
    with Replica.open(tmp_path / "fresh") as reopened:
        assert reopened.mailbox("default").counts()["inbox"].total == 1
    source.close()


@pytest.mark.timeout(60)
def test_a_serving_peer_sends_each_answer_before_it_loads_the_next(tmp_path: Path) -> None:
    """Step 1s for several shards that arrive in one read are answered one by one: each answer is on its way
    before the next shard is loaded, rather than all of them loaded first (the wait of a big initial sync)."""
    replica = Replica.init(tmp_path / "desktop")
    box = replica.mailbox("default", create=True)
    dates = {"2026-09": "03 Sep 2026 10:00:00 +0000", "2026-10": "03 Oct 2026 10:00:00 +0000",
             "2026-11": "03 Nov 2026 10:00:00 +0000"}
    months = list(dates)
    for month, date in dates.items():
        box.add(make_raw(f"in {month}", date=date))
    assert set(months) <= set(box.document_names())
    order: list[str] = []

    async def main() -> None:
        peer = Peer(replica, bodies=False)
        record_loads(peer.mailbox("default"), order, "load ")
        token = peer.registry.pair("phone", ["default"])
        server = await peer.serve()
        client = SyncConnection(Role.CLIENT)
        async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                           additional_headers={"Authorization": f"Bearer {token}"}, compression=None) as websocket:
            await greet_as_phone(websocket, client)
            session = next(iter(peer.sessions))
            send = session.link.send

            def spy_send(frame: bytes) -> bool:
                order.append("send")
                return send(frame)

            session.link.send = spy_send  # type: ignore[method-assign]
            for month in months:
                client.send_sync_step1("default", month, EMPTY_STATE_VECTOR)
            # All three frames are written before this loop lets the peer read: it gets them in one read.
            for data in client.data_to_send():
                websocket.protocol.send_binary(data)
            websocket.send_data()
            answered: set[str] = set()
            while answered != set(months):
                client.receive_data(await asyncio.wait_for(websocket.recv(), 5))
                answered |= {e.document for e in client.events_received() if isinstance(e, SyncStep2Received)}
        server.close()
        await server.wait_closed()

    run_closing(main(), replica)
    assert order == [step for month in months for step in (f"load {month}", "send")]


@pytest.mark.timeout(60)
def test_a_serving_peer_loads_the_next_shard_only_once_the_last_answer_is_read(tmp_path: Path) -> None:
    """While a link has more than ``write_ahead_bytes`` unsent, the step 1s it brought wait: a first sync asks
    for every shard at once, and the serving peer holds about one answer in memory, not all of them. Once the
    client reads, every answer arrives, in the order asked."""
    replica = Replica.init(tmp_path / "desktop")
    box = replica.mailbox("default", create=True)
    months = {"2026-09": "Sep", "2026-10": "Oct", "2026-11": "Nov"}
    padding = "x" * 900
    with box.batch():
        for month, name in months.items():
            for n in range(150):  # about 200 KB of envelopes per month
                box.add(make_raw(f"{month} {n} {padding}", date=f"03 {name} 2026 10:00:00 +0000"))
    order: list[str] = []

    async def main() -> None:
        peer = Peer(replica, bodies=False, limits=TransportLimits(write_ahead_bytes=64 * 1024))
        record_loads(peer.mailbox("default"), order)
        token = peer.registry.pair("phone", ["default"])
        server = await peer.serve()
        client = SyncConnection(Role.CLIENT)
        async with connect(f"ws://127.0.0.1:{port_of(server)}/sync", max_size=None,
                           additional_headers={"Authorization": f"Bearer {token}"}, compression=None) as websocket:
            websocket.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            await greet_as_phone(websocket, client)
            session = next(iter(peer.sessions))
            session.link.websocket.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            websocket.transport.pause_reading()  # the phone reads nothing for now
            for month in months:
                client.send_sync_step1("default", month, EMPTY_STATE_VECTOR)
            for data in client.data_to_send():
                await websocket.send(data)
            await asyncio.sleep(0.5)  # the first answer fills the sockets, and more
            assert order == ["2026-09"]
            assert len(session.step1_waiting) == 2
            websocket.transport.resume_reading()
            answered: list[str] = []
            while len(answered) < len(months):
                client.receive_data(await asyncio.wait_for(websocket.recv(), 5))
                answered += [e.document for e in client.events_received() if isinstance(e, SyncStep2Received)]
            assert answered == list(months)
        server.close()
        await server.wait_closed()

    run_closing(main(), replica)
    assert order == list(months)


@pytest.mark.timeout(60)
def test_a_sync_that_never_completes_lets_go_of_the_allocator_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session holds the allocator's large-allocations mode until its SyncComplete, or HEAP_HOLD_SECONDS: a
    peer that never answers does not keep it for as long as the link stays open."""
    monkeypatch.setattr(peer_module, "HEAP_HOLD_SECONDS", 0.3)
    replica = Replica.init(tmp_path / "desktop")
    replica.mailbox("default", create=True).add(make_raw("one"))

    async def main() -> None:
        peer = Peer(replica, bodies=False)
        token = peer.registry.pair("phone", ["default"])
        server = await peer.serve()
        async with connect(f"ws://127.0.0.1:{port_of(server)}/sync",
                           additional_headers={"Authorization": f"Bearer {token}"}) as websocket:
            await greet_as_phone(websocket, SyncConnection(Role.CLIENT))  # and then it says nothing more
            session = next(iter(peer.sessions))
            assert heap.holders() == 1 and not session.synced
            await until(lambda: heap.holders() == 0, timeout=5)
            assert not session.synced and not session.link.closed  # the link itself is not cut
        server.close()
        await server.wait_closed()

    run_closing(main(), replica)


def test_a_background_step_lets_io_that_arrived_during_it_run_first() -> None:
    # The background listing's steps are long: a frame read during one must be handled before the next one.
    # (With asyncio.sleep(0) between the steps, the order was step 0, step 1, io, step 2.)
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        reader, writer = socket.socketpair()
        reader.setblocking(False)

        def readable() -> None:
            reader.recv(16)
            order.append("io")
            loop.remove_reader(reader.fileno())

        loop.add_reader(reader.fileno(), readable)
        try:
            for step in range(3):
                if step == 0:
                    writer.send(b"x")  # arrives while the step below holds the loop
                time.sleep(0.02)
                order.append(f"step {step}")
                await peer_module._after_ready_io()
        finally:
            loop.remove_reader(reader.fileno())
            reader.close()
            writer.close()
        return order

    assert asyncio.run(scenario()) == ["step 0", "io", "step 1", "step 2"]
