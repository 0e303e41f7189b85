"""Property test of the whole sync stack in one process: 3-5 peers, each a Mailbox on the in-memory backend,
joined by sans-I/O protocol connections over in-memory channels.

Links go up and down at random (a link going down loses every frame in flight); peers make random mail and
folder changes all along, and one of them is a device that joins late, from an empty replica. Changes are
relayed peer to peer, so the same update reaches a peer several times and in different orders over different
paths. After every link comes back up and the network goes quiet, every replica must be identical and the
contract of DESIGN.md must hold.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtmail.errors import ExpungedMessageError, ModelError
from crdtmail.model.mailbox import Mailbox, is_document_name
from crdtmail.model.message import parse_message
from crdtmail.protocol.session import HelloReceived, MailboxSource, MailboxSync, Role, SyncConnection, Welcomed
from crdtmail.storage.memory import MemoryBackend
from crdtmail.storage.sqlite import SqliteStore
from tests.conftest import make_raw

POOL = [
    make_raw(f"mesh {n}", message_id=f"<mesh{n}@x>",
             date=f"{n % 3 + 1:02d} {['Sep', 'Oct', 'Nov'][n % 3]} 2026 10:00:00 +0000")
    for n in range(8)
]
IDS = [parse_message(raw).message_id for raw in POOL]
FOLDERS = ["INBOX", "Archive", "Trash", "Work"]
FLAGS = ["\\Seen", "\\Flagged", "$Label"]
RENAMED = ["archive", "sent"]  # standard folders the ops rename
DELETED = "junk"  # and the one they delete


@dataclass(eq=False)
class Node:
    index: int
    mailbox: Mailbox
    syncs: list[MailboxSync] = field(default_factory=list)
    store: SqliteStore | None = None  # a durable peer's database (None: the in-memory backend)

    @classmethod
    def durable(cls, index: int, path: Path) -> Node:
        store = SqliteStore.open(path)
        node = cls(index, Mailbox("m", store.backend("m")), store=store)
        node.mailbox.observe_updates(node.relay)
        return node

    def restarted(self) -> Node:
        """The peer's process stopped and started again: its mailbox comes back from its database alone."""
        assert self.store is not None
        path = self.store.path
        self.store.close()
        return Node.durable(self.index, path)

    def relay(self, document: str, update: bytes, origin: object) -> None:
        # As the peer does it: each update goes on as soon as it is applied, before its commit.
        for sync in list(self.syncs):
            sync.on_update(document, update, origin)


@dataclass(eq=False)
class Link:
    """Both ends of one connection and the frames in flight each way."""

    a: Node
    b: Node
    client: SyncConnection = field(default_factory=lambda: SyncConnection(Role.CLIENT))
    server: SyncConnection = field(default_factory=lambda: SyncConnection(Role.SERVER))
    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    client_sync: MailboxSync | None = None
    server_sync: MailboxSync | None = None

    def open(self) -> None:
        self.client.send_hello(f"p{self.a.index}", ["m"])
        self.collect()

    def collect(self) -> None:
        self.to_server.extend(self.client.data_to_send())
        self.to_client.extend(self.server.data_to_send())

    def _events(self, connection: SyncConnection, node: Node, server_side: bool) -> None:
        for event in connection.events_received():
            if server_side and isinstance(event, HelloReceived):
                connection.welcome(f"p{node.index}", ["m"])
                self.server_sync = self._start(connection, node)
            elif not server_side and isinstance(event, Welcomed):
                self.client_sync = self._start(connection, node)
            sync = self.server_sync if server_side else self.client_sync
            if sync is not None:
                sync.handle(event)

    def _start(self, connection: SyncConnection, node: Node) -> MailboxSync:
        sync = MailboxSync(connection, "m", MailboxSource(node.mailbox, accepts=is_document_name))
        node.syncs.append(sync)
        sync.start()
        return sync

    def deliver(self, count: int) -> int:
        """Move up to ``count`` frames each way, in order; returns how many moved."""
        moved = 0
        for _ in range(count):
            if self.to_server:
                self.server.receive_data(self.to_server.pop(0))
                self._events(self.server, self.b, True)
                moved += 1
            if self.to_client:
                self.client.receive_data(self.to_client.pop(0))
                self._events(self.client, self.a, False)
                moved += 1
            self.collect()
        return moved

    def cut(self) -> None:
        for node, sync in ((self.a, self.client_sync), (self.b, self.server_sync)):
            if sync is not None and sync in node.syncs:
                node.syncs.remove(sync)
        self.to_server.clear()
        self.to_client.clear()


