"""Kill the bridge at each of its steps in turn; a restart must reach the end state of an uninterrupted run.

The bridge process exits at step N through the $CRDTMAIL_BRIDGE_EXIT_AT test hook (journal written, file
renamed, state recorded, replica committed...), the way mbsync's tests kill it at every journal step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from crdtmail.bridges.maildir import EXIT_AT_ENV, EXPUNGED_AREA
from crdtmail.model.flags import FLAGGED, SEEN
from crdtmail.model.message import parse_message
from crdtmail.replica import Replica
from tests.bridges.test_maildir import Desk, make_maildir
from tests.conftest import make_raw

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 80


def build_scenario(base: Path) -> set[bytes]:
    """A synced desktop, then changes on both sides waiting for the bridge; returns every mail file's bytes."""
    desk = Desk(base)
    make_maildir(desk.root / ".Work")
    raws = [make_raw(f"message {n}") for n in range(8)]
    for n, raw in enumerate(raws[:7]):
        desk.deliver(raw, sub="cur", name=f"{n}.x.host:2,")
    desk.full()
    ids = {parse_message(raw).message_id: raw for raw in raws}
    by_subject = {row.subject: row.message_id for row in desk.box.index_rows()}
    # Maildir side: a flag rename, a move to another folder, a removal, a new delivery.
    cur = desk.root / "cur"
    (cur / "0.x.host:2,").rename(cur / "0.x.host:2,S")
    (cur / "1.x.host:2,").rename(desk.root / ".Work" / "cur" / "1.x.host:2,")
    (cur / "2.x.host:2,").unlink()
    arrived = make_raw("arrived on the desktop")
    desk.deliver(arrived, sub="new", name="9.new.host")
    # Replica side (as if from the phone): a flag, a move, an expunge, a new message, a folder.
    desk.box.set_flags(by_subject["message 3"], add=[FLAGGED])
    desk.box.create_folder("Later")
    desk.box.move(by_subject["message 4"], "Later")
    desk.box.expunge(by_subject["message 5"])
    desk.box.add(raws[7], flags=[SEEN])
    desk.replica.close()
    assert len(ids) == 8
    return {raw for n, raw in enumerate(raws) if n != 2} | {arrived}


def end_state(base: Path) -> tuple[object, ...]:
    """The Maildir (message, folder dir, letters), the expunged area's contents, and the replica's messages."""
    maildir = base / "Maildir"
    files = []
    for path in maildir.rglob("*"):
        if path.is_file() and EXPUNGED_AREA not in path.parts and path.parent.name in ("cur", "new"):
            raw = path.read_bytes()
            relative = path.relative_to(maildir)
            folder_dir = relative.parts[0] if len(relative.parts) == 3 else ""
            info = path.name.partition(":2,")[2] if path.parent.name == "cur" else ""
            files.append((parse_message(raw).message_id, folder_dir, info))
    area = sorted(p.read_bytes() for p in (maildir / EXPUNGED_AREA).rglob("*") if p.is_file()) \
        if (maildir / EXPUNGED_AREA).exists() else []
    leftovers = sorted(p.name for p in maildir.rglob("tmp/*"))
    with Replica.open(base / "data") as replica:
        box = replica.mailbox("default")
        paths = {f.id: f.path for f in box.folders()}
        rows = sorted((r.message_id, paths.get(r.folder_id), r.flags) for r in box.index_rows())
        folders = sorted(paths.values())
    return sorted(files), area, leftovers, rows, folders


def every_mail_bytes(base: Path) -> set[bytes]:
    return {p.read_bytes() for p in (base / "Maildir").rglob("*") if p.is_file() and p.parent.name != "tmp"}


def run_bridge(base: Path, exit_at: int | None) -> int:
    env = {key: value for key, value in os.environ.items() if key != EXIT_AT_ENV}
    if exit_at is not None:
        env[EXIT_AT_ENV] = str(exit_at)
    result = subprocess.run(
        [sys.executable, "-m", "peers.desktop", "--data-dir", str(base / "data"), "--maildir", str(base / "Maildir"),
         "--once"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode in (0, 75), result.stderr
    return result.returncode


def test_killed_at_every_step_the_bridge_resumes_to_the_same_end(tmp_path: Path) -> None:
    template = tmp_path / "template"
    mail = build_scenario(template)
    reference = tmp_path / "reference"
    shutil.copytree(template, reference)
    assert run_bridge(reference, None) == 0
    expected = end_state(reference)
    assert run_bridge(reference, None) == 0 and end_state(reference) == expected  # a second run changes nothing
    killed_at = []
    for step in range(1, MAX_STEPS + 1):
        attempt = tmp_path / f"step{step}"
        shutil.copytree(template, attempt)
        if run_bridge(attempt, step) == 0:
            break  # the run has fewer steps than this: every step has been tried
        killed_at.append(step)
        assert run_bridge(attempt, None) == 0
        assert end_state(attempt) == expected, f"killed at step {step}"
        assert mail <= every_mail_bytes(attempt), f"killed at step {step}: a mail file is missing"
        shutil.rmtree(attempt)
    else:
        raise AssertionError(f"the bridge still had steps left after {MAX_STEPS}")
    assert len(killed_at) >= 10  # the scenario exercises many steps, or the hook is not wired

