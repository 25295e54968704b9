"""Kernel times (torch.profiler, mean of 3 steps) of one GQA training step
at L = 32768 (causal and local, 16 q heads and 4 kv heads of 128, bf16):
the bench_grad_*_gqa packages in $OLD_PKGS against those in
$ATTN_GPU_PACKAGES, as bench/gqa_step.py runs them.

    ATTN_GPU_PACKAGES=new OLD_PKGS=old PYTHONPATH=python python3 bench/gqa_profile.py
"""
import os

import torch
from torch.profiler import profile, ProfilerActivity

import attn

B, H, HKV, D, L = 1, 16, 4, 128, 32768
for label, d in (("before", os.environ["OLD_PKGS"]), ("after", os.environ["ATTN_GPU_PACKAGES"])):
    for pattern in ("causal_gqa", "local_gqa"):
        pkg = attn.load(os.path.join(d, f"bench_grad_{pattern}_{L}"))
        gen = torch.Generator(device="cuda").manual_seed(L)
        mk = lambda h: torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        q, k, v = mk(H), mk(HKV), mk(HKV)
        g = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        def step():
            for x in (q, k, v): x.grad = None
            pkg(q, k, v).backward(g)
        for _ in range(2): step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3): step()
            torch.cuda.synchronize()
        print(f"== {label} {pattern}")
        rows = []
        for e in p.key_averages():
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                rows.append((t / 3, e.count // 3, e.key[:80]))
        rows.sort(reverse=True)
        for t, c, kk in rows[:8]:
            print(f"{t:9.1f} us  x{c:<3} {kk}")
        print(f"all {sum(r[0] for r in rows):.1f} us")
