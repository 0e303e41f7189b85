"""The WebSocket stacks: pycrdt-websocket (Python), the y-websocket reference stack (Node) and crdtmail itself,
each with and without permessage-deflate, measured interleaved in one run.

Each variant (stack x compression) is three processes on 127.0.0.1: a room server, client A and client B.
A and B join the room ``latency``: A sets ``flags["<id>/\\Seen"] = True`` (a flag change) every
``interval_ms``, noting CLOCK_MONOTONIC just before; B notes it when its map observer sees the key (one clock
for every process on Linux). The one-hop figure is therefore A -> server -> B: these stacks have no
peer-to-peer mode, every change goes through the room server.

Initial sync: A also joins rooms ``sync-<N>`` with a document of N messages loaded (built from
``crdtmail.sample`` the way crdtmail lays out a shard: ``messages`` id -> envelope, ``placement``,
``flags``); B then joins each with a fresh document, repeatedly: the time from dialing until the document
holds N entries, and the bytes (WebSocket payload received after decompression; TCP bytes each way, counted
0.1 s after the sync so that what a client sends right after it, such as an echo, is included).

Client commands (one JSON object per line, answered by one JSON line; ``{"error": ...}`` on failure):
``join`` {url, room, load, observe}, ``set`` {room, keys, interval_ms}, ``take`` {keys, timeout},
``sync`` {url, room, expect}, ``versions``, ``quit``.

Every variant runs its warm-up first; then rounds of ``batch`` samples go to each variant in turn (the order
rotating each round), so a drift of the machine's speed during the run reaches every stack alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.alternatives.procs import Child, ChildError, Children, latency_summary
from crdtmail.errors import CrdtmailError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
NODE_PACKAGES = ["yjs@13.6.33", "y-websocket@3.0.0", "@y/websocket-server@0.1.1", "ws@8.23.0"]
PYCRDT_WEBSOCKET_NOTES = [
    "Start race: of two clients that join a new room at the same moment, the server leaves one unsynced "
    "forever (seen in 8 of 10 trials while this bench was written: the second never gets sync step 2, and "
    "neither sees the other's content). Likely cause: WebsocketServer.start_room calls YRoom.start again "
    "for a client that arrives before the room has set `started`, and that call waits forever on the "
    "room's start lock, which the first start holds for the room's life. Client B is therefore started "
    "only after client A has synced, in every room.",
    "websockets' default max_size (1 MiB) closes the connection on a large sync step 2: both ends here set "
    "max_size to 256 MiB.",
    "Each change costs four messages: the server sends every update to every client of the room, the "
    "sender included, and pycrdt's Provider sends every remote update it applies back to the server (which "
    "applies it as a no-op).",
    "A fresh client sends the whole document back: its Provider re-sends the sync step 2 it applied as an "
    "update, so an initial sync moves the document about twice (initial_sync's wire_bytes_sent).",
    "pycrdt drops a map observer once both the Map object and the Subscription are garbage-collected: the "
    "client keeps them.",
    "pycrdt-websocket's documented setup (websockets.serve) negotiates permessage-deflate by default.",
]
Y_WEBSOCKET_NOTES = [
    "@y/websocket-server 0.1.5 needs yjs ^14.0.0-7, of which only pre-releases are published (the stable "
    "yjs and y-websocket 3 are 13.x): 0.1.1 with yjs 13 is used.",
    "The stock server.js leaves ws's perMessageDeflate at its default (off); this bench's server sets it "
    "from the variant. With context takeover (the default) ws compresses every message, however small: its "
    "1 KiB threshold applies only with no_context_takeover, and zlib runs on libuv's thread pool.",
    "The server sends every update to every connection of the room, the sender included; the client drops "
    "the echo by origin.",
]


CRDTMAIL_NOTES = [
    "crdtmail in the alternatives' topology and rounds: client A and client B are crdtmail peers (each its "
    "own data directory) that dial a serving crdtmail peer, which commits each change and relays it; a room "
    "is a mailbox. A change is a keyword toggled on one of 200 messages; B's time is when its replica has "
    "committed it. crdtmail's own topology, peer to peer, is the suite's one_hop scenario.",
    "Initial sync: a fresh peer (a new data directory) syncs the room's mailbox, an index document and its "
    "month shards, and commits them with their derived listing rows to SQLite before it counts as done.",
    "Messages sharing a Message-ID are one message in crdtmail: the 1,000- and 10,000-message rooms hold 998 "
    "and 9,972 messages (the other stacks' documents give every sample message its own key).",
]


class Unavailable(Exception):
    """A stack that cannot run on this machine (the message says why)."""


# ------------------------------------------------------------------------------------------------ installs


def ensure_pycrdt_websocket() -> dict[str, Any]:
    """Install pycrdt-websocket into this venv if it is missing; raise Unavailable if that fails."""
    if importlib.util.find_spec("pycrdt.websocket") is not None:
        return {"installed_now": False}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
            capture_output=True, text=True, timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"pip install -r {REQUIREMENTS.name} failed: {exc}") from None
    importlib.invalidate_caches()
    if result.returncode != 0 or importlib.util.find_spec("pycrdt.websocket") is None:
        raise Unavailable(f"pip install -r {REQUIREMENTS.name} failed: {result.stderr.strip()[-500:]}")
    return {"installed_now": True}


def ensure_node(work_dir: Path) -> Path:
    """The npm packages of the y-websocket stack in ``work_dir/node`` (installed once); returns that directory."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise Unavailable("node and npm are not on PATH (Debian: apt-get install nodejs npm)")
    directory = work_dir / "node"
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / "installed.json"
    installed = (directory / "node_modules" / "yjs").is_dir() and (directory / "node_modules" / "ws").is_dir()
    if not installed or not stamp.exists() or json.loads(stamp.read_text()) != NODE_PACKAGES:
        (directory / "package.json").write_text(
            json.dumps({"name": "crdtmail-bench-alternatives", "private": True, "type": "module"}))
        try:
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *NODE_PACKAGES],
                cwd=directory, capture_output=True, text=True, timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"npm install failed: {exc}") from None
        if result.returncode != 0:
            raise Unavailable(f"npm install failed: {result.stderr.strip()[-500:]}")
        stamp.write_text(json.dumps(NODE_PACKAGES))
    for script in ("client.mjs", "server.mjs"):
        shutil.copyfile(HERE / "node" / script, directory / script)
    return directory


