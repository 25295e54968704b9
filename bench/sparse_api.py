"""Times attn.sparse, the seeds' sparse-attention API ([B, L, E] in and out,
attn_mode "all" / "local" / "strided"), against what a user of the seed
would run otherwise, on the same inputs in one process on one GPU:

  - FlexAttention (compiled) with the mode's block mask (its build time is
    reported apart, as in gpu_bench.py);
  - PyTorch SDPA given the mode's boolean mask [L, L] (up to DENSE_MAX);
  - the seed's own attention_impl in PyTorch: QK^T, the mask, softmax, PV,
    all [B, H, L, L] in bf16 (up to DENSE_MAX).

q, k and v are slices of one fused projection [B, L, 3E] (bf16), as a
model's layer has them; every call starts from them and ends with the
output [B, L, E], so the head split and merge count in every time.
Effective TF/s = 4 * (attended pairs) * D / time; median of ROUNDS rotated
rounds (default 3) of triton's do_bench. The layers are gpu_cases.py's
SPARSE_BENCH (B = 1, E = 2048: 16 heads of 128), their packages in
$ATTN_GPU_PACKAGES (scripts/build_gpu_packages.py). ALSO_PACKAGES=DIR adds
a column for the same layers on DIR's packages (another compiler's, say):

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench LENS=8192,32768 \\
        python3 bench/sparse_api.py                       # bench/sparse_api_h100.md
"""
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attn import sparse
from gpu_patterns import print_table, rotated_times, sparse_layers

lens = [int(x) for x in os.environ.get("LENS", "8192,32768").split(",")]
rounds = int(os.environ.get("ROUNDS", "3"))
dense_max = int(os.environ.get("DENSE_MAX", "8192"))
folder = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
also = os.environ.get("ALSO_PACKAGES")
also_name = f"attn.sparse ({os.path.basename(os.path.normpath(also))})" if also else None
dev = "cuda"
flex = torch.compile(flex_attention, dynamic=False)


def mask_mod(mode, ctx):
    if mode == "all":
        return lambda b, h, q, k: k <= q
    if mode == "local":
        return lambda b, h, q, k: (k <= q) & (q - k < ctx)
    return lambda b, h, q, k: (k <= q) & ((q - k) % ctx == 0)


def pairs_per_head(mode, ctx, L):
    """Attended pairs of one head, in closed form: row p attends p + 1 keys
    (all), min(p + 1, ctx) (local), floor(p / ctx) + 1 (strided)."""
    if mode == "all":
        return L * (L + 1) // 2
    if mode == "local":
        return sum(min(p + 1, ctx) for p in range(L))
    return sum(p // ctx + 1 for p in range(L))


torch.manual_seed(0)
rows = []
for L, (B, E, H, mode, ctx, dtype), layer, q, k, v in sparse_layers(lens, folder):
    D = E // H
    heads = lambda x: x.reshape(B, L, H, D).transpose(1, 2)
    merge = lambda o: o.transpose(1, 2).reshape(B, L, E)
    mod = mask_mod(mode, ctx)
    t0 = time.time()
    block_mask = create_block_mask(mod, None, None, L, L, device=dev, _compile=True)
    torch.cuda.synchronize()
    mask_s = time.time() - t0

    runs = {"attn.sparse": lambda: layer(q, k, v),
            "FlexAttention": lambda: merge(flex(heads(q), heads(k), heads(v),
                                                block_mask=block_mask))}
    if also:
        other = sparse.SparseAttention(H, mode, ctx, package_dir=also)
        runs[also_name] = lambda: other(q, k, v)
    if L <= dense_max:
        pos = torch.arange(L, device=dev)
        bool_mask = mod(0, 0, pos[:, None], pos[None, :])
        runs["SDPA, boolean mask"] = lambda: merge(F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=bool_mask))

        def seed_dense():
            w = heads(q) @ heads(k).transpose(-2, -1) * (1.0 / math.sqrt(D))
            w = w.masked_fill(~bool_mask, -1e9).softmax(dim=-1)
            return merge(w @ heads(v))
        runs["seed's attention_impl (torch)"] = seed_dense

    ours = layer(q, k, v)
    flex_out = runs["FlexAttention"]()
    diff = (ours.float() - flex_out.float()).abs().max().item()
    ms, _ = rotated_times(runs, rounds)
    nnz = B * H * pairs_per_head(mode, ctx, L)
    row = {"L": L, "mode": mode, "ctx": ctx, "flex_mask_s": round(mask_s, 3),
           "max_abs_diff_vs_flex": diff,
           "us": {n: round(t * 1e3, 1) for n, t in ms.items()},
           "tflops": {n: round(4 * nnz * D / t / 1e9, 1) for n, t in ms.items()}}
    rows.append(row)
    print(json.dumps(row), flush=True)
    del q, k, v, block_mask, runs, ours, flex_out
    torch.cuda.empty_cache()

peers = ([also_name] if also else []) + ["FlexAttention", "SDPA, boolean mask", "seed's attention_impl (torch)"]
cell = lambda r, n: (f"{r['tflops'][n]:.0f} ({r['us'][n]:.0f} µs)" if n in r["tflops"] else "—")
print_table([("L", lambda r: str(r["L"])),
             ("mode", lambda r: r["mode"] + (f" {r['ctx']}" if r["ctx"] else "")),
             ("attn.sparse", lambda r: cell(r, "attn.sparse"))]
            + [(n, lambda r, n=n: cell(r, n)) for n in peers]
            + [("x Flex", lambda r: f"{r['us']['FlexAttention'] / r['us']['attn.sparse']:.1f}"),
               ("Flex mask build (s)", lambda r: f"{r['flex_mask_s']:.2f}"),
               ("max |attn - Flex|", lambda r: f"{r['max_abs_diff_vs_flex']:.1e}")], rows)
