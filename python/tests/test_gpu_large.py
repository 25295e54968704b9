"""Problems larger than one launch or than 32-bit element offsets, on the
GPU: more (batch, head) pairs than a grid's z dimension holds (65535),
sequences beyond 1M tokens whose tensors hold more than 2^31 elements, and
more sequences than a grid's y dimension holds for the dedup kernels.

Every output lands in memory filled with NaN first, so a pair or row that
no launch reached shows; sampled batches, rows and keys are compared with
the float64 reference (attn.reference, test_backward.backward64). Needs a
GPU with about 60 GB of memory and the packages of
scripts/build_gpu_packages.py in $ATTN_GPU_PACKAGES; skipped otherwise
(CI has no GPU)."""

import json
import math
import os

import numpy as np
import pytest

import gpu_cases
from test_backward import backward64

torch, PKGS = gpu_cases.torch_and_packages()

import attn  # noqa: E402
from attn import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
TOL = {"bf16": 1.5e-2, "f16": 4e-3}
GRAD_TOL = {"bf16": 2.5e-2, "f16": 6e-3}
MAX_GRID_Z = gpu_cases.MAX_GRID_Z


def _sampled_batches(B, heads):
    """The first, the middle, those either side of the launch boundary
    (pair floor(65535 / H) * H starts the second launch) and the last."""
    edge = MAX_GRID_Z // heads
    return sorted({0, 1, B // 2, edge - 1, edge, B - 1})


def _many_pairs_inputs(case, L, seed, query_shaped):
    """The package of a many-pairs case and fresh inputs at length L:
    `query_shaped` tensors [B, H, L, D] (q, and grad_out), k and v, and
    document lengths for tokenized patterns (else None)."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    assert B * H > MAX_GRID_Z
    dt = DTYPES[case["dtype"]]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = [torch.randn(B, H, L, D, device="cuda", dtype=dt, generator=gen)
            for _ in range(query_shaped)]
    k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=dt, generator=gen) for _ in range(2))
    lengths = None
    if "tokenized" in str(case["pattern"]):
        lengths = torch.randint(0, L + 1, (B,), device="cuda", dtype=torch.int32, generator=gen)
    return pkg, rows, k, v, lengths


@pytest.mark.parametrize("case", gpu_cases.MANY_PAIRS, ids=lambda c: c["name"])
def test_more_pairs_than_one_grid_holds(case):
    """A batch of more than 65535 (batch, head) pairs: the kernels launch
    once per 65535 pairs (whole batches), in the rounds of multi-kernel
    packages, with init before the first round; no pair is left out."""
    pkg, (q,), k, v, lengths = _many_pairs_inputs(case, 100, 11, query_shaped=1)
    B, H = q.shape[:2]
    out = torch.full_like(q, float("nan"))
    out, lse = pkg(q, k, v, lengths=lengths, return_lse=True, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "pairs no launch reached (NaN left in out)"
    for b in _sampled_batches(B, H):
        lb = None if lengths is None else lengths[b:b + 1]
        ref, ref_lse = reference.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                                           case["pattern"], lb)
        err = ((out[b:b + 1].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < TOL[case["dtype"]], f"batch {b}: relative error {err:.2e}"
        live = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[b:b + 1]), live), f"batch {b}: lse -inf rows"
        if live.any():
            assert (lse[b:b + 1].double()[live] - ref_lse[live]).abs().max() < 2e-2


@pytest.mark.parametrize("case", gpu_cases.MANY_PAIRS_GRAD, ids=lambda c: c["name"])
def test_gradients_of_more_pairs_than_one_grid_holds(case):
    """The backward's kernels over more than 65535 pairs: gradients of
    every batch written (NaN-poisoned memory before), sampled batches
    against the float64 reference; the GQA walk of grad_kv keeps each
    launch's batches whole."""
    pkg, (q, g), k, v, lengths = _many_pairs_inputs(case, 80, 12, query_shaped=2)
    B, H, L, D = q.shape
    out, lse = pkg(q, k, v, lengths=lengths, return_lse=True)
    nbytes = 4 * (q.numel() + 2 * k.numel())
    torch.full((nbytes // 4 + (1 << 18),), float("nan"), device="cuda")  # poison, then free
    dq, dk, dv = pkg.backward(q, k, v, out, lse, g, lengths=lengths)
    torch.cuda.synchronize()
    for x, what in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        assert not torch.isnan(x).any(), f"{what}: batches no launch reached (NaN)"
    scale = 1 / math.sqrt(D)
    for b in _sampled_batches(B, H):
        n = None if lengths is None else [int(lengths[b])]
        m = np.array(reference.multiplicity(case["pattern"], H, L, L, n))
        host = lambda x: x[b:b + 1].double().cpu().numpy()
        want = backward64(host(q), host(k), host(v), m, host(g), scale)
        for got, ref, what in zip((dq, dk, dv), want, ("dq", "dk", "dv")):
            got = got[b:b + 1].double().cpu().numpy()
            err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
            assert err < GRAD_TOL[case["dtype"]], f"batch {b}, {what}: relative error {err:.2e}"


def test_dedup_of_more_sequences_than_a_grid_dimension_holds():
    """The tokenized dedup kernels over 65600 sequences of two chunks each
    (more than a grid's y dimension): every sequence's info written, and
    sampled sequences equal to torch.unique."""
    from test_gpu import _tok_layer

    _, layer = _tok_layer()
    pkg = layer.package(gpu=True)
    B, L = MAX_GRID_Z + 65, 1100  # two sorted chunks of 1024 ids
    gen = torch.Generator(device="cuda").manual_seed(13)
    tokens = torch.randint(0, 5000, (B, L), device="cuda", generator=gen)
    lengths = torch.randint(0, L + 1, (B,), device="cuda", generator=gen)
    lengths[-1] = L
    torch.full((B, L), -77, dtype=torch.int64, device="cuda")  # poison, then free
    key_ids, bias, slot_at, info = pkg.dedup_keys(tokens, lengths)
    torch.cuda.synchronize()
    assert torch.equal(info[:, 1].cpu(), lengths.cpu()), "sequences no block reached"
    for b in sorted({0, MAX_GRID_Z - 1, MAX_GRID_Z, B - 1}):
        n = int(lengths[b])
        uniq, inverse, counts = torch.unique(tokens[b, :n], sorted=True, return_inverse=True,
                                             return_counts=True)
        U = len(uniq)
        assert int(info[b, 0]) == U
        assert torch.equal(key_ids[b, :U], uniq.int())
        assert torch.allclose(bias[b, :U], counts.float().log(), atol=1e-5)
        assert torch.equal(slot_at[b, :n], inverse)


# Beyond 2^31 elements: 16 heads of 128 at L tokens, L * 16 * 128 > 2^31.
LONG_L = (1 << 20) + 1000


def _long_inputs(seed, *names):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, 16, LONG_L, 128, device="cuda", dtype=torch.bfloat16,
                        generator=gen) for _ in names]


def _rows_reference(q, k, v, pattern, rows):
    """Float64 output and lse of the (head, position) rows of a causal
    pattern over one sequence: each row's keys are positions 0..p, so
    multiplicity(pattern, H, 1, p + 1) is its row of the mask."""
    scale = 1 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for h, p in rows:
        m = reference.multiplicity(pattern, q.shape[1], 1, p + 1)[0, h, 0]
        keys = torch.from_numpy(np.nonzero(m)[0]).cuda()
        mult = torch.from_numpy(m[m > 0].copy()).cuda()
        s = (k[0, h, keys].double() @ q[0, h, p].double()) * scale
        top = s.max()
        w = mult * torch.exp(s - top)
        outs.append((w @ v[0, h, keys].double()) / w.sum())
        lses.append(top + torch.log(w.sum()))
    return outs, lses


@pytest.mark.parametrize("name", ["bench_local", "bench_strided", "bench_dilated_union",
                                  "bench_causal"])
def test_a_sequence_beyond_2_31_elements(name):
    """One sequence of 2^20 + 1000 tokens, 16 heads of 128 (2.15e9
    elements a tensor, past 32-bit offsets): every row written, and rows of
    the last head near its end, whose elements lie past 2^31, and others
    against the float64 reference."""
    pkg = attn.load(os.path.join(PKGS, name))
    with open(os.path.join(PKGS, name, "manifest.json")) as f:
        pattern = json.load(f)["spec"]["pattern"]
    q, k, v = _long_inputs(21, "q", "k", "v")
    assert q.numel() > 2 ** 31
    out = torch.full_like(q, float("nan"))
    out, lse = pkg(q, k, v, return_lse=True, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "rows no kernel reached (NaN left in out)"
    rows = [(15, LONG_L - 1), (15, LONG_L - 700), (15, (1 << 20) - 1), (14, LONG_L - 1),
            (0, 0), (0, 5000), (7, 777777)]
    want, want_lse = _rows_reference(q, k, v, pattern, rows)
    for (h, p), ref, ref_lse in zip(rows, want, want_lse):
        got = out[0, h, p].double()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1.5e-2, f"head {h}, row {p}: relative error {err:.2e}"
        assert abs(float(lse[0, h, p]) - float(ref_lse)) < 2e-2, f"head {h}, row {p}: lse"


def test_gradients_of_a_sequence_beyond_2_31_elements():
    """Local (W = 1024) backward over 2^20 + 1000 tokens, 16 heads of 128:
    no gradient element left NaN, and slices at the start and the end of
    the first and last heads against the float64 reference of that slice
    (rows [a, a + n) attend keys [a - W + 1, a + n) only, so its dq is
    exact, and so are dk and dv of keys [a, a + n - W + 1))."""
    case = gpu_cases.LARGE
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    W = case["pattern"]["local"]["window"]
    q, k, v, g = _long_inputs(22, "q", "k", "v", "g")
    out, lse = pkg(q, k, v, return_lse=True)
    torch.full((3 * q.numel() + (1 << 18),), float("nan"), device="cuda")  # poison, then free
    dq, dk, dv = pkg.backward(q, k, v, out, lse, g)
    torch.cuda.synchronize()
    for x, what in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        assert not torch.isnan(x).any(), f"{what}: elements no kernel reached (NaN)"
    n, scale = 1536, 1 / math.sqrt(128)
    m = np.array(reference.multiplicity(case["pattern"], 1, n, n + W - 1))
    for h, a in ((0, W - 1), (15, LONG_L - n), (15, LONG_L - n - 4096)):
        rows, keys = slice(a, a + n), slice(a - W + 1, a + n)
        host = lambda x, s: x[:, h:h + 1, s].double().cpu().numpy()
        want = backward64(host(q, rows), host(k, keys), host(v, keys), m, host(g, rows), scale)
        exact = slice(W - 1, n)  # keys [a, a + n - W + 1) in the slice's key index
        pairs = ((dq[:, h:h + 1, rows], want[0]),
                 (dk[:, h:h + 1, keys][:, :, exact], want[1][:, :, exact]),
                 (dv[:, h:h + 1, keys][:, :, exact], want[2][:, :, exact]))
        for (got, ref), what in zip(pairs, ("dq", "dk", "dv")):
            got = got.double().cpu().numpy()
            err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
            assert err < GRAD_TOL["bf16"], f"head {h}, rows from {a}, {what}: error {err:.2e}"
