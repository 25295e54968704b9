"""A training step of tokenized attention on one GPU: attn's TokenizedAttention
(unique ids, rows gathered per sequence, the training package's forward and
backward kernels) against FlexAttention over every position with a document
mask, both from bf16 embedding tables that require grad.

    ATTN_GPU_PACKAGES=gpu-pkgs PYTHONPATH=python python3 bench/tokenized_train_gpu.py [OUT]

(OUT: a path prefix for OUT.json/OUT.md; default bench/tokenized_train_gpu.)

Inputs as bench/tokenized_gpu.py: ids Zipf(1.1) over a vocabulary of 10^6,
tables [V, H, D] with H = Hkv = 8, D = 64, B = 4 full sequences of L tokens.
A step is forward, loss = sum(out * g) and backward to the three tables
(their gradients set to None first), timed with triton.testing.do_bench
medians; FlexAttention's block mask is built once, outside the step. Each
method's table gradients are compared with float64 autograd through
per-sequence attention over every position (on the rows of the batch's ids;
the relative error of the norm, the worst of q, k and v). Frequent ids
collect thousands of positions' gradients: summed in bf16 by the gather's
backward (FlexAttention's path) they lose accuracy that attn's duplicates,
one key each summed in f32 by the kernels, keep."""
import json
import os
import sys

import torch
import triton.testing as tt
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attn
from tokenized_gpu import zipf_ids

PKGS = os.environ["ATTN_GPU_PACKAGES"]
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                         "tokenized_train_gpu")
B, H, HKV, D = 4, 8, 8, 64
LENS = [int(x) for x in os.environ.get("LENS", "1024,4096,10000").split(",")]
dev = "cuda"
flex = torch.compile(flex_attention, dynamic=False)


def reference_grads(tables, tokens, g):
    """Float64 gradients of sum(out * g) with respect to `tables` (the rows
    of the batch's ids; tokens index them), one sequence at a time."""
    tabs = [t.double().requires_grad_() for t in tables]
    for b in range(tokens.shape[0]):
        q, k, v = (t[tokens[b]].transpose(0, 1) for t in tabs)
        out = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, -1) @ v
        (out * g[b].double()).sum().backward()
        del q, k, v, out
    return [t.grad for t in tabs]


def main():
    gen = torch.Generator(device=dev).manual_seed(1)
    tables = [torch.randn(10 ** 6, h, D, device=dev, generator=gen).bfloat16().requires_grad_()
              for h in (H, HKV, HKV)]
    emb = attn.TableEmbedding(*tables)
    rows = []
    for L in LENS:
        tokens = zipf_ids((B, L), gen)
        lengths = torch.full((B,), L, device=dev)
        g = torch.randn(B, H, L, D, device=dev, generator=gen)
        layer = attn.TokenizedAttention(B, L, 1, emb, package_dir=PKGS)
        doc = torch.arange(B, device=dev).repeat_interleave(L)
        mask = create_block_mask(lambda b, h, q, k: doc[q] == doc[k], 1, 1, B * L, B * L,
                                 device=dev)

        def attn_step():
            for t in tables:
                t.grad = None
            (layer(tokens, lengths).float() * g).sum().backward()

        def flex_step():
            for t in tables:
                t.grad = None
            q, k, v = (t[tokens.reshape(-1)].transpose(0, 1)[None] for t in tables)
            out = flex(q, k, v, block_mask=mask)[0].reshape(H, B, L, D).transpose(0, 1)
            (out.float() * g).sum().backward()

        ids, compact = torch.unique(tokens, return_inverse=True)
        want = reference_grads([t.detach()[ids] for t in tables], compact, g)
        errors = {}
        for name, step in (("attn dedup", attn_step), ("flex doc", flex_step)):
            step()
            errors[name] = max(((t.grad[ids].double() - w).norm() / w.norm()).item()
                               for t, w in zip(tables, want))
        stats = dict(layer.last_stats)
        for name, step in (("attn dedup", attn_step), ("flex doc", flex_step)):
            ms = tt.do_bench(step, warmup=5, rep=100, return_mode="median")
            rows.append({"L": L, "method": name, "ms": ms, "positions": stats["positions"],
                         "unique": stats["unique"], "table_grad_rel_err": errors[name]})
            print(json.dumps(rows[-1]), flush=True)
    with open(OUT + ".json", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)
    with open(OUT + ".md", "w") as f:
        f.write(f"# Tokenized attention, one training step ({torch.cuda.get_device_name()})\n\n"
                "bench/tokenized_train_gpu.py: B = 4, H = Hkv = 8, D = 64, bf16 tables of "
                "10^6 ids (Zipf 1.1), forward + backward to the tables, median ms.\n\n"
                "Errors: the table gradients against float64 autograd (relative error of "
                "the norm, worst of q, k, v).\n\n"
                "| L | positions | unique | attn dedup (ms) | flex doc (ms) | speed-up | "
                "attn error | flex error |\n|---|---|---|---|---|---|---|---|\n")
        for L in LENS:
            a, fl = (next(r for r in rows if r["L"] == L and r["method"] == m)
                     for m in ("attn dedup", "flex doc"))
            f.write(f"| {L} | {a['positions']} | {a['unique']} | {a['ms']:.2f} | "
                    f"{fl['ms']:.2f} | {fl['ms'] / a['ms']:.2f}x | "
                    f"{a['table_grad_rel_err']:.1e} | {fl['table_grad_rel_err']:.1e} |\n")


if __name__ == "__main__":
    main()
