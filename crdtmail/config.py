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

_DEFAULT_TEXT = """\
# crdtmail settings for this data directory. See README.md for every key.

[mailbox]
default = "default"

[store]
# NORMAL survives kill -9 of the process; FULL also survives a power cut, at the cost of an fsync per change.
synchronous = "NORMAL"
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
        return cls(path=path, default_mailbox=default_mailbox, synchronous=synchronous.upper(), raw=raw)

    @staticmethod
    def write_default(path: Path) -> None:
        """Create a commented config file with the defaults, unless one exists."""
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_DEFAULT_TEXT, encoding="utf-8")


def _section(raw: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


def valid_mailbox_name(name: str) -> bool:
    """Mailbox names travel in URLs and frames: 1-64 letters, digits, '.', '_' or '-', not starting with '.'."""
    return (
        0 < len(name) <= 64
        and not name.startswith(".")
        and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
    )
