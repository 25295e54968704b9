"""GPU correctness suite: every case of gpu_cases.py against the float64
reference (attn.reference) on fresh random inputs with poisoned outputs.

Runs on a machine with an NVIDIA GPU and PyTorch, on packages compiled
elsewhere by scripts/build_gpu_packages.py into $ATTN_GPU_PACKAGES; skipped
otherwise (CI has no GPU)."""

import json
import math
import os
import zlib

import numpy as np
import pytest

import gpu_cases

torch, PKGS = gpu_cases.torch_and_packages()

import attn  # noqa: E402
from attn import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
TOL = {"bf16": 1.5e-2, "f16": 4e-3}


def _lengths(batch, kv_len, gen):
    # 0, full, and random in between.
    lens = torch.randint(0, kv_len + 1, (batch,), generator=gen)
    lens[0] = 0
    if batch > 1:
        lens[1] = kv_len
    return lens.to(torch.int32)


def _random_qkv(case, L, gen):
    """Random q, k, v of `case`'s batch, heads, head dim and dtype at length L."""
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    return tuple(torch.randn(B, n, L, D, generator=gen).to("cuda", dt) for n in (H, Hkv, Hkv))


def _run_on_poisoned_output(case, shape, gen, zero_q=False):
    """Runs `case`'s package at `shape` (Lq, Lk) on inputs drawn from `gen`
    (q = 0 with `zero_q`; lengths from _lengths for tokenized patterns),
    into an output filled with NaN: (q, k, v, lengths, out, lse)."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    q_len, kv_len = shape
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, q_len, D, generator=gen).to("cuda", dt)
    if zero_q:
        q.zero_()
    k = torch.randn(B, Hkv, kv_len, D, generator=gen).to("cuda", dt)
    v = torch.randn(B, Hkv, kv_len, D, generator=gen).to("cuda", dt)
    lengths = None
    if "tokenized" in str(case["pattern"]):
        lengths = _lengths(B, min(q_len, kv_len), gen).cuda()
    out = torch.full_like(q, float("nan"))
    out, lse = pkg(q, k, v, lengths=lengths, return_lse=True, out=out)
    torch.cuda.synchronize()
    return q, k, v, lengths, out, lse


@pytest.mark.parametrize("case", gpu_cases.CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", gpu_cases.SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(case, shape):
    _check_against_reference(case, shape)


@pytest.mark.parametrize("case", gpu_cases.RANDOM_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", gpu_cases.RANDOM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_combinators_match_reference(case, shape):
    _check_against_reference(case, shape)


def _check_against_reference(case, shape):
    """`case`'s package on fresh random inputs at `shape` (Lq, Lk), into an
    output filled with NaN, against the float64 reference: no element left
    unwritten, rows with no key 0 with lse -inf, the output within the
    dtype's tolerance (relative Frobenius norm) and each lse within 2e-2."""
    gen = torch.Generator().manual_seed(hash((case["name"], shape)) & 0xFFFF)
    q, k, v, lengths, out, lse = _run_on_poisoned_output(case, shape, gen)
    ref, ref_lse = reference.attention(q, k, v, case["pattern"], lengths)

    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has NaN"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows with no key must give lse = -inf"
    assert (out.float()[empty] == 0).all(), "rows with no key must give 0"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[case["dtype"]], f"relative error {err:.2e}"
    if (~empty).any():
        lse_err = (lse.double()[~empty] - ref_lse[~empty]).abs().max().item()
        assert lse_err < 2e-2, f"lse error {lse_err:.2e}"


# Half an ulp of each dtype's mantissa: the rounding of one stored value.
HALF_ULP = {"bf16": 2.0 ** -9, "f16": 2.0 ** -12}


@pytest.mark.parametrize("case", gpu_cases.CASES + gpu_cases.RANDOM_CASES,
                         ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", [(700, 700), (257, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_queries_attend_exactly_the_pattern_keys(case, shape):
    _check_zero_queries(case, shape, case["pattern"])


@pytest.mark.parametrize("name, pattern", [
    ("local", {"local": {"window": 99}}),
    ("local", {"local": {"window": 101}}),
    ("strided", {"strided": {"stride": 16, "local": 15}}),
    ("union_window_strided", {"union": [{"local": {"window": 39, "causal": False}},
                                        {"strided": {"stride": 16, "local": 1}}]}),
    ("intersect_window_strided", {"intersect": [{"local": {"window": 48}},
                                                {"strided": {"stride": 16, "local": 4}}]}),
], ids=["local_99", "local_101", "strided_15", "union_39", "intersect_48"])
def test_zero_query_check_sees_a_key_more_or_less(name, pattern):
    """The q = 0 check (_check_zero_queries) against a pattern one key a row
    off the package's (a window or band one shorter or longer) must fail:
    it is what tells a kernel that attends one key too many or too few from
    a correct one."""
    case = next(c for c in gpu_cases.CASES if c["name"] == name)
    with pytest.raises(AssertionError, match="ln\\(keys attended\\)"):
        _check_zero_queries(case, (700, 700), pattern)


def _check_zero_queries(case, shape, pattern):
    """With q = 0 every score is 0, so each row's lse is ln of the number of
    keys it attends (with their multiplicity) and its output the mean of
    their v rows. The random-input comparison above cannot see one key too
    many or too few in a row of hundreds (it moves the output by about
    1/n); here the lse is exact up to float32 rounding (a key more or less
    moves it by at least 1/n = 1e-3), and each output element within the
    rounding of the stored partial means (a key swapped for another moves
    it by about |v_a - v_b| / n)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"zero-q {case['name']} {shape}".encode()))
    q, k, v, lengths, out, lse = _run_on_poisoned_output(case, shape, gen, zero_q=True)
    q_len, kv_len = shape
    B, H, Hkv = case["batch"], case["heads"], case["kv_heads"]

    m = torch.from_numpy(reference.multiplicity(
        pattern, H, q_len, kv_len,
        None if lengths is None else lengths.cpu().numpy()).copy()).cuda()
    m = m.expand(B, H, q_len, kv_len).double()
    count = m.sum(-1)
    attended = count > 0
    v64 = v.double().repeat_interleave(H // Hkv, dim=1)
    want = (m @ v64) / count.clamp_min(1)[..., None]
    lse = lse.double()
    assert torch.equal(torch.isinf(lse), ~attended), "rows with no key must give lse = -inf"
    assert (out.float()[~attended] == 0).all(), "rows with no key must give 0"
    if attended.any():
        lse_err = (lse[attended] - count[attended].log()).abs().max().item()
        assert lse_err < 1e-4, f"lse differs from ln(keys attended) by {lse_err:.2e}"
    # Each stored value (a partial mean, then out) is rounded once: within
    # a half ulp of the largest partial, at most the output plus the spread
    # of a mean of n keys, about 4 / sqrt(n) for standard normal v.
    bound = 4 * HALF_ULP[case["dtype"]] * (want.abs() + 4 / count.clamp_min(1).sqrt()[..., None])
    excess = ((out.double() - want).abs() - bound)[attended]
    if excess.numel():
        worst = excess.max().item()
        assert worst <= 0, f"an output element is {worst:.2e} beyond its rounding bound"


@pytest.mark.parametrize("case", gpu_cases.NO_LSE, ids=lambda c: c["name"])
def test_a_package_without_lse_gives_the_same_output(case):
    """A package compiled with "lse": false runs the same kernels, which
    still write each row's lse (a single kernel writes it with out; a state
    in out merges from it): the runtime gives them scratch for it. Its
    output equals the lse package's bit for bit, poisoned first, at a
    shape with rows that have no key."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    with_lse = attn.load(os.path.join(PKGS, case["name"][:-len("_no_lse")]))
    assert not pkg.has_lse and with_lse.has_lse
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    gen = torch.Generator().manual_seed(31)
    dt = DTYPES[case["dtype"]]
    q = torch.randn(B, H, 1000, D, generator=gen).to("cuda", dt)
    k, v = (torch.randn(B, Hkv, 300, D, generator=gen).to("cuda", dt) for _ in range(2))
    out = pkg(q, k, v, out=torch.full_like(q, float("nan")))
    torch.cuda.synchronize()
    assert torch.equal(out, with_lse(q, k, v))
    ref, _ = reference.attention(q, k, v, case["pattern"], None)
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[case["dtype"]], f"relative error {err:.2e}"
    with pytest.raises(attn.AttnError, match="lse"):
        pkg(q, k, v, return_lse=True)


