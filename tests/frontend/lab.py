"""A real JupyterLab server for the tests, and what a person does in it.

`JupyterLab` starts `jupyter lab` on 127.0.0.1 (a free port, a token, a
temporary root, settings, config and data folders, no browser) and stops it,
kernels included. The page helpers open a notebook, run all its cells from
the Run menu, wait for the kernel and switch the theme from the Settings
menu, the way a person would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

LIGHT = "JupyterLab Light"
DARK = "JupyterLab Dark"
START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 180  # one notebook, Run All to the last cell, on a busy 2-core machine
OPEN_TIMEOUT_S = 60

ROOT = Path(__file__).resolve().parents[2]

# The user settings the server starts with, plugin by plugin.
SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:themes": {"theme": LIGHT, "adaptive-theme": False},
    # Every cell laid out, also those scrolled out of view: they are measured too.
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
    # No news or update checks: there is no internet, and no toast over the outputs.
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
}


class LabError(RuntimeError):
    """The server did not start, or stopped; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab:
    """`jupyter lab` in a temporary folder, started on enter and stopped on exit.

    >>> with JupyterLab(tmp) as lab:  # doctest: +SKIP
    ...     page.goto(lab.url("lab/tree/a.ipynb"))
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.settings_dir = self.workdir / "settings"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = self.workdir / "jupyterlab.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._workspaces = itertools.count(1)

    # -- the server -------------------------------------------------------------------
    def __enter__(self) -> JupyterLab:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Nothing from the machine's own Jupyter or IPython set-up.
        for name, sub in (
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("IPYTHONDIR", "ipython"),
        ):
            env[name] = str(self.workdir / sub)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        # The kernels import the gradmagic of this checkout.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.pop("MPLBACKEND", None)
        return env

    def _write_kernel_spec(self) -> None:
        # `python3` is this interpreter, whatever the machine has installed.
        spec = self.workdir / "data" / "kernels" / "python3"
        spec.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernel = {"argv": argv, "display_name": "Python 3 (ipykernel)", "language": "python"}
        (spec / "kernel.json").write_text(json.dumps(kernel), encoding="utf-8")

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for plugin, values in SETTINGS.items():
            self.write_setting(plugin, values)
        self._write_kernel_spec()
        args = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",  # this port or fail, never another one
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.allow_root=True",
            "--ServerApp.terminals_enabled=False",
            f"--LabApp.user_settings_dir={self.settings_dir}",
            f"--LabApp.workspaces_dir={self.workdir / 'workspaces'}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        log = self.log_path.open("wb")
        try:
            self._process = subprocess.Popen(
                args,
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its kernels can be ended as a group
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise LabError(f"jupyter lab exited with {self._process.returncode}" + self.tail())
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.api("GET", "api/status", timeout=2) is not None:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"jupyter lab did not answer within {timeout:.0f} s" + self.tail())
            time.sleep(0.25)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # The server shuts its kernels down on its way out.
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.api("POST", "api/shutdown", timeout=5)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n--- jupyter lab log (end) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- HTTP -------------------------------------------------------------------------
    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else {}

    def shutdown_kernels(self) -> None:
        """End every kernel the pages started (a closed tab leaves its kernel running)."""
        for session in self.api("GET", "api/sessions"):
            with contextlib.suppress(urllib.error.HTTPError):
                self.api("DELETE", f"api/sessions/{session['id']}")

    # -- settings ---------------------------------------------------------------------
    def write_setting(self, plugin: str, values: dict[str, Any]) -> None:
        """Write one plugin's user settings; pages loaded afterwards start with them."""
        package, name = plugin.split(":")
        path = self.settings_dir / package / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2), encoding="utf-8")

    def set_theme(self, theme: str) -> None:
        """The theme the next page load starts in."""
        self.write_setting(
            "@jupyterlab/apputils-extension:themes",
            {**SETTINGS["@jupyterlab/apputils-extension:themes"], "theme": theme},
        )

    def fresh_workspace(self) -> str:
        """A workspace name not used before: the page opens with the default layout."""
        return f"test{next(self._workspaces)}"


# -- what a person does in the page -----------------------------------------------------------
ALL_PROMPTS_NUMBERED = r"""
() => {
  const prompts = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /^\[\d+\]:$/.test(p.textContent.trim()));
}
"""
STARTED = r"""
() => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]
  .some(p => /^\[(\*|\d+)\]:$/.test(p.textContent.trim()))
"""
PROMPTS = r"""
() => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]
  .map(p => p.textContent.trim()).join(' ')
"""


def open_notebook(page: Any, lab: JupyterLab, path: str, cells: int) -> None:
    """Open `path` (relative to the server's root) in a fresh workspace; wait for its cells."""
    page.goto(lab.url(f"lab/workspaces/{lab.fresh_workspace()}/tree/{path}"))
    page.wait_for_function(
        "n => document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell').length === n",
        arg=cells,
        timeout=OPEN_TIMEOUT_S * 1000,
    )


def wait_for_reports(page: Any, count: int, timeout: float = OPEN_TIMEOUT_S) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('div.gradmagic').length >= n",
        arg=count,
        timeout=timeout * 1000,
    )


def wait_for_kernel(page: Any, lab: JupyterLab, path: str, timeout: float = OPEN_TIMEOUT_S) -> None:
    """Until the notebook's kernel has started, the page is connected to it, and it is idle."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = [s for s in lab.api("GET", "api/sessions") if s.get("path") == path]
        kernel = sessions[0]["kernel"] if sessions else {}
        if kernel.get("execution_state") == "idle" and kernel.get("connections", 0) > 0:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"no idle kernel for {path} within {timeout:.0f} s: {sessions}")
        time.sleep(0.2)
    page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
        state="attached", timeout=timeout * 1000
    )


def _menu(page: Any, title: str) -> None:
    page.locator(".lm-MenuBar-item").filter(
        has=page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{title}$"))
    ).click()


def run_all(page: Any, lab: JupyterLab, path: str, timeout: float = RUN_TIMEOUT_S) -> None:
    """Run > Run All Cells, then wait until every code cell has its execution count."""
    wait_for_kernel(page, lab, path)
    for _ in range(3):
        _menu(page, "Run")
        page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
        try:
            # Queued cells show [*] at once; a click that did not reach the menu shows nothing.
            page.wait_for_function(STARTED, timeout=10_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    try:
        page.wait_for_function(ALL_PROMPTS_NUMBERED, timeout=timeout * 1000)
    except Exception as exc:
        raise AssertionError(
            f"Run All did not finish within {timeout:.0f} s; prompts: {page.evaluate(PROMPTS)}"
        ) from exc
    # The last outputs arrive before the execution count; the kernel then goes idle.
    wait_for_kernel(page, lab, path)


def switch_theme(page: Any, theme: str) -> None:
    """Settings > Theme > `theme`; JupyterLab saves the choice in the settings folder."""
    if current_theme(page) == theme:
        return
    _menu(page, "Settings")
    page.locator('.lm-Menu-item[data-type="submenu"]').filter(
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Theme$"))
    ).click()
    page.locator('.lm-Menu-item[data-command="apputils:change-theme"]').filter(
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{theme}$"))
    ).click()
    wait_for_theme(page, theme)


def wait_for_theme(page: Any, theme: str) -> None:
    # The theme's name is set once its stylesheet has loaded.
    page.wait_for_function("t => document.body.dataset.jpThemeName === t", arg=theme)
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def current_theme(page: Any) -> str | None:
    return page.evaluate("document.body.dataset.jpThemeName || null")
