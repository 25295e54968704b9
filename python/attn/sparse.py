"""The sparse-attention API of the project's seeds (seeds/sparse-attention-
readme.md, after the code of Child et al.'s Sparse Transformers): q, k, v are
[B, L, E] with `heads` heads side by side in E, and `attn_mode` names the
pattern.

    from attn.sparse import SparseAttention, attention_impl, blocksparse_attention_impl
    out = attention_impl(q, k, v, heads=4, attn_mode="strided", local_attn_ctx=32)
    layer = SparseAttention(heads=4, attn_mode="local", local_attn_ctx=128)
    out = layer(q, k, v)                                  # [B, L, E]

The modes mean what Child et al.'s `get_attn_mask` says, position p over key
j, both in [0, L):

    all       j <= p                                    attn pattern causal
    local     j <= p and p - j < local_attn_ctx         local(window = ctx)
    strided   j <= p and (p - j) % local_attn_ctx == 0  strided(stride = ctx, local = 1)

with the softmax scaled by 1/sqrt(E / heads). Every mode is one attn
package: the kernels follow the exact pattern through closed-form tile
schedules, so no mask is built and `blocksize` (the block granularity of
the original block-sparse kernels) changes nothing in the result; it is
checked and kept so that calls written for the original run unchanged.

Inputs are NumPy arrays or PyTorch CPU tensors (float32 on the cpu target;
other float types are computed in float32 and returned in their own type)
or PyTorch CUDA tensors of bf16 or f16 (the GPU's target, sm_90a on
compute capability 9.0 and sm_80 on 8.x). Packages are compiled on first use,
one per (mode, context, batch, heads, head dim, dtype, target): into
`package_dir` if given, where later layers (and machines without the
compiler) load them, else through attn.compile's package cache. The sequence
length is dynamic: one package serves every L.
"""

import ctypes
import threading

import numpy as np

from . import (_BF16, _F16, AttnError, _c_layout, _is_torch, _keep, _load_or_compile,
               _Tensor, _torch_compiling)

__all__ = ["SparseAttention", "attention_impl", "blocksparse_attention_impl", "MODES"]

MODES = ("all", "local", "strided")


def _positive_int(name, value, what="an int >= 1"):
    """value as an int, or AttnError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise AttnError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def _pattern(attn_mode, local_attn_ctx):
    """The attn pattern of a mode (checked), as a spec's `pattern` object."""
    if attn_mode not in MODES:
        raise AttnError(f"attn_mode: unknown mode {attn_mode!r} (expected one of: "
                        + ", ".join(MODES) + ")")
    if attn_mode == "all":
        return {"causal": {}}
    what = "the window" if attn_mode == "local" else "the stride"
    ctx = _positive_int("local_attn_ctx", local_attn_ctx,
                        f"an int >= 1 for attn_mode {attn_mode!r} ({what})")
    if attn_mode == "local":
        return {"local": {"window": ctx}}
    return {"strided": {"stride": ctx, "local": 1}}


def _gpu_target(device):
    """sm_90a on compute capability 9.0, sm_80 on 8.x (its cubins run on
    every 8.x GPU)."""
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        return "sm_90a"
    if major == 8:
        return "sm_80"
    raise AttnError(f"{device}: compute capability {major}.{minor} has no attn target "
                    "(sm_80 for 8.x, sm_90a for 9.0); pass target= to choose one")