PADDED_CASES = [c for c in gpu_cases.CASES if "tokenized" in str(c["pattern"])]


@pytest.mark.parametrize("case", PADDED_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", [(1000, 1000), (129, 2000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_padding_keys_do_not_reach_the_output(case, shape):
    """Rows of k and v at or past lengths[b] are padding: whatever they hold
    (here NaN in k, inf in v) must not reach the output. The sm_90a kernels
    load contiguous K/V tiles by TMA, which copies such rows as they are."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    q_len, kv_len = shape
    gen = torch.Generator().manual_seed(hash(("padding", case["name"], shape)) & 0xFFFF)
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, q_len, D, generator=gen).to("cuda", dt)
    k = torch.randn(B, Hkv, kv_len, D, generator=gen).to("cuda", dt)
    v = torch.randn(B, Hkv, kv_len, D, generator=gen).to("cuda", dt)
    lengths = _lengths(B, min(q_len, kv_len), gen)
    lengths[-1] = max(1, min(q_len, kv_len) - 37)  # an edge tile ends mid-tile
    lengths = lengths.cuda()
    ref, ref_lse = reference.attention(q, k, v, case["pattern"], lengths)
    # Key j is padding when j >= lengths[b] (docs/Semantics.md).
    pad = torch.arange(kv_len, device="cuda")[None, :] >= lengths[:, None]  # [B, Lk]
    k = k.masked_fill(pad[:, None, :, None], float("nan"))
    v = v.masked_fill(pad[:, None, :, None], float("inf"))
    out = torch.full_like(q, float("nan"))
    out, lse = pkg(q, k, v, lengths=lengths, return_lse=True, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isinf(out).any(), "padding reached the output"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[case["dtype"]], f"relative error {err:.2e}"


# -- tokenized attention: key_bias and key_ids kernels ----------------------

TOK = dict(batch=3, heads=4, kv_heads=2, head_dim=64, vocab=5000, seq=700)


def _tok_layer(dedup=True):
    gen = torch.Generator().manual_seed(3)
    B, H, Hkv, D, V, L = (TOK[k] for k in ("batch", "heads", "kv_heads", "head_dim", "vocab", "seq"))
    tables = [torch.randn(V, h, D, generator=gen).to("cuda", torch.bfloat16) for h in (H, Hkv, Hkv)]
    emb = attn.TableEmbedding(*tables)
    return emb, attn.TokenizedAttention(B, L, 1, emb, dedup=dedup, package_dir=PKGS)


def _tok_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    B, V, L = TOK["batch"], TOK["vocab"], TOK["seq"]
    # Heavy duplication: ids from a small Zipf-like head plus a long tail.
    ranks = torch.randint(1, 200, (B, L), generator=gen).double()
    tokens = (V * torch.rand(B, L, generator=gen) ** 4).long().clamp_(0, V - 1)
    tokens = torch.where(ranks < 100, (ranks // 3).long(), tokens)
    lengths = torch.tensor([L, 0, 333])
    return tokens.cuda(), lengths.cuda()


def _tok_reference(emb, tokens, lengths, query_ids=None):
    B, H, Hkv, D = TOK["batch"], TOK["heads"], TOK["kv_heads"], TOK["head_dim"]
    outs, lses = [], []
    for b in range(B):
        n = int(lengths[b])
        qids = tokens[b] if query_ids is None else query_ids[b]
        q = emb.q_table[qids].double().transpose(0, 1)                    # [H, Q, D]
        k = emb.k_table[tokens[b, :n]].double().repeat_interleave(H // Hkv, 1).transpose(0, 1)
        v = emb.v_table[tokens[b, :n]].double().repeat_interleave(H // Hkv, 1).transpose(0, 1)
        if n == 0:
            outs.append(torch.zeros_like(q))
            lses.append(torch.full(q.shape[:2], -math.inf, dtype=torch.float64, device="cuda"))
            continue
        s = q @ k.transpose(1, 2) / math.sqrt(D)
        outs.append(torch.softmax(s, -1) @ v)
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(lses)


def _assert_sequences_match(out, ref, lengths):
    """Each sequence's rows [0, lengths[b]) of out [B, H, L, D] within 1.5%
    of the reference (relative Frobenius error)."""
    for b, n in enumerate(lengths.tolist()):
        if n:
            err = ((out[b, :, :n].double() - ref[b, :, :n]).norm() / ref[b, :, :n].norm()).item()
            assert err < 1.5e-2, f"sequence {b}: relative error {err:.2e}"


def test_tokenized_dedup_on_gpu_matches_reference():
    """TokenizedAttention on CUDA tensors: unique/count on the GPU, K/V read
    from the bf16 tables at the ids with the log(count) bias in the kernel."""
    emb, layer = _tok_layer()
    tokens, lengths = _tok_inputs(1)
    out, lse = layer(tokens, lengths, return_lse=True)
    torch.cuda.synchronize()
    assert out.is_cuda and out.dtype == torch.bfloat16
    ref, ref_lse = _tok_reference(emb, tokens, lengths)
    L = TOK["seq"]
    inside = torch.arange(L, device="cuda")[None, :] < lengths[:, None]   # [B, L]
    mask = inside[:, None, :, None].expand_as(out)
    err = ((out.double() - ref)[mask].norm() / ref[mask].norm()).item()
    assert err < 1.5e-2, f"relative error {err:.2e}"
    assert (out[~mask] == 0).all(), "positions beyond lengths must give 0"
    lmask = inside[:, None, :].expand_as(lse)
    assert (lse.double()[lmask] - ref_lse[lmask]).abs().max().item() < 2e-2
    assert torch.isinf(lse[~lmask]).all()
    stats = layer.last_stats
    assert stats["unique"] < stats["positions"] / 2, stats  # the duplication is real
    # The naive form (every position materialised, tokenized pattern) agrees.
    _, naive = _tok_layer(dedup=False)
    out_n = naive(tokens, lengths)
    torch.cuda.synchronize()
    diff = ((out_n.double() - out.double())[mask].norm() / ref[mask].norm()).item()
    assert diff < 2e-2, f"dedup vs naive {diff:.2e}"


def test_tokenized_self_attention_edge_lengths_on_gpu():
    """Self-attention on CUDA tensors runs the "self" package on the dedup
    kernels' [B, L]-wide outputs, each sequence's unique count its length,
    and takes row L - 1 for positions past the length. Edge cases: a
    sequence of L - 1 distinct ids (its count is L - 1: row L - 1 is the
    first row past it), one token, and L copies of one id; the output and
    LSE match the float64 reference, 0 and -inf past the lengths."""
    emb, layer = _tok_layer()
    B, L, V = TOK["batch"], TOK["seq"], TOK["vocab"]
    gen = torch.Generator().manual_seed(17)
    tokens = torch.randint(0, V, (B, L), generator=gen)
    tokens[0] = torch.randperm(V, generator=gen)[:L]
    tokens[2] = 42
    tokens, lengths = tokens.cuda(), torch.tensor([L - 1, 1, L], device="cuda")
    for _ in range(2):  # the second call through the package's kept C tensors
        out, lse = layer(tokens, lengths, return_lse=True)
        plain = layer(tokens, lengths)
        torch.cuda.synchronize()
        assert torch.equal(out, plain)
        ref, ref_lse = _tok_reference(emb, tokens, lengths)
        inside = torch.arange(L, device="cuda")[None, :] < lengths[:, None]
        _assert_sequences_match(out, ref, lengths)
        for b, n in enumerate(lengths.tolist()):
            assert (lse[b, :, :n].double() - ref_lse[b, :, :n]).abs().max().item() < 2e-2
        assert (out[~inside[:, None, :, None].expand_as(out)] == 0).all()
        assert torch.isinf(lse[~inside[:, None, :].expand_as(lse)]).all()
    assert layer.last_stats["unique"] == (L - 1) + 1 + 1


def test_keyed_calls_that_reuse_a_layout_read_their_own_tensors():
    """Calls with key_bias and key_ids keep their C tensors per layout too:
    calls alternating between inputs give the bits of the uncached path,
    into a poisoned out."""
    _, layer = _tok_layer()
    pkg = layer.package(gpu=True)
    B, H, Hkv, D = TOK["batch"], TOK["heads"], TOK["kv_heads"], TOK["head_dim"]
    gen = torch.Generator().manual_seed(23)
    table = torch.randn(1, Hkv, 300, D, generator=gen).to("cuda", torch.bfloat16)

    def inputs(n):
        q = torch.randn(B, H, 70, D, generator=gen).to("cuda", torch.bfloat16)
        ids = torch.randint(0, 300, (B, n), generator=gen, dtype=torch.int32).cuda()
        bias = torch.randn(B, n, generator=gen).cuda()
        return q, ids, bias

    sets = [inputs(90), inputs(90), inputs(130)]
    for _ in range(2):
        for q, ids, bias in sets:
            want = torch.full_like(q, float("nan"))
            t = pkg._torch_args(q, table, table, None, True, want, bias, ids)
            pkg._launch(q.device.index, t["ptrs"], t["bias"], t["ids"])
            out = torch.full_like(q, float("nan"))
            got, lse = pkg(q, table, table, out=out, key_bias=bias, key_ids=ids,
                           return_lse=True)
            assert got is out and torch.equal(out, want) and torch.equal(lse, t["lse"])
    assert len(pkg._plans) >= 2  # kept layouts: 90 and 130 keys


def test_tokenized_target_attention_on_gpu():
    emb, layer = _tok_layer()
    tokens, lengths = _tok_inputs(2)
    cands = torch.randint(0, TOK["vocab"], (TOK["batch"], 64), device="cuda")
    out = layer.target_forward(cands, tokens, lengths)
    torch.cuda.synchronize()
    ref, _ = _tok_reference(emb, tokens, lengths, query_ids=cands)
    keep = lengths > 0
    err = ((out.double() - ref)[keep].norm() / ref[keep].norm()).item()
    assert err < 1.5e-2, f"relative error {err:.2e}"
    assert (out[~keep] == 0).all()


@pytest.mark.parametrize("L", [1, 5, 700, 1024, 1500, 2048, 2049, 6001, 10000, 16384])
def test_dedup_keys_kernel_matches_torch_unique(L):
    """The package's dedup kernels against torch.unique per sequence:
    every element of their four outputs, which land in memory the allocator
    held poisoned just before, for lengths 0, 1, L and between, ids all
    equal, all distinct, Zipf-like and beyond 2^32; one sorted chunk (L <=
    1024) and several, the last one partial."""
    _, layer = _tok_layer()
    pkg = layer.package(gpu=True)
    assert pkg.dedup_max_len >= 16384
    gen = torch.Generator().manual_seed(L)
    B = 6
    tokens = torch.randint(0, 1 << 40, (B, L), generator=gen)
    tokens[0] = 7                                                   # all equal
    tokens[1] = torch.randperm(L, generator=gen) * 3                 # all distinct
    tokens[2] = (torch.rand(L, generator=gen) ** 6 * 50).long()      # heavy duplicates
    tokens[3] = (torch.rand(L, generator=gen) ** 3 * L).long()
    lengths = torch.tensor([L, L, L // 3, max(L - 1, 0), 0, min(1, L)])
    tokens, lengths = tokens.cuda(), lengths.cuda()
    for shape, dtype in (((B, L), torch.int32), ((B, L), torch.float32),
                         ((B, L), torch.int64), ((B, 4), torch.int64)):
        torch.full(shape, -77, dtype=dtype, device="cuda")             # poison, then free
    key_ids, bias, slot_at, info = pkg.dedup_keys(tokens, lengths)
    torch.cuda.synchronize()
    for b in range(B):
        n = int(lengths[b])
        seq = tokens[b, :n]
        uniq, inverse, counts = torch.unique(seq, sorted=True, return_inverse=True,
                                             return_counts=True)
        U = len(uniq)
        assert info[b].tolist() == [U, n, int(uniq[0]) if n else 0, int(uniq[-1]) if n else 0]
        assert torch.equal(key_ids[b, :U], uniq.int())              # ids kept as int32
        assert (key_ids[b, U:] == 0).all()
        assert torch.allclose(bias[b, :U], counts.float().log(), atol=1e-5)
        assert torch.isinf(bias[b, U:]).all() and (bias[b, U:] < 0).all()
        assert torch.equal(slot_at[b, :n], inverse)
        assert (slot_at[b, n:] == -1).all()


def test_dedup_keys_id_equal_to_the_padding_is_reported():
    """An id equal to the sort's padding (the largest i64) in a sequence of
    several chunks that ends before L still comes out last in info, so the
    caller's range check sees it."""
    _, layer = _tok_layer()
    pkg = layer.package(gpu=True)
    top = (1 << 63) - 1
    tokens = torch.randint(0, 1000, (2, 5000), device="cuda")
    tokens[0, 4000] = top
    tokens[1, 10] = top
    lengths = torch.tensor([4500, 3000], device="cuda")
    key_ids, bias, slot_at, info = pkg.dedup_keys(tokens, lengths)
    for b in range(2):
        n = int(lengths[b])
        uniq = torch.unique(tokens[b, :n])
        assert info[b].tolist() == [len(uniq), n, int(uniq[0]), top]
        assert torch.equal(key_ids[b, :len(uniq)], uniq.int())


def test_tokenized_bad_lengths_and_ids_on_gpu_raise():
    """The GPU path checks lengths and ids in its one read of the dedup
    kernel's counts, before any table is read at them."""
    emb, layer = _tok_layer()
    tokens, lengths = _tok_inputs(4)
    with pytest.raises(attn.AttnError, match=r"lengths\[1\] = 701 is outside \[0, 700\]"):
        layer(tokens, torch.tensor([5, 701, 3], device="cuda"))
    bad = tokens.clone()
    bad[2, 10] = TOK["vocab"]
    with pytest.raises(attn.AttnError, match=r"token ids must lie in \[0, 5000\)"):
        layer(bad, lengths)
    bad[2, 10] = 1 << 40  # an int32 key id would wrap to 0: the check reads the int64 id
    with pytest.raises(attn.AttnError, match=r"token ids must lie in \[0, 5000\)"):
        layer(bad, lengths)
    bad[2, 10] = -1     # past lengths[2] = 333 it would not count; here it does
    with pytest.raises(attn.AttnError, match=r"token ids must lie in \[0, 5000\), got \[-1,"):
        layer(bad, lengths)
    bad[2, 10] = 3
    bad[2, 500] = -1    # past lengths[2]: ignored
    out = layer(bad, lengths)
    # The calls that raised left the GPU well: this one matches the reference.
    _assert_sequences_match(out, _tok_reference(emb, bad, lengths)[0], lengths)
    cands = torch.full((TOK["batch"], 4), TOK["vocab"] + 2, device="cuda")
    with pytest.raises(attn.AttnError, match=r"candidate ids must lie in \[0, 5000\)"):
        layer.target_forward(cands, tokens, lengths)


def test_key_ids_outside_the_table_read_zero_rows():
    """GPU kernels cannot raise: an id outside [0, V) reads a zero key and
    value row (score 0) instead of memory past the table."""
    _, layer = _tok_layer()
    pkg = layer.package(gpu=True)
    B, H, Hkv, D = TOK["batch"], TOK["heads"], TOK["kv_heads"], TOK["head_dim"]
    q = torch.randn(B, H, 5, D, device="cuda").bfloat16()
    kt = torch.randn(1, Hkv, 10, D, device="cuda").bfloat16()
    ids = torch.tensor([[3, 10 ** 6], [-5, 2], [1, 1]], device="cuda", dtype=torch.int32)
    bias = torch.zeros(B, 2, device="cuda")
    out = pkg(q, kt, kt, key_bias=bias, key_ids=ids)
    torch.cuda.synchronize()
    # Batch 0: keys row 3 and a zero row: out = softmax([q.k3, 0]) . [v3, 0].
    s = (q[0].float() @ kt[0, :, 3].float().repeat_interleave(2, 0)[:, :, None]).squeeze(-1) / 8
    w = torch.sigmoid(s)  # exp(s) / (exp(s) + exp(0))
    want = w[..., None] * kt[0, :, 3].float().repeat_interleave(2, 0)[:, None, :]
    assert (out[0].float() - want).abs().max().item() < 3e-2


def test_misaligned_tensors_are_refused():
    """The kernels copy rows in 16-byte pieces: a tensor whose storage starts
    off a 16-byte boundary is refused with the argument's name, not run."""
    case = gpu_cases.CASES[0]
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, 64, D, device="cuda").to(dt)
    k = torch.randn(B, Hkv, 64, D, device="cuda").to(dt)
    flat = torch.zeros(k.numel() + 1, device="cuda", dtype=dt)
    shifted = flat[1:].view(k.shape)  # contiguous, 2 bytes off
    shifted.copy_(k)
    with pytest.raises(attn.AttnError, match="k: the data pointer is not 16-byte aligned"):
        pkg(q, shifted, k)
    pkg(q, k, k)  # the aligned call still runs
    torch.cuda.synchronize()


