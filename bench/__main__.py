"""``python -m bench [--quick]``: run the whole suite (bench/suite.py) and write bench/results/<time>-<host>.json,
.md and plots. ``python -m bench SCENARIO [options]`` runs one of the older single benchmarks on its own."""

from __future__ import annotations

import argparse
import sys

from bench import desktop_bench, import_bench, suite, sync_bench


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the suite or the chosen scenario."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["alternatives"]:
        from bench.alternatives.__main__ import main as alternatives_main

        return alternatives_main(raw[1:])
    if not raw or (raw[0].startswith("-") and raw[0] not in ("-h", "--help")):
        parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
        suite.add_arguments(parser)
        return suite.run(parser.parse_args(raw))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     epilog="without a scenario: the whole suite (python -m bench [--quick] "
                                            "[--only a,b] [--results-dir DIR] [--work-dir DIR])")
    sub = parser.add_subparsers(dest="scenario")
    p = sub.add_parser("suite", help="every scenario, one result file, tables and plots (the default)")
    suite.add_arguments(p)
    p = sub.add_parser("import", help="import a generated Maildir; open, list and count cold")
    import_bench.add_arguments(p)
    p = sub.add_parser("sync", help="one-hop latency of a flag change between two peer processes, beside the floor")
    sync_bench.add_arguments(p)
    sub.add_parser("alternatives", help="pycrdt-websocket, Node y-websocket and mbsync + Dovecot, interleaved",
                   add_help=False)
    p = sub.add_parser("desktop", help="Maildir mirror, rescan, two desktop peers, rename latency A -> B")
    desktop_bench.add_arguments(p)
    args = parser.parse_args(raw)
    if args.scenario == "desktop":
        return desktop_bench.run(args)
    if args.scenario == "sync":
        return sync_bench.run(args)
    if args.scenario == "import":
        return import_bench.run(args)
    if args.scenario == "suite":
        return suite.run(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
