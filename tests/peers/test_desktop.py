"""Whole desktop peers on real Maildirs and real sockets: two desktops converge, a mail client keeps changing the
Maildir underneath, and the command line runs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from crdtmail.bridges.layout import SUBDIRS, split_name
from crdtmail.config import RemotePeer
from crdtmail.model.message import parse_message
from crdtmail.replica import Replica
from crdtmail.sample import generate_messages, write_maildir
from peers import inotify
from peers.desktop import DesktopPeer
from tests.conftest import make_raw

ROOT = Path(__file__).resolve().parents[2]
MAILDIR_FOLDERS = ("", ".Work", ".Lists")


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def maildir_view(root: Path) -> dict[str, tuple[str, str]]:
    """message id -> (folder dir, flag letters) of every message file; fails on two files of one message.

    A scan that races a rename (the file moved between two directory listings, or away before it was read) is
    taken again: only a message held by two files in a quiet Maildir fails.
    """
    for _ in range(50):
        view = _scan(root)
        if view is not None:
            return view
        time.sleep(0.02)
    duplicates = _scan(root, strict=True)
    raise AssertionError(f"the Maildir never settled: {duplicates}")


def _scan(root: Path, *, strict: bool = False) -> dict[str, tuple[str, str]] | None:
    view: dict[str, tuple[str, str]] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.name.startswith("."))]:
        for sub in SUBDIRS:
            directory = folder / sub
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                try:
                    message_id = parse_message(path.read_bytes()).message_id
                except FileNotFoundError:
                    return None
                info = split_name(path.name)[1] or "" if sub == "cur" else ""
                letters = "".join(sorted(ch for ch in info if ch in "DFPRST"))
                if message_id in view:
                    assert not strict, f"two files hold message {message_id}"
                    return None
                view[message_id] = ("" if folder == root else folder.name, letters)
    return view


class MailClient:
    """What mutt and friends do to a Maildir: read (rename to :2,S), flag, move, delete, receive new mail."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.counter = 0

    def files(self) -> list[Path]:
        return sorted(p for d in MAILDIR_FOLDERS for sub in SUBDIRS for p in (self.root / d / sub).glob("*"))

    def act(self) -> str:
        files = self.files()
        kind = self.rng.choice(["read", "flag", "move", "delete", "deliver"] if files else ["deliver"])
        if kind == "deliver":
            self.counter += 1
            raw = make_raw(f"new mail {self.root.name} {self.counter}", message_id=f"<{self.root.parent.name}"
                                                                                      f"-{self.counter}@client>")
            name = f"{time.time():.0f}.client{self.counter}.{self.root.parent.name}"
            (self.root / "tmp" / name).write_bytes(raw)
            os.rename(self.root / "tmp" / name, self.root / "new" / name)
            return kind
        path = self.rng.choice(files)
        unique, info = split_name(path.name)
        letters = set(info or "") if path.parent.name == "cur" else set()
        try:
            if kind == "read":
                letters.add("S")
                os.rename(path, path.parent.parent / "cur" / f"{unique}:2,{''.join(sorted(letters))}")
            elif kind == "flag":
                letters ^= {"F"}
                os.rename(path, path.parent.parent / "cur" / f"{unique}:2,{''.join(sorted(letters))}")
            elif kind == "move":
                target = self.root / self.rng.choice(MAILDIR_FOLDERS) / "cur"
                os.rename(path, target / f"{unique}:2,{''.join(sorted(letters))}")
            else:
                path.unlink()
        except FileNotFoundError:
            return "raced"  # the bridge renamed it at the same moment, as a real client sees happen
        return kind


