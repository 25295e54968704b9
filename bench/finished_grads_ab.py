"""Finished gradients against float32 ones converted, in one process: the
backward of packages of several components at L = 32768 (16 heads of 128,
bf16), LongNet's sum and union and strided (band + residues), on the same
inputs. "f32 + convert" is the path a package that does not finish its
gradients takes under autograd: its kernels add every component's share
into float32 gradients, then three conversions to bf16. "finished" stores
bf16 gradients, each element by its last writer (docs/Backward.md,
"Finished gradients"). Both outputs are compared bit for bit (the same
sums, rounded once). GPU time per call from CUDA events (median of ROUNDS
rounds, the two paths alternating), then the kernels of one autograd
training step (forward and backward) under torch.profiler.

The packages are bench/gpu/specs/bench_<n>.json with "backward": true,
named train_<n>, in $PKGS:

    for n in dilated_sum dilated_union strided; do
      python3 -c "import json; s = json.load(open('bench/gpu/specs/bench_$n.json')); \\
        s.update(name='train_$n', backward=True); json.dump(s, open('/tmp/train_$n.json', 'w'))"
      build/bin/attn-compile /tmp/train_$n.json --target sm_90a -o DIR/train_$n
    done
    PKGS=DIR PYTHONPATH=python:bench python3 bench/finished_grads_ab.py
"""
import os
import statistics

import torch

import attn
from kernel_times import print_training_step_kernels

B, H, D, L = 1, 16, 128, 32768
ROUNDS = int(os.environ.get("ROUNDS", "7"))


def timed(fn, reps=3):
    """GPU time of fn() in µs (mean of `reps` calls after one warm-up)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


print(f"{torch.cuda.get_device_name()}: B={B} H={H} D={D} L={L}, bf16")
print("| pattern | f32 + convert (µs) | finished (µs) | change |")
print("|---|---|---|---|")
for name in ("train_dilated_sum", "train_dilated_union", "train_strided"):
    pkg = attn.load(os.path.join(os.environ["PKGS"], name))
    assert pkg.finishes_gradients, f"{name} does not finish its gradients"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, g = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16,
                              generator=gen) for _ in range(4))
    out, lse = pkg(q, k, v, return_lse=True)
    stored = tuple(torch.empty_like(x) for x in (q, k, v))

    def converted():
        return tuple(x.to(torch.bfloat16)
                     for x in pkg.backward(q, k, v, out, lse, g))

    def finished():
        return pkg.backward(q, k, v, out, lse, g, grads=stored)

    wide = converted()
    finished()
    torch.cuda.synchronize()
    for a, b, what in zip(stored, wide, ("dq", "dk", "dv")):
        assert torch.equal(a, b), f"{name}: {what} differs from the float32 path"
    times = {"converted": [], "finished": []}
    for _ in range(ROUNDS):
        times["converted"].append(timed(converted))
        times["finished"].append(timed(finished))
    a, b = (statistics.median(times[k]) for k in ("converted", "finished"))
    print(f"| {name[len('train_'):]} | {a:.0f} | {b:.0f} | {100 * (b - a) / a:+.1f}% |",
          flush=True)
    del wide

for name in ("train_dilated_sum", "train_dilated_union", "train_strided"):
    pkg = attn.load(os.path.join(os.environ["PKGS"], name))
    print_training_step_kernels(
        pkg, f"{name}: a training step (autograd, finished gradients)", B, H, L, D)
