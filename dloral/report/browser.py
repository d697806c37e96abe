"""Open a report in headless Chromium: console errors, what rendered, and a screenshot.

Chromium (Debian's `chromium` package, or $DLORAL_CHROMIUM) is driven over the DevTools
protocol on a loopback port: the page is loaded from disk (file://), every console message,
uncaught exception and log entry (failed image loads are logged there) is collected until the
load event, then the page is asked how many tables and images it has, how many images decoded,
and a full-page PNG is captured. Used by the tests and by `dloral-exp report --screenshot`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dloral.atomic import atomic_write

CHROMIUM_ENV = "DLORAL_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium is absent or did not answer; the message says which and how to install it."""


@dataclass
class PageCheck:
    url: str
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    messages: list[str] = field(default_factory=list)  # every console/log message
    tables: int = 0
    images: int = 0
    images_loaded: int = 0  # decoded with a non-zero natural size
    title: str = ""
    screenshot: Path | None = None
    evaluated: object = None  # the value of `evaluate`, when one was given


def find_chromium() -> str:
    path = os.environ.get(CHROMIUM_ENV)
    if path:
        if not Path(path).is_file():
            raise BrowserError(f"${CHROMIUM_ENV}={path}: no such file")
        return path
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(
        f"no Chromium found (looked for {', '.join(CANDIDATES)} on PATH and ${CHROMIUM_ENV}); "
        "on Debian/Ubuntu: apt-get install chromium"
    )


def _wait_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    """Chromium writes its DevTools port to <profile>/DevToolsActivePort once it listens."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise BrowserError(f"chromium exited with code {proc.returncode}: {err}")
        if marker.is_file():
            lines = marker.read_text().split()
            if lines:
                return int(lines[0])
        time.sleep(0.05)
    raise BrowserError(f"chromium did not open its DevTools port within {timeout:.0f} s")


class _Cdp:
    """A minimal DevTools-protocol session on one page target."""

    def __init__(self, ws_url: str, timeout: float):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mine:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise BrowserError(f"no {method} within {timeout:.0f} s")
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


_PROBE = """JSON.stringify({
  tables: document.querySelectorAll('table').length,
  images: document.images.length,
  loaded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,
  title: document.title,
  height: Math.ceil(document.documentElement.scrollHeight)
})"""


def check_page(
    html_path: str | os.PathLike,
    screenshot: str | os.PathLike | None = None,
    *,
    width: int = 1280,
    max_height: int = 6000,
    timeout: float = 60.0,
    evaluate: str | None = None,
) -> PageCheck:
    """Load html_path in headless Chromium; optionally save a PNG of the page's top
    (width x up to max_height pixels) and evaluate a JavaScript expression in the loaded page
    (its JSON-serialisable value in `evaluated`, e.g. computed styles or rendered sizes).
    Raises BrowserError when Chromium is absent or stuck."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise BrowserError(f"{html_path}: no such file")
    exe = find_chromium()
    url = html_path.as_uri()
    check = PageCheck(url)
    profile = tempfile.mkdtemp(prefix="dloral-chromium-")
    try:
        args = [
            exe,
            "--headless",
            "--no-sandbox",  # root in containers
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--allow-file-access-from-files",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "about:blank",
        ]
        # its own process group: Chromium's helper processes are ended with it
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            port = _wait_port(Path(profile), proc, timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if not pages:
                raise BrowserError("chromium has no page target")
            cdp = _Cdp(pages[0]["webSocketDebuggerUrl"], timeout)
            try:
                for domain in ("Page", "Runtime", "Log"):
                    cdp.send(f"{domain}.enable")
                cdp.events.clear()
                cdp.send("Page.navigate", url=url)
                cdp.wait_event("Page.loadEventFired", timeout)
                probe = json.loads(
                    cdp.send("Runtime.evaluate", expression=_PROBE, returnByValue=True)["result"][
                        "value"
                    ]
                )
                _collect(cdp.events, check)
                check.tables, check.images = probe["tables"], probe["images"]
                check.images_loaded, check.title = probe["loaded"], probe["title"]
                if evaluate is not None:
                    result = cdp.send("Runtime.evaluate", expression=evaluate, returnByValue=True)
                    if "exceptionDetails" in result:
                        raise BrowserError(f"{evaluate!r}: {result['exceptionDetails']}")
                    check.evaluated = result["result"].get("value")
                if screenshot is not None:
                    height = min(max_height, max(probe["height"], 1))
                    cdp.send(
                        "Emulation.setDeviceMetricsOverride",
                        width=width,
                        height=height,
                        deviceScaleFactor=1,
                        mobile=False,
                    )
                    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
                    shot = cdp.send(
                        "Page.captureScreenshot",
                        format="png",
                        clip=clip,
                        captureBeyondViewport=True,
                    )
                    out = Path(screenshot)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    data = base64.b64decode(shot["data"])
                    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
                    check.screenshot = out
                _collect(cdp.events, check)
            finally:
                cdp.close()
        finally:
            _stop(proc)
    finally:
        for _ in range(50):  # helpers may still be flushing the profile for a moment
            shutil.rmtree(profile, ignore_errors=True)
            if not os.path.exists(profile):
                break
            time.sleep(0.1)
    return check


def _stop(proc: subprocess.Popen) -> None:
    """End Chromium and every helper process of its group."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # helpers that outlived the main process
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect(events: list[dict], check: PageCheck) -> None:
    """Move console/log/exception events into check.messages / check.errors."""
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            level = p.get("type", "log")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = d.get("exception", {}).get("description") or d.get("text", "exception")
            level = "error"
        elif method == "Log.entryAdded":
            entry = p.get("entry", {})
            text = f"{entry.get('text', '')} {entry.get('url', '')}".strip()
            level = entry.get("level", "info")
        else:
            continue
        check.messages.append(f"{level}: {text}")
        if level in ("error", "assert"):
            check.errors.append(text)
    events.clear()
