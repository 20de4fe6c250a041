"""The wheel users install: every data file in it, and the package working from it alone.

``pip install continuum-tiered[gpu]`` installs this wheel; the embedded traces, tool
durations and tier profiles are package data, read through the package (never through a
path into the source tree). The wheel is built from a copy of the sources, then installed
with ``pip --target`` into an empty folder that a fresh interpreter imports it from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "continuum_tiered" / "data"

# Run in the installed copy: the embedded data is found and read, and the package is the
# installed one, not this checkout.
USE_INSTALLED = """
import json, sys
import continuum_tiered
from continuum_tiered.core.profile import builtin_profile_names, load_named_profile
from continuum_tiered.traces.swebench import load_swebench
names = builtin_profile_names()
print(json.dumps({
    "package": continuum_tiered.__file__,
    "profiles": names,
    "models": [load_named_profile(n).model.name for n in names],
    "programs": len(load_swebench()),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "continuum_tiered",
        source / "continuum_tiered",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
    )
    (built,) = dist.glob("continuum_tiered-*.whl")
    return built


def test_the_wheel_holds_every_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {
        f"continuum_tiered/{p.relative_to(DATA.parent).as_posix()}"
        for p in DATA.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert data, "no data files found in the source tree"
    assert data <= names, f"missing from the wheel: {sorted(data - names)}"


def test_the_wheel_registers_the_vllm_plugin_and_the_command(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "continuum_tiered = continuum_tiered.vllm.plugin:register" in text
    assert "continuum-tiered = continuum_tiered.cli:main" in text
    metadata = archive.read(entry_points.replace("entry_points.txt", "METADATA")).decode()
    assert "Provides-Extra: gpu" in metadata


def test_the_installed_wheel_reads_its_data(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    out = subprocess.run(
        [sys.executable, "-c", USE_INSTALLED],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(target))
    shipped = sorted(p.stem for p in (DATA / "profiles").glob("*.json"))
    assert found["profiles"] == shipped
    assert all(found["models"])
    assert found["programs"] == 50
