"""Where a peer keeps its data and settings: platformdirs defaults, explicit overrides, a TOML config file.

Everything else in crdtmail takes explicit arguments; only the command line and the peer processes read this.

The config file (``config.toml`` in the data directory, unless ``--config`` names another) looks like::

    [mailbox]
    default = "default"        # the mailbox commands act on when --mailbox is not given

    [store]
    synchronous = "NORMAL"     # NORMAL: survives kill -9; FULL: also survives power loss, slower commits

Later sections (listen address, peers, body policy) are added by the features that use them; unknown keys are kept
and ignored so an older crdtmail can read a newer file.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from crdtmail.errors import ConfigError

APP_NAME = "crdtmail"
CONFIG_FILE = "config.toml"
DATABASE_FILE = "crdtmail.sqlite3"
DATA_DIR_ENV = "CRDTMAIL_DATA_DIR"
DEFAULT_HOST = "127.0.0.1"  # listening beyond this machine is a decision, never a default
DEFAULT_PORT = 7878

_DEFAULT_TEXT = """\
# crdtmail settings for this data directory. See README.md for every key.

[mailbox]
default = "default"

[store]
# NORMAL survives kill -9 of the process; FULL also survives a power cut, at the cost of an fsync per change.
synchronous = "NORMAL"

[listen]
# Where `crdtmail serve` accepts paired devices. 127.0.0.1 keeps it on this machine.
host = "127.0.0.1"
port = 7878
# wss:// instead of ws://: a certificate and its key (PEM).
# tls_cert = "cert.pem"
# tls_key = "key.pem"

[bodies]
# Which message bodies to fetch from peers ahead of time. A desktop fetches all; a phone may keep to recent,
# small mail (the rest stays on the peers that have it):
# newer_than_days = 90
# max_bytes = 1000000

[maildirs]
# The Maildir each mailbox mirrors when `crdtmail desktop` runs (or give --maildir on its command line):
# default = "~/Maildir"

[bridge]
# A message expunged on another device has its file moved to <Maildir>/crdtmail-expunged/, kept this long:
expunged_retention_days = 30
# A full rescan of the Maildir runs this often, besides watching it for changes:
rescan_seconds = 300

# Peers to dial are added by `crdtmail connect URL --token T`, as [[peers]] tables at the end of this file.
# A peer reached over a slow or metered link may get compression = "deflate" (`connect --compress`).
"""


def default_data_dir() -> Path:
    """The data directory used when neither --data-dir nor $CRDTMAIL_DATA_DIR is given."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def resolve_data_dir(explicit: str | os.PathLike[str] | None) -> Path:
    """The data directory: the explicit one, else $CRDTMAIL_DATA_DIR, else the platform default."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return default_data_dir()


@dataclass(frozen=True)
class Config:
    """Settings read from the config file, with defaults for everything missing."""

    path: Path
    default_mailbox: str = "default"
    synchronous: str = "NORMAL"
    listen_host: str = DEFAULT_HOST
    listen_port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    fetch_bodies: bool = True
    bodies_newer_than_days: float | None = None
    bodies_max_bytes: int | None = None
    peers: tuple[RemotePeer, ...] = ()
    maildirs: dict[str, Path] = field(default_factory=dict)  # mailbox name -> Maildir the desktop peer mirrors
    expunged_retention_days: float = 30.0
    rescan_seconds: float = 300.0
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Config:
        """Read ``path``; a missing file gives the defaults, a malformed one raises ConfigError."""
        if not path.exists():
            return cls(path=path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix or remove it") from exc
        mailbox = _section(raw, "mailbox", path)
        store = _section(raw, "store", path)
        default_mailbox = mailbox.get("default", "default")
        if not isinstance(default_mailbox, str) or not valid_mailbox_name(default_mailbox):
            raise ConfigError(f"{path}: [mailbox] default must be a mailbox name (letters, digits, . _ -)")
        synchronous = store.get("synchronous", "NORMAL")
        if not isinstance(synchronous, str) or synchronous.upper() not in ("NORMAL", "FULL"):
            raise ConfigError(f'{path}: [store] synchronous must be "NORMAL" or "FULL"')
        listen = _section(raw, "listen", path)
        host = listen.get("host", DEFAULT_HOST)
        port = listen.get("port", DEFAULT_PORT)
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{path}: [listen] host must be a host name or address")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"{path}: [listen] port must be a number from 0 to 65535")
        tls = {key: listen.get(key) for key in ("tls_cert", "tls_key")}
        if any(value is not None and not isinstance(value, str) for value in tls.values()) or (
            (tls["tls_cert"] is None) != (tls["tls_key"] is None)
        ):
            raise ConfigError(f"{path}: [listen] tls_cert and tls_key must both be file paths, or both absent")
        bodies = _section(raw, "bodies", path)
        fetch = bodies.get("fetch", True)
        days = bodies.get("newer_than_days")
        max_bytes = bodies.get("max_bytes")
        if not isinstance(fetch, bool):
            raise ConfigError(f"{path}: [bodies] fetch must be true or false")
        if days is not None and (not isinstance(days, int | float) or days <= 0):
            raise ConfigError(f"{path}: [bodies] newer_than_days must be a positive number of days")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ConfigError(f"{path}: [bodies] max_bytes must be a positive number of bytes")
        maildirs = _section(raw, "maildirs", path)
        for name, value in maildirs.items():
            if not valid_mailbox_name(name) or not isinstance(value, str) or not value:
                raise ConfigError(f'{path}: [maildirs] entries are mailbox = "/path/to/Maildir"')
        bridge = _section(raw, "bridge", path)
        retention = bridge.get("expunged_retention_days", 30.0)
        rescan = bridge.get("rescan_seconds", 300.0)
        if not isinstance(retention, int | float) or retention < 0:
            raise ConfigError(f"{path}: [bridge] expunged_retention_days must be a number of days (0 or more)")
        if not isinstance(rescan, int | float) or rescan <= 0:
            raise ConfigError(f"{path}: [bridge] rescan_seconds must be a positive number of seconds")
        peers = raw.get("peers", [])
        if not isinstance(peers, list):
            raise ConfigError(f"{path}: peers must be [[peers]] tables")
        return cls(path=path, default_mailbox=default_mailbox, synchronous=synchronous.upper(), listen_host=host,
                   listen_port=port, peers=tuple(RemotePeer.from_toml(entry, path) for entry in peers), raw=raw,
                   tls_cert=_path(tls["tls_cert"], path), tls_key=_path(tls["tls_key"], path),
                   fetch_bodies=fetch, bodies_newer_than_days=days, bodies_max_bytes=max_bytes,
                   maildirs={name: _path(value, path) or Path(value) for name, value in maildirs.items()},
                   expunged_retention_days=float(retention), rescan_seconds=float(rescan))

    def server_tls(self) -> ssl.SSLContext | None:
        """The TLS context for ``serve`` (wss://), when [listen] names a certificate and key."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {self.tls_cert} and key {self.tls_key}: {exc}") from exc
        return context

    def add_peer(self, peer: RemotePeer) -> None:
        """Append a peer to dial to the config file (kept readable by its owner only: it holds a token)."""
        if any(existing.url == peer.url for existing in self.peers):
            raise ConfigError(f"{peer.url} is configured already; edit {self.path} to change it")
        Config.write_default(self.path)
        mailboxes = ", ".join(_toml_string(name) for name in peer.mailboxes)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"\n[[peers]]\nurl = {_toml_string(peer.url)}\ntoken = {_toml_string(peer.token)}\n"
                         f"mailboxes = [{mailboxes}]\n")
            if peer.ca is not None:
                handle.write(f"ca = {_toml_string(str(peer.ca.resolve()))}\n")
            if peer.compression is not None:
                handle.write(f"compression = {_toml_string(peer.compression)}\n")
        self.path.chmod(0o600)

    @staticmethod
    def write_default(path: Path) -> None:
        """Create a commented config file with the defaults, unless one exists."""
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_DEFAULT_TEXT, encoding="utf-8")