async def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def start_desktop(base: Path, stop: asyncio.Event, remotes: list[RemotePeer], *, watcher: str = "watchdog",
                        ) -> tuple[DesktopPeer, Replica, asyncio.Task[None]]:
    replica = Replica.init(base / "data")
    desktop = DesktopPeer(replica, {"default": base / "Maildir"}, rescan_seconds=300.0, watcher=watcher)
    ready = asyncio.Event()
    task = asyncio.create_task(desktop.run(stop, host="127.0.0.1", port=0, remotes=remotes, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    return desktop, replica, task


def view_differences(a: dict[str, object], b: dict[str, object]) -> dict[str, tuple[object, object]]:
    """The messages two Maildir views disagree on: id -> (what A has, what B has), None where absent."""
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def test_two_desktops_converge_after_random_changes_on_both_maildirs(tmp_path: Path) -> None:
    root_a = tmp_path / "a" / "Maildir"
    write_maildir(root_a, generate_messages(60, seed=3))
    for folder in MAILDIR_FOLDERS:
        make_maildir(root_a / folder)
    root_b = make_maildir(tmp_path / "b" / "Maildir")

    async def scenario() -> None:
        stop = asyncio.Event()
        a, replica_a, task_a = await start_desktop(tmp_path / "a", stop, [])
        token = a.peer.registry.pair("b", ["default"])
        url = f"ws://127.0.0.1:{a.port}/sync"
        b, replica_b, task_b = await start_desktop(tmp_path / "b", stop, [RemotePeer(url, token, ("default",), None)])
        try:
            assert await wait_for(lambda: len(maildir_view(root_b)) == len(maildir_view(root_a)) > 0, 60)
            clients = [MailClient(root_a, 1), MailClient(root_b, 2)]
            for _ in range(40):
                for client in clients:
                    client.act()
                await asyncio.sleep(0.02)
            if not await wait_for(lambda: maildir_view(root_a) == maildir_view(root_b), 60):
                differing = view_differences(maildir_view(root_a), maildir_view(root_b))
                raise AssertionError({message_id: (views, [(
                    desk.peer.mailbox("default").rows([message_id]).get(message_id),
                    desk.lanes["default"].bridge.state.primary(message_id),
                    message_id in desk.lanes["default"].bridge.dirty_messages) for desk in (a, b)])
                    for message_id, views in differing.items()})
            view = maildir_view(root_a)
            rows = {r.message_id: r for r in replica_a.mailbox("default").index_rows()}
            assert set(rows) == set(view)
            assert rows == {r.message_id: r for r in replica_b.mailbox("default").index_rows()}
        finally:
            stop.set()
            await asyncio.gather(task_a, task_b)
            replica_a.close()
            replica_b.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("watcher", ["inotify", "watchdog"])  # inotify falls back to watchdog where there is none
def test_mail_client_process_changes_the_maildir_while_it_syncs_with_a_phone(tmp_path: Path, watcher: str) -> None:
    """A separate process acts as the mail client; the phone is a plain replica peer over a socket."""
    root = tmp_path / "desk" / "Maildir"
    write_maildir(root, generate_messages(40, seed=5))
    for folder in MAILDIR_FOLDERS:
        make_maildir(root / folder)
    client_script = (
        "import sys; sys.path.insert(0, sys.argv[3])\n"
        "from pathlib import Path\n"
        "from tests.peers.test_desktop import MailClient\n"
        "import time\n"
        "c = MailClient(Path(sys.argv[1]), int(sys.argv[2]))\n"
        "for _ in range(60):\n"
        "    c.act(); time.sleep(0.01)\n"
    )

    async def scenario() -> None:
        from crdtmail.peer import Peer

        stop = asyncio.Event()
        desk, replica, task = await start_desktop(tmp_path / "desk", stop, [], watcher=watcher)
        assert desk.watcher == (watcher if inotify.available() else "watchdog")
        token = desk.peer.registry.pair("phone", ["default"])
        phone_replica = Replica.init(tmp_path / "phone")
        phone = Peer(phone_replica)
        dialer = phone.dial(f"ws://127.0.0.1:{desk.port}/sync", token, ["default"])
        dial_task = asyncio.create_task(dialer.run())
        try:
            assert await phone.wait_synced("default", timeout=30)
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", client_script, str(root), "7",
                                                           str(ROOT))
            phone_box = phone.mailbox("default")
            rng = random.Random(9)
            for _ in range(30):  # the phone's user, meanwhile
                rows = phone_box.index_rows()
                if rows:
                    row = rng.choice(rows)
                    phone_box.set_flags(row.message_id, add=["\\Flagged"] if rng.random() < 0.5 else [],
                                        remove=[] if rng.random() < 0.5 else ["\\Seen"])
                await asyncio.sleep(0.02)
            assert await process.wait() == 0

            def agreed() -> bool:
                view = maildir_view(root)
                rows = {r.message_id: r for r in phone_box.index_rows()}
                if set(rows) != set(view):
                    return False
                folders = {f.id: f.path for f in phone_box.folders()}
                for message_id, (folder_dir, letters) in view.items():
                    row = rows[message_id]
                    expected_dir = "" if row.folder_id == "inbox" else "." + folders[row.folder_id].replace("/", ".")
                    managed = "".join(sorted(
                        {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "\\Draft": "D", "\\Deleted": "T",
                         "$Forwarded": "P"}[f] for f in row.flags if f in
                        ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted", "$Forwarded")))
                    if (folder_dir, letters) != (expected_dir, managed):
                        return False
                return True

            assert await wait_for(agreed, 60)
        finally:
            dialer.stop()
            for session in list(phone.sessions):
                await session.link.close(1000, "done")
            await asyncio.gather(dial_task, return_exceptions=True)
            stop.set()
            await task
            replica.close()
            phone_replica.close()

    asyncio.run(scenario())


def test_desktop_command_once_and_status(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    write_maildir(root, generate_messages(30, seed=2))
    env = {**os.environ, "CRDTMAIL_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "crdtmail.cli", "desktop", "--maildir", str(root), "--once"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "files" in done.stdout
    status = subprocess.run([sys.executable, "-m", "crdtmail.cli", "status"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "maildir bridge default" in status.stdout and "30 files" in status.stdout
    listing = subprocess.run([sys.executable, "-m", "crdtmail.cli", "ls", "--json", "--limit", "1"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
    message_id = json.loads(listing.stdout)["messages"][0]["id"]
    shown = subprocess.run([sys.executable, "-m", "crdtmail.cli", "show", message_id, "--raw"], cwd=ROOT, env=env,
                           capture_output=True, timeout=60)
    assert shown.returncode == 0 and parse_message(shown.stdout).message_id == message_id  # from the Maildir file
    bad = subprocess.run([sys.executable, "-m", "crdtmail.cli", "desktop", "--maildir", str(tmp_path / "nope"),
                          "--once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "not a Maildir" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_desktop_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    env = {**os.environ, "CRDTMAIL_DATA_DIR": str(tmp_path / "data")}
    process = subprocess.Popen([sys.executable, "-m", "crdtmail.cli", "desktop", "--maildir", str(root), "--port",
                                "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "0 files" in first
        assert "listening on ws://127.0.0.1:" in process.stdout.readline()
        (root / "new" / "1.x.host").write_bytes(make_raw("while running"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = subprocess.run([sys.executable, "-m", "crdtmail.cli", "ls", "--json"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=30)
            if "while running" in status.stdout:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the new file never reached the replica")
        process.terminate()
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopped" in out


def test_desktop_takes_its_maildir_from_the_config(tmp_path: Path) -> None:
    root = tmp_path / "Mail dir"
    write_maildir(root, generate_messages(12, seed=4))
    data = tmp_path / "data"
    env = {**os.environ, "CRDTMAIL_DATA_DIR": str(data)}
    subprocess.run([sys.executable, "-m", "crdtmail.cli", "init"], cwd=ROOT, env=env, check=True, timeout=60,
                   capture_output=True)
    config = data / "config.toml"
    config.write_text(config.read_text().replace('# default = "~/Maildir"', f'default = "{root}"'))
    done = subprocess.run([sys.executable, "-m", "crdtmail.cli", "desktop", "--once"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"maildir {root} -> mailbox default: 12 files" in done.stdout
    config.write_text(config.read_text().replace(f'default = "{root}"', ""))
    missing = subprocess.run([sys.executable, "-m", "crdtmail.cli", "desktop", "--once"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no Maildir to mirror" in missing.stderr
