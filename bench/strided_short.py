"""Strided (S = 128, band 128) on short sequences: where its time goes and
how it depends on the runtime's rounds. Packages from
`PATTERNS=strided python3 bench/gpu_shapes.py build DIR` (here); on the GPU
machine:

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/strided_short.py DIR

For each (B, L) of 32768 tokens and head dim D in DIMS it times the package
(triton do_bench median) with the runtime's choice of pairs a round and with
ATTN_GPU_ROUNDS = 0 (one launch a kernel) and N pairs a round, then lists
the kernels of one call under torch.profiler. Rows go to
$OUT/strided_short.json."""

import json
import os
import sys

import torch
import triton.testing as tt

import attn
import gpu_patterns
from kernel_times import print_kernel_times

H = 16
SHAPES = [(8, 4096), (4, 8192), (2, 16384), (1, 32768)]
DIMS = [int(d) for d in os.environ.get("DIMS", "128,64").split(",")]
ROUNDS = os.environ.get("ROUND_SWEEP", "default,0,1,2,4,8,16,32,64").split(",")


def main(folder):
    torch.manual_seed(0)
    bench = lambda f: tt.do_bench(f, warmup=25, rep=200, return_mode="median")
    rows = []
    for b, L in SHAPES:
        for d in DIMS:
            q, k, v = (torch.randn(b, H, L, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            pkg = attn.load(os.path.join(folder, f"shape_strided_d{d}_b{b}"))
            nnz = b * gpu_patterns.pairs("strided", L)
            for rounds in ROUNDS:
                if rounds != "default" and int(rounds) > b * H:
                    continue
                if rounds == "default":
                    os.environ.pop("ATTN_GPU_ROUNDS", None)
                else:
                    os.environ["ATTN_GPU_ROUNDS"] = rounds
                ms = bench(lambda: pkg(q, k, v))
                row = {"B": b, "L": L, "D": d, "rounds": rounds, "ms": ms,
                       "tflops": 4 * nnz * d / ms / 1e9}
                rows.append(row)
                print(json.dumps(row), flush=True)
            os.environ.pop("ATTN_GPU_ROUNDS", None)
            print_kernel_times(lambda: pkg(q, k, v), f"{b} x {L}, D = {d}, runtime's rounds")
            os.environ["ATTN_GPU_ROUNDS"] = "0"
            print_kernel_times(lambda: pkg(q, k, v), f"{b} x {L}, D = {d}, one launch a kernel")
            os.environ.pop("ATTN_GPU_ROUNDS", None)
            del q, k, v
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "strided_short.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


main(sys.argv[1])
