"""Tokenized attention on one GPU: attn's deduplicated form against the naive
form and FlexAttention with a document mask, on Zipf-distributed ids.

    ATTN_GPU_PACKAGES=gpu-pkgs PYTHONPATH=python python3 bench/tokenized_gpu.py [OUT]

(OUT: a path prefix for OUT.json/OUT.md, or a folder; default bench/tokenized_gpu.)

Ids follow a bounded Zipf law (exponent 1.1, vocabulary 10^6); q, k and v
come from bf16 embedding tables [V, H, D] (H = Hkv = 8, D = 64), B = 4 full
sequences of L tokens. Each layer call is timed two ways:

  ms           triton.testing.do_bench's median: GPU time between events
               around one call, after do_bench has queued an L2 flush. A
               call that never waits for the GPU (FlexAttention's) has its
               host work hidden behind that flush; attn's calls wait once
               (for the dedup kernels' counts), so the host work after the
               wait is in their time.
  back to back wall time per call over 50 calls queued one after another
               (perf_counter, one synchronize at the end): host and GPU
               time as a training or serving loop sees them.

Self-attention:

  attn dedup   TokenizedAttention.forward: unique ids and counts on the GPU,
               one kernel over the unique ids reading K/V from the tables at
               the ids with the log(count) bias, scatter back to positions
  attn naive   dedup=False: every position's q/k/v gathered from the tables,
               the tokenized pattern kernel
  flex doc     q/k/v gathered per position, the B sequences packed into one
               with a document mask (block mask built once, its time apart)

Target attention: C = 512 candidate items per user against the behaviour
sequence: attn target_forward (candidates as queries, one call, unique ids),
the same over every position (dedup=False), FlexAttention over every
position, and the naive form of the RFC — SDPA once per candidate.

Columns: ms, peak extra GPU memory (MiB, over the tables), K/V bytes the
kernels read rows of (unique ids or positions x 2 x Hkv x D x 2 bytes), the
max |difference| to FlexAttention (same maths, bf16), and for 8 ranks with
tables sharded by id the bytes a rank receives (unique remote ids' q/k/v
rows plus ids) against fetching every position's rows, computed from the
ids (the in-process exchange test measures them)."""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import triton.testing as tt
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.functional import scaled_dot_product_attention as sdpa

import attn

PKGS = os.environ["ATTN_GPU_PACKAGES"]
# OUT: a path prefix for OUT.json and OUT.md, or a folder to write
# tokenized_gpu.json and tokenized_gpu.md into.
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                         "tokenized_gpu")
if os.path.isdir(OUT):
    OUT = os.path.join(OUT, "tokenized_gpu")
B, H, HKV, D, VOCAB, ZIPF, C, RANKS = 4, 8, 8, 64, 10 ** 6, 1.1, 512, 8
LENS = [int(x) for x in os.environ.get("LENS", "1024,4096,10000").split(",")]
dev = "cuda"
flex = torch.compile(flex_attention, dynamic=False)
torch.manual_seed(0)


def zipf_ids(shape, gen):
    """Bounded Zipf(1.1) over [0, VOCAB): rank r has weight r^-1.1; ranks
    are mapped to ids by a fixed random permutation."""
    w = torch.arange(1, VOCAB + 1, device=dev, dtype=torch.float64) ** -ZIPF
    cdf = torch.cumsum(w, 0)
    cdf /= cdf[-1].clone()
    u = torch.rand(shape, device=dev, dtype=torch.float64, generator=gen)
    ranks = torch.searchsorted(cdf, u).clamp_(max=VOCAB - 1)
    perm = torch.randperm(VOCAB, device=dev, generator=gen)
    return perm[ranks]


def bench(f):
    return tt.do_bench(f, warmup=10, rep=100, return_mode="median")


