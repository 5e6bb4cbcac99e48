"""Checks shared by the cutce.trl tests (a helper, not a test module; import it once trl is known
to be installed): the detector of (batch, seq, vocab)-sized tensors, and a TRL trainer run with
and without cutce.trl.patch() from the same seed, compared.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trl.trainer import utils as trl_utils

import cutce.trl as ctrl
import trl_models
from cutce.backends.pytorch import ce
from cutce.integrations import trl_forward

HIDDEN = 32  # hf_models' hidden size: a V x D weight (or its gradient) is 32 "rows" of V


class VocabSized(TorchDispatchMode):
    """Records, over every op's outputs, the largest numel / V of a tensor with a dimension V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and self.vocab in x.shape:
                self.rows = max(self.rows, x.numel() // self.vocab)
        return out


def chunk_rows(monkeypatch, rows, vocab):
    """cutce's torch head in chunks of ``rows`` tokens: fewer than the batch has, so that a chunk
    cannot pass for the N x V logits."""
    monkeypatch.setattr(ce, "DEFAULT_CHUNK_BYTES", rows * vocab * 4 * ce._TEMPS_PER_CHUNK)


class _NoTRLHead:
    @staticmethod
    def apply(*args):
        raise AssertionError("TRL's head ran in a patched step")


def assert_logs_match(logs_a, logs_b, steps):
    assert len(logs_a) == len(logs_b) == steps
    for a, b in zip(logs_a, logs_b):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(torch.tensor(b[key], dtype=torch.float64),
                                       torch.tensor(a[key], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5, msg=key)


def trainer_runs(monkeypatch, kind, family, vocab=None, **config):
    """``kind``'s trainer (trl_models.train) without, then with cutce.trl.patch(), same seed: the
    logs agree to float32 rounding and so do the trained parameters; the patched run calls
    cutce's head and never TRL's. With ``vocab``, the model's head has that many rows and both
    runs go through VocabSized. Returns (patched logs, patched trainer, {"trl": rows, "cutce":
    rows}: the largest vocabulary-sized tensor per run, in rows of V; empty without ``vocab``)."""
    calls, rows = [], {}
    real = trl_forward.linear_log_probs
    if vocab is not None:
        config["model_config"] = dict(config.get("model_config") or {}, vocab_size=vocab)

    def run(name):
        mode = VocabSized(vocab) if vocab is not None else None
        result = trl_models.train(kind, family, during=mode, **config)
        if mode is not None:
            rows[name] = mode.rows
        return result

    reference = run("trl")
    ctrl.patch()
    try:
        with monkeypatch.context() as m:
            m.setattr(trl_forward, "linear_log_probs",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
            m.setattr(trl_utils, "_ChunkedLogProbFunction", _NoTRLHead)
            patched = run("cutce")
    finally:
        ctrl.unpatch()
    assert calls, "cutce's head never ran"
    (logs_a, params_a, _), (logs_b, params_b, trainer) = reference, patched
    assert_logs_match(logs_a, logs_b, config.get("steps", 2))
    assert params_a.keys() == params_b.keys() and params_a
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name], p, rtol=1e-5, atol=1e-5, msg=name)
    return logs_b, trainer, rows
