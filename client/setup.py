"""Builds the stubs from ../proto before packaging (see gen_stubs.py)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = Path(__file__).resolve().parent


def _generate() -> None:
    spec = importlib.util.spec_from_file_location("gen_stubs", HERE / "gen_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate()


class BuildWithStubs(build_py):
    def run(self) -> None:
        _generate()
        super().run()


class DevelopWithStubs(develop):
    def run(self) -> None:
        _generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs, "develop": DevelopWithStubs})
