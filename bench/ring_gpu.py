"""Ring attention on several GPUs over NCCL: correctness against one GPU, then
time per layer call and bytes sent per rank against the single-GPU run.

Here (no GPU needed), build the packages:
    python3 bench/ring_gpu.py --build ring-pkgs [--ranks 2]
On the GPU machine, one process per GPU:
    NCCL_NVLS_ENABLE=0 ATTN_BUILD_DIR=build PYTHONPATH=python \\
        torchrun --nproc_per_node 2 bench/ring_gpu.py --packages ring-pkgs [--out DIR]
(`--checks-only`: the correctness cases without the timings.)

Every rank draws the same global q, k, v (same seed), keeps its rows by the
package's layout (docs/Ring.md), runs its part, and rank 0 gathers the
outputs and compares them with the single-GPU package on the whole sequence
(outputs poisoned with NaN first). Timings: CUDA events around one layer
call on every rank after a barrier (median of repeats); ideal = single-GPU
time / ranks.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attn  # noqa: E402

H, D = 16, 128
LONGNET = {"sum": [{"dilated": {"segment": 2048, "rate": 1, "causal": True}},
                   {"dilated": {"segment": 8192, "rate": 4, "head_offset": True, "causal": True}},
                   {"dilated": {"segment": 32768, "rate": 16, "head_offset": True, "causal": True}}]}
UNION = {"union": [{"local": {"window": 512}}, {"strided": {"stride": 128, "local": 1}}]}
# (name, pattern, layout, L): correctness at 16384, speed at 131072 and 262144.
CHECKS = [
    ("causal", {"causal": {}}, "zigzag", 16384),
    ("causal", {"causal": {}}, "contiguous", 16384),
    ("causal", {"causal": {}}, "striped", 16384),
    ("local", {"local": {"window": 1024}}, "contiguous", 16384),
    ("longnet", LONGNET, "zigzag", 65536),
    ("tokenized", {"sum": [{"tokenized": {}}]}, "zigzag", 16384),
    # The striped layout's local forms: head offsets, lengths, filters.
    ("longnet", LONGNET, "striped", 65536),
    ("tokenized", {"sum": [{"tokenized": {}}]}, "striped", 16384),
    ("union", UNION, "striped", 16384),
    ("union", UNION, "zigzag", 16384),
]
SPEED = [(n, p, lay, L) for L in (131072, 262144)
         for n, p, lay in (("causal", {"causal": {}}, "zigzag"),
                           ("local", {"local": {"window": 1024}}, "contiguous"))]


def spec(name, pattern, L, layout=None, ranks=None):
    s = {"name": name, "dtype": "bf16", "heads": H, "head_dim": D, "seq_len": L,
         "pattern": pattern}
    if layout:
        s["distribution"] = {"ranks": ranks, "layout": layout}
    return s


def key(name, layout, L):
    return f"{name}_{layout}_{L}"


def compile_here(s, path):
    """attn-compile for sm_90a (loading a GPU package needs a GPU; this does not)."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(s, f)
    r = subprocess.run([attn._tool("attn-compile"), f.name, "--target", "sm_90a", "-o", path,
                        "--quiet"], capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode:
        raise SystemExit(r.stderr)


def build(out, ranks, cases=None, make_spec=spec):
    """Each case's ring package and its single-GPU twin (specs from
    make_spec) into `out`; cases default to this bench's."""
    os.makedirs(out, exist_ok=True)
    for name, pattern, layout, L in cases or CHECKS + SPEED:
        k = key(name, layout, L)
        t0 = time.time()
        compile_here(make_spec(name, pattern, L, layout, ranks), os.path.join(out, k))
        single = os.path.join(out, f"{name}_single_{L}")
        if not os.path.exists(single):
            compile_here(make_spec(name, pattern, L), single)
        print(f"{k:32s} {time.time() - t0:.2f} s", flush=True)


def timed(fn, repeat):
    from kernel_times import event_ms
    return event_ms(fn, repeat)


def context_parallel_ms(q, k, v, ranks):
    """PyTorch's ring attention (context_parallel around causal SDPA, its
    load-balanced sharding) on the same global inputs; median ms of one call,
    or the error it raised."""
    import torch
    import torch.nn.functional as F
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        mesh = init_device_mesh("cuda", (ranks,))
        cq, ck, cv = q.clone(), k.clone(), v.clone()
        with context_parallel(mesh, buffers=[cq, ck, cv], buffer_seq_dims=[2, 2, 2]):
            call = lambda: F.scaled_dot_product_attention(cq, ck, cv, is_causal=True)
            call()
            ms = torch.tensor([timed(call, 7)], device=q.device)
        all_ms = [torch.empty_like(ms) for _ in range(ranks)]
        torch.distributed.all_gather(all_ms, ms)
        return max(t.item() for t in all_ms)
    except Exception as e:  # recorded in the table, not hidden
        return f"failed: {type(e).__name__}: {str(e)[:120]}"


def fmt(x):
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def start():
    """This process's rank of the NCCL process group torchrun describes, on
    its GPU: (torch.distributed, rank, ranks, device)."""
    import torch
    import torch.distributed as dist
    dist.init_process_group("nccl")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return dist, rank, ranks, torch.device("cuda")


def random_inputs(L, seed, dev, n=3):
    """n global [1, H, L, D] bf16 tensors (q, k, v, ...), the same on every
    rank (one generator, seeded)."""
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16, generator=g)
            for _ in range(n)]


