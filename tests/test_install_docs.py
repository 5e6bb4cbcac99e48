"""The install commands that users read can be run as written.

cutce is on no package index, so no page, example or message may tell users to install it by
name (`pip install "cutce[trl]"` fails), and every extra a command asks for must be one that
pyproject.toml declares (pip installs an unknown extra with only a warning, and the
integration then fails at import). Whether the wheel itself works is .ci/wheel-check's job.
"""

from __future__ import annotations

import re

import pytest

from markdown_blocks import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

_PIP_INSTALL = re.compile(r"pip install([^`\n]*)")
_ARG = re.compile(r'"([^"]*)"|\'([^\']*)\'|(\S+)')


def _sources():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted(p for p in (ROOT / "examples").rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".sh"))
    yield from sorted((ROOT / "src").rglob("*.py"))


def _cutce_requirements():
    """(file name, requirement) for every argument of a `pip install` that installs cutce: the
    project's folder ("."), a path to a clone or a wheel, or the bare name."""
    for path in _sources():
        for line in path.read_text(encoding="utf-8").splitlines():
            for command in _PIP_INSTALL.findall(line):
                for m in _ARG.finditer(command):
                    arg = next(g for g in m.groups() if g is not None)
                    if arg in ("&&", "||", ";", "|"):
                        break  # the next command (`... && cutce bench`)
                    last = m.group(3) is not None and arg.endswith(";")
                    arg = arg.rstrip(";") if last else arg
                    name = arg.split("[", 1)[0]
                    if not arg.startswith("-") and (name == "." or "cutce" in name):
                        yield path.relative_to(ROOT).as_posix(), arg
                    if last:
                        break


REQUIREMENTS = list(_cutce_requirements())


def test_install_commands_found():
    """The scan sees the commands it is meant to check (the README's and docs/install.md's)."""
    files = {f for f, _ in REQUIREMENTS}
    assert {"README.md", "docs/install.md"} <= files, files


def test_no_install_by_name():
    by_name = [(f, arg) for f, arg in REQUIREMENTS if arg.split("[", 1)[0].lower() == "cutce"]
    assert not by_name, f"cutce is on no package index; install it from a clone or a wheel: {by_name}"


def test_extras_are_declared():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = set(pyproject["project"]["optional-dependencies"])
    unknown = []
    for f, arg in REQUIREMENTS:
        m = re.search(r"\[([^\]]*)\]$", arg)
        if m:
            unknown += [(f, arg, e) for e in m.group(1).split(",") if e.strip() not in declared]
    assert not unknown, f"extras not in pyproject.toml ({sorted(declared)}): {unknown}"


def test_install_page_links_resolve():
    page = ROOT / "docs" / "install.md"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        if "://" not in target:
            assert (page.parent / target).exists(), f"install.md: broken link {target}"


def test_wheel_names_carry_the_version():
    """A wheel named with its version in a command is the one this checkout builds."""
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "src" / "cutce" / "__init__.py").read_text(), re.M)
    assert version, "no __version__ in src/cutce/__init__.py"
    stale = [(f, arg) for f, arg in REQUIREMENTS
             if (m := re.search(r"cutce-([^-*]+)-py3-none-any\.whl", arg)) and m.group(1) != version.group(1)]
    assert not stale, f"wheel names of another version than {version.group(1)}: {stale}"
