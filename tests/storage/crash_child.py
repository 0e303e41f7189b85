"""Child process of the crash test: makes changes through a Mailbox and reports each one once committed.

Run as ``python -m tests.storage.crash_child DATA_DIR START``; prints ``add <n> <id>`` and ``flag <n> <id>``
lines, flushed, strictly after the change's commit returned.
"""

from __future__ import annotations

import sys
from pathlib import Path

from crdtmail.replica import Replica
from tests.conftest import make_raw


def main() -> None:
    data_dir, start = Path(sys.argv[1]), int(sys.argv[2])
    with Replica.init(data_dir) as replica:
        mailbox = replica.mailbox(create=True)
        n = start
        while True:
            raw = make_raw(f"crash {n}", message_id=f"<crash-{n}@test>",
                           date=f"{n % 28 + 1:02d} Nov 2026 10:00:00 +0000", body="x" * (n % 5000))
            message_id = mailbox.add(raw).message_id
            print(f"add {n} {message_id}", flush=True)
            mailbox.set_flags(message_id, add=["seen"])
            print(f"flag {n} {message_id}", flush=True)
            n += 1


if __name__ == "__main__":
    main()
