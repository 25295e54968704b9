"""Host time of Python calls: two copies of python/attn side by side in one
process, calls alternating between them, so that the host's drift (this
machine's host timings move by up to 2x between runs of the same code,
bench/host_overhead_h100.md) falls on both alike.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench python3 bench/host_ab.py OLD

OLD is a folder holding the other copy as OLD/attn, e.g. the previous
commit's: `mkdir -p OLD/attn && for f in $(git ls-files python/attn); do
git show HEAD~1:$f > OLD/attn/$(basename $f); done`. The copy on PYTHONPATH
is "new". Both use the same runtime library and packages.

Each call is one whose kernels take less GPU time than its host part
(a 9 µs causal kernel, the layers' 21 µs at L = 1024), so that µs per call
queued back to back (gpu_patterns.us_per_call) is the host's time per call.
Prints, per call, the median over 7 alternating rounds of each copy's µs
per call and the new copy's share of the old one's (results in
bench/host_overhead_h100.md).
"""
import importlib.util
import os
import statistics
import sys

import torch

import attn
import attn._torchop
import gpu_cases
import gpu_patterns

PKGS = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
ROUNDS, CALLS = 7, 400
dev = torch.device("cuda")


def load_copy(folder, name):
    """The package in folder/attn, imported as `name`. Its attn::run
    operator module is this process's own (torch registers an operator
    name once); these calls do not go through it."""
    sys.modules[name + "._torchop"] = attn._torchop
    path = os.path.join(folder, "attn")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def calls(mod):
    """(label, call) pairs on `mod`'s package objects, inputs fresh."""
    pkg = mod.load(os.path.join(PKGS, "bench_causal"))
    q, k, v = (torch.randn(1, 16, 256, 128, device=dev, dtype=torch.bfloat16)
               for _ in range(3))
    out = torch.empty_like(q)
    result = [("causal L = 256: pkg(q, k, v, out=out)", lambda: pkg(q, k, v, out=out)),
              ("causal L = 256: pkg(q, k, v)", lambda: pkg(q, k, v))]
    for B, E, H, mode, ctx, dtype in gpu_cases.SPARSE_BENCH:
        layer = mod.sparse.SparseAttention(H, mode, ctx, package_dir=PKGS)
        qkv = torch.randn(B, 1024, 3 * E, device=dev, dtype=torch.bfloat16).split(E, dim=-1)
        result.append((f"attn.sparse {mode}{ctx or ''} L = 1024: layer(q, k, v)",
                       lambda layer=layer, qkv=qkv: layer(*qkv)))
    return result


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    old = calls(load_copy(sys.argv[1], "attn_old"))
    new = calls(attn)
    times = {label: ([], []) for label, _ in new}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for (label, old_call), (_, new_call) in zip(old, new):
                for side, call in ((0, old_call), (1, new_call)):
                    for _ in range(20):
                        call()
                    times[label][side].append(gpu_patterns.us_per_call(call, CALLS, batches=1))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"Python {sys.version.split()[0]}; median of {ROUNDS} alternating rounds of "
          f"{CALLS} calls")
    print("\n| call | old µs/call | new µs/call | new / old |")
    print("|---|---|---|---|")
    for label, (t_old, t_new) in times.items():
        a, b = statistics.median(t_old), statistics.median(t_new)
        spread = f"{min(t_old):.1f}-{max(t_old):.1f}", f"{min(t_new):.1f}-{max(t_new):.1f}"
        print(f"| {label} | {a:.1f} ({spread[0]}) | {b:.1f} ({spread[1]}) | {b / a:.2f} |")


if __name__ == "__main__":
    main()
