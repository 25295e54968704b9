"""Dense reference for checking backends: the multiplicity m(h, i, j) of a
spec's pattern (docs/Semantics.md) and attention in float64 built on it.

The multiplicity is NumPy (CI has no PyTorch); `attention` works on PyTorch
tensors (any device). Meant for test sizes: the mask is materialised as
[B, H, Lq, Lk].
"""

import math


def multiplicity(pattern, heads, q_len, kv_len, lengths=None):
    """m(h, i, j) as a NumPy float64 array [B or 1, H, Lq, Lk]."""
    import numpy as np

    i = np.arange(q_len).reshape(1, 1, -1, 1)
    j = np.arange(kv_len).reshape(1, 1, 1, -1)
    h = np.arange(heads).reshape(1, -1, 1, 1)
    p = i + (kv_len - q_len)

    def rec(pat):
        (kind, body), = pat.items()
        if kind == "full":
            return np.ones_like(p - j, dtype=bool)
        if kind == "causal":
            return j <= p
        if kind == "local":
            w = body["window"]
            if body.get("causal", True):
                return (p - w < j) & (j <= p)
            return np.abs(p - j) < w
        if kind == "strided":
            s, l = body["stride"], body.get("local", body["stride"])
            d = p - j
            return (d >= 0) & ((d < l) | (np.remainder(d, s) == 0))
        if kind == "dilated":
            w, r = body["segment"], body.get("rate", 1)
            o = np.remainder(h, r) if body.get("head_offset", False) else 0
            m = ((np.floor_divide(p, w) == np.floor_divide(j, w))
                 & (np.remainder(p, r) == o) & (np.remainder(j, r) == o))
            if body.get("causal", False):
                m = m & (j <= p)
            return m
        if kind == "tokenized":
            if lengths is None:
                raise ValueError("tokenized pattern needs lengths")
            n = np.asarray(lengths).reshape(-1, 1, 1, 1)
            return (i < n) & (j < n)
        members = [rec(x).astype(np.float64) for x in body]
        if kind == "sum":
            return sum(members)
        if kind == "union":
            return sum(members) > 0
        if kind == "intersect":
            out = members[0] > 0
            for x in members[1:]:
                out = out & (x > 0)
            return out
        raise ValueError(f"unknown pattern {kind}")

    m = rec(pattern).astype(np.float64)
    return np.broadcast_to(m, (m.shape[0], heads, q_len, kv_len))


def attention(q, k, v, pattern, lengths=None, scale=None):
    """Float64 attention with multiplicities. q [B,H,Lq,D], k/v [B,Hkv,Lk,D].

    Returns (out, lse); rows with no attended key give 0 and -inf.
    """
    import torch

    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    if lengths is not None and isinstance(lengths, torch.Tensor):
        lengths = lengths.cpu().numpy()
    m = torch.from_numpy(multiplicity(pattern, H, Lq, Lk, lengths).copy()).to(q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = torch.where(m > 0, s, torch.tensor(-math.inf, dtype=torch.float64, device=q.device))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = m * torch.exp(s - mx)
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ v) / torch.where(den > 0, den, torch.ones_like(den)),
                      torch.zeros_like(q[..., :1]).expand_as(q) * 0)
    lse = torch.where(den[..., 0] > 0, torch.log(den[..., 0].clamp_min(1e-300)) + mx[..., 0],
                      torch.full_like(den[..., 0], -math.inf))
    return out, lse