def run(peers: int, ops: list[tuple[str, int, int, int]], seed: int, directory: Path | None = None) -> None:
    """``directory``: each peer keeps its mailbox in a SQLite database there, and ``restart`` ops restart it.

    The last peer is a device that joins late: it has no replica until a ``join`` op (or the heal) creates an
    empty one, and until then it takes part in nothing.
    """
    rng = random.Random(seed)

    def new_node(i: int) -> Node:
        if directory is not None:
            return Node.durable(i, directory / f"p{i}.sqlite3")
        node = Node(i, Mailbox("m", MemoryBackend()))
        node.mailbox.observe_updates(node.relay)
        return node

    late = peers - 1
    nodes: list[Node | None] = [new_node(i) for i in range(late)] + [None]
    links: dict[tuple[int, int], Link] = {}
    last_expunge: dict[str, int] = {}
    last_redeliver: dict[str, int] = {}
    ever_added: set[str] = set()
    folder_changes: dict[str, list[str | None]] = {}  # standard folder id -> its paths set (None: deleted)

    def flush_all() -> None:
        for link in links.values():
            link.collect()

    def link(a: int, b: int) -> None:
        node_a, node_b = nodes[a], nodes[b]
        if node_a is not None and node_b is not None:
            links[(a, b)] = Link(node_a, node_b)
            links[(a, b)].open()

    for step, (name, i, j, k) in enumerate(ops):
        if name == "join" and nodes[late] is None:
            nodes[late] = new_node(late)
        node = nodes[i]
        if node is None:
            continue
        box = node.mailbox
        mid = IDS[j % len(IDS)]
        try:
            if name == "add":
                if box.add(POOL[j % len(POOL)], folder=FOLDERS[k % 3]).added:
                    ever_added.add(mid)
            elif name == "redeliver":
                if box.add(POOL[j % len(POOL)], redeliver=True).added:
                    ever_added.add(mid)
                    last_redeliver[mid] = step
            elif name == "move":
                box.move(mid, FOLDERS[k % len(FOLDERS)])
            elif name == "flag":
                box.set_flags(mid, add=[FLAGS[k % 3]]) if k % 2 else box.set_flags(mid, remove=[FLAGS[k % 3]])
            elif name == "expunge":
                box.expunge(mid)
                last_expunge[mid] = step
            elif name == "mkdir":
                box.create_folder("Work")
            elif name == "rename":
                folder_id = RENAMED[k % len(RENAMED)]
                path = box.rename_folder(folder_id, f"Renamed {step}").path
                folder_changes.setdefault(folder_id, []).append(path)
            elif name == "rmdir":
                box.delete_folder(DELETED, move_to_trash=True)
                folder_changes.setdefault(DELETED, []).append(None)
        except (ModelError, ExpungedMessageError):
            pass
        pair = (min(i, j % peers), max(i, j % peers))
        if name == "up" and pair[0] != pair[1] and pair not in links:
            link(*pair)
        elif name == "down" and pair in links:
            links.pop(pair).cut()
        elif name == "pump" and pair in links:
            links[pair].deliver(k)
        elif name == "restart" and node.store is not None:
            for key in [key for key in links if i in key]:  # its connections ended with its process
                links.pop(key).cut()
            nodes[i] = node.restarted()
        flush_all()

    # Heal: the late device joins if it has not, a chain through every peer plus whatever is up, then pump until
    # nothing moves.
    if nodes[late] is None:
        nodes[late] = new_node(late)
    for a, b in zip(range(peers), range(1, peers), strict=False):
        if (a, b) not in links:
            link(a, b)
    for _ in range(10_000):
        flush_all()
        order = list(links.values())
        rng.shuffle(order)
        if not sum(link.deliver(rng.randint(1, 5)) for link in order):
            break
    else:
        raise AssertionError("the network never went quiet")

    def snapshot(box: Mailbox) -> tuple[object, ...]:
        folders = sorted((f.id, f.path, f.role) for f in box.folders())
        messages = sorted((m.id, m.folder_id, tuple(sorted(m.flags))) for m in box.all_messages())
        return folders, messages, sorted(box.expunged_ids())

    joined = [node for node in nodes if node is not None]
    assert len(joined) == peers
    first = snapshot(joined[0].mailbox)
    for node in joined[1:]:
        assert snapshot(node.mailbox) == first, f"peer {node.index} differs from peer 0"
    for node in joined:
        assert node.mailbox.held_updates() == 0
        # A standard folder changed once, by one peer, is as that peer left it: nothing else wrote it, not even
        # a device that joined later (every new replica once wrote the standard folders, undoing such changes).
        live = {folder.id: folder.path for folder in node.mailbox.folders()}
        for folder_id, changes in folder_changes.items():
            if len(changes) == 1:
                assert live.get(folder_id) == changes[0], f"{folder_id} is not as its one change left it"
        visible = {m.id for m in node.mailbox.all_messages()}
        for mid in visible:
            if mid in last_expunge:
                assert last_redeliver.get(mid, -1) > last_expunge[mid], "an expunged message came back"
        assert ever_added - set(last_expunge) <= visible, "a message that was never expunged is missing"
        # The listing (derived rows, patched change by change) says what the documents say.
        listed = sorted((row.message_id, row.folder_id, row.flags) for row in node.mailbox.index_rows())
        assert listed == sorted((m.id, m.folder_id, tuple(sorted(m.flags))) for m in node.mailbox.all_messages())
    for node in joined:
        if node.store is not None:
            node.store.close()


