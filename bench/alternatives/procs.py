"""Child processes that answer JSON lines, with timeouts on every read and a stop that always ends them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class ChildError(RuntimeError):
    """A child process failed, answered with an error, or did not answer in time."""


class Child:
    """A process driven by one JSON command per stdin line, answering one JSON line on stdout.

    Its stderr goes to a log file (its tail is quoted in errors); stdout is read on a thread so that every
    read has a timeout. ``stop`` closes stdin (each child exits at EOF), then terminates, then kills.
    """

    def __init__(self, name: str, argv: list[str], *, cwd: Path, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1, env={**os.environ, **(env or {})}, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:].strip()
        except OSError:
            return ""

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the child."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no answer within {timeout:.0f} s; stderr: {self._log_tail()}") from None
        if line is None:
            self.process.wait(timeout=5)
            raise ChildError(f"{self.name} exited ({self.process.returncode}); stderr: {self._log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise ChildError(f"{self.name}: {reply['error']}")
        return reply

    def request(self, wait: float = 60, **command: Any) -> dict[str, Any]:
        """Send one command and wait up to ``wait`` seconds for its answer."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ChildError(f"{self.name}: cannot send a command ({exc}); stderr: {self._log_tail()}") from exc
        return self.read(wait)

    def stop(self, grace: float = 3.0) -> None:
        """End the process: EOF on stdin, then SIGTERM, then SIGKILL; never raises."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        for signal_it in (None, self.process.terminate, self.process.kill):
            if signal_it is not None:
                with contextlib.suppress(OSError):
                    signal_it()
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


class Children:
    """Every child started for one measurement, stopped together (in reverse order) on exit."""

    def __init__(self) -> None:
        self.started: list[Child] = []

    def add(self, child: Child) -> Child:
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.started):
            child.stop()
        self.started.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of the sorted values lie (nearest rank, as bench.sync_bench does)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_summary(latencies_ms: list[float], lost: int = 0) -> dict[str, Any]:
    """Samples, losses and the usual percentiles of a list of latencies in milliseconds."""
    if not latencies_ms:
        return {"samples": 0, "lost": lost}
    return {
        "samples": len(latencies_ms),
        "lost": lost,
        "p50_ms": percentile(latencies_ms, 0.50),
        "p90_ms": percentile(latencies_ms, 0.90),
        "p99_ms": percentile(latencies_ms, 0.99),
        "max_ms": max(latencies_ms),
        "mean_ms": sum(latencies_ms) / len(latencies_ms),
    }


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
