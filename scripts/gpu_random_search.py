#!/usr/bin/env python3
"""A search for GPU faults on random pattern trees, beyond the suites' fixed
random cases (python/tests/gpu_cases.py): compile here, run on the GPU
machine.

    scripts/gpu_random_search.py build DIR [--seed 9001] [--count 100]
        [--ring-seed 4242] [--ring-count 30] [--target sm_90a]
    ATTN_BUILD_DIR=build PYTHONPATH=python:python/tests \\
        python3 scripts/gpu_random_search.py run DIR       # on the GPU machine

`build` draws `count` one-rank specs with gradients (gpu_cases.random_cases:
random_patterns.py's trees, dtype, head dim, GQA, document lengths) and
`ring-count` ring specs with gradients over 2-4 contiguous or zigzag ranks,
compiles each into DIR (without the PTX, which the runtime needs only for
a GPU its cubins do not run on: keep it with --keep-ptx for sm_80 packages
run on newer GPUs) and writes DIR/cases.json. `run` puts every one-rank
spec through the suites' checks (gradients at three shapes, the forward
against the float64 reference, the q = 0 exact-keys check) and every ring
spec through the ring forward and backward checks (ranks as threads on
one GPU), and prints each failure with the spec's name (its JSON is
DIR/<name>.json). Exits 1 if any check failed."""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python", "tests"))


def build(args):
    import gpu_cases
    os.makedirs(args.dir, exist_ok=True)
    grad = gpu_cases.random_cases(args.seed, args.count, "search_grad_", backward=True)
    ring = gpu_cases.random_ring_cases(args.ring_seed, args.ring_count, "search_",
                                       backward=True)
    for n, spec in enumerate(grad + ring, 1):
        gpu_cases.compile_package(spec, args.dir, args.target, args.keep_ptx)
        print(f"\r{n}/{len(grad) + len(ring)} compiled", end="", flush=True)
    print()
    with open(os.path.join(args.dir, "cases.json"), "w") as f:
        json.dump({"grad": grad, "ring": ring}, f)


def run(args):
    os.environ["ATTN_GPU_PACKAGES"] = os.path.abspath(args.dir)
    import test_gpu
    import test_gpu_backward
    cases = json.load(open(os.path.join(args.dir, "cases.json")))
    failures = 0

    def attempt(what, check, *check_args):
        nonlocal failures
        try:
            check(*check_args)
        except Exception as e:  # an assertion, or an error the runtime raised
            failures += 1
            print(f"FAIL {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)

    for c in cases["grad"]:
        for shape in [(300, 300), (517, 200), (200, 517)]:
            attempt(f"{c['name']} gradients {shape}",
                    test_gpu_backward.test_gradients_match_the_float64_reference, c, shape)
        attempt(f"{c['name']} forward", test_gpu._check_against_reference, c, (700, 700))
        attempt(f"{c['name']} q = 0", test_gpu._check_zero_queries, c, (257, 1000), c["pattern"])
    for c in cases["ring"]:
        attempt(f"{c['name']} ring forward", test_gpu.test_ring_ranks_on_one_gpu_match_reference, c)
        attempt(f"{c['name']} ring gradients",
                test_gpu_backward.test_ring_backward_on_one_gpu_matches_reference, c)
    print(f"{len(cases['grad'])} one-rank and {len(cases['ring'])} ring specs: "
          f"{failures} checks failed")
    sys.exit(1 if failures else 0)


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
sub = ap.add_subparsers(dest="mode", required=True)
b = sub.add_parser("build", help="compile the random specs into DIR (here, with MLIR)")
b.add_argument("dir")
b.add_argument("--seed", type=int, default=9001)
b.add_argument("--count", type=int, default=100)
b.add_argument("--ring-seed", type=int, default=4242)
b.add_argument("--ring-count", type=int, default=30)
b.add_argument("--target", default="sm_90a")
b.add_argument("--keep-ptx", action="store_true")
r = sub.add_parser("run", help="check DIR's packages (on the GPU machine)")
r.add_argument("dir")
args = ap.parse_args()
build(args) if args.mode == "build" else run(args)
