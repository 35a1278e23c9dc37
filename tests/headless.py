"""Open a page in real headless Chromium (Debian's ``chromium``) and report what it did.

Talks the DevTools protocol over ``--remote-debugging-pipe`` (NUL-separated JSON on
file descriptors 3 and 4): standard library only, no port to race for. Collects the
page's console messages, uncaught exceptions, log entries and every request it made,
and takes a full-page screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1200,900",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageVisit:
    screenshot_png: bytes = b""
    console: list[dict[str, Any]] = field(default_factory=list)  # Runtime.consoleAPICalled
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # Runtime.exceptionThrown
    log: list[dict[str, Any]] = field(default_factory=list)  # Log.entryAdded entries
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed: list[dict[str, Any]] = field(default_factory=list)  # Network.loadingFailed
    values: dict[str, Any] = field(default_factory=dict)  # expression -> its value

    def errors(self) -> list[str]:
        """Everything a developer console would show in red."""
        out = [f"console.{c['type']}: {c.get('args')}" for c in self.console
               if c["type"] in ("error", "assert")]  # fmt: skip
        out += [f"exception: {e['exceptionDetails']}" for e in self.exceptions]
        out += [f"log {e['level']}: {e['text']}" for e in self.log if e["level"] == "error"]
        out += [f"failed load: {f}" for f in self.failed]
        return out


class _Pipe:
    """The DevTools protocol over a pair of pipes to one browser process."""

    def __init__(self, binary: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child: its fd 3 reads commands, fd 4 answers
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire_fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            wait = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, wait))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def call(
        self, method: str, params: dict | None = None, session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:  # fmt: skip
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self.recv(deadline))

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def visit(
    url: str, expressions: tuple[str, ...] = (), settle_s: float = 1.0, timeout: float = 60.0
) -> PageVisit:
    """Load ``url`` in a fresh headless Chromium profile and report what happened,
    with the value of each JavaScript expression once the page has loaded."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="epwatch-chromium-") as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})
            session = pipe.call(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout)
            time.sleep(settle_s)  # late console messages
            shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
            values = {
                e: pipe.call(
                    "Runtime.evaluate", {"expression": e, "returnByValue": True}, session=session
                )["result"].get("value")
                for e in expressions
            }
        finally:
            pipe.close()
    out = PageVisit(screenshot_png=base64.b64decode(shot["data"]), values=values)
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            out.console.append(params)
        elif method == "Runtime.exceptionThrown":
            out.exceptions.append(params)
        elif method == "Log.entryAdded":
            out.log.append(params["entry"])
        elif method == "Network.requestWillBeSent":
            out.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            out.failed.append(params)
    return out