def run(pkgs, out_dir, checks_only=False):
    import torch
    dist, rank, ranks, dev = start()
    rows, failed = [], 0

    for i, (name, pattern, layout, L) in enumerate(CHECKS + ([] if checks_only else SPEED)):
        speed = i >= len(CHECKS)
        ring = attn.load(os.path.join(pkgs, key(name, layout, L)))
        ring.join()
        q, k, v = random_inputs(L, 100 + i, dev)
        lengths = torch.tensor([L - 1000], device=dev, dtype=torch.int32) if name == "tokenized" else None
        lq, lk, lv = (ring.shard(t) for t in (q, k, v))  # this rank's rows
        out = torch.full_like(lq, float("nan"))
        o, lse = ring.run_rank(lq, lk, lv, lengths=lengths, return_lse=True, out=out)
        gathered = [torch.empty_like(o) for _ in range(ranks)]
        lses = [torch.empty_like(lse) for _ in range(ranks)]
        dist.all_gather(gathered, o)
        dist.all_gather(lses, lse)
        row = {"pattern": name, "layout": layout, "L": L, "ranks": ranks,
               "bytes_sent_rank": ring.bytes_sent[0]}
        sent = [torch.tensor([ring.bytes_sent[0]], device=dev) for _ in range(ranks)]
        dist.all_gather(sent, torch.tensor([ring.bytes_sent[0]], device=dev))
        row["bytes_sent"] = [int(s.item()) for s in sent]
        if rank == 0:
            single = attn.load(os.path.join(pkgs, f"{name}_single_{L}"))
            ref = torch.full_like(q, float("nan"))
            ref, ref_lse = single(q, k, v, lengths=lengths, return_lse=True, out=ref)
            full, full_lse = ring.unshard(gathered), ring.unshard(lses)
            diff = (full.float() - ref.float()).norm() / ref.float().norm()
            fin = torch.isfinite(ref_lse)
            ok = (not torch.isnan(full).any().item() and diff.item() < 1e-2
                  and torch.equal(torch.isinf(full_lse), torch.isinf(ref_lse))
                  and (full_lse[fin] - ref_lse[fin]).abs().max().item() < 1e-2)
            failed += not ok
            row["rel_diff_vs_1gpu"] = diff.item()
            row["ok"] = ok
            if speed:
                row["1gpu_ms"] = timed(lambda: single(q, k, v, lengths=lengths, out=ref), 5)
        if speed:
            dist.barrier()

            def call():
                ring.run_rank(lq, lk, lv, lengths=lengths, out=out)
            call()
            ms = torch.tensor([timed(call, 7)], device=dev)
            all_ms = [torch.empty_like(ms) for _ in range(ranks)]
            dist.all_gather(all_ms, ms)
            row["ring_ms"] = max(t.item() for t in all_ms)
            steps = torch.tensor(ring.step_ms + [0.0] * (ranks - len(ring.step_ms)), device=dev)
            all_steps = [torch.empty_like(steps) for _ in range(ranks)]
            dist.all_gather(all_steps, steps)
            row["step_ms"] = [[round(x, 2) for x in t.tolist()] for t in all_steps]
            if rank == 0:
                row["ideal_ms"] = row["1gpu_ms"] / ranks
                row["efficiency"] = row["ideal_ms"] / row["ring_ms"]
            if name == "causal":
                cp = context_parallel_ms(q, k, v, ranks)
                if rank == 0:
                    row["context_parallel_ms"] = cp
        if rank == 0:
            print(json.dumps(row), flush=True)
            rows.append(row)
        del ring
    if rank == 0:
        name = torch.cuda.get_device_name()
        lines = [f"{ranks} x {name}, torch {torch.__version__}, NCCL_NVLS_ENABLE="
                 f"{os.environ.get('NCCL_NVLS_ENABLE', '')}", "",
                 "| pattern | layout | L | correct (rel diff vs 1 GPU) | bytes sent per rank | "
                 "1 GPU ms | ring ms | ideal ms | % of ideal | ms per step (each rank) | "
                 "PyTorch context_parallel ms |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['pattern']} | {r['layout']} | {r['L']} | {r['ok']} ({r['rel_diff_vs_1gpu']:.1e}) | "
                f"{', '.join(str(b) for b in r['bytes_sent'])} | "
                f"{r.get('1gpu_ms', float('nan')):.2f} | {r.get('ring_ms', float('nan')):.2f} | "
                f"{r.get('ideal_ms', float('nan')):.2f} | "
                f"{100 * r.get('efficiency', float('nan')):.0f} | "
                f"{' / '.join(str(x) for x in r.get('step_ms', []))} | "
                f"{fmt(r.get('context_parallel_ms', ''))} |")
        report(lines, rows, failed, out_dir, "ring_gpu")
    dist.destroy_process_group()


def report(lines, rows, failed, out_dir, stem):
    """Prints the table `lines` and the count of passed and failed rows;
    with out_dir, writes the table (stem.md) and the rows (stem.json)."""
    table = "\n".join(lines)
    print(table)
    if out_dir:
        with open(os.path.join(out_dir, stem + ".md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out_dir, stem + ".json"), "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows) - failed} passed, {failed} failed")


def main(build, run):
    """The command line of a ring bench: --build DIR here, or --packages DIR
    under torchrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--build")
    ap.add_argument("--packages")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--checks-only", action="store_true",
                    help="run the correctness cases only (no timings)")
    a = ap.parse_args()
    if a.build:
        build(a.build, a.ranks)
    elif a.packages:
        run(a.packages, a.out, a.checks_only)
    else:
        ap.error("give --build DIR (here) or --packages DIR (under torchrun)")


if __name__ == "__main__":
    main(build, run)
