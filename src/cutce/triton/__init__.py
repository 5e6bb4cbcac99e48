"""Triton kernels of cutce (imported only by cutce.ops).

common.py: the logit tile shared by every kernel; forward.py: log-sum-exp forward; backward.py:
the exact (and opt-in filtered) backward; configs.py: block sizes per device and dtype.
"""
