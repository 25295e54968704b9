"""The backward of packages that finish their gradients (strided, LongNet)
with their float32 sums for P (batch, head) pairs at a time: does running
the components' kernels a few pairs at a time (so that the later
component finds the earlier one's sums and inputs in L2, as the forward's
rounds do) change the time? Packages from `bench/gpu_long.py build DIR`
(bench/gpu/specs with their backward); on the GPU machine:

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/backward_sum_rounds.py DIR

B = 1, 16 heads of 128, bf16, at L = 32768 and 131072 (LENS). For each
pattern the pair counts PAIRS (default 16,8,4,2,1) take turns, ROUNDS
(default 3) times in rotated order; each time is the median between CUDA
events of about a second of backward calls into bf16 gradients. Every
count's gradients must equal the first's bit for bit (the same kernels add
the same shares). Rows go to $OUT/backward_sum_rounds.json."""

import json
import os
import statistics
import sys

import torch

import attn
from kernel_times import checked_backward_ms, write_rows

H, D = 16, 128
PATTERNS = os.environ.get("PATTERNS", "strided,dilated_sum,dilated_union").split(",")
LENS = [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]
PAIRS = [int(x) for x in os.environ.get("PAIRS", "16,8,4,2,1").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def main(pkg_dir):
    default_pairs = attn._sum_pairs
    rows = []
    for L in LENS:
        gen = torch.Generator(device="cuda").manual_seed(L)
        q, k, v, g = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16,
                                  generator=gen) for _ in range(4))
        for p in PATTERNS:
            pkg = attn.load(os.path.join(pkg_dir, f"long_{p}"))
            out, lse = pkg(q, k, v, return_lse=True)
            grads = tuple(torch.empty_like(x) for x in (q, k, v))
            times = {n: [] for n in PAIRS}
            first = None
            for r in range(ROUNDS):
                for n in PAIRS[r % len(PAIRS):] + PAIRS[:r % len(PAIRS)]:
                    attn._sum_pairs = lambda *a, n=n: n
                    call = lambda: pkg.backward(q, k, v, out, lse, g, grads=grads)
                    first, ms = checked_backward_ms(call, grads, first,
                                                    f"{p} L={L} pairs={n}")
                    times[n].append(ms)
            attn._sum_pairs = default_pairs
            row = {"L": L, "pattern": p, "default_pairs": default_pairs(1, H, H, L, L, D),
                   "ms": {n: statistics.median(t) for n, t in times.items()},
                   "all_ms": times}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del out, lse, grads, first
            torch.cuda.empty_cache()
        del q, k, v, g
        torch.cuda.empty_cache()
    write_rows("backward_sum_rounds", rows)
    print("| L | pattern | " + " | ".join(f"{n} pairs (ms)" for n in PAIRS) + " |")
    print("|---|---|" + "---|" * len(PAIRS))
    for r in rows:
        cells = " | ".join(f"{r['ms'][n]:.3f}" for n in PAIRS)
        print(f"| {r['L']} | {r['pattern']} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1])
