"""The benchmark patterns of bench/gpu_bench.py and bench/gpu_ab.py: their
FlexAttention-style masks (reusing ../shared/bench/peers.py's definitions),
attended-pair counts and the inputs each attn package takes.

B=1, H=16, D=128 (or HEAD_DIM), bf16; local W=1024, strided S=128 (Child), LongNet
(2048,1)+(8192,4)+(32768,16) with head offsets, causal (dilated_union_plain:
the union without head offsets, and union_local_strided: local W with
strided S's classes, and intersect_chunked_local: local W within chunks of
8192, for gpu_ab.py); tokenized: documents of
bench/gpu/doc_lengths_<L>.json, one per batch row padded to 4096."""
import json
import os
import statistics

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
B, H = 1, 16
# The head dim of the packages timed (scripts/build_gpu_packages.py
# --head-dim), 128 unless HEAD_DIM says otherwise.
D = int(os.environ.get("HEAD_DIM", "128"))
W, S = 1024, 128
DIL = [(2048, 1), (8192, 4), (32768, 16)]
dev = "cuda"


def rotated_times(runs, rounds, before=lambda name: None):
    """Times each of `runs` (name -> callable) with triton's do_bench (the
    median ms of 200 ms of calls) once a round for `rounds` rounds, the order
    rotating from round to round: identical packages time differently from
    run to run (by up to ~10%), and a fixed order would turn that noise into
    a bias. `before(name)` runs ahead of each timing (not timed). Returns
    (median ms per name, every round's ms per name)."""
    import triton.testing as tt
    names = list(runs)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            before(n)
            times[n].append(tt.do_bench(runs[n], warmup=25, rep=200, return_mode="median"))
    return {n: statistics.median(t) for n, t in times.items()}, times


def tflops(nnz, ms):
    """Effective TF/s of a call attending `nnz` pairs in `ms` milliseconds."""
    return 4 * nnz * D / ms / 1e9


def with_rounds(setting):
    """ATTN_GPU_ROUNDS as `setting` (None: the runtime's choice; "0": one
    launch per kernel; "N": N pairs a round); the runtime reads it at every
    call."""
    if setting is None:
        os.environ.pop("ATTN_GPU_ROUNDS", None)
    else:
        os.environ["ATTN_GPU_ROUNDS"] = setting


def us_per_call(fn, calls, batches=5):
    """µs per call of `fn` queued `calls` times back to back between two CUDA
    events (the median of `batches` batches): the larger of its CPU and GPU
    times per call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(batches):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls * 1e3)
    return statistics.median(times)


def kernel_durations(fn):
    """Runs `fn` three times, then once under torch.profiler: the durations
    (µs) of the kernels it launched, by kernel name, and the span (µs) from
    the first kernel's start to the last one's end."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    return by_name, span


def residue_classes(t):
    """Strided's residue classes as sequences of their own: (B, H, L, D) ->
    (B*H*S, 1, L/S, D), class c holding rows c, c + S, c + 2S, ..."""
    b, h, L, d = t.shape
    return t.view(b, h, L // S, S, d).transpose(2, 3).reshape(b * h * S, 1, L // S, d).contiguous()


def sparse_layers(lens, folder):
    """attn.sparse's bench layers (python/tests/gpu_cases.py, SPARSE_BENCH)
    at each length, with fresh inputs: yields (L, (B, E, H, mode, ctx,
    dtype), the layer on `folder`'s packages, q, k, v), q, k and v the
    [B, L, E] slices of one fused projection [B, L, 3E] in bf16."""
    import gpu_cases
    from attn import sparse
    for L in lens:
        for case in gpu_cases.SPARSE_BENCH:
            B, E, H, mode, ctx, dtype = case
            layer = sparse.SparseAttention(H, mode, ctx, package_dir=folder)
            qkv = torch.randn(B, L, 3 * E, device=dev, dtype=torch.bfloat16)
            yield (L, case, layer, *qkv.split(E, dim=-1))


def print_table(columns, rows):
    """Prints the device, then `rows` as a Markdown table: `columns` is a
    list of (header, cell) where cell(row) gives the cell's text."""
    print(f"\ndevice: {torch.cuda.get_device_name()}")
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(cell(r) for _, cell in columns) + " |")


def mask_fn(name, doc=None):
    if name == "causal":
        return lambda b, h, q, k: k <= q
    if name == "local":
        return lambda b, h, q, k: (k <= q) & (q - k < W)
    if name == "strided":
        return lambda b, h, q, k: (k <= q) & (((q - k) < S) | ((q - k) % S == 0))
    if name in ("dilated_union", "dilated_sum"):
        def m(b, h, q, k):
            acc = None
            for w, r in DIL:
                t = (q // w == k // w) & (q % r == h % r) & (k % r == h % r)
                acc = t if acc is None else acc | t
            return acc & (k <= q)
        return m
    if name == "intersect_chunked_local":  # local W within chunks of 8192
        return lambda b, h, q, k: (k <= q) & ((q - k) < W) & (q // 8192 == k // 8192)
    if name == "union_local_strided":  # local W and strided S's classes
        return lambda b, h, q, k: (k <= q) & (((q - k) < W) | ((q - k) % S == 0))
    if name == "dilated_union_plain":  # LongNet without head offsets: class 0
        def plain(b, h, q, k):
            acc = None
            for w, r in DIL:
                t = (q // w == k // w) & (q % r == 0) & (k % r == 0)
                acc = t if acc is None else acc | t
            return acc & (k <= q)
        return plain
    if name == "tokenized":
        return lambda b, h, q, k: doc[q] == doc[k]
    raise ValueError(name)


def branch_fns():
    return [lambda b, h, q, k, w=w, r=r: (q // w == k // w) & (q % r == h % r) & (k % r == h % r) & (k <= q)
            for w, r in DIL]


def count(fn, L, per_head):
    total = 0
    ks = torch.arange(L, device=dev)
    for h in range(H):
        for q0 in range(0, L, 2048):
            qs = torch.arange(q0, min(L, q0 + 2048), device=dev)
            total += int(fn(0, torch.tensor(h, device=dev), qs[:, None], ks[None, :]).sum())
        if not per_head:
            return total * H
    return total


def doc_lengths(L):
    """Document lengths of the tokenized benchmark at L, or None."""
    path = os.path.join(HERE, "gpu", f"doc_lengths_{L}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def pairs(name, L, doc_lens=None):
    """Attended pairs (with multiplicity for the LongNet sum)."""
    if name == "dilated_sum":
        return sum(count(f, L, True) for f in branch_fns())
    if name == "tokenized":
        return H * sum(n * n for n in doc_lens)
    return count(mask_fn(name), L, name in ("dilated_union", "dilated_sum"))


def package_name(name, L):
    return f"bench_{name}" if name != "tokenized" else f"bench_tokenized_{L}"


def package_inputs(name, q, k, v, doc_lens=None):
    """(q, k, v, lengths) as the package of `name` takes them: tokenized
    packs one document per batch row, padded to 4096."""
    if name != "tokenized":
        return q, k, v, None
    nd = len(doc_lens)
    qd, kd, vd = (torch.zeros(nd, H, 4096, D, device=q.device, dtype=q.dtype) for _ in range(3))
    off = 0
    for d_, n in enumerate(doc_lens):
        qd[d_, :, :n] = q[0, :, off:off + n]
        kd[d_, :, :n] = k[0, :, off:off + n]
        vd[d_, :, :n] = v[0, :, off:off + n]
        off += n
    return qd, kd, vd, torch.tensor(doc_lens, device=q.device, dtype=torch.int32)
