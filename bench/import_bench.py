"""Import benchmark: a generated Maildir imported into a fresh peer, then a cold open, list and count.

Figures (issue 2's targets in brackets): import rate [>= 5,000 msg/s] and its peak RSS, bytes on disk per
message, cold open + newest 50 of INBOX + unread counts [<= 300 ms, peak RSS <= 100 MB in a fresh process],
full CRDT state bytes per message [<= 450].
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from bench.common import WORK_DIR, machine, python_child, write_results

GENERATE = """
import sys, time
from pathlib import Path
from crdtmail.sample import generate_messages, write_maildir
count, seed, target = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
started = time.perf_counter()
written = write_maildir(target, generate_messages(count, seed=seed))
report(written=written, seconds=time.perf_counter() - started)
"""

IMPORT = """
import sys, time
from pathlib import Path
from crdtmail.replica import Replica
maildir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
with Replica.init(data_dir) as replica:
    started = time.perf_counter()
    result = replica.import_path(maildir)
    seconds = time.perf_counter() - started
report(total=result.total, added=result.added, problems=len(result.problems), seconds=seconds)
"""

COLD_OPEN = """
import time
started = time.perf_counter()
import sys
from pathlib import Path
from crdtmail.replica import Replica
imported = time.perf_counter()
replica = Replica.open(Path(sys.argv[1]))
mailbox = replica.mailbox()
rows = mailbox.list_folder("INBOX", limit=50)
counts = mailbox.counts()
done = time.perf_counter()
report(rows=len(rows), folders=len(counts), unread=sum(c.unread for c in counts.values()),
       open_list_count_ms=(done - imported) * 1000, including_imports_ms=(done - started) * 1000,
       loaded_shards=len(mailbox.loaded_shards()))
"""

STATE = """
import sys, os
from pathlib import Path
from crdtmail.config import DATABASE_FILE
from crdtmail.replica import Replica
data_dir = Path(sys.argv[1])
replica = Replica.open(data_dir)
name = replica.mailbox_names()[0]
backend = replica.store.backend(name)
state = sum(len(backend.load_document(doc) or b"") for doc in backend.document_names())
messages = sum(c.total for c in replica.mailbox(name).counts().values())
files = [p for p in data_dir.iterdir() if p.name.startswith(DATABASE_FILE)]
on_disk = sum(p.stat().st_size for p in files)
blob_bytes = replica.store._connection.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0]
report(messages=messages, documents=len(backend.document_names()), state_bytes=state,
       state_bytes_per_message=state / max(messages, 1), disk_bytes=on_disk,
       disk_bytes_per_message=on_disk / max(messages, 1),
       disk_bytes_per_message_without_bodies=(on_disk - blob_bytes) / max(messages, 1),
       body_bytes=blob_bytes)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the import benchmark."""
    parser.add_argument("--count", type=int, default=100_000, help="messages in the generated Maildir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2,000 messages, for checking the suite works")
    parser.add_argument("--cold-runs", type=int, default=5, help="fresh processes for the cold open figure")


def run(args: argparse.Namespace) -> int:
    """Run the import benchmark and write its result file."""
    count = 2_000 if args.quick else args.count
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    maildir = WORK_DIR / f"maildir-{count}-s{args.seed}"
    generated: dict[str, Any] = {"cached": maildir.exists()}
    if not maildir.exists():
        print(f"generating {count} messages into {maildir} ...", flush=True)
        partial = maildir.with_name(maildir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        generated = python_child(GENERATE, str(count), str(args.seed), str(partial))
        partial.rename(maildir)
    data_dir = WORK_DIR / f"peer-{count}"
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f"importing {count} messages ...", flush=True)
    imported = python_child(IMPORT, str(maildir), str(data_dir))
    imported["rate_msgs_per_s"] = imported["total"] / imported["seconds"]
    print(f"  {imported['rate_msgs_per_s']:,.0f} msg/s, peak RSS {imported['peak_rss_mb']:.0f} MB", flush=True)
    state = python_child(STATE, str(data_dir))
    cold = [python_child(COLD_OPEN, str(data_dir)) for _ in range(max(1, args.cold_runs))]
    cold_ms = sorted(run["open_list_count_ms"] for run in cold)
    results: dict[str, Any] = {
        "scenario": "import",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "messages": count,
        "generate": generated,
        "import": imported,
        "state": state,
        "cold_open": {
            "runs": cold,
            "median_open_list_count_ms": cold_ms[len(cold_ms) // 2],
            "max_peak_rss_mb": max(run["peak_rss_mb"] for run in cold),
            "median_including_imports_ms": sorted(r["including_imports_ms"] for r in cold)[len(cold) // 2],
        },
        "targets": {
            "import_msgs_per_s": 5000,
            "cold_open_list_count_ms": 300,
            "cold_open_peak_rss_mb": 100,
            "state_bytes_per_message": 450,
        },
    }
    path = write_results("import", results)
    print(
        f"import {imported['rate_msgs_per_s']:,.0f} msg/s (peak RSS {imported['peak_rss_mb']:.0f} MB); "
        f"disk {state['disk_bytes_per_message']:,.0f} B/msg ({state['disk_bytes_per_message_without_bodies']:,.0f} "
        f"without bodies); CRDT state {state['state_bytes_per_message']:.0f} B/msg; cold open+list+counts "
        f"{results['cold_open']['median_open_list_count_ms']:.0f} ms "
        f"({results['cold_open']['median_including_imports_ms']:.0f} ms with imports), "
        f"peak RSS {results['cold_open']['max_peak_rss_mb']:.0f} MB\nwrote {path}"
    )
    return 0
