"""Kernel times (torch.profiler, mean of 3 steps) of one GQA training step
at L = 32768 (causal and local, 16 q heads and 4 kv heads of 128, bf16):
the bench_grad_*_gqa packages in $OLD_PKGS against those in
$ATTN_GPU_PACKAGES, as bench/gqa_step.py runs them.

    ATTN_GPU_PACKAGES=new OLD_PKGS=old PYTHONPATH=python:bench python3 bench/gqa_profile.py
"""
import os

import torch

import attn
from kernel_times import print_kernel_times

B, H, HKV, D, L = 1, 16, 4, 128, 32768
for label, d in (("before", os.environ["OLD_PKGS"]), ("after", os.environ["ATTN_GPU_PACKAGES"])):
    for pattern in ("causal_gqa", "local_gqa"):
        pkg = attn.load(os.path.join(d, f"bench_grad_{pattern}_{L}"))
        gen = torch.Generator(device="cuda").manual_seed(L)
        mk = lambda h: torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                   generator=gen).requires_grad_()
        q, k, v = mk(H), mk(HKV), mk(HKV)
        g = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)

        def step():
            for x in (q, k, v):
                x.grad = None
            pkg(q, k, v).backward(g)

        print_kernel_times(step, f"{label} {pattern}")
