"""Tokenized attention (attn.TokenizedAttention): the deduplicated form —
attention over each sequence's unique ids with a log(count) key bias — must
equal the naive form over every position and a float64 reference, for
Zipf-like duplication, all-equal and all-distinct tokens, empty and full
sequences; target attention (candidates as queries, one call) must equal one
naive attention per candidate. Outputs are NaN-poisoned by the package."""

import numpy as np
import pytest

import attn
from attn.tokenized import TableEmbedding

B, L, H, HKV, D, VOCAB = 3, 40, 4, 2, 16, 50


def tables(seed):
    rng = np.random.default_rng(seed)
    return TableEmbedding(rng.standard_normal((VOCAB, H, D)).astype(np.float32),
                          rng.standard_normal((VOCAB, HKV, D)).astype(np.float32),
                          rng.standard_normal((VOCAB, HKV, D)).astype(np.float32))


def reference(emb, tokens, lengths, query_ids=None):
    """float64 attention of each query over the sequence's first lengths[b]
    positions (every duplicate a key of its own)."""
    out = np.zeros((B, H, L if query_ids is None else query_ids.shape[1], D))
    lse = np.full(out.shape[:3], -np.inf)
    for b in range(B):
        n = lengths[b]
        qids = tokens[b, :n] if query_ids is None else query_ids[b]
        if n == 0 or len(qids) == 0:
            continue
        q = emb.q_table[qids].astype(np.float64)                   # [Q, H, D]
        k = np.repeat(emb.k_table[tokens[b, :n]], H // HKV, axis=1)  # [n, H, D]
        v = np.repeat(emb.v_table[tokens[b, :n]], H // HKV, axis=1)
        s = np.einsum("qhd,nhd->hqn", q, k) / np.sqrt(D)
        m = s.max(-1, keepdims=True)
        w = np.exp(s - m)
        out[b, :, :len(qids)] = np.einsum("hqn,nhd->hqd", w / w.sum(-1, keepdims=True), v)
        lse[b, :, :len(qids)] = (m[..., 0] + np.log(w.sum(-1)))
    return out, lse


def token_sets(seed):
    rng = np.random.default_rng(seed)
    zipf = np.minimum(rng.zipf(1.3, (B, L)) - 1, VOCAB - 1)
    yield "zipf", zipf, np.array([L, 17, 1])
    yield "all_equal", np.full((B, L), 7), np.array([L, 5, 0])
    distinct = np.stack([rng.permutation(VOCAB)[:L] for _ in range(B)])
    yield "all_distinct", distinct, np.array([L, L - 3, 2])


@pytest.fixture(scope="module")
def layer():
    emb = tables(1)
    return emb, attn.TokenizedAttention(B, L, 1, emb), attn.TokenizedAttention(B, L, 1, emb, dedup=False)


@pytest.mark.parametrize("case", ["zipf", "all_equal", "all_distinct"])
def test_dedup_equals_naive_and_reference(layer, case):
    emb, dedup, naive = layer
    tokens, lengths = {n: (t, l) for n, t, l in token_sets(5)}[case]
    out, lse = dedup.forward(tokens, lengths, return_lse=True)
    out_n, lse_n = naive.forward(tokens, lengths, return_lse=True)
    want, want_lse = reference(emb, tokens, lengths)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.abs(out - out_n).max() < 1e-5
    assert np.abs(out - want).max() < 1e-5
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    fin = np.isfinite(want_lse)
    assert np.abs(lse[fin] - want_lse[fin]).max() < 1e-4
    assert np.abs(lse_n[fin] - lse[fin]).max() < 1e-4
    # Padding rows: 0 and -inf; the work is over the unique ids only.
    for b in range(B):
        assert not out[b, :, lengths[b]:].any()
    stats = dedup.last_stats
    assert stats["positions"] == lengths.sum()
    assert stats["unique"] == sum(len(np.unique(tokens[b, :lengths[b]])) for b in range(B))
    if case == "all_equal":
        assert stats["unique"] == 2  # one id per non-empty sequence


def test_target_attention_equals_one_call_per_candidate(layer):
    emb, dedup, naive = layer
    rng = np.random.default_rng(9)
    tokens = np.minimum(rng.zipf(1.2, (B, L)) - 1, VOCAB - 1)
    lengths = np.array([L, 23, 0])
    cands = rng.integers(0, VOCAB, (B, 6))
    out, lse = dedup.target_forward(cands, tokens, lengths, return_lse=True)
    assert out.shape == (B, H, 6, D)
    want, want_lse = reference(emb, tokens, lengths, query_ids=cands)
    assert np.abs(out - want).max() < 1e-5
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    # The naive form: one attention per candidate over every position.
    for c in range(cands.shape[1]):
        one = naive.target_forward(cands[:, c:c + 1], tokens, lengths)
        assert np.abs(one[:, :, 0] - out[:, :, c]).max() < 1e-5
    assert not out[2].any()  # an empty behaviour sequence attends nothing


def test_torch_cpu_tensors(layer):
    torch = pytest.importorskip("torch")
    emb, dedup, _ = layer
    tokens, lengths = next(iter(token_sets(3)))[1:]
    out = dedup(torch.from_numpy(tokens), torch.from_numpy(lengths))
    assert isinstance(out, torch.Tensor)
    assert np.abs(out.numpy() - dedup(tokens, lengths)).max() == 0


def test_cpu_embeddings_that_require_grad_are_refused():
    """The cpu target runs on NumPy arrays: embeddings that require grad
    (with grad mode on) raise before any package runs, instead of losing
    their gradients."""
    torch = pytest.importorskip("torch")
    emb = tables(1)
    tokens, lengths = next(iter(token_sets(4)))[1:]
    params = [torch.from_numpy(t).requires_grad_() for t in
              (emb.q_table, emb.k_table, emb.v_table)]
    fn = lambda ids: tuple(t[torch.as_tensor(ids)] for t in params)
    layer = attn.TokenizedAttention(B, L, 1, fn, heads=H, kv_heads=HKV, head_dim=D)
    with pytest.raises(attn.AttnError, match="computes gradients on CUDA tensors only"):
        layer(tokens, lengths)
    table_layer = attn.TokenizedAttention(B, L, 1, TableEmbedding(*params))
    with pytest.raises(attn.AttnError, match="embedding tables that require grad"):
        table_layer(tokens, lengths)


def test_errors(layer):
    emb, dedup, _ = layer
    tokens = np.zeros((B, L), np.int64)
    with pytest.raises(attn.AttnError, match="shape"):
        dedup(tokens[:, :5], np.array([1, 1, 1]))
    with pytest.raises(attn.AttnError, match=r"lengths\[1\] = 41 is outside \[0, 40\]"):
        dedup(tokens, np.array([1, 41, 1]))
    with pytest.raises(attn.AttnError, match=r"token ids must lie in \[0, 50\)"):
        dedup(tokens + 60, np.array([1, 1, 1]))
    with pytest.raises(attn.AttnError, match="integer"):
        dedup(tokens.astype(np.float32), np.array([1, 1, 1]))
    with pytest.raises(attn.AttnError, match="nranks = 2 needs group="):
        attn.TokenizedAttention(B, L, 2, emb)
    with pytest.raises(attn.AttnError, match="key_bias \\[B, Lk\\] is required"):
        q = np.zeros((B, H, 3, D), np.float32)
        k = np.zeros((1, HKV, 3, D), np.float32)
        dedup._package(attn.tokenized._Ops(tokens))(q, k, k, key_ids=np.zeros((B, 3), np.int32))


def keyed_reference(q, kt, vt, ids, bias):
    """float64 attention of q [B,H,Lq,D] over rows ids[b] of the tables
    [1,Hkv,V,D] with the score bias [B,Lk]."""
    k = np.repeat(kt[0][:, ids].transpose(1, 0, 2, 3), H // HKV, 1).astype(np.float64)
    v = np.repeat(vt[0][:, ids].transpose(1, 0, 2, 3), H // HKV, 1).astype(np.float64)
    s = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(D) + bias[:, None, None, :]
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    den = p.sum(-1, keepdims=True)
    out = np.where(den > 0, np.einsum("bhij,bhjd->bhid", p, v) / np.where(den > 0, den, 1), 0)
    lse = np.where(den[..., 0] > 0, np.log(np.where(den > 0, den, 1))[..., 0] + m[..., 0], -np.inf)
    return out, lse


def test_key_ids_package_reads_tables_at_ids():
    """A "key_ids" package: K/V rows read from [1,Hkv,V,D] tables at the ids,
    with the key bias; a row whose keys are all -inf gives 0 and -inf; ids
    outside the table and missing ids are refused."""
    rng = np.random.default_rng(11)
    pkg = attn.compile({"name": "keyed", "batch": B, "heads": H, "kv_heads": HKV, "head_dim": D,
                        "key_bias": True, "key_ids": True, "pattern": {"full": {}}})
    assert pkg.uses_key_ids and pkg.uses_key_bias
    q = rng.standard_normal((B, H, 7, D)).astype(np.float32)
    kt = rng.standard_normal((1, HKV, VOCAB, D)).astype(np.float32)
    vt = rng.standard_normal((1, HKV, VOCAB, D)).astype(np.float32)
    ids = rng.integers(0, VOCAB, (B, 13)).astype(np.int32)
    bias = rng.standard_normal((B, 13)).astype(np.float32)
    bias[1, 4:] = -np.inf
    bias[2, :] = -np.inf
    out, lse = pkg(q, kt, vt, key_bias=bias, key_ids=ids, return_lse=True)
    want, want_lse = keyed_reference(q, kt, vt, ids, bias)
    assert np.abs(out - want).max() < 1e-5
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse)) and np.isinf(lse[2]).all()
    fin = np.isfinite(want_lse)
    assert np.abs(lse[fin] - want_lse[fin]).max() < 1e-4
    bad = ids.copy()
    bad[1, 2] = VOCAB
    with pytest.raises(attn.AttnError, match=r"key_ids\[1, 2\] = 50 is outside the table rows"):
        pkg(q, kt, vt, key_bias=bias, key_ids=bad)
    with pytest.raises(attn.AttnError, match="key_ids \\[B, Lk\\] \\(rows of the k/v tables\\) are required"):
        pkg(q, kt, vt, key_bias=bias)


def test_embedding_function_not_tables(layer):
    """Any function of the id: embeddings of the batch's unique ids become
    the tables of the call."""
    emb, dedup, _ = layer
    calls = []

    def fn(ids):
        calls.append(len(ids))
        return emb(ids)

    layer_fn = attn.TokenizedAttention(B, L, 1, fn)
    tokens, lengths = next(iter(token_sets(4)))[1:]
    calls.clear()
    out, lse = layer_fn(tokens, lengths, return_lse=True)
    want, _ = reference(emb, tokens, lengths)
    assert np.abs(out - want).max() < 1e-5
    # One call, on the batch's unique ids only.
    assert calls == [len(np.unique(np.concatenate([tokens[b, :lengths[b]] for b in range(B)])))]
    cands = np.random.default_rng(2).integers(0, VOCAB, (B, 4))
    t_out = layer_fn.target_forward(cands, tokens, lengths)
    assert np.abs(t_out - reference(emb, tokens, lengths, query_ids=cands)[0]).max() < 1e-5


def run_ranks(nranks, emb, batches, cands=None):
    """Every rank's forward (or target_forward) in its own thread over an
    in-process group; each rank's embedding function serves only its ids."""
    import threading
    group = attn.InProcessGroup(nranks, timeout=30)
    results, errors, stats = [None] * nranks, [], [None] * nranks

    def rank_main(r):
        def shard(ids):
            ids = np.asarray(ids)
            assert (ids % nranks == r).all(), "asked for another rank's ids"
            return emb(ids)
        try:
            layer = attn.TokenizedAttention(B, L, nranks, shard, group=group.member(r),
                                            heads=H, kv_heads=HKV, head_dim=D)
            tokens, lengths = batches[r]
            if cands is None:
                results[r] = layer(tokens, lengths, return_lse=True)
            else:
                results[r] = layer.target_forward(cands[r], tokens, lengths)
            stats[r] = dict(layer.last_stats)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"rank {r}: {e}")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(nranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results, stats


@pytest.mark.parametrize("nranks", [2, 3])
def test_distributed_exchange_equals_single_rank(layer, nranks):
    """Tables sharded by id (id % nranks), each rank's batch different: the
    rows fetched with the all-to-alls give the single-rank result, and the
    bytes received stay below fetching every position's rows."""
    emb, dedup, _ = layer
    rng = np.random.default_rng(20 + nranks)
    batches = [(np.minimum(rng.zipf(1.2, (B, L)) - 1, VOCAB - 1), np.array([L, 31, 6]))
               for _ in range(nranks)]
    results, stats = run_ranks(nranks, emb, batches)
    for r in range(nranks):
        want_out, want_lse = dedup(*batches[r], return_lse=True)
        assert np.abs(results[r][0] - want_out).max() < 1e-5
        assert np.array_equal(np.isinf(results[r][1]), np.isinf(want_lse))
        s = stats[r]
        assert s["remote_unique"] > 0
        assert 0 < s["bytes_received"] < s["per_position_bytes"], s
    cands = [rng.integers(0, VOCAB, (B, 5)) for _ in range(nranks)]
    t_results, _ = run_ranks(nranks, emb, batches, cands)
    for r in range(nranks):
        want = dedup.target_forward(cands[r], *batches[r])
        assert np.abs(t_results[r] - want).max() < 1e-5


def test_dead_peer_fails_instead_of_hanging(layer):
    """A rank that never joins the exchange makes the other fail after the
    group's timeout with a message naming the wait."""
    emb, _, _ = layer
    group = attn.InProcessGroup(2, timeout=1)
    one = attn.TokenizedAttention(B, L, 2, emb, group=group.member(0))
    with pytest.raises(attn.AttnError, match="timed out"):
        one(np.zeros((B, L), np.int64) + 1, np.array([3, 3, 3]))
