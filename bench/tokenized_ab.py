"""TokenizedAttention, two versions side by side: the layer calls of
bench/tokenized_gpu.py (self and target attention over a TableEmbedding on
one GPU) with each, alternating, so that the host's drift falls on both
alike, and the outputs of the two compared.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench python3 bench/tokenized_ab.py OLD

OLD is either a folder holding another copy of python/attn as OLD/attn
(bench/host_ab.py says how to make one from a commit; it runs on
ATTN_GPU_PACKAGES too), or, with OLD_PACKAGES=1, a folder of packages
built by another compiler version, which the copy on PYTHONPATH runs
("old") against ATTN_GPU_PACKAGES ("new"). Prints, per call, the
median (min-max) over ROUNDS alternating rounds of triton.testing.do_bench
medians (ms; calls queued back to back, a call's waits for the GPU
included), the CUDA kernels one call launches (torch.profiler), and the
largest difference between the copies' outputs.
"""
import os
import statistics
import sys

import torch
import triton.testing as tt

import attn
from host_ab import load_copy
from kernel_times import profiled
from tokenized_gpu import B, C, D, H, HKV, VOCAB, zipf_ids

PKGS = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
LENS = [int(x) for x in os.environ.get("LENS", "1024,4096,10000").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "5"))
dev = "cuda"


def kernels_per_call(f, calls=10):
    prof = profiled(f, 1, calls)
    launched = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return launched / calls


def main():
    if os.environ.get("OLD_PACKAGES"):
        versions = (("old", attn, sys.argv[1]), ("new", attn, PKGS))
    else:
        versions = (("old", load_copy(sys.argv[1], "attn_old"), PKGS), ("new", attn, PKGS))
    gen = torch.Generator(device=dev).manual_seed(1)
    tables = [torch.randn(VOCAB, h, D, device=dev, generator=gen).bfloat16()
              for h in (H, HKV, HKV)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B = {B}, H = Hkv = {H}, "
          f"D = {D}, Zipf ids over {VOCAB:,}, {C} candidates")
    print("| L | call | old ms | new ms | new / old | kernels old / new | max diff |")
    print("|---|---|---|---|---|---|---|")
    for L in LENS:
        tokens = zipf_ids((B, L), gen)
        lengths = torch.full((B,), L, device=dev)
        lengths[1] = L // 3  # one shorter sequence: padding positions too
        cands = zipf_ids((B, C), gen)
        layers = {name: mod.TokenizedAttention(B, L, 1, mod.TableEmbedding(*tables),
                                               package_dir=pkgs)
                  for name, mod, pkgs in versions}
        for label, call in (
                ("dedup_keys", lambda layer: layer.package(True).dedup_keys(tokens, lengths)),
                ("self", lambda layer: layer(tokens, lengths, return_lse=True)),
                ("self, out only", lambda layer: layer(tokens, lengths)),
                ("target", lambda layer: layer.target_forward(cands, tokens, lengths,
                                                               return_lse=True))):
            outs = {name: call(layer) for name, layer in layers.items()}
            diff = max(torch.where(a == b, 0.0, a.float() - b.float()).abs().max().item()
                       for a, b in zip(outs["old"], outs["new"]))
            ms = {"old": [], "new": []}
            for _ in range(ROUNDS):
                for name, layer in layers.items():
                    ms[name].append(tt.do_bench(lambda: call(layer), warmup=10, rep=100,
                                                return_mode="median"))
            n = {name: kernels_per_call(lambda: call(layer)) for name, layer in layers.items()}
            med = {k: statistics.median(v) for k, v in ms.items()}
            span = lambda k: f"{med[k]:.3f} ({min(ms[k]):.3f}-{max(ms[k]):.3f})"
            print(f"| {L} | {label} | {span('old')} | {span('new')} | "
                  f"{med['new'] / med['old']:.2f} | {n['old']:.0f} / {n['new']:.0f} | "
                  f"{diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
