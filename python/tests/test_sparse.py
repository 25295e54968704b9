"""attn.sparse, the seeds' sparse-attention API ([B, L, E] inputs, attn_mode),
on the CPU target against the original's formulas in float64
(seed_reference.py), with fresh random inputs for every case."""

import os
import re

import numpy as np
import pytest

import attn
from attn import sparse

import seed_reference


def rand(*shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def rel_err(out, ref):
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


# (batch, L, E, heads, attn_mode, local_attn_ctx): lengths that are not a
# multiple of the tiles, shorter than the context, a single row; contexts of
# 1 (local: the diagonal alone; strided: every earlier key); head dims 32 to 128.
CASES = [
    (1, 1, 64, 1, "all", None),
    (2, 100, 128, 2, "all", None),
    (1, 300, 64, 1, "local", 16),
    (3, 257, 96, 3, "local", 64),
    (1, 5, 64, 1, "local", 16),
    (1, 40, 64, 1, "local", 1),
    (2, 130, 128, 2, "strided", 8),
    (1, 300, 64, 1, "strided", 32),
    (1, 40, 64, 1, "strided", 1),
    (1, 7, 128, 1, "strided", 16),
]


@pytest.mark.parametrize("B,L,E,heads,mode,ctx", CASES)
def test_attention_impl_matches_the_original(B, L, E, heads, mode, ctx):
    seed = hash((B, L, E, heads, mode, ctx)) % 2**32
    q, k, v = (rand(B, L, E, seed=seed + i) for i in range(3))
    out = sparse.attention_impl(q, k, v, heads, mode, ctx)
    ref = seed_reference.attention_impl(q, k, v, heads, mode, ctx)
    assert out.shape == (B, L, E) and out.dtype == np.float32
    assert not np.isnan(out).any()
    assert rel_err(out, ref) < 1e-5, (mode, ctx, seed, rel_err(out, ref))


@pytest.mark.parametrize("blocksize", [1, 16, 32, 64])
def test_blocksparse_gives_attention_impls_result(blocksize):
    q, k, v = (rand(2, 96, 128, seed=10 + i) for i in range(3))
    for mode, ctx in (("all", None), ("local", 24), ("strided", 12)):
        dense = sparse.attention_impl(q, k, v, 2, mode, ctx)
        blocked = sparse.blocksparse_attention_impl(q, k, v, 2, mode, ctx, blocksize=blocksize)
        assert np.array_equal(dense, blocked)


def test_the_readme_example_shapes():
    # The seed README's example: B, L, E = 4, 1024, 256 (here L = 200), the
    # module with only block_size given (heads from E: 4 of 64), the
    # functions with heads=4.
    q, k, v = (rand(4, 200, 256, seed=20 + i) for i in range(3))
    layer = sparse.SparseAttention(block_size=32)
    out = layer(q, k, v)
    assert layer.heads_for(256) == 4
    ref = seed_reference.attention_impl(q, k, v, 4, "all")
    assert rel_err(out, ref) < 1e-5
    assert np.array_equal(out, sparse.attention_impl(q, k, v, heads=4, attn_mode="all"))
    assert np.array_equal(out, sparse.blocksparse_attention_impl(q, k, v, heads=4,
                                                                 attn_mode="all", blocksize=32))


def test_one_package_serves_every_length():
    layer = sparse.SparseAttention(heads=2, attn_mode="strided", local_attn_ctx=16)
    for L in (33, 160, 513):
        q, k, v = (rand(1, L, 64, seed=L + i) for i in range(3))
        ref = seed_reference.attention_impl(q, k, v, 2, "strided", 16)
        assert rel_err(layer(q, k, v), ref) < 1e-5
    assert len(layer._packages) == 1


def test_float64_inputs_come_back_as_float64():
    q, k, v = (rand(1, 50, 64, seed=30 + i, dtype=np.float64) for i in range(3))
    out = sparse.SparseAttention(heads=1, attn_mode="local", local_attn_ctx=8)(q, k, v)
    assert out.dtype == np.float64
    assert rel_err(out, seed_reference.attention_impl(q, k, v, 1, "local", 8)) < 1e-5


def test_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(rand(2, 70, 128, seed=40 + i)) for i in range(3))
    out = sparse.attention_impl(q, k, v, 2, "strided", 8)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref = seed_reference.attention_impl(q.numpy(), k.numpy(), v.numpy(), 2, "strided", 8)
    assert rel_err(out.numpy(), ref) < 1e-5