# ------------------------------------------------------------------------------------------------ documents


def build_document(path: Path, count: int, seed: int = 0) -> dict[str, Any]:
    """Write the pycrdt update of a document holding ``count`` sample messages laid out as a crdtmail shard."""
    if path.exists():
        return {"cached": True, "bytes": path.stat().st_size}
    from pycrdt import Doc, Map

    from crdtmail.sample import generate_messages

    parse_message: Callable[[bytes], Any] | None
    try:
        from crdtmail.model.message import parse_message
    except ImportError:  # pragma: no cover - only if the model moves; the bench then keeps its own envelope
        parse_message = None

    started = time.perf_counter()
    doc: Any = Doc()
    messages, placement, flags = (doc.get(name, type=Map) for name in ("messages", "placement", "flags"))
    with doc.transaction():
        for number, sample in enumerate(generate_messages(count, seed=seed)):
            if parse_message is not None:
                parsed = parse_message(sample.raw)
                message_id, envelope = parsed.message_id, parsed.envelope.to_crdt()
            else:
                message_id = hashlib.sha256(sample.raw).hexdigest()[:22]
                envelope = {"size": len(sample.raw), "body": hashlib.sha256(sample.raw).hexdigest()}
            message_id = f"{message_id}" if message_id not in messages else f"{message_id}.{number}"
            messages[message_id] = envelope
            placement[message_id] = hashlib.sha256("/".join(sample.folder).encode()).hexdigest()[:12]
            for flag in sorted(sample.flags):
                flags[f"{message_id}/{flag}"] = True
        entries = len(messages)
    update = doc.get_update()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(update)
    partial.rename(path)
    return {"cached": False, "bytes": len(update), "entries": entries, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ variants


@dataclass
class Variant:
    """One stack with one compression setting: its server and its two clients."""

    stack: str  # "crdtmail", "pycrdt-websocket" or "y-websocket"
    compression: str  # "none" or "deflate"
    server_argv: list[str]
    client_argv: list[str]
    cwd: Path
    url: str = ""
    a: Child | None = None
    b: Child | None = None
    result: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    lost: int = 0
    syncs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.stack}/{self.compression}"

    def start(self, children: Children, log_dir: Path, documents: dict[int, Path]) -> None:
        """Start the server, then A, then B (after A has synced), and seed the sync rooms."""
        tag = f"{self.stack}-{self.compression}"
        server = children.add(Child(f"{tag}-server", self.server_argv, cwd=self.cwd, log_dir=log_dir))
        self.url = f"ws://127.0.0.1:{server.read(30)['port']}"
        self.a = children.add(Child(f"{tag}-a", self.client_argv, cwd=self.cwd, log_dir=log_dir))
        self.b = children.add(Child(f"{tag}-b", self.client_argv, cwd=self.cwd, log_dir=log_dir))
        self.result["versions"] = self.a.request(cmd="versions", wait=30)
        joined_a = self.a.request(cmd="join", url=self.url, room="latency", load=None, observe=False, wait=60)
        joined_b = self.b.request(cmd="join", url=self.url, room="latency", load=None, observe=True, wait=60)
        self.result["compression_requested"] = self.compression
        self.result["negotiated_extensions"] = {"a": joined_a["extensions"], "b": joined_b["extensions"]}
        self.result["permessage_deflate_negotiated"] = all(
            "permessage-deflate" in joined["extensions"] for joined in (joined_a, joined_b))
        # A change must get through before anything is measured.
        self.a.request(cmd="set", room="latency", keys=["prime/\\Seen"], interval_ms=0, wait=30)
        if self.b.request(cmd="take", keys=["prime/\\Seen"], timeout=15, wait=30)["times"][0] is None:
            raise ChildError(f"{self.label}: a change from A never reached B")
        for count, path in documents.items():
            joined = self.a.request(cmd="join", url=self.url, room=f"sync-{count}", load=str(path), observe=False,
                                    wait=120)
            if joined["entries"] != count:
                raise ChildError(f"{self.label}: A loaded {joined['entries']} of {count} entries")
            # The server has the document once a fresh client receives all of it (not measured).
            for _attempt in range(20):
                got = self.b.request(cmd="sync", url=self.url, room=f"sync-{count}", expect=count, wait=300)
                if got["entries"] == count:
                    break
                time.sleep(0.25)
            else:
                raise ChildError(f"{self.label}: the server never held all {count} entries")

    def changes(self, keys: list[str], interval_ms: float) -> tuple[list[float], int]:
        """A sets the keys; B's observation times: the latencies in ms and how many never arrived."""
        assert self.a is not None and self.b is not None
        sent = self.a.request(cmd="set", room="latency", keys=keys, interval_ms=interval_ms,
                              wait=60 + len(keys) * interval_ms / 100)["times"]
        seen = self.b.request(cmd="take", keys=keys, timeout=10, wait=30)["times"]
        latencies = [(r - s) / 1e6 for s, r in zip(sent, seen, strict=True) if r is not None]
        return latencies, sum(1 for r in seen if r is None)

    def sync(self, count: int) -> dict[str, Any]:
        assert self.b is not None
        return self.b.request(cmd="sync", url=self.url, room=f"sync-{count}", expect=count, wait=300)


