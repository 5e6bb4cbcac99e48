"""The ``cutce`` console command: ``cutce bench`` and ``cutce demo``.

Subcommands import their modules only when chosen, so ``cutce --help`` stays fast. The demo is an
example script (``examples/demo.py``), not part of the library: ``cutce demo`` runs it from the
source checkout this package was installed from, and says where to get it otherwise (a wheel
carries the library only).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import cutce


def _parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(
        prog="cutce",
        description="Linear + cross-entropy loss without materializing the logits (Cut Cross-Entropy).")
    parser.add_argument("--version", action="version", version=f"cutce {cutce.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,demo}")
    b = sub.add_parser("bench", help="time, memory and accuracy of cutce and its peers",
                       description="Benchmark the LM-head loss: each provider's forward and "
                       "forward+backward time (also as a ratio to one matmul of the same shape), "
                       "peak extra memory, and the error of loss, dE and dC against a reference. "
                       "Prints a table; writes a JSON result file and its PNG under --out.")
    bench.add_arguments(b)
    # The demo parses its own arguments: everything after `demo` is handed over untouched.
    sub.add_parser("demo", help="train a small model with and without cutce (examples/demo.py; "
                   "cutce demo --help)", add_help=False)
    return parser


def _demo_path():
    """examples/demo.py of the checkout this package comes from (an editable install), else of
    the current directory; None when neither has it."""
    checkout = pathlib.Path(__file__).resolve().parents[2]
    for root in (checkout, pathlib.Path.cwd()):
        path = root / "examples" / "demo.py"
        if path.is_file():
            return path
    return None


def _run_demo(argv) -> int:
    import runpy

    path = _demo_path()
    if path is None:
        print("cutce demo: examples/demo.py is not installed with the package (a wheel carries the "
              "library only). Get examples/demo.py from cutce's source repository and run "
              "`python examples/demo.py`, or `cutce demo` inside that checkout.")
        return 2
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv=None) -> int:
    """Entry point of the ``cutce`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _run_demo(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import bench

        return bench.run(args)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
