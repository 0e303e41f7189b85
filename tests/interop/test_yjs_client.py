"""Interop: a stock Node Yjs client (npm yjs + y-websocket + ws) syncs a shard over /<mailbox>/<document>.

The test installs the npm packages itself (into a temporary directory; npm's cache makes reruns quick).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from crdtmail.peer import Peer
from crdtmail.replica import Replica
from tests.conftest import make_raw

HERE = Path(__file__).resolve().parent
PACKAGES = ["yjs@13.6.33", "y-websocket@3.0.0", "ws@8.23.0"]


@pytest.fixture(scope="session")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("the interop test needs Node.js and npm on PATH (Debian: apt-get install nodejs npm)")
    directory = tmp_path_factory.mktemp("yjs-client")
    (directory / "package.json").write_text('{"name": "crdtmail-interop", "private": true, "type": "module"}')
    result = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *PACKAGES],
        cwd=directory, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    shutil.copy(HERE / "yclient.mjs", directory / "yclient.mjs")
    return directory / "yclient.mjs"


@pytest.mark.timeout(120)
def test_a_stock_yjs_client_syncs_a_shard_both_ways(tmp_path: Path, node_client: Path) -> None:
    replica = Replica.init(tmp_path / "desktop")

    async def main() -> None:
        peer = Peer(replica)
        box = peer.mailbox("default")
        ids = sorted(box.add(make_raw(f"m{n}", date=f"{n + 1:02d} Nov 2026 10:00:00 +0000")).message_id
                     for n in range(5))
        box.add(make_raw("other month", date="01 Oct 2026 10:00:00 +0000"))
        token = peer.registry.pair("yjs", ["default"])
        server = await peer.serve()
        port = server.sockets[0].getsockname()[1]
        node = await asyncio.create_subprocess_exec(
            "node", str(node_client), f"ws://127.0.0.1:{port}", "default/2026-11", token, f"{ids[0]}/\\Seen",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(node.communicate(), 60)
        assert node.returncode == 0, err.decode()
        assert json.loads(out.decode().strip().splitlines()[-1])["ids"] == ids
        deadline = asyncio.get_running_loop().time() + 10
        while "\\Seen" not in box.message(ids[0]).flags:
            assert asyncio.get_running_loop().time() < deadline, "the Yjs client's change did not arrive"
            await asyncio.sleep(0.02)

        # A wrong token, and a mailbox the device was not paired for, get nothing.
        for room, key in (("default/2026-11", "wrong-token"), ("secret/2026-11", token)):
            node = await asyncio.create_subprocess_exec(
                "node", str(node_client), f"ws://127.0.0.1:{port}", room, key, "x/y",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(1.5)
            node.kill()
            out, _ = await node.communicate()
            assert b"ids" not in out
        assert "secret" not in replica.mailbox_names()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    replica.close()
