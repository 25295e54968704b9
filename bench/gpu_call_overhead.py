"""What a call of a GPU package costs besides its kernels: CPU time per
eager call (from Python, queued back to back), GPU time per eager call,
and GPU time per replay of the same call captured in a CUDA graph (no
launch overhead at all). Where the CPU time per call nears the GPU time,
or the graph replays run faster than the eager calls, the launches hold
the kernels back.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/gpu_call_overhead.py [PACKAGE:L ...]

Default cases: strided at L = 1024, 16384 and 32768, LongNet's sum and
causal at 32768 (bench packages of scripts/build_gpu_packages.py); results
in bench/gpu_ab.md."""
import os
import statistics
import sys
import time

import torch

import attn
from gpu_patterns import us_per_call

cases = sys.argv[1:] or ["bench_strided:1024", "bench_strided:16384", "bench_strided:32768",
                         "bench_dilated_sum:32768", "bench_causal:32768"]
pkgs = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
print("| package | L | CPU µs / eager call | GPU µs / eager call | GPU µs / graph replay |")
print("|---|---|---|---|---|")
for case in cases:
    name, L = case.split(":")
    L = int(L)
    pkg = attn.load(os.path.join(pkgs, name))
    q, k, v = (torch.randn(1, 16, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    for _ in range(10):
        pkg(q, k, v, out=out)
    torch.cuda.synchronize()
    calls = max(10, min(200, int(2e5 / L)))
    cpu = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            pkg(q, k, v, out=out)
        cpu.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()

    eager = us_per_call(lambda: pkg(q, k, v, out=out), calls)
    graph = torch.cuda.CUDAGraph()  # (a captured call has scratch of its own)
    with torch.cuda.graph(graph):
        pkg(q, k, v, out=out)
    replay = us_per_call(graph.replay, calls)
    print(f"| {name} | {L} | {statistics.median(cpu):.0f} | {eager:.0f} | {replay:.0f} |", flush=True)
print(f"\ndevice: {torch.cuda.get_device_name()}")
