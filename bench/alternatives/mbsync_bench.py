"""mbsync (isync) pulling a Dovecot IMAP mailbox into a local Maildir: what a user without crdtmail runs.

For each size: a copy of a generated Maildir++ tree (``crdtmail.sample``, cached under the work directory as
``maildir-<N>-s0`` the way ``python -m bench import`` caches it) is served by a private Dovecot on a free port
of 127.0.0.1 (its own config file, base and state directories in a temporary directory, plaintext auth, a
passwd-file user whose mail is that copy). Dovecot refuses mail access as root, so when this runs as root,
Dovecot runs as ``nobody`` and the copy belongs to it (a copy, not hard links: the cache keeps its owner).

Figures: Dovecot's first scan of the mailbox (``doveadm mailbox status``, so mbsync's time is not Dovecot
indexing), mbsync's initial sync into an empty Maildir, a run with nothing changed, and a run after K flag
changes made by renaming files in the served Maildir (what a local mail client does). A user who runs
mbsync every minute sees a change after the wait for the next run (uniform over 0-60 s) plus the run: mean
30 s + run time, p99 59.4 s + run time, at worst 60 s + run time.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.alternatives.wsstacks import Unavailable

MAILDIR_INFO = ":2,"
PASSWORD = "bench-password"  # a throwaway account of a Dovecot that listens on 127.0.0.1 for this run only
APT_PACKAGES = ["isync", "dovecot-imapd"]

GENERATE = """
import sys
from pathlib import Path
from crdtmail.sample import generate_messages, write_maildir
count, seed, target = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
print(write_maildir(target, generate_messages(count, seed=seed)))
"""


def _dovecot_binary() -> str | None:
    return shutil.which("dovecot") or (("/usr/sbin/dovecot") if os.path.exists("/usr/sbin/dovecot") else None)


def _doveadm_binary() -> str | None:
    return shutil.which("doveadm") or (("/usr/bin/doveadm") if os.path.exists("/usr/bin/doveadm") else None)


def ensure_tools(*, apt_install: bool = True) -> dict[str, Any]:
    """mbsync and Dovecot's binaries, installed with apt-get when missing and this runs as root."""
    info: dict[str, Any] = {"installed_now": False}
    if shutil.which("mbsync") is None or _dovecot_binary() is None or _doveadm_binary() is None:
        if not apt_install:
            raise Unavailable(f"mbsync/dovecot are not installed (apt-get install {' '.join(APT_PACKAGES)}); "
                              "this run was asked not to install them")
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            raise Unavailable("mbsync/dovecot are not installed and cannot be installed here (needs apt-get as root: "
                              f"apt-get install {' '.join(APT_PACKAGES)})")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        command = [apt, "install", "-y", "-q", *APT_PACKAGES]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
            if result.returncode != 0:
                subprocess.run([apt, "update", "-q"], capture_output=True, text=True, timeout=600, env=env)
                result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            raise Unavailable("apt-get did not finish in time") from None
        if result.returncode != 0 or shutil.which("mbsync") is None or _dovecot_binary() is None:
            raise Unavailable(f"apt-get install {' '.join(APT_PACKAGES)} failed: {result.stderr.strip()[-500:]}")
        info["installed_now"] = True
    versions = {}
    for name, argv in (("mbsync", ["mbsync", "--version"]), ("dovecot", [str(_dovecot_binary()), "--version"])):
        try:
            versions[name] = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            versions[name] = f"unknown ({exc})"
    info["versions"] = versions
    return info


