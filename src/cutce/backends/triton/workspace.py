"""Where the backward's chunks live: each chunk's dz, the float32 dE.

The chunk sizes are the plan's (:mod:`cutce.engine.chunks`): where the budget does not hold the
backward's preferred chunk (memory_budget=0, small explicit budgets, filtered classes) they are
sized within the plan's workspace bytes; below ~N x D x 2 bytes (the float32 dE's half that does
not fit in dE's rows) the tokens are split into chunks, each a pass over dC. Two outputs are
free memory until their rows are written, and the workspace uses both:

- rows of dC not written yet (the weight's size): a vocabulary chunk's dz can live there, behind
  the chunk's own rows, so chunks can be max_chunk_v wide at no memory cost (fewer passes over
  the dE accumulator); the last chunks use a separate, budgeted buffer;
- rows of dE not written yet: the float32 accumulator of a token chunk has twice the bytes of
  its 16-bit dE rows, so its first d/2 columns live in those rows and only the other half takes
  budget; the rows are rounded into place when the token chunk is done.
"""

from __future__ import annotations

import torch


def _elt(dtype):
    return torch.finfo(dtype).bits // 8


def _carve(buf, end_byte, rows, cols, dtype):
    """A (rows, cols) dtype view of buf's bytes ending at end_byte (start 16-byte aligned)."""
    nbytes = rows * cols * _elt(dtype)
    start = (end_byte - nbytes) // 16 * 16
    flat = buf.view(-1).view(torch.uint8)
    return flat[start:start + nbytes].view(dtype).view(rows, cols), start


def splits_hidden_acc(dh, need_h):
    """Whether dE's float32 accumulator can keep half its columns in dE's own rows."""
    return (need_h and dh.dtype != torch.float32 and _elt(dh.dtype) == 2
            and dh.shape[1] % 2 == 0 and dh.is_contiguous())


class DzWorkspace:
    """Where each vocabulary chunk's dz goes (see the module docstring)."""

    def __init__(self, chunk_n, chunk_v, dtype, device, dw, block_v, kc):
        self.chunk_n, self.chunk_v, self.dtype, self.device = chunk_n, chunk_v, dtype, device
        self.dw = dw  # None: no tail to use
        self.block_v, self.kc = block_v, kc
        self.own = None

    def next(self, c0, n_cls, rows):
        """(dz view (rows, width), width) for the chunk starting at class c0."""
        left = n_cls - c0
        if self.dw is not None:
            row_bytes = self.dw.stride(0) * self.dw.element_size()
            total = self.dw.numel() * self.dw.element_size()
            # rows * w * elt + 16 <= (V - c0 - w) * row_bytes: dz stays behind the chunk's rows
            w = (left * row_bytes - 16) // (rows * _elt(self.dtype) + row_bytes)
            w = min(w // self.block_v * self.block_v, self.kc.max_chunk_v, left)
            if w >= min(self.chunk_v, left) and w > 0:
                view, start = _carve(self.dw, total, rows, w, self.dtype)
                assert start >= (c0 + w) * row_bytes
                return view, w
        if self.own is None:
            self.own = torch.empty((self.chunk_n, self.chunk_v), device=self.device,
                                   dtype=self.dtype)
            if self.kc.poison:
                self.own.fill_(float("nan"))
        w = min(self.chunk_v, left)
        return self.own[:rows, :w], w


class HiddenGradAccumulator:
    """float32 dE of one token chunk at a time; ``finish`` rounds it into dh's rows."""

    def __init__(self, dh, chunk_n, split):
        n, d = dh.shape
        self.dh, self.split = dh, split
        self.lo = d // 2 if split else 0
        self.hi = torch.empty((chunk_n, d - self.lo), device=dh.device, dtype=torch.float32)

    def _lo(self, n0, n1):
        """The float32 first columns of rows n0:n1, in dh's own bytes for those rows."""
        return self.dh[n0:n1].view(-1).view(torch.float32).view(n1 - n0, self.lo)

    def parts(self, n0, n1):
        """[(accumulator view, first column, last column)] for rows n0:n1, zeroed."""
        out = []
        if self.split:
            out.append((self._lo(n0, n1).zero_(), 0, self.lo))
        out.append((self.hi[: n1 - n0].zero_(), self.lo, self.dh.shape[1]))
        return out

    def finish(self, n0, n1, block=1024):
        """dh[n0:n1] = accumulator, block of rows by block: row i of the float32 half shares
        its bytes with row i of dh, so that half is rounded into a small temporary first."""
        for r0 in range(n0, n1, block):
            r1 = min(r0 + block, n1)
            lo = self._lo(r0, r1).to(self.dh.dtype) if self.split else None
            self.dh[r0:r1, self.lo:] = self.hi[r0 - n0:r1 - n0]
            if lo is not None:
                self.dh[r0:r1, :self.lo] = lo