def back_to_back(f, calls=50):
    """ms per call over `calls` calls queued back to back (host included)."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def peak_mib(f):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    f()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main():
    gen = torch.Generator(device=dev).manual_seed(1)
    tables = [torch.randn(VOCAB, h, D, device=dev, generator=gen).bfloat16() for h in (H, HKV, HKV)]
    emb = attn.TableEmbedding(*tables)
    rows = []
    row_bytes = (H + 2 * HKV) * D * 2
    for L in LENS:
        tokens = zipf_ids((B, L), gen)
        lengths = torch.full((B,), L, device=dev)
        dedup = attn.TokenizedAttention(B, L, 1, emb, package_dir=PKGS)
        naive = attn.TokenizedAttention(B, L, 1, emb, dedup=False, package_dir=PKGS)
        out = dedup(tokens, lengths)
        stats = dict(dedup.last_stats)
        positions, unique = stats["positions"], stats["unique"]

        # FlexAttention: the B sequences packed, document mask.
        def gathered():
            q, k, v = (t[tokens.reshape(-1)] for t in tables)  # [B*L, h, D]
            return [x.transpose(0, 1)[None].contiguous() for x in (q, k, v)]
        doc = torch.arange(B, device=dev).repeat_interleave(L)
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        mask = create_block_mask(lambda b, h, q, k: doc[q] == doc[k], 1, 1, B * L, B * L,
                                 device=dev)
        t1.record()
        torch.cuda.synchronize()
        mask_ms = t0.elapsed_time(t1)
        flex_out = flex(*gathered(), block_mask=mask)  # [1, H, B*L, D]
        flex_out = flex_out[0].reshape(H, B, L, D).transpose(0, 1)
        diff = (out.float() - flex_out.float()).abs().max().item()
        naive_diff = (naive(tokens, lengths).float() - flex_out.float()).abs().max().item()

        # 8 ranks, tables sharded by id: what rank 0 would receive.
        u_batch = torch.unique(tokens)
        remote_unique = int((u_batch % RANKS != 0).sum())
        remote_positions = int((tokens % RANKS != 0).sum())
        sharded = (remote_unique * (row_bytes + 8), remote_positions * row_bytes)

        kv_row = 2 * HKV * D * 2
        for name, f, kv_rows in (
                ("attn dedup", lambda: dedup(tokens, lengths), unique),
                ("attn naive", lambda: naive(tokens, lengths), positions),
                ("flex doc", lambda: flex(*gathered(), block_mask=mask), positions)):
            ms = bench(f)
            rows.append({"task": "self", "L": L, "method": name, "ms": ms,
                         "back_to_back_ms": back_to_back(f),
                         "peak_mib": peak_mib(f), "kv_bytes": kv_rows * kv_row,
                         "positions": positions, "unique": unique,
                         "max_diff_vs_flex": {"attn dedup": diff, "attn naive": naive_diff,
                                              "flex doc": 0.0}[name],
                         "mask_ms": mask_ms if name == "flex doc" else None,
                         "rank_bytes_sharded": sharded})
            print(json.dumps(rows[-1]), flush=True)

        # Target attention: C candidates per user.
        cands = zipf_ids((B, C), gen)
        t_out = dedup.target_forward(cands, tokens, lengths)
        t_naive = attn.TokenizedAttention(B, L, 1, emb, dedup=False, package_dir=PKGS)
        tq = tables[0][cands].transpose(1, 2).contiguous()          # [B, H, C, D]
        tk, tv = (t[tokens].transpose(1, 2).contiguous() for t in tables[1:])  # [B, H, L, D]
        ref = sdpa(tq.float(), tk.float(), tv.float())
        t_diff = (t_out.float() - ref).abs().max().item()

        def per_candidate():
            k, v = (t[tokens].transpose(1, 2) for t in tables[1:])
            return [sdpa(tq[:, :, c:c + 1], k, v) for c in range(C)]

        def flex_target():
            k, v = (t[tokens].transpose(1, 2).contiguous() for t in tables[1:])
            return flex(tables[0][cands].transpose(1, 2).contiguous(), k, v)

        for name, f, kv_rows in (
                ("attn target dedup", lambda: dedup.target_forward(cands, tokens, lengths), unique),
                ("attn target positions", lambda: t_naive.target_forward(cands, tokens, lengths),
                 positions),
                ("flex target", flex_target, positions),
                ("sdpa per candidate", per_candidate, positions * C)):
            ms = bench(f)
            rows.append({"task": "target", "L": L, "method": name, "ms": ms,
                         "back_to_back_ms": back_to_back(f),
                         "peak_mib": peak_mib(f), "kv_bytes": kv_rows * kv_row,
                         "positions": positions, "unique": unique,
                         "max_diff_vs_flex": t_diff if name == "attn target dedup" else None})
            print(json.dumps(rows[-1]), flush=True)

    with open(OUT + ".json", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "B": B, "H": H, "Hkv": HKV, "D": D, "vocab": VOCAB, "zipf": ZIPF,
                   "candidates": C, "rows": rows}, f, indent=1)
    with open(OUT + ".md", "w") as f:
        f.write(f"# Tokenized attention on {torch.cuda.get_device_name()}\n\n"
                f"bf16, B = {B}, H = Hkv = {H}, D = {D}, ids Zipf({ZIPF}) over a vocabulary of "
                f"{VOCAB:,}, tables [V, H, D]; target attention with {C} candidates per user. "
                "Produced by bench/tokenized_gpu.py (see its docstring).\n\n")
        f.write("| task | L | positions/unique | method | ms | speed-up vs flex | "
                "back to back ms | speed-up vs flex | peak MiB | K/V bytes read | "
                "max diff vs flex |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            flex_row = next(x for x in rows if x["task"] == r["task"] and x["L"] == r["L"]
                            and x["method"].startswith("flex"))
            base, base_b2b = flex_row["ms"], flex_row["back_to_back_ms"]
            d = r["max_diff_vs_flex"]
            f.write(f"| {r['task']} | {r['L']} | {r['positions'] / r['unique']:.2f} | "
                    f"{r['method']} | {r['ms']:.3f} | {base / r['ms']:.2f}x | "
                    f"{r['back_to_back_ms']:.3f} | {base_b2b / r['back_to_back_ms']:.2f}x | "
                    f"{r['peak_mib']:.0f} | {r['kv_bytes']:,} | "
                    f"{'' if d is None else f'{d:.3g}'} |\n")
        f.write("\nFlexAttention's document block mask build (not in its ms): " + ", ".join(
            f"L={r['L']}: {r['mask_ms']:.1f} ms" for r in rows if r.get("mask_ms")) + ".\n\n")
        f.write(f"With {RANKS} ranks and tables sharded by id (id % {RANKS}), rank 0 of these "
                "batches would receive (q/k/v rows of its remote unique ids, plus the ids) "
                "against fetching every remote position's rows:\n\n| L | exchange bytes | "
                "per-position bytes | ratio |\n|---|---|---|---|\n")
        for r in rows:
            if r["method"] == "attn dedup":
                a, b = r["rank_bytes_sharded"]
                f.write(f"| {r['L']} | {a:,} | {b:,} | {b / a:.2f}x |\n")
    print("wrote", OUT + ".md")


if __name__ == "__main__":
    main()
