"""Crash test: a child commits changes and reports each; it is SIGKILLed at random moments, many times.

After every kill the database must open cleanly (integrity_check ok) and hold every change the child reported,
with its derived row and its body.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from crdtmail.replica import Replica

ROOT = Path(__file__).resolve().parents[2]
KILLS = 16


def _run_and_kill(data_dir: Path, start: int, delay: float) -> list[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.crash_child", str(data_dir), str(start)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    assert child.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    while not lines and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)  # wait for the child to start committing before the clock starts
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    reader.join(timeout=10)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    return lines


def test_every_reported_change_survives_sigkill(tmp_path: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    data_dir = tmp_path / "peer"
    reported_adds: dict[int, str] = {}
    reported_flags: set[str] = set()
    start = 0
    for _ in range(KILLS):
        for line in _run_and_kill(data_dir, start, rng.uniform(0.0, 0.25)):
            kind, n, message_id = line.split()
            if kind == "add":
                reported_adds[int(n)] = message_id
            else:
                reported_flags.add(message_id)
        with Replica.open(data_dir) as replica:
            assert replica.store.integrity_check() == "ok"
            mailbox = replica.mailbox(create=True)
            for n, message_id in reported_adds.items():
                view = mailbox.message(message_id)  # raises if the committed message were lost
                assert view.envelope.subject == f"crash {n}"
                assert mailbox.body(message_id) is not None
                if message_id in reported_flags:
                    assert "\\Seen" in view.flags
            listed = {row.message_id for row in mailbox.list_folder("INBOX", limit=100_000)}
            assert set(reported_adds.values()) <= listed
        start = max(reported_adds, default=-1) + 1
    assert len(reported_adds) >= KILLS  # the child really was killed mid-work, many times over
