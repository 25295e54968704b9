"""The backward pass on the GPU (docs/Backward.md): dq, dk and dv of the
packages in gpu_cases.GRAD_CASES (compiled by scripts/build_gpu_packages.py
into $ATTN_GPU_PACKAGES) against test_backward.py's float64 reference, on
fresh random bf16/f16 inputs, at shapes with Lq < Lk, Lq > Lk and tiles
cut short; the gradients land in memory first filled with NaN. Also the
attn.sparse layer's gradients on CUDA tensors against torch's float64
autograd through the float64 reference. Skipped without torch and a GPU."""

import ctypes
import os

import numpy as np
import pytest

import gpu_cases
from test_backward import backward64

torch, PKGS = gpu_cases.torch_and_packages()

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


def _inputs(case, shape):
    """Fresh inputs of a GRAD_CASES case at (Lq, Lk): q, k, v, grad_out,
    lengths (tokenized cases; NaN and inf in the padding) and key_bias."""
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
    return q, k, v, g, lengths, bias


def _check_against_reference(case, q, k, v, g, lengths, bias, grads, tol):
    """grads (dq, dk, dv) against the float64 reference, each within `tol`
    of its largest magnitude, or of a hundredth of the largest of the three
    where a gradient is (nearly) zero: dq and dk of rows that attend only
    themselves (a window of 1) are 0 up to float32 rounding."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    lens = None if lengths is None else lengths.tolist()
    m = np.array(multiplicity(case["pattern"], H, Lq, Lk, lens))
    scale = case.get("scale", 1 / np.sqrt(D))
    clean = lambda x: torch.nan_to_num(x.detach().double(), nan=0.0, posinf=0.0).cpu().numpy()
    ref = backward64(clean(q), clean(k), clean(v), m, clean(g), scale,
                     None if bias is None else bias.double().cpu().numpy())
    got = [x.double().cpu().numpy() for x in grads]
    for x, want in zip(got, ref):
        assert x.shape == want.shape and x.dtype == np.float64
    _assert_gradients_near(got, ref, tol)


def _assert_gradients_near(grads, ref, tol):
    """(dq, dk, dv) as arrays, no NaN, each within `tol` of its reference's
    largest magnitude, or of a hundredth of the largest of the three where
    its reference is (nearly) zero."""
    floor = max(max(np.abs(want).max() for want in ref) / 100, 1e-30)
    for got, want, what in zip(grads, ref, ("dq", "dk", "dv")):
        assert not np.isnan(got).any(), f"{what} has NaN"
        err = np.abs(got - want).max() / max(np.abs(want).max(), floor)
        assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("case", gpu_cases.GRAD_CASES + gpu_cases.RANDOM_GRAD_CASES,
                         ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", gpu_cases.GRAD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradients_match_the_float64_reference(case, shape):
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    assert pkg.has_backward
    q, k, v, g, lengths, bias = _inputs(case, shape)
    out, lse = pkg(q, k, v, lengths=lengths, key_bias=bias, return_lse=True)
    _poison_allocator(4 * (q.numel() + 2 * k.numel()) + (1 << 20))
    dq, dk, dv = pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias)
    torch.cuda.synchronize()
    _check_against_reference(case, q, k, v, g, lengths, bias, (dq, dk, dv),
                             TOL[case["dtype"]])


@pytest.mark.parametrize("case", gpu_cases.GRAD_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", gpu_cases.GRAD_SHAPES[:3], ids=lambda s: f"{s[0]}x{s[1]}")
def test_stored_gradients_match_the_float64_reference(case, shape):
    """Packages of one component (under GQA, over a narrow band), or of
    several that finish them (Package.finishes_gradients: each element by
    its last writer, LongNet's rows by the last branch holding them),
    store the gradients in the inputs' dtype (Package.stores_gradients), here into
    [B, L, H, D]-ordered views first filled with NaN: every element is
    written (zeros where no pair reaches, padding rows and keys included),
    equal to the float32 path's gradients rounded (the same sums: under GQA
    both paths walk the q heads in one block), and within the reference's
    tolerance. Packages that add into float32 gradients refuse 16-bit ones
    with an error that says so."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    q, k, v, g, lengths, bias = _inputs(case, shape)
    out, lse = pkg(q, k, v, lengths=lengths, key_bias=bias, return_lse=True)
    nan_view = lambda x: torch.full((x.shape[0], x.shape[2], x.shape[1], x.shape[3]),
                                    float("nan"), dtype=x.dtype,
                                    device="cuda").transpose(1, 2)
    grads = tuple(nan_view(x) for x in (q, k, v))
    if not pkg.stores_gradients:
        with pytest.raises(attn.AttnError, match="float32"):
            pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias,
                         grads=grads)
        return
    got = pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias, grads=grads)
    assert all(a is b for a, b in zip(got, grads))
    f32 = pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias)
    torch.cuda.synchronize()
    for stored, wide, what in zip(grads, f32, ("dq", "dk", "dv")):
        assert torch.equal(stored, wide.to(stored.dtype)), what
    _check_against_reference(case, q, k, v, g, lengths, bias, grads,
                             2 * TOL[case["dtype"]])
    if pkg.finishes_gradients:
        # The earlier components' float32 sums are the caller's (Package.backward
        # allocates them): the C call without them is refused, saying so.
        args, _, keep, with_sums = pkg._torch_backward_args(q, k, v, out, lse, g, lengths,
                                                            bias, grads)
        assert with_sums and len(args) == 14
        lib = attn._runtime()
        assert lib.attn_package_run_backward_async(pkg._handle_on(q.device.index),
                                                   *args[:11], None) != 0
        assert "for those sums" in lib.attn_last_error().decode()
    # dk and dv in different layouts, or a dtype the package does not take.
    with pytest.raises(attn.AttnError, match="dk and dv share a layout"):
        pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias,
                     grads=(grads[0], grads[1], torch.empty_like(v)))
    with pytest.raises(attn.AttnError, match=r"dq: expected a contiguous float32 tensor "
                       r"\(or a torch\.(bfloat16|float16) tensor, which this package stores\)"):
        pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias,
                     grads=(grads[0].double(), grads[1], grads[2]))


