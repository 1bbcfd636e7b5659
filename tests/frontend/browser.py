"""Headless Chromium through Playwright, with the system's browser.

Playwright is told where Chromium is (`executable_path`): nothing is
downloaded, `playwright install` is never needed. Every page records the
script errors it sees, so that a check can say "no errors".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = (
    "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--disable-breakpad",
    "--font-render-hinting=none",  # the same text widths from one run to the next
)
HEIGHT = 900


def find_chromium() -> str | None:
    """The system's Chromium ($GRADMAGIC_CHROMIUM, else the first on PATH), or None."""
    explicit = os.environ.get("GRADMAGIC_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def why_no_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if find_chromium() is None:
        return f"needs chromium (apt-get install chromium); looked for {', '.join(CHROMIUM_NAMES)}"
    return None


@dataclass
class ErrorLog:
    """Uncaught exceptions and console errors of one page, in the order they came."""

    errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )

    def mark(self) -> int:
        """A position in the log; `since(mark)` gives what came after it."""
        return len(self.errors)

    def since(self, mark: int) -> list[str]:
        return self.errors[mark:]


@contextmanager
def chromium(executable: str | None = None) -> Iterator[Any]:
    """A Playwright `Browser` running the system's headless Chromium."""
    from playwright.sync_api import sync_playwright

    path = executable or find_chromium()
    if path is None:
        raise RuntimeError(why_no_browser())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, width: int, height: int = HEIGHT, scale: float = 1.0) -> Any:
    """A page in a fresh context (own cookies and storage) with an `ErrorLog` as `.errors`."""
    context = browser.new_context(
        viewport={"width": width, "height": height},
        device_scale_factor=scale,
        color_scheme="light",  # JupyterLab's "sync with the system" must not pick a theme
        reduced_motion="reduce",
    )
    context.set_default_timeout(30_000)
    page = context.new_page()
    log = ErrorLog()
    log.attach(page)
    page.errors = log
    return page


def close_page(page: Any) -> None:
    page.context.close()


def set_width(page: Any, width: int) -> None:
    """Resize the viewport and let the page lay itself out again."""
    page.set_viewport_size({"width": width, "height": page.viewport_size["height"]})
    # Two frames: the resize event, then the layout that follows it.
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
