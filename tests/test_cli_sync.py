"""serve, connect, sync and peers as a person runs them: separate processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from crdtmail.sample import generate_messages, write_maildir

CLI = [sys.executable, "-m", "crdtmail.cli"]


def crdtmail(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CLI, "--data-dir", str(data_dir), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def as_json(data_dir: Path, *args: str) -> Any:
    return orjson.loads(crdtmail(data_dir, *args, "--json").stdout)


def desktop_and_phone(tmp_path: Path, messages: int, *, seed: int) -> tuple[Path, Path, str]:
    """A desktop data dir holding a generated Maildir, an empty phone one, and the phone's device token."""
    desktop, phone = tmp_path / "desktop", tmp_path / "phone"
    write_maildir(tmp_path / "Maildir", generate_messages(messages, seed=seed))
    crdtmail(desktop, "init")
    crdtmail(desktop, "import", str(tmp_path / "Maildir"))
    token = as_json(desktop, "pair", "phone", "--for", "default")["token"]
    crdtmail(phone, "init")
    return desktop, phone, token


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run `crdtmail serve --port 0` for ``data_dir``; yields its first line and the process, then SIGTERMs it."""
    server = subprocess.Popen([*CLI, "--data-dir", str(data_dir), "serve", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        yield server.stdout.readline(), server
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=20)


@pytest.mark.timeout(120)
def test_serve_connect_sync_both_ways(tmp_path: Path) -> None:
    desktop, phone, token = desktop_and_phone(tmp_path, 30, seed=9)

    with serving(desktop) as (line, server):
        assert line.startswith("listening on ws://127.0.0.1:"), line
        url = line.split()[2]
        assert token not in line

        crdtmail(phone, "connect", url, "--token", token, "--for", "default")
        assert (phone / "config.toml").stat().st_mode & 0o077 == 0  # the token is not readable by others
        first = crdtmail(phone, "sync", "--timeout", "30")
        assert "in sync" in first.stdout
        desk_list = as_json(desktop, "ls", "--limit", "1000")
        phone_list = as_json(phone, "ls", "--limit", "1000")
        assert desk_list == phone_list and desk_list["total"] > 0

        target = phone_list["messages"][0]["id"]
        crdtmail(phone, "flag", target, "+flagged")  # offline: no connection now
        crdtmail(phone, "move", target, "Archive")
        crdtmail(phone, "sync", "--timeout", "30")
        shown = as_json(desktop, "show", target)
        assert shown["folder"] == "Archive" and "\\Flagged" in shown["flags"]

        peers = as_json(desktop, "peers")
        assert peers["running"] is not None
        assert peers["running"]["mailboxes"] == {"default": {"held_updates": 0, "shards_to_list": 0}}

        # With the phone staying connected, `status` on either side shows the session and what is in sync.
        with serving(phone):
            deadline = time.monotonic() + 30
            status: dict[str, Any] = {}
            while time.monotonic() < deadline:
                status = as_json(desktop, "status")
                if any("default" in session["synced"] for session in status["sessions"]):
                    break
                time.sleep(0.3)
            assert any("default" in session["synced"] for session in status["sessions"]), status
            text = crdtmail(desktop, "status").stdout
            assert "connected to " in text and "synced default" in text
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
    assert "stopped" in out
    assert token not in out + err


@pytest.mark.timeout(120)
def test_a_first_sync_lists_what_it_stored_before_it_exits(tmp_path: Path) -> None:
    """A phone that fetches no bodies reads no envelope after its first sync: the shards it stored whole are
    still listed before `crdtmail sync` exits, so the next command does not have to."""
    desktop, phone, token = desktop_and_phone(tmp_path, 60, seed=4)
    config = phone / "config.toml"
    config.write_text(config.read_text().replace("# newer_than_days = 90", "fetch = false"))
    with serving(desktop) as (line, _):
        crdtmail(phone, "connect", line.split()[2], "--token", token, "--for", "default")
        crdtmail(phone, "sync", "--timeout", "30")
    with contextlib.closing(sqlite3.connect(phone / "crdtmail.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM documents WHERE name != 'index'").fetchone()[0] > 1
        assert db.execute("SELECT count(*) FROM blobs").fetchone() == (0,)  # no body was fetched
        assert db.execute("SELECT count(*) FROM documents d WHERE d.name != 'index' AND NOT EXISTS (SELECT 1"
                          " FROM indexed_shards i WHERE i.shard = d.name AND i.state_vector = d.state_vector)"
                          ).fetchone() == (0,)
    assert as_json(phone, "ls", "--limit", "1000")["total"] == as_json(desktop, "ls", "--limit", "1000")["total"]


@pytest.mark.timeout(60)
def test_sync_with_a_wrong_token_says_so(tmp_path: Path) -> None:
    desktop, phone = tmp_path / "desktop", tmp_path / "phone"
    crdtmail(desktop, "init")
    crdtmail(phone, "init")
    with serving(desktop) as (line, _):
        crdtmail(phone, "connect", line.split()[2], "--token", "not-a-token")
        result = crdtmail(phone, "sync", "--timeout", "3", check=False)
        assert result.returncode == 1
        assert "refused our device token (HTTP 401)" in result.stdout
        assert "not-a-token" not in result.stdout + result.stderr

@pytest.mark.timeout(120)
def test_a_peer_connected_with_compress_syncs_over_permessage_deflate(tmp_path: Path) -> None:
    desktop, phone, lan = tmp_path / "desktop", tmp_path / "phone", tmp_path / "laptop"
    write_maildir(tmp_path / "Maildir", generate_messages(200, seed=5))
    crdtmail(desktop, "init")
    crdtmail(desktop, "import", str(tmp_path / "Maildir"))
    token = as_json(desktop, "pair", "phone", "--for", "default")["token"]
    with serving(desktop) as (line, _):
        url = line.split()[2]
        crdtmail(phone, "init")
        said = crdtmail(phone, "connect", url, f"--token={token}", "--compress").stdout
        assert "compressed" in said
        assert 'compression = "deflate"' in (phone / "config.toml").read_text()
        assert as_json(phone, "peers")["configured"][0]["compression"] == "deflate"
        [compressed] = as_json(phone, "sync", "--timeout", "30")
        assert compressed["synced"] and compressed["compressed"] is True
        # The same server, dialed without --compress: the link stays uncompressed (the dialer chooses).
        crdtmail(lan, "init")
        crdtmail(lan, "connect", url, f"--token={token}")
        [plain] = as_json(lan, "sync", "--timeout", "30")
        assert plain["synced"] and plain["compressed"] is False
        # Either way each replica holds the whole mailbox.
        assert as_json(phone, "ls", "--limit", "500") == as_json(lan, "ls", "--limit", "500") \
            == as_json(desktop, "ls", "--limit", "500")


def test_a_bad_compression_setting_is_one_clear_error(tmp_path: Path) -> None:
    crdtmail(tmp_path, "init")
    with (tmp_path / "config.toml").open("a") as handle:
        handle.write('\n[[peers]]\nurl = "ws://127.0.0.1:1/sync"\ntoken = "t"\ncompression = "zstd"\n')
    result = crdtmail(tmp_path, "peers", check=False)
    assert result.returncode != 0
    assert 'compression of ws://127.0.0.1:1/sync must be "deflate" or "none"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(180)
def test_a_peer_killed_mid_sync_restarts_and_converges(tmp_path: Path) -> None:
    import random
    import time

    from crdtmail.replica import Replica

    desktop, phone = tmp_path / "desktop", tmp_path / "phone"
    write_maildir(tmp_path / "Maildir", generate_messages(2500, seed=11))
    crdtmail(desktop, "init")
    crdtmail(desktop, "import", str(tmp_path / "Maildir"))
    token = as_json(desktop, "pair", "phone", "--for", "default")["token"]
    crdtmail(phone, "init")
    rng = random.Random()
    with serving(desktop) as (line, _):
        crdtmail(phone, "connect", line.split()[2], f"--token={token}")
        for _ in range(4):
            child = subprocess.Popen([*CLI, "--data-dir", str(phone), "sync", "--timeout", "60"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 1.5))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            with Replica.open(phone) as replica:  # whatever it had committed is intact
                assert replica.store.integrity_check() == "ok"
        crdtmail(phone, "sync", "--timeout", "120")
        assert as_json(phone, "ls", "--limit", "5000") == as_json(desktop, "ls", "--limit", "5000")
        assert as_json(phone, "folders") == as_json(desktop, "folders")
        newest = as_json(phone, "ls", "--limit", "3")["messages"]
        for message in newest:
            assert as_json(phone, "show", message["id"])["body_available"]

@pytest.mark.timeout(120)
def test_sync_over_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    desktop, phone = tmp_path / "desktop", tmp_path / "phone"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    crdtmail(desktop, "init")
    text = (desktop / "config.toml").read_text().replace(
        'port = 7878\n', f'port = 7878\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    (desktop / "config.toml").write_text(text)
    write_maildir(tmp_path / "Maildir", generate_messages(10, seed=2))
    crdtmail(desktop, "import", str(tmp_path / "Maildir"))
    token = as_json(desktop, "pair", "phone")["token"]
    crdtmail(phone, "init")
    with serving(desktop) as (line, _):
        assert line.startswith("listening on wss://127.0.0.1:"), line
        url = line.split()[2]
        crdtmail(phone, "connect", url, f"--token={token}", "--ca", str(cert))
        crdtmail(phone, "sync", "--timeout", "30")
        assert as_json(phone, "ls")["total"] == as_json(desktop, "ls")["total"] > 0
        untrusted = tmp_path / "untrusting"
        crdtmail(untrusted, "init")
        crdtmail(untrusted, "connect", url, f"--token={token}")  # no --ca: the certificate is not trusted
        result = crdtmail(untrusted, "sync", "--timeout", "3", check=False)
        assert result.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in result.stdout


@pytest.mark.timeout(120)
def test_show_fetches_a_body_the_phone_does_not_keep(tmp_path: Path) -> None:
    desktop, phone = tmp_path / "desktop", tmp_path / "phone"
    write_maildir(tmp_path / "Maildir", generate_messages(20, seed=5))
    crdtmail(desktop, "init")
    crdtmail(desktop, "import", str(tmp_path / "Maildir"))
    token = as_json(desktop, "pair", "phone")["token"]
    crdtmail(phone, "init")
    config = phone / "config.toml"
    config.write_text(config.read_text().replace("# newer_than_days = 90", "newer_than_days = 1"))
    with serving(desktop) as (line, _):
        crdtmail(phone, "connect", line.split()[2], f"--token={token}")
        crdtmail(phone, "sync", "--timeout", "30")
        target = as_json(phone, "ls")["messages"][0]["id"]  # the sample mail is older than a day
        from crdtmail.replica import Replica

        with Replica.open(phone) as replica:
            assert replica.mailbox().body(target) is None  # the policy kept it off the phone
        shown = crdtmail(phone, "show", target)
        assert "not stored" not in shown.stdout and "not available" not in shown.stdout
        raw = subprocess.run([*CLI, "--data-dir", str(phone), "show", target, "--raw"], capture_output=True,
                             timeout=60)
        desk_raw = subprocess.run([*CLI, "--data-dir", str(desktop), "show", target, "--raw"],
                                  capture_output=True, timeout=60)
        assert raw.returncode == 0 and raw.stdout == desk_raw.stdout
        other = as_json(phone, "ls")["messages"][1]["id"]
    offline = crdtmail(phone, "show", other, "--wait", "1")  # the desktop is gone now
    assert "not available offline" in offline.stdout
    failed = crdtmail(phone, "show", other, "--raw", "--wait", "1", check=False)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1


def test_a_second_peer_on_a_data_directory_is_refused_while_commands_still_run(tmp_path: Path) -> None:
    desktop = tmp_path / "desktop"
    crdtmail(desktop, "init")
    with serving(desktop) as (_, server):
        again = crdtmail(desktop, "serve", "--port", "0", check=False)
        assert again.returncode == 1 and again.stderr.count("\n") == 1
        assert f"another crdtmail peer (pid {server.pid}) is running on" in again.stderr
        crdtmail(desktop, "connect", "ws://127.0.0.1:9/sync", "--token=unused")
        synced = crdtmail(desktop, "sync", "--timeout", "5", check=False)  # a peer too, if only for a moment
        assert synced.returncode == 1 and "another crdtmail peer" in synced.stderr
        crdtmail(desktop, "status")  # a one-shot command runs beside the peer
