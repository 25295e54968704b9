"""The ring backward pass on several GPUs over NCCL: each rank's gradients
against the single-GPU backward on the whole sequence, autograd through
run_rank, then the time of a rank's backward against the single-GPU one.

Here (no GPU needed), build the packages ("backward": true):
    python3 bench/ring_gpu_backward.py --build ring-bwd-pkgs [--ranks 2]
On the GPU machine, one process per GPU:
    NCCL_NVLS_ENABLE=0 ATTN_BUILD_DIR=build PYTHONPATH=python \\
        torchrun --nproc_per_node 2 bench/ring_gpu_backward.py --packages ring-bwd-pkgs [--out DIR]
(`--checks-only`: the correctness cases without the timings.)

Every rank draws the same global q, k, v and grad_out (same seed), runs its
part of the forward (run_rank, with its lse) and of the backward
(run_rank_backward), and rank 0 gathers dq, dk and dv and compares them with
the single-GPU package's backward on the whole sequence (itself checked
against a float64 reference by python/tests/test_gpu_backward.py): relative
Frobenius error per gradient, and no NaN. One case also runs the rank's
backward through PyTorch autograd (run_rank on tensors that require grad,
then loss.backward()) and compares it with run_rank_backward's. Timings:
CUDA events around one rank's backward (every rank, after a barrier; the
slowest rank's median) against the single-GPU backward; ideal = single-GPU
time / ranks.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import attn  # noqa: E402
import ring_gpu  # noqa: E402
from ring_gpu import (LONGNET, UNION, key, main, random_inputs, report, spec,  # noqa: E402
                      start, timed)

# (name, pattern, layout, L): correctness at 16384 (LongNet at 65536, where
# its last branch spans two ranks' rows), speed at 131072.
CHECKS = [
    ("causal", {"causal": {}}, "zigzag", 16384),
    ("causal", {"causal": {}}, "contiguous", 16384),
    ("causal", {"causal": {}}, "striped", 16384),
    ("local", {"local": {"window": 1024}}, "contiguous", 16384),
    ("longnet", LONGNET, "zigzag", 65536),
    ("tokenized", {"sum": [{"tokenized": {}}]}, "zigzag", 16384),
    ("union", UNION, "striped", 16384),
]
SPEED = [("causal", {"causal": {}}, "zigzag", 131072),
         ("local", {"local": {"window": 1024}}, "contiguous", 131072)]


def backward_spec(name, pattern, L, layout=None, ranks=None):
    return {**spec(name, pattern, L, layout, ranks), "backward": True}


def build(out, ranks):
    ring_gpu.build(out, ranks, CHECKS + SPEED, backward_spec)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(pkgs, out_dir, checks_only=False):
    import torch
    dist, rank, ranks, dev = start()
    rows, failed = [], 0

    def gathered(x):
        parts = [torch.empty_like(x) for _ in range(ranks)]
        dist.all_gather(parts, x.contiguous())
        return parts

    def slowest(ms):
        t = torch.tensor([ms], device=dev)
        return max(x.item() for x in gathered(t))

    cases = CHECKS + ([] if checks_only else SPEED)
    for i, (name, pattern, layout, L) in enumerate(cases):
        speed = i >= len(CHECKS)
        ring = attn.load(os.path.join(pkgs, key(name, layout, L)))
        ring.join()
        q, k, v, go = random_inputs(L, 200 + i, dev, n=4)
        lengths = (torch.tensor([L - 1000], device=dev, dtype=torch.int32)
                   if name == "tokenized" else None)
        lq, lk, lv, lg = (ring.shard(t) for t in (q, k, v, go))
        lo, llse = ring.run_rank(lq, lk, lv, lengths=lengths, return_lse=True)
        dq, dk, dv = ring.run_rank_backward(lq, lk, lv, lo, llse, lg, lengths=lengths)
        sent = ring.bytes_sent[0]
        row = {"pattern": name, "layout": layout, "L": L, "ranks": ranks,
               "backward_bytes_sent": [int(x.item()) for x in
                                       gathered(torch.tensor([sent], device=dev))]}
        if name == "causal" and layout == "zigzag" and not speed:
            # The same rank's backward through autograd: run_rank on tensors
            # that require grad records the call; loss.backward() runs the
            # rank's part of the ring backward (a collective).
            aq, ak, av = (t.detach().clone().requires_grad_() for t in (lq, lk, lv))
            o = ring.run_rank(aq, ak, av, lengths=lengths)
            (o.float() * lg.float()).sum().backward()
            row["autograd_rel_diff"] = max(rel(aq.grad, dq), rel(ak.grad, dk), rel(av.grad, dv))
        full = [ring.unshard(gathered(x)) for x in (dq, dk, dv)]
        if rank == 0:
            single = attn.load(os.path.join(pkgs, f"{name}_single_{L}"))
            out, lse = single(q, k, v, lengths=lengths, return_lse=True)
            ref = single.backward(q, k, v, out, lse, go, lengths=lengths)
            diffs = [rel(a, b) for a, b in zip(full, ref)]
            ok = (all(d < 1e-2 for d in diffs)
                  and not any(torch.isnan(x).any().item() for x in full)
                  and row.get("autograd_rel_diff", 0.0) < 1e-2)
            failed += not ok
            row.update({"rel_diff_dq_dk_dv": diffs, "ok": ok})
            if speed:
                row["1gpu_backward_ms"] = timed(
                    lambda: single.backward(q, k, v, out, lse, go, lengths=lengths), 5)
            del single, out, lse, ref
        del full
        if speed:
            dist.barrier()

            def call():
                ring.run_rank_backward(lq, lk, lv, lo, llse, lg, lengths=lengths)
            call()
            row["ring_backward_ms"] = slowest(timed(call, 5))
            if rank == 0:
                row["ideal_ms"] = row["1gpu_backward_ms"] / ranks
                row["efficiency"] = row["ideal_ms"] / row["ring_backward_ms"]
        if rank == 0:
            print(json.dumps(row), flush=True)
            rows.append(row)
        del ring, dq, dk, dv
        torch.cuda.empty_cache()
    if rank == 0:
        name = torch.cuda.get_device_name()
        lines = [f"{ranks} x {name}, torch {torch.__version__}, NCCL_NVLS_ENABLE="
                 f"{os.environ.get('NCCL_NVLS_ENABLE', '')}", "",
                 "| pattern | layout | L | correct | rel diff vs 1 GPU (dq, dk, dv) | "
                 "bytes sent per rank (rows and gradients) | 1 GPU backward ms | "
                 "ring backward ms | ideal ms | % of ideal |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            auto = (f"; autograd {r['autograd_rel_diff']:.1e}" if "autograd_rel_diff" in r
                    else "")
            lines.append(
                f"| {r['pattern']} | {r['layout']} | {r['L']} | {r['ok']} | "
                f"{', '.join(f'{d:.1e}' for d in r['rel_diff_dq_dk_dv'])}{auto} | "
                f"{', '.join(str(b) for b in r['backward_bytes_sent'])} | "
                f"{r.get('1gpu_backward_ms', float('nan')):.1f} | "
                f"{r.get('ring_backward_ms', float('nan')):.1f} | "
                f"{r.get('ideal_ms', float('nan')):.1f} | "
                f"{100 * r.get('efficiency', float('nan')):.0f} |")
        report(lines, rows, failed, out_dir, "ring_gpu_backward")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(build, run)
