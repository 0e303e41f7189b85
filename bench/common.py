"""Helpers shared by benchmarks: machine facts, child processes with peak RSS, result files."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pycrdt

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / ".work"


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and library versions: what a reader needs to compare figures."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pycrdt": version("pycrdt"),
        "websockets": version("websockets"),
        "platform": platform.platform(),
    }


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, which starts afresh at exec. (ru_maxrss does not: Linux carries a
    forking parent's RSS over into it, so a child of a big parent would report at least the parent's size.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SELF_REPORT = """
import sys, orjson
from bench.common import peak_rss_mb
def report(**figures):
    figures["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write(orjson.dumps(figures).decode() + "\\n")
"""


def python_child(code: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    """Run Python code in a fresh interpreter of this venv; the code calls ``report(**figures)`` once.

    The child measures its own peak RSS (``peak_rss_mb``), so only that process counts.
    """
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", SELF_REPORT + code, *args],
        capture_output=True, text=True, timeout=timeout, cwd=BENCH_DIR.parent,
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    figures: dict[str, Any] = orjson.loads(result.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - started
    return figures


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write a result file bench/results/<date>-<host>-<name>.json and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
    path = RESULTS_DIR / f"{stamp}-{socket.gethostname()}-{name}.json"
    path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return path


def code_fingerprint(tag: str) -> str:
    """What a cached benchmark fixture depends on: ``tag`` (its size, its seed) and crdtmail's source code, so
    that a fixture written by older code is built again."""
    import hashlib

    digest = hashlib.sha256(tag.encode())
    root = BENCH_DIR.parent / "crdtmail"
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ShadowShards:
    """Plain pycrdt copies of a mailbox's shards, to learn which message each update a peer announced changed.

    A peer writes the remote changes of a few milliseconds in one commit, so a commit's time says nothing of when
    each change was applied. While changes flow only times and bytes are noted (``note``); ``replay``, off the
    measured path, applies them in order to the copies, whose flags maps name the keys each changed (an update
    overwriting a flag names only the item it replaces, not the key).
    """

    def __init__(self) -> None:
        self._docs: dict[str, pycrdt.Doc[Any]] = {}
        self._maps: list[pycrdt.Map[Any]] = []  # pycrdt drops a subscription with the map object that made it
        self._keys: list[str] = []
        self._noted: list[tuple[int, str, bytes, bool]] = []  # (applied at, document, update, remote)

    def copy(self, mailbox: Any) -> None:
        """Copy the shards of ``mailbox`` (a crdtmail Mailbox) not copied yet."""
        for name in mailbox.document_names():
            if name != "index" and name not in self._docs:
                doc: pycrdt.Doc[Any] = pycrdt.Doc()
                doc.apply_update(mailbox.encode_document(name))
                flags = doc.get("flags", type=pycrdt.Map)
                flags.observe(lambda event: self._keys.extend(event.keys))
                self._docs[name] = doc
                self._maps.append(flags)

    def note(self, at: int, document: str, update: bytes, *, remote: bool = True) -> None:
        """An update the mailbox announced at ``at`` (local ones keep the copies in step and are not reported)."""
        self._noted.append((at, document, update, remote))

    def replay(self) -> list[tuple[int, str]]:
        """(applied at, message id) per message each remote update noted since the last call changed."""
        changed: list[tuple[int, str]] = []
        for at, document, update, remote in self._noted:
            doc = self._docs.get(document)
            if doc is None:
                continue
            self._keys.clear()
            doc.apply_update(update)
            if remote:
                changed.extend((at, key.partition("/")[0]) for key in self._keys)
        self._noted.clear()
        return changed
