"""Property test of the Maildir mirror: two desktops, each a real Maildir with its bridge and replica, take random
changes on both sides of both bridges, with bridge passes, replica syncs and restarts at random points in between:
mail delivered, copied, renamed, moved and removed, and folder directories made, renamed and removed, by "other
programs"; flags, moves, expunges, imports and folders created, renamed and deleted in the replicas.

After every link is healed, the contract of DESIGN.md must hold on disk, not only in the replicas:
- both replicas list the same messages with the same folders and flags (convergence);
- exactly the messages delivered and never expunged are visible (no lost mail, no resurrection, no duplicate);
- each Maildir holds exactly one file per visible message, in its folder's directory, carrying its flags' letters,
  and nothing else outside the expunged area;
- every file a program delivered is still somewhere in its Maildir (the expunged area included) unless that
  program removed it itself: the bridge never unlinks mail.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtmail.bridges.layout import MaildirFile, folder_dir_for_path, letters_for_flags, split_name
from crdtmail.bridges.maildir import EXPUNGED_AREA
from crdtmail.errors import FolderNotEmptyError
from crdtmail.model.flags import ANSWERED, FLAGGED, SEEN
from crdtmail.model.message import parse_message
from tests.bridges.test_maildir import Desk, exchange, make_maildir
from tests.conftest import make_raw

FLAG_LETTERS = "FRSa"  # letters another program may toggle: \Flagged, \Answered, \Seen, a Dovecot keyword
REPLICA_FLAGS = (SEEN, FLAGGED, ANSWERED)

KINDS = (
    "deliver", "deliver_copy", "rename_flags", "move_file", "unlink",  # other programs, in the Maildir
    "make_dir", "rename_dir", "remove_dir",
    "set_flags", "move", "expunge", "import",  # the user, through a replica
    "create_folder", "rename_folder", "delete_folder",
    "full_pass", "quick_pass", "sync", "restart",  # the bridge and the peers
)


@dataclass
class World:
    """Two desktops and what the test did to them: the model the end state is checked against."""

    desks: list[Desk]
    raws: dict[str, bytes] = field(default_factory=dict)  # message id -> the mail's bytes
    expunged: set[str] = field(default_factory=set)
    # per desk: the unique part of each file name a program delivered there -> its message id
    delivered: list[dict[str, str]] = field(default_factory=lambda: [{}, {}])
    removed: list[set[str]] = field(default_factory=lambda: [set(), set()])  # per desk: unique parts it removed
    # per desk: what a file-system watcher would have reported since the last pass (paths; folders changed)
    events: list[list[str]] = field(default_factory=lambda: [[], []])
    folder_events: list[bool] = field(default_factory=lambda: [False, False])
    counter: int = 0


def _files(desk: Desk) -> list[tuple[MaildirFile, str | None]]:
    """Every mail file outside the expunged area, with the message the bridge has it recorded as (None: not yet)."""
    found = []
    for folder_dir in desk.bridge.folder_dirs():
        for file in desk.bridge.list_files(folder_dir):
            record = desk.bridge.state.records.get(file.uid)
            found.append((file, record.message_id if record is not None else None))
    return sorted(found, key=lambda item: desk.bridge.path_text(item[0]))


_T = TypeVar("_T")


def _pick(items: list[_T], selector: int) -> _T | None:
    return items[selector % len(items)] if items else None


def _apply(world: World, kind: str, which: int, selector: int) -> None:
    desk = world.desks[which]
    if kind == "deliver":
        world.counter += 1
        raw = make_raw(f"mail {world.counter}", message_id=f"<p{world.counter}.{selector}@prop.example>")
        message_id = parse_message(raw).message_id
        world.raws[message_id] = raw
        folder_dir = _pick(desk.bridge.folder_dirs(), selector)
        assert folder_dir is not None
        sub = "new" if selector // 2 % 2 else "cur"
        unique = f"{world.counter}.d{which}.prop"
        name = unique + ("" if sub == "new" else ":2," + "S" * (selector // 4 % 2))
        world.events[which].append(str(desk.deliver(raw, folder_dir=folder_dir, sub=sub, name=name)))
        world.delivered[which][unique] = message_id
    elif kind == "import":
        # Mail that reaches the replica first (`crdtmail import`, or a peer without a Maildir): the bridge
        # delivers its file from the blob store.
        world.counter += 1
        raw = make_raw(f"imported {world.counter}", message_id=f"<i{world.counter}.{selector}@prop.example>")
        folders = desk.box.folders()
        added = desk.box.add(raw, folder=folders[selector % len(folders)].id)
        world.raws[added.message_id] = raw
    elif kind == "deliver_copy":
        # The same mail received independently by this desktop too (mbsync of a second account, say), before it
        # has anything of it: no row, no file.
        known = {row.message_id for row in desk.box.index_rows()}
        on_disk = {message_id for _, message_id in _files(desk)}
        candidate = _pick(sorted(set(world.raws) - known - on_disk - set(world.delivered[which].values())), selector)
        if candidate is None:
            return
        world.counter += 1
        unique = f"{world.counter}.c{which}.prop"
        world.events[which].append(str(desk.deliver(
            world.raws[candidate], folder_dir=_pick(desk.bridge.folder_dirs(), selector) or "", sub="cur",
            name=unique + ":2,")))
        world.delivered[which][unique] = candidate
    elif kind in ("rename_flags", "move_file", "unlink"):
        files = _files(desk)
        if kind == "unlink":
            # Only a file the bridge has seen: removing one it never saw is not a change to the mailbox.
            counts: dict[str, int] = {}
            for _, recorded in files:
                if recorded is not None:
                    counts[recorded] = counts.get(recorded, 0) + 1
            files = [(file, mid) for file, mid in files if mid is not None and counts[mid] == 1]
        picked = _pick(files, selector)
        if picked is None:
            return
        file, recorded = picked
        path = desk.bridge.path(file)
        if kind == "unlink":
            path.unlink()
            world.events[which].append(str(path))
            world.removed[which].add(split_name(file.name)[0])
            assert recorded is not None
            world.expunged.add(recorded)
        elif kind == "rename_flags":
            unique, info = split_name(file.name)
            letters = set(info or "")
            letters ^= {FLAG_LETTERS[selector // 2 % len(FLAG_LETTERS)]}
            target_dir = path.parent.parent / "cur"
            new_path = target_dir / f"{unique}:2,{''.join(sorted(letters))}"
            path.rename(new_path)
            world.events[which] += [str(path), str(new_path)]
        else:
            target = _pick([d for d in desk.bridge.folder_dirs() if d != file.folder_dir], selector)
            if target is None:
                return
            new_path = make_maildir(desk.root / target) / file.sub / file.name
            path.rename(new_path)
            world.events[which] += [str(path), str(new_path)]
    elif kind == "make_dir":
        world.counter += 1
        make_maildir(desk.root / f".Dir{world.counter}")
        world.folder_events[which] = True
    elif kind == "rename_dir":
        user_dirs = [d for d in desk.bridge.folder_dirs() if d.startswith((".Dir", ".Folder", ".Work", ".Renamed"))]
        source = _pick(user_dirs, selector)
        if source is None:
            return
        world.counter += 1
        (desk.root / source).rename(desk.root / f".Dir{world.counter}")
        world.folder_events[which] = True
    elif kind == "remove_dir":
        # `rm -r` of a folder directory whose every file the bridge has seen, each the only file of its message:
        # its messages are expunged, and its folder deleted.
        files = _files(desk)
        per_message: dict[str | None, int] = {}
        for _, recorded in files:
            per_message[recorded] = per_message.get(recorded, 0) + 1
        removable = [d for d in desk.bridge.folder_dirs() if d.startswith((".Dir", ".Folder", ".Work", ".Renamed"))
                     and all(recorded is not None and per_message[recorded] == 1
                             for file, recorded in files if file.folder_dir == d)]
        doomed = _pick(removable, selector)
        if doomed is None:
            return
        for file, recorded in files:
            if file.folder_dir == doomed:
                assert recorded is not None
                world.removed[which].add(split_name(file.name)[0])
                world.expunged.add(recorded)
        shutil.rmtree(desk.root / doomed)
        world.folder_events[which] = True
    elif kind in ("create_folder", "rename_folder", "delete_folder"):
        world.counter += 1
        if kind == "create_folder":
            # A third of them inside a folder of the user's: "Work/Folder7" is the directory ".Work.Folder7".
            parent = _pick([f for f in desk.box.folders() if f.role is None], selector) if selector % 3 == 0 else None
            desk.box.create_folder(f"{parent.path}/Folder{world.counter}" if parent else f"Folder{world.counter}")
            return
        folder = _pick([f for f in desk.box.folders() if f.role is None], selector)
        if folder is None:
            return
        if kind == "rename_folder":
            desk.box.rename_folder(folder.id, f"Renamed{world.counter}")
        else:
            with contextlib.suppress(FolderNotEmptyError):  # refused, as the user is told: nothing changes
                desk.box.delete_folder(folder.id, move_to_trash=bool(selector % 2))
    elif kind in ("set_flags", "move", "expunge"):
        row = _pick(desk.box.index_rows(), selector)
        if row is None:
            return
        if kind == "set_flags":
            flag = REPLICA_FLAGS[selector // 3 % len(REPLICA_FLAGS)]
            if flag in row.flags:
                desk.box.set_flags(row.message_id, remove=[flag])
            else:
                desk.box.set_flags(row.message_id, add=[flag])
        elif kind == "move":
            destination = _pick([f for f in desk.box.folders() if f.id != row.folder_id], selector)
            if destination is not None:
                desk.box.move(row.message_id, destination.id)
        else:
            desk.box.expunge(row.message_id)
            world.expunged.add(row.message_id)
    elif kind == "full_pass":
        desk.full()
        world.events[which], world.folder_events[which] = [], False
    elif kind == "quick_pass":
        # As a running peer does it: the paths its watcher reported, and a full pass when the bridge asks for one.
        _, needs_full = desk.bridge.quick_pass(world.events[which], folders_changed=world.folder_events[which])
        world.events[which], world.folder_events[which] = [], False
        if needs_full:
            desk.full()
    elif kind == "restart":
        world.desks[which] = _restarted(desk)
        world.events[which], world.folder_events[which] = [], False  # the watcher's queue went with the process
    else:
        _sync(world)


def _restarted(desk: Desk) -> Desk:
    """The desktop peer stopped and started again: what it knows comes back from its store and its Maildir."""
    desk.bridge.close()
    desk.replica.close()
    return Desk(desk.root.parent, existing=True)


def _sync(world: World) -> None:
    """What two connected desktop peers do: documents both ways, then the bodies each one lacks."""
    first, second = world.desks
    exchange(first.box, second.box)
    for taker, giver in ((first, second), (second, first)):
        for sha256 in list(taker.bridge.waiting_bodies):
            body = giver.bridge.read_body(sha256) or giver.replica.store.backend("").get_blob(sha256)
            if body is not None:
                taker.bridge.take_body(sha256, body)


def _heal(world: World) -> None:
    for _ in range(4):
        for desk in world.desks:
            desk.full()
        _sync(world)
    for desk in world.desks:
        desk.full()


def _check(world: World) -> None:
    folders = [sorted(folder.path for folder in desk.box.folders()) for desk in world.desks]
    assert folders[0] == folders[1], "the folders did not converge"
    views = []
    for desk in world.desks:
        rows = desk.box.index_rows()
        assert len({row.message_id for row in rows}) == len(rows)
        views.append({row.message_id: (desk.box.folder(row.folder_id).path, row.flags) for row in rows})
    assert views[0] == views[1], "the replicas did not converge"
    visible = set(views[0])
    assert visible == set(world.raws) - world.expunged, "a message was lost or came back"
    for which, desk in enumerate(world.desks):
        assert sorted(desk.bridge.folder_dirs()) == sorted(folder_dir_for_path(path) for path in folders[0])
        files: dict[str, list[MaildirFile]] = {}
        for file, message_id in _files(desk):
            assert message_id is not None, f"desk {which}: {file.relative} was never taken in"
            files.setdefault(message_id, []).append(file)
        assert set(files) == visible, f"desk {which}: the Maildir's messages differ from the replica's"
        for message_id, found in files.items():
            assert len(found) == 1, f"desk {which}: {len(found)} files for one message"
            folder_path, flags = views[0][message_id]
            assert found[0].folder_dir == folder_dir_for_path(folder_path)
            assert found[0].letters == letters_for_flags(flags)
            assert desk.bridge.path(found[0]).read_bytes() == world.raws[message_id]
        # Nothing a program delivered is gone unless it removed the file itself.
        everything = [path for path in desk.root.rglob("*") if path.is_file()]
        contents = {path.read_bytes() for path in everything if path.parent.name != "tmp"}
        for unique, message_id in world.delivered[which].items():
            if unique not in world.removed[which]:
                assert world.raws[message_id] in contents, f"desk {which}: the file {unique} delivered there is gone"
        # An expunged message's files are in the expunged area, never unlinked (those the test removed aside).
        area = desk.root / EXPUNGED_AREA
        kept = {path.read_bytes() for path in area.rglob("*") if path.is_file()} if area.exists() else set()
        for message_id in world.expunged - visible:
            had_file = any(mid == message_id and unique not in world.removed[which]
                           for unique, mid in world.delivered[which].items())
            if had_file:
                assert world.raws[message_id] in kept, f"desk {which}: expunged {message_id} not kept"


operations = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 1), st.integers(0, 10_000)), min_size=1, max_size=30)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 1), max_size=4), operations)
def test_two_desktops_converge_on_disk_and_keep_every_file(
    first_mail: list[int], ops: list[tuple[str, int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as base:
        desks = [Desk(Path(base) / name) for name in ("a", "b")]
        world: World | None = None
        try:
            for desk in desks:
                make_maildir(desk.root / ".Work")
                desk.full()
            world = World(desks)
            # Mail both desktops already mirror, for the operations to work on from the first step.
            for which in first_mail:
                _apply(world, "deliver", which, world.counter)
            if first_mail:
                _heal(world)
            for kind, which, selector in ops:
                _apply(world, kind, which, selector)
            _heal(world)
            _check(world)
        finally:
            for desk in world.desks if world is not None else desks:
                desk.bridge.close()
                desk.replica.close()
