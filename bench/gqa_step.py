"""A/B of a GQA training step through autograd (pkg(q, k, v) on leaves, then
out.backward(g); B = 1, 16 q heads and 4 kv heads of 128, bf16): the
bench_grad_*_gqa packages (bench/gpu/grad_specs) in $OLD_PKGS, built by an
earlier attn-compile, against those in $ATTN_GPU_PACKAGES, with the same
python and runtime, alternating twice. Prints one JSON line per (L, pattern,
set, round): the median of 10 steps, the memory a step takes beyond its
inputs, and the two sets' largest gradient difference (relative to the
gradient's largest element).

    ATTN_GPU_PACKAGES=new OLD_PKGS=old PYTHONPATH=python python3 bench/gqa_step.py
"""
import json
import os
import statistics

import torch

import attn

sets = {"before": os.environ["OLD_PKGS"], "after": os.environ["ATTN_GPU_PACKAGES"]}
B, H, HKV, D = 1, 16, 4, 128
for L in (8192, 32768):
    for pattern in ("causal_gqa", "local_gqa"):
        name = f"bench_grad_{pattern}_{L}"
        pkgs = {k: attn.load(os.path.join(d, name)) for k, d in sets.items()}
        gen = torch.Generator(device="cuda").manual_seed(L)
        mk = lambda h: torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        q, k, v = mk(H), mk(HKV), mk(HKV)
        g = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        def step(pkg):
            for x in (q, k, v):
                x.grad = None
            pkg(q, k, v).backward(g)
        grads = {}
        for key, pkg in pkgs.items():
            step(pkg); torch.cuda.synchronize()
            grads[key] = [x.grad.float().clone() for x in (q, k, v)]
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads["before"], grads["after"]))
        for rnd in range(2):
            for key, pkg in pkgs.items():
                for _ in range(3):
                    step(pkg)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ts = []
                for _ in range(10):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); step(pkg); b.record(); b.synchronize()
                    ts.append(a.elapsed_time(b))
                print(json.dumps({"L": L, "pattern": pattern, "set": key, "round": rnd,
                                  "stores": pkg.stores_gradients,
                                  "step_ms": round(statistics.median(ts), 3),
                                  "peak_extra_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
                                  "max_rel_diff_vs_other": diff}), flush=True)