@pytest.mark.parametrize("mode,ctx", [("strided", 8), ("local", 16), ("all", None)])
def test_torch_cpu_gradients_match_float64_autograd(mode, ctx):
    # A training step on CPU tensors: the layer's backward (a package
    # compiled with "backward": true) against torch's autograd through the
    # original attention in float64.
    torch = pytest.importorskip("torch")
    B, L, E, H = 2, 70, 64, 2
    q, k, v = (torch.from_numpy(rand(B, L, E, seed=50 + i)).requires_grad_() for i in range(3))
    w = torch.from_numpy(rand(B, L, E, seed=60))
    # ATTN_CPU_PACKAGES: a folder of prebuilt layer packages, for machines
    # with torch but without the compiler.
    layer = sparse.SparseAttention(H, mode, ctx, package_dir=os.environ.get("ATTN_CPU_PACKAGES"))
    (layer(q, k, v) * w).sum().backward()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    split = lambda x: x.reshape(B, L, H, E // H).transpose(1, 2)
    mask = torch.from_numpy(seed_reference.attn_mask(L, mode, ctx).astype(np.float64))
    s = split(q64) @ split(k64).transpose(-1, -2) / np.sqrt(E // H)
    p = torch.softmax(s.masked_fill(mask == 0, -torch.inf), dim=-1)
    ref = (p @ split(v64)).transpose(1, 2).reshape(B, L, E)
    (ref * w.double()).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert got.dtype == torch.float32
        assert rel_err(got.numpy(), want.numpy()) < 1e-5


def test_package_dir_keeps_the_packages_for_later_layers(tmp_path, monkeypatch):
    q, k, v = (rand(1, 64, 128, seed=50 + i) for i in range(3))
    first = sparse.SparseAttention(heads=2, attn_mode="local", local_attn_ctx=32,
                                   package_dir=str(tmp_path))
    out = first(q, k, v)
    name = first.package_spec(1, 128, "f32", "cpu")["name"]
    assert os.path.exists(tmp_path / name / "manifest.json")

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")
    monkeypatch.setattr(attn, "compile", no_compiler)
    later = sparse.SparseAttention(heads=2, attn_mode="local", local_attn_ctx=32,
                                   package_dir=str(tmp_path))
    assert np.array_equal(later(q, k, v), out)


@pytest.mark.parametrize("call,message", [
    (lambda q: sparse.attention_impl(q, q, q, 2, "fixed"),
     "attn_mode: unknown mode 'fixed' (expected one of: all, local, strided)"),
    (lambda q: sparse.attention_impl(q, q, q, 2, "local"),
     "local_attn_ctx: expected an int >= 1 for attn_mode 'local' (the window), got None"),
    (lambda q: sparse.attention_impl(q, q, q, 2, "strided", 0),
     "local_attn_ctx: expected an int >= 1 for attn_mode 'strided' (the stride), got 0"),
    (lambda q: sparse.attention_impl(q, q, q, 2, "strided", 2.5),
     "local_attn_ctx: expected an int >= 1 for attn_mode 'strided' (the stride), got 2.5"),
    (lambda q: sparse.attention_impl(q, q, q, 0, "all"), "heads: expected an int >= 1, got 0"),
    (lambda q: sparse.attention_impl(q, q, q, 3, "all"),
     "q: embedding size 64 is not a multiple of heads = 3"),
    (lambda q: sparse.attention_impl(q, q[:, :5], q, 2, "all"),
     "k: shape (1, 5, 64), expected q's shape (1, 10, 64) ([B, L, E])"),
    (lambda q: sparse.attention_impl(q[0], q[0], q[0], 2, "all"),
     "q: shape (10, 64), expected [B, L, E]"),
    (lambda q: sparse.attention_impl(*(np.ones((1, 10, 64), np.int32),) * 3, 2, "all"),
     "q: expected floating-point values, got int32"),
    (lambda q: sparse.blocksparse_attention_impl(q, q, q, 2, "all", blocksize=0),
     "blocksize: expected an int >= 1, got 0"),
    (lambda q: sparse.blocksparse_attention_impl(q, q, q, 2, "all", num_verts=4, vertsize=1),
     "num_verts / vertsize: the \"fixed\" mode's summary columns are not an attn pattern"),
    (lambda q: sparse.SparseAttention(block_size=-1), "block_size: expected an int >= 1, got -1"),
])
def test_bad_arguments_say_what_is_wrong(call, message):
    with pytest.raises(attn.AttnError, match=re.escape(message)):
        call(rand(1, 10, 64, seed=60))
