"""Retake the README's screenshots: `python -m tests.frontend.screenshots [OUTDIR]`.

Runs the front-end tests (JupyterLab, Chromium) and keeps the pictures they
take, so that what the README shows is what the tests measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else ROOT / "docs").resolve()
    env = {**os.environ, "GRADMAGIC_SCREENSHOTS": str(out)}
    test = "tests/test_frontend.py::test_screenshots_were_taken"
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env)
    if code == 0:
        print(
            f"Screenshots written to {out}/: "
            + ", ".join(sorted(p.name for p in out.glob("*.png")))
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