operation = st.tuples(
    st.sampled_from(["add", "add", "redeliver", "move", "flag", "flag", "expunge", "mkdir", "rename", "rmdir",
                     "join", "up", "up", "down", "pump", "pump", "pump"]),
    st.integers(0, 4),
    st.integers(0, 7),
    st.integers(0, 12),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(peers=st.integers(3, 5), ops=st.lists(operation, min_size=1, max_size=70), seed=st.integers(0, 2**16))
def test_mesh_converges_and_keeps_the_contract(peers: int, ops: list[tuple[str, int, int, int]], seed: int) -> None:
    run(peers, [(name, i % peers, j, k) for name, i, j, k in ops], seed)


durable_operation = st.tuples(
    st.sampled_from(["add", "add", "redeliver", "move", "flag", "flag", "expunge", "mkdir", "rename", "rmdir",
                     "join", "up", "up", "down", "pump", "pump", "pump", "restart"]),
    st.integers(0, 4),
    st.integers(0, 7),
    st.integers(0, 12),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(peers=st.integers(3, 4), ops=st.lists(durable_operation, min_size=1, max_size=70), seed=st.integers(0, 2**16))
def test_durable_mesh_with_restarts_converges_and_lists_what_it_holds(
    peers: int, ops: list[tuple[str, int, int, int]], seed: int
) -> None:
    """The same on SQLite stores, with peers restarting: what each commits is all it has after a restart, and its
    listing rows match its documents at the end."""
    with tempfile.TemporaryDirectory() as directory:
        run(peers, [(name, i % peers, j, k) for name, i, j, k in ops], seed, Path(directory))
