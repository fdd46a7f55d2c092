"""The wheel ships every module: each folder of agent/ with Python files is a package."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_agent_folder_with_python_files_is_found_by_setuptools():
    found = set(find_packages(str(ROOT), include=["agent*"]))
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "agent").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(folders - found)
    assert not missing, f"add an __init__.py to: {missing} (or they are left out of the wheel)"
