"""The backward pass on the CPU target ("backward": true, docs/Backward.md):
dq, dk and dv against a NumPy float64 reference built on the pattern's
multiplicity, itself checked against finite differences of the float64
forward. Fresh random inputs per case; the gradients start NaN-poisoned."""

import os

import numpy as np
import pytest

import attn
from attn.reference import multiplicity


def forward64(q, k, v, m, scale, bias=None):
    """Float64 attention with multiplicity m [B|1, H, Lq, Lk]: (out, lse, P)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if bias is not None:
        s = s + bias.astype(np.float64)[:, None, None, :]
    s = np.where(m > 0, s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    w = m * np.exp(s - mx)
    den = w.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, w / np.where(den > 0, den, 1.0), 0.0)
    out = np.einsum("bhij,bhjd->bhid", p, v)
    lse = np.where(den[..., 0] > 0, mx[..., 0] + np.log(np.where(den[..., 0] > 0,
                                                                 den[..., 0], 1.0)), -np.inf)
    return out, lse, p


def backward64(q, k, v, m, g, scale, bias=None):
    """Float64 gradients of sum(out * g) with respect to q, k and v."""
    out, _, p = forward64(q, k, v, m, scale, bias)
    q64, k64, v64, g = (x.astype(np.float64) for x in (q, k, v, g))
    group = q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k64, group, axis=1), np.repeat(v64, group, axis=1)
    dv = np.einsum("bhij,bhid->bhjd", p, g)
    dp = np.einsum("bhid,bhjd->bhij", g, vr)
    ds = p * (dp - (g * out).sum(-1, keepdims=True))
    dq = scale * np.einsum("bhij,bhjd->bhid", ds, kr)
    dk = scale * np.einsum("bhij,bhid->bhjd", ds, q64)
    fold = lambda x: x.reshape(x.shape[0], k.shape[1], group, *x.shape[2:]).sum(2)
    return dq, fold(dk), fold(dv)


def rand(rng, *shape):
    return rng.uniform(-1, 1, shape).astype(np.float32)


def test_reference_gradients_match_finite_differences():
    # Guards the reference itself: a sum with multiplicity 2, GQA, a key bias
    # with -inf and a row that attends nothing.
    rng = np.random.default_rng(3)
    B, H, Hkv, Lq, Lk, D = 1, 2, 1, 5, 6, 3
    q, k, v, g = (rng.standard_normal(s) for s in
                  [(B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, H, Lq, D)])
    pattern = {"sum": [{"local": {"window": 3}}, {"strided": {"stride": 2, "local": 1}}]}
    m = np.array(multiplicity(pattern, H, Lq, Lk))
    m[:, :, 0, :] = 0  # row 0 attends nothing
    bias = np.array([[0.5, -np.inf, 0.0, 1.0, -0.3, 0.2]])
    grads = backward64(q, k, v, m, g, 0.7, bias)
    eps = 1e-6
    for name, x, grad in zip("qkv", (q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args = {"q": q, "k": k, "v": v}
            args[name] = plus
            fp = (forward64(args["q"], args["k"], args["v"], m, 0.7, bias)[0] * g).sum()
            args[name] = minus
            fm = (forward64(args["q"], args["k"], args["v"], m, 0.7, bias)[0] * g).sum()
            num[idx] = (fp - fm) / (2 * eps)
        assert np.abs(num - grad).max() < 1e-6, name


CASES = {
    "full": dict(pattern={"full": {}}),
    "causal": dict(pattern={"causal": {}}),
    "local": dict(pattern={"local": {"window": 9}}),
    "local_bidirectional": dict(pattern={"local": {"window": 5, "causal": False}}),
    "strided": dict(pattern={"strided": {"stride": 8}}),
    "dilated_head_offset": dict(pattern={"dilated": {"segment": 16, "rate": 4,
                                                     "head_offset": True, "causal": True}}),
    "longnet_sum": dict(pattern={"sum": [
        {"dilated": {"segment": 8, "rate": 1, "causal": True}},
        {"dilated": {"segment": 16, "rate": 2, "head_offset": True, "causal": True}},
        {"dilated": {"segment": 64, "rate": 4, "head_offset": True, "causal": True}}]}),
    "union": dict(pattern={"union": [{"local": {"window": 6}}, {"strided": {"stride": 5}}]}),
    "intersect": dict(pattern={"intersect": [{"causal": {}},
                                             {"local": {"window": 12, "causal": False}}]}),
    "gqa_cross_q_shorter": dict(pattern={"local": {"window": 20}}, heads=4, kv_heads=2,
                                lq=37, lk=70),
    "cross_q_longer": dict(pattern={"causal": {}}, lq=70, lk=41),
    "tokenized": dict(pattern={"intersect": [{"tokenized": {"dedup": False}},
                                             {"local": {"window": 40}}]},
                      batch=3, lengths=[0, 61, 33]),
    "key_bias_and_scale": dict(pattern={"causal": {}}, key_bias=True, scale=0.3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_the_float64_reference(name):
    case = CASES[name]
    B, H = case.get("batch", 1), case.get("heads", 2)
    Hkv = case.get("kv_heads", H)
    Lq, Lk = case.get("lq", 61), case.get("lk", case.get("lq", 61))
    D = 16
    spec = {"name": f"grad_{name}", "batch": B, "heads": H, "kv_heads": Hkv,
            "head_dim": D, "pattern": case["pattern"], "backward": True,
            "key_bias": case.get("key_bias", False)}
    if "scale" in case:
        spec["scale"] = case["scale"]
    pkg = attn.compile(spec)
    assert pkg.has_backward
    rng = np.random.default_rng()
    q, k, v, g = rand(rng, B, H, Lq, D), rand(rng, B, Hkv, Lk, D), \
        rand(rng, B, Hkv, Lk, D), rand(rng, B, H, Lq, D)
    lengths = case.get("lengths")
    bias = None
    if case.get("key_bias"):
        bias = rng.uniform(-2, 2, (B, Lk)).astype(np.float32)
        bias[:, ::7] = -np.inf  # keys to ignore
    if lengths is not None:
        # Padding beyond the lengths holds garbage that must not leak.
        for b, n in enumerate(lengths):
            k[b, :, n:] = np.nan
            v[b, :, n:] = np.inf
    kw = dict(lengths=lengths, key_bias=bias)
    out, lse = pkg(q, k, v, return_lse=True, **{x: y for x, y in kw.items() if y is not None})
    dq, dk, dv = pkg.backward(q, k, v, out, lse, g, **kw)

    m = multiplicity(case["pattern"], H, Lq, Lk, lengths)
    scale = case.get("scale", 1 / np.sqrt(D))
    clean = lambda x: np.nan_to_num(x, nan=0.0, posinf=0.0)
    ref = backward64(q, clean(k), clean(v), m, g, scale, bias)
    for got, want, what in zip((dq, dk, dv), ref, ("dq", "dk", "dv")):
        if lengths is not None and what != "dq":
            for b, n in enumerate(lengths):
                # Keys past a sequence's length get no gradient (zero).
                assert np.all(got[b, :, n:] == 0), what
                got, want = got.copy(), want.copy()
                got[b, :, n:] = want[b, :, n:] = 0
        assert np.all(np.isfinite(got)), what
        scale_ = max(np.abs(want).max(), 1e-3)
        assert np.abs(got - want).max() / scale_ < 2e-5, (what, np.abs(got - want).max())


def test_backward_errors_name_what_is_wrong(tmp_path):
    fwd = attn.compile({"name": "fwd_only", "head_dim": 8, "pattern": {"causal": {}}})
    x = np.zeros((1, 1, 4, 8), np.float32)
    out, lse = fwd(x, x, x, return_lse=True)
    with pytest.raises(attn.AttnError, match='compile it with "backward": true'):
        fwd.backward(x, x, x, out, lse, x)
    pkg = attn.compile({"name": "bwd", "head_dim": 8, "pattern": {"causal": {}},
                        "backward": True})
    with pytest.raises(attn.AttnError, match=r"grad_out: f32 \[1, 1, 3, 8\] must be f32 \[1, 1, 4, 8\]"):
        pkg.backward(x, x, x, out, lse, np.zeros((1, 1, 3, 8), np.float32))
    with pytest.raises(attn.AttnError, match=r"lse: shape"):
        pkg.backward(x, x, x, out, lse[:, :, :2], x)
    # Float32 sums for finished gradients are a GPU matter: a cpu package
    # neither finishes gradients nor takes the call that passes them.
    assert not pkg.stores_gradients and not pkg.finishes_gradients
    lib = attn._runtime()
    assert lib.attn_package_run_backward_with_sums_async(pkg._handle, *[None] * 14,
                                                         None) != 0
    assert "targets cpu" in lib.attn_last_error().decode()
    bad = [({"key_ids": True}, "key_ids"),
           ({"lse": False}, "needs the forward's lse")]
    for extra, message in bad:
        spec = {"name": "bad", "head_dim": 64, "pattern": {"causal": {}}, "backward": True,
                **extra}
        with pytest.raises(attn.AttnError, match=message):
            attn.compile(spec, out_dir=str(tmp_path / "bad"))


def test_gpu_package_lists_its_backward_kernels(tmp_path):
    """A GPU package with "backward": true (assembled here; run by
    test_gpu_backward.py on a GPU): its manifest lists grad_prepare, then
    grad_kv and grad_q per component, and f32 gradients."""
    import json
    import shutil
    if not (shutil.which("ptxas") or os.path.exists("/usr/local/cuda/bin/ptxas")):
        pytest.skip("ptxas is not installed")
    spec = {"name": "bwd_gpu", "dtype": "bf16", "heads": 2, "head_dim": 64,
            "pattern": {"strided": {"stride": 16, "local": 16}}, "backward": True}
    try:
        pkg = attn.compile(spec, out_dir=str(tmp_path / "bwd_gpu"), target="sm_90a")
    except attn.AttnError as e:  # compiled, but no GPU driver to load it here
        assert "cannot be loaded here" in str(e), e
        pkg = None
    with open(tmp_path / "bwd_gpu" / "manifest.json") as f:
        grad = json.load(f)["backward"]
    assert grad["launch_order"] == ["grad_prepare", "grad_kv_0", "grad_q_0",
                                    "grad_kv_1", "grad_q_1"]
    assert [a["dtype"] for a in grad["args"] if a["role"] == "output"] == ["f32"] * 3
    assert all(k["spill_bytes"] <= 64 for k in grad["kernels"]), grad["kernels"]
    if pkg is not None:
        assert pkg.has_backward
        with pytest.raises(attn.AttnError, match="pass PyTorch CUDA tensors"):
            x = np.zeros((1, 2, 4, 64), np.float32)
            pkg.backward(x, x, x, x, np.zeros((1, 2, 4), np.float32), x)
