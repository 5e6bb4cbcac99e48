"""``LinearCrossEntropyLoss``: :func:`cutce.linear_cross_entropy` as an ``nn.Module``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from .api import linear_cross_entropy
from .validate import check_options, make_options

# Derived from the signatures, so that a new option of linear_cross_entropy is accepted here
# without a second list: every keyword-only option is a module option (token_weights is per call),
# and those make_options knows are validated at construction.
_OPTIONS = {name for name, p in inspect.signature(linear_cross_entropy).parameters.items()
            if p.kind is p.KEYWORD_ONLY} - {"token_weights"}
_SCALAR_OPTIONS = _OPTIONS & set(inspect.signature(make_options).parameters)


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`: the keyword options go to ``__init__``.

    ``forward(hidden, weight, targets, bias=None, token_weights=None)`` returns what
    ``linear_cross_entropy(hidden, weight, targets, bias, token_weights=token_weights, **options)``
    returns.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        if "token_weights" in options:
            raise TypeError("token_weights is a forward() argument, not an option")
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}")
        # Validate now so that a bad option fails at construction, not at the first step
        # (the dtype only resolves filter_eps="auto", which is redone per call).
        check_options(**{k: v for k, v in options.items() if k in _SCALAR_OPTIONS})
        self.options = dict(options)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                token_weights: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return linear_cross_entropy(hidden, weight, targets, bias, token_weights=token_weights,
                                    **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
