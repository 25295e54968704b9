"""Times the bench packages of strided and LongNet with the runtime's rounds
of (batch, head) pairs on (the default) and off (ATTN_GPU_ROUNDS=0), in one
process on the same inputs: median of 5 alternating rounds, TF/s as in
gpu_bench.py, and the largest difference between the two outputs.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build PYTHONPATH=python:bench \
        python3 bench/gpu_rounds_ab.py              # bench/gpu_ab.md

Packages from scripts/build_gpu_packages.py ($ATTN_GPU_PACKAGES, default
gpu-pkgs)."""
import os, json, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn
from gpu_patterns import (B, D, H, dev, pairs, package_name, print_table, rotated_times, tflops,
                          with_rounds)
torch.manual_seed(0)
rows = []
for L in (16384, 32768, 131072):
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    for name in ("strided", "dilated_sum", "dilated_union"):
        nnz = pairs(name, L)
        pk = attn.load(os.path.join(os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs"), package_name(name, L)))
        with_rounds("0")
        ref = pk(q, k, v).float()
        with_rounds(None)
        diff = float((pk(q, k, v).float() - ref).abs().max())
        mode = lambda which: with_rounds("0" if which == "one launch" else None)
        run = lambda: pk(q, k, v)
        t, _ = rotated_times({"one launch": run, "rounds": run}, 5, before=mode)
        with_rounds(None)
        row = {"L": L, "pattern": name, "max_diff": diff}
        for which, ms in t.items():
            row[which + " TF/s"] = round(tflops(nnz, ms), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    del q, k, v
    torch.cuda.empty_cache()

print_table([("L", lambda r: str(r["L"])), ("pattern", lambda r: r["pattern"]),
             ("rounds off", lambda r: f"{r['one launch TF/s']:.0f}"),
             ("rounds (default)", lambda r: f"{r['rounds TF/s']:.0f}")], rows)
