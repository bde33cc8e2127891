"""Triton kernels and their launchers (plain functions, tensors in, tensors out), one file per op.

Installed as ``rspeft_fast.kernels``. Importing this package does not import triton; each op file does.
"""
