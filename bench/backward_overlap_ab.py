"""The backward with and without each component's grad_q starting as a
programmatic dependent launch of its grad_kv (Package::runGpuBackward;
ATTN_GPU_BACKWARD_OVERLAP=0 launches every kernel plainly). The same
packages both ways, from `PATTERNS=causal,local,strided,dilated_sum,dilated_union
bench/gpu_long.py build DIR`; on the GPU machine:

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/backward_overlap_ab.py DIR

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
from kernel_times import event_ms

H, D = 16, 128
PATTERNS = os.environ.get("PATTERNS", "causal,local,strided,dilated_sum,dilated_union").split(",")
LENS = [int(x) for x in os.environ.get("LENS", "8192,32768,131072").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "4"))
MODES = {"plain": "0", "overlap": "1"}


def main(pkg_dir):
    rows = []
    for L in LENS:
        gen = torch.Generator(device="cuda").manual_seed(L)
        q, k, v, g = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16,
                                  generator=gen) for _ in range(4))
        for p in PATTERNS:
            if p == "causal" and L > 32768:
                continue
            pkg = attn.load(os.path.join(pkg_dir, f"long_{p}"))
            out, lse = pkg(q, k, v, return_lse=True)
            grads = tuple(torch.empty_like(x) for x in (q, k, v))
            call = lambda: pkg.backward(q, k, v, out, lse, g, grads=grads)
            times = {m: [] for m in MODES}
            first = None
            for r in range(ROUNDS):
                for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                    os.environ["ATTN_GPU_BACKWARD_OVERLAP"] = MODES[mode]
                    call()
                    torch.cuda.synchronize()
                    if first is None:
                        first = tuple(x.clone() for x in grads)
                    elif p in ("causal", "local", "strided"):
                        # (LongNet's grad_kv adds its heads' shares atomically:
                        # its order, and so its rounding, varies from call to call.)
                        for a, b, what in zip(grads, first, ("dq", "dk", "dv")):
                            assert torch.equal(a, b), f"{p} L={L} {mode}: {what} differs"
                    reps = max(3, min(40, int(1000 / max(event_ms(call, 1), 1e-3))))
                    times[mode].append(event_ms(call, reps))
            row = {"L": L, "pattern": p, "ms": {m: statistics.median(t) for m, t in times.items()},
                   "all_ms": times}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del out, lse, grads, first
            torch.cuda.empty_cache()
        del q, k, v, g
        torch.cuda.empty_cache()
    os.environ.pop("ATTN_GPU_BACKWARD_OVERLAP", None)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "backward_overlap_ab.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| L | pattern | plain (ms) | grad_q overlapping grad_kv (ms) | change |")
    print("|---|---|---|---|---|")
    for r in rows:
        a, b = r["ms"]["plain"], r["ms"]["overlap"]
        print(f"| {r['L']} | {r['pattern']} | {a:.3f} | {b:.3f} | {100 * (b / a - 1):+.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
