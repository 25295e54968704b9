"""The backward with and without each component's grad_q starting as a
programmatic dependent launch of its grad_kv (Package::runGpuBackward;
ATTN_GPU_BACKWARD_OVERLAP=0 launches every kernel plainly). The same
packages both ways, from `PATTERNS=causal,local,strided,dilated_sum,dilated_union
bench/gpu_long.py build DIR`; on the GPU machine:

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/backward_overlap_ab.py DIR [DIR2 ...]

With several folders (package sets of different compilers), every set runs
plainly and the last one also overlapped, all taking turns.

B = 1, 16 heads of 128, bf16, L in LENS (default 8192,32768,131072; causal
up to 32768). The two modes take turns ROUNDS (default 4) times, each the
median between CUDA events of about a second of backward calls into bf16
gradients; the gradients of both modes must be equal bit for bit. Rows go
to $OUT/backward_overlap_ab.json."""

import json
import os
import statistics
import sys

import torch

import attn
from kernel_times import checked_backward_ms, write_rows

H, D = 16, 128
PATTERNS = os.environ.get("PATTERNS", "causal,local,strided,dilated_sum,dilated_union").split(",")
LENS = [int(x) for x in os.environ.get("LENS", "8192,32768,131072").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "4"))
MODES = {"plain": "0", "overlap": "1"}


def main(pkg_dirs):
    # (package folder, mode): every folder plainly, the last also overlapped.
    configs = [(d, "plain") for d in pkg_dirs] + [(pkg_dirs[-1], "overlap")]
    label = lambda c: c[1] if len(pkg_dirs) == 1 else f"{os.path.basename(c[0])}:{c[1]}"
    rows = []
    for L in LENS:
        gen = torch.Generator(device="cuda").manual_seed(L)
        q, k, v, g = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16,
                                  generator=gen) for _ in range(4))
        for p in PATTERNS:
            if p == "causal" and L > 32768:
                continue
            pkgs = {d: attn.load(os.path.join(d, f"long_{p}")) for d in pkg_dirs}
            out, lse = pkgs[pkg_dirs[0]](q, k, v, return_lse=True)
            grads = tuple(torch.empty_like(x) for x in (q, k, v))
            times = {label(c): [] for c in configs}
            first = None
            for r in range(ROUNDS):
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                for c in order:
                    os.environ["ATTN_GPU_BACKWARD_OVERLAP"] = MODES[c[1]]
                    pkg = pkgs[c[0]]
                    call = lambda: pkg.backward(q, k, v, out, lse, g, grads=grads)
                    # (LongNet's later branches add their shares with
                    # atomics: their order, and so the rounding, may vary.)
                    first, ms = checked_backward_ms(
                        call, grads, first, f"{p} L={L} {label(c)}",
                        compare=p in ("causal", "local", "strided"))
                    times[label(c)].append(ms)
            row = {"L": L, "pattern": p, "ms": {m: statistics.median(t) for m, t in times.items()},
                   "all_ms": times}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del out, lse, grads, first
            torch.cuda.empty_cache()
        del q, k, v, g
        torch.cuda.empty_cache()
    os.environ.pop("ATTN_GPU_BACKWARD_OVERLAP", None)
    write_rows("backward_overlap_ab", rows)
    cols = [label(c) for c in configs]
    print("| L | pattern | " + " | ".join(f"{c} (ms)" for c in cols) + " | last against first |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        a, b = r["ms"][cols[0]], r["ms"][cols[-1]]
        cells = " | ".join(f"{r['ms'][c]:.3f}" for c in cols)
        print(f"| {r['L']} | {r['pattern']} | {cells} | {100 * (b / a - 1):+.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
