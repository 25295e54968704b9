#!/usr/bin/env python3
"""Whether strided's DRAM-bound band and a compute-heavy per-residue half
overlap when they run side by side on two streams (a feasibility timing:
no merge and no dependency between the two, so outputs are not strided's):

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/strided_overlap.py PARTS_PKGS

PARTS_PKGS holds parts_strided_band (bench/strided_parts.py). For each
length of LENS (default 32768,131072), B=1, H=16, D=128, bf16, it times

- band: parts_strided_band on all heads (one launch);
- residues: the per-residue half gathered beforehand into B*H*S causal
  sequences of L/S rows, through SDPA's cuDNN backend (bench/strided_floor.py
  has the other backends);
- both, serial: one after the other on the current stream;
- both, side by side: the band on a second stream beside the residues on the
  current one, joined by events (their sum of work, in one span).

If side by side takes about the longer of the two, a runtime that ran the
band of pair p + 1 beside the per-residue kernel of pair p would hide the
band. Rows go to $OUT/strided_overlap.json.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn
from gpu_patterns import B, D, H, dev, residue_classes, rotated_times

if len(sys.argv) < 2:
    sys.exit(__doc__)
band_pkg = attn.load(os.path.join(sys.argv[1], "parts_strided_band"))
lens = [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]
rounds = int(os.environ.get("ROUNDS", "5"))
side = torch.cuda.Stream()
rows = []
torch.manual_seed(0)
for L in lens:
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (residue_classes(t) for t in (q, k, v))

    def band():
        band_pkg(q, k, v)

    def residues():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)

    def serial():
        band()
        residues()

    def side_by_side():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            band()
        residues()
        main.wait_stream(side)

    runs = {"band": band, "residues (cuDNN)": residues, "both, serial": serial,
            "both, side by side": side_by_side}
    med, every = rotated_times(runs, rounds)
    for name, ms in med.items():
        row = {"L": L, "run": name, "us": ms * 1e3, "every_ms": every[name]}
        rows.append(row)
        print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "every_ms"}), flush=True)

out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "strided_overlap.json"), "w") as f:
        json.dump(rows, f, indent=1)
