"""The server's wheel (what the Dockerfile's ``pip install .`` builds) holds every package of the
source tree, subpackages included: an editable install would hide a missing one."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def source_packages() -> set[str]:
    """Dotted names of the packages under rome_engine/ and server/ (installed as romegw_server)."""
    names = set()
    for top, installed in (("rome_engine", "rome_engine"), ("server", "romegw_server")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            names.add(".".join((installed, *rel)))
    return names


def test_the_wheel_holds_every_package(tmp_path: Path) -> None:
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("rome_gateway-*.whl")
    with zipfile.ZipFile(wheel) as z:
        inits = {n.removesuffix("/__init__.py").replace("/", ".") for n in z.namelist() if n.endswith("/__init__.py")}
    expected = source_packages()
    assert {"rome_engine.methods", "rome_engine.rome", "romegw_server"} <= expected
    assert expected <= inits, f"missing from the wheel: {sorted(expected - inits)} (list them in pyproject.toml)"
