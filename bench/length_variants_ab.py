"""Head dim 64: a single warp-specialised component's two kernels, the
warp-specialised one and the two-blocks-an-SM one for calls of at most 8192
query rows (docs/Package.md, `rows_at_most`), against packages of the
warp-specialised kernel alone. Build both sets here (the second with a
compiler that emits only the warp-specialised kernel), run on the GPU:

    python3 bench/length_variants_ab.py build DIR      # here
    PKG_SETS=A,B python3 bench/length_variants_ab.py run A   # on the GPU machine

Patterns causal, full and tokenized (random lengths in [L/2, L] per batch
row), 16 heads of 64, bf16, 32768 tokens a call as 8 x 4096, 4 x 8192 and
2 x 16384; each set's median over ROUNDS rotated rounds (default 5) and
the largest difference of its output from the first set's."""

import json
import os
import sys

import build_run

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(8, 4096), (4, 8192), (2, 16384)]
PATTERNS = {"causal": {"causal": {}}, "full": {"full": {}}, "tokenized": {"tokenized": {}}}


def name(p, b):
    return f"lv_{p}_d64_b{b}"


def build(args):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python", "tests"))
    import gpu_cases
    os.makedirs(args.dir, exist_ok=True)
    for p, pattern in PATTERNS.items():
        for b, _ in SHAPES:
            spec = {"name": name(p, b), "dtype": "bf16", "batch": b, "heads": 16,
                    "head_dim": 64, "pattern": pattern}
            print(gpu_cases.compile_package(spec, args.dir, args.target))


def run(args):
    import torch
    import attn
    from gpu_patterns import rotated_times
    sets = os.environ.get("PKG_SETS", args.dir).split(",")
    rounds = int(os.environ.get("ROUNDS", "5"))
    torch.manual_seed(0)
    rows = []
    for b, L in SHAPES:
        q, k, v = (torch.randn(b, 16, L, 64, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        for p in PATTERNS:
            lengths = None
            if p == "tokenized":
                lengths = torch.randint(L // 2, L + 1, (b,), dtype=torch.int32, device="cuda")
            pkgs = {s: attn.load(os.path.join(s, name(p, b))) for s in sets}
            first = pkgs[sets[0]](q, k, v, lengths=lengths).float()
            diffs = {s: float((pkgs[s](q, k, v, lengths=lengths).float() - first).abs().max())
                     for s in sets}
            medians, _ = rotated_times(
                {s: (lambda pk=pkgs[s]: pk(q, k, v, lengths=lengths)) for s in sets}, rounds)
            for s in sets:
                r = {"B": b, "L": L, "pattern": p, "set": s, "ms": medians[s],
                     "max_diff_vs_first": diffs[s]}
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("| B x L | pattern | " + " | ".join(os.path.basename(s) for s in sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    for b, L in SHAPES:
        for p in PATTERNS:
            cells = [next(r for r in rows if (r["B"], r["pattern"], r["set"]) == (b, p, s))
                     for s in sets]
            print(f"| {b} x {L} | {p} | " + " | ".join(
                f"{c['ms'] * 1000:.0f} µs ({c['max_diff_vs_first']:.0e})" for c in cells) + " |")


if __name__ == "__main__":
    build_run.main(__doc__, build, run)
