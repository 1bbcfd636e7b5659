"""Build hook: put `gradmagic-autorun.pth` at the top of site-packages.

Everything else is in pyproject.toml. The .pth line makes `GRADMAGIC=1 python
train.py` watch a script started by any launcher (see gradmagic/_autorun.py); it
does nothing unless GRADMAGIC is set. A wheel carries it beside the package; an
editable install writes it into the editable wheel, which setuptools builds from
what the install step writes rather than from build_lib.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "gradmagic-autorun.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(str(Path(__file__).parent / PTH), str(Path(target) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
