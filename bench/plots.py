"""Plots of a suite run (PNG, matplotlib): latency CDFs, and cost against mailbox size and change count.

``python -m bench.plots RESULT.json`` draws them again from a result file. matplotlib is imported only here, and
only when plotting: without it (``pip install -e '.[bench]'`` installs it) ``write_plots`` raises
``PlotsUnavailable`` and the suite reports that instead of plots.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotsUnavailable(f"matplotlib is not installed ({exc}); pip install -e '.[bench]' to get the plots") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_numbers(axis: Any, *which: str) -> None:
    """Tick labels like 0.5, 2, 30 instead of 5x10^-1 on log axes."""
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda value, _: f"{value:g}")
    for name in which:
        part = axis.xaxis if name == "x" else axis.yaxis
        part.set_major_formatter(formatter)
        part.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if str(f"{value:g}")[0] in "125"
                                               else ""))


def _cdf(axis: Any, label: str, figures: dict[str, Any] | None, **style: Any) -> None:
    quantiles = (figures or {}).get("quantiles_ms")
    if not figures or not quantiles:
        return
    fractions = [i / (len(quantiles) - 1) for i in range(len(quantiles))]
    axis.step(quantiles, fractions, where="post", label=f"{label} (p99 {figures['p99_ms']:.2f} ms)", **style)


def _percentile_marks(axis: Any, label: str, figures: dict[str, Any] | None, **style: Any) -> None:
    """An alternative's p50 / p90 / p99 / max (its result has no full distribution)."""
    if not figures or "p50_ms" not in figures:
        return
    xs = [figures["p50_ms"], figures["p90_ms"], figures["p99_ms"], figures["max_ms"]]
    axis.plot(xs, [0.5, 0.9, 0.99, 1.0], linestyle=":", marker="o", markersize=4,
              label=f"{label} (p99 {figures['p99_ms']:.2f} ms)", **style)


def _save(plt: Any, figure: Any, path: Path, title: str | None = None) -> Path:
    """Lay the figure out, write it as a PNG and free it."""
    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _latency_plot(plt: Any, results: dict[str, Any], path: Path) -> Path | None:
    scenarios = results["scenarios"]
    hop = scenarios.get("one_hop") or {}
    topologies = scenarios.get("topologies") or {}
    floor = (scenarios.get("floor") or {}).get("raw_websockets")
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    _cdf(left, "raw websockets floor", floor, color="grey")
    _cdf(left, "crdtmail desktop -> mobile", hop.get("desktop_to_mobile"), color="tab:blue")
    _cdf(left, "crdtmail mobile -> desktop", hop.get("mobile_to_desktop"), color="tab:cyan")
    _cdf(left, "crdtmail A -> relay -> C", topologies.get("relay_at_hop_interval"), color="tab:purple")
    stacks = ((scenarios.get("alternatives") or {}).get("stacks")) or {}
    colours = iter(["tab:pink", "tab:brown", "tab:orange", "tab:red", "tab:green", "tab:olive"])
    for stack in ("crdtmail", "pycrdt-websocket", "y-websocket"):
        for mode, variant in ((stacks.get(stack) or {}).get("variants") or {}).items():
            if variant.get("ok"):
                _percentile_marks(left, f"{stack} {mode} (A -> server -> B)", variant.get("one_hop"),
                                  color=next(colours, None))
    left.set_title(f"one flag change, one every {hop.get('interval_ms', 1)} ms")
    for name, colour in (("chain-3", "tab:blue"), ("chain-5", "tab:purple"), ("mesh-3", "tab:green"),
                         ("mesh-5", "tab:red")):
        _cdf(right, f"{name}, farthest peer", topologies.get(name), color=colour)
    plain = (scenarios.get("desktop") or {}).get("rename_to_plain_peer")
    _cdf(right, "Maildir rename on a desktop -> plain peer", plain, color="tab:brown")
    right.set_title(f"topologies, one change every {topologies.get('interval_ms', '?')} ms")
    drawn = False
    for axis in (left, right):
        if axis.lines:
            drawn = True
            axis.set_xscale("log")
            _plain_numbers(axis, "x")
            axis.set_xlabel("latency (ms, log scale)")
            axis.set_ylabel("fraction of changes applied")
            axis.set_ylim(0, 1.01)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7, loc="lower right")
    if not drawn:
        plt.close(figure)
        return None
    return _save(plt, figure, path,
                 "crdtmail: latency CDFs (curves further left are faster; the top of each curve is its tail)")


