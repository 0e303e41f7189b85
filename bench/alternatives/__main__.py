"""``python -m bench.alternatives [--quick] [--stacks a,b]``: measure the alternative stacks, print JSON, write
bench/results/alternatives-<date>-<host>.json."""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.alternatives import STACKS, run_alternatives
from bench.common import RESULTS_DIR, WORK_DIR


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per measured variant, for a reader of the terminal."""
    lines = []
    for name, stack in results["stacks"].items():
        if not stack.get("available"):
            lines.append(f"{name}: unavailable ({stack.get('why')})")
            continue
        for mode, variant in stack.get("variants", {}).items():
            hop = variant["one_hop"]
            if not variant["ok"]:
                lines.append(f"{name}/{mode}: failed: {variant.get('error')}")
                continue
            syncs = ", ".join(f"{n}: {s['median_s'] * 1000:.0f} ms {s['wire_bytes_received']:,} B"
                              for n, s in variant["initial_sync"].items() if s.get("runs"))
            lines.append(
                f"{name}/{mode} (deflate negotiated: {variant['permessage_deflate_negotiated']}): one hop p50 "
                f"{hop['p50_ms']:.3f} ms, p99 {hop['p99_ms']:.3f} ms, max {hop['max_ms']:.2f} ms "
                f"({hop['samples']} samples, {hop['lost']} lost); initial sync {syncs}")
        for count, figures in stack.get("sizes", {}).items():
            if "error" in figures:
                lines.append(f"{name} {count}: failed: {figures['error']}")
                continue
            lines.append(
                f"{name} {count} messages: initial {figures['initial_sync_s']:.2f} s, no-change run "
                f"{figures['no_change_run_s'] * 1000:.0f} ms, after {figures['flag_changes']} flag changes "
                f"{figures['incremental_run_s'] * 1000:.0f} ms; change visible (every minute) mean "
                f"{figures['change_to_visible_every_minute']['mean_s']:.1f} s, p99 "
                f"{figures['change_to_visible_every_minute']['p99_s']:.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alternatives", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a check that the suite works (about 15 s)")
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated subset of {','.join(STACKS)}")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="caches and scratch (default bench/.work)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the result file goes")
    args = parser.parse_args(argv)
    stacks = tuple(name.strip() for name in args.stacks.split(",") if name.strip())
    results = run_alternatives(quick=args.quick, work_dir=args.work_dir, stacks=stacks)
    sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
    path = args.results_dir / f"alternatives-{stamp}-{socket.gethostname()}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    for line in summary_lines(results):
        sys.stderr.write(line + "\n")
    sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
