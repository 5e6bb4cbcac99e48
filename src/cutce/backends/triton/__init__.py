"""The Triton backend: kernels at the top of each file, launchers below.

ops.py and distill_ops.py register the torch.library custom ops the api calls; common.py holds the
logit tile shared by every kernel; forward.py the log-sum-exp forward; backward.py the exact (and
opt-in filtered) backward; fused.py the fused strategy; distill*.py the distillation kernels;
configs.py the frozen kernel configurations per device.
"""
