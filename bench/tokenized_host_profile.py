"""Where a TokenizedAttention layer call's host time goes (one GPU): for
self and target attention at a short length (L = 1024 by default;
bench/tokenized_gpu.py's inputs), the time per call queued back to back,
then cProfile over the same calls, the functions with the most own time.
The host sets the pace of these calls (bench/tokenized_timeline.py: the
kernels take about 40 µs of a 0.3 ms call), so this is what to shorten.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench python3 bench/tokenized_host_profile.py [L ...]
"""
import cProfile
import os
import pstats
import sys

import torch
import attn
from tokenized_gpu import B, C, D, H, HKV, VOCAB, back_to_back, zipf_ids

PKGS = os.environ["ATTN_GPU_PACKAGES"]
CALLS = 300
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(1)
tables = [torch.randn(VOCAB, h, D, device=dev, generator=gen).bfloat16() for h in (H, HKV, HKV)]
emb = attn.TableEmbedding(*tables)


for L in [int(a) for a in sys.argv[1:]] or [1024]:
    tokens = zipf_ids((B, L), gen)
    lengths = torch.full((B,), L, device=dev)
    cands = zipf_ids((B, C), gen)
    m = attn.TokenizedAttention(B, L, 1, emb, package_dir=PKGS)
    for name, f in (("self", lambda: m(tokens, lengths)),
                    ("self+lse", lambda: m(tokens, lengths, return_lse=True)),
                    ("target", lambda: m.target_forward(cands, tokens, lengths))):
        print(f"=== L={L} {name}: {back_to_back(f, CALLS) * 1e3:.1f} us per call back to back")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            f()
        torch.cuda.synchronize()
        prof.disable()
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(18)
