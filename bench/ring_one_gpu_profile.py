"""Every rank's work of a ring package on one GPU: the ranks run as threads
(run_ranks and run_ranks_backward; the in-process transport copies each
step's rows and gradients device to device), and torch.profiler sums the
GPU time of their kernels, copies and memsets (mean of 3 calls after 2). A
check of the ranks' own work (not of the ring's overlap) where no two GPUs
are lent: the speed cases of bench/ring_gpu_backward.py, whose packages are
built by

    python3 bench/ring_gpu_backward.py --build PKGS --ranks 2

and run here as

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/ring_one_gpu_profile.py PKGS LABEL [--only local] [--forward | --backward]

(ATTN_BUILD_DIR picks the runtime, so that two builds compare in turn; the
host copies in the tables are the NumPy inputs' and outputs'.) With
`--kv-heads N` the same cases run under GQA (N kv heads for the 16 q heads),
from packages this script builds here (no GPU needed):

    python3 bench/ring_one_gpu_profile.py PKGS --build --kv-heads 4
"""
import argparse
import os

import numpy as np

import attn
from ring_gpu import build, key, spec
from ring_gpu_backward import SPEED

H, D = 16, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("packages")
    ap.add_argument("label", nargs="?", default="")
    ap.add_argument("--only", help="one pattern of SPEED (causal, local)")
    ap.add_argument("--forward", action="store_true", help="the forward only")
    ap.add_argument("--backward", action="store_true", help="the backward only")
    ap.add_argument("--kv-heads", type=int, default=H,
                    help="kv heads (GQA below 16; its packages come from --build)")
    ap.add_argument("--build", action="store_true",
                    help="compile the GQA cases' packages into PACKAGES (2 ranks)")
    a = ap.parse_args()
    gqa = a.kv_heads != H
    suffix = f"_kv{a.kv_heads}" if gqa else ""
    cases = [(n + suffix, p, layout, L) for n, p, layout, L in SPEED
             if not a.only or n == a.only]
    if a.build:
        build(a.packages, 2, cases, lambda *s: {**spec(*s), "backward": True,
                                                "kv_heads": a.kv_heads})
        return
    from kernel_times import print_kernel_times  # (torch: the GPU machine's)
    for i, (name, _pattern, layout, L) in enumerate(cases):
        ring = attn.load(os.path.join(a.packages, key(name, layout, L)))
        rng = np.random.default_rng(400 + i)
        q, k, v, g = (rng.standard_normal((1, h, L, D), dtype=np.float32)
                      for h in (H, a.kv_heads, a.kv_heads, H))
        title = f"{a.label}: {name} {layout} L={L}, {ring.ranks} ranks on one GPU"
        if not a.backward:
            print_kernel_times(lambda: ring.run_ranks(q, k, v), title + ", forward", top=10)
        if not a.forward:
            out, lse = ring.run_ranks(q, k, v, return_lse=True)
            print_kernel_times(lambda: ring.run_ranks_backward(q, k, v, out, lse, g),
                               title + ", backward", top=12)
        del ring


if __name__ == "__main__":
    main()
