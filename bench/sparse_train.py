"""Times a training step of attn.sparse, the seeds' sparse-attention API, on
CUDA tensors: q, k and v the [B, L, E] slices of one fused projection
[B, L, 3E] (bf16) that requires grad, the layer's output [B, L, E], then
out.backward(grad) down to the projection's gradient. So the step counts
what a model's layer pays around the kernels: the head split and merge,
the layouts the forward and backward kernels read and write, and the
gradients' conversion to the projection's dtype and layout.

The layers are gpu_cases.py's SPARSE_BENCH (B = 1, E = 2048: 16 heads of
128), their packages with the backward pass in $ATTN_GPU_PACKAGES
(scripts/build_gpu_packages.py builds them). Prints one JSON line per
(L, mode): the median and spread of ROUNDS rounds of REPS steps each
(CUDA events around each step), and the peak memory of a step. The same
script under another checkout's python and runtime gives the other side
of an A/B (bench/sparse_train_h100.md):

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench LENS=8192,32768 \\
        python3 bench/sparse_train.py
"""
import json
import os
import statistics

import torch

import gpu_cases
from attn import sparse
from kernel_times import event_ms

lens = [int(x) for x in os.environ.get("LENS", "8192,32768").split(",")]
rounds = int(os.environ.get("ROUNDS", "3"))
reps = int(os.environ.get("REPS", "10"))
folder = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
label = os.environ.get("LABEL", "")
dev = "cuda"

for L in lens:
    for B, E, H, mode, ctx, dtype in gpu_cases.SPARSE_BENCH:
        layer = sparse.SparseAttention(H, mode, ctx, package_dir=folder)
        gen = torch.Generator(device=dev).manual_seed(L)
        qkv = torch.randn(B, L, 3 * E, device=dev, dtype=torch.bfloat16,
                          generator=gen).requires_grad_()
        grad = torch.randn(B, L, E, device=dev, dtype=torch.bfloat16, generator=gen)

        def step():
            qkv.grad = None
            q, k, v = qkv.split(E, dim=-1)
            layer(q, k, v).backward(grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        medians = []
        for _ in range(rounds):
            medians.append(event_ms(step, reps))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(json.dumps({"label": label, "L": L, "mode": mode, "ctx": ctx,
                          "step_ms": round(statistics.median(medians), 3),
                          "rounds_ms": [round(m, 3) for m in medians],
                          "peak_extra_mib": round(peak, 1)}), flush=True)
        del layer, qkv, grad
        torch.cuda.empty_cache()
