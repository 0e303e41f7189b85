"""The stacks a user might pick instead of crdtmail, measured on the same machine in the same run.

- ``pycrdt-websocket``: a pycrdt-websocket ``WebsocketServer`` room and two pycrdt ``Provider`` clients.
- ``y-websocket``: the Node reference stack, ``@y/websocket-server`` with yjs / y-websocket / ws clients.
- ``mbsync``: isync's mbsync pulling a Dovecot IMAP Maildir into a local Maildir.
- ``crdtmail``: crdtmail itself in the WebSocket stacks' topology (A -> serving peer -> B), so that its figures
  come from the same interleaved rounds as theirs.

The WebSocket stacks (crdtmail included) run with and without permessage-deflate, interleaved (see
``wsstacks``); mbsync runs after them (see ``mbsync_bench``). A stack that cannot be installed is reported as
``{"available": false, "why": ...}``, never dropped.

``python -m bench.alternatives [--quick]`` prints the result as JSON and writes
``bench/results/alternatives-<date>-<host>.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

STACKS = ("crdtmail", "pycrdt-websocket", "y-websocket", "mbsync")


def run_alternatives(*, quick: bool, work_dir: Path, stacks: tuple[str, ...] = STACKS,
                     apt_install: bool = True) -> dict[str, Any]:
    """Measure the alternative stacks; returns a JSON-able dict with one entry per stack under ``"stacks"``.

    ``work_dir`` holds the caches (``node/`` for npm packages, ``maildir-<N>-s0`` generated Maildirs, the
    same ones ``python -m bench import`` uses when it is ``bench/.work``) and the run's scratch files
    (``alternatives/``: documents, child logs). ``quick``: about 100 samples per WebSocket variant, 1k-entry
    documents, a 500-message mailbox; a check that the suite works, not a measurement. Missing packages are
    installed on demand (pip into this venv, npm into ``work_dir/node``, apt-get for mbsync and Dovecot
    unless ``apt_install`` is false).
    """
    from bench.alternatives.mbsync_bench import run_mbsync
    from bench.alternatives.wsstacks import run_websocket_stacks
    from bench.common import machine

    unknown = set(stacks) - set(STACKS)
    if unknown:
        raise ValueError(f"unknown stacks {sorted(unknown)}; choose from {STACKS}")
    started = time.perf_counter()
    load_at_start = os.getloadavg()  # other work on the machine skews every figure: note how busy it was
    work_dir.mkdir(parents=True, exist_ok=True)
    websocket_stacks = tuple(name for name in stacks if name != "mbsync")
    ws: dict[str, Any] = {"settings": {}, "stacks": {}}
    if websocket_stacks:
        ws = run_websocket_stacks(quick=quick, work_dir=work_dir, stacks=websocket_stacks)
    results: dict[str, Any] = {
        "scenario": "alternatives",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "machine": machine(),
        "websocket_settings": ws["settings"],
        "stacks": dict(ws["stacks"]),
    }
    if "mbsync" in stacks:
        results["stacks"]["mbsync"] = run_mbsync(quick=quick, work_dir=work_dir, apt_install=apt_install)
    results["seconds"] = time.perf_counter() - started
    results["load_average"] = {"at_start": list(load_at_start), "at_end": list(os.getloadavg())}
    return results


__all__ = ["STACKS", "run_alternatives"]
