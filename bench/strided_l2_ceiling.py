"""How fast strided's rounds run when q, k and v never leave the L2: a
ceiling that separates the kernels' own time from DRAM streaming.

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/strided_l2_ceiling.py gpu-pkgs [gpu-pkgs-b ...]

Each argument is a folder from scripts/build_gpu_packages.py. For each, the
strided bench package (L = 32768, B=1, H=16, D=128, bf16) is timed on

  - distinct heads: the bench inputs;
  - heads aliasing one: q, k and v of head 0 viewed as all 16 heads (head
    stride 0, which GPU packages accept as a strided view), so that after
    the first round every round reads q, k and v from the L2; out is still
    written per head.

The outputs of the second call are not meaningful attention of distinct
heads, only a timing. It then prints, for the first folder, the kernel
timeline of one call (start and duration of its first six kernels,
torch.profiler) for both inputs. If the aliasing call runs much faster, the
rounds are bound by streaming a pair from DRAM in lockstep; if not, by the
kernels themselves (bench/gpu_ab.md, "One-warpgroup blocks").
"""
import os
import sys

import torch
import triton.testing as tt
from torch.profiler import ProfilerActivity, profile

import attn
from gpu_patterns import B, D, H, dev, package_name, pairs, tflops

if len(sys.argv) < 2:
    sys.exit(__doc__)
L = 32768
torch.manual_seed(0)
nnz = pairs("strided", L, None)
q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
aliased = tuple(t[:, :1].expand(B, H, L, D) for t in (q, k, v))
inputs = (("distinct heads", (q, k, v)), ("heads aliasing one", aliased))

pkgs = [attn.load(os.path.join(folder, package_name("strided", L)))
        for folder in sys.argv[1:]]
for folder, pkg in zip(sys.argv[1:], pkgs):
    for label, args in inputs:
        ms = tt.do_bench(lambda: pkg(*args), warmup=25, rep=200, return_mode="median")
        print(f"{folder:24s} {label:20s} {ms * 1e3:7.1f} us "
              f"{tflops(nnz, ms):6.1f} TF/s", flush=True)

pkg = pkgs[0]
for label, args in inputs:
    pkg(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pkg(*args)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA
                      and "component" in e.name),
                     key=lambda e: e.time_range.start)
    if not kernels:
        print(f"{label}: no component kernels in the profile")
        continue
    t0 = kernels[0].time_range.start
    span = max(e.time_range.end for e in kernels) - t0
    print(f"{label}: {len(kernels)} kernels over {span:.1f} us")
    for e in kernels[:6]:
        print(f"   {e.name[:48]:48s} start {e.time_range.start - t0:7.1f} us"
              f"  duration {e.time_range.end - e.time_range.start:6.1f} us")
