"""attn against FlexAttention and SDPA at the shapes models train at: shorter
sequences in larger batches, head dims 64 and 128 (issue 5's table is
B = 1, L = 32768 and 131072, D = 128 only). Compile here, run on the GPU
machine:

    python3 bench/gpu_shapes.py build DIR            # here, with attn-compile
    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/gpu_shapes.py run DIR          # on the GPU machine

Every shape holds 32768 tokens a call (B x L), 16 heads, bf16, forward:
(B, L) in SHAPES (default 8x4096, 4x8192, 2x16384, 1x32768), D in DIMS
(default 64,128), patterns in PATTERNS (default causal, local, strided,
dilated_union; masks and pair counts of gpu_patterns.py, whose LongNet
segments 8192 and 32768 reach past the shorter sequences and then cover the
whole sequence). The batch is static in a spec, so `build` compiles one
package per (pattern, D, B). `run` times attn, FlexAttention (compiled,
block mask built once per shape, not timed) and, for causal, SDPA, each a
triton do_bench median, checks that attn's output agrees with Flex's, and
prints a Markdown table of effective TF/s = 4 * attended pairs * D / time;
its rows go to $OUT/gpu_shapes.json."""

import json
import os
import sys

import build_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
H = 16
SHAPES = [(int(b), int(l)) for b, l in
          (s.split("x") for s in os.environ.get("SHAPES", "8x4096,4x8192,2x16384,1x32768").split(","))]
DIMS = [int(d) for d in os.environ.get("DIMS", "64,128").split(",")]
PATTERNS = os.environ.get("PATTERNS", "causal,local,strided,dilated_union").split(",")


def package_name(pattern, d, b):
    return f"shape_{pattern}_d{d}_b{b}"


def spec_for(pattern, d, b):
    """bench/gpu/specs/bench_<pattern>.json with its head dim and batch."""
    with open(os.path.join(HERE, "gpu", "specs", f"bench_{pattern}.json")) as f:
        spec = json.load(f)
    spec.update(name=package_name(pattern, d, b), head_dim=d, batch=b)
    return spec


def build(args):
    sys.path.insert(0, os.path.join(ROOT, "python", "tests"))
    import gpu_cases
    os.makedirs(args.dir, exist_ok=True)
    todo = [(p, d, b) for p in PATTERNS for d in DIMS for b, _ in SHAPES]
    for n, (p, d, b) in enumerate(todo, 1):
        gpu_cases.compile_package(spec_for(p, d, b), args.dir, args.target)
        print(f"\r{n}/{len(todo)} compiled", end="", flush=True)
    print()


def run(args):
    import torch
    import triton.testing as tt
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import attn
    import gpu_patterns

    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    flex = torch.compile(flex_attention, dynamic=False)
    bench = lambda f: tt.do_bench(f, warmup=25, rep=200, return_mode="median")
    rows = []
    for b, L in SHAPES:
        for d in DIMS:
            q, k, v = (torch.randn(b, H, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for p in PATTERNS:
                # Pairs of one batch row (gpu_patterns counts B = 1, H = 16).
                nnz = b * gpu_patterns.pairs(p, L)
                tf = lambda ms: 4 * nnz * d / ms / 1e9
                pkg = attn.load(os.path.join(args.dir, package_name(p, d, b)))
                o = pkg(q, k, v)
                ours = bench(lambda: pkg(q, k, v))
                bm = create_block_mask(gpu_patterns.mask_fn(p), b,
                                       H if p.startswith("dilated") else None, L, L, device="cuda",
                                       _compile=True)
                of = flex(q, k, v, block_mask=bm)
                theirs = bench(lambda: flex(q, k, v, block_mask=bm))
                diff = float((o.float() - of.float()).norm() / of.float().norm())
                row = {"B": b, "L": L, "D": d, "pattern": p,
                       "rounds": os.environ.get("ATTN_GPU_ROUNDS", "runtime's choice"),
                       "attn_ms": ours, "flex_ms": theirs,
                       "attn_tflops": tf(ours), "flex_tflops": tf(theirs), "rel_diff_vs_flex": diff}
                if p == "causal":
                    row["sdpa_ms"] = bench(lambda: sdpa(q, k, v, is_causal=True))
                    row["sdpa_tflops"] = tf(row["sdpa_ms"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                del bm, of, o
            del q, k, v
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_shapes.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| B x L | D | pattern | attn TF/s | Flex TF/s | SDPA TF/s | attn / Flex | diff vs Flex |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sd = f"{r['sdpa_tflops']:.0f}" if "sdpa_tflops" in r else ""
        print(f"| {r['B']} x {r['L']} | {r['D']} | {r['pattern']} | {r['attn_tflops']:.0f} | "
              f"{r['flex_tflops']:.0f} | {sd} | {r['flex_ms'] / r['attn_ms']:.2f} | "
              f"{r['rel_diff_vs_flex']:.1e} |")


if __name__ == "__main__":
    build_run.main(__doc__, build, run)
