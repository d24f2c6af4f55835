"""Headless Chromium driven over the DevTools protocol (a websocket; aiohttp's client is already a locked
dependency of mlflow), and an MLflow UI server started the way ``make ui`` starts it."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipeline.net import free_port
from tests.helpers_train import ROOT


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One headless Chromium page; ``eval`` runs JavaScript in it and returns the value."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="cpvt-chromium-")
        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
            if not line and self.proc.poll() is not None:
                break
        if port is None:
            self.close()
            raise RuntimeError("chromium did not start its DevTools endpoint")
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        self.loop.run_until_complete(self._connect(ws_url))
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    async def _connect(self, ws_url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        msg_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=120)).data)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles, timeout: float = 90) -> str:
        """Poll the page's visible text until every needle is in it; returns the text (fails with it)."""
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"page text lacks {missing} after {timeout}s:\n{text[:4000]}")

    def wait_for(self, js_condition: str, timeout: float = 90, what: str = "") -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval(f"Boolean({js_condition})"):
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what or js_condition}:\n{self.text()[:4000]}")

    def click_text(self, text: str, selector: str = "button, [role=button], [role=menuitemcheckbox], label") -> None:
        """Click the first visible element matching ``selector`` whose text is ``text``."""
        found = self.eval(f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})]
                .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);
            if (!els.length) return false; els[0].click(); return true; }})()""")
        if not found:
            raise AssertionError(f"no clickable {text!r} on the page:\n{self.text()[:3000]}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            async def _close():
                await self.ws.close()
                await self.session.close()
            try:
                loop.run_until_complete(_close())
            finally:
                loop.close()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class UIServer:
    """``python -m pipeline.tracking ui`` (what ``make ui`` runs) on a free port over ``uri``."""

    def __init__(self, uri: str, env: dict[str, str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="cpvt-mlflow-ui-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.tracking", "ui", "--port", str(self.port),
                                      "--uri", uri], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"make ui exited rc={self.proc.returncode}:\n{self.output()}")
            try:
                if urllib.request.urlopen(f"{self.base}/health", timeout=5).read().strip() == b"OK":
                    return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"the MLflow server did not answer /health:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