def test_cuda_graph_replays_a_multi_kernel_package():
    """A package of several kernels (LongNet's sum: a begin kernel, then
    update kernels launched as programmatic dependent launches) captured in a
    CUDA graph after an eager call on a side stream replays to exactly the
    eager output."""
    case = next(c for c in gpu_cases.CASES if c["name"] == "longnet_sum")
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    gen = torch.Generator().manual_seed(11)
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, 1000, D, generator=gen).to("cuda", dt)
    k = torch.randn(B, Hkv, 1000, D, generator=gen).to("cuda", dt)
    v = torch.randn(B, Hkv, 1000, D, generator=gen).to("cuda", dt)
    eager = pkg(q, k, v).clone()
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pkg(q, k, v, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pkg(q, k, v, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


STRIDED_CASES = ["causal", "causal_f16_gqa", "local", "strided", "strided_f16_gqa",
                 "longnet_sum", "tokenized_causal", "dilated"]


@pytest.mark.parametrize("name", STRIDED_CASES)
@pytest.mark.parametrize("shape", [(1000, 1000), (129, 2000), (300, 700)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rounds", [None, "1"], ids=["launch", "rounds"])
def test_blhd_views_run_without_a_copy(name, shape, rounds, monkeypatch):
    """q from a [B, L, H, D] tensor and k, v from one fused [B, L, 2, Hkv, D]
    projection, passed as their [B, H, L, D] views (strides, no copy), with
    out the [B, H, L, D] view of a [B, L, H, D] tensor (NaN first), give
    exactly the output of the same call on contiguous tensors, and match the
    reference; also in rounds of one (batch, head) pair (ATTN_GPU_ROUNDS=1),
    where strided's state crosses between kernels in out. (At L = 700 a
    period that does not divide it takes the cp.async path; the others TMA
    over the strides.)"""
    if rounds:
        monkeypatch.setenv("ATTN_GPU_ROUNDS", rounds)
    case = next(c for c in gpu_cases.CASES if c["name"] == name)
    pkg = attn.load(os.path.join(PKGS, name))
    q_len, kv_len = shape
    gen = torch.Generator().manual_seed(hash((name, shape, "blhd")) & 0xFFFF)
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, q_len, H, D, generator=gen).to("cuda", dt).transpose(1, 2)
    kv = torch.randn(B, kv_len, 2, Hkv, D, generator=gen).to("cuda", dt)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    lengths = None
    if "tokenized" in str(case["pattern"]):
        lengths = _lengths(B, min(q_len, kv_len), gen).cuda()
    out_blhd = torch.full((B, q_len, H, D), float("nan"), device="cuda", dtype=dt)
    out = pkg(q, k, v, lengths=lengths, out=out_blhd.transpose(1, 2))
    dense = pkg(q.contiguous(), k.contiguous(), v.contiguous(), lengths=lengths)
    torch.cuda.synchronize()
    assert out.data_ptr() == out_blhd.data_ptr(), "out is the caller's view"
    assert torch.equal(out, dense), "strided views must compute exactly what copies do"
    ref, _ = reference.attention(q, k, v, case["pattern"], lengths)
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[case["dtype"]], f"relative error {err:.2e}"


def test_strided_layouts_the_kernels_cannot_take_are_refused():
    """k and v of different layouts, a D that is not contiguous, rows off
    16-byte strides and an out whose elements overlap are refused with what
    is wrong."""
    pkg = attn.load(os.path.join(PKGS, "causal"))
    B, H, L, D = 2, 4, 64, 128
    q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    k_blhd = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(attn.AttnError, match=r"v: strides \[32768, 8192, 128, 1\] differ "
                       r"from k's \[32768, 128, 512, 1\] \(k and v must share a layout\)"):
        pkg(q, k_blhd, q)
    with pytest.raises(attn.AttnError, match=r"the last dimension \(D\) must be contiguous"):
        pkg(q.transpose(2, 3).contiguous().transpose(2, 3), q, q)
    odd = torch.randn(B, H, L, D + 4, device="cuda", dtype=torch.bfloat16)[..., :D]
    with pytest.raises(attn.AttnError, match=r"stride 132 of dimension 2 must be a "
                       r"non-negative multiple of 8 elements"):
        pkg(odd, q, q)
    with pytest.raises(attn.AttnError, match=r"out: strides \[512, 128, 0, 1\] make elements "
                       r"of shape \[2, 4, 64, 128\] overlap"):
        pkg(q, q, q, out=torch.empty(B, H, 1, D, device="cuda",
                                     dtype=torch.bfloat16).expand(B, H, L, D))


def test_key_tensor_maps_follow_the_tensors():
    """The runtime keeps the TMA tensor maps of recent K/V tensors (so that
    a package run in rounds encodes them once): calls on new tensors, on
    more tensors than it keeps, on another length, and again on the first
    tensors after their contents changed each match the reference."""
    case = next(c for c in gpu_cases.CASES if c["name"] == "strided")
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    gen = torch.Generator().manual_seed(12)

    def inputs(length):
        return _random_qkv(case, length, gen)

    def check(q, k, v):
        out = pkg(q, k, v, out=torch.full_like(q, float("nan")))
        torch.cuda.synchronize()
        ref, _ = reference.attention(q, k, v, case["pattern"], None)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < TOL[case["dtype"]], f"relative error {err:.2e}"

    first = inputs(1024)
    check(*first)
    for length in [1024] * 10 + [700]:
        check(*inputs(length))
    for t in first:
        t.copy_(torch.randn(t.shape, generator=gen).to(t.device, t.dtype))
    check(*first)


def test_a_first_call_can_be_captured():
    """A captured call takes scratch that the graph owns (allocated and freed
    by the graph): a package's very first call can be captured, without a
    warm-up call, and its replays equal the eager output even with eager
    calls of the same package on other inputs queued between them (those
    use the package's own scratch)."""
    case = next(c for c in gpu_cases.CASES if c["name"] == "longnet_sum")
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    gen = torch.Generator().manual_seed(17)
    q, q2 = (torch.randn(B, H, 1000, D, generator=gen).to("cuda", dt) for _ in range(2))
    k, v, k2, v2 = (torch.randn(B, Hkv, 1000, D, generator=gen).to("cuda", dt)
                    for _ in range(4))
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pkg(q, k, v, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    eager = pkg(q, k, v)
    other = pkg(q2, k2, v2)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    ref, _ = reference.attention(q, k, v, case["pattern"], None)
    assert (out.double() - ref).abs().max().item() < TOL[case["dtype"]]
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        again = pkg(q2, k2, v2)
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(again, other)


def _compile_inputs(name, L, seed):
    case = next(c for c in gpu_cases.CASES if c["name"] == name)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _random_qkv(case, L, gen)
    lengths = _lengths(case["batch"], L, gen).to("cuda")
    return attn.load(os.path.join(PKGS, name)), q, k, v, lengths


def test_torch_compile_traces_the_call_into_the_graph():
    """Under torch.compile(fullgraph=True) a package call is the operator
    attn::run in the captured graph (no graph break), and the compiled
    function (inductor) returns exactly what the eager one does, lengths
    and LSE included."""
    pkg, q, k, v, lengths = _compile_inputs("strided_tokenized", 1000, 21)

    def layer(q, k, v, lengths):
        out, lse = pkg(q, k, v, lengths=lengths, return_lse=True)
        return out.float() * 2 + 1, torch.where(torch.isinf(lse), 0.0, lse)

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend=recording)(q, k, v, lengths)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    assert len(graphs) == 1 and "attn.run" in targets, targets
    want = layer(q, k, v, lengths)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, k, v, lengths)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_torch_compile_dynamic_shapes_and_cuda_graphs():
    """A compiled function with a package call follows new sequence lengths
    (dynamic=True) and runs under mode="reduce-overhead" (CUDA graphs
    replayed with fresh inputs), equal to eager every time."""
    torch._dynamo.reset()
    layer = lambda q, k, v: pkg(q, k, v) * 0.5  # noqa: E731
    pkg, *_ = _compile_inputs("longnet_sum", 64, 0)
    dyn = torch.compile(layer, dynamic=True, fullgraph=True)
    for L, seed in ((700, 1), (1000, 2), (1300, 3)):
        _, q, k, v, _ = _compile_inputs("longnet_sum", L, seed)
        assert torch.equal(dyn(q, k, v), layer(q, k, v)), L
    graphs = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for seed in (4, 5, 6, 7):
        _, q, k, v, _ = _compile_inputs("longnet_sum", 1000, seed)
        got = graphs(q, k, v).clone()
        assert torch.equal(got, layer(q, k, v)), seed


def test_backward_through_a_package_raises():
    """Packages compute the forward pass only: on tensors that require grad
    the output carries a backward node whose backward raises AttnError
    (instead of gradients that silently leave attention out); the forward
    values are those of an inference call, which carries no node."""
    pkg, q, k, v, _ = _compile_inputs("causal", 300, 31)
    with torch.no_grad():
        want = pkg(q, k, v)
    assert not want.requires_grad
    q.requires_grad_()
    out = pkg(q, k, v)
    assert out.requires_grad and torch.equal(out.detach(), want)
    with pytest.raises(attn.AttnError, match="forward pass only"):
        out.float().sum().backward()


def _same_outputs_on_streams_and_threads(call, inputs, alone, streams, rounds, thread_rounds):
    """Queues call(x) for every input on `streams` streams in turn, `rounds`
    times, without waiting in between, then from three host threads with a
    stream each (`thread_rounds` calls each); every output must equal
    alone[i], the output of the same input called by itself."""
    import threading
    side = [torch.cuda.Stream() for _ in range(streams)]
    for s in side:
        s.wait_stream(torch.cuda.current_stream())
    outs = []
    for rnd in range(rounds):
        for i, x in enumerate(inputs):
            with torch.cuda.stream(side[(i + rnd) % len(side)]):
                outs.append((i, call(x)))
    torch.cuda.synchronize()
    for i, out in outs:
        assert torch.equal(out, alone[i]), f"input {i}: output differs on several streams"

    errors = []

    def worker(t):
        stream = torch.cuda.Stream()
        try:
            with torch.cuda.stream(stream):
                for rnd in range(thread_rounds):
                    i = (t + rnd) % len(inputs)
                    out = call(inputs[i])
                    stream.synchronize()
                    if not torch.equal(out, alone[i]):
                        errors.append(f"thread {t}, input {i}: output differs")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("L", [1024, 8192])
def test_calls_on_several_streams_keep_their_state_apart(L):
    """A multi-kernel package (strided: its kernels pass a state through the
    package's device scratch) called on four streams without waiting in
    between, and from three host threads with a stream each, gives every
    call the output it gives alone: a call waits for the previous call on
    another stream before its kernels use the scratch."""
    pkg = attn.load(os.path.join(PKGS, "bench_strided"))
    gen = torch.Generator().manual_seed(3)
    inputs = [tuple(torch.randn(1, 16, L, 128, generator=gen).to("cuda", torch.bfloat16)
                    for _ in range(3)) for _ in range(4)]
    alone = [pkg(*x).clone() for x in inputs]
    torch.cuda.synchronize()
    _same_outputs_on_streams_and_threads(lambda x: pkg(*x), inputs, alone,
                                         streams=4, rounds=10, thread_rounds=5)


def _rounds(case, L):
    """How many launches of (batch, head) pairs the runtime makes for a
    multi-kernel strided package at length L on this GPU (pairsPerLaunch in
    lib/Runtime/GpuPackage.cpp: the pairs whose q, k, v and out fit in 3/4
    of the L2)."""
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    per_pair = 2 * D * (2 * L + 2 * L * Hkv // H)
    budget = torch.cuda.get_device_properties(0).L2_cache_size * 3 // 4
    pairs = max(1, budget // per_pair) if per_pair <= budget else B * H
    return -(-B * H // min(pairs, B * H))


@pytest.mark.parametrize("name, L", [("bench_strided", 8192), ("strided_f16_gqa", 18000)])
def test_rounds_match_the_reference_and_one_launch(name, L, monkeypatch):
    """Strided packages run in rounds of a few (batch, head) pairs at long
    lengths (all their kernels for those pairs, then the next pairs), with a
    last round that may be short and rounds that may straddle a batch: every
    pair's rows match the float64 reference, and the output is bit-identical
    to the same call in one launch (ATTN_GPU_ROUNDS=0)."""
    if name == "bench_strided":
        case = {"batch": 1, "heads": 16, "kv_heads": 16, "head_dim": 128, "dtype": "bf16",
                "pattern": {"strided": {"stride": 128, "local": 128}}}
    else:
        case = next(c for c in gpu_cases.CASES if c["name"] == name)
    rounds = _rounds(case, L)
    if rounds < 2:
        pytest.skip(f"this GPU's L2 takes every pair of {name} at L={L} in one round")
    pkg = attn.load(os.path.join(PKGS, name))
    q, k, v = _random_qkv(case, L, torch.Generator().manual_seed(L))
    B, H, Hkv = case["batch"], case["heads"], case["kv_heads"]
    monkeypatch.delenv("ATTN_GPU_ROUNDS", raising=False)
    out = pkg(q, k, v, out=torch.full_like(q, float("nan")))
    monkeypatch.setenv("ATTN_GPU_ROUNDS", "0")
    one = pkg(q, k, v, out=torch.full_like(q, float("nan")))
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert torch.equal(out, one), f"{rounds} rounds differ from one launch"
    # The reference per pair, on its first 512 rows (keys up to them) and its
    # last 512 (all keys; bottom-right alignment puts them at the end): its
    # mask is [rows, keys].
    g, n = H // Hkv, 512
    for b in range(B):
        for h in range(H):
            kv = [t[b:b + 1, h // g:h // g + 1] for t in (k, v)]
            for rows, keys in ((slice(0, n), slice(0, n)), (slice(L - n, L), slice(0, L))):
                ref, _ = reference.attention(q[b:b + 1, h:h + 1, rows], kv[0][:, :, keys],
                                             kv[1][:, :, keys], case["pattern"])
                got = out[b:b + 1, h:h + 1, rows].double()
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < TOL[case["dtype"]], \
                    f"pair ({b}, {h}), rows {rows.start}..: error {err:.2e} ({rounds} rounds)"


def test_ring_rank_calls_on_several_streams_keep_their_buffers_apart():
    """A GPU ring package's rank (one rank: its two zigzag pieces still go
    through the ring's buffers and state) called on three streams without
    waiting in between, and from three host threads with a stream each,
    gives every call the output it gives alone: its calls take turns
    queueing, and a call on another stream waits for the previous one."""
    import torch.distributed as dist
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        spec = gpu_cases.RING_ONE_RANK
        pkg = attn.load(os.path.join(PKGS, spec["name"]))
        pkg.join()
        gen = torch.Generator().manual_seed(5)
        H, L, D = spec["heads"], spec["seq_len"], spec["head_dim"]
        inputs = [tuple(pkg.shard(torch.randn(1, H, L, D, generator=gen).to("cuda", torch.bfloat16))
                        for _ in range(3)) for _ in range(3)]
        alone = [pkg.run_rank(*x).clone() for x in inputs]
        whole, _ = reference.attention(*(pkg.unshard([t]) for t in inputs[0]), spec["pattern"])
        got = pkg.unshard([alone[0]]).double()
        err = ((got - whole).norm() / whole.norm().clamp_min(1e-30)).item()
        assert err < TOL["bf16"], f"relative error {err:.2e} against the reference"
        _same_outputs_on_streams_and_threads(lambda x: pkg.run_rank(*x, wait=False), inputs,
                                             alone, streams=3, rounds=6, thread_rounds=4)
    finally:
        if created:
            dist.destroy_process_group()


def test_a_call_in_another_context_is_refused():
    """Kernels run only in the CUDA context their package was loaded in: a
    call made while another context is current (here a second context of
    the same GPU) is refused with an error that says to load the package
    once per GPU and context, before anything is launched."""
    import ctypes
    pkg = attn.load(os.path.join(PKGS, "strided"))
    case = next(c for c in gpu_cases.CASES if c["name"] == "strided")
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, 64, D, device="cuda").to(DTYPES[case["dtype"]])
    k = torch.randn(B, Hkv, 64, D, device="cuda").to(q.dtype)
    t = pkg._torch_args(q, k, k, None, False, None)
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, torch.cuda.current_device()) == 0
    try:
        lib = attn._runtime()
        p = t["ptrs"]
        rc = lib.attn_package_run_keys(pkg._handle, *p[:4], t["bias"], t["ids"], *p[4:], None)
        message = lib.attn_last_error().decode()
    finally:
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        cuda.cuCtxDestroy_v2(ctx)
    assert rc != 0
    assert "was loaded on GPU" in message and "in another CUDA context of that GPU" in message
    assert "load the package once per GPU" in message


def test_wrong_tensors_are_named_before_and_after_a_kept_layout():
    """A package call on wrong tensors raises AttnError naming the tensor
    and what is wrong (a host tensor, another device's, another dtype, not
    a tensor), both on a fresh package and after a good call of the same
    shapes has kept its layout: the kept layouts never skip a check."""
    import numpy as np
    case = next(c for c in gpu_cases.CASES if c["name"] == "strided")
    dt = DTYPES[case["dtype"]]
    q, k, v = _random_qkv(case, 100, torch.Generator().manual_seed(3))
    for warm in (False, True):
        pkg = attn.load(os.path.join(PKGS, "strided"))
        if warm:
            pkg(q, k, v)
        with pytest.raises(attn.AttnError, match=r"q: on cpu; package strided targets sm_\w+ "
                                                 r"and takes CUDA tensors"):
            pkg(q.cpu(), k, v)
        with pytest.raises(attn.AttnError, match=r"k: on cpu; package strided"):
            pkg(q, k.cpu(), v)
        with pytest.raises(attn.AttnError, match=f"v: dtype torch.float32, the package "
                                                 f"expects {dt}"):
            pkg(q, k, v.float())
        with pytest.raises(attn.AttnError, match=r"k: expected a torch.Tensor, got ndarray"):
            pkg(q, np.zeros(k.shape, np.float32), v)
        with pytest.raises(attn.AttnError, match=r"out: dtype torch.float16"):
            pkg(q, k, v, out=torch.empty(q.shape, device="cuda", dtype=torch.float16))
        if torch.cuda.device_count() > 1:
            with pytest.raises(attn.AttnError, match=r"k: on cuda:1, expected cuda:0 "
                                                     r"\(q's device\)"):
                pkg(q, k.to("cuda:1"), v)


def test_calls_that_reuse_a_layout_read_their_own_tensors():
    """A package call keeps the C tensors it built for a layout and, on a
    later call with that layout, sets only their data pointers
    (Package._call_torch; attn.sparse layers alike). Calls alternating
    between layouts (contiguous [B, H, L, D], the [B, H, L, D] view of
    [B, L, H, D] tensors, two lengths) and between tensors each give the
    bits of the same call made through the uncached path, into a poisoned
    out, as do calls with lengths and the LSE; one of them matches the
    float64 reference. A tensor of a layout
    seen before at a misaligned address is still refused, and a layer
    called again on new inputs gives what a fresh layer gives."""
    from attn import sparse
    case = next(c for c in gpu_cases.CASES if c["name"] == "strided")
    pkg = attn.load(os.path.join(PKGS, "strided"))
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    gen = torch.Generator().manual_seed(41)

    def contiguous(L):
        return [torch.randn(B, h, L, D, generator=gen).to("cuda", dt) for h in (H, Hkv, Hkv)]

    def blhd(L):
        return [torch.randn(B, L, h, D, generator=gen).to("cuda", dt).transpose(1, 2)
                for h in (H, Hkv, Hkv)]

    def poisoned(q):
        return torch.full(q.shape, float("nan"), device="cuda", dtype=dt)

    def uncached(q, k, v):
        out = poisoned(q)
        t = pkg._torch_args(q, k, v, None, False, out)
        pkg._launch(q.device.index, t["ptrs"])
        return out

    inputs = [contiguous(300), blhd(300), contiguous(300), contiguous(700), blhd(300)]
    for _ in range(2):
        for q, k, v in inputs:
            out = poisoned(q)
            assert pkg(q, k, v, out=out) is out
            want = uncached(q, k, v)
            assert torch.equal(out, want)
            assert torch.equal(pkg(q, k, v), want)
    assert len(pkg._plans) >= 3  # the calls above went through kept layouts
    q, k, v = inputs[1]
    ref, _ = reference.attention(q, k, v, case["pattern"], None)
    assert (pkg(q, k, v).double() - ref).abs().max().item() < TOL[case["dtype"]]

    tok = next(c for c in gpu_cases.CASES if c["name"] == "strided_tokenized")
    pkg_tok = attn.load(os.path.join(PKGS, "strided_tokenized"))
    for i in range(6):
        x = _random_qkv(tok, 200, gen)
        lengths = _lengths(tok["batch"], 200, gen).cuda()
        t = pkg_tok._torch_args(*x, lengths, True, poisoned(x[0]))
        pkg_tok._launch(x[0].device.index, t["ptrs"])
        if i % 2:
            assert torch.equal(pkg_tok(*x, lengths=lengths), t["out"])
        else:
            out, lse = pkg_tok(*x, lengths=lengths, return_lse=True)
            assert torch.equal(out, t["out"]) and torch.equal(lse, t["lse"])
        # lengths the call converts (int64, on the host): not kept, same result
        assert torch.equal(pkg_tok(*x, lengths=lengths.long().cpu()), t["out"])
    assert len(pkg_tok._plans) == 2

    q, k, v = inputs[0]
    base = torch.zeros(q.numel() + 8, device="cuda", dtype=dt)
    shifted = base[1:1 + q.numel()].view(q.shape)  # q's layout, 2 bytes off
    assert shifted.stride() == q.stride() and shifted.data_ptr() % 16
    with pytest.raises(attn.AttnError, match="16-byte aligned"):
        pkg(shifted, k, v)

    B, E, Hs, mode, ctx, dtype = gpu_cases.SPARSE[0]
    layer = sparse.SparseAttention(Hs, mode, ctx, package_dir=PKGS)
    for seed in (1, 2):
        x = torch.randn(B, 500, 3 * E, generator=gen).to("cuda", DTYPES[dtype])
        qkv = x.split(E, dim=-1)
        got = layer(*qkv)
        fresh = sparse.SparseAttention(Hs, mode, ctx, package_dir=PKGS)
        assert torch.equal(got, fresh(*qkv))
    assert len(layer._calls) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ["strided", "causal_f16_gqa"])
def test_one_package_on_two_gpus(name):
    """A Python package loaded on one GPU runs on tensors of another: it
    loads itself there on first use, and gives the same output and LSE on
    both GPUs."""
    case = next(c for c in gpu_cases.CASES if c["name"] == name)
    with torch.cuda.device(0):
        pkg = attn.load(os.path.join(PKGS, name))
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    gen = torch.Generator().manual_seed(29)
    x = [torch.randn(B, h, 1000, D, generator=gen).to(dt) for h in (H, Hkv, Hkv)]
    out0, lse0 = pkg(*(t.to("cuda:0") for t in x), return_lse=True)
    out1, lse1 = pkg(*(t.to("cuda:1") for t in x), return_lse=True)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    assert out1.device == torch.device("cuda:1")
    assert torch.equal(out0.cpu(), out1.cpu()) and torch.equal(lse0.cpu(), lse1.cpu())
    ref, _ = reference.attention(*(t.to("cuda:0") for t in x), case["pattern"], None)
    assert (out1.to("cuda:0").double() - ref).abs().max().item() < TOL[case["dtype"]]


@pytest.mark.parametrize("case", gpu_cases.SPARSE,
                         ids=lambda c: f"{c[3]}{c[4] or ''}_b{c[0]}_e{c[1]}_h{c[2]}_{c[5]}")
def test_sparse_api_on_cuda_tensors(case):
    """attn.sparse (the seeds' [B, L, E] API) on q, k, v sliced from one fused
    projection [B, L, 3E] (read in place), against the original's formulas in
    float64, with the allocator's next output block poisoned; the same call on
    contiguous copies gives the same bits, and one package serves every length."""
    from attn import sparse
    import seed_reference
    B, E, H, mode, ctx, dtype = case
    dt = DTYPES[dtype]
    layer = sparse.SparseAttention(H, mode, ctx, package_dir=PKGS)
    for L in (1, 700, 1500):
        gen = torch.Generator().manual_seed(hash((case, L)) & 0xFFFF)
        qkv = torch.randn(B, L, 3 * E, generator=gen).to("cuda", dt)
        q, k, v = qkv.split(E, dim=-1)
        poison = torch.full((B * L * E,), float("nan"), device="cuda", dtype=dt)
        del poison  # the output [B, H, L, D] gets this block from the allocator
        out = layer(q, k, v)
        torch.cuda.synchronize()
        assert out.shape == (B, L, E) and out.dtype == dt
        assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
        ref = torch.from_numpy(seed_reference.attention_impl(
            *(x.double().cpu().numpy() for x in (q, k, v)), H, mode, ctx))
        err = ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < TOL[dtype], f"L = {L}: relative error {err:.2e}"
        assert torch.equal(out, layer(q.contiguous(), k.contiguous(), v.contiguous()))
    assert len(layer._packages) == 1


def test_sparse_layer_copies_what_it_cannot_read_in_place_and_compiles():
    """The layer's fast path reads [B, L, E] inputs through C tensors of
    their head views; where the runtime's layout rules do not hold (q's rows
    E + 1 elements apart at a 2-byte offset, v's E not contiguous) it copies
    first, and the result is the same bits, as it is for inputs read in
    place with other row strides. Under torch.compile
    (fullgraph=True) the layer becomes the attn::run operator in the graph,
    with the same output."""
    from attn import sparse
    B, E, H, mode, ctx, dtype = gpu_cases.SPARSE[0]
    dt = DTYPES[dtype]
    layer = sparse.SparseAttention(H, mode, ctx, package_dir=PKGS)
    gen = torch.Generator().manual_seed(7)
    L = 900
    q, k, v = torch.randn(3, B, L, E, generator=gen).to("cuda", dt).unbind(0)
    want = layer(q, k, v)
    wide = torch.zeros(B, L, E + 1, device="cuda", dtype=dt)
    wide[..., 1:] = q
    assert wide[..., 1:].data_ptr() % 16 and wide.stride(1) % 8
    v_columns = v.transpose(1, 2).contiguous().transpose(1, 2)  # E's stride L
    assert torch.equal(layer(wide[..., 1:], k, v_columns), want)
    kv = torch.stack([k, v], dim=2)  # [B, L, 2, E]: read in place, rows 2E apart
    assert torch.equal(layer(q, kv[:, :, 0], kv[:, :, 1]), want)
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    got = torch.compile(layer, fullgraph=True, backend=recording)(q, k, v)
    assert "attn.run" in [str(n.target) for g in graphs for n in g.graph.nodes]
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec", gpu_cases.RING_RANKS + gpu_cases.RANDOM_RING_CASES,
                         ids=lambda s: s["name"])
def test_ring_ranks_on_one_gpu_match_reference(spec):
    """Every rank of a GPU ring package, run as threads on this one GPU (the
    in-process transport copies each step's rows device to device), gives
    the float64 reference's output and LSE on fresh inputs rounded to the
    package's dtype (outputs start as NaN): the schedule, the GPU executor's
    pieces and receive slots and the update kernels, cross attention
    included. Each rank sends exactly the rows its plan lists."""
    gen = torch.Generator().manual_seed(zlib.crc32(spec["name"].encode()))
    B, H, Hkv, D = spec["batch"], spec["heads"], spec["kv_heads"], spec["head_dim"]
    Lq = spec.get("seq_len", spec.get("q_len"))
    Lk = spec.get("seq_len", spec.get("kv_len"))
    dtype = DTYPES[spec["dtype"]]
    q, k, v = (torch.randn(B, h, n, D, generator=gen).to(dtype).float()
               for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    lengths = (np.array([Lk // 3, Lk], dtype=np.int32)
               if "tokenized" in str(spec["pattern"]) else None)
    pkg = attn.load(os.path.join(PKGS, spec["name"]))
    out, lse = pkg.run_ranks(q.numpy(), k.numpy(), v.numpy(), lengths=lengths, return_lse=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    ref, ref_lse = reference.attention(q.cuda(), k.cuda(), v.cuda(), spec["pattern"],
                                       None if lengths is None else torch.from_numpy(lengths))
    got = torch.from_numpy(out).cuda().double()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[spec["dtype"]], f"relative error {err:.2e}"
    got_lse = torch.from_numpy(lse).cuda().double()
    assert torch.equal(torch.isinf(got_lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (got_lse[finite] - ref_lse[finite]).abs().max().item() < 2e-2
    rows = [r["rows_sent"] for r in pkg.manifest["ring"]["schedule"]]
    assert pkg.bytes_sent == [n * B * D * 2 * 2 for n in rows]


@pytest.mark.parametrize("L", [4096, 4097, 5000])
def test_head_dim64_kernels_either_side_of_the_short_sequence_bound(L):
    """A head-dim-64 causal package carries two kernels for its component:
    the two-blocks-an-SM one for calls of up to 4096 query rows and the
    warp-specialised one above (the manifest's rows_at_most / rows_above).
    Either side of the bound, every row is written (the output poisoned
    first) and sampled rows of every batch and head match the float64
    reference, lse included."""
    case = next(c for c in gpu_cases.CASES if c["name"] == "causal_d64")
    with open(os.path.join(PKGS, case["name"], "manifest.json")) as f:
        ranges = {k["name"]: (k.get("rows_at_most"), k.get("rows_above"))
                  for k in json.load(f)["kernels"]}
    assert ranges == {"component_0": (None, 4096), "component_0_short": (4096, None)}
    gen = torch.Generator().manual_seed(zlib.crc32(f"d64-bound-{L}".encode()))
    q, k, v = _random_qkv(case, L, gen)
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    out, lse = pkg(q, k, v, return_lse=True, out=torch.full_like(q, float("nan")))
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "rows no kernel wrote (NaN left in out)"
    scale = 1 / math.sqrt(case["head_dim"])
    group = case["heads"] // case["kv_heads"]
    for b in range(case["batch"]):
        for h in range(case["heads"]):
            for p in (0, 1, 63, 64, 191, 192, 4095, L // 2, L - 2, L - 1):
                keys = slice(0, p + 1)
                s = (k[b, h // group, keys].double() @ q[b, h, p].double()) * scale
                w = torch.softmax(s, dim=0)
                want = w @ v[b, h // group, keys].double()
                got = out[b, h, p].double()
                err = ((got - want).norm() / want.norm()).item()
                assert err < TOL[case["dtype"]], f"b {b}, h {h}, row {p}: {err:.2e}"
                want_lse = torch.logsumexp(s, dim=0).item()
                assert abs(float(lse[b, h, p]) - want_lse) < 2e-2, f"b {b}, h {h}, row {p}: lse"
