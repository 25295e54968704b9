"""Times the bench packages on q, k, v that come as [B, L, H, D] tensors (as
a model's projections give them) and an output wanted as [B, L, H, D] (as a
model's output projection takes it): q, k, v passed as their [B, H, L, D]
views (strided, no copy) with out the same view of a [B, L, H, D] tensor
(written in place), the same inputs with the output copied to
[B, L, H, D] after the call (what a caller had to do before out took
strides), copies of everything (before q, k and v took strides), and
[B, H, L, D] tensors in and out that are contiguous already. One GPU, one process, same inputs; median of ROUNDS
rotated rounds (default 3) of triton's do_bench; TF/s as in gpu_bench.py.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        LENS=32768 python3 bench/gpu_layout.py          # bench/gpu_layout.md

Tokenized is left out (its bench packs documents into a padded batch)."""
import json
import os

import torch

import attn
from gpu_patterns import B, D, H, dev, package_name, pairs, print_table, rotated_times, tflops

lens = [int(x) for x in os.environ.get("LENS", "32768").split(",")]
patterns = os.environ.get("PATTERNS", "causal,local,strided,dilated_sum,dilated_union").split(",")
rounds = int(os.environ.get("ROUNDS", "3"))
folder = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
torch.manual_seed(0)
rows = []
for L in lens:
    blhd = [torch.randn(B, L, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    views = [t.transpose(1, 2) for t in blhd]          # [B, H, L, D], strided
    dense = [t.contiguous() for t in views]
    out_blhd = torch.empty_like(blhd[0])
    out_view = out_blhd.transpose(1, 2)
    for name in patterns:
        pkg = attn.load(os.path.join(folder, package_name(name, L)))
        runs = {
            "views in and out (no copy)": lambda: pkg(*views, out=out_view),
            "views in, out copied": lambda: pkg(*views).transpose(1, 2).contiguous(),
            "copies in and out": lambda: pkg(*[t.contiguous() for t in views])
            .transpose(1, 2).contiguous(),
            "contiguous [B, H, L, D]": lambda: pkg(*dense),
        }
        same = torch.equal(runs["views in and out (no copy)"](), runs["contiguous [B, H, L, D]"]())
        ms, _ = rotated_times(runs, rounds)
        nnz = pairs(name, L)
        row = {"L": L, "pattern": name, "identical_outputs": same}
        for m, t in ms.items():
            row[m] = round(tflops(nnz, t), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del blhd, views, dense, out_blhd, out_view
    torch.cuda.empty_cache()

modes = list(runs)
print_table([("L", lambda r: str(r["L"])), ("pattern", lambda r: r["pattern"])]
            + [(m, lambda r, m=m: f"{r[m]:.0f}") for m in modes]
            + [("outputs identical", lambda r: "yes" if r["identical_outputs"] else "NO")], rows)
