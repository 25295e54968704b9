"""Where a TokenizedAttention layer call's time goes on one GPU: for self and
target attention at L = 1024, 4096 and 10000 (bench/tokenized_gpu.py's
inputs), the mean time of every GPU kernel over three calls, then the
third call's timeline: top-level host operations and GPU kernels, start
(µs from the call's first operation) and duration, from torch.profiler
(which slows the host operations down; the kernels' times hold).

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench python3 bench/tokenized_timeline.py
"""
import os

import torch
import attn
from torch.profiler import profile, ProfilerActivity
from tokenized_gpu import B, C, D, H, HKV, VOCAB, zipf_ids
PKGS = os.environ["ATTN_GPU_PACKAGES"]
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(1)
tables = [torch.randn(VOCAB, h, D, device=dev, generator=gen).bfloat16() for h in (H, HKV, HKV)]
emb = attn.TableEmbedding(*tables)
for L in (1024, 4096, 10000):
    tokens = zipf_ids((B, L), gen)
    lengths = torch.full((B,), L, device=dev)
    cands = zipf_ids((B, C), gen)
    m = attn.TokenizedAttention(B, L, 1, emb, package_dir=PKGS)
    for name, f in (("self", lambda: m(tokens, lengths)),
                    ("target", lambda: m.target_forward(cands, tokens, lengths))):
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                f()
            torch.cuda.synchronize()
        ev = [e for e in p.events() if (e.device_type.name == "CUDA") or e.cpu_parent is None]
        ev.sort(key=lambda e: e.time_range.start)
        t0 = ev[0].time_range.start
        print(f"=== L={L} {name}")
        kern = {}
        for e in ev:
            if e.device_type.name == "CUDA":
                kern.setdefault(e.name[:40], []).append(e.time_range.end - e.time_range.start)
        for k, v in kern.items():
            print(f"   gpu {k:40s} x{len(v)} mean {sum(v)/len(v):8.1f} us")
        calls = [e for e in ev if e.device_type.name != "CUDA"]
        third = calls[len(calls) * 2 // 3:]
        base = third[0].time_range.start
        for e in ev:
            if e.time_range.start >= base:
                kind = "GPU" if e.device_type.name == "CUDA" else "cpu"
                print(f"   {kind} {e.time_range.start - base:8.1f} +{e.time_range.end - e.time_range.start:7.1f}  {e.name[:50]}")