@dataclass(frozen=True)
class RemotePeer:
    """A peer this one dials: its URL, the device token it gave us, the mailboxes to sync with it."""

    url: str
    token: str
    mailboxes: tuple[str, ...]
    ca: Path | None = None  # a CA file to trust for wss:// (a peer's self-signed certificate)
    # "deflate" asks that peer for permessage-deflate on this link: fewer bytes (an initial sync shrinks about
    # 2.6x) for more CPU on both ends, worth it on a metered or slow link, not on a LAN (see README.md).
    compression: str | None = None

    def client_tls(self) -> ssl.SSLContext | None:
        """The TLS context to dial a wss:// URL with; None for ws://."""
        if not self.url.startswith("wss://"):
            return None
        try:
            return ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the CA file {self.ca} for {self.url}: {exc}") from exc

    @classmethod
    def from_toml(cls, entry: Any, path: Path) -> RemotePeer:
        """Read one [[peers]] table."""
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: each [[peers]] entry must be a table")
        url, token, mailboxes = entry.get("url"), entry.get("token"), entry.get("mailboxes", ["default"])
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"{path}: a [[peers]] url must start with ws:// or wss://")
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{path}: the [[peers]] entry for {url} needs its device token")
        if not isinstance(mailboxes, list) or not all(isinstance(m, str) and valid_mailbox_name(m) for m in mailboxes):
            raise ConfigError(f"{path}: mailboxes of {url} must be a list of mailbox names")
        ca = entry.get("ca")
        if ca is not None and not isinstance(ca, str):
            raise ConfigError(f"{path}: ca of {url} must be a file path")
        compression = entry.get("compression", "none")
        if compression not in COMPRESSION_CHOICES:
            raise ConfigError(f"{path}: compression of {url} must be \"deflate\" or \"none\", not {compression!r}")
        return cls(url, token, tuple(mailboxes), _path(ca, path), compression if compression != "none" else None)


def _path(value: str | None, config_path: Path) -> Path | None:
    """A path from the config file; a relative one is taken from the config file's directory."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else config_path.parent / path


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _section(raw: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


COMPRESSION_CHOICES = ("none", "deflate")


def valid_mailbox_name(name: str) -> bool:
    """Mailbox names travel in URLs and frames: 1-64 letters, digits, '.', '_' or '-', not starting with '.'."""
    return (
        0 < len(name) <= 64
        and not name.startswith(".")
        and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
    )
