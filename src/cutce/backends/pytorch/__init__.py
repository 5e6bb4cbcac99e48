"""The torch backend: exact, chunked float32 (float64 for float64) computation of every plan.

ce.py: cross-entropy, log-probs and entropy parts; distill.py: distillation.
"""
