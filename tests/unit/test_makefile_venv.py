"""The Makefile's .venv: built with the distribution's interpreter when there is one, and made
again when an existing one came from another interpreter (``make -n``: nothing is built)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(folder: Path, *args: str) -> str:
    result = subprocess.run(["make", "-n", "venv", *args], cwd=folder, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def _fake_venv(folder: Path, executable: str) -> None:
    venv = folder / ".venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(executable)}\n"
                                     f"executable = {executable}\n")
    (venv / ".installed").touch()     # newer than requirements.txt


def test_the_distribution_python_is_preferred(checkout: Path):
    out = _dry_run(checkout)
    if Path("/usr/bin/python3").exists():
        assert "/usr/bin/python3 -m venv" in out
    else:
        assert "python3 -m venv" in out


def test_a_venv_of_another_interpreter_is_made_again(checkout: Path):
    _fake_venv(checkout, "/nonexistent/bin/python3.11")
    python = os.path.realpath(sys.executable)
    out = _dry_run(checkout, f"PYTHON={python}")
    assert f"{python} -m venv --clear .venv" in out


def test_a_venv_of_the_same_interpreter_is_kept(checkout: Path):
    python = os.path.realpath(sys.executable)
    _fake_venv(checkout, python)
    out = _dry_run(checkout, f"PYTHON={python}")
    assert "-m venv" not in out
