"""attn vs FlexAttention vs SDPA on one GPU, in one run, on the same inputs.

    ATTN_GPU_PACKAGES=gpu-pkgs PYTHONPATH=python python3 bench/gpu_bench.py

Packages come from scripts/build_gpu_packages.py (compiled off the GPU
machine; their compile times are read from compile_times.json). Masks and
timing follow ../shared/bench/peers.py: B=1, H=16, D=128, bf16, forward,
triton.testing.do_bench medians, effective TFLOP/s = 4 * attended pairs * D /
time. Tokenized: documents of random length 64..4095 packed into L tokens;
Flex runs the packed sequence with a document mask, attn runs one document
per batch row (padded to 4096, lengths = document lengths): the same pairs.
LENS=32768,131072 picks lengths; PATTERNS=causal,local,... picks patterns.
The raw rows go to $OUT/gpu_l<LENS>.json (e.g. gpu_l32768.json), so runs at
different lengths into one folder keep their own files.
"""
import json
import os
import time

import torch
import triton.testing as tt
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.functional import scaled_dot_product_attention as sdpa

import attn
from gpu_patterns import (B, D, H, dev, doc_lengths, mask_fn, package_inputs,
                          package_name, pairs, tflops)

PKGS = os.environ["ATTN_GPU_PACKAGES"]
torch.manual_seed(0)
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
flex = torch.compile(flex_attention, dynamic=False)
compile_times = json.load(open(os.path.join(PKGS, "compile_times.json")))


def bench(f):
    return tt.do_bench(f, warmup=25, rep=200, return_mode="median")


rows = []
lens_env = os.environ.get("LENS", "32768")
patterns = os.environ.get("PATTERNS", "causal,local,strided,dilated_sum,dilated_union,tokenized").split(",")
for L in [int(x) for x in lens_env.split(",")]:
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    sd_ms = bench(lambda: sdpa(q, k, v, is_causal=True))
    rows.append({"L": L, "pattern": "causal", "impl": "sdpa", "ms": sd_ms,
                 "tflops": tflops(L * (L + 1) / 2 * H, sd_ms)})
    print(json.dumps(rows[-1]), flush=True)
    doc_lens = doc_lengths(L)
    for name in patterns:
        if name == "tokenized" and doc_lens is None:
            continue
        doc = None
        if name == "tokenized":
            doc = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens)).to(dev)
        fn = mask_fn(name, doc)
        nnz = pairs(name, L, doc_lens)
        # ours
        pkg_name = package_name(name, L)
        pkg = attn.load(os.path.join(PKGS, pkg_name))
        qa, ka, va, lens_t = package_inputs(name, q, k, v, doc_lens)
        run = lambda: pkg(qa, ka, va, lengths=lens_t)
        o = run()
        torch.cuda.synchronize()
        ours_ms = bench(run)
        # flex
        t0 = time.time()
        bm = create_block_mask(fn, B, H if name.startswith("dilated") else None, L, L, device=dev, _compile=True)
        torch.cuda.synchronize()
        mask_s = time.time() - t0
        of = flex(q, k, v, block_mask=bm)
        torch.cuda.synchronize()
        flex_ms = bench(lambda: flex(q, k, v, block_mask=bm))
        # agreement with flex where the semantics are the same
        diff = None
        if name != "dilated_sum":
            if name == "tokenized":
                parts, off = [], 0
                for d_, n in enumerate(doc_lens):
                    parts.append(o[d_, :, :n])
                o_packed = torch.cat(parts, dim=1)[None]
            else:
                o_packed = o
            diff = float((o_packed.float() - of.float()).norm() / of.float().norm())
        r = {"L": L, "pattern": name, "nnz": nnz, "density": nnz / (H * L * L),
             "attn_ms": ours_ms, "attn_tflops": tflops(nnz, ours_ms),
             "flex_ms": flex_ms, "flex_tflops": tflops(nnz, flex_ms),
             "speedup_vs_flex": flex_ms / ours_ms, "flex_block_mask_s": mask_s,
             "attn_compile_s": compile_times.get(pkg_name), "rel_diff_vs_flex": diff}
        rows.append(r)
        print(json.dumps(r), flush=True)
        del bm, of, o
        torch.cuda.empty_cache()
    del q, k, v
    torch.cuda.empty_cache()

out = os.environ.get("OUT", "/tmp")
with open(os.path.join(out, "gpu_l" + lens_env.replace(",", "_") + ".json"), "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
print(f"| L | pattern | density | attn ms | attn TF/s | Flex ms | Flex TF/s | speed-up | Flex mask s | attn compile s | diff vs Flex |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("impl") == "sdpa":
        print(f"| {r['L']} | causal (SDPA dense) | | | | | {r['tflops']:.0f} | | | | |")
        continue
    d = "" if r["rel_diff_vs_flex"] is None else f"{r['rel_diff_vs_flex']:.1e}"
    print(f"| {r['L']} | {r['pattern']} | {r['density']:.4f} | {r['attn_ms']:.3f} | {r['attn_tflops']:.0f} | "
          f"{r['flex_ms']:.3f} | {r['flex_tflops']:.0f} | {r['speedup_vs_flex']:.2f} | {r['flex_block_mask_s']:.2f} | "
          f"{r['attn_compile_s']:.2f} | {d} |")
