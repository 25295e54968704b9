"""Training steps of the same patterns through packages of different
compiler versions, in one process: for each package name in NAMES, one
autograd step (`pkg(q, k, v).backward(g)` on bf16 leaves, B = 1, H = 16,
D = 128, L = 32768) through each folder of PKG_SETS in turn, ROUNDS
rounds rotating the order; prints the median GPU time per step (CUDA
events, mean of 3 steps after one warm-up) and the largest difference of
out, dq, dk and dv from the first set's.

    PKG_SETS=DIR_A,DIR_B NAMES=train_dilated_union PYTHONPATH=python \\
      python3 bench/train_step_ab.py

The packages are bench/gpu/specs/bench_<n>.json with "backward": true,
named train_<n> (bench/finished_grads_ab.py shows how to build them).
"""
import os
import statistics

import torch

import attn

B, H, D, L = 1, 16, 128, int(os.environ.get("L", "32768"))
sets = os.environ["PKG_SETS"].split(",")
names = os.environ.get("NAMES", "train_dilated_union").split(",")
rounds = int(os.environ.get("ROUNDS", "5"))

print(f"{torch.cuda.get_device_name()}: B={B} H={H} D={D} L={L}, bf16, "
      f"median of {rounds} rounds")
print("| package | " + " | ".join(sets) + " | largest difference from the first |")
print("|---|" + "---|" * (len(sets) + 1))
for name in names:
    pkgs = [attn.load(os.path.join(s, name)) for s in sets]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step(pkg):
        for x in (q, k, v):
            x.grad = None
        out = pkg(q, k, v)
        out.backward(g)
        return out

    results = []
    for pkg in pkgs:
        out = step(pkg)
        results.append([out.detach().clone()] + [x.grad.clone() for x in (q, k, v)])
    diff = max((a.float() - b.float()).abs().max().item()
               for r in results[1:] for a, b in zip(results[0], r))
    del results
    times = {i: [] for i in range(len(pkgs))}
    for rnd in range(rounds):
        for j in range(len(pkgs)):
            i = (j + rnd) % len(pkgs)
            step(pkgs[i])
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                step(pkgs[i])
            end.record()
            torch.cuda.synchronize()
            times[i].append(start.elapsed_time(end) * 1000 / 3)
    cells = " | ".join(f"{statistics.median(times[i]):.0f} µs" for i in range(len(pkgs)))
    print(f"| {name} | {cells} | {diff:.3g} |", flush=True)
