"""``python -m bench [SCENARIO] [options]``: run benchmarks and write their results under bench/results/."""

from __future__ import annotations

import argparse
import sys

from bench import desktop_bench, import_bench, sync_bench


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen scenario."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="scenario")
    p = sub.add_parser("import", help="import a generated Maildir; open, list and count cold")
    import_bench.add_arguments(p)
    p = sub.add_parser("sync", help="one-hop latency of a flag change between two peer processes, beside the floor")
    sync_bench.add_arguments(p)
    sub.add_parser("alternatives", help="pycrdt-websocket, Node y-websocket and mbsync + Dovecot, interleaved",
                   add_help=False)
    p = sub.add_parser("desktop", help="Maildir mirror, rescan, two desktop peers, rename latency A -> B")
    desktop_bench.add_arguments(p)
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["alternatives"]:
        from bench.alternatives.__main__ import main as alternatives_main

        return alternatives_main(raw[1:])
    args = parser.parse_args(argv)
    if args.scenario == "desktop":
        return desktop_bench.run(args)
    if args.scenario == "sync":
        return sync_bench.run(args)
    if args.scenario in (None, "import"):
        if args.scenario is None:
            args = parser.parse_args(["import", *(argv or sys.argv[1:])])
        return import_bench.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
