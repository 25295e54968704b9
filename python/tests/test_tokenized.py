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
    with pytest.raises(attn.AttnError, match="nranks = 2"):
        attn.TokenizedAttention(B, L, 2, emb)
    with pytest.raises(attn.AttnError, match="key_bias \\[B, Lk\\] is required"):
        q = np.zeros((B, H, 3, D), np.float32)
        k = np.zeros((B, HKV, 3, D), np.float32)
        dedup._biased(q, k, k)
