"""Regenerate docs/screenshot.png: notebook 1's re-run `%%grad` report in headless Chromium.

    python docs/make_screenshot.py [--out docs/screenshot.png] [--chromium PATH]

Runs `demo_notebooks/01_backward_basics.ipynb` in a fresh kernel (as
`python -m gradmagic demo` does), exports the static HTML page, opens it in
headless Chromium and captures the output of the cell that ran the same
backward a second time: the table with the `accumulated` row and the graph.

`Chromium` below is a small client for the Chrome DevTools protocol over
`--remote-debugging-pipe` (no websocket, no extra package); the browser tests
in `tests/test_browser.py` use it too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
    "--disable-breakpad",
    "--disable-crash-reporter",
)


def find_chromium() -> str | None:
    """The path of a Chromium-like browser, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class ChromiumError(RuntimeError):
    """The browser answered a command with an error, or went away."""


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe.

    Chromium reads NUL-terminated JSON commands on its fd 3 and writes
    replies and events on its fd 4. One page (target) is opened and every
    command goes to it, except `Browser.*` and `Target.*`.

    >>> with Chromium() as browser:  # doctest: +SKIP
    ...     browser.open("file:///tmp/page.html")
    ...     browser.evaluate("document.title")
    """

    def __init__(
        self,
        executable: str | None = None,
        width: int = 1000,
        height: int = 800,
        scale: float = 1.0,
        timeout: float = 60.0,
    ) -> None:
        self.executable = executable or find_chromium()
        if not self.executable:
            raise ChromiumError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)})")
        self.width, self.height, self.scale = width, height, scale
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        self._session: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._profile: str | None = None

    # -- process ----------------------------------------------------------------
    def __enter__(self) -> Chromium:
        self._profile = tempfile.mkdtemp(prefix="gradmagic-chromium-")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Copies above fd 10, so that placing them on 3 and 4 in the child cannot
        # overwrite one with the other.
        child_in = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)

        def on_fds_3_and_4() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [
            self.executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        try:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(3, 4),
                preexec_fn=on_fds_3_and_4,
            )
        finally:
            for fd in (to_child_r, from_child_w, child_in, child_out):
                os.close(fd)
        self._write, self._read = to_child_w, from_child_r
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
            self._session = attached["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride",
                {
                    "width": self.width,
                    "height": self.height,
                    "deviceScaleFactor": self.scale,
                    "mobile": False,
                },
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        process, self._process = self._process, None
        if process is not None:
            self._session = None
            with contextlib.suppress(ChromiumError, OSError):
                self.send("Browser.close", timeout=5)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for fd in (self._write, self._read):
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # -- protocol ---------------------------------------------------------------
    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one command and wait for its reply; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session and not method.startswith(("Browser.", "Target.")):
            message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise ChromiumError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _receive(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError("Chromium did not answer in time")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise ChromiumError("Chromium closed the pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def wait_for_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        """The first event called `method`, kept or still to come."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            message = self._receive(deadline)
            if "method" in message:
                self.events.append(message)

    # -- pages ------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Load `url` and wait for its load event, and for fonts and layout to settle."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise ChromiumError(f"could not open {url}: {result['errorText']}")
        self.wait_for_event("Page.loadEventFired")
        self.evaluate("document.fonts.ready.then(() => true)", await_promise=True)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ChromiumError(f"JavaScript raised: {text}")
        return result["result"].get("value")

    def screenshot(
        self, path: str | os.PathLike[str], clip: dict[str, float] | None = None
    ) -> Path:
        """Save a PNG of the viewport, or of `clip` (page coordinates: x, y, width, height)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path


# The box of an element in page coordinates (scrolled page included).
BOX_JS = """
(function (el) {
  const r = el.getBoundingClientRect();
  return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height};
})(%s)
"""


def rerun_cell_clip(browser: Chromium, margin: int = 8) -> dict[str, float]:
    """The box around the input and output of notebook 1's second `%%grad` cell."""
    found = browser.evaluate(
        """
        (function () {
          const cells = [...document.querySelectorAll('.jp-Cell.jp-CodeCell')]
            .filter(c => c.querySelector('tr[data-status="accumulated"]'));
          if (!cells.length) return null;
          cells[0].id = 'gradmagic-shot';
          return true;
        })()
        """
    )
    if not found:
        raise RuntimeError("no cell with an accumulated row on the page: did notebook 1 change?")
    box = browser.evaluate(BOX_JS % "document.getElementById('gradmagic-shot')")
    return {
        "x": max(0.0, box["x"] - margin),
        "y": max(0.0, box["y"] - margin),
        "width": box["width"] + 2 * margin,
        "height": box["height"] + 2 * margin,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "screenshot.png"), help="the PNG to write")
    parser.add_argument("--chromium", default=None, help="the browser (default: on PATH)")
    parser.add_argument("--width", type=int, default=1100, help="page width in CSS pixels")
    parser.add_argument("--scale", type=float, default=1.5, help="device pixels per CSS pixel")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))
    from gradmagic import demo

    [notebook] = demo.find_notebooks(["01_backward_basics"])
    with tempfile.TemporaryDirectory(prefix="gradmagic-shot-") as tmp:
        nb = demo.execute(notebook, cwd=tmp)
        page = Path(tmp) / "01_backward_basics.html"
        page.write_text(demo.export_html(nb), encoding="utf-8")
        with Chromium(args.chromium, width=args.width, height=900, scale=args.scale) as browser:
            browser.open(page.as_uri())
            browser.screenshot(args.out, clip=rerun_cell_clip(browser))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
