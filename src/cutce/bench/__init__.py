"""`cutce bench`: time, peak memory and accuracy of cutce and its peers on LM-head shapes.

Modules: :mod:`.data` (shapes, data kinds), :mod:`.providers` (what is compared),
:mod:`.measure` (timing, memory, errors), :mod:`.report` (metadata, JSON result files, table),
:mod:`.plots` (PNG from the JSON), :mod:`.runner` (the command). See ``cutce bench --help``.
"""

from .runner import add_arguments, run

__all__ = ["add_arguments", "run"]
