"""attn on one long sequence: 131072 to 2097152 tokens (B = 1, 16 heads of
128, bf16), forward and a training step (forward with lse, then the
backward into bf16 gradients), against SDPA's causal attention. Compile
here, run on the GPU machine:

    python3 bench/gpu_long.py build DIR          # here, with attn-compile
    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/gpu_long.py run DIR        # on the GPU machine

The patterns are bench/gpu/specs' (causal, local W = 1024, strided S = 128,
LongNet's sum and union of (2048, 1), (8192, 4), (32768, 16) with head
offsets), compiled with their backward. LENS (default 131072,1048576,2097152)
gives the lengths; causal runs up to CAUSAL_MAX (default 1048576: 2^21 tokens
take 26 s a call) and the backward up to BWD_MAX (default: every length). TF/s = 4 * attended pairs * D / time for the forward and
10 * pairs * D / time for the backward alone (its five products), pairs from
the closed forms below (checked against the masks of ../shared/bench/peers.py at
small L by `python3 bench/gpu_long.py check`, mask by mask in NumPy). Rows
go to $OUT/gpu_long.json."""

import json
import os
import sys

import numpy as np

import build_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
H, D = 16, 128
W, S = 1024, 128
DIL = [(2048, 1), (8192, 4), (32768, 16)]
PATTERNS = os.environ.get("PATTERNS", "causal,local,strided,dilated_sum,dilated_union").split(",")
LENS = [int(x) for x in os.environ.get("LENS", "131072,1048576,2097152").split(",")]
CAUSAL_MAX = int(os.environ.get("CAUSAL_MAX", "1048576"))
# The backward up to BWD_MAX tokens (default 2097152: at 2^21 it takes 59 GB,
# the float32 sums of strided and LongNet a pair at a time).
BWD_MAX = int(os.environ.get("BWD_MAX", "2097152"))


def _in_class(lo, hi, o, r):
    """How many j in [lo, hi] (arrays) have j % r == o; 0 where hi < lo."""
    count = np.floor_divide(hi - o, r) - np.floor_divide(lo - 1 - o, r)
    return np.where(hi >= lo, count, 0)


