#!/usr/bin/env python3
"""Times the backward pass of attn's GPU packages ("backward": true) against
PyTorch's SDPA (causal, dense) and FlexAttention (compiled, with its block
mask) on the same inputs, in one process on one GPU: B=1, H=16, D=128
(HEAD_DIM=64 for packages built with `scripts/build_gpu_packages.py
--head-dim 64`), bf16; the *_gqa patterns with 4 kv heads (4 q heads each). attn's gradients are bf16 in q's, k's and v's layouts, as the peers'
are, where the package stores them (one component: Package.stores_gradients;
--f32 takes the float32 gradients instead). Each row is the median of 10
timed calls (CUDA events) after warm-up;
FLOP/s count the attended pairs, 10 * pairs * D per backward (the 2.5x of
the forward's 4 that FlashAttention's papers use). Packages come from
$ATTN_GPU_PACKAGES/bench_grad_<pattern>_<L> (bench/gpu/grad_specs/*.json,
built by scripts/build_gpu_packages.py).

    ATTN_GPU_PACKAGES=DIR python3 bench/gpu_backward.py [--lens 8192,32768] [--attn-only] [--f32]

(--attn-only: attn's rows alone, for A/B runs of two builds.)"""

import argparse
import json
import os

import torch

import attn
from kernel_times import event_ms

ap = argparse.ArgumentParser()
ap.add_argument("--lens", default="8192,32768")
ap.add_argument("--attn-only", action="store_true", help="time attn alone (no peers)")
ap.add_argument("--f32", action="store_true",
                help="attn's float32 gradients even where the package stores bf16 ones")
args = ap.parse_args()
PKGS = os.environ["ATTN_GPU_PACKAGES"]
# Each pattern, length and GQA setting recompiles FlexAttention; past
# dynamo's default limit of 8 it would fall back to the eager kernel, which
# materialises every score (64 GiB at L = 32768).
torch._dynamo.config.cache_size_limit = 64
B, H = 1, 16
D = int(os.environ.get("HEAD_DIM", "128"))
HKV = 4  # kv heads of the *_gqa patterns


def timed(fn, reps=10):
    for _ in range(3):
        fn()
    return event_ms(fn, reps) * 1e3


def pairs(pattern, L):
    if pattern.startswith("causal"):
        return L * (L + 1) // 2
    w = 1024  # local: keys i - w + 1 .. i
    return sum(min(i + 1, w) for i in range(L))


rows = []
for L in [int(x) for x in args.lens.split(",")]:
    gen = torch.Generator().manual_seed(L)
    q, k16, v16, g = (torch.randn(B, H, L, D, generator=gen).to("cuda", torch.bfloat16)
                      for _ in range(4))
    for pattern in ("causal", "local", "causal_gqa", "local_gqa"):
        path = os.path.join(PKGS, f"bench_grad_{pattern}_{L}")
        if not os.path.exists(path):
            continue
        gqa = pattern.endswith("_gqa")
        # The *_gqa packages take the first HKV heads' k and v.
        k, v = (k16[:, :HKV].contiguous(), v16[:, :HKV].contiguous()) if gqa else (k16, v16)
        pkg = attn.load(path)
        out, lse = pkg(q, k, v, return_lse=True)
        # (A runtime from before stored gradients has no stores_gradients.)
        stored = getattr(pkg, "stores_gradients", False) and not args.f32
        if stored:
            ours = timed(lambda: pkg.backward(q, k, v, out, lse, g, grads=tuple(
                torch.empty_like(x) for x in (q, k, v))))
        else:
            ours = timed(lambda: pkg.backward(q, k, v, out, lse, g))
        row = {"L": L, "pattern": pattern, "grads": "bf16" if stored else "f32",
               "attn_us": ours}
        if args.attn_only:
            row["attn_tflops"] = 10 * pairs(pattern, L) * D * B * H / ours / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        # Peers: the backward of their own forward (autograd), as the time of
        # forward + backward less the forward's (FlexAttention's compiled
        # backward frees its buffers: it cannot be replayed on one graph).
        qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))

        def backward_of(forward):
            both = timed(lambda: torch.autograd.grad(forward(), (qr, kr, vr), g))
            with torch.no_grad():
                alone = timed(forward)
            return both - alone

        if pattern.startswith("causal"):
            row["sdpa_us"] = backward_of(lambda: torch.nn.functional.scaled_dot_product_attention(
                qr, kr, vr, is_causal=True, enable_gqa=gqa))
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            if pattern.startswith("causal"):
                mod = lambda b, h, i, j: j <= i
            else:
                mod = lambda b, h, i, j: (j <= i) & (i - j < 1024)
            mask = create_block_mask(mod, None, None, L, L)
            flex = torch.compile(flex_attention)
            row["flex_us"] = backward_of(lambda: flex(qr, kr, vr, block_mask=mask,
                                                      enable_gqa=gqa))
        except Exception as e:  # noqa: BLE001 - report and go on
            row["flex_error"] = str(e)[:200]
        flops = 10 * pairs(pattern, L) * D * B * H
        for key in ("attn", "sdpa", "flex"):
            if key + "_us" in row:
                row[key + "_tflops"] = flops / row[key + "_us"] / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
print("| L | pattern | attn µs (TF/s) | SDPA µs (TF/s) | Flex µs (TF/s) |")
print("|---|---|---|---|---|")
for r in rows:
    cell = lambda k: (f"{r[k + '_us']:.0f} ({r[k + '_tflops']:.0f})"
                      if k + "_us" in r else "—")
    print(f"| {r['L']} | {r['pattern']} | {cell('attn')} | {cell('sdpa')} | {cell('flex')} |")
