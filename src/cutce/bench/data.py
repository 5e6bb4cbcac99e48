"""Benchmark inputs: named shapes and the two data kinds, deterministic from a seed.

Data is generated in float32 on the target device (so that a GPU run does not copy gigabytes
through the host) and only then cast to the benchmark dtype: every dtype sees the same values up
to its own rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (N tokens, D hidden size, V vocabulary)
SHAPES = {
    "gemma2-2b": (8192, 2304, 256000),
    "llama3-8b": (8192, 4096, 128256),
    # Long context at a big vocabulary (a Gemma-3-4B-like head, 64k tokens): float32 logits
    # alone are 64 GiB, the case other libraries run out of memory on
    "gemma3-64k": (65536, 2560, 262144),
    # The default with no GPU. fp32 logits (512 MiB) are 7x the gradients dE + dC (72 MiB), about
    # the ratio of Gemma 2's head at 8192 tokens, so the memory that fusing saves shows; the
    # whole `cutce bench` (4 default providers, the float64 reference, warm-up and repeats)
    # takes about 2.5 minutes on 2 CPU cores.
    "cpu-medium": (4096, 512, 32768),
    # A quicker CPU run (about 4x less work; logits 128 MiB).
    "cpu-small": (2048, 512, 16384),
}
DATA_KINDS = ("zipf", "flat")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """A problem size and the name it was asked for by (``"N,D,V"`` when custom)."""

    name: str
    n: int
    d: int
    v: int

    @property
    def custom(self) -> bool:
        return self.name not in SHAPES

    def with_n(self, n: int) -> "Shape":
        """The same D and V with n tokens (a named shape keeps its name: same model, more tokens)."""
        return Shape(f"{n},{self.d},{self.v}" if self.custom else self.name, n, self.d, self.v)

    def __str__(self) -> str:
        return f"N={self.n} D={self.d} V={self.v}"


def parse_shape(text: str) -> Shape:
    """A named shape (see :data:`SHAPES`) or ``"N,D,V"``; raises ValueError otherwise."""
    if text in SHAPES:
        return Shape(text, *SHAPES[text])
    parts = text.replace("x", ",").split(",")
    try:
        n, d, v = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shape: expected one of {sorted(SHAPES)} or N,D,V, got {text!r}") from None
    if min(n, d, v) < 1:
        raise ValueError(f"--shape: expected positive N,D,V, got {text!r}")
    return Shape(f"{n},{d},{v}", n, d, v)


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {text!r}")
    return DTYPES[text]


def make_inputs(shape: Shape, kind: str, dtype: torch.dtype, device, seed: int = 0):
    """(hidden (N, D), weight (V, D), targets (N,) int64) of the given data kind.

    ``flat``: hidden and weight ~ randn / D**0.25 (logits of unit variance), uniform targets: every
    class is plausible, the hardest case for gradient filtering and the easiest for nobody.

    ``zipf``: a trained-model-like distribution. Classes get a random rank r and a log-prior
    -log r carried by weight column 0 (hidden column 0 is 1, so the prior enters every logit);
    targets are drawn from softmax(-log r) and each hidden state points at its target's embedding
    (12x) plus noise. At the Gemma shape the mean max-probability is about 0.76 and the entropy
    about 2.5 nats.
    """
    n, d, v = shape.n, shape.d, shape.v
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(dtype=torch.float32, device=device)
    if kind == "flat":
        scale = d ** -0.25
        hidden = torch.randn(n, d, generator=gen, **f32) * scale
        weight = torch.randn(v, d, generator=gen, **f32) * scale
        targets = torch.randint(0, v, (n,), generator=gen, device=device)
    elif kind == "zipf":
        rank = torch.randperm(v, generator=gen, device=device) + 1
        log_prior = -torch.log(rank.to(torch.float32))
        weight = torch.randn(v, d, generator=gen, **f32) / math.sqrt(d)
        weight[:, 0] = log_prior
        targets = torch.multinomial(torch.softmax(log_prior, 0), n, replacement=True, generator=gen)
        hidden = 12.0 * weight[targets] + 1.5 * torch.randn(n, d, generator=gen, **f32) / math.sqrt(d)
        hidden[:, 0] = 1.0
    else:
        raise ValueError(f"--data: expected one of {DATA_KINDS}, got {kind!r}")
    return hidden.to(dtype), weight.to(dtype), targets


@torch.no_grad()
def data_stats(hidden, weight, sample: int = 256):
    """(mean max-probability, mean entropy in nats) over the first ``sample`` tokens: a cheap
    check that a data kind looks like what it claims (only sample x V logits are formed)."""
    z = hidden[:sample].float() @ weight.float().T
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    return p.max(-1).values.mean().item(), entropy.mean().item()
