"""The ``cutce`` console command: ``cutce bench`` and ``cutce demo``.

Subcommands import their modules only when chosen, so ``cutce --help`` stays fast and ``cutce
demo`` (which needs transformers) costs ``cutce bench`` nothing.
"""

from __future__ import annotations

import argparse
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
                       "Prints a table; writes CSV and PNG under --out.")
    bench.add_arguments(b)
    # The demo parses its own arguments: everything after `demo` is handed over untouched.
    sub.add_parser("demo", help="train a small model with cutce (cutce demo --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``cutce`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        import importlib

        demo = importlib.import_module("cutce.demo")
        return demo.main(argv[1:]) or 0
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import bench

        return bench.run(args)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
