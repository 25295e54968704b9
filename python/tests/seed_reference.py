"""The seeds' sparse attention written out as in Child et al.'s code
(get_attn_mask, attention_impl), in float64 NumPy: the oracle for
attn.sparse in test_sparse.py (CPU) and test_gpu.py (CUDA tensors)."""

import numpy as np


def attn_mask(n, attn_mode, local_attn_ctx=None):
    """get_attn_mask of the original, as booleans [n, n] (query, key)."""
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    if attn_mode == "all":
        return k <= q                                    # band_part(ones, -1, 0)
    if attn_mode == "local":
        ctx = min(n - 1, local_attn_ctx - 1)
        return (k <= q) & (q - k <= ctx)                 # band_part(ones, ctx, 0)
    if attn_mode == "strided":
        return (q >= k) & ((q - k) % local_attn_ctx == 0)
    raise ValueError(attn_mode)


def attention_impl(q, k, v, heads, attn_mode, local_attn_ctx=None):
    """The original attention_impl on [B, L, E] arrays, in float64."""
    B, L, E = q.shape
    D = E // heads
    split = lambda x: np.asarray(x, np.float64).reshape(B, L, heads, D).transpose(0, 2, 1, 3)
    mask = attn_mask(L, attn_mode, local_attn_ctx).astype(np.float64)
    w = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(D)
    w = w * mask + -1e9 * (1 - mask)
    w = np.exp(w - w.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return (w @ split(v)).transpose(0, 2, 1, 3).reshape(B, L, E)
