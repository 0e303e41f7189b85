"""The crdtmail command line, run in-process and as a subprocess, on real files in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from crdtmail.cli import main
from crdtmail.sample import generate_messages, write_maildir
from tests.conftest import make_raw


def run(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--data-dir", str(data_dir), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> Any:
    code, out, err = run(capsys, data_dir, *args, "--json")
    assert code == 0, err
    return orjson.loads(out)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    root = tmp_path / "Maildir"
    write_maildir(root, generate_messages(60, seed=3))
    return root


@pytest.fixture
def data_dir(tmp_path: Path, maildir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    data = tmp_path / "peer"
    assert run(capsys, data, "init")[0] == 0
    code, _, err = run(capsys, data, "import", str(maildir))
    assert code == 0, err
    return data


def test_import_then_list_show_and_change(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    status = run_json(capsys, data_dir, "status")
    assert status["mailboxes"][0]["messages"] > 0
    listing = run_json(capsys, data_dir, "ls", "INBOX", "--limit", "5")
    assert 0 < len(listing["messages"]) <= 5
    dates = [m["date"] or 0 for m in listing["messages"]]
    assert dates == sorted(dates, reverse=True)
    first = listing["messages"][0]["id"]

    shown = run_json(capsys, data_dir, "show", first[:8])
    assert shown["id"] == first and shown["body_available"]
    code, out, _ = run(capsys, data_dir, "show", first)
    assert code == 0 and "Subject:" in out

    flagged = run_json(capsys, data_dir, "flag", first, "+flagged", "-seen", "+$Todo")
    assert "\\Flagged" in flagged["flags"] and "$Todo" in flagged["flags"] and "\\Seen" not in flagged["flags"]
    assert run(capsys, data_dir, "move", first, "Archive")[0] == 0
    assert run_json(capsys, data_dir, "show", first)["folder"] == "Archive"
    assert run(capsys, data_dir, "delete", first)[0] == 0
    assert run_json(capsys, data_dir, "show", first)["folder"] == "Trash"
    assert run(capsys, data_dir, "expunge", first)[0] == 0
    code, _, err = run(capsys, data_dir, "show", first)
    assert code == 1 and err.count("\n") == 1 and "no message" in err


def test_expunged_mail_is_not_imported_again(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                            maildir: Path) -> None:
    victim = run_json(capsys, data_dir, "ls")["messages"][0]["id"]
    before = run_json(capsys, data_dir, "status")["mailboxes"][0]["messages"]
    assert run(capsys, data_dir, "expunge", victim)[0] == 0
    report = run_json(capsys, data_dir, "import", str(maildir))
    assert report["added"] == 0 and report["expunged_skipped"] == 1
    assert run_json(capsys, data_dir, "status")["mailboxes"][0]["messages"] == before - 1


def test_folders_commands(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert run(capsys, data_dir, "folders", "create", "Clients/Acme")[0] == 0
    paths = {f["path"] for f in run_json(capsys, data_dir, "folders")}
    assert {"INBOX", "Clients", "Clients/Acme", "Work", "Work/Projects"} <= paths
    assert run(capsys, data_dir, "folders", "rename", "Clients/Acme", "Clients/Globex")[0] == 0
    message = run_json(capsys, data_dir, "ls")["messages"][0]["id"]
    assert run(capsys, data_dir, "move", message, "Clients/Globex")[0] == 0
    code, _, err = run(capsys, data_dir, "folders", "delete", "Clients/Globex")
    assert code == 1 and "--move-to-trash" in err
    assert run(capsys, data_dir, "folders", "delete", "Clients/Globex", "--move-to-trash")[0] == 0
    assert run_json(capsys, data_dir, "show", message)["folder"] == "Trash"


def test_bad_input_is_one_line_nonzero_and_changes_nothing(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                         tmp_path: Path) -> None:
    before = run_json(capsys, data_dir, "status")
    message = run_json(capsys, data_dir, "ls")["messages"][0]["id"]
    cases = [
        ("import", str(tmp_path / "missing")),
        ("show", "zzzzzzzzzzzz"),
        ("flag", message, "+has space"),
        ("flag", message, "seen"),
        ("move", message, "No Such Folder"),
        ("folders", "rename", "INBOX", "Other"),
        ("ls", "--mailbox", "nope"),
    ]
    for case in cases:
        code, _, err = run(capsys, data_dir, *case)
        assert code == 1, case
        assert err.startswith("crdtmail: error: ") and err.count("\n") == 1, (case, err)
    after = run_json(capsys, data_dir, "status")
    assert after["mailboxes"] == before["mailboxes"]


def test_unparseable_file_is_reported_and_the_rest_imported(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    root = tmp_path / "Odd"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "cur" / "1.good:2,S").write_bytes(make_raw("fine"))
    (root / "cur" / "2.bad:2,").write_bytes(b"\x00\x01binary junk")
    data = tmp_path / "peer"
    run(capsys, data, "init")
    code, _, err = run(capsys, data, "import", str(root))
    assert code == 1
    assert "2.bad" in err and "1 files could not be imported" in err
    assert run_json(capsys, data, "status")["mailboxes"][0]["messages"] == 1


def test_missing_or_corrupt_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, tmp_path / "nothing", "ls")
    assert code == 1 and "crdtmail init" in err
    broken = tmp_path / "broken"
    run(capsys, broken, "init")
    database = broken / "crdtmail.sqlite3"
    database.write_bytes(os.urandom(8192))
    code, _, err = run(capsys, broken, "status")
    assert code == 1 and err.count("\n") == 1 and str(database) in err


def test_console_script_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "CRDTMAIL_DATA_DIR": str(tmp_path / "peer")}
    cli = [sys.executable, "-m", "crdtmail.cli"]
    assert subprocess.run([*cli, "init"], env=env, capture_output=True).returncode == 0
    result = subprocess.run([*cli, "show", "abc"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("crdtmail: error:")
    result = subprocess.run([*cli, "no-such-command"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    result = subprocess.run([*cli, "--json", "status"], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and orjson.loads(result.stdout)["mailboxes"] == []


def test_pair_devices_unpair(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    paired = run_json(capsys, data_dir, "pair", "phone", "--for", "default", "--for", "work")
    assert paired["mailboxes"] == ["default", "work"] and len(paired["token"]) >= 40
    listed = run_json(capsys, data_dir, "devices")
    assert listed[0]["device"] == "phone" and "token" not in listed[0]
    code, out, _ = run(capsys, data_dir, "unpair", "phone")
    assert code == 0 and paired["token"] not in out
    code, _, err = run(capsys, data_dir, "unpair", "phone")
    assert code == 1 and "no paired device" in err
