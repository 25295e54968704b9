#!/usr/bin/env python3
"""Compiles the GPU correctness cases (python/tests/gpu_cases.py) and the
benchmark specs (bench/gpu/specs/*.json) for a GPU target into one folder,
to be carried to the GPU machine with the runtime:

    scripts/build_gpu_packages.py OUT_DIR [--target sm_90a] [--only NAMES]

Writes OUT_DIR/<name>/ packages and OUT_DIR/compile_times.json. `--only`
takes a comma-separated list of package names or prefixes (e.g.
`--only bench_` for the benchmark specs alone: a small set for
bench/gpu_ab.py, where the whole folder is ~44 MB)."""

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python", "tests"))
import gpu_cases  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--target", default="sm_90a")
ap.add_argument("--no-warp-specialize", action="store_true",
                help="pass --warp-specialize=false to attn-compile (sm_90a)")
ap.add_argument("--head-dim", type=int, default=None,
                help="compile the benchmark specs (bench_*) with this head dim instead "
                     "of theirs (bench/gpu_patterns.py times them under HEAD_DIM)")
ap.add_argument("--only", default="",
                help="compile only the packages whose names start with one of these "
                     "comma-separated prefixes")
args = ap.parse_args()
only = [p for p in args.only.split(",") if p]
os.makedirs(args.out, exist_ok=True)
specs = gpu_cases.CASES + gpu_cases.RANDOM_CASES
for path in sorted(glob.glob(os.path.join(ROOT, "bench", "gpu", "specs", "*.json")) +
                   glob.glob(os.path.join(ROOT, "bench", "gpu", "grad_specs", "*.json"))):
    with open(path) as f:
        spec = json.load(f)
    if args.head_dim and spec["name"].startswith("bench_"):
        spec["head_dim"] = args.head_dim
    specs.append(spec)
times = {}


def compile_spec(spec):
    name = spec["name"]
    if only and not any(name.startswith(p) for p in only):
        return
    t0 = time.time()
    flags = ["--warp-specialize=false"] if args.no_warp_specialize else []
    report = gpu_cases.compile_package(spec, args.out, args.target, keep_ptx=True,
                                       flags=flags)
    times[name] = time.time() - t0
    print(f"{name:24s} {times[name]:5.2f} s  " + "; ".join(report))


for spec in specs:
    compile_spec(spec)
compile_spec(gpu_cases.RING_ONE_RANK)
for spec in gpu_cases.RING_RANKS + gpu_cases.RANDOM_RING_CASES:
    compile_spec(spec)
for spec in (gpu_cases.NO_LSE + gpu_cases.GRAD_CASES + gpu_cases.RANDOM_GRAD_CASES
             + [gpu_cases.LARGE] + gpu_cases.MANY_PAIRS + gpu_cases.MANY_PAIRS_GRAD
             + gpu_cases.RING_GRAD + gpu_cases.RANDOM_RING_GRAD
             + [gpu_cases.RING_GRAD_ONE_RANK]):
    compile_spec(spec)

# The tokenized-attention packages of test_gpu.py and bench/tokenized_gpu.py
# (TokenizedAttention loads them from this folder on the GPU machine).
sys.path.insert(0, os.path.join(ROOT, "python"))
import attn  # noqa: E402
for B, H, Hkv, D, L in gpu_cases.TOKENIZED:
    layer = attn.TokenizedAttention(B, L, 1, None, heads=H, kv_heads=Hkv, head_dim=D,
                                    target=args.target)
    for kind in layer.KINDS:
        spec, _ = layer.package_spec(gpu=True, kind=kind)
        compile_spec(spec)
# The attn.sparse layers of test_gpu.py and bench/sparse_api.py (they load
# their packages from this folder on the GPU machine).
from attn import sparse  # noqa: E402
for B, E, H, mode, ctx, dtype in gpu_cases.SPARSE + gpu_cases.SPARSE_BENCH:
    spec = sparse.SparseAttention(H, mode, ctx).package_spec(B, E, dtype, args.target)
    compile_spec(spec)
# With the backward pass: the layers test_gpu_backward.py trains, and the
# bench layers bench/sparse_train.py times a training step of.
for B, E, H, mode, ctx, dtype in gpu_cases.SPARSE_GRAD + gpu_cases.SPARSE_BENCH:
    spec = sparse.SparseAttention(H, mode, ctx).package_spec(B, E, dtype, args.target,
                                                             backward=True)
    compile_spec(spec)
with open(os.path.join(args.out, "compile_times.json"), "w") as f:
    json.dump(times, f, indent=1)
