"""The backends that run a plan: ``torch`` (exact chunked; the CPU path and the oracle) and
``triton`` (the GPU kernels). Neither imports the other; each reads the engine's plan."""
