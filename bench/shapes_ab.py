"""Times package sets of bench/gpu_shapes.py against each other (no peers),
with each set's error against a float64 reference: the check of a change
that touches the numerics as well as the speed.

    python3 bench/gpu_shapes.py build DIR_A        # here, one folder a set
    PKG_SETS=DIR_A,DIR_B ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/shapes_ab.py                 # on the GPU machine

SHAPES, DIMS and PATTERNS as in gpu_shapes.py (the sets must hold those
packages). Per shape, head dim and pattern: each set's median time over
ROUNDS rotated rounds (default 3; see gpu_patterns.rotated_times), its
effective TF/s, and its relative error (Frobenius norm) against a float64
reference over the first batch row's first REF_HEADS heads (default 2),
computed from the pattern's mask (gpu_patterns.mask_fn) in blocks of rows.
Rows go to $OUT/shapes_ab.json; a Markdown table is printed at the end.
"""
import json
import os

import torch

import attn
import gpu_patterns
from gpu_shapes import DIMS, H, PATTERNS, SHAPES, package_name

sets = os.environ["PKG_SETS"].split(",")
rounds = int(os.environ.get("ROUNDS", "3"))
ref_heads = int(os.environ.get("REF_HEADS", "2"))


def reference(pattern, q, k, v):
    """float64 attention of batch row 0, heads [0, ref_heads), by the mask."""
    mask_mod = gpu_patterns.mask_fn(pattern)
    L, d = q.shape[2], q.shape[3]
    out = torch.empty(ref_heads, L, d, dtype=torch.float64, device=q.device)
    keys = torch.arange(L, device=q.device)
    zero = torch.zeros((), dtype=torch.long, device=q.device)
    for h in range(ref_heads):
        qh, kh, vh = (x[0, h].double() for x in (q, k, v))
        for r0 in range(0, L, 1024):
            rows = torch.arange(r0, min(r0 + 1024, L), device=q.device)
            allowed = mask_mod(zero, torch.full((), h, device=q.device),
                               rows[:, None], keys[None, :])
            s = (qh[rows] @ kh.T) / d ** 0.5
            s = s.masked_fill(~allowed, float("-inf"))
            out[h, rows] = torch.softmax(s, dim=-1) @ vh
    return out


torch.manual_seed(0)
rows = []
for b, L in SHAPES:
    for d in DIMS:
        q, k, v = (torch.randn(b, H, L, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        for p in PATTERNS:
            nnz = b * gpu_patterns.pairs(p, L)
            ref = reference(p, q, k, v)
            pkgs = {s: attn.load(os.path.join(s, package_name(p, d, b))) for s in sets}
            errors = {}
            for s, pkg in pkgs.items():
                o = pkg(q, k, v)[0, :ref_heads].double()
                errors[s] = float((o - ref).norm() / ref.norm())
            runs = {s: (lambda pkg=pkg: pkg(q, k, v)) for s, pkg in pkgs.items()}
            medians, times = gpu_patterns.rotated_times(runs, rounds)
            for s in sets:
                row = {"B": b, "L": L, "D": d, "pattern": p, "set": s, "ms": medians[s],
                       "ms_rounds": times[s], "tflops": 4 * nnz * d / medians[s] / 1e9,
                       "rel_error_vs_float64": errors[s]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del ref, pkgs
        del q, k, v
        torch.cuda.empty_cache()

out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "shapes_ab.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "sets": sets, "rows": rows}, f,
                  indent=1)
print(f"\ndevice: {torch.cuda.get_device_name()}; TF/s (relative error against float64)")
print("| B x L | D | pattern | " + " | ".join(os.path.basename(s.rstrip("/")) for s in sets) + " |")
print("|---|---|---|" + "---|" * len(sets))
for b, L in SHAPES:
    for d in DIMS:
        for p in PATTERNS:
            cells = []
            for s in sets:
                r = next(r for r in rows if (r["B"], r["L"], r["D"], r["pattern"], r["set"]) ==
                         (b, L, d, p, s))
                cells.append(f"{r['tflops']:.0f} ({r['rel_error_vs_float64']:.1e})")
            print(f"| {b} x {L} | {d} | {p} | " + " | ".join(cells) + " |")
