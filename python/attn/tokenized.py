"""Tokenized attention (the RFC in the project's seeds): attention over token
ids whose query, key and value come from an embedding of the id alone.

When K and V depend only on the id, the duplicates of a token in a sequence
are one key attended `count` times:

    sum_j exp(s_ij) v_j  =  sum_u count_u exp(s_iu) v_u  =  sum_u exp(s_iu + log count_u) v_u

so attention over the unique ids of each sequence, with the score bias
log(count_u), is exact (docs/Tokenized.md). Queries that are tokens give the
same output for every duplicate, so they are computed once per unique id too
and scattered back to the positions. Target attention (many candidate items
of one user against the user's behaviour sequence) takes the candidates as
the queries of one call per batch, not one call per candidate.

The attention itself runs in a compiled attn package (`"key_bias": true`,
dynamic lengths) on the CPU target; unique ids and counts are computed per
sequence with NumPy.
"""

import numpy as np

from . import AttnError, compile as _compile

__all__ = ["TokenizedAttention", "TableEmbedding"]


class TableEmbedding:
    """An embedding function given as tables: ids [N] -> (q, k, v), rows of
    q_table [vocab, H, D] and k_table, v_table [vocab, Hkv, D]."""

    def __init__(self, q_table, k_table, v_table):
        self.q_table = np.asarray(q_table, dtype=np.float32)
        self.k_table = np.asarray(k_table, dtype=np.float32)
        self.v_table = np.asarray(v_table, dtype=np.float32)
        if self.k_table.shape != self.v_table.shape:
            raise AttnError(f"k_table {self.k_table.shape} and v_table "
                            f"{self.v_table.shape} differ")
        if (self.q_table.ndim != 3 or self.k_table.ndim != 3
                or self.q_table.shape[0] != self.k_table.shape[0]
                or self.q_table.shape[2] != self.k_table.shape[2]):
            raise AttnError("tables must be [vocab, heads, head_dim] with one vocab and head_dim, "
                            f"got q {self.q_table.shape}, k {self.k_table.shape}")
        self.vocab, self.heads, self.head_dim = self.q_table.shape
        self.kv_heads = self.k_table.shape[1]

    def __call__(self, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise AttnError(f"token ids must lie in [0, {self.vocab}), got "
                            f"[{ids.min()}, {ids.max()}]")
        return self.q_table[ids], self.k_table[ids], self.v_table[ids]


def _to_numpy(x, name, dtype):
    if hasattr(x, "detach"):  # a PyTorch tensor
        if x.device.type != "cpu":
            raise AttnError(f"{name}: TokenizedAttention runs on the cpu target so far; "
                            f"got a tensor on {x.device}")
        x = x.detach().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise AttnError(f"{name}: expected integer ids/lengths, got {x.dtype}")
    return x.astype(dtype)


def _like(result, tokens):
    """Results as PyTorch tensors when the tokens were one."""
    if not hasattr(tokens, "detach"):
        return result
    import torch
    if isinstance(result, tuple):
        return tuple(torch.from_numpy(r) for r in result)
    return torch.from_numpy(result)


class TokenizedAttention:
    """Attention over token sequences: tokens [B, L] int ids, lengths [B].

    embedding_fn(ids [N]) -> (q [N, H, D], k [N, Hkv, D], v [N, Hkv, D]) as
    float32 (a TableEmbedding, or any function of the id alone). forward()
    returns out [B, H, L, D] (0 beyond lengths) and, with return_lse, the LSE
    [B, H, L] (-inf beyond lengths): full attention over the first
    lengths[b] tokens, computed over the unique ids with log(count) biases
    (dedup=True) or over every position (dedup=False, the naive form).
    target_forward() is target attention. nranks > 1 (embedding tables
    sharded by id across ranks) is not available yet.
    """

    def __init__(self, batch_size, sequence_length, nranks, embedding_fn, dedup=True):
        if nranks != 1:
            raise AttnError(f"nranks = {nranks}: distributed tokenized attention (tables sharded "
                            "by id) is not available yet; use nranks = 1")
        if batch_size < 1 or sequence_length < 1:
            raise AttnError(f"batch_size and sequence_length must be >= 1, got "
                            f"{batch_size}, {sequence_length}")
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.embedding_fn, self.dedup = embedding_fn, dedup
        probe = [np.asarray(t, dtype=np.float32) for t in embedding_fn(np.zeros(1, np.int64))]
        if len(probe) != 3 or probe[0].ndim != 3 or probe[1].shape != probe[2].shape:
            raise AttnError("embedding_fn(ids) must return (q [N, H, D], k [N, Hkv, D], "
                            "v [N, Hkv, D])")
        _, self.heads, self.head_dim = probe[0].shape
        self.kv_heads = probe[1].shape[1]
        if self.heads % self.kv_heads:
            raise AttnError(f"kv heads {self.kv_heads} do not divide heads {self.heads}")
        # One package for every call: dynamic query and key counts.
        self._biased = _compile({"name": "tokenized_dedup", "batch": batch_size,
                                 "heads": self.heads, "kv_heads": self.kv_heads,
                                 "head_dim": self.head_dim, "key_bias": True,
                                 "pattern": {"full": {}}})
        self._naive = None
        self.last_stats = {}

    # -- helpers ---------------------------------------------------------

    def _check(self, tokens, lengths):
        tokens = _to_numpy(tokens, "tokens", np.int64)
        lengths = _to_numpy(lengths, "lengths", np.int64)
        B, L = self.batch_size, self.sequence_length
        if tokens.shape != (B, L):
            raise AttnError(f"tokens: shape {tokens.shape}, expected (batch_size, "
                            f"sequence_length) = ({B}, {L})")
        if lengths.shape != (B,):
            raise AttnError(f"lengths: shape {lengths.shape}, expected ({B},)")
        bad = np.nonzero((lengths < 0) | (lengths > L))[0]
        if bad.size:
            raise AttnError(f"lengths[{bad[0]}] = {lengths[bad[0]]} is outside [0, {L}]")
        return tokens, lengths

    def _embed(self, ids):
        q, k, v = (np.asarray(t, dtype=np.float32) for t in self.embedding_fn(ids))
        return q, k, v

    def _unique_keys(self, tokens, lengths):
        """Per sequence: unique ids, inverse map and counts; then the padded
        K/V of the unique ids [B, Hkv, U, D] and the bias [B, U]."""
        B = self.batch_size
        per = [np.unique(tokens[b, :lengths[b]], return_inverse=True, return_counts=True)
               for b in range(B)]
        U = max(1, max(len(u) for u, _, _ in per))
        ids = np.zeros((B, U), np.int64)
        bias = np.full((B, U), -np.inf, np.float32)
        for b, (u, _, c) in enumerate(per):
            ids[b, :len(u)] = u
            bias[b, :len(u)] = np.log(c)
        q, k, v = self._embed(ids.reshape(-1))
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        to_bhud = lambda t, h: np.ascontiguousarray(t.reshape(B, U, h, D).transpose(0, 2, 1, 3))
        return per, U, to_bhud(q, H), to_bhud(k, Hkv), to_bhud(v, Hkv), bias

    # -- self-attention --------------------------------------------------

    def forward(self, tokens, lengths, return_lse=False):
        """Self-attention of each sequence's first lengths[b] tokens (NumPy
        arrays or CPU PyTorch tensors; results of the same kind)."""
        return _like(self._forward(*self._check(tokens, lengths), return_lse), tokens)

    def _forward(self, tokens, lengths, return_lse):
        if not self.dedup:
            return self._forward_naive(tokens, lengths, return_lse)
        B, L, H, D = self.batch_size, self.sequence_length, self.heads, self.head_dim
        per, U, q, k, v, bias = self._unique_keys(tokens, lengths)
        out_u, lse_u = self._biased(q, k, v, key_bias=bias, return_lse=True)
        out = np.zeros((B, H, L, D), np.float32)
        lse = np.full((B, H, L), -np.inf, np.float32)
        for b, (_, inverse, _) in enumerate(per):
            n = lengths[b]
            out[b, :, :n] = out_u[b][:, inverse]
            lse[b, :, :n] = lse_u[b][:, inverse]
        self.last_stats = {"positions": int(lengths.sum()), "unique": sum(len(u) for u, _, _ in per),
                           "padded_unique": U}
        return (out, lse) if return_lse else out

    __call__ = forward

    def _forward_naive(self, tokens, lengths, return_lse):
        """Every position's q/k/v materialised, tokenized pattern (the form
        the dedup path must equal)."""
        if self._naive is None:
            self._naive = _compile({"name": "tokenized_naive", "batch": self.batch_size,
                                    "heads": self.heads, "kv_heads": self.kv_heads,
                                    "head_dim": self.head_dim,
                                    "seq_len": self.sequence_length,
                                    "pattern": {"tokenized": {}}})
        B, L = self.batch_size, self.sequence_length
        q, k, v = self._embed(tokens.reshape(-1))
        to_bhld = lambda t: np.ascontiguousarray(t.reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3))
        return self._naive(to_bhld(q), to_bhld(k), to_bhld(v), lengths=lengths.astype(np.int32),
                           return_lse=return_lse)

    # -- target attention ------------------------------------------------

    def target_forward(self, candidates, tokens, lengths, return_lse=False):
        """Target attention: candidates [B, C] item ids attend to their
        user's behaviour sequence tokens[b, :lengths[b]]; returns
        out [B, H, C, D] (and LSE [B, H, C]). One attention call for all
        candidates of all users, over the unique behaviour ids."""
        like = tokens
        tokens, lengths = self._check(tokens, lengths)
        cand = _to_numpy(candidates, "candidates", np.int64)
        B = self.batch_size
        if cand.ndim != 2 or cand.shape[0] != B or cand.shape[1] < 1:
            raise AttnError(f"candidates: shape {cand.shape}, expected ({B}, C) with C >= 1")
        C, H, D = cand.shape[1], self.heads, self.head_dim
        if self.dedup:
            _, U, _, k, v, bias = self._unique_keys(tokens, lengths)
        else:  # every behaviour position as its own key
            U = self.sequence_length
            _, k, v = self._embed(tokens.reshape(-1))
            k = np.ascontiguousarray(k.reshape(B, U, -1, D).transpose(0, 2, 1, 3))
            v = np.ascontiguousarray(v.reshape(B, U, -1, D).transpose(0, 2, 1, 3))
            bias = np.where(np.arange(U)[None, :] < lengths[:, None], 0.0, -np.inf).astype(np.float32)
        q = self._embed(cand.reshape(-1))[0]
        q = np.ascontiguousarray(q.reshape(B, C, H, D).transpose(0, 2, 1, 3))
        return _like(self._biased(q, k, v, key_bias=bias, return_lse=return_lse), like)
