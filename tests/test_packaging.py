"""What a user installs: the dependencies, the extras, the license, and how the test run reports itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_triton_is_an_extra_not_a_dependency():
    """A CPU-only user install does not pull Triton (a CUDA torch brings its own); the [triton] extra adds it."""
    project = PROJECT["project"]
    assert "triton" not in names(project["dependencies"])
    assert names(project["optional-dependencies"]["triton"]) == {"triton"}
    assert "triton" in names(project["optional-dependencies"]["dev"])


def test_flashinfer_is_an_extra_not_a_dependency():
    """FlashInfer (and the CUDA toolchain it compiles with) is only pulled by the [flashinfer] extra."""
    project = PROJECT["project"]
    assert "flashinfer-python" not in names(project["dependencies"])
    assert names(project["optional-dependencies"]["flashinfer"]) == {"flashinfer-python"}
    assert "flashinfer-python" not in names(project["optional-dependencies"]["dev"])


def test_license_file_matches_the_declared_license():
    assert PROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_pytest_shows_skip_reasons_and_progress():
    options = PROJECT["tool"]["pytest"]["ini_options"]["addopts"].split()
    assert "-rs" in options and "-q" not in options
