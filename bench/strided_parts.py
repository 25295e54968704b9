"""Strided (S = 128, Child) against its two components run as patterns of
their own, on one GPU in one process, to bound what each component's kernel
can give the whole:

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/strided_parts.py GPU_PKGS PARTS_PKGS

GPU_PKGS is a folder from scripts/build_gpu_packages.py (its bench_strided
package); PARTS_PKGS holds bench/gpu/parts/*.json compiled for the same
target (`attn-compile SPEC --target sm_90a -o PARTS_PKGS/<name>`):

- parts_strided_residues: strided with local = 1, so that its band is the
  diagonal only (one key tile per block) and its time is nearly all the
  per-residue component's (keys p - 128 k), merges and rounds included;
- parts_strided_band: local, window 128, strided's band as a one-kernel
  package (no state, no merge, no rounds: one launch of all heads).

Each is timed with rounds as the runtime picks them and with
ATTN_GPU_ROUNDS=0 (one launch per kernel), by gpu_patterns.rotated_times.
Then one strided call per length under torch.profiler gives each kernel's
median duration and the call's span. LENS (default 32768,131072) and ROUNDS
(default 5) as in gpu_ab.py. Rows go to $OUT/strided_parts.json.
"""
import json
import os
import statistics
import sys

import torch

import attn
from gpu_patterns import B, D, H, S, count, dev, kernel_durations, rotated_times, tflops, with_rounds

gpu_pkgs, parts_pkgs = sys.argv[1], sys.argv[2]
lens = [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]
rounds = int(os.environ.get("ROUNDS", "5"))

MASKS = {
    "strided": lambda b, h, q, k: (k <= q) & (((q - k) < S) | ((q - k) % S == 0)),
    "residues": lambda b, h, q, k: (k <= q) & ((q - k) % S == 0),
    "band": lambda b, h, q, k: (k <= q) & ((q - k) < S),
}
PACKAGES = {
    "strided": os.path.join(gpu_pkgs, "bench_strided"),
    "residues": os.path.join(parts_pkgs, "parts_strided_residues"),
    "band": os.path.join(parts_pkgs, "parts_strided_band"),
}


rows = []
torch.manual_seed(0)
for L in lens:
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    pkgs = {name: attn.load(path) for name, path in PACKAGES.items()}
    nnz = {name: count(fn, L, False) for name, fn in MASKS.items()}
    runs, settings = {}, {}
    for name, pkg in pkgs.items():
        for mode, setting in (("rounds", None), ("one launch", "0")):
            key = f"{name} ({mode})"
            runs[key] = lambda pkg=pkg: pkg(q, k, v)
            settings[key] = setting
    med, every = rotated_times(runs, rounds, before=lambda key: with_rounds(settings[key]))
    with_rounds(None)
    for key, ms in med.items():
        name = key.split(" ")[0]
        row = {"L": L, "run": key, "us": ms * 1e3, "pairs": nnz[name],
               "tflops": tflops(nnz[name], ms),
               "strided_tflops_at_this_time": tflops(nnz["strided"], ms),
               "every_ms": every[key]}
        rows.append(row)
        print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "every_ms"}), flush=True)

    # One strided call under the profiler: each kernel's durations.
    by_name, span = kernel_durations(lambda: pkgs["strided"](q, k, v))
    for name, durations in sorted(by_name.items()):
        row = {"L": L, "profile": name, "launches": len(durations),
               "median_us": statistics.median(durations), "sum_us": sum(durations)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.append({"L": L, "profile": "call span", "us": span})
    print(json.dumps(rows[-1]), flush=True)

out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "strided_parts.json"), "w") as f:
        json.dump(rows, f, indent=1)
