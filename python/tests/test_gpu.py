"""GPU correctness suite: every case of gpu_cases.py against the float64
reference (attn.reference) on fresh random inputs with poisoned outputs.

Runs on a machine with an NVIDIA GPU and PyTorch, on packages compiled
elsewhere by scripts/build_gpu_packages.py into $ATTN_GPU_PACKAGES; skipped
otherwise (CI has no GPU)."""

import math
import os

import pytest

import gpu_cases

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
PKGS = os.environ.get("ATTN_GPU_PACKAGES")
if not PKGS:
    pytest.skip("ATTN_GPU_PACKAGES is not set", allow_module_level=True)

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


@pytest.mark.parametrize("case", gpu_cases.CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", gpu_cases.SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(case, shape):
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    q_len, kv_len = shape
    gen = torch.Generator().manual_seed(hash((case["name"], shape)) & 0xFFFF)
    dt = DTYPES[case["dtype"]]
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(B, H, q_len, D, generator=gen).to("cuda", dt)
    k = torch.randn(B, Hkv, kv_len, D, generator=gen).to("cuda", dt)
    v = torch.randn(B, Hkv, kv_len, D, generator=gen).to("cuda", dt)
    lengths = None
    if "tokenized" in str(case["pattern"]):
        lengths = _lengths(B, min(q_len, kv_len), gen).cuda()
    out = torch.full_like(q, float("nan"))
    out, lse = pkg(q, k, v, lengths=lengths, return_lse=True, out=out)
    torch.cuda.synchronize()
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
