"""Where a ring rank's backward pass spends its GPU time: rank 0's kernels,
copies and memsets of run_rank_backward under torch.profiler (mean of 3
calls after 2), for the speed cases of bench/ring_gpu_backward.py, and the
single-GPU backward's beside them.

    NCCL_NVLS_ENABLE=0 ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        torchrun --nproc_per_node 2 bench/ring_backward_profile.py PKGS

(PKGS: bench/ring_gpu_backward.py --build PKGS --ranks 2.)
"""
import os
import sys

import torch

import attn
from kernel_times import print_kernel_times
from ring_gpu import key, random_inputs, start
from ring_gpu_backward import SPEED

pkgs = sys.argv[1]
dist, rank, ranks, dev = start()
for i, (name, pattern, layout, L) in enumerate(SPEED):
    ring = attn.load(os.path.join(pkgs, key(name, layout, L)))
    ring.join()
    q, k, v, go = random_inputs(L, 300 + i, dev, n=4)
    lq, lk, lv, lg = (ring.shard(t) for t in (q, k, v, go))
    lo, llse = ring.run_rank(lq, lk, lv, return_lse=True)

    def step():
        ring.run_rank_backward(lq, lk, lv, lo, llse, lg)
    if rank == 0:
        print_kernel_times(step, f"{name} {layout} L={L}: rank 0 of {ranks}", top=14)
    else:
        for _ in range(5):  # the same collective calls as rank 0's
            step()
        torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        single = attn.load(os.path.join(pkgs, f"{name}_single_{L}"))
        out, lse = single(q, k, v, return_lse=True)
        print_kernel_times(lambda: single.backward(q, k, v, out, lse, go),
                           f"{name} L={L}: one GPU", top=8)
        del single, out, lse
    dist.barrier()
    del ring
    torch.cuda.empty_cache()
dist.destroy_process_group()
