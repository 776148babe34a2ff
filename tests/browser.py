"""Headless Chromium for UI checks, driven over the DevTools protocol (aiohttp's websocket client,
which Ray installs), so that a test can read what the page rendered and click in it: ``--dump-dom``
alone can neither click nor wait for an image to decode.

    async with browser.page(url) as page:
        value = await page.eval("document.title")

Chromium: /usr/bin/chromium (Debian: ``apt-get install -y chromium``); ``skip_unless_available()``
skips a test where it or aiohttp is missing. Each page has a throw-away profile and is stopped
through its own process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from servers import stop_group

CHROMIUM = "/usr/bin/chromium"


def skip_unless_available() -> None:
    pytest.importorskip("aiohttp")
    if not Path(CHROMIUM).exists() or not shutil.which("chromium"):
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")


class Page:
    """One Chromium tab."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.n:
                return msg

    async def eval(self, js: str):
        res = await self.call("Runtime.evaluate", expression=js, returnByValue=True)
        return res["result"]["result"].get("value")

    async def eval_in(self, frame_id: str, js: str):
        """``js`` evaluated in the frame ``frame_id`` (an isolated world: the frame's DOM, not its scripts)."""
        world = await self.call("Page.createIsolatedWorld", frameId=frame_id, worldName="test")
        res = await self.call("Runtime.evaluate", expression=js, returnByValue=True,
                              contextId=world["result"]["executionContextId"])
        return res["result"]["result"].get("value")

    async def child_frames(self) -> list[dict]:
        tree = await self.call("Page.getFrameTree")
        return [f["frame"] for f in tree["result"]["frameTree"].get("childFrames", [])]

    async def json_when(self, js: str, ready: Callable[[object], bool], timeout: float = 30.0):
        """``js`` (which returns JSON text) parsed, once ``ready`` of it holds or at the timeout."""
        deadline = time.time() + timeout
        while True:
            value = json.loads(await self.eval(js) or "null")
            if ready(value) or time.time() > deadline:
                return value
            await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def page(url: str, window: str = "1400,900") -> AsyncIterator[Page]:
    """A headless Chromium tab navigated to ``url``. Site isolation is off, so that frames of other
    origins (MLflow's artifact viewer shows an HTML artifact in a sandboxed blob: frame) are frames
    of this tab: ``Page.getFrameTree`` lists them and ``Page.eval_in`` reads them."""
    import aiohttp

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        log = Path(profile) / "stderr.log"  # a file, not a pipe: a pipe nobody reads would block chromium
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 "--disable-site-isolation-trials", "--disable-features=IsolateOrigins,site-per-process",
                 f"--window-size={window}", "about:blank"], stderr=err, start_new_session=True)
        try:
            deadline = time.time() + 30
            while not (m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text())):
                assert time.time() < deadline and proc.poll() is None, \
                    f"chromium did not open its DevTools port:\n{log.read_text()[-2000:]}"
                await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{m.group(1)}/json/list") as r:
                    tab = next(t for t in await r.json() if t["type"] == "page")
                async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    p = Page(ws)
                    await p.call("Page.navigate", url=url)
                    yield p
        finally:
            stop_group(proc)
