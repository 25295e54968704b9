"""The GPU correctness cases: specs (compiled on a machine with MLIR by
scripts/build_gpu_packages.py) and the shapes each is run at on the GPU by
test_gpu.py. Shapes cover the edge cases of docs/Semantics.md: lengths that
are not multiples of a tile, Lq < Lk and Lq > Lk (rows with no key), a single
row, GQA, lengths 0 and full."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_package(spec, folder, target="sm_90a", keep_ptx=False, flags=()):
    """Compiles `spec` with build/bin/attn-compile (and `flags`) into
    folder/<name> (its JSON beside it, as folder/<name>.json), for carrying
    to the GPU machine: without the PTX unless `keep_ptx` (the runtime needs
    it only for a GPU its cubins do not run on, as sm_80 packages on an
    H100). Returns ptxas's report, one "kernel: registers, spills, shared
    memory" line a kernel. Raises SystemExit with attn-compile's
    diagnostics if the spec does not compile."""
    path = os.path.join(folder, spec["name"] + ".json")
    with open(path, "w") as f:
        json.dump(spec, f)
    out = os.path.join(folder, spec["name"])
    r = subprocess.run([os.path.join(ROOT, "build", "bin", "attn-compile"), path,
                        "--target", target, *flags, "-o", out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{spec['name']} does not compile: {r.stderr}")
    if not keep_ptx:
        os.remove(os.path.join(out, "kernels.ptx"))
    return [l.split(":", 1)[1].strip() for l in r.stderr.splitlines() if "registers" in l]


def torch_and_packages():
    """For a GPU test module, at import: (torch, $ATTN_GPU_PACKAGES), or the
    whole module skipped where PyTorch, a CUDA device or the packages are
    missing (CI has no GPU)."""
    import pytest
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)
    packages = os.environ.get("ATTN_GPU_PACKAGES")
    if not packages:
        pytest.skip("ATTN_GPU_PACKAGES is not set", allow_module_level=True)
    return torch, packages


LONGNET_SMALL = [
    {"dilated": {"segment": 64, "rate": 1, "head_offset": True, "causal": True}},
    {"dilated": {"segment": 256, "rate": 4, "head_offset": True, "causal": True}},
    {"dilated": {"segment": 1024, "rate": 16, "head_offset": True, "causal": True}},
]

SHAPES = [(1000, 1000), (300, 1000), (1000, 300), (1, 777), (64, 64), (129, 2000)]


def _spec(name, pattern, dtype="bf16", heads=4, kv_heads=None, head_dim=128, batch=2):
    return {"name": name, "dtype": dtype, "batch": batch, "heads": heads,
            "kv_heads": kv_heads or heads, "head_dim": head_dim, "lse": True,
            "pattern": pattern}


UNION_SEGMENTS = [
    {"dilated": {"segment": 64, "rate": 1, "causal": True}},
    {"dilated": {"segment": 256, "rate": 1, "causal": True}},
    {"dilated": {"segment": 1024, "rate": 2, "causal": True}},
]

# LongNet's branches without head offsets (every head takes class 0): the
# later branches' exclusions are key ranges as well.
LONGNET_NO_OFFSETS = [
    {"dilated": {k: v for k, v in b["dilated"].items() if k != "head_offset"}}
    for b in LONGNET_SMALL]

UNION_WINDOW_STRIDED = {"union": [{"local": {"window": 40, "causal": False}},
                                   {"strided": {"stride": 16, "local": 1}}]}

INTERSECT_WINDOW_DILATED = {"intersect": [
    {"local": {"window": 70, "causal": False}},
    {"dilated": {"segment": 256, "rate": 2, "head_offset": True}}]}
INTERSECT_WINDOW_STRIDED = {"intersect": [{"local": {"window": 50}},
                                          {"strided": {"stride": 16, "local": 4}}]}

CASES = [
    _spec("causal", {"causal": {}}),
    _spec("causal_d64", {"causal": {}}, head_dim=64),
    _spec("causal_f16_gqa", {"causal": {}}, dtype="f16", heads=8, kv_heads=2),
    _spec("full", {"full": {}}),
    _spec("local", {"local": {"window": 100}}),
    _spec("local_sym", {"local": {"window": 70, "causal": False}}),
    _spec("strided", {"strided": {"stride": 16, "local": 16}}),
    _spec("strided_l8", {"strided": {"stride": 32, "local": 8}}, head_dim=64),
    # Strided's two components (begin, end) with f16 and GQA, and under
    # lengths (documents of a batch).
    _spec("strided_f16_gqa", {"strided": {"stride": 24, "local": 24}}, dtype="f16",
          heads=8, kv_heads=2, head_dim=64),
    _spec("strided_tokenized", {"intersect": [{"strided": {"stride": 16, "local": 16}},
                                              {"tokenized": {}}]}, batch=3),
    _spec("dilated", {"dilated": {"segment": 128, "rate": 4, "head_offset": True, "causal": True}}),
    _spec("longnet_sum", {"sum": LONGNET_SMALL}),
    _spec("longnet_union", {"union": LONGNET_SMALL}),
    _spec("union_local_strided", {"union": [{"local": {"window": 48}},
                                            {"strided": {"stride": 64, "local": 1}}]}),
    # A union whose later branches' exclusions are all key ranges
    # (exclusionsAsRanges) with no head offsets: a period-1 branch that
    # excludes the segments of a narrower one, and one of rate 2 (class 0)
    # excluding both.
    _spec("union_segments", {"union": UNION_SEGMENTS}),
    _spec("longnet_union_no_offsets", {"union": LONGNET_NO_OFFSETS}),
    # Residue classes excluding a symmetric local window that reaches three
    # of their keys (t, t - 16, t - 32): the keys from t - 39 on, a range.
    _spec("union_window_strided", UNION_WINDOW_STRIDED),
    # The same under document lengths.
    _spec("union_window_tokenized", {"intersect": [UNION_WINDOW_STRIDED, {"tokenized": {}}]},
          batch=3),
    # Intersections folded into closed forms: a symmetric window as a
    # two-sided band within a dilated branch's groups (period 2), and a
    # window narrowing strided's band and classes (period 16, [1, 3]).
    _spec("intersect_window_dilated", INTERSECT_WINDOW_DILATED),
    _spec("intersect_window_strided", INTERSECT_WINDOW_STRIDED),
    _spec("sum_causal_local", {"sum": [{"causal": {}}, {"local": {"window": 32}}]}),
    _spec("tokenized", {"tokenized": {}}, batch=4),
    _spec("tokenized_causal", {"intersect": [{"causal": {}}, {"tokenized": {}}]}, batch=4),
]


def random_cases(seed, count, prefix, **fields):
    """`count` specs of random pattern trees (random_patterns.py; a fifth
    of them under document lengths), with random dtype, head dim and GQA.
    The same seed gives the same specs here and on the GPU machine, so the
    packages built here are the ones the tests load there. These reach the
    closed forms of attn-decompose (bands subtracted from unions' later
    members, intersections folded, exclusions as key ranges) in
    combinations no fixed case names."""
    import random
    from random_patterns import random_pattern
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        pattern = random_pattern(rng)
        batch = 2
        if rng.random() < 0.2:
            pattern, batch = {"intersect": [pattern, {"tokenized": {}}]}, 3
        dtype = rng.choice(["bf16", "bf16", "f16"])
        head_dim = rng.choice([64, 128])
        kv_heads = rng.choice([4, 4, 2])
        cases.append(dict(_spec(f"{prefix}{i}", pattern, dtype=dtype, heads=4,
                                kv_heads=kv_heads, head_dim=head_dim, batch=batch),
                          **fields))
    return cases


def random_ring_cases(seed, count, prefix="random_", **fields):
    """`count` ring packages of random pattern trees (random_patterns.py)
    over 2, 3 or 4 ranks, contiguous or zigzag (the striped layout refuses
    trees whose periods do not map onto the ranks; its fixed cases are in
    RING_RANKS), a fifth of them under document lengths, with random dtype,
    head dim and GQA (names "ring_<prefix><i>"; `fields` added to each
    spec): test_gpu.py runs their ranks as threads on one GPU."""
    import random
    from random_patterns import random_pattern
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        pattern = random_pattern(rng)
        if rng.random() < 0.2:
            pattern = {"intersect": [pattern, {"tokenized": {}}]}
        ranks, layout = rng.choice([2, 3, 4]), rng.choice(["contiguous", "zigzag"])
        spec = _ring(f"{prefix}{i}", pattern, ranks, layout, 1536, 1536,
                     dtype=rng.choice(["bf16", "f16"]), head_dim=rng.choice([64, 128]))
        cases.append(dict(spec, kv_heads=rng.choice([2, 4]), **fields))
    return cases


# Random combinators (test_gpu.py, test_gpu_backward.py).
RANDOM_CASES = random_cases(2026, 48, "random_")
RANDOM_SHAPES = [(700, 700), (257, 1000), (1000, 257)]
RANDOM_GRAD_CASES = random_cases(1124, 24, "random_grad_", backward=True)

# Packages compiled with "lse": false (their kernels still keep each row's
# lse, in the runtime's scratch): a single kernel, and strided, whose
# state between kernels is O / sum in out with the rows' lse.
NO_LSE = [dict(c, name=c["name"] + "_no_lse", lse=False)
          for c in CASES if c["name"] in ("causal", "strided")]

# A ring package of one rank (runs on one GPU; NCCL moves nothing): the
# order of a rank's calls across streams and threads (test_gpu.py).
RING_ONE_RANK = {"name": "ring_one_rank", "dtype": "bf16", "heads": 4, "head_dim": 64,
                 "seq_len": 2048, "pattern": {"local": {"window": 300}},
                 "distribution": {"ranks": 1, "layout": "zigzag"}}

# Ring packages whose ranks test_gpu.py runs as threads on one GPU (the
# in-process transport's device exchange): each layout, cross attention
# (q_len != kv_len, both ways), lengths, GQA and f16.
RING_DILATED = {"sum": [
    {"dilated": {"segment": 256, "rate": 1, "head_offset": True, "causal": True}},
    {"dilated": {"segment": 1024, "rate": 4, "head_offset": True, "causal": True}}]}


def _ring(name, pattern, ranks, layout, q_len, kv_len, dtype="bf16", head_dim=64):
    lengths = ({"seq_len": q_len} if q_len == kv_len else {"q_len": q_len, "kv_len": kv_len})
    return {"name": "ring_" + name, "dtype": dtype, "batch": 2, "heads": 4, "kv_heads": 2,
            "head_dim": head_dim, **lengths, "pattern": pattern,
            "distribution": {"ranks": ranks, "layout": layout}}


RING_RANKS = [
    _ring("causal_zigzag4", {"causal": {}}, 4, "zigzag", 2048, 2048),
    _ring("local_contiguous2", {"local": {"window": 300}}, 2, "contiguous", 2048, 2048,
          dtype="f16", head_dim=128),
    _ring("strided_striped4", {"strided": {"stride": 16, "local": 8}}, 4, "striped", 1024, 1024),
    _ring("tokenized_contiguous3", {"tokenized": {}}, 3, "contiguous", 1536, 1536),
    _ring("cross_causal_zigzag4", {"causal": {}}, 4, "zigzag", 1024, 2048),
    _ring("cross_full_contiguous2", {"full": {}}, 2, "contiguous", 512, 1536, head_dim=128),
    _ring("cross_causal_longer_q", {"causal": {}}, 2, "contiguous", 2048, 1024),
    _ring("cross_local_striped4", {"local": {"window": 200}}, 4, "striped", 1024, 2048),
    # Head offsets: each kv head sends its own residue classes, rows apart
    # (two classes a kv head under GQA; one with a kv head per q head).
    _ring("dilated_zigzag2", RING_DILATED, 2, "zigzag", 2048, 2048),
    dict(_ring("dilated_mha_zigzag2", RING_DILATED, 2, "zigzag", 2048, 2048), kv_heads=4),
    # A kv head per q head, unsplit: the backward's `_once` kernels write the
    # rank's whole dk and dv and a step's received rows.
    dict(_ring("local_mha_contiguous2", {"local": {"window": 300}}, 2, "contiguous",
               2048, 2048), kv_heads=4),
]

# The ring backward pass (test_gpu_backward.py): the ring cases above
# compiled with "backward": true, run as threads on one GPU; and the
# one-rank ring (two zigzag pieces) for autograd through run_rank.
RING_GRAD = [dict(c, name=c["name"].replace("ring_", "ring_grad_", 1), backward=True)
             for c in RING_RANKS]
RING_GRAD_ONE_RANK = dict(RING_ONE_RANK, name="ring_grad_one_rank", backward=True)

# Tokenized-attention layers (batch, heads, kv_heads, head_dim, seq_len) of
# test_gpu.py and bench/tokenized_gpu.py: scripts/build_gpu_packages.py
# compiles their keyed (dedup) and naive packages.
TOKENIZED = [(3, 4, 2, 64, 700)] + [(4, 8, 8, 64, L) for L in (1024, 4096, 10000)]

# attn.sparse, the seeds' [B, L, E] API, on CUDA tensors: (batch, E, heads,
# attn_mode, local_attn_ctx, dtype). test_gpu.py runs each at a few lengths;
# scripts/build_gpu_packages.py compiles their packages.
SPARSE = [(2, 1024, 16, "all", None, "bf16"),
          (1, 1024, 8, "local", 256, "bf16"),
          (2, 2048, 16, "strided", 128, "bf16"),
          (1, 512, 8, "strided", 32, "f16")]

# The layers bench/sparse_api.py times (B = 1, E = 2048: 16 heads of 128;
# lengths are dynamic): the seeds' three modes at issue 5's window and stride.
SPARSE_BENCH = [(1, 2048, 16, "all", None, "bf16"),
                (1, 2048, 16, "local", 1024, "bf16"),
                (1, 2048, 16, "strided", 128, "bf16")]

# The backward pass ("backward": true; test_gpu_backward.py): each case's
# pattern with its gradients, at the shapes GRAD_SHAPES. A key bias with a
# scale, GQA (f16 with D = 64; a narrow band under lengths), every
# closed-form component kind (band,
# gathered residues, head offsets, segments), filters (union, intersect
# with tokenized lengths) and a sum with multiplicity above 1.
GRAD_CASES = [
    _spec("grad_causal", {"causal": {}}, heads=2),
    _spec("grad_full_f16_gqa_d64", {"full": {}}, dtype="f16", heads=4, kv_heads=2,
          head_dim=64),
    _spec("grad_local_sym", {"local": {"window": 70, "causal": False}}, heads=2),
    _spec("grad_strided", {"strided": {"stride": 16, "local": 16}}, heads=2),
    # One component over every residue class (attn.sparse's strided mode).
    _spec("grad_strided_residues", {"strided": {"stride": 16, "local": 1}}, heads=2),
    # A narrow band under document lengths with two q heads per kv head:
    # grad_kv walks both heads' rows and stores dk and dv once.
    _spec("grad_local_tokenized_gqa",
          {"intersect": [{"local": {"window": 70, "causal": False}}, {"tokenized": {}}]},
          batch=3, heads=4, kv_heads=2),
    # One segmented component: grad_kv's grid spans the keys' segments, so
    # that with fewer rows than keys the first keys' segments (no rows) are
    # written too; the package stores its gradients.
    _spec("grad_dilated_segments", {"dilated": {"segment": 48, "rate": 1, "causal": True}},
          heads=2),
    # Three components that each write every element once: the first
    # overwrites the float32 sums, the second adds, the last finishes
    # (stored gradients: its share plus the sums, in the input type).
    _spec("grad_sum_three", {"sum": [{"causal": {}}, {"local": {"window": 40}},
                                     {"strided": {"stride": 16, "local": 1}}]}, heads=2),
    _spec("grad_longnet_sum", {"sum": LONGNET_SMALL}, heads=4),
    _spec("grad_longnet_union", {"union": LONGNET_SMALL}, heads=4),
    _spec("grad_union_segments", {"union": UNION_SEGMENTS}, heads=2),
    _spec("grad_longnet_union_no_offsets", {"union": LONGNET_NO_OFFSETS}, heads=2),
    _spec("grad_union_window_strided", UNION_WINDOW_STRIDED, heads=2),
    _spec("grad_intersect_window_dilated", INTERSECT_WINDOW_DILATED, heads=2),
    _spec("grad_intersect_window_strided", INTERSECT_WINDOW_STRIDED, heads=2),
    _spec("grad_union_window_tokenized",
          {"intersect": [UNION_WINDOW_STRIDED, {"tokenized": {}}]}, batch=3, heads=2),
    _spec("grad_tokenized_causal", {"intersect": [{"causal": {}}, {"tokenized": {}}]},
          batch=3, heads=2),
    # A narrow band under GQA (grad_kv walks both q heads of a kv head)
    # filtered by a pattern that follows the head (head offsets): each
    # walked head's filter must see its own class. Found by the random
    # ring cases: dk and dv of the second head's class were left out.
    _spec("grad_window_head_filter_gqa",
          {"intersect": [{"local": {"window": 68}},
                         {"sum": [{"dilated": {"segment": 39, "rate": 3, "head_offset": True,
                                               "causal": True}}]},
                         {"full": {}}]}, heads=4, kv_heads=2),
    dict(_spec("grad_causal_key_bias", {"causal": {}}, heads=2), key_bias=True, scale=0.05),
]
for _c in GRAD_CASES:
    _c["backward"] = True
# test_gpu_large.py: batches of more (batch, head) pairs than a grid's z
# dimension holds (65535), through multi-kernel rounds, an init kernel,
# document lengths and grad_kv's GQA walk (the batch is static in a spec).
MAX_GRID_Z = 65535


def _many_pairs(case):
    return dict(case, name=case["name"] + "_many_pairs",
                batch=MAX_GRID_Z // case["heads"] + 17)


_BY_NAME = {c["name"]: c for c in CASES + GRAD_CASES}
MANY_PAIRS = [_many_pairs(_BY_NAME[n]) for n in (
    "causal", "strided", "strided_f16_gqa", "dilated", "longnet_union", "tokenized_causal")]
MANY_PAIRS_GRAD = [_many_pairs(_BY_NAME[n]) for n in (
    "grad_causal", "grad_strided", "grad_local_tokenized_gqa")]
# test_gpu_large.py: a sequence of 2^20 + 1000 tokens, 16 heads of 128
# (tensors past 2^31 elements), through the backward too; its length is
# dynamic, as every case's here.
LARGE = dict(_spec("large_local", {"local": {"window": 1024}}, heads=16, batch=1),
             backward=True)
GRAD_SHAPES = [(300, 300), (200, 517), (517, 200), (64, 64)]
# attn.sparse layers trained on CUDA tensors (test_gpu_backward.py): batch,
# embed, heads, mode, local context, dtype, at length SPARSE_GRAD_LEN.
SPARSE_GRAD = [(2, 256, 2, "all", None, "bf16"), (2, 256, 2, "local", 48, "bf16"),
               (2, 256, 2, "strided", 32, "bf16")]
SPARSE_GRAD_LEN = 256

# Ring packages of random pattern trees (test_gpu.py).
RANDOM_RING_CASES = random_ring_cases(1536, 16)
RANDOM_RING_GRAD = [dict(c, name=c["name"].replace("ring_", "ring_grad_", 1), backward=True)
                    for c in RANDOM_RING_CASES]