def _sync_summary(runs: list[dict[str, Any]], count: int) -> dict[str, Any]:
    if not runs:
        return {"runs": 0}
    seconds = sorted(run["seconds"] for run in runs)
    last = runs[-1]
    return {
        "entries": count,
        "runs": len(runs),
        "median_s": seconds[len(seconds) // 2],
        "min_s": seconds[0],
        "max_s": seconds[-1],
        "all_s": [run["seconds"] for run in runs],
        "complete": all(run["entries"] == count for run in runs),
        "messages": last.get("messages", count),
        "payload_bytes_received": last["payload_bytes_received"],
        "wire_bytes_received": last["wire_bytes_received"],
        "wire_bytes_sent": last["wire_bytes_sent"],
        "extensions": last["extensions"],
    }


def _rotate(items: list[Variant], by: int) -> list[Variant]:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def run_websocket_stacks(*, quick: bool, work_dir: Path, stacks: tuple[str, ...]) -> dict[str, Any]:
    """Measure the chosen WebSocket stacks (each with and without compression), interleaved."""
    scratch = work_dir / "alternatives"
    log_dir = scratch / "logs"
    samples = 100 if quick else 2000
    batch = 25 if quick else 100
    warmup = 200 if quick else 5000
    interval_ms = 1.0
    sizes = [1000] if quick else [1000, 10_000]
    sync_runs = 3 if quick else 7
    settings = {
        "samples_per_variant": samples, "batch": batch, "warmup_changes": warmup, "interval_ms": interval_ms,
        "initial_sync_sizes": sizes, "initial_sync_runs": sync_runs,
        "hop": "client A -> room server -> client B, three processes on 127.0.0.1",
        "interleaving": f"after each variant's warm-up, rounds of {batch} samples per variant in turn "
                        "(order rotating), then the initial syncs the same way",
    }
    out: dict[str, Any] = {}
    variants: list[Variant] = []
    if "crdtmail" in stacks:
        from bench.alternatives.crdtmail_child import prepare_server

        try:
            server_dir, _token, prepared = prepare_server(scratch, sizes)
            out["crdtmail"] = {"available": True, "prepared": prepared, "notes": CRDTMAIL_NOTES}
            child = [sys.executable, "-m", "bench.alternatives.crdtmail_child"]
            variants += [Variant("crdtmail", mode, [*child, "server", mode, str(server_dir)],
                                 [*child, "client", mode, str(server_dir), str(scratch / "crdtmail-clients")],
                                 REPO) for mode in ("none", "deflate")]
        except (OSError, CrdtmailError) as exc:
            out["crdtmail"] = {"available": False, "why": f"preparing its serving peer failed: {exc}"}
    python = [sys.executable, "-m", "bench.alternatives.pyws_child"]
    if "pycrdt-websocket" in stacks:
        try:
            install = ensure_pycrdt_websocket()
            out["pycrdt-websocket"] = {"available": True, "install": install, "notes": PYCRDT_WEBSOCKET_NOTES}
            variants += [Variant("pycrdt-websocket", mode, [*python, "server", mode], [*python, "client", mode],
                                 REPO) for mode in ("none", "deflate")]
        except Unavailable as exc:
            out["pycrdt-websocket"] = {"available": False, "why": str(exc)}
    if "y-websocket" in stacks:
        try:
            node_dir = ensure_node(work_dir)
            out["y-websocket"] = {"available": True, "notes": Y_WEBSOCKET_NOTES}
            variants += [Variant("y-websocket", mode, ["node", "server.mjs", mode], ["node", "client.mjs", mode],
                                 node_dir) for mode in ("none", "deflate")]
        except Unavailable as exc:
            out["y-websocket"] = {"available": False, "why": str(exc)}
    if not variants:
        return {"settings": settings, "stacks": out}

    documents: dict[int, Path] = {}
    built: dict[str, Any] = {}
    for count in sizes:
        documents[count] = scratch / f"doc-{count}-s0.bin"
        built[str(count)] = build_document(documents[count], count)
    settings["documents"] = built

    with Children() as children:
        live: list[Variant] = []
        for variant in variants:
            try:
                variant.start(children, log_dir, documents)
                live.append(variant)
            except (ChildError, OSError, ValueError, KeyError) as exc:
                variant.error = f"start: {exc}"

        def guarded(variant: Variant, action: Any) -> None:
            try:
                action()
            except (ChildError, OSError, ValueError, KeyError) as exc:
                variant.error = str(exc)
                live.remove(variant)

        # Warm-up: every variant, in chunks, not counted.
        chunk = min(500, warmup)
        for start in range(0, warmup, chunk):
            for variant in list(live):
                keys = [f"warm{start + j:06d}/\\Seen" for j in range(min(chunk, warmup - start))]
                guarded(variant, lambda v=variant, k=keys: v.changes(k, interval_ms))
        # Measured rounds.
        rounds = -(-samples // batch)
        for number in range(rounds):
            for variant in _rotate(list(live), number):
                keys = [f"m{number:03d}x{j:04d}/\\Seen" for j in range(min(batch, samples - number * batch))]

                def measure(v: Variant = variant, k: list[str] = keys) -> None:
                    latencies, lost = v.changes(k, interval_ms)
                    v.latencies_ms += latencies
                    v.lost += lost

                guarded(variant, measure)
        # Initial syncs, interleaved the same way.
        for number in range(sync_runs):
            for variant in _rotate(list(live), number):
                for count in sizes:
                    guarded(variant, lambda v=variant, c=count: v.syncs.setdefault(c, []).append(v.sync(c)))

    for variant in variants:
        stack = out[variant.stack]
        stack.setdefault("versions", variant.result.get("versions"))
        entry: dict[str, Any] = {"ok": variant.error is None, **variant.result}
        entry.pop("versions", None)
        if variant.error is not None:
            entry["error"] = variant.error
        entry["one_hop"] = latency_summary(variant.latencies_ms, variant.lost)
        entry["initial_sync"] = {str(count): _sync_summary(variant.syncs.get(count, []), count) for count in sizes}
        stack.setdefault("variants", {})[variant.compression] = entry
    return {"settings": settings, "stacks": out}
