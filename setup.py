"""Build hook: generate the gRPC stubs (vna/api/_gen) from proto/ with grpcio-tools before build_py.

Everything else about the package is declared in pyproject.toml. The stubs are
not committed; this runs for ``pip install .``, ``pip install -e .`` and wheel
builds. ``vna/api/codegen.py`` is loaded by path: it needs only the standard
library and grpc_tools (a build requirement), not vna's dependencies.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
GEN_PACKAGE = "vna.api._gen"


def _generate() -> None:
    spec = importlib.util.spec_from_file_location("_vna_codegen", ROOT / "vna" / "api" / "codegen.py")
    assert spec is not None and spec.loader is not None
    codegen: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    codegen.generate(ROOT / "proto", ROOT / "vna" / "api" / "_gen")


class BuildPyWithStubs(build_py):
    """build_py that first regenerates the stubs and makes sure their package is built."""

    def run(self) -> None:
        _generate()
        if self.packages is not None and GEN_PACKAGE not in self.packages:
            self.packages.append(GEN_PACKAGE)
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