def cached_maildir(work_dir: Path, count: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """The generated Maildir of ``count`` messages under ``work_dir`` (generated once, as bench import does)."""
    maildir = work_dir / f"maildir-{count}-s{seed}"
    if maildir.exists():
        return maildir, {"cached": True}
    partial = maildir.with_name(maildir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", GENERATE, str(count), str(seed), str(partial)], check=True,
                   timeout=1800, cwd=Path(__file__).resolve().parent.parent.parent, capture_output=True)
    partial.rename(maildir)
    return maildir, {"cached": False, "seconds": time.perf_counter() - started}


def _mail_files(root: Path) -> dict[str, list[Path]]:
    """Folder name -> message files (cur/ and new/) of a Maildir++ tree."""
    folders: dict[str, list[Path]] = {}
    for directory in [root, *sorted(p for p in root.iterdir() if p.name.startswith(".") and p.is_dir())]:
        name = "INBOX" if directory == root else directory.name[1:]
        files: list[Path] = []
        for sub in ("cur", "new"):
            if (directory / sub).is_dir():
                files += [directory / sub / entry for entry in os.listdir(directory / sub)]
        if (directory / "cur").is_dir():
            folders[name] = files
    return folders


def _seen_counts(root: Path) -> dict[str, tuple[int, int]]:
    """Folder -> (messages, messages with the S flag)."""
    counts = {}
    for folder, files in _mail_files(root).items():
        seen = sum(1 for f in files if MAILDIR_INFO in f.name and "S" in f.name.rsplit(MAILDIR_INFO, 1)[1])
        counts[folder] = (len(files), seen)
    return counts


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Dovecot:
    """A private Dovecot serving one Maildir on 127.0.0.1; ``stop`` always ends it."""

    def __init__(self, home: Path, maildir: Path, user: pwd.struct_passwd) -> None:
        self.home = home
        self.maildir = maildir
        self.user = user
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.config = home / "dovecot.conf"

    def _as_user(self) -> dict[str, Any]:
        if os.geteuid() == 0 and self.user.pw_uid != 0:
            return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return {}

    def write_config(self) -> None:
        import grp

        home, user = self.home, self.user
        for sub in ("run", "state", "index", "home"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        group = grp.getgrgid(user.pw_gid).gr_name
        (home / "passwd").write_text(
            f"bench:{{PLAIN}}{PASSWORD}:{user.pw_uid}:{user.pw_gid}::{home / 'home'}::"
            f"userdb_mail=maildir:{self.maildir}:INDEX={home / 'index'}\n")
        self.config.write_text(f"""# a private Dovecot for crdtmail's benchmark: loopback only, this run only
base_dir = {home / 'run'}
state_dir = {home / 'state'}
instance_name = crdtmail-bench-{os.getpid()}
log_path = {home / 'dovecot.log'}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = {user.pw_name}
default_internal_user = {user.pw_name}
default_internal_group = {group}
mail_location = maildir:{self.maildir}:INDEX={home / 'index'}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {home / 'passwd'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {home / 'passwd'}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
""")
        if self._as_user():
            for path in (home, *home.rglob("*")):
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> None:
        binary = _dovecot_binary()
        assert binary is not None
        for _attempt in range(3):
            self.port = _free_port()
            self.write_config()
            self.process = subprocess.Popen(
                [binary, "-F", "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, **self._as_user(),
            )
            if self._ready(20):
                return
            self.stop()
        raise RuntimeError(f"dovecot did not start: {self.log_tail()}")

    def _ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                    if conn.recv(200).startswith(b"* OK"):
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def log_tail(self) -> str:
        try:
            return (self.home / "dovecot.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        doveadm = _doveadm_binary()
        assert doveadm is not None
        return subprocess.run([doveadm, "-c", str(self.config), *args], capture_output=True, text=True,
                              timeout=600, **self._as_user())

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # the master stops its own children
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
        self.process = None


def _mbsync_config(path: Path, port: int, near: Path, state: Path) -> None:
    path.write_text(f"""IMAPAccount bench
Host 127.0.0.1
Port {port}
User bench
Pass {PASSWORD}
SSLType None
AuthMechs PLAIN

IMAPStore far
Account bench

MaildirStore near
Inbox {near}
SubFolders Maildir++

Channel bench
Far :far:
Near :near:
Patterns *
Create Near
Sync All
Expunge None
SyncState {state}/
""")


def _run_mbsync(config: Path, timeout: float) -> float:
    started = time.perf_counter()
    result = subprocess.run(["mbsync", "-c", str(config), "-a", "-q"], capture_output=True, text=True,
                            timeout=timeout)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mbsync failed ({result.returncode}): {result.stderr.strip()[-1000:]}")
    return seconds


def _toggle_seen(maildir: Path, changes: int, seed: int) -> int:
    """Rename ``changes`` files of the served Maildir's cur/ directories, toggling their S flag."""
    candidates = [f for files in _mail_files(maildir).values() for f in files
                  if f.parent.name == "cur" and MAILDIR_INFO in f.name]
    chosen = random.Random(seed).sample(sorted(candidates), min(changes, len(candidates)))
    for path in chosen:
        base, info = path.name.rsplit(MAILDIR_INFO, 1)
        info = info.replace("S", "") if "S" in info else "".join(sorted(info + "S"))
        path.rename(path.with_name(f"{base}{MAILDIR_INFO}{info}"))
    return len(chosen)


def _one_size(maildir: Path, count: int, changes: int, noop_runs: int) -> dict[str, Any]:
    user = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    scratch = Path(tempfile.mkdtemp(prefix="crdtmail-bench-dovecot-"))
    figures: dict[str, Any] = {"messages": count}
    dovecot: Dovecot | None = None
    try:
        os.chmod(scratch, 0o755)
        served = scratch / "served"
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(maildir), str(served)], check=True, timeout=1800)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(served)], check=True, timeout=600)
        figures["copy_s"] = time.perf_counter() - started
        dovecot = Dovecot(scratch / "dovecot", served, user)
        dovecot.start()
        started = time.perf_counter()
        status = dovecot.doveadm("mailbox", "status", "-u", "bench", "messages", "*")
        if status.returncode != 0:
            raise RuntimeError(f"doveadm failed: {status.stderr.strip()[-500:]}")
        figures["dovecot_first_scan_s"] = time.perf_counter() - started
        near, state, config = scratch / "near", scratch / "mbsync-state", scratch / "mbsyncrc"
        state.mkdir()
        _mbsync_config(config, dovecot.port, near, state)
        figures["initial_sync_s"] = _run_mbsync(config, 1800)
        source_counts, near_counts = _seen_counts(served), _seen_counts(near)
        figures["initial_complete"] = source_counts == near_counts
        figures["messages_synced"] = sum(total for total, _ in near_counts.values())
        noop = [_run_mbsync(config, 600) for _ in range(noop_runs)]
        figures["no_change_run_s"] = sorted(noop)[len(noop) // 2]
        figures["flag_changes"] = _toggle_seen(served, changes, seed=count)
        figures["incremental_run_s"] = _run_mbsync(config, 600)
        figures["incremental_complete"] = _seen_counts(served) == _seen_counts(near)
        run = figures["incremental_run_s"]
        figures["change_to_visible_every_minute"] = {
            "mean_s": 30 + run, "p99_s": 59.4 + run, "max_s": 60 + run,
            "model": "mbsync every 60 s: wait uniform over 0-60 s for the next run, then the incremental run",
        }
    finally:
        if dovecot is not None:
            dovecot.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def run_mbsync(*, quick: bool, work_dir: Path, apt_install: bool = True) -> dict[str, Any]:
    """The mbsync + Dovecot stack's figures, or {"available": False, "why": ...}."""
    try:
        tools = ensure_tools(apt_install=apt_install)
    except Unavailable as exc:
        return {"available": False, "why": str(exc)}
    sizes = [500] if quick else [10_000, 100_000]
    changes = 50 if quick else 1000
    result: dict[str, Any] = {
        "available": True, "install": {"installed_now": tools["installed_now"]}, "versions": tools["versions"],
        "setup": "Dovecot IMAP (private config, 127.0.0.1, plaintext auth, Maildir++) -> mbsync (Sync All, "
                 "Create Near, FSync default) -> a local Maildir++; mbsync run as this process's user",
        "notes": [
            "Dovecot refuses mail access as root: when the bench runs as root, Dovecot runs as 'nobody' and "
            "serves a copy of the generated Maildir owned by it.",
            "dovecot_first_scan_s is Dovecot building its index of the new mailbox, done before mbsync runs.",
            "mbsync has no push: a change is visible after the next scheduled run.",
        ],
        "sizes": {},
    }
    for count in sizes:
        try:
            maildir, generated = cached_maildir(work_dir, count)
            figures = _one_size(maildir, count, changes, noop_runs=3)
            figures["generated"] = generated
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            figures = {"messages": count, "error": f"{type(exc).__name__}: {exc}"}
        result["sizes"][str(count)] = figures
    result["ok"] = all("error" not in figures for figures in result["sizes"].values())
    return result

