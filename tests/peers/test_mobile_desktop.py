"""A simulated phone against a real desktop peer on a real Maildir: offline work lands in the Maildir's files, and
mail travels both ways as files and messages."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from crdtmail.config import RemotePeer
from crdtmail.model.message import parse_message
from crdtmail.replica import Replica
from crdtmail.sample import generate_messages, write_maildir
from peers.demo import compare
from peers.desktop import DesktopPeer
from peers.mobile import MobileConfig, MobilePeer
from tests.conftest import make_raw
from tests.peers.test_desktop import wait_for


def test_phone_offline_then_online_converges_with_the_maildir(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    write_maildir(maildir, generate_messages(150, seed=7, start=dt.datetime.now(dt.UTC)))

    async def scenario() -> None:
        desk_replica = Replica.init(tmp_path / "desktop")
        desktop = DesktopPeer(desk_replica, {"default": maildir})
        stop = asyncio.Event()
        ready = asyncio.Event()
        task = asyncio.create_task(desktop.run(stop, host="127.0.0.1", port=0, remotes=[], ready=ready))
        await asyncio.wait_for(ready.wait(), 30)
        token = desktop.peer.registry.pair("phone", ["default"])
        phone_replica = Replica.init(tmp_path / "phone")
        remote = RemotePeer(f"ws://127.0.0.1:{desktop.port}/sync", token, ("default",))
        phone = MobilePeer(phone_replica, MobileConfig(remotes=(remote,), seed=3, rate=0, device="phone"))
        bridge = desktop.lanes["default"].bridge
        try:
            await phone.go_online()
            assert await phone.wait_synced(timeout=30)
            await phone.go_offline()
            kinds: dict[str, int] = {}
            delivered: list[str] = []
            for _ in range(250):  # offline: every action commits on the phone only
                action = phone.act()
                kinds[action.kind] = kinds.get(action.kind, 0) + 1
                if action.kind == "deliver" and action.message_id:
                    delivered.append(action.message_id)
            assert len(kinds) >= 5 and delivered, kinds
            # Meanwhile new mail reaches the desktop's Maildir, the way a delivery agent writes it.
            now = dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
            raw = make_raw("delivered to the desktop", date=now)
            (maildir / "tmp" / "9.new.desk").write_bytes(raw)
            (maildir / "tmp" / "9.new.desk").rename(maildir / "new" / "9.new.desk")
            desk_mail = parse_message(raw).message_id
            await phone.go_online()

            def agreed() -> bool:
                return not bridge.pending() and not compare(desktop.peer.mailbox("default"), bridge, [phone])

            assert await wait_for(agreed, 60), compare(desktop.peer.mailbox("default"), bridge, [phone])
            assert desk_mail in {r.message_id for r in phone.mailbox.index_rows()}
            on_desktop = {r.message_id for r in desktop.peer.mailbox("default").index_rows()}
            phone_mail = [m for m in delivered if m in on_desktop]  # some the phone's user expunged again
            assert phone_mail, "mail delivered to the phone reached the desktop"
            for message_id in phone_mail:  # ... as a file in the Maildir, with the phone's bytes
                record = bridge.state.primary(message_id)
                assert record is not None
                assert parse_message(bridge.path(record.file).read_bytes()).message_id == message_id
        finally:
            await phone.close()
            stop.set()
            await task
            phone_replica.close()
            desk_replica.close()

    asyncio.run(scenario())
