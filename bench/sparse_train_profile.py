"""GPU kernel times (torch.profiler, mean of 5 steps) of one attn.sparse
training step at L = 32768 for each layer of gpu_cases.SPARSE_BENCH: the
step of bench/sparse_train.py (q, k and v split from one fused projection
[B, L, 3E] that requires grad, forward and backward). Run under two
checkouts' python for an A/B:

    ATTN_GPU_PACKAGES=DIR PYTHONPATH=python:python/tests:bench python3 bench/sparse_train_profile.py
"""
import os

import torch

import gpu_cases
from attn import sparse
from kernel_times import print_kernel_times

folder = os.environ["ATTN_GPU_PACKAGES"]
L = 32768
for B, E, H, mode, ctx, dtype in gpu_cases.SPARSE_BENCH:
    layer = sparse.SparseAttention(H, mode, ctx, package_dir=folder)
    qkv = torch.randn(B, L, 3 * E, device="cuda", dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)

    def step():
        qkv.grad = None
        q, k, v = qkv.split(E, dim=-1)
        layer(q, k, v).backward(grad)

    print_kernel_times(step, f"L={L} mode={mode} ctx={ctx}", warm=3, reps=5, top=14)