class SparseAttention:
    """A sparse attention layer over [B, L, E] inputs (the seeds' API).

    heads: heads in E (default: E // 64, at least 1, so that a head has 64
    elements where E allows it); attn_mode: "all", "local" or "strided";
    local_attn_ctx: the window (local) or stride (strided); block_size: the
    original kernels' block size, checked (an int >= 1) and otherwise unused
    (module docstring). target: the GPU target for CUDA tensors (default from
    the device); package_dir: a folder for the compiled packages.

    Gradients: on tensors that require grad (with grad mode on) the call
    records a backward node, computed by the layer's package compiled with
    "backward": true (docs/Backward.md): a CPU package on CPU tensors, a
    GPU package on CUDA tensors.
    """

    def __init__(self, heads=None, attn_mode="all", local_attn_ctx=None, block_size=32,
                 target=None, package_dir=None):
        self.pattern = _pattern(attn_mode, local_attn_ctx)
        self.heads = None if heads is None else _positive_int("heads", heads)
        self.attn_mode = attn_mode
        self.local_attn_ctx = None if attn_mode == "all" else int(local_attn_ctx)
        self.block_size = _positive_int("block_size", block_size)
        self.target = target
        self.package_dir = package_dir
        self._packages = {}
        self._targets = {}  # CUDA device index -> target
        self._calls = {}  # C tensors by layout (and thread), for _forward_torch

    def __repr__(self):
        ctx = "" if self.local_attn_ctx is None else f", local_attn_ctx={self.local_attn_ctx}"
        return (f"SparseAttention(heads={self.heads}, attn_mode={self.attn_mode!r}{ctx}, "
                f"block_size={self.block_size})")

    # -- packages ----------------------------------------------------------

    def heads_for(self, embed):
        """The heads of an E-wide input: `heads`, or E // 64 (at least 1)."""
        heads = self.heads if self.heads is not None else max(1, embed // 64)
        if embed % heads:
            raise AttnError(f"q: embedding size {embed} is not a multiple of heads = {heads}")
        return heads

    def package_spec(self, batch, embed, dtype, target, backward=False):
        """The spec of the package for [batch, L, embed] inputs of `dtype`
        ("f32", "bf16", "f16") on `target` (with its backward pass and lse
        where `backward`); its name says its shape, so that a folder can hold
        the packages of several layers."""
        heads = self.heads_for(embed)
        ctx = "" if self.local_attn_ctx is None else str(self.local_attn_ctx)
        name = (f"sparse_{self.attn_mode}{ctx}_b{batch}_h{heads}_d{embed // heads}"
                f"_{dtype}_{target}" + ("_grad" if backward else ""))
        spec = {"name": name, "dtype": dtype, "batch": batch, "heads": heads,
                "head_dim": embed // heads, "lse": backward, "pattern": self.pattern}
        if backward:
            spec["backward"] = True
        return spec

    def package(self, batch, embed, dtype="f32", target="cpu", backward=False):
        """The package for [batch, L, embed] inputs, compiled on first use
        (into package_dir, or through attn.compile's cache) or loaded from
        package_dir."""
        key = (batch, embed, dtype, target, backward)
        if key not in self._packages:
            spec = self.package_spec(batch, embed, dtype, target, backward)
            self._packages[key] = _load_or_compile(spec, target, self.package_dir)
        return self._packages[key]

    # -- the call ----------------------------------------------------------

    def __call__(self, q, k, v):
        return self.forward(q, k, v)

    def forward(self, q, k, v):
        """Sparse attention of q over k, v, all [B, L, E]: the output [B, L, E]
        (heads side by side in E, as the inputs), of q's type and device."""
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != tuple(q.shape):
                raise AttnError(f"{name}: shape {tuple(x.shape)}, expected q's shape "
                                f"{tuple(q.shape)} ([B, L, E])")
        if len(q.shape) != 3:
            raise AttnError(f"q: shape {tuple(q.shape)}, expected [B, L, E]")
        if _is_torch(q):
            return self._forward_torch(q, k, v)
        return self._forward_numpy(np.asarray(q), np.asarray(k), np.asarray(v))

    def _forward_numpy(self, q, k, v):
        if not np.issubdtype(q.dtype, np.floating):
            raise AttnError(f"q: expected floating-point values, got {q.dtype}")
        B, L, E = q.shape
        pkg = self.package(B, E)
        H = self.heads_for(E)
        split = lambda x: np.ascontiguousarray(
            x.astype(np.float32, copy=False).reshape(B, L, H, E // H).transpose(0, 2, 1, 3))
        out = pkg(split(q), split(k), split(v))           # [B, H, L, D]
        return out.transpose(0, 2, 1, 3).reshape(B, L, E).astype(q.dtype, copy=False)

    def _forward_torch(self, q, k, v):
        import torch
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.device != q.device or x.dtype != q.dtype:
                raise AttnError(f"{name}: expected a tensor of q's dtype {q.dtype} on "
                                f"{q.device}, got {getattr(x, 'dtype', type(x).__name__)} on "
                                f"{getattr(x, 'device', '?')}")
        training = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if training and q.device.type != "cuda":
            return _cpu_autograd().apply(self, q, k, v)
        if q.device.type != "cuda":
            out = self._forward_numpy(*(x.detach().float().numpy() for x in (q, k, v)))
            return torch.from_numpy(out).to(q.dtype)
        dtypes = {torch.bfloat16: "bf16", torch.float16: "f16"}
        if q.dtype not in dtypes:
            raise AttnError(f"q: dtype {q.dtype} on {q.device}: the GPU kernels take "
                            "torch.bfloat16 or torch.float16 (cast with .bfloat16())")
        B, L, E = q.shape
        device = q.device.index
        target = self.target or self._device_target(device)
        H = self.heads_for(E)
        if training:
            # The package with its backward pass: autograd records attn::run,
            # whose backward runs the package's backward kernels (or, for q,
            # k and v sliced from one fused projection, one node on the
            # projection, whose gradient the kernels write in place: the
            # package call sees its head views as parts of it).
            return self._forward_views(self.package(B, E, dtypes[q.dtype], target,
                                                    backward=True), q, k, v, H)
        pkg = self.package(B, E, dtypes[q.dtype], target)
        if _torch_compiling():
            return self._forward_views(pkg, q, k, v, H)

        # The kernels read the [B, H, L, D] views of the [B, L, H, D] inputs
        # (slices of a fused qkv projection included) in place where the
        # runtime's layout rules hold: E's elements contiguous, the other
        # strides multiples of 8 elements, 16-byte aligned data, k and v
        # alike. A copy otherwise. The views exist only as C tensors (data,
        # shape, strides): torch views would cost more host time than the
        # kernels of a short sequence (bench/host_overhead.py).
        def in_place(x):
            s = x.stride()
            return s[2] == 1 and s[0] % 8 == 0 and s[1] % 8 == 0 and x.data_ptr() % 16 == 0

        if not in_place(q):
            q = q.contiguous()
        if not (in_place(k) and in_place(v) and k.stride() == v.stride()):
            k, v = k.contiguous(), v.contiguous()
        out = torch.empty(B, L, E, device=q.device, dtype=q.dtype)
        # The C tensors of a layout are kept and only their data pointers
        # set on later calls (as Package's own calls do); one set per thread.
        key = (q.shape, q.stride(), k.stride(), v.stride(), q.dtype, device, H,
               threading.get_ident())
        call = self._calls.get(key)
        if call is None:
            code = _BF16 if q.dtype == torch.bfloat16 else _F16
            tensors = [self._heads_tensor(x, H, code) for x in (q, k, v, out)]
            tq, tk, tv, tout = tensors
            ptrs = [ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv), None,
                    ctypes.byref(tout), None]
            call = _keep(self._calls, key, (tensors, ptrs), 64)
        else:
            tq, tk, tv, tout = call[0]
            tq.data, tk.data, tv.data = q.data_ptr(), k.data_ptr(), v.data_ptr()
            tout.data = out.data_ptr()
        pkg._launch(device, call[1])
        return out

    def _forward_views(self, pkg, q, k, v, H):
        """The call through torch views and the package's operator
        (attn::run): what torch.compile's graph records, and autograd
        (whose backward runs a backward package's kernels)."""
        B, L, E = q.shape
        D = E // H
        heads = lambda x: x.reshape(B, L, H, D).transpose(1, 2)
        out = pkg(heads(q), heads(k), heads(v))
        return out.transpose(1, 2).reshape(B, L, E)

    def _device_target(self, device):
        """The target of CUDA device `device` (an index), looked up once."""
        target = self._targets.get(device)
        if target is None:
            import torch
            target = self._targets[device] = _gpu_target(torch.device("cuda", device))
        return target

    @staticmethod
    def _heads_tensor(x, H, code):
        """The C tensor of the [B, H, L, D] view of x [B, L, E] (E's stride 1):
        shape (B, H, L, D), strides (x's batch stride, D, x's row stride, 1)."""
        (B, L, E), (sb, sl, _) = x.shape, x.stride()
        D = E // H
        shape, strides = _c_layout((B, H, L, D), (sb, D, sl, 1))
        return _Tensor(x.data_ptr(), shape, 4, code, strides)


_cpu_function = None


def _cpu_autograd():
    """The torch.autograd.Function of a layer on CPU tensors: the forward
    through a package with its backward pass, which the backward calls on
    the saved out and lse (docs/Backward.md)."""
    global _cpu_function
    if _cpu_function is None:
        import torch

        class SparseCpuAttention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, layer, q, k, v):
                B, L, E = q.shape
                H = layer.heads_for(E)
                pkg = layer.package(B, E, backward=True)
                split = lambda x: np.ascontiguousarray(
                    x.detach().float().numpy().reshape(B, L, H, E // H).transpose(0, 2, 1, 3))
                qs, ks, vs = split(q), split(k), split(v)
                out, lse = pkg(qs, ks, vs, return_lse=True)
                ctx.saved = (pkg, qs, ks, vs, out, lse, split, q.dtype)
                return torch.from_numpy(
                    out.transpose(0, 2, 1, 3).reshape(B, L, E).copy()).to(q.dtype)

            @staticmethod
            def backward(ctx, grad):
                pkg, qs, ks, vs, out, lse, split, dtype = ctx.saved
                B, H, L, D = qs.shape
                grads = pkg.backward(qs, ks, vs, out, lse, split(grad))
                merge = lambda g: torch.from_numpy(
                    g.transpose(0, 2, 1, 3).reshape(B, L, H * D).copy()).to(dtype)
                return (None,) + tuple(merge(g) for g in grads)

        _cpu_function = SparseCpuAttention
    return _cpu_function


# One layer per (heads, mode, context, target, package_dir), so that repeated
# calls of the functions below reuse their loaded packages.
_layers = {}


def _layer(heads, attn_mode, local_attn_ctx, target, package_dir):
    heads = _positive_int("heads", heads)
    key = (heads, attn_mode, local_attn_ctx, target, package_dir)
    layer = _layers.get(key)
    if layer is None:
        layer = SparseAttention(heads, attn_mode, local_attn_ctx, target=target,
                                package_dir=package_dir)
        _layers[key] = layer
    return layer


def attention_impl(q, k, v, heads, attn_mode, local_attn_ctx=None, *, target=None,
                   package_dir=None):
    """Attention of [B, L, E] inputs with `heads` heads under `attn_mode`
    ("all", "local", "strided"; local_attn_ctx the window or stride): the
    output [B, L, E]. The seeds' dense reference form; here it runs the
    same sparse kernels as blocksparse_attention_impl."""
    return _layer(heads, attn_mode, local_attn_ctx, target, package_dir)(q, k, v)


def blocksparse_attention_impl(q, k, v, heads, attn_mode, local_attn_ctx=None, blocksize=32,
                               num_verts=None, vertsize=None, *, target=None, package_dir=None):
    """attention_impl's result. blocksize is checked (an int >= 1) and
    otherwise changes nothing (module docstring); num_verts and vertsize
    belong to the original's "fixed" mode, which attn does not offer."""
    _positive_int("blocksize", blocksize)
    if num_verts is not None or vertsize is not None:
        raise AttnError("num_verts / vertsize: the \"fixed\" mode's summary columns are not "
                        "an attn pattern; modes: " + ", ".join(MODES))
    return _layer(heads, attn_mode, local_attn_ctx, target, package_dir)(q, k, v)
