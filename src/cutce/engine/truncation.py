"""A sampler's truncation (min-p, top-k, top-p) as validated, hashable options.

Kept apart from :class:`cutce.engine.options.Options` so that the per-token log-prob path can
grow it without touching the loss's options; the fields may move there later unchanged.

The kept set of a row of transformed logits z (see :class:`Options`), in the order vLLM's v1
sampler applies them (temperature first, then min-p, then top-k, then top-p):

    min-p:  keep j where softmax(z)_j >= min_p * max_i softmax(z)_i
    top-k:  keep j where z_j >= the k-th largest of the logits min-p kept (ties kept)
    top-p:  over the softmax of what is left, sorted ascending, drop the tokens whose
            cumulative probability (their own included) is <= 1 - top_p; the largest is always
            kept, and a token tied with a kept one is kept

Each step keeps every logit at or above some value, so the kept set of a row is
``{j : z_j >= threshold}`` for one threshold per row.
"""

from __future__ import annotations

import dataclasses

from ..validate import check_real, fail


@dataclasses.dataclass(frozen=True)
class Truncation:
    """Attributes (None: that step is off):
        top_k: int >= 1; a k at or above V keeps everything.
        top_p: float in (0, 1).
        min_p: float in (0, 1].
    """

    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None


def make_truncation(top_k=None, top_p=None, min_p=None) -> Truncation | None:
    """Validate a sampler's settings; None when none of them truncates.

    top_p = 1.0 and min_p = 0.0 keep every token (vLLM's defaults), so they count as off: a
    call with only those runs the untruncated path, bit for bit.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        fail("top_k", "None or a positive int (vLLM's -1 or 0, no top-k, is None here)",
             repr(top_k))
    if top_p is not None:
        top_p = check_real("top_p", top_p, lo=0.0, lo_open=True, hi=1.0)
        top_p = None if top_p == 1.0 else top_p
    if min_p is not None:
        min_p = check_real("min_p", min_p, lo=0.0, hi=1.0)
        min_p = None if min_p == 0.0 else min_p
    if top_k is None and top_p is None and min_p is None:
        return None
    return Truncation(top_k, top_p, min_p)