def pairs(name, L, heads=range(H)):
    """Attended (head, row, key) pairs of a benchmark pattern at length L
    over `heads` (with multiplicity for LongNet's sum)."""
    p = np.arange(L, dtype=np.int64)
    if name == "causal":
        return len(heads) * L * (L + 1) // 2
    if name == "local":
        return len(heads) * int(np.minimum(p + 1, W).sum())
    if name == "strided":  # keys p - d, d < S, or d a multiple of S
        return len(heads) * int((np.minimum(p + 1, S) + p // S).sum())
    return sum(_pairs_of_head(name, L, h) for h in heads)


def _pairs_of_head(name, L, h):
    """LongNet's pairs in head h (its classes follow the head)."""
    p = np.arange(L, dtype=np.int64)

    def branch(w, r, before=None):
        # Branch (w, r): keys of p's segment up to p (or up to `before`)
        # in class h % r, where p is in that class.
        o = h % r
        hi = p if before is None else before - 1
        return np.where(p % r == o, _in_class(p // w * w, hi, o, r), 0)

    if name == "dilated_sum":
        return int(sum(branch(w, r).sum() for w, r in DIL))
    # Union: the rates divide one another and each segment holds the
    # narrower ones, so a wider branch adds only its keys before the
    # narrower branch's segment (within it they are the narrower one's,
    # whose class holds the wider one's).
    got = branch(*DIL[0])
    for (w0, _), (w, r) in zip(DIL, DIL[1:]):
        got = got + branch(w, r, before=p // w0 * w0)
    return int(got.sum())


def _brute_force(name, L, heads):
    """Pairs of `name` at length L over `heads`, mask element by element
    (../shared/bench/peers.py's masks, in NumPy)."""
    total = 0
    k = np.arange(L)[None, :]
    for h in heads:
        for q0 in range(0, L, 256):
            q = np.arange(q0, min(L, q0 + 256))[:, None]
            if name == "causal":
                m = k <= q
            elif name == "local":
                m = (q - W < k) & (k <= q)
            elif name == "strided":
                m = (k <= q) & (((q - k) < S) | ((q - k) % S == 0))
            else:
                branches = [(q // w == k // w) & (q % r == h % r) & (k % r == h % r) & (k <= q)
                            for w, r in DIL]
                m = sum(b.astype(np.int64) for b in branches) if name == "dilated_sum" \
                    else np.logical_or.reduce(branches)
            total += int(m.sum())
    return total


def check():
    """The closed forms against the masks, pair by pair: every head at
    L = 9000, and heads 0, 5 and 15 (and the head-free patterns) at
    L = 70000, past every LongNet segment boundary."""
    for L, heads in ((9000, range(16)), (70000, (0, 5, 15))):
        for name in PATTERNS:
            # The head-free patterns count alike in every head: one is enough.
            counted = heads if name.startswith("dilated") else [0]
            got, want = pairs(name, L, counted), _brute_force(name, L, counted)
            print(f"L = {L} {name}: {got} (mask {want})", flush=True)
            assert got == want, name


def package_name(pattern):
    return f"long_{pattern}"


def build(args):
    sys.path.insert(0, os.path.join(ROOT, "python", "tests"))
    import gpu_cases
    os.makedirs(args.dir, exist_ok=True)
    for n, p in enumerate(PATTERNS, 1):
        with open(os.path.join(HERE, "gpu", "specs", f"bench_{p}.json")) as f:
            spec = json.load(f)
        spec.update(name=package_name(p), backward=True)
        gpu_cases.compile_package(spec, args.dir, args.target)
        print(f"\r{n}/{len(PATTERNS)} compiled", end="", flush=True)
    print()


def run(args):
    import time

    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import attn
    from kernel_times import event_ms, write_rows

    def timed(fn):
        """Median ms of `fn` over about two seconds of calls (at least 3),
        after one call for the estimate."""
        torch.cuda.synchronize()
        t0 = time.time()
        fn()
        torch.cuda.synchronize()
        first = (time.time() - t0) * 1e3
        return event_ms(fn, max(3, min(50, int(2000 / max(first, 1e-3)))))

    rows = []
    for L in LENS:
        gen = torch.Generator(device="cuda").manual_seed(L)
        q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        g = q  # grad_out: any tensor of q's shape times the same
        for p in PATTERNS:
            if p == "causal" and L > CAUSAL_MAX:
                continue
            pkg = attn.load(os.path.join(args.dir, package_name(p)))
            nnz = pairs(p, L)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out, lse = pkg(q, k, v, return_lse=True)
            row = {"L": L, "pattern": p, "pairs": nnz}
            row["fwd_ms"] = timed(lambda: pkg(q, k, v))
            row["fwd_tflops"] = 4 * nnz * D / row["fwd_ms"] / 1e9
            if L <= BWD_MAX:
                grads = tuple(torch.empty_like(x) for x in (q, k, v))
                row["bwd_ms"] = timed(lambda: pkg.backward(q, k, v, out, lse, g, grads=grads))
                row["bwd_tflops"] = 10 * nnz * D / row["bwd_ms"] / 1e9
                del grads
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if p == "causal":
                o = sdpa(q, k, v, is_causal=True)
                row["diff_vs_sdpa"] = float((o.float() - out.float()).norm() / o.float().norm())
                del o
                row["sdpa_fwd_ms"] = timed(lambda: sdpa(q, k, v, is_causal=True))
                row["sdpa_fwd_tflops"] = 4 * nnz * D / row["sdpa_fwd_ms"] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
            del out, lse
            torch.cuda.empty_cache()
        del q, k, v, g
        torch.cuda.empty_cache()
    write_rows("gpu_long", rows)
    print("| L | pattern | forward ms | forward TF/s | backward ms | backward TF/s | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = (f" (SDPA {r['sdpa_fwd_ms']:.1f} ms, {r['sdpa_fwd_tflops']:.0f})"
                 if "sdpa_fwd_ms" in r else "")
        bwd = (f"{r['bwd_ms']:.2f} | {r['bwd_tflops']:.0f}" if "bwd_ms" in r else "| ")
        print(f"| {r['L']} | {r['pattern']} | {r['fwd_ms']:.2f}{extra} | {r['fwd_tflops']:.0f} | "
              f"{bwd} | {r['peak_gb']:.1f} |")


build_run.main(__doc__, build, run, check=check)
