"""Subprocesses for tests: bounded in time, and `torch.distributed.run` on 127.0.0.1.

A process that outlives its timeout is killed with its whole process group (torchrun's
workers included) and fails the test: a hung collective never hangs the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """The command line of `torch.distributed.run` with `nproc` local ranks on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *args,
    ]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, importing this checkout's gradmagic, without GRADMAGIC* switches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADMAGIC")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def bounded(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
    merge_stderr: bool = False,
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cmd`; past `timeout` its process group is killed and
    the test fails."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env) if env is not None else child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout:.0f} s")
    return proc.returncode, out, err or ""
