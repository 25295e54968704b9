"""Runs one bench pattern's package a few times on the bench inputs, for a
profiler to attach to (the DRAM/L2 figures in gpu_ab.md come from this):

    M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct
    ATTN_BUILD_DIR=build PYTHONPATH=python:bench L=32768 PAT=strided \\
        ncu --clock-control none --metrics $M -k regex:component \\
        python3 bench/gpu_profile.py gpu-pkgs [gpu-pkgs-b ...]

Each argument is a folder from scripts/build_gpu_packages.py; L and PAT pick
the length and pattern (names as in gpu_bench.py).

For traffic between kernels (what one kernel finds in L2 of what the one
before it read or wrote) add `--replay-mode application --cache-control
none`: ncu's default kernel replay saves and restores memory around each
kernel's passes, and its default cache control flushes the L2 before each
kernel; either way its DRAM figures then show no reuse between kernels at
all (gpu_ab.md, "Rounds of half a pair" and "Strided's floors").
"""
import os
import sys

import torch

import attn
from gpu_patterns import B, D, H, dev, doc_lengths, package_inputs, package_name

L = int(os.environ.get("L", "32768"))
name = os.environ.get("PAT", "strided")
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
doc_lens = doc_lengths(L)
if name == "tokenized" and doc_lens is None:
    sys.exit(f"gpu_profile.py: no tokenized benchmark at L={L} "
             f"(bench/gpu/doc_lengths_{L}.json is missing)")
qa, ka, va, lens_t = package_inputs(name, q, k, v, doc_lens)
for folder in sys.argv[1:]:
    pkg = attn.load(os.path.join(folder, package_name(name, L)))
    for _ in range(3):
        pkg(qa, ka, va, lengths=lens_t)
    torch.cuda.synchronize()
