"""Where attn.sparse's output goes, timed: the kernels writing the [B, L, E]
output in place (out as the [B, H, L, D] view of a [B, L, H, D] tensor, what
SparseAttention does), against a contiguous [B, H, L, D] out (no layout
change: the kernels' own floor) and against that out copied to [B, L, E]
afterwards (what SparseAttention did before out took strides). Same
packages, inputs and process; median of ROUNDS rotated rounds (default 5).

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench LENS=8192,32768 \\
        python3 bench/sparse_out_layout.py                  # bench/sparse_api_h100.md
"""
import json
import os

import torch

from gpu_patterns import print_table, rotated_times, sparse_layers

lens = [int(x) for x in os.environ.get("LENS", "8192,32768").split(",")]
rounds = int(os.environ.get("ROUNDS", "5"))
folder = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
torch.manual_seed(0)
rows = []
for L, (B, E, H, mode, ctx, dtype), layer, *qkv in sparse_layers(lens, folder):
    D = E // H
    pkg = layer.package(B, E, dtype, "sm_90a")
    q, k, v = (x.reshape(B, L, H, D).transpose(1, 2) for x in qkv)
    out_blhd = torch.empty(B, L, H, D, device="cuda", dtype=torch.bfloat16)
    out_bhld = torch.empty(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    runs = {
        "out [B, L, E] in place": lambda: pkg(q, k, v, out=out_blhd.transpose(1, 2)),
        "out [B, H, L, D]": lambda: pkg(q, k, v, out=out_bhld),
        "out [B, H, L, D], then copied": lambda: pkg(q, k, v, out=out_bhld)
        .transpose(1, 2).reshape(B, L, E),
    }
    runs["out [B, L, E] in place"]()
    runs["out [B, H, L, D]"]()
    same = torch.equal(out_blhd.transpose(1, 2), out_bhld)
    ms, _ = rotated_times(runs, rounds)
    row = {"L": L, "mode": mode, "ctx": ctx, "identical": same,
           "us": {n: round(t * 1e3, 1) for n, t in ms.items()}}
    rows.append(row)
    print(json.dumps(row), flush=True)
    del qkv, q, k, v, out_blhd, out_bhld
    torch.cuda.empty_cache()

names = list(runs)
print_table([("L", lambda r: str(r["L"])),
             ("mode", lambda r: r["mode"] + (f" {r['ctx']}" if r["ctx"] else ""))]
            + [(n + " µs", lambda r, n=n: f"{r['us'][n]:.0f}") for n in names]
            + [("identical", lambda r: "yes" if r["identical"] else "NO")], rows)
