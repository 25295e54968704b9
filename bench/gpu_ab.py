"""Times attn package sets against each other on the same inputs (no peers):
the quick check of a code-generation change before bench/gpu_bench.py.

    PKG_SETS=gpu-pkgs-a,gpu-pkgs-b PYTHONPATH=python python3 bench/gpu_ab.py

Each set is a folder from scripts/build_gpu_packages.py. LENS and PATTERNS as
in gpu_bench.py. Prints attn TF/s per set and pattern (the median over
ROUNDS rounds, default 3), and the largest difference of each set's output
from the first set's (the sets must agree).

The order of the sets rotates from round to round: identical packages time
differently from run to run (by up to ~10%, with the SM clocks steady), and
a fixed order turns that noise into a bias for or against one set.
"""
import json
import os

import torch

import attn
from gpu_patterns import B, D, H, dev, doc_lengths, package_inputs, package_name, pairs, print_table, rotated_times, tflops

sets = os.environ["PKG_SETS"].split(",")
lens = [int(x) for x in os.environ.get("LENS", "32768").split(",")]
patterns = os.environ.get("PATTERNS", "causal,local,strided,dilated_sum,dilated_union,tokenized").split(",")
rounds = int(os.environ.get("ROUNDS", "3"))
torch.manual_seed(0)
rows = []
for L in lens:
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    doc_lens = doc_lengths(L)
    for name in patterns:
        if name == "tokenized" and doc_lens is None:
            continue
        nnz = pairs(name, L, doc_lens)
        qa, ka, va, lens_t = package_inputs(name, q, k, v, doc_lens)
        pkgs = {s: attn.load(os.path.join(s, package_name(name, L))) for s in sets}
        first = pkgs[sets[0]](qa, ka, va, lengths=lens_t).float()
        diffs = {s: float((pkgs[s](qa, ka, va, lengths=lens_t).float() - first).abs().max())
                 for s in sets}
        runs = {s: (lambda p=pkgs[s]: p(qa, ka, va, lengths=lens_t)) for s in sets}
        medians, times = rotated_times(runs, rounds)
        for s in sets:
            ms = medians[s]
            r = {"L": L, "pattern": name, "set": s, "ms": ms, "ms_rounds": times[s],
                 "tflops": tflops(nnz, ms), "max_diff_vs_first": diffs[s]}
            rows.append(r)
            print(json.dumps(r), flush=True)
        del first, pkgs
        torch.cuda.empty_cache()

cells = [(s, lambda r, s=s: f"{r[s]['tflops']:.0f} ({r[s]['max_diff_vs_first']:.0e})") for s in sets]
table = [{"L": L, "pattern": name, **{r["set"]: r for r in rows if r["L"] == L and r["pattern"] == name}}
         for L in lens for name in patterns]
print_table([("L", lambda r: str(r["L"])), ("pattern", lambda r: r["pattern"])] + cells,
            [t for t in table if len(t) > 2])
out = os.environ.get("OUT")
if out:
    json.dump(rows, open(os.path.join(out, "gpu_ab.json"), "w"), indent=1)
