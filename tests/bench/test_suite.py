"""The benchmark suite as CI runs it: `python -m bench --quick`, the command itself, in a fresh process.

Every scenario at its quick size (about 1-2 minutes), with its results and caches in temporary directories and
nothing installed with apt-get (`--no-apt`: where mbsync and Dovecot are missing, the results must say so).
Never asserts a timing: only that the command succeeds, that the JSON, Markdown and plots hold what they should,
and sanity (a latency is positive, p50 <= p99 <= max).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import plots, suite

SCENARIOS = set(suite.SCENARIOS)
QUICK = suite.Settings.for_run(True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("suite")
    command = [sys.executable, "-m", "bench", "--quick", "--no-apt", "--results-dir", str(base / "results"),
               "--work-dir", str(base / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(suite.__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [json_path] = (base / "results").glob("*.json")
    results: dict[str, Any] = orjson.loads(json_path.read_bytes())
    results["files"] = {"json": str(json_path), "markdown": str(json_path.with_suffix(".md"))}
    assert done.stdout.strip().endswith(Path(results["files"]["markdown"]).read_text().strip())  # printed last
    return results


def _check_latencies(figures: dict[str, Any], samples: int) -> None:
    assert figures["samples"] == samples and figures["lost"] == 0
    assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    quantiles = figures["quantiles_ms"]
    assert len(quantiles) == 201 and quantiles == sorted(quantiles) and quantiles[-1] == figures["max_ms"]


@pytest.mark.timeout(660)
def test_every_chosen_scenario_ran_and_the_json_says_so(run: dict[str, Any]) -> None:
    saved = json.loads(Path(run["files"]["json"]).read_text())
    assert saved["scenarios"].keys() == SCENARIOS
    assert saved["quick"] is True
    assert {"host", "cpu", "cores", "python", "pycrdt", "websockets"} <= saved["machine"].keys()
    for name, figures in saved["scenarios"].items():
        assert "error" not in figures, (name, figures.get("error"))
        assert figures["wall_seconds"] >= 0
    stem = Path(run["files"]["json"]).stem
    assert stem.endswith("-" + saved["machine"]["host"]) and stem[:4].isdigit()
    assert Path(run["files"]["markdown"]).name == stem + ".md"


def test_latency_figures_are_sane(run: dict[str, Any]) -> None:
    scenarios = run["scenarios"]
    _check_latencies(scenarios["floor"]["raw_websockets"], QUICK.hop_samples)
    for direction in ("desktop_to_mobile", "mobile_to_desktop"):
        _check_latencies(scenarios["one_hop"][direction], QUICK.hop_samples)
    # One clock for every process: a change through a peer is never faster than the bare socket's median.
    assert scenarios["one_hop"]["desktop_to_mobile"]["max_ms"] > scenarios["floor"]["raw_websockets"]["p50_ms"]
    for name in ("chain-3", "chain-5", "mesh-3", "mesh-5"):
        _check_latencies(scenarios["topologies"][name], QUICK.topology_samples)
    assert scenarios["topologies"]["chain-5"]["hops_to_farthest"] == 4
    assert scenarios["topologies"]["mesh-5"]["links"] == 10
    _check_latencies(scenarios["topologies"]["relay_at_hop_interval"], QUICK.hop_samples)
    throughput = scenarios["throughput"]
    assert 1 <= len(throughput["steps"]) <= len(QUICK.throughput_intervals_ms)
    assert all(step["sent"] >= QUICK.throughput_min_changes and step["achieved_per_s"] > 0
               for step in throughput["steps"])
    assert throughput["sustained_changes_per_s"] >= 0


def test_sync_figures_are_sane(run: dict[str, Any]) -> None:
    initial = run["scenarios"]["initial_sync"]["1000"]
    for window in ("full", "last_3_months"):
        figures = initial[window]
        assert figures["seconds"] > 0 and figures["peak_rss_mb"] > 0
        assert figures["bytes_received"] > 0 and figures["tcp_bytes_received"] >= figures["bytes_received"]
    assert initial["last_3_months"]["bytes_received"] < initial["full"]["bytes_received"]
    reconnect = run["scenarios"]["reconnect"]
    assert reconnect["by_changes"].keys() == {"10", "200"}
    for count, figures in reconnect["by_changes"].items():
        assert figures["changes_made"] == [int(count), int(count)]
        assert figures["seconds"] > 0 and figures["bytes"] > 0
    assert reconnect["by_changes"]["10"]["bytes"] < reconnect["by_changes"]["200"]["bytes"]


def test_alternatives_sit_beside_crdtmail_with_ratios(run: dict[str, Any]) -> None:
    stacks = run["scenarios"]["alternatives"]["stacks"]
    assert stacks.keys() == {"crdtmail", "pycrdt-websocket", "y-websocket", "mbsync"}
    for name, stack in stacks.items():  # each one ran, or the results say why not
        assert stack["available"] or stack["why"], name
    rows = run["comparison"]
    assert any(row["alternative"].startswith("pycrdt-websocket") for row in rows)
    for row in rows:
        if row["ratio"] is not None:
            assert row["ratio"] == pytest.approx(row["crdtmail"] / row["alternative_value"], rel=1e-2)
    figures = {row["figure"] for row in rows}
    assert any("one hop p50" in figure for figure in figures)
    assert any("initial sync of 1,000 messages" in figure for figure in figures)
    # crdtmail's figures in its own column per compression mode, each from the same rounds as theirs.
    same_rounds = [row for row in rows if row["alternative"].startswith("pycrdt-websocket")
                   and ("same rounds" in row["figure"] or "initial sync" in row["figure"])]
    assert {row["crdtmail_compression"] for row in same_rounds} == {"none", "deflate"}
    for row in same_rounds:
        mode = row["crdtmail_compression"]
        assert row["alternative"].endswith("(deflate)") is (mode == "deflate")
        variant = stacks["crdtmail"]["variants"][mode]
        if "one hop p50" in row["figure"]:
            assert row["crdtmail"] == variant["one_hop"]["p50_ms"]
        if "median time" in row["figure"]:
            assert row["crdtmail"] == variant["initial_sync"]["1000"]["median_s"]
    markdown = Path(run["files"]["markdown"]).read_text()
    assert ("| figure | crdtmail (no compression) | crdtmail (deflate) | pycrdt-websocket (no compression) | "
            "pycrdt-websocket (deflate) |") in markdown
    assert "one hop desktop to mobile" in markdown and "reconnect after 200 offline changes" in markdown
    assert "desktop: mirror a 2,000-message Maildir" in markdown


def test_plots_are_written_when_matplotlib_is_there(run: dict[str, Any]) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        assert run["plots"] == [] and "matplotlib" in run["plots_skipped"]
        assert "No plots: matplotlib" in Path(run["files"]["markdown"]).read_text()
        return
    names = sorted(Path(path).name for path in run["plots"])
    stem = Path(run["files"]["json"]).stem
    assert names == sorted(f"{stem}-{kind}.png" for kind in ("cost", "latency-cdf", "throughput"))
    for path in run["plots"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(path).name in Path(run["files"]["markdown"]).read_text()


def test_without_matplotlib_the_results_say_so(run: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(plots.PlotsUnavailable):
        plots.write_plots(run, tmp_path / "x")
    results = dict(run)
    suite.add_plots(results, tmp_path / "x")
    assert results["plots"] == [] and "matplotlib" in results["plots_skipped"]
    assert "No plots: matplotlib is not installed" in suite.markdown(results)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_scenario_is_recorded_and_the_others_still_run(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(settings: suite.Settings, work: Path) -> dict[str, Any]:
        raise RuntimeError("no network today")

    monkeypatch.setattr(suite, "scenario_floor", broken)
    settings = suite.reduced(suite.Settings.for_run(True), hop_samples=20, hop_warmup=0)
    results = suite.run_suite(quick=True, results_dir=tmp_path, work_dir=tmp_path / "work",
                              only=["floor", "one_hop"], settings=settings)
    assert "no network today" in results["scenarios"]["floor"]["error"]
    assert results["scenarios"]["one_hop"]["desktop_to_mobile"]["samples"] == 20
    assert "floor: RuntimeError: no network today" in Path(results["files"]["markdown"]).read_text()
