"""A sum inside a set combinator, before and after attn-decompose took it as
the union of its members: LongNet's sum of branches in a union with a local
window (B = 1, 16 heads of 128, bf16, L = 32768), compiled by two
attn-compile binaries, timed in one process on the GPU machine with the
outputs compared. Build here:

    python3 bench/sum_in_set_ab.py build DIR OLD_ATTN_COMPILE

(DIR/new from build/bin/attn-compile, DIR/old from the other binary), then

    ATTN_BUILD_DIR=build PYTHONPATH=python:bench \\
        python3 bench/sum_in_set_ab.py run DIR

prints each package's components (from its manifest), ms and TF/s, and the
largest difference between the two outputs; rows to $OUT/sum_in_set_ab.json."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
L, H, D, W = 32768, 16, 128, 1024


def spec():
    with open(os.path.join(HERE, "gpu", "specs", "bench_dilated_sum.json")) as f:
        longnet = json.load(f)["pattern"]
    return {"name": "union_sum_local", "dtype": "bf16", "batch": 1, "heads": H, "head_dim": D,
            "pattern": {"union": [longnet, {"local": {"window": W}}]}}


def build(folder, old_compiler):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "union_sum_local.json")
    with open(path, "w") as f:
        json.dump(spec(), f)
    for which, binary in (("new", os.path.join(ROOT, "build", "bin", "attn-compile")),
                          ("old", old_compiler)):
        out = os.path.join(folder, which)
        subprocess.run([binary, path, "--target", "sm_90a", "--quiet", "-o", out], check=True)
        os.remove(os.path.join(out, "kernels.ptx"))


def run(folder):
    import torch
    import triton.testing as tt

    import attn

    def pairs():
        # Pairs of the union: LongNet's (its union: the branches' keys once)
        # plus the window's keys no branch holds, counted row block by row
        # block on the GPU with the masks of ../shared/bench/peers.py.
        sys.path.insert(0, HERE)
        import gpu_patterns
        fn = gpu_patterns.mask_fn("dilated_union")
        total = 0
        ks = torch.arange(L, device="cuda")
        for h in range(H):
            for q0 in range(0, L, 2048):
                qs = torch.arange(q0, min(L, q0 + 2048), device="cuda")[:, None]
                m = fn(0, torch.tensor(h, device="cuda"), qs, ks[None, :]) | (
                    (qs - W < ks[None, :]) & (ks[None, :] <= qs))
                total += int(m.sum())
        return total

    nnz = pairs()
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    rows, outs = [], {}
    for which in ("old", "new"):
        pkg = attn.load(os.path.join(folder, which))
        with open(os.path.join(folder, which, "manifest.json")) as f:
            comps = json.load(f)["components"]
        outs[which] = pkg(q, k, v)
        ms = tt.do_bench(lambda: pkg(q, k, v), warmup=25, rep=200, return_mode="median")
        row = {"compiler": which, "components": comps, "ms": ms,
               "tflops": 4 * nnz * D / ms / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    diff = float((outs["old"].float() - outs["new"].float()).abs().max())
    print(f"pairs {nnz}; largest |old - new| {diff:.2e}")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "sum_in_set_ab.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "pairs": nnz, "rows": rows,
                   "max_abs_diff": diff}, f, indent=1)


if sys.argv[1] == "build":
    build(sys.argv[2], sys.argv[3])
else:
    run(sys.argv[2])
