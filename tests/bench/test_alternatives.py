"""The alternative-stacks benchmark in quick mode: the result's structure and sanity, never a timing.

One quick run (about 15-30 s) covers every stack. pycrdt-websocket must run. The y-websocket stack needs node
and npm, mbsync needs the Debian packages isync and dovecot-imapd: where those tools are missing, the stack
must be reported unavailable with a reason (the test installs nothing with apt-get); where they are present,
it must have run, and only an install failure (say npm offline) may make it unavailable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.alternatives import STACKS, run_alternatives
from bench.alternatives.__main__ import summary_lines

QUICK_SAMPLES = 100
QUICK_SYNC_RUNS = 3


def _has_node() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def _has_mbsync() -> bool:
    return shutil.which("mbsync") is not None and (
        shutil.which("dovecot") is not None or os.path.exists("/usr/sbin/dovecot"))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_alternatives(quick=True, work_dir=tmp_path_factory.mktemp("alternatives"), apt_install=False)


def _check_unavailable(stack: dict[str, Any], tools_present: bool) -> None:
    assert stack["available"] is False
    assert isinstance(stack["why"], str) and stack["why"]
    if tools_present:  # then only installing the packages may have failed
        assert "install" in stack["why"], stack["why"]


def _check_websocket_stack(stack: dict[str, Any], settings: dict[str, Any]) -> None:
    assert stack["versions"], "the versions of the stack's packages are recorded"
    assert stack["notes"] and all(isinstance(note, str) for note in stack["notes"])
    assert set(stack["variants"]) == {"none", "deflate"}
    for mode, variant in stack["variants"].items():
        assert variant["ok"], variant.get("error")
        assert variant["compression_requested"] == mode
        assert variant["permessage_deflate_negotiated"] is (mode == "deflate"), variant["negotiated_extensions"]
        hop = variant["one_hop"]
        assert hop["samples"] == settings["samples_per_variant"] == QUICK_SAMPLES
        assert hop["lost"] == 0
        figures = [hop["p50_ms"], hop["p90_ms"], hop["p99_ms"], hop["max_ms"], hop["mean_ms"]]
        assert all(math.isfinite(value) for value in figures)
        # One clock for both processes: a change is never seen before it was made.
        assert 0 < hop["p50_ms"] <= hop["p90_ms"] <= hop["p99_ms"] <= hop["max_ms"]
        assert hop["mean_ms"] <= hop["max_ms"]
        assert set(variant["initial_sync"]) == {"1000"}
        sync = variant["initial_sync"]["1000"]
        assert sync["runs"] == QUICK_SYNC_RUNS and len(sync["all_s"]) == QUICK_SYNC_RUNS
        assert sync["complete"] and sync["entries"] == 1000
        assert 0 < sync["min_s"] <= sync["median_s"] <= sync["max_s"]
        assert sync["payload_bytes_received"] > 1000 * 100  # about 380 bytes of envelope per message
        if mode == "deflate":
            assert sync["wire_bytes_received"] < sync["payload_bytes_received"]
        else:
            assert sync["wire_bytes_received"] >= sync["payload_bytes_received"]


@pytest.mark.timeout(240)
def test_the_result_is_json_with_every_stack(results: dict[str, Any]) -> None:
    assert json.loads(json.dumps(results)) == results
    assert results["scenario"] == "alternatives" and results["quick"] is True
    assert results["machine"]["cores"]
    assert set(results["stacks"]) == set(STACKS)
    assert all(isinstance(stack["available"], bool) for stack in results["stacks"].values())
    lines = summary_lines(results)
    assert len(lines) >= len(STACKS)


@pytest.mark.timeout(240)
def test_pycrdt_websocket_runs_with_and_without_compression(results: dict[str, Any]) -> None:
    stack = results["stacks"]["pycrdt-websocket"]
    if not stack["available"]:
        _check_unavailable(stack, tools_present=True)  # only a failed pip install may excuse it
        pytest.fail(f"pycrdt-websocket could not be installed: {stack['why']}")
    _check_websocket_stack(stack, results["websocket_settings"])
    assert any("start race" in note.lower() for note in stack["notes"])
    assert stack["versions"]["pycrdt-websocket"]


@pytest.mark.timeout(240)
def test_crdtmail_runs_in_the_same_rounds_with_and_without_compression(results: dict[str, Any]) -> None:
    stack = results["stacks"]["crdtmail"]
    assert stack["available"], stack.get("why")
    _check_websocket_stack(stack, results["websocket_settings"])
    assert stack["versions"]["crdtmail"] and stack["versions"]["pycrdt"]
    for variant in stack["variants"].values():
        # Of 1,000 sample messages, two share a Message-ID with another: crdtmail holds 998 messages.
        assert variant["initial_sync"]["1000"]["complete"]


@pytest.mark.timeout(240)
def test_y_websocket_runs_where_node_and_npm_are(results: dict[str, Any]) -> None:
    stack = results["stacks"]["y-websocket"]
    if not stack["available"]:
        _check_unavailable(stack, tools_present=_has_node())
        return
    _check_websocket_stack(stack, results["websocket_settings"])
    assert stack["versions"]["yjs"].startswith("13.")


@pytest.mark.timeout(240)
def test_mbsync_runs_where_isync_and_dovecot_are(results: dict[str, Any]) -> None:
    stack = results["stacks"]["mbsync"]
    if not stack["available"]:
        _check_unavailable(stack, tools_present=False)
        assert not _has_mbsync(), f"mbsync and dovecot are installed, yet: {stack['why']}"
        return
    assert stack["ok"], stack["sizes"]
    assert stack["versions"]["mbsync"] and stack["versions"]["dovecot"]
    figures = stack["sizes"]["500"]
    assert figures["initial_complete"] and figures["messages_synced"] == 500
    assert figures["flag_changes"] == 50 and figures["incremental_complete"]
    for key in ("initial_sync_s", "no_change_run_s", "incremental_run_s"):
        assert figures[key] > 0
    visible = figures["change_to_visible_every_minute"]
    assert 30 < visible["mean_s"] < visible["p99_s"] < visible["max_s"]


def test_unknown_stacks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stacks"):
        run_alternatives(quick=True, work_dir=tmp_path, stacks=("pigeon-post",))