@pytest.mark.parametrize("case", [c for c in gpu_cases.GRAD_CASES
                                  if c["name"] in ("grad_strided", "grad_longnet_sum",
                                                   "grad_longnet_union")],
                         ids=lambda c: c["name"])
def test_finished_gradients_in_rounds_of_pairs(case, monkeypatch):
    """The float32 sums of a package that finishes its gradients may hold a
    round of (batch, head) pairs rather than all of them (docs/Backward.md):
    the runtime then runs the components' kernels a round at a time. Sums
    for one pair at a time (Package.backward's choice where all pairs'
    would outgrow attn._SUMS_BYTES, forced here) give the same gradients
    bit for bit, and those match the float64 reference; sums of shapes that
    fit no round are refused, naming the tensor."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    assert pkg.finishes_gradients
    q, k, v, g, lengths, bias = _inputs(case, (517, 517))
    out, lse = pkg(q, k, v, lengths=lengths, key_bias=bias, return_lse=True)
    stored = lambda: tuple(torch.full_like(x, float("nan")) for x in (q, k, v))
    whole = pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias,
                         grads=stored())
    monkeypatch.setattr(attn, "_SUMS_BYTES", 1)
    _, _, keep, with_sums = pkg._torch_backward_args(q, k, v, out, lse, g, lengths, bias,
                                                     stored())
    B, H, L, D = q.shape
    assert B * H > 1 and with_sums
    assert [entry[0].shape for entry in keep[-3:]] == [(1, L, D)] * 3  # one pair a round
    rounds = pkg.backward(q, k, v, out, lse, g, lengths=lengths, key_bias=bias,
                          grads=stored())
    torch.cuda.synchronize()
    for a, b, what in zip(rounds, whole, ("dq", "dk", "dv")):
        assert torch.equal(a, b), what
    _check_against_reference(case, q, k, v, g, lengths, bias, rounds,
                             2 * TOL[case["dtype"]])
    # dq_sum for 2 pairs with dk_sum for 1, and a 4-D dq_sum that is not q's shape.
    lib = attn._runtime()
    handle = pkg._handle_on(q.device.index)
    for dq_sum, dk_sum, message in (((2, L, D), (1, L, D), "dk_sum: f32"),
                                    ((B, H + 1, L, D), (B, H, L, D), "dq_sum: f32")):
        sums = [torch.empty(s, device="cuda") for s in (dq_sum, dk_sum, dk_sum)]
        grads = stored()
        args, _, keep, _ = pkg._torch_backward_args(q, k, v, out, lse, g, lengths, bias,
                                                    grads)
        c_sums = []
        for x in sums:
            shape, _ = attn._c_layout(x.shape)
            c_sums.append(attn._Tensor(x.data_ptr(), shape, len(shape), attn._F32, None))
        rc = lib.attn_package_run_backward_with_sums_async(
            handle, *args[:11], *[ctypes.byref(c) for c in c_sums], None)
        assert rc != 0
        assert message in lib.attn_last_error().decode()


@pytest.mark.parametrize("name", ["grad_causal", "grad_strided", "grad_longnet_sum"])
def test_cuda_graph_replays_the_backward(name):
    """The backward captured in a CUDA graph (after an eager call on a side
    stream, as torch.cuda.graph wants) replays to exactly the eager
    gradients: one component storing them (causal), and packages whose
    kernels finish them from float32 sums (strided, LongNet's sum), whose
    grad kernels run as a chain of dependent launches on sm_90a."""
    case = next(c for c in gpu_cases.GRAD_CASES if c["name"] == name)
    pkg = attn.load(os.path.join(PKGS, name))
    q, k, v, g, lengths, bias = _inputs(case, (517, 517))
    out, lse = pkg(q, k, v, return_lse=True)
    eager = tuple(x.clone() for x in pkg.backward(q, k, v, out, lse, g,
                                                  grads=tuple(torch.empty_like(x)
                                                              for x in (q, k, v))))
    grads = tuple(torch.empty_like(x) for x in (q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pkg.backward(q, k, v, out, lse, g, grads=grads)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pkg.backward(q, k, v, out, lse, g, grads=grads)
    for x in grads:
        x.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b, what in zip(grads, eager, ("dq", "dk", "dv")):
        assert torch.equal(a, b), what


AUTOGRAD_CASES = [c for c in gpu_cases.GRAD_CASES
                  if c["name"] in ("grad_causal", "grad_full_f16_gqa_d64",
                                   "grad_tokenized_causal", "grad_causal_key_bias")]


@pytest.mark.parametrize("case", AUTOGRAD_CASES, ids=lambda c: c["name"])
def test_autograd_through_a_package_call(case):
    """pkg(q, k, v) on tensors that require grad, then loss.backward(): the
    call records attn::run, whose backward runs the package's kernels; the
    gradients arrive in the inputs' dtypes and layouts. q is a [B, H, L, D]
    view of a [B, L, H, D] tensor: out follows its layout, and the backward
    kernels read q, out and grad_out (which arrives in their layout) in
    place."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    shape = gpu_cases.GRAD_SHAPES[0]
    q, k, v, g, lengths, bias = _inputs(case, shape)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = pkg(*leaves, lengths=lengths, key_bias=bias)
    assert out.requires_grad and out.stride() == q.stride()
    with torch.no_grad():
        assert torch.equal(out, pkg(q, k, v, lengths=lengths, key_bias=bias))
    (out.float() * g.float()).sum().backward()
    for x, leaf in zip((q, k, v), leaves):
        assert leaf.grad is not None and leaf.grad.dtype == x.dtype
        assert leaf.grad.shape == x.shape and leaf.grad.stride() == leaf.stride()
    # The gradients are rounded to the inputs' 16-bit type: one more ulp.
    _check_against_reference(case, q, k, v, g, lengths, bias,
                             [leaf.grad for leaf in leaves], 2 * TOL[case["dtype"]])


@pytest.mark.parametrize("name,mode", [("grad_causal", None),
                                       ("grad_strided", "reduce-overhead")],
                         ids=["default", "cuda_graphs"])
def test_training_steps_under_torch_compile(name, mode):
    """A few training steps through torch.compile(fullgraph=True): the
    compiled backward graph calls attn::run_backward, the package's kernels,
    so the gradients of every step match the float64 reference (no NaN at
    the first step) and the eager gradients of the same step. Also with
    mode="reduce-overhead", whose CUDA graphs capture the forward and the
    backward (strided: several kernels and the float32 sums)."""
    case = next(c for c in gpu_cases.GRAD_CASES if c["name"] == name)
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    q, k, v, g, _, _ = _inputs(case, gpu_cases.GRAD_SHAPES[0])

    def loss_of(q, k, v):
        return (pkg(q, k, v).float() * g.float()).sum()

    from torch._dynamo.utils import counters
    counters.clear()
    compiled = torch.compile(loss_of, fullgraph=True, mode=mode)
    params = [x.clone().requires_grad_() for x in (q, k, v)]
    for step in range(3):
        compiled(*params).backward()
        grads = [p.grad.clone() for p in params]
        for p, grad in zip(params, grads):
            assert grad is not None and grad.dtype == p.dtype, step
        _check_against_reference(case, *[p.detach() for p in params], g, None, None,
                                 grads, 2 * TOL[case["dtype"]])
        eager = [p.detach().clone().requires_grad_() for p in params]
        loss_of(*eager).backward()
        for grad, e in zip(grads, eager):
            assert torch.allclose(grad.float(), e.grad.float(), rtol=1e-2, atol=1e-3), step
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
                p.grad = None
    if mode == "reduce-overhead":  # the steps ran as CUDA graphs, none skipped
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_autograd_refuses_what_it_cannot_differentiate():
    case = AUTOGRAD_CASES[0]
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    q, k, v, g, _, _ = _inputs(case, gpu_cases.GRAD_SHAPES[0])
    q.requires_grad_()
    # The lse returned but left out of the loss: fine.
    out, lse = pkg(q, k, v, return_lse=True)
    out.float().sum().backward()
    assert q.grad is not None and not q.grad.isnan().any()
    # A loss through the lse: refused (the kernels take no lse gradient).
    out, lse = pkg(q, k, v, return_lse=True)
    with pytest.raises(attn.AttnError, match="lse"):
        (out.float().sum() + lse.sum()).backward()
    bias_case = next(c for c in AUTOGRAD_CASES if c.get("key_bias"))
    bias_pkg = attn.load(os.path.join(PKGS, bias_case["name"]))
    q, k, v, g, _, bias = _inputs(bias_case, gpu_cases.GRAD_SHAPES[0])
    bias.requires_grad_()
    with pytest.raises(attn.AttnError, match="key_bias gets no gradient"):
        bias_pkg(q, k, v, key_bias=bias).float().sum().backward()


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
    # Strided views are read in place, under the forward's rules.
    with pytest.raises(attn.AttnError, match="k and v must share a layout"):
        pkg.backward(q, q.transpose(1, 2).contiguous().transpose(1, 2), q, out, lse, q)
    plain = attn.load(os.path.join(PKGS, "causal"))
    with pytest.raises(attn.AttnError, match="no backward pass"):
        plain.backward(q, q, q, out, lse, q)


STRIDED_CASES = [c for c in gpu_cases.GRAD_CASES
                 if c["name"] in ("grad_causal", "grad_full_f16_gqa_d64",
                                  "grad_tokenized_causal", "grad_strided")]


@pytest.mark.parametrize("case", STRIDED_CASES, ids=lambda c: c["name"])
def test_backward_reads_strided_views(case):
    """q, k, v, out and grad_out as [B, H, L, D] views of [B, L, H, D]
    tensors (a model's layout), read in place by the backward kernels: the
    gradients match the float64 reference and the call on contiguous
    copies. A grad_out in another layout than q's is copied into q's, and
    with q a slice of a wider tensor (a fused projection) both go dense."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    Lq, Lk = gpu_cases.GRAD_SHAPES[1]
    q, k, v, g, lengths, bias = _inputs(case, (Lq, Lk))
    view = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)
    vq, vk, vv, vg = (view(x) for x in (q, k, v, g))
    out = torch.full((q.shape[0], Lq, q.shape[1], q.shape[3]), float("nan"), device="cuda",
                     dtype=q.dtype).transpose(1, 2)
    out, lse = pkg(vq, vk, vv, lengths=lengths, key_bias=bias, return_lse=True, out=out)
    assert not vq.is_contiguous() and not out.is_contiguous()
    _poison_allocator(4 * (q.numel() + 2 * k.numel()) + (1 << 20))
    grads = pkg.backward(vq, vk, vv, out, lse, vg, lengths=lengths, key_bias=bias)
    torch.cuda.synchronize()
    _check_against_reference(case, q, k, v, g, lengths, bias, grads, TOL[case["dtype"]])
    plain = pkg.backward(q, k, v, out.contiguous(), lse, g, lengths=lengths, key_bias=bias)
    copied = pkg.backward(vq, vk, vv, out, lse, g, lengths=lengths, key_bias=bias)
    B, H, _, D = q.shape
    wide = torch.full((B, Lq, H, 2 * D), float("nan"), device="cuda", dtype=q.dtype)
    sliced = wide[..., :D].transpose(1, 2)
    sliced.copy_(q)
    fused = pkg.backward(sliced, vk, vv, out, lse, vg, lengths=lengths, key_bias=bias)
    for got, other, third, want in zip(grads, copied, fused, plain):
        assert got.is_contiguous() and got.shape == want.shape
        scale = want.abs().max().clamp_min(1e-30)
        # Equal but for the order of the atomic adds (GQA, grad_kv's blocks).
        for x in (got, other, third):
            assert ((x - want).abs().max() / scale).item() < 1e-5


@pytest.mark.parametrize("layer_case", gpu_cases.SPARSE_GRAD, ids=lambda c: c[3])
def test_sparse_layer_gradients_on_cuda(layer_case):
    """attn.sparse on CUDA tensors that require grad: one training step's
    gradients against the float64 reference, then the same step under
    torch.compile against the eager one. The layer loads its package
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
    # The same step under torch.compile(fullgraph=True): the layer's call is
    # attn::run in the graph, its backward the package's kernels.
    eager = [t.grad.clone() for t in x]
    for t in x:
        t.grad = None
    torch.compile(lambda a, b, c: layer(a, b, c), fullgraph=True)(*x).backward(g)
    for t, want in zip(x, eager):
        assert torch.allclose(t.grad.float(), want.float(), rtol=1e-2, atol=1e-3), mode


def _through_projection(t):
    """Whether t comes, through views, from the backward node that a package
    call on the parts of one fused projection records (_torchop's
    _FusedProjectionRun)."""
    node = t.grad_fn
    for _ in range(4):
        if node is None:
            return False
        if "Projection" in type(node).__name__:
            return True
        node = node.next_functions[0][0] if node.next_functions else None
    return False


# (grad_strided and grad_longnet_sum: packages that finish the gradients,
# LongNet's each row by its last branch; grad_full_f16_gqa_d64: one that
# adds into float32.)
PROJECTION_CASES = [c for c in gpu_cases.GRAD_CASES
                    if c["name"] in ("grad_causal", "grad_local_tokenized_gqa",
                                     "grad_full_f16_gqa_d64", "grad_strided",
                                     "grad_longnet_sum")]


@pytest.mark.parametrize("case", PROJECTION_CASES, ids=lambda c: c["name"])
def test_package_on_a_fused_projection_writes_its_gradient_in_place(case):
    """pkg(q, k, v) on the head views of one fused projection
    [B, L, (H + 2 Hkv) D] that requires grad (split per part, and for
    H = Hkv the view [B, L, 3, H, D] unbound, or permuted to
    [3, B, H, L, D] and unbound): where the package stores its
    gradients, one backward node on the projection, the kernels writing its
    gradient (first filled with NaN) in place, equal bit for bit to the
    gradients through three separate inputs, and out equal to theirs and in
    [B, L, H, D] order. A package that adds into float32 takes the path
    through the parts, with the same values."""
    pkg = attn.load(os.path.join(PKGS, case["name"]))
    L = 300
    q, k, v, g, lengths, bias = _inputs(case, (L, L))
    B, H, Hkv, D = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    apart = [x.clone().requires_grad_() for x in (q, k, v)]
    want_out = pkg(*apart, lengths=lengths, key_bias=bias)
    (want_out.float() * g.float()).sum().backward()
    rows = lambda x: x.transpose(1, 2).reshape(B, L, -1)
    want = torch.cat([rows(x.grad) for x in apart], dim=-1)
    base = torch.cat([rows(x) for x in (q, k, v)], dim=-1)

    def split(x):
        parts = x.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return [p.unflatten(-1, (p.shape[-1] // D, D)).transpose(1, 2) for p in parts]

    forms = {"split": split}
    if H == Hkv:
        forms["unbind"] = lambda x: [p.transpose(1, 2)
                                     for p in x.view(B, L, 3, H, D).unbind(2)]
        # timm's form: reshape, permute to [3, B, H, L, D], unbind.
        forms["permute"] = lambda x: x.reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    for name, form in forms.items():
        qkv = base.clone().requires_grad_()
        out = pkg(*form(qkv), lengths=lengths, key_bias=bias)
        assert _through_projection(out) == pkg.stores_gradients, name
        assert torch.equal(out, want_out), name
        if pkg.stores_gradients:
            assert out.transpose(1, 2).is_contiguous(), name
        _poison_allocator(qkv.numel() * qkv.element_size())
        (out.float() * g.float()).sum().backward()
        if pkg.stores_gradients:
            assert torch.equal(qkv.grad, want), name
        else:  # grad_kv's atomic adds, in any order
            assert torch.allclose(qkv.grad.float(), want.float(), rtol=1e-2, atol=1e-3), name


@pytest.mark.parametrize("layer_case", gpu_cases.SPARSE_GRAD, ids=lambda c: c[3])
def test_sparse_layer_on_a_fused_projection_writes_its_gradient_in_place(layer_case):
    """attn.sparse on q, k and v sliced from one fused projection qkv
    [B, L, 3E] (split, chunk, slices; a leaf, and an nn.Linear's output, a
    view of its [B*L, 3E] product):
    autograd's node sits on qkv itself and the kernels store dq, dk and dv
    into qkv's gradient (first filled with NaN), which must equal, bit for
    bit, the gradient through three separate inputs and match the float64
    reference. A slice detached, or a wider projection, takes the path
    through the slices, with the same values."""
    from attn import sparse
    B, E, H, mode, ctx, dtype = layer_case
    L, D = gpu_cases.SPARSE_GRAD_LEN, E // H
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(B, L, 3 * E, generator=gen).to("cuda", dt)
    g = torch.randn(B, L, E, generator=gen).to("cuda", dt)
    layer = sparse.SparseAttention(heads=H, attn_mode=mode, local_attn_ctx=ctx,
                                   package_dir=PKGS)
    # Three separate inputs: the gradients the fused path must reproduce.
    apart = [base[..., i * E:(i + 1) * E].clone().requires_grad_() for i in range(3)]
    want_out = layer(*apart)
    want_out.backward(g)
    want = torch.cat([x.grad for x in apart], dim=-1)
    m = np.array(multiplicity(layer.pattern, H, L, L))
    heads = lambda t: t.detach().double().reshape(B, L, H, D).transpose(1, 2).cpu().numpy()
    ref = backward64(*(heads(x) for x in apart), m, heads(g), 1 / np.sqrt(D))
    for i, r in enumerate(ref):
        got = heads(want[..., i * E:(i + 1) * E])
        assert np.abs(got - r).max() / np.abs(r).max() < 3e-2, (mode, i)

    splits = {"split": lambda x: x.split(E, dim=-1), "chunk": lambda x: x.chunk(3, dim=-1),
              "slices": lambda x: (x[..., :E], x[..., E:2 * E], x[..., 2 * E:])}
    for name, split in splits.items():
        qkv = base.clone().requires_grad_()
        out = layer(*split(qkv))
        assert _through_projection(out), name
        assert torch.equal(out, want_out), name
        _poison_allocator(qkv.numel() * qkv.element_size())
        out.backward(g)
        assert qkv.grad.shape == qkv.shape and torch.equal(qkv.grad, want), name

    # A projection layer's output (a view of its [B*L, 3E] product), against
    # the same step through copies of the slices.
    proj = torch.nn.Linear(8, 3 * E, device="cuda", dtype=dt)
    x = torch.randn(B, L, 8, generator=gen).to("cuda", dt).requires_grad_()
    grads = []
    for copies in (False, True):
        x.grad = proj.weight.grad = proj.bias.grad = None
        parts = proj(x).split(E, dim=-1)
        out = layer(*(t.clone() for t in parts) if copies else parts)
        assert _through_projection(out) != copies
        out.backward(g)
        grads.append((out, x.grad, proj.weight.grad, proj.bias.grad))
    for fused, copied in zip(*grads):
        assert torch.equal(fused, copied)

    # k detached: no gradient may reach qkv's middle slice.
    qkv = base.clone().requires_grad_()
    q, k, v = qkv.split(E, dim=-1)
    out = layer(q, k.detach(), v)
    assert not _through_projection(out)
    out.backward(g)
    assert torch.equal(qkv.grad[..., :E], want[..., :E])
    assert not qkv.grad[..., E:2 * E].any()
    assert torch.equal(qkv.grad[..., 2 * E:], want[..., 2 * E:])

    # A wider projection (a fourth slice the layer does not read).
    wide = torch.cat([base, base[..., :E]], dim=-1).requires_grad_()
    out = layer(*wide[..., :3 * E].split(E, dim=-1))
    assert not _through_projection(out)
    out.backward(g)
    assert torch.equal(wide.grad[..., :3 * E], want) and not wide.grad[..., 3 * E:].any()


def _rows_of(sets, kv_heads):
    """Rows of a manifest row set list (one per kv head, or one for all)."""
    rows = sum(run[1] * run[2] for runs in sets for run in runs)
    return rows * (kv_heads if len(sets) == 1 else 1)


@pytest.mark.parametrize("spec", gpu_cases.RING_GRAD + gpu_cases.RANDOM_RING_GRAD,
                         ids=lambda s: s["name"])
def test_ring_backward_on_one_gpu_matches_reference(spec):
    """Every rank of a GPU ring package's backward pass, run as threads on
    this one GPU (the in-process transport copies each step's rows and
    gradients device to device): dq, dk and dv of the whole sequence
    against the float64 reference on fresh inputs rounded to the package's
    dtype, the gradients starting as NaN. Each rank sends its key/value rows
    (16-bit) and the gradients of the rows it received (f32) exactly."""
    gen = torch.Generator().manual_seed(hash(spec["name"]) & 0xFFFF)
    B, H, Hkv, D = spec["batch"], spec["heads"], spec["kv_heads"], spec["head_dim"]
    Lq = spec.get("seq_len", spec.get("q_len"))
    Lk = spec.get("seq_len", spec.get("kv_len"))
    dtype = DTYPES[spec["dtype"]]
    q, k, v, g = (torch.randn(B, h, n, D, generator=gen).to(dtype).float().numpy()
                  for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk), (H, Lq)))
    lengths = (np.array([Lk // 3, Lk], dtype=np.int32)
               if "tokenized" in str(spec["pattern"]) else None)
    pkg = attn.load(os.path.join(PKGS, spec["name"]))
    assert pkg.has_backward
    out, lse = pkg.run_ranks(q, k, v, lengths=lengths, return_lse=True)
    dq, dk, dv = pkg.run_ranks_backward(q, k, v, out, lse, g, lengths=lengths)
    m = np.array(multiplicity(spec["pattern"], H, Lq, Lk,
                              None if lengths is None else lengths.tolist()))
    ref = backward64(q, k, v, m, g, 1 / np.sqrt(D))
    _assert_gradients_near((dq, dk, dv), ref, TOL[spec["dtype"]])
    ring = pkg.manifest["ring"]
    for rank, sent in enumerate(pkg.bytes_sent):
        sched = ring["schedule"][rank]
        received = sum(_rows_of(st["recv_rows"], Hkv) for st in sched["steps"]
                       if st["step"] > 0 and st["recv_from"] >= 0)
        assert sent == (sched["rows_sent"] * 2 + received * 4) * B * D * 2, rank


def test_ring_rank_autograd_one_rank():
    """run_rank on tensors that require grad, then loss.backward(): the
    rank's backward runs the ring backward (a one-rank ring: its two
    zigzag pieces go through the backward's piece buffers) and the
    gradients of the whole sequence match the float64 reference."""
    import torch.distributed as dist
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        spec = gpu_cases.RING_GRAD_ONE_RANK
        pkg = attn.load(os.path.join(PKGS, spec["name"]))
        pkg.join()
        gen = torch.Generator().manual_seed(11)
        H, L, D = spec["heads"], spec["seq_len"], spec["head_dim"]
        q, k, v, g = (torch.randn(1, H, L, D, generator=gen).to("cuda", torch.bfloat16)
                      for _ in range(4))
        leaves = [pkg.shard(x).clone().requires_grad_() for x in (q, k, v)]
        out = pkg.run_rank(*leaves)
        assert out.requires_grad
        (out.float() * pkg.shard(g).float()).sum().backward()
        grads = [pkg.unshard([leaf.grad]) for leaf in leaves]
        for x, grad in zip((q, k, v), grads):
            assert grad.dtype == x.dtype and grad.shape == x.shape
        m = np.array(multiplicity(spec["pattern"], H, L, L, None))
        as64 = lambda x: x.double().cpu().numpy()
        ref = backward64(as64(q), as64(k), as64(v), m, as64(g), 1 / np.sqrt(D))
        for got, want, what in zip(grads, ref, ("dq", "dk", "dv")):
            got = as64(got)
            assert not np.isnan(got).any(), what
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
            assert err < 2 * TOL["bf16"], f"{what}: relative error {err:.2e}"
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["tables", "embedding_fn", "target"])
def test_tokenized_attention_trains_its_embeddings(mode):
    """TokenizedAttention on CUDA tensors whose embeddings require grad:
    the unique keys' rows are gathered per sequence and the training package
    (key_bias, backward) runs forward and backward, so the gradients reach
    the embedding tables (TableEmbedding's, or the parameters behind an
    embedding_fn) through the gathers. Against torch's float64 autograd
    through per-sequence attention over every position (duplicates, an
    empty sequence and a partial one)."""
    import math
    B, H, Hkv, D, _ = gpu_cases.TOKENIZED[0]
    V, L = 300, 257
    gen = torch.Generator().manual_seed(21)
    tables = [(torch.randn(V, h, D, generator=gen) * 0.5).to("cuda", torch.bfloat16)
              .requires_grad_() for h in (H, Hkv, Hkv)]
    if mode == "embedding_fn":
        emb = lambda ids: tuple(t[ids.long()] for t in tables)
        layer = attn.TokenizedAttention(B, L, 1, emb, heads=H, kv_heads=Hkv, head_dim=D,
                                        package_dir=PKGS)
    else:
        layer = attn.TokenizedAttention(B, L, 1, attn.TableEmbedding(*tables),
                                        package_dir=PKGS)
    tokens = torch.randint(0, 40, (B, L), generator=gen).cuda()  # many duplicates
    lengths = torch.tensor([L, 0, 133], device="cuda")
    cands = torch.randint(0, V, (B, 17), generator=gen).cuda()
    queries = cands if mode == "target" else tokens
    out = (layer.target_forward(cands, tokens, lengths) if mode == "target"
           else layer(tokens, lengths))
    assert out.requires_grad
    g = torch.randn(out.shape, generator=gen).cuda()
    (out.float() * g).sum().backward()

    ref_tables = [t.detach().double().requires_grad_() for t in tables]
    qt, kt, vt = ref_tables
    ref_out = torch.zeros(out.shape, dtype=torch.float64, device="cuda")
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        q = qt[queries[b]].transpose(0, 1)                                   # [H, Q, D]
        k = kt[tokens[b, :n]].repeat_interleave(H // Hkv, 1).transpose(0, 1)
        v = vt[tokens[b, :n]].repeat_interleave(H // Hkv, 1).transpose(0, 1)
        o = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v
        if mode == "target":
            ref_out[b] = o
        else:
            ref_out[b, :, :n] = o[:, :n]
    (ref_out * g.double()).sum().backward()
    err = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    assert err < 2e-2, f"out: relative error {err:.2e}"
    for name, t, r in zip(("q", "k", "v"), tables, ref_tables):
        assert t.grad is not None and not torch.isnan(t.grad).any(), name
        err = ((t.grad.double() - r.grad).norm() / r.grad.norm()).item()
        assert err < 3e-2, f"{name} table: relative error {err:.2e}"


def test_tokenized_attention_trains_sharded_embeddings():
    """nranks = 2 over an in-process group (each rank a thread on this GPU,
    its embedding_fn serving only the ids it owns): the all-to-all of
    embedding rows is recorded too, so each rank's backward returns the
    gradients of the rows it fetched to their owners. Summed over the ranks,
    the parameters' gradients match float64 autograd through both ranks'
    batches on one table."""
    import math
    import threading
    B, H, Hkv, D, _ = gpu_cases.TOKENIZED[0]
    V, L, n = 300, 257, 2
    gen = torch.Generator().manual_seed(5)
    init = [(torch.randn(V, h, D, generator=gen) * 0.5).to("cuda", torch.bfloat16)
            for h in (H, Hkv, Hkv)]
    batches = [(torch.randint(0, 60, (B, L), generator=gen).cuda(),
                torch.tensor([L, 0, 133], device="cuda")) for _ in range(n)]
    gs = [torch.randn(B, H, L, D, generator=gen).cuda() for _ in range(n)]
    tables = [[t.clone().requires_grad_() for t in init] for _ in range(n)]
    group = attn.InProcessGroup(n, timeout=60)
    errors = []

    def rank_main(r):
        try:
            def shard(ids):
                assert bool((ids % n == r).all()), "asked for another rank's ids"
                return tuple(t[ids.long()] for t in tables[r])
            layer = attn.TokenizedAttention(B, L, n, shard, group=group.member(r), heads=H,
                                            kv_heads=Hkv, head_dim=D, package_dir=PKGS)
            out = layer(*batches[r])
            assert out.requires_grad
            (out.float() * gs[r]).sum().backward()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"rank {r}: {e!r}")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ref = [t.double().requires_grad_() for t in init]
    loss = 0
    for (tokens, lengths), g in zip(batches, gs):
        for b in range(B):
            m = int(lengths[b])
            if m == 0:
                continue
            q = ref[0][tokens[b, :m]].transpose(0, 1)
            k = ref[1][tokens[b, :m]].repeat_interleave(H // Hkv, 1).transpose(0, 1)
            v = ref[2][tokens[b, :m]].repeat_interleave(H // Hkv, 1).transpose(0, 1)
            o = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v
            loss = loss + (o * g[b, :, :m].double()).sum()
    loss.backward()
    for i, name in enumerate("qkv"):
        for r in range(n):  # a rank's parameters get gradients of its own ids only
            grad = tables[r][i].grad
            assert grad is not None, (name, r)
            others = torch.arange(V, device="cuda") % n != r
            assert (grad[others] == 0).all(), (name, r)
        got = sum(tables[r][i].grad.double() for r in range(n))
        err = ((got - ref[i].grad).norm() / ref[i].grad.norm()).item()
        assert err < 3e-2, f"{name}: relative error {err:.2e}"