def _sizes_plot(plt: Any, results: dict[str, Any], path: Path) -> Path | None:
    initial = {int(k): v for k, v in (results["scenarios"].get("initial_sync") or {}).items()
               if isinstance(v, dict) and "full" in v}
    reconnect = (results["scenarios"].get("reconnect") or {}).get("by_changes") or {}
    if not initial and not reconnect:
        return None
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    sizes = sorted(initial)
    panels = (("seconds", "time to sync (s)", 1.0), ("bytes_received", "MB received", 1e-6),
              ("peak_rss_mb", "new peer's peak RSS (MB)", 1.0))
    for axis, (key, label, scale) in zip(axes[:3], panels, strict=True):
        for window, style in (("full", "o-"), ("last_3_months", "s--")):
            values = [initial[n][window].get(key, 0) * scale for n in sizes if window in initial[n]]
            if values:
                axis.plot(sizes[: len(values)], values, style, label=window.replace("_", " "))
        axis.set_xscale("log")
        if key != "peak_rss_mb":
            axis.set_yscale("log")
            _plain_numbers(axis, "y")
        axis.set_xlabel("mailbox size (messages)")
        axis.set_title(f"initial sync: {label}")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    counts = sorted(reconnect, key=int)
    axis = axes[3]
    if counts:
        xs = [int(c) for c in counts]
        axis.plot(xs, [reconnect[c]["seconds"] * 1000 for c in counts], "o-", color="tab:blue", label="time (ms)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_ylabel("time to converge (ms)")
        twin = axis.twinx()
        twin.plot(xs, [reconnect[c]["bytes"] / 1000 for c in counts], "s--", color="tab:orange", label="KB")
        twin.set_yscale("log")
        _plain_numbers(axis, "y")
        _plain_numbers(twin, "y")
        twin.set_ylabel("KB both ways", color="tab:orange")
        handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axis.legend(handles, ["time to converge", "bytes both ways"], fontsize=8, loc="upper left")
        axis.set_xlabel("offline flag changes on each side")
        axis.set_title("reconnect: cost against changes")
        axis.grid(True, which="both", alpha=0.3)
    return _save(plt, figure, path,
                 "crdtmail: cost against mailbox size (initial sync) and against offline changes (reconnect)")


def _throughput_plot(plt: Any, results: dict[str, Any], path: Path) -> Path | None:
    throughput = results["scenarios"].get("throughput") or {}
    steps = [s for s in throughput.get("steps", []) if s.get("achieved_per_s")]
    if not steps:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    rates = [s["achieved_per_s"] for s in steps]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s-"), ("max_ms", "^:")):
        axis.plot(rates, [s[key] for s in steps], style, label=key[:-3])
    axis.axhline(throughput.get("p99_limit_ms", 10), color="red", linewidth=0.8, label="p99 limit")
    axis.set_xscale("log")
    axis.set_yscale("log")
    _plain_numbers(axis, "x", "y")
    axis.set_xlabel("flag changes per second, desktop -> mobile")
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"sustained: {throughput.get('sustained_changes_per_s', 0):,} changes/s with p99 <= "
                   f"{throughput.get('p99_limit_ms', 10):g} ms")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(plt, figure, path)


def write_plots(results: dict[str, Any], stem: Path) -> list[Path]:
    """Write ``<stem>-latency-cdf.png``, ``<stem>-cost.png`` and ``<stem>-throughput.png`` (those with data)."""
    plt = _pyplot()
    written = [
        _latency_plot(plt, results, stem.with_name(stem.name + "-latency-cdf.png")),
        _sizes_plot(plt, results, stem.with_name(stem.name + "-cost.png")),
        _throughput_plot(plt, results, stem.with_name(stem.name + "-throughput.png")),
    ]
    return [path for path in written if path is not None]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m bench.plots RESULT.json\n")
        return 2
    source = Path(argv[0])
    results = orjson.loads(source.read_bytes())
    for path in write_plots(results, source.with_suffix("")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
