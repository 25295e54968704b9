#!/usr/bin/env python3
"""Floors for strided (S = 128, Child) on this GPU, next to what attn's
kernels take, in one process on one GPU:

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/strided_floor.py GPU_PKGS PARTS_PKGS

GPU_PKGS and PARTS_PKGS as for bench/strided_parts.py (bench_strided, and
parts_strided_band: strided's band as a local pattern of its own). For each
length of LENS (default 32768,131072), B=1, H=16, D=128, bf16, it times:

- dram: a device-to-device copy of q, k and v into out-sized buffers
  (torch's copy kernel), as bytes moved per second. Any strided kernel
  reads q, k and v and writes out at least once: 4 x B*H*L*D*2 bytes,
  which at this rate is the DRAM floor of the whole pattern;
- residues, SDPA (backend): the per-residue half of strided (row c + S t
  attends keys c + S u, u <= t) as PyTorch SDPA on inputs gathered into
  B*H*S causal sequences of L/S rows beforehand (the gather not timed, no
  merge with a band), for each of SDPA's flash, cuDNN and memory-efficient
  backends that runs: the best kernels PyTorch has for this half alone;
- residues, FlexAttention: the same gathered problem through
  FlexAttention (compiled, causal block mask);
- attn band: parts_strided_band (one launch over all heads, no state);
- attn strided: bench_strided as the runtime runs it (rounds), and with
  ATTN_GPU_ROUNDS=0 under torch.profiler, which gives the band's and the
  per-residue kernel's durations one after the other;
- then, on their own, bench_strided with ATTN_GPU_ROUNDS=N for each N of
  PAIRS (default 0,1,2,3,4,8; 0: no rounds): how many (batch, head) pairs
  a round may take before the L2 stops holding a round's q, k, v and out.

TF/s are effective (4 x attended pairs x D / time); the residue rows count
the pairs u <= t (the gathered causal problem, diagonal included). Rows go
to $OUT/strided_floor.json.
"""
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attn
from gpu_patterns import (B, D, H, S, count, dev, kernel_durations, mask_fn,
                          residue_classes, rotated_times, tflops, with_rounds)

if len(sys.argv) < 3:
    sys.exit(__doc__)
gpu_pkgs, parts_pkgs = sys.argv[1], sys.argv[2]
lens = [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]
pairs_per_round = os.environ.get("PAIRS", "0,1,2,3,4,8").split(",")
rounds = int(os.environ.get("ROUNDS", "5"))
strided_pkg = attn.load(os.path.join(gpu_pkgs, "bench_strided"))
band_pkg = attn.load(os.path.join(parts_pkgs, "parts_strided_band"))
flex = torch.compile(flex_attention)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


rows = []


def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)


torch.manual_seed(0)
for L in lens:
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    n = L // S
    strided_pairs = count(mask_fn("strided"), L, False)
    band_pairs = count(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < S), L, False)
    residue_pairs = B * H * S * n * (n + 1) // 2
    qg, kg, vg = (residue_classes(t) for t in (q, k, v))
    copies = [torch.empty_like(t) for t in (q, k, v)]
    block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=dev)

    def copy_qkv():
        for src, dst in zip((q, k, v), copies):
            dst.copy_(src)

    runs = {"dram copy": copy_qkv,
            "residues, FlexAttention": lambda: flex(qg, kg, vg, block_mask=block_mask),
            "attn band": lambda: band_pkg(q, k, v),
            "attn strided (rounds)": lambda: strided_pkg(q, k, v)}
    for name, backend in BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        try:
            run()
            torch.cuda.synchronize()
        except RuntimeError as e:
            emit({"L": L, "run": f"residues, SDPA ({name})", "skipped": str(e).splitlines()[0]})
            continue
        runs[f"residues, SDPA ({name})"] = run
    # Timings only: the gathered rows compute a different problem from
    # strided's (no band, no merge), so no output is compared here; attn's
    # outputs are checked by python/tests/test_gpu.py.
    med, every = rotated_times(runs, rounds, before=lambda name: with_rounds(None))
    qkv_bytes = 3 * q.numel() * q.element_size()
    for name, ms in med.items():
        row = {"L": L, "run": name, "us": ms * 1e3, "every_ms": every[name]}
        if name == "dram copy":
            row["tb_per_s"] = 2 * qkv_bytes / ms / 1e9
            floor_us = 4 * q.numel() * q.element_size() / (row["tb_per_s"] * 1e12) * 1e6
            row["strided_floor_us"] = floor_us
            row["strided_tflops_at_floor"] = tflops(strided_pairs, floor_us / 1e3)
        elif name.startswith("residues"):
            row["tflops"] = tflops(residue_pairs, ms)
        elif name == "attn band":
            row["tflops"] = tflops(band_pairs, ms)
        else:
            row["tflops"] = tflops(strided_pairs, ms)
        row["strided_tflops_at_this_time"] = tflops(strided_pairs, ms)
        emit(row)

    with_rounds("0")
    durations, span = kernel_durations(lambda: strided_pkg(q, k, v))
    with_rounds(None)
    emit({"L": L, "profile": "attn strided, one launch per kernel",
          "kernel_us": {n: statistics.median(d) for n, d in durations.items()},
          "span_us": span})

    sweep = {f"attn strided, ATTN_GPU_ROUNDS={n}": lambda: strided_pkg(q, k, v)
             for n in pairs_per_round}
    med, every = rotated_times(sweep, rounds, before=lambda name: with_rounds(name.split("=")[1]))
    with_rounds(None)
    for name, ms in med.items():
        emit({"L": L, "run": name, "us": ms * 1e3, "tflops": tflops(strided_pairs, ms),
              "every_ms": every[name]})

out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "strided_floor.json"), "w") as f:
        json.dump(rows, f, indent=1)
