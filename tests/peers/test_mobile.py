"""The simulated mobile peer against a desktop peer on real sockets (127.0.0.1, port 0): offline work converges
once online, new mail flows both ways, the sync window keeps old shards off the phone while bodies come on demand,
a flaky link neither loses nor duplicates a change, the models are deterministic, and the command line runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crdtmail.config import RemotePeer
from crdtmail.errors import ConfigError
from crdtmail.model.flags import FLAGGED, SEEN
from crdtmail.model.mailbox import Mailbox
from crdtmail.peer import Peer
from crdtmail.replica import Replica
from crdtmail.sample import DEFAULT_END, generate_messages, write_maildir
from peers._sim import parse_trace
from peers.mobile import (
    MailFactory,
    MobileConfig,
    MobilePeer,
    Period,
    UserModel,
    random_periods,
    read_metrics,
    window_start,
)
from tests.conftest import make_raw

ROOT = Path(__file__).resolve().parents[2]
NOW = DEFAULT_END.timestamp()  # the sample mail ends here: the phone's clock starts here too
WINDOW = "2026-08"  # a 3-month window on 2026-11-15


def view(box: Mailbox, oldest: str | None = None) -> tuple[object, ...]:
    """What a user sees: folders, and each message's folder and flags (only the window's shards if given)."""
    folders = sorted((f.id, f.path) for f in box.folders())
    messages = sorted((m.id, m.folder_id, tuple(sorted(m.flags))) for m in box.all_messages()
                      if oldest is None or (m.shard != "undated" and m.shard >= oldest))
    return folders, messages


def ids(box: Mailbox) -> set[str]:
    return {m.id for m in box.all_messages()}


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


@dataclass
class Desktop:
    peer: Peer
    box: Mailbox
    url: str
    token: str


@contextlib.asynccontextmanager
async def desktop(tmp_path: Path, count: int, seed: int) -> AsyncIterator[Desktop]:
    """A plain crdtmail peer serving a replica imported from a generated Maildir, with the phone paired."""
    maildir = tmp_path / "Maildir"
    write_maildir(maildir, generate_messages(count, seed=seed))
    replica = Replica.init(tmp_path / "desktop")
    replica.import_path(maildir)
    peer = Peer(replica)
    token = peer.registry.pair("phone", ["default"])
    server = await peer.serve()
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/sync"
    try:
        yield Desktop(peer, peer.mailbox("default"), url, token)
    finally:
        for session in list(peer.sessions):
            await session.link.close(1001, "test over")
        server.close()
        await server.wait_closed()
        replica.close()


def phone_config(desk: Desktop, **options: Any) -> MobileConfig:
    settings: dict[str, Any] = dict(remotes=(RemotePeer(desk.url, desk.token, ("default",)),), now=NOW, rate=0.0,
                                    reconnect_initial=0.05, reconnect_max=0.2)
    settings.update(options)
    return MobileConfig(**settings)


@contextlib.asynccontextmanager
async def phone(tmp_path: Path, config: MobileConfig) -> AsyncIterator[MobilePeer]:
    replica = Replica.init(tmp_path / "phone")
    mobile = MobilePeer(replica, config)
    try:
        yield mobile
    finally:
        await mobile.close()
        replica.close()


@pytest.mark.timeout(60)
def test_hundreds_of_offline_actions_converge_once_online(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"

    async def main() -> None:
        async with desktop(tmp_path, 150, seed=11) as desk, phone(tmp_path, phone_config(desk, seed=3,
                                                                                          metrics=metrics)) as mobile:
            box = mobile.mailbox
            await mobile.go_online()
            await until(lambda: view(box) == view(desk.box, WINDOW), "the phone holds the window")
            await mobile.go_offline()
            assert not mobile.peer.sessions

            # Both sides change things while apart.
            window_rows = sorted(r.message_id for r in desk.box.index_rows() if WINDOW <= r.shard < "undated")
            for message_id in window_rows[:4]:
                desk.box.set_flags(message_id, add=["$Desk"])
            desk_mail = desk.box.add(make_raw("from the desktop", date="Sat, 14 Nov 2026 10:00:00 +0000")).message_id
            desk_before = view(desk.box)
            actions = [mobile.act() for _ in range(300)] + [mobile.act("create_folder") for _ in range(2)]

            kinds = Counter(action.kind for action in actions)
            for kind in ("read", "move", "delete", "expunge", "deliver", "create_folder"):
                assert kinds[kind] > 0, kinds
            assert kinds["flag"] + kinds["unflag"] > 0
            assert all(action.error is None for action in actions)
            await asyncio.sleep(0.3)
            assert view(desk.box) == desk_before, "something went out while the phone was offline"
            assert mobile.stats.changes_sent == 0
            # One local commit per action that changed something, each waiting for the next sync.
            assert mobile.stats.changes_queued == sum(action.changed for action in actions) > 150

            await mobile.go_online()
            await until(lambda: view(box) == view(desk.box, WINDOW), "phone and desktop converge", timeout=30)
            assert all("$Desk" in box.message(i).flags for i in window_rows[:4])
            assert desk_mail in ids(box)
            delivered = {a.message_id for a in actions if a.kind == "deliver" and a.message_id is not None}
            expunged = {a.message_id for a in actions if a.kind == "expunge" and a.message_id is not None}
            assert delivered and expunged
            assert not expunged & ids(desk.box)
            assert delivered <= ids(desk.box) | expunged
            # The desktop fetched the body of every message delivered to the phone (and still there).
            await until(lambda: all(desk.box.body(i) == box.body(i) for i in delivered - expunged),
                        "the desktop has the bodies of the phone's new mail")
            created = {a.folder for a in actions if a.kind == "create_folder"}
            assert created <= {f.path for f in desk.box.folders()}
            await until(lambda: mobile.unacknowledged == 0, "every change is acknowledged")

        events = read_metrics(metrics)
        assert {"action", "change_queued", "change_acked", "remote_applied", "online", "offline",
                "session_open", "sync_complete", "session_closed"} <= {e["event"] for e in events}
        assert any(e["event"] == "change_acked" and e["how"] == "synced" for e in events)
        assert sum(e["event"] == "action" for e in events) == len(actions)
        assert all(isinstance(e["t"], float) for e in events)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_new_mail_flows_both_ways(tmp_path: Path) -> None:
    async def main() -> None:
        async with desktop(tmp_path, 30, seed=2) as desk, phone(tmp_path, phone_config(desk, seed=9)) as mobile:
            await mobile.go_online()
            assert await mobile.wait_synced(timeout=15)
            arrived = mobile.act("deliver")
            assert arrived.kind == "deliver" and arrived.changed and arrived.message_id
            mail = arrived.message_id
            raw = mobile.mailbox.body(mail)
            assert raw is not None and b"@mobile.example.org>" in raw
            await until(lambda: mail in ids(desk.box), "the phone's new mail is on the desktop")
            await until(lambda: desk.box.body(mail) == raw, "the desktop fetched its body")
            assert desk.box.message(mail).folder_id == "inbox"
            await until(lambda: mobile.unacknowledged == 0, "the new mail's change is acknowledged")
            assert mobile.stats.changes_sent == 1 and mobile.stats.changes_queued == 0

            sent = make_raw("hello phone", date="Sun, 15 Nov 2026 09:00:00 +0000")
            new = desk.box.add(sent).message_id
            await until(lambda: new in ids(mobile.mailbox), "the desktop's new mail is on the phone")
            # Recent and small: the body policy fetches it ahead of time.
            await until(lambda: mobile.mailbox.body(new) == sent, "the phone fetched its body")

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_the_window_keeps_old_shards_off_and_bodies_come_on_demand(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"

    async def main() -> None:
        async with desktop(tmp_path, 200, seed=8) as desk, phone(tmp_path, phone_config(desk, metrics=metrics)) \
                as mobile:
            assert mobile.oldest_shard == WINDOW
            box = mobile.mailbox
            await mobile.go_online()
            await until(lambda: view(box) == view(desk.box, WINDOW), "the phone holds the window")
            everything = list(desk.box.all_messages())
            old = {m.id for m in everything if m.shard == "undated" or m.shard < WINDOW}
            assert old and len(old) < len(everything)
            assert not old & ids(box)
            assert all(name == "index" or WINDOW <= name < "undated" for name in box.document_names())

            policy = mobile.peer.bodies
            in_window = [m for m in everything if m.id not in old]
            wanted = {m.id for m in in_window if policy.wants(m.envelope)}
            unwanted = [m.id for m in in_window if m.id not in wanted]
            assert wanted and len(unwanted) >= 2
            await until(lambda: all(box.body(i) is not None for i in wanted), "the policy's bodies arrived")
            await asyncio.sleep(0.3)
            assert all(box.body(i) is None for i in unwanted), "a body outside the policy was fetched ahead"

            # Opened on the phone: fetched from the desktop on demand, verified, and marked \Seen everywhere.
            body = await mobile.read_message(unwanted[0], timeout=10)
            assert body is not None and body == desk.box.body(unwanted[0])
            await until(lambda: SEEN in desk.box.message(unwanted[0]).flags, "the desktop sees it read")

            # A change to a month outside the window does not reach the phone.
            desk.box.set_flags(sorted(old)[0], add=["$Old"])
            newest = max(wanted, key=lambda i: desk.box.message(i).envelope.date or 0)
            desk.box.set_flags(newest, add=["$New"])
            await until(lambda: "$New" in box.message(newest).flags, "a change in the window reaches the phone")
            assert all(name == "index" or WINDOW <= name < "undated" for name in box.document_names())

            # Offline, a missing body is not available.
            await mobile.go_offline()
            assert await mobile.read_message(unwanted[1], timeout=1) is None
            assert box.body(unwanted[1]) is None

        events = read_metrics(metrics)
        assert any(e["event"] == "body_requested" and e["message_id"] == unwanted[0] for e in events)
        assert any(e["event"] == "body_received" and e["message_id"] == unwanted[0] for e in events)
        assert any(e["event"] == "body_unavailable" and e["message_id"] == unwanted[1] for e in events)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_older_mail_opened_on_the_phone_is_fetched_on_demand(tmp_path: Path) -> None:
    async def main() -> None:
        async with desktop(tmp_path, 200, seed=8) as desk, phone(tmp_path, phone_config(desk)) as mobile:
            box = mobile.mailbox
            await mobile.go_online()
            await until(lambda: view(box) == view(desk.box, WINDOW), "the phone holds the window")
            older = sorted({m.shard for m in desk.box.all_messages() if m.shard != "undated" and m.shard < WINDOW})
            assert older, "the sample has mail older than the window"
            month = older[-1]
            expected = {m.id for m in desk.box.all_messages() if m.shard == month}
            assert not expected & ids(box)
            # The user scrolls past the window: that month arrives, then a message of it opens with its body.
            assert set(await mobile.open_older(month, timeout=10)) == expected
            message_id = sorted(expected)[0]
            body = await mobile.read_message(message_id, timeout=10)
            assert body is not None and body == desk.box.body(message_id)
            await until(lambda: SEEN in desk.box.message(message_id).flags, "the desktop sees it read")
            # From then on that month is kept in step; the other old months still stay off the phone.
            desk.box.set_flags(message_id, add=["$Later"])
            await until(lambda: "$Later" in box.message(message_id).flags, "a change in the opened month arrives")
            assert all(name == "index" or name == month or WINDOW <= name < "undated" for name in box.document_names())
            await mobile.go_offline()
            assert await mobile.open_older(older[0], timeout=1) == []  # offline: nothing to fetch it from

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_a_flaky_link_never_loses_or_duplicates_a_change(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    trace = (Period(True, 1.5), Period(False, 0.6), Period(True, 2.0))

    async def main() -> None:
        async with desktop(tmp_path, 120, seed=5) as desk:
            initial = ids(desk.box)
            config = phone_config(desk, seed=21, rate=80.0, trace=trace, flaky=True, flaky_mean=0.15,
                                  metrics=metrics)
            async with phone(tmp_path, config) as mobile:
                desk_added: set[str] = set()

                async def desktop_user() -> None:
                    # The desktop keeps changing things too, with a keyword the phone's user never touches.
                    rng = random.Random(4)
                    number = 0
                    while True:
                        await asyncio.sleep(0.03)
                        if rng.random() < 0.2:
                            number += 1
                            raw = make_raw(f"desk {number}", message_id=f"<desk-{number}@flaky.test>",
                                           date="Sun, 15 Nov 2026 08:00:00 +0000")
                            desk_added.add(desk.box.add(raw).message_id)
                        else:
                            rows = [r.message_id for r in desk.box.index_rows() if WINDOW <= r.shard < "undated"]
                            desk.box.set_flags(rng.choice(sorted(rows)), add=[f"$Desk{rng.randint(1, 3)}"])

                busy = asyncio.create_task(desktop_user())
                stats = await mobile.run(4.5)
                busy.cancel()
                await asyncio.gather(busy, return_exceptions=True)
                assert stats.online_periods == 2 and stats.offline_periods == 2, stats  # the trace, then stopping
                assert stats.drops >= 3, stats
                # Observed, not just counted: the links really broke and came back.
                assert stats.sessions >= stats.online_periods + 3, stats
                assert stats.total_actions > 100, stats

                # A steady link to finish: everything must meet.
                mobile.flaky_mean = None
                await mobile.go_online()
                box = mobile.mailbox
                await until(lambda: view(box) == view(desk.box, WINDOW), "phone and desktop converge", timeout=30)

                actions = [e for e in read_metrics(metrics) if e["event"] == "action"]
                delivered = {a["message_id"] for a in actions if a["kind"] == "deliver"}
                expunged = {a["message_id"] for a in actions if a["kind"] == "expunge"}
                # Nothing lost, nothing duplicated, nothing resurrected.
                assert ids(desk.box) == (initial | delivered | desk_added) - expunged
                assert ids(box) == {m.id for m in desk.box.all_messages() if WINDOW <= m.shard < "undated"}
                headers = Counter(m.envelope.message_id_header for m in desk.box.all_messages())
                assert all(n == 1 for header, n in headers.items() if header), "a message arrived twice"
                await until(lambda: all(desk.box.body(i) == box.body(i) for i in delivered - expunged),
                            "the desktop has every body delivered to the phone")

                # Every change the phone made holds on the desktop: the last move or delete decides the folder,
                # the last flag or unflag \Flagged, and a read sets \Seen (the desktop touches none of them).
                folder_of: dict[str, str] = {}
                flagged: dict[str, bool] = {}
                read: set[str] = set()
                for action in actions:
                    message_id: str = action.get("message_id", "")
                    if action["kind"] in ("move", "delete"):
                        folder_of[message_id] = action["folder"]
                    elif action["kind"] in ("flag", "unflag"):
                        flagged[message_id] = action["kind"] == "flag"
                    elif action["kind"] == "read":
                        read.add(message_id)
                paths = {f.id: f.path for f in desk.box.folders()}
                for message_id, path in folder_of.items():
                    if message_id not in expunged:
                        assert paths[desk.box.message(message_id).folder_id] == path
                for message_id, state in flagged.items():
                    if message_id not in expunged:
                        assert (FLAGGED in desk.box.message(message_id).flags) is state
                assert all(SEEN in desk.box.message(i).flags for i in read - expunged)
                assert folder_of and flagged and read and expunged

        kinds = {e["event"] for e in read_metrics(metrics)}
        assert {"drop", "change_sent", "change_acked", "remote_applied", "sync_complete"} <= kinds
        acks = Counter(e["how"] for e in read_metrics(metrics) if e["event"] == "change_acked")
        assert acks["flushed"] > 0 and acks["synced"] > 0, acks

    asyncio.run(main())


def _replica_with_sample(path: Path, maildir: Path) -> Replica:
    replica = Replica.init(path)
    replica.import_path(maildir)
    return replica


def test_the_user_model_is_deterministic(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    write_maildir(maildir, generate_messages(80, seed=5))
    runs = []
    for name, seed in (("a", 42), ("b", 42), ("c", 43)):
        with _replica_with_sample(tmp_path / name, maildir) as replica:
            box = replica.mailbox()
            clock = itertools.count(NOW)  # a clock that advances one second per reading, whatever the machine
            user = UserModel(box, seed=seed, clock=functools.partial(next, clock), mail=MailFactory(seed))
            actions = [user.step() for _ in range(250)]
            runs.append((actions, view(box)))
    (first, first_view), (second, second_view), (other, _) = runs
    assert first == second and first_view == second_view
    assert [a.kind for a in first] != [a.kind for a in other]
    assert len({a.kind for a in first}) >= 6
    assert all(a.error is None for a in first)


def test_mail_factory_gives_unique_realistic_messages() -> None:
    factory = MailFactory(7, device="my phone", run=2)
    messages = [factory.make(NOW + n) for n in range(200)]
    headers = [m.split(b"\nMessage-ID: ", 1)[1].split(b"\n", 1)[0] for m in messages]
    assert len(set(headers)) == 200
    assert all(h.startswith(b"<my-phone.2.") for h in headers)
    assert all(m.count(b"\nDate: ") == 1 and m.count(b"Message-ID:") == 1 for m in messages)
    assert MailFactory(7, device="my phone", run=2).make(NOW) == messages[0]
    assert MailFactory(7, device="my phone", run=3).make(NOW) != messages[0]


def test_connectivity_models() -> None:
    first = [p for _, p in zip(range(50), random_periods(random.Random(1), 10.0, 5.0), strict=False)]
    again = [p for _, p in zip(range(50), random_periods(random.Random(1), 10.0, 5.0), strict=False)]
    assert first == again
    assert [p.online for p in first[:4]] == [True, False, True, False]
    online = [p.seconds for p in first if p.online]
    offline = [p.seconds for p in first if not p.online]
    assert sum(online) / len(online) > sum(offline) / len(offline)
    assert next(random_periods(random.Random(1), 10.0, 0.0)) == Period(True, float("inf"))

    periods, repeat = parse_trace("# a commute\nonline 30\n\nOFFLINE 12.5  # tunnel\nonline .5\nrepeat\n")
    assert periods == [Period(True, 30.0), Period(False, 12.5), Period(True, 0.5)] and repeat
    for bad, line in (("online 3\nsideways 2\n", 2), ("online\n", 1), ("online 1\nrepeat\nonline 2\n", 3)):
        with pytest.raises(ConfigError, match=f"line {line}"):
            parse_trace(bad)
    with pytest.raises(ConfigError):
        parse_trace("# nothing\n")

    assert window_start(NOW, 3) == "2026-08"
    assert window_start(NOW, 1) == "2026-10"
    assert window_start(DEFAULT_END.replace(month=2).timestamp(), 3) == "2025-11"


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "peers.mobile", *args]


@pytest.mark.timeout(90)
def test_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trace = tmp_path / "trace.txt"
    trace.write_text("online 1.2\noffline 0.6\nonline 30\n")
    metrics = tmp_path / "metrics.jsonl"

    missing = subprocess.run(_command("--data-dir", str(tmp_path / "p0"), "--desktop", "ws://127.0.0.1:9/sync",
                                      "--token", "t", "--trace", str(tmp_path / "nope.txt")),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert missing.stderr.startswith("crdtmail mobile: error: cannot read the connectivity trace")
    nobody = subprocess.run(_command("--data-dir", str(tmp_path / "p0")), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert nobody.returncode == 1 and "nothing to dial" in nobody.stderr
    bad_rate = subprocess.run(_command("--rate", "fast"), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    assert bad_rate.returncode == 1 and bad_rate.stderr.startswith("crdtmail mobile: error:")

    async def main() -> None:
        async with desktop(tmp_path, 40, seed=6) as desk:
            run = await asyncio.create_subprocess_exec(
                *_command("--data-dir", str(tmp_path / "p1"), "--desktop", desk.url, "--token", desk.token,
                          "--mailbox", "default", "--seed", "3", "--rate", "40", "--duration", "3", "--trace",
                          str(trace), "--flaky", "--flaky-mean", "0.5", "--metrics", str(metrics),
                          "--window-months", "3", "--now", "2026-11-15T12:00:00+00:00"),
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(run.communicate(), 60)
            assert run.returncode == 0, err.decode()
            log = err.decode()
            assert "online" in log and "offline" in log and "sync session 1" in log
            assert b"actions" in out and b"every change is committed" in out
            events = read_metrics(metrics)
            delivered = {e["message_id"] for e in events if e["event"] == "action" and e["kind"] == "deliver"}
            expunged = {e["message_id"] for e in events if e["event"] == "action" and e["kind"] == "expunge"}
            assert delivered
            await until(lambda: delivered - expunged <= ids(desk.box), "the desktop has the phone's new mail")

            refused = await asyncio.create_subprocess_exec(
                *_command("--data-dir", str(tmp_path / "p2"), "--desktop", desk.url, "--token", "wrong",
                          "--duration", "20", "--mean-offline", "0"),
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(refused.communicate(), 60)
            assert refused.returncode == 1
            assert err.decode().strip().splitlines()[-1].startswith("crdtmail mobile: error:")
            assert "refused our device token" in err.decode()

            # Runs until a signal, then stops cleanly.
            forever = await asyncio.create_subprocess_exec(
                *_command("--data-dir", str(tmp_path / "p3"), "--desktop", desk.url, "--token", desk.token,
                          "--mean-offline", "0", "--rate", "20"),
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert forever.stderr is not None
            seen = b""
            while b"in sync with peer" not in seen:
                line = await asyncio.wait_for(forever.stderr.readline(), 30)
                assert line, seen.decode()
                seen += line
            forever.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(forever.communicate(), 30)
            assert forever.returncode == 0
            assert b"every change is committed" in out

    asyncio.run(main())
