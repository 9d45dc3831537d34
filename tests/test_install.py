"""The README's install commands: CI runs the second one verbatim, and constraints.txt pins a version of every
package the extras name, within pyproject.toml's ranges, so pip has one candidate each and never backtracks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "'.[dev]'" in line and line.startswith("python3 -m venv"))
    install, test = command.split(" && ")[2], command.split(" && ")[3]
    assert install == "pip install -c constraints.txt -e '.[dev]'"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and "upgrade" not in " ".join(ci)
    assert any(line.startswith(test) for line in ci)


def test_constraints_pin_every_requirement_within_its_range():
    project = _pyproject()["project"]
    pins = _pins()
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in requirements:
        if req.name == "logitstore" or (req.marker is not None and not req.marker.evaluate()):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
