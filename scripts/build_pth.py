"""setuptools ``build_py`` that also ships ``tq_mooncake-autoload.pth`` (see ``tq_mooncake.autoload``).

Named in ``pyproject.toml`` (``[tool.setuptools.cmdclass]``); used at build time only, never installed. A
normal build writes the file into ``build_lib``, from where ``bdist_wheel`` puts it at the wheel's root (so an
installer places it in site-packages). An editable build (PEP 660) installs nothing from ``build_lib``; there the
file goes straight into the folder setuptools turns into the editable wheel (``install.install_lib``).
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "tq_mooncake-autoload.pth"
# One line, run by `site` at interpreter start; the editable install's own finder (`__editable__.tq_mooncake-*.pth`)
# sorts, and so runs, before it. Switched off (TQ_MOONCAKE_AUTOLOAD as in `tq_mooncake.autoload.enabled`, a test
# holds them equal), it imports nothing at all.
PTH_LINE = (
    'import os; os.environ.get("TQ_MOONCAKE_AUTOLOAD", "").strip().lower() in ("0", "false", "no", "off") '
    'or __import__("tq_mooncake.autoload").autoload.install()\n'
)


class BuildPyWithPth(build_py):
    """``build_py``, plus the ``.pth`` line that arms the TransferQueue hook."""

    def run(self) -> None:
        super().run()
        folder = self.build_lib
        if getattr(self, "editable_mode", False):
            folder = self.get_finalized_command("install").install_lib
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        pth = [os.path.join(self.build_lib, PTH_NAME)] if not getattr(self, "editable_mode", False) else []
        return [*super().get_outputs(include_bytecode), *pth]
