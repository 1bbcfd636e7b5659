"""Shared fixtures: an in-process IPython shell with gradmagic loaded."""

from __future__ import annotations

import base64
import re

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell


class CellError(AssertionError):
    """A cell raised where the test expected it to run."""


class Shell:
    """A thin wrapper over IPython's shell that re-raises cell errors."""

    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell

    @property
    def ns(self) -> dict:
        return self.shell.user_ns

    def run(self, cell: str):
        result = self.shell.run_cell(cell, store_history=True)
        if result.error_before_exec is not None:
            raise CellError(f"cell failed before running: {result.error_before_exec!r}")
        if result.error_in_exec is not None:
            raise CellError(f"cell raised {result.error_in_exec!r}") from result.error_in_exec
        return result.result

    def run_raw(self, cell: str):
        return self.shell.run_cell(cell, store_history=True)


@pytest.fixture(scope="session")
def _shell() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_cell("%colors NoColor")
    shell.run_cell("%load_ext gradmagic")
    return shell


@pytest.fixture
def ip(_shell: InteractiveShell) -> Shell:
    """A shell with gradmagic loaded, an empty namespace and a fresh history."""
    _shell.reset(new_session=False)
    _shell.run_cell("import torch")
    _shell.run_cell("%grad reset")
    torch.manual_seed(0)
    return Shell(_shell)


_IMAGE = re.compile(
    r'<img class="([\w-]+)"[^>]*?src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"'
)


def report_images(html: str, cls: str) -> list[str]:
    """The SVG documents of the report's `<img class=cls>` elements, decoded."""
    return [base64.b64decode(data).decode("utf-8") for c, data in _IMAGE.findall(html) if c == cls]


@pytest.fixture
def images():
    """`images(html, "gradmagic-graph")`: the SVGs a report shows as images."""
    return report_images
