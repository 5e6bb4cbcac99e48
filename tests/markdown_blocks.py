"""Fenced code blocks of a Markdown page, and the environment their examples run in: shared by
the tests that run README.md's and docs/*.md's examples as written (a helper, not a test module).
"""

from __future__ import annotations

import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(path: pathlib.Path, language: str) -> list[tuple[str, str]]:
    """(heading above it, code) of every fenced block of ``language`` in ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    found = []
    for m in _FENCE.finditer(text):
        if m.group(1) == language:
            headings = re.findall(r"^#+ +(.+)$", text[:m.start()], re.M)
            found.append((headings[-1] if headings else "top", m.group(2)))
    return found


def example_env() -> dict[str, str]:
    """The environment an example runs in: this checkout's src first, two threads."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    env.setdefault("OMP_NUM_THREADS", "2")
    return env
