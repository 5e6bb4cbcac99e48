"""Vocabulary parallelism: the classifier split by rows over a process group or a DTensor mesh.

vocab.py: recognising the split and combining per-rank parts; agreement.py: checking that every
rank made the same call before a collective whose size depends on it.
"""
