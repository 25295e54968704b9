"""Distributed tokenized attention over NCCL: tables sharded by id across the
ranks of one host, each rank fetching only its batch's unique ids' rows.

    torchrun --nproc_per_node N bench/tokenized_nccl.py [OUT.json]
    (ATTN_GPU_PACKAGES=gpu-pkgs PYTHONPATH=python NCCL_NVLS_ENABLE=0)

Every rank draws its own Zipf(1.1) batch (B = 4, L = 4096, vocabulary 10^6,
H = Hkv = 8, D = 64, bf16); its embedding function serves only the ids it
owns (id % N == rank) and refuses others. The result must equal the
single-rank layer reading the whole tables; rank 0 writes each rank's
maximum difference, time per call and bytes received against fetching every
remote position's rows."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import attn

B, H, HKV, D, VOCAB, L, ZIPF = 4, 8, 8, 64, 10 ** 6, 4096, 1.1
PKGS = os.environ["ATTN_GPU_PACKAGES"]


def main():
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(7)  # the same tables everywhere
    tables = [torch.randn(VOCAB, h, D, device=dev, generator=gen).bfloat16() for h in (H, HKV, HKV)]
    full = attn.TableEmbedding(*tables)

    def shard(ids):
        if bool((ids % n != rank).any()):
            raise RuntimeError(f"rank {rank} asked for ids it does not own")
        return full(ids)

    member = attn.NcclGroup("tokenized-bench")
    layer = attn.TokenizedAttention(B, L, n, shard, group=member, heads=H, kv_heads=HKV,
                                    head_dim=D, package_dir=PKGS)
    single = attn.TokenizedAttention(B, L, 1, full, package_dir=PKGS)
    g = torch.Generator(device=dev).manual_seed(100 + rank)
    w = torch.arange(1, VOCAB + 1, device=dev, dtype=torch.float64) ** -ZIPF
    cdf = torch.cumsum(w, 0) / w.sum()
    tokens = torch.searchsorted(cdf, torch.rand(B, L, device=dev, dtype=torch.float64,
                                                generator=g)).clamp_(max=VOCAB - 1)
    lengths = torch.tensor([L, L - 100, 1000, 1], device=dev)

    out, lse = layer(tokens, lengths, return_lse=True)
    want, want_lse = single(tokens, lengths, return_lse=True)
    torch.cuda.synchronize()
    diff = (out.float() - want.float()).abs().max().item()
    lse_ok = bool(torch.equal(torch.isinf(lse), torch.isinf(want_lse)))
    stats = dict(layer.last_stats)
    for _ in range(3):
        layer(tokens, lengths)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        layer(tokens, lengths)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 100
    row = {"rank": rank, "max_diff": diff, "lse_inf_pattern_equal": lse_ok, "ms": ms, **stats}
    rows = [None] * n
    dist.all_gather_object(rows, row)
    if rank == 0:
        for r in rows:
            print(json.dumps(r), flush=True)
        ok = all(r["max_diff"] < 2e-2 and r["lse_inf_pattern_equal"] for r in rows)
        print("distributed == single rank:", ok)
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "ranks": n, "B": B, "L": L,
                           "H": H, "Hkv": HKV, "D": D, "vocab": VOCAB, "zipf": ZIPF,
                           "ok": ok, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
