"""peers/inotify.py: the desktop peer's Maildir watcher, on a real Maildir and a real event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peers import inotify

pytestmark = pytest.mark.skipif(not inotify.available(), reason="inotify is Linux only")


def maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


class Seen:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.folder_events = 0

    def on_paths(self, paths: list[str]) -> None:
        self.paths.extend(paths)

    def on_folders(self) -> None:
        self.folder_events += 1


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def watching(root: Path, folder_dirs: list[str]) -> AsyncIterator[tuple[Seen, inotify.MaildirWatch]]:
    """A watch of ``root``'s folder directories on the running loop, closed afterwards, and what it reported."""
    seen = Seen()
    watch = inotify.MaildirWatch(root, seen.on_paths, seen.on_folders)
    watch.start(asyncio.get_running_loop(), folder_dirs)
    try:
        yield seen, watch
    finally:
        watch.close()


def test_files_in_cur_and_new_are_reported_and_tmp_is_not_watched(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    maildir(root / ".Work")

    async def main() -> Seen:
        async with watching(root, ["", ".Work"]) as (seen, _watch):
            (root / "tmp" / "1.x").write_bytes(b"a delivery in progress")
            os.rename(root / "tmp" / "1.x", root / "new" / "1.x")  # only the arrival in new/ is news
            os.rename(root / "new" / "1.x", root / ".Work" / "cur" / "1.x:2,S")
            (root / ".Work" / "cur" / "1.x:2,S").unlink()
            (root / "cur" / ".hidden").write_bytes(b"not a message")
            await settle()
        return seen

    seen = asyncio.run(main())
    assert seen.paths == [str(root / "new" / "1.x"), str(root / "new" / "1.x"), str(root / ".Work" / "cur" / "1.x:2,S"),
                          str(root / ".Work" / "cur" / "1.x:2,S")]
    assert seen.folder_events == 0


def test_folder_directories_are_reported_and_watched_after_a_refresh(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")

    async def main() -> tuple[Seen, int, int]:
        async with watching(root, [""]) as (seen, watch):
            maildir(root / ".Lists")
            (root / "crdtmail-expunged").mkdir()  # not a folder: no news
            await settle()
            created = seen.folder_events
            watch.refresh(["", ".Lists"])
            (root / ".Lists" / "new" / "2.y").write_bytes(b"mail")
            os.rename(root / ".Lists", root / ".Archive")
            await settle()
            renamed = seen.folder_events
        return seen, created, renamed

    seen, created, renamed = asyncio.run(main())
    assert created >= 1 and renamed > created
    assert seen.paths == [str(root / ".Lists" / "new" / "2.y")]


def test_a_refresh_drops_the_watches_of_folders_that_went_away(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    maildir(root / ".Old")

    async def main() -> Seen:
        async with watching(root, ["", ".Old"]) as (seen, watch):
            watch.refresh([""])
            (root / ".Old" / "new" / "3.z").write_bytes(b"mail")
            (root / "new" / "4.z").write_bytes(b"mail")
            await settle()
        return seen

    assert asyncio.run(main()).paths == [str(root / "new" / "4.z")]
