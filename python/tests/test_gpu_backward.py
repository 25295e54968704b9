"""The backward pass on the GPU (docs/Backward.md): dq, dk and dv of the
packages in gpu_cases.GRAD_CASES (compiled by scripts/build_gpu_packages.py
into $ATTN_GPU_PACKAGES) against test_backward.py's float64 reference, on
fresh random bf16/f16 inputs, at shapes with Lq < Lk, Lq > Lk and tiles
cut short; the gradients land in memory first filled with NaN. Also the
attn.sparse layer's gradients on CUDA tensors against torch's float64
autograd through the float64 reference. Skipped without torch and a GPU."""

import os

import numpy as np
import pytest

import gpu_cases
from test_backward import backward64

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
PKGS = os.environ.get("ATTN_GPU_PACKAGES")
if not PKGS:
    pytest.skip("ATTN_GPU_PACKAGES is not set", allow_module_level=True)

import attn  # noqa: E402
from attn.reference import multiplicity  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
# Relative error (max abs over max abs) of each gradient: P and dS enter
# the tensor-core products in 16 bits.
TOL = {"bf16": 2.5e-2, "f16": 6e-3}


def _poison_allocator(nbytes):
    """Leaves NaN in the caching allocator's free blocks, so that gradients
    the runtime allocates next start as NaN unless it zeroes them."""
    x = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del x


@pytest.mark.parametrize("case", gpu_cases.GRAD_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", gpu_cases.GRAD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradients_match_the_float64_reference(case, shape):
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    assert pkg.has_backward
    Lq, Lk = shape
    gen = torch.Generator().manual_seed(hash((case["name"], shape)) & 0xFFFF)
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, Lq, D, generator=gen).to("cuda", dt)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to("cuda", dt)
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to("cuda", dt)
    g = torch.randn(B, H, Lq, D, generator=gen).to("cuda", dt)
    lengths = bias = None
    if "tokenized" in str(case["pattern"]):
        n = min(Lq, Lk)
        lens = torch.randint(0, n + 1, (B,), generator=gen)
        lens[0], lens[1] = 0, n
        lengths = lens.to("cuda", torch.int32)
        for b, m in enumerate(lens.tolist()):  # padding must not leak
            k[b, :, m:] = float("nan")
            v[b, :, m:] = float("inf")
    if case.get("key_bias"):
        bias = (torch.rand(B, Lk, generator=gen) * 4 - 2).cuda()
        bias[:, ::7] = float("-inf")
    out, lse = pkg(q, k, v, lengths=lengths, key_bias=bias, return_lse=True)
    _poison_allocator(4 * (q.numel() + 2 * k.numel()) + (1 << 20))
    dq, dk, dv = pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias)
    torch.cuda.synchronize()

    lens = None if lengths is None else lengths.tolist()
    m = np.array(multiplicity(case["pattern"], H, Lq, Lk, lens))
    scale = case.get("scale", 1 / np.sqrt(D))
    clean = lambda x: torch.nan_to_num(x.double(), nan=0.0, posinf=0.0).cpu().numpy()
    ref = backward64(clean(q), clean(k), clean(v), m, clean(g), scale,
                     None if bias is None else bias.double().cpu().numpy())
    for got, want, what in zip((dq, dk, dv), ref, ("dq", "dk", "dv")):
        got = got.double().cpu().numpy()
        assert got.shape == want.shape and got.dtype == np.float64
        assert not np.isnan(got).any(), f"{what} has NaN"
        scale_of = max(np.abs(want).max(), 1e-30)
        err = np.abs(got - want).max() / scale_of
        assert err < TOL[case["dtype"]], f"{what}: relative error {err:.2e}"


def test_backward_refuses_bad_arguments():
    case = gpu_cases.GRAD_CASES[0]
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    B, H, D = case["batch"], case["heads"], case["head_dim"]
    q = torch.randn(B, H, 64, D, device="cuda", dtype=torch.bfloat16)
    out, lse = pkg(q, q, q, return_lse=True)
    with pytest.raises(attn.AttnError, match="grad_out"):
        pkg.backward(q, q, q, out, lse, q[:, :, :32])
    with pytest.raises(attn.AttnError, match="lse"):
        pkg.backward(q, q, q, out, lse.double(), q)
    with pytest.raises(attn.AttnError, match="contiguous"):
        pkg.backward(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, out, lse, q)
    plain = attn.load(os.path.join(PKGS, "causal"))
    with pytest.raises(attn.AttnError, match="no backward pass"):
        plain.backward(q, q, q, out, lse, q)


@pytest.mark.parametrize("layer_case", gpu_cases.SPARSE_GRAD, ids=lambda c: c[3])
def test_sparse_layer_gradients_on_cuda(layer_case):
    """attn.sparse on CUDA tensors that require grad: one training step's
    gradients against the float64 reference. The layer loads its package
    (compiled with its backward pass by scripts/build_gpu_packages.py) from
    $ATTN_GPU_PACKAGES."""
    from attn import sparse
    B, E, H, mode, ctx, dtype = layer_case
    L = gpu_cases.SPARSE_GRAD_LEN
    gen = torch.Generator().manual_seed(7)
    x = [torch.randn(B, L, E, generator=gen).to("cuda", DTYPES[dtype]).requires_grad_()
         for _ in range(3)]
    layer = sparse.SparseAttention(heads=H, attn_mode=mode, local_attn_ctx=ctx,
                                   package_dir=PKGS)
    g = torch.randn(B, L, E, generator=gen).to("cuda", DTYPES[dtype])
    out = layer(*x)
    assert out.requires_grad
    out.backward(g)
    D = E // H
    m = np.array(multiplicity(layer.pattern, H, L, L))
    heads = lambda t: t.detach().double().reshape(B, L, H, D).transpose(1, 2).cpu().numpy()
    ref = backward64(*(heads(t) for t in x), m, heads(g), 1 / np.sqrt(D))
    for t, want in zip(x, ref):
        assert t.grad is not None and t.grad.dtype == t.dtype
        err = np.abs(heads(t.grad) - want).max() / np.abs(want).max()
        assert err < 3e-2, f"{mode}: relative error {err:.2e}"
