"""attn: compile attention specs and run the packages from Python.

    import attn, numpy as np
    pkg = attn.compile({"name": "local", "heads": 4, "head_dim": 64,
                        "pattern": {"local": {"window": 128}}})
    out, lse = pkg(q, k, v, return_lse=True)      # NumPy float32 arrays

`compile` runs the `attn-compile` driver; packages run through the runtime's
C API (libattn_runtime.so) with ctypes. The CPU target takes NumPy arrays;
GPU targets (sm_90a, sm_80) take PyTorch CUDA tensors of the spec's dtype.
"""

import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref

import numpy as np

__all__ = ["compile", "load", "Package", "AttnError", "TokenizedAttention", "TableEmbedding",
           "SparseAttention"]


class AttnError(RuntimeError):
    """A spec, package or argument error reported by the compiler or runtime."""


# Live packages by number: the attn::run operator (_torchop.py) names its
# package by this number inside torch.compile's graphs.
_registry = weakref.WeakValueDictionary()
_next_id = itertools.count()
# Loads of a package on a further GPU (Package._handle_on).
_load_lock = threading.Lock()


def _torch_compiling():
    """Whether torch.compile is tracing this call (given torch tensors)."""
    import torch
    return torch.compiler.is_compiling()


def _torch_needs_grad(*tensors):
    """Whether autograd would record a call on these torch tensors: the call
    then goes through attn::run, whose backward runs the package's backward
    kernels (or raises where it has none)."""
    import torch
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop: any() over a generator costs a µs a call)
        if t is not None and getattr(t, "requires_grad", False):
            return True
    return False


def _build_dir():
    env = os.environ.get("ATTN_BUILD_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "build"))


def _tool(name):
    path = os.path.join(_build_dir(), "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise AttnError(f"{name} not found: build attn (scripts/setup.sh) or set ATTN_BUILD_DIR")
    return found


class _Tensor(ctypes.Structure):
    # attn_tensor (include/attn-c/attn.h); strides NULL: C-contiguous.
    _fields_ = [("data", ctypes.c_void_p), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("rank", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("strides", ctypes.POINTER(ctypes.c_int64))]


_F32, _I32, _BF16, _F16 = 0, 1, 2, 3
_lib = None
# C shape and stride arrays by layout, shared by calls (the runtime only
# reads them): a call on tensors of a layout seen before builds none (each
# array costs about a µs, and a call's host time is many such small steps:
# bench/host_overhead.py).
_layouts = {}


def _keep(cache, key, value, limit):
    """Stores value under key in a cache of at most `limit` entries (emptied
    when full: the caches below hold what recent calls built, by layout)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


# The float32 sums of a package that finishes stored gradients take at most
# this many bytes a call (or one group of heads, if that is more). Fewer
# pairs a round cost time (smaller grids: LongNet's backward at L = 131072
# +3% at 4 pairs a round, +15-17% at 1; bench/gpu_long_h100.md), so the
# budget keeps every pair of the benchmarks' sizes in one round.
_SUMS_BYTES = 4 << 30


def _sum_pairs(B, H, Hkv, Lq, Lk, D):
    """How many (batch, head) pairs the float32 sums of a backward call hold
    (attn_package_run_backward_with_sums_async runs the kernels that many
    pairs at a time): all B * H where their sums fit in _SUMS_BYTES, else
    the most whole groups of the H // Hkv query heads of a kv head that do,
    at least one group. Over 2^20 tokens with 16 heads of 128 the sums then
    take 3.2 GB (two pairs) instead of 26 (docs/Backward.md)."""
    group = H // Hkv
    per_group = (group * Lq + 2 * Lk) * D * 4
    groups = max(1, _SUMS_BYTES // per_group)
    return min(B * H, groups * group)


def _dense(t):
    """Whether the tensor's elements fill its storage span without gaps or
    overlaps (any order of dimensions): torch.empty_like keeps its strides."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _c_layout(shape, strides=None):
    """The ctypes arrays (shape, strides or None) of a layout: `shape` and
    `strides` tuples (or torch.Size), strides None for C-contiguous."""
    key = (shape, strides)
    arrays = _layouts.get(key)
    if arrays is None:
        int64s = lambda values: (ctypes.c_int64 * len(values))(*values)
        arrays = _keep(_layouts, key,
                       (int64s(shape), None if strides is None else int64s(strides)), 256)
    return arrays


_raw_stream_fn = None
_current_device_fn = None


def _current_device():
    """The index of the current CUDA device. torch._C._cuda_getDevice is
    what torch.cuda.current_device() returns after its lazy-init check,
    which costs more than the lookup itself; the caller holds CUDA tensors,
    so CUDA is initialised."""
    global _current_device_fn
    if _current_device_fn is None:
        import torch
        _current_device_fn = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
    return _current_device_fn()


def _on_device(device):
    """A context with CUDA device `device` (an index) current: the runtime
    runs kernels in the context they were loaded in. A device switch costs
    several µs, so it is made only where it is needed."""
    import torch
    if _current_device() == device:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _raw_stream(device):
    """The handle of CUDA device `device`'s (an index) current stream, as an
    int. torch._C._cuda_getCurrentRawStream is what torch.compile's own
    generated code calls; it costs a fraction of
    torch.cuda.current_stream(device).cuda_stream, the fallback."""
    global _raw_stream_fn
    if _raw_stream_fn is None:
        import torch
        _raw_stream_fn = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda index: torch.cuda.current_stream(index).cuda_stream)
    return _raw_stream_fn(device)


def _runtime():
    global _lib
    if _lib is None:
        path = os.path.join(_build_dir(), "lib", "libattn_runtime.so")
        if not os.path.exists(path):
            raise AttnError(f"{path} not found: build attn first (scripts/setup.sh)")
        lib = ctypes.CDLL(path)
        lib.attn_package_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.attn_package_free.argtypes = [ctypes.c_void_p]
        lib.attn_package_uses_lengths.argtypes = [ctypes.c_void_p]
        lib.attn_package_has_lse.argtypes = [ctypes.c_void_p]
        lib.attn_package_target.argtypes = [ctypes.c_void_p]
        lib.attn_package_target.restype = ctypes.c_char_p
        lib.attn_package_device.argtypes = [ctypes.c_void_p]
        lib.attn_package_device.restype = ctypes.c_int
        lib.attn_package_run.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 6
        lib.attn_package_run_biased.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 7
        lib.attn_package_uses_key_bias.argtypes = [ctypes.c_void_p]
        lib.attn_package_has_backward.argtypes = [ctypes.c_void_p]
        lib.attn_package_stores_gradients.argtypes = [ctypes.c_void_p]
        lib.attn_package_run_backward.argtypes = ([ctypes.c_void_p]
                                                  + [ctypes.POINTER(_Tensor)] * 11)
        lib.attn_package_run_backward_async.argtypes = ([ctypes.c_void_p]
                                                        + [ctypes.POINTER(_Tensor)] * 11
                                                        + [ctypes.c_void_p])
        lib.attn_package_finishes_gradients.argtypes = [ctypes.c_void_p]
        lib.attn_package_run_backward_with_sums_async.argtypes = (
            [ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 14 + [ctypes.c_void_p])
        lib.attn_package_uses_key_ids.argtypes = [ctypes.c_void_p]
        lib.attn_package_run_keys.argtypes = ([ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 8
                                              + [ctypes.c_void_p])
        lib.attn_package_run_async.argtypes = ([ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 6
                                               + [ctypes.c_void_p])
        lib.attn_package_dedup_max_len.argtypes = [ctypes.c_void_p]
        lib.attn_package_dedup_max_len.restype = ctypes.c_int64
        lib.attn_package_dedup_keys.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                                                + [ctypes.c_void_p] * 5)
        lib.attn_package_ranks.argtypes = [ctypes.c_void_p]
        lib.attn_package_ranks.restype = ctypes.c_int64
        for fn in (lib.attn_package_rank_positions, lib.attn_package_rank_key_positions):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
            fn.restype = ctypes.c_int64
        lib.attn_package_run_ranks.argtypes = ([ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 6
                                               + [ctypes.POINTER(ctypes.c_int64)])
        lib.attn_package_run_ranks_backward.argtypes = ([ctypes.c_void_p]
                                                        + [ctypes.POINTER(_Tensor)] * 10
                                                        + [ctypes.POINTER(ctypes.c_int64)])
        lib.attn_nccl_unique_id.argtypes = [ctypes.c_char_p]
        lib.attn_package_join.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_char_p]
        lib.attn_package_run_rank.argtypes = ([ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 6
                                              + [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)])
        lib.attn_package_wait_rank.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
        lib.attn_package_run_rank_backward.argtypes = ([ctypes.c_void_p]
                                                       + [ctypes.POINTER(_Tensor)] * 10
                                                       + [ctypes.c_void_p,
                                                          ctypes.POINTER(ctypes.c_int64)])
        lib.attn_package_step_ms.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                             ctypes.c_int]
        lib.attn_hub_create.argtypes = [ctypes.c_int, ctypes.c_double,
                                        ctypes.POINTER(ctypes.c_void_p)]
        lib.attn_hub_free.argtypes = [ctypes.c_void_p]
        lib.attn_hub_member.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_void_p)]
        lib.attn_nccl_member.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                         ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.attn_member_free.argtypes = [ctypes.c_void_p]
        lib.attn_all_to_all.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p]
        lib.attn_last_error.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def _tensor(name, array, dtype, code, keep):
    if not isinstance(array, np.ndarray):
        raise AttnError(f"{name}: expected a NumPy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise AttnError(f"{name}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    array = np.ascontiguousarray(array)
    shape = (ctypes.c_int64 * array.ndim)(*array.shape)
    keep.extend([array, shape])
    return _Tensor(array.ctypes.data, shape, array.ndim, code)


def _numpy_backward_args(q, k, v, out, lse, grad_out, lengths, key_bias):
    """attn_package_run_backward's tensor arguments on float32 NumPy arrays:
    (pointers in its order, the new gradients dq, dk, dv (NaN-poisoned: the
    kernels must write every element), the arrays the pointers need)."""
    keep = []
    named = [("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse),
             ("grad_out", grad_out)]
    ts = [_tensor(n, np.asarray(a), np.float32, _F32, keep) for n, a in named]
    tl = tb = None
    if lengths is not None:
        tl = _tensor("lengths", np.asarray(lengths).astype(np.int32), np.int32, _I32, keep)
    if key_bias is not None:
        tb = _tensor("key_bias", np.asarray(key_bias), np.float32, _F32, keep)
    grads = tuple(np.full(np.shape(a), np.nan, dtype=np.float32) for a in (q, k, v))
    tg = [_tensor(n, g, np.float32, _F32, keep) for n, g in zip(("dq", "dk", "dv"), grads)]
    ref = lambda x: ctypes.byref(x) if x is not None else None
    return [ref(t) for t in ts + [tl, tb] + tg], grads, keep


def _numpy_args(q, k, v, lengths, return_lse, out):
    """float32 NumPy inputs as C tensors (`ptrs`: q, k, v, lengths, out, lse),
    with NaN-poisoned outputs."""
    keep = []
    tq = _tensor("q", q, np.float32, _F32, keep)
    tk = _tensor("k", k, np.float32, _F32, keep)
    tv = _tensor("v", v, np.float32, _F32, keep)
    tl = None
    if lengths is not None:
        tl = _tensor("lengths", np.asarray(lengths).astype(np.int32), np.int32, _I32, keep)
    if out is None:
        out = np.full(q.shape, np.nan, dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.flags.c_contiguous):
        # _tensor would copy it, and the kernels would write the copy.
        raise AttnError("out: cpu packages write a C-contiguous float32 NumPy array "
                        "(np.ascontiguousarray(out) first)")
    lse = np.full(q.shape[:-1], np.nan, dtype=np.float32) if q.ndim == 4 else None
    tout = _tensor("out", out, np.float32, _F32, keep)
    tlse = _tensor("lse", lse, np.float32, _F32, keep) if (return_lse and lse is not None) else None
    ref = lambda t: ctypes.byref(t) if t is not None else None
    return {"ptrs": [ref(tq), ref(tk), ref(tv), ref(tl), ref(tout), ref(tlse)],
            "out": out, "lse": lse, "keep": (keep, tq, tk, tv, tl, tout, tlse)}


class Package:
    """A compiled attention package (a directory with manifest.json)."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        handle = ctypes.c_void_p()
        lib = _runtime()
        if lib.attn_package_load(path.encode(), ctypes.byref(handle)) != 0:
            raise AttnError(lib.attn_last_error().decode())
        self._handle = handle
        self.target = lib.attn_package_target(handle).decode()
        self.uses_lengths = bool(lib.attn_package_uses_lengths(handle))
        self.uses_key_bias = bool(lib.attn_package_uses_key_bias(handle))
        self.uses_key_ids = bool(lib.attn_package_uses_key_ids(handle))
        self.has_lse = bool(lib.attn_package_has_lse(handle))
        self.has_backward = bool(lib.attn_package_has_backward(handle))
        # GPU packages of one component, or of several that finish them,
        # store gradients of the input type in any layout (backward's
        # `grads`); the others add into float32.
        self.stores_gradients = bool(lib.attn_package_stores_gradients(handle))
        # Storing gradients here also takes float32 sums of the earlier
        # components (several components, each element's last writer
        # finishing it).
        self.finishes_gradients = bool(lib.attn_package_finishes_gradients(handle))
        self.ranks = int(lib.attn_package_ranks(handle))  # 0: not a ring package
        # GPU kernels run only in the CUDA context they were loaded in: the
        # package loads itself again for each further GPU its tensors are on.
        self._device_handles = {}
        if self.target != "cpu":
            self._device_handles[lib.attn_package_device(handle)] = handle
        self.bytes_sent = None
        self._plans = {}  # C tensors by layout (and thread), for _call_torch
        self._id = next(_next_id)
        _registry[self._id] = self
        if "torch" in sys.modules and self.target != "cpu":
            from . import _torchop  # noqa: F401  (registers attn::run for torch.compile)

    def __del__(self):
        if _lib is None:
            return
        for handle in getattr(self, "_device_handles", {}).values():
            if handle is not getattr(self, "_handle", None):
                _lib.attn_package_free(handle)
        self._device_handles = {}
        if getattr(self, "_handle", None):
            _lib.attn_package_free(self._handle)
            self._handle = None

    # A package is compiled code and its runtime state: copies share it
    # (copy.deepcopy of a model, say for an average of its weights, keeps
    # using the one package), and a pickled package is its folder, loaded
    # again when unpickled (torch.save of a module, multiprocessing).
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (Package, (self.path,))

    def _handle_on(self, device):
        """The runtime's package loaded on CUDA device `device` (an index),
        loading it there on first use."""
        handle = self._device_handles.get(device)
        if handle is None:
            import torch
            with _load_lock:  # one load per device, whichever thread comes first
                handle = self._device_handles.get(device)
                if handle is None:
                    handle = ctypes.c_void_p()
                    lib = _runtime()
                    with torch.cuda.device(device):
                        if lib.attn_package_load(self.path.encode(),
                                                 ctypes.byref(handle)) != 0:
                            raise AttnError(lib.attn_last_error().decode())
                    self._device_handles[device] = handle
        return handle

    def __call__(self, q, k, v, lengths=None, return_lse=False, out=None, key_bias=None,
                 key_ids=None):
        """Attention of q [B,H,Lq,D] over k, v [B,Hkv,Lk,D].

        key_bias [B,Lk] (float32; packages compiled with "key_bias": true) is
        added to every score of a key: log(count) for deduplicated tokens,
        -inf for keys to ignore (docs/Tokenized.md). With key_ids [B,Lk]
        (int32; "key_ids": true) k and v are embedding tables [1,Hkv,V,D]
        and key j of batch b is their row key_ids[b, j], read in place.

        CPU packages take float32 NumPy arrays. GPU packages take PyTorch CUDA
        tensors of the package's dtype (bf16 or f16) on one device: q, k and v
        contiguous or strided views whose last dimension is contiguous (the
        [B,H,L,D] view x.transpose(1, 2) of a [B,L,H,D] tensor runs without a
        copy; k and v share strides), out contiguous or a view of the same
        kind (kernels write the [B, H, L, D] view of a [B, L, H, D] tensor in
        place); lengths is an int32 tensor on that device. GPU kernels are
        queued on the current CUDA stream. `out` may give the output buffer;
        otherwise it is allocated in q's layout (torch.empty_like(q): a
        [B,H,L,D] view of a [B,L,H,D] q gets a [B,L,H,D]-ordered out).
        Returns the output [B,H,Lq,D], and the LSE [B,H,Lq] (float32) with
        return_lse=True.

        Under torch.compile the call becomes the operator attn::run in the
        compiled graph (docs/Package.md). On tensors that require grad, a
        GPU package compiled with "backward": true gives q, k and v their
        gradients through autograd (its backward kernels); other packages
        raise AttnError in the backward pass. Packages compiled with
        "backward": true also have Package.backward (NumPy or CUDA).
        """
        if return_lse and not self.has_lse:
            raise AttnError("this package was compiled with \"lse\": false")
        if _is_torch(q):
            if _torch_compiling() or _torch_needs_grad(q, k, v, key_bias):
                from . import _torchop
                if not (_torch_compiling() or return_lse or out is not None or key_ids is not None):
                    # q, k and v parts of one fused projection: one backward
                    # node on it, its gradient written in place.
                    res = _torchop.projection_call(self, q, k, v, lengths, key_bias)
                    if res is not None:
                        return res
                return _torchop.call(self, q, k, v, lengths, return_lse, out, key_bias,
                                     key_ids)
            return self._call_torch(q, k, v, lengths, return_lse, out, key_bias, key_ids)
        if self.target != "cpu":
            raise AttnError(f"package {self.manifest['name']} targets {self.target}: "
                            "pass PyTorch CUDA tensors (NumPy arrays run on cpu packages)")
        t = _numpy_args(q, k, v, lengths, return_lse, out)
        lib = _runtime()
        keep = t["keep"][0]
        tb = ti = None
        if key_bias is not None:
            tb = _tensor("key_bias", np.asarray(key_bias), np.float32, _F32, keep)
        if key_ids is not None:
            ids = np.asarray(key_ids)
            if not np.issubdtype(ids.dtype, np.integer):
                raise AttnError(f"key_ids: expected integer ids, got {ids.dtype}")
            ti = _tensor("key_ids", ids.astype(np.int32), np.int32, _I32, keep)
        p = t["ptrs"]
        ref = lambda x: ctypes.byref(x) if x is not None else None
        rc = lib.attn_package_run_keys(self._handle, *p[:4], ref(tb), ref(ti), *p[4:], None)
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())
        return (t["out"], t["lse"]) if return_lse else t["out"]

    def dedup_keys(self, tokens, lengths):
        """The unique ids of B token sequences, on the GPU (GPU packages
        compiled with "key_ids": true; docs/Tokenized.md): tokens [B, L] and
        lengths [B] integer CUDA tensors in, and out, queued on the current
        stream without waiting:

          key_ids  [B, L] int32    each sequence's unique ids, ascending (0 past them)
          key_bias [B, L] float32  log(count) of each (-inf past them)
          slot_at  [B, L] int64    each position's index into its row (-1 past the length)
          info     [B, 4] int64    unique ids, the length as given, smallest and largest id

        so that key_ids[:, :U] and key_bias[:, :U], U = info[:, 0].max(), are
        the keys of the attention call. Lengths are clamped to [0, L]; the
        ids are not checked (info says their range). Returns None where the
        package has no such kernel or L is longer than it sorts
        (dedup_max_len)."""
        import torch
        B, L = tokens.shape
        if not 0 < L <= self.dedup_max_len:
            return None
        tokens = tokens.to(torch.int64).contiguous()
        lengths = lengths.to(device=tokens.device, dtype=torch.int64).contiguous()
        new = lambda dtype, *shape: torch.empty(shape, dtype=dtype, device=tokens.device)
        key_ids, key_bias = new(torch.int32, B, L), new(torch.float32, B, L)
        slot_at, info = new(torch.int64, B, L), new(torch.int64, B, 4)
        device = tokens.device.index
        lib = _runtime()
        with _on_device(device):
            rc = lib.attn_package_dedup_keys(
                self._handle_on(device), tokens.data_ptr(), lengths.data_ptr(), B, L,
                key_ids.data_ptr(), key_bias.data_ptr(), slot_at.data_ptr(), info.data_ptr(),
                _raw_stream(device))
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())
        return key_ids, key_bias, slot_at, info

    @property
    def dedup_max_len(self):
        """The longest sequence dedup_keys takes (0: no dedup_keys kernel)."""
        return int(_runtime().attn_package_dedup_max_len(self._handle))

    def backward(self, q, k, v, out, lse, grad_out, lengths=None, key_bias=None,
                 grads=None):
        """The backward pass (docs/Backward.md) of a package compiled with
        "backward": true: from the forward's q, k, v (and its lengths and
        key_bias, as the package takes them), its out and lse
        (pkg(q, k, v, return_lse=True)) and grad_out, the gradient of a loss
        with respect to out, returns (dq, dk, dv) in float32 shaped like q,
        k and v: NumPy arrays on the CPU target, CUDA tensors (queued on the
        current stream) on GPU targets. key_bias gets no gradient.

        GPU targets: `grads`, a tuple (dq, dk, dv) of CUDA tensors, are
        written and returned instead of new ones: contiguous float32, or
        where `stores_gradients` (one component writes every element once,
        or one of several does and they finish them: `finishes_gradients`)
        of the inputs' dtype in any layout whose rows are contiguous, dk and
        dv sharing one (torch.empty_like(q), ...: no float32 pass)."""
        if not self.has_backward:
            raise AttnError(f"package {self.manifest['name']} has no backward pass: "
                            "compile it with \"backward\": true")
        if _is_torch(q):
            return self._backward_torch(q, k, v, out, lse, grad_out, lengths, key_bias,
                                        grads)
        if grads is not None:
            raise AttnError("grads: only GPU packages on CUDA tensors take gradients "
                            "to write into")
        if self.target != "cpu":
            raise AttnError(f"package {self.manifest['name']} targets {self.target}: "
                            "pass PyTorch CUDA tensors")
        if self.ranks:
            raise AttnError(f"package {self.manifest['name']} is a ring package: its "
                            "backward pass runs per rank (run_ranks_backward)")
        args, grads, _ = _numpy_backward_args(q, k, v, out, lse, grad_out, lengths, key_bias)
        lib = _runtime()
        if lib.attn_package_run_backward(self._handle, *args) != 0:
            raise AttnError(lib.attn_last_error().decode())
        return grads

    def run_ranks_backward(self, q, k, v, out, lse, grad_out, lengths=None):
        """The backward pass of a ring package compiled with "backward": true,
        every rank a thread as in run_ranks (GPU packages: all on one GPU, to
        check them; across GPUs use run_rank_backward): from the whole
        sequence's float32 q, k, v, the forward's out and lse
        (run_ranks(..., return_lse=True)) and grad_out, returns (dq, dk, dv)
        of the whole sequence. Each rank receives the forward's key/value
        rows again and sends their gradients back to the rows' owner;
        afterwards `bytes_sent` lists the bytes each rank sent, both ways
        (docs/Ring.md)."""
        if self.ranks == 0:
            raise AttnError(f"package {self.manifest['name']} is not distributed: "
                            "call backward")
        if not self.has_backward:
            raise AttnError(f"package {self.manifest['name']} has no backward pass: "
                            "compile it with \"backward\": true")
        args, grads, _ = _numpy_backward_args(q, k, v, out, lse, grad_out, lengths, None)
        sent = (ctypes.c_int64 * self.ranks)()
        lib = _runtime()
        # run_backward's arguments without key_bias, then the byte counts.
        if lib.attn_package_run_ranks_backward(self._handle, *args[:7], *args[8:],
                                               sent) != 0:
            raise AttnError(lib.attn_last_error().decode())
        self.bytes_sent = list(sent)
        return grads

    def _backward_torch(self, q, k, v, out, lse, grad_out, lengths, key_bias,
                        grads=None):
        """backward() on PyTorch CUDA tensors: q, k, v and out contiguous or
        strided views as the forward takes them, grad_out read in q's layout
        (see _torch_backward_args), the gradients `grads` or new contiguous
        float32 tensors, the kernels on the current stream."""
        import torch
        args, grads, _, with_sums = self._torch_backward_args(
            q, k, v, out, lse, grad_out, lengths, key_bias, grads)
        lib = _runtime()
        device = q.device.index
        handle = self._handle_on(device)
        with torch.cuda.device(device):
            if with_sums:
                rc = lib.attn_package_run_backward_with_sums_async(
                    handle, *args, _raw_stream(device))
            else:
                rc = lib.attn_package_run_backward_async(handle, *args,
                                                         _raw_stream(device))
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())
        return grads

    def _torch_backward_args(self, q, k, v, out, lse, grad_out, lengths, key_bias,
                             grads=None):
        """attn_package_run_backward's tensor arguments on PyTorch CUDA
        tensors: (pointers in its order, the gradients dq, dk, dv (`grads`,
        or new float32 ones), the objects the pointers need, and whether the
        pointers end with the float32 sums of a package that finishes stored
        gradients: attn_package_run_backward_with_sums_async's arguments)."""
        import torch
        if not isinstance(grad_out, torch.Tensor) or grad_out.dtype != q.dtype or \
                grad_out.shape != q.shape or grad_out.device != q.device:
            raise AttnError(f"grad_out: expected a tensor like out ({q.dtype} "
                            f"{tuple(q.shape)} on {q.device})")
        # The kernels read grad_out's rows where they read q's (q's strides).
        # A grad_out in another layout is copied into q's where q is dense,
        # else (a slice of a fused projection, say) both into q's dimension
        # order, dense: one copy either way.
        if grad_out.stride() != q.stride():
            if not _dense(q):
                q = torch.empty_like(q).copy_(q)
            if grad_out.stride() != q.stride():
                grad_out = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype,
                                               device=q.device).copy_(grad_out)
        t = self._torch_args(q, k, v, lengths, False, out, key_bias)
        keep = [t, q, grad_out]

        def f32(name, x):
            if not isinstance(x, torch.Tensor) or x.device != q.device or \
                    x.dtype != torch.float32 or not x.is_contiguous():
                stored = (f" (or a {q.dtype} tensor, which this package stores)"
                          if self.stores_gradients else "")
                raise AttnError(f"{name}: expected a contiguous float32 tensor{stored} "
                                f"on {q.device}")
            shape, _ = _c_layout(x.shape)
            c = _Tensor(x.data_ptr(), shape, len(shape), _F32, None)
            keep.append((x, shape, c))
            return ctypes.byref(c)

        code = {"bf16": _BF16, "f16": _F16}[self.manifest["dtype"]]
        shape, strides = _c_layout(grad_out.shape, grad_out.stride())
        keep.append((shape, strides))
        tg = _Tensor(grad_out.data_ptr(), shape, len(shape), code, strides)
        def stored(name, x, like):
            # The input's dtype and shape in any layout with contiguous rows
            # (the runtime checks the strides and that dk and dv share them).
            if not isinstance(x, torch.Tensor) or x.device != q.device or \
                    x.dtype != like.dtype or x.shape != like.shape:
                raise AttnError(f"{name}: expected a float32 tensor, or a {like.dtype} "
                                f"tensor (this package stores gradients), shaped "
                                f"{tuple(like.shape)} on {q.device}")
            shape, strides = _c_layout(x.shape, x.stride())
            c = _Tensor(x.data_ptr(), shape, len(shape), code, strides)
            keep.append((x, shape, strides, c))
            return ctypes.byref(c)

        if grads is None:
            grads = [torch.empty(x.shape, device=q.device, dtype=torch.float32)
                     for x in (q, k, v)]
        elif not isinstance(grads, (tuple, list)) or len(grads) != 3:
            raise AttnError("grads: expected a tuple (dq, dk, dv)")
        ptrs = t["ptrs"]
        args = ptrs[:3] + [ptrs[4], f32("lse", lse), ctypes.byref(tg), ptrs[3], t["bias"]]
        store = self.stores_gradients and isinstance(grads[0], torch.Tensor) and \
            grads[0].dtype == q.dtype
        for n, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
            args.append(stored(n, g, x) if store else f32(n, g))
        with_sums = store and self.finishes_gradients
        if with_sums:
            # The earlier components' float32 sums, scratch for this call
            # (the caching allocator's; nothing reads them afterwards), for
            # a round of (batch, head) pairs: the runtime runs the kernels
            # that many pairs at a time (_sum_pairs).
            B, H, Lq, D = q.shape
            Hkv, Lk = k.shape[1], k.shape[2]
            pairs = _sum_pairs(B, H, Hkv, Lq, Lk, D)
            shapes = ((q.shape, k.shape, v.shape) if pairs == B * H else
                      ((pairs, Lq, D),) + ((pairs // (H // Hkv), Lk, D),) * 2)
            for n, shape in zip(("dq_sum", "dk_sum", "dv_sum"), shapes):
                args.append(f32(n, torch.empty(shape, device=q.device,
                                               dtype=torch.float32)))
        return args, tuple(grads), keep, with_sums

    def run_ranks(self, q, k, v, lengths=None, return_lse=False):
        """Runs every rank of a ring package in this process (threads for
        ranks, the in-process transport) on the whole sequence: float32 q
        [B,H,Lq,D], k, v [B,Hkv,Lk,D]. Rows are split across ranks by the
        package's layout and the outputs gathered back. GPU ring packages
        run every rank on one GPU this way (device-to-device copies between
        the ranks, no overlap: for checking them where only one GPU is at
        hand; across GPUs use join and run_rank). Afterwards `bytes_sent`
        lists the bytes each rank sent (K and V)."""
        if self.ranks == 0:
            raise AttnError(f"package {self.manifest['name']} is not distributed: call it directly")
        if return_lse and not self.has_lse:
            raise AttnError("this package was compiled with \"lse\": false")
        t = _numpy_args(q, k, v, lengths, return_lse, None)
        sent = (ctypes.c_int64 * max(self.ranks, 1))()
        lib = _runtime()
        if lib.attn_package_run_ranks(self._handle, *t["ptrs"], sent) != 0:
            raise AttnError(lib.attn_last_error().decode())
        self.bytes_sent = list(sent)
        return (t["out"], t["lse"]) if return_lse else t["out"]

    def rank_positions(self, rank=None, keys=False):
        """The global rows of a ring package's rank, in the order of its
        local rows (the package's layout, docs/Ring.md), as an int64 NumPy
        array of q_len / ranks query rows, or with keys=True of kv_len /
        ranks key rows (they differ only for cross attention). `rank`
        defaults to the rank this process joined as."""
        rank = self._rank_or_joined(rank)
        lib = _runtime()
        fn = lib.attn_package_rank_key_positions if keys else lib.attn_package_rank_positions
        n = fn(self._handle, rank, None)
        if n < 0:
            raise AttnError(lib.attn_last_error().decode())
        positions = np.empty(n, dtype=np.int64)
        fn(self._handle, rank, positions.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)))
        return positions

    @staticmethod
    def _holds_keys(what, length, q_rows, kv_rows):
        """Whether an array with `length` rows along dim 2 holds key rows
        (kv_rows of them) rather than query rows (q_rows); query rows when
        both match (the two are then split alike)."""
        if length in (q_rows, kv_rows):
            return length != q_rows
        want = (f"{q_rows}" if q_rows == kv_rows else
                f"{q_rows} (query rows) or {kv_rows} (key rows)")
        raise AttnError(f"{what}: expected dim 2 of length {want}, got {length}")

    def shard(self, x, rank=None):
        """A rank's chunk of a whole-sequence array [B, H, L, ...] (NumPy, or
        a PyTorch tensor on any device): its rows rank_positions(rank) along
        dim 2, contiguous, ready for run_rank. L is q_len for q, kv_len for
        k and v (cross attention: told apart by their length)."""
        self._require_ring()
        ring = self.manifest["ring"]
        if x.ndim < 3:
            raise AttnError(f"shard: expected an array [B, H, L, ...], got shape {tuple(x.shape)}")
        keys = self._holds_keys("shard", x.shape[2], ring["q_len"], ring["kv_len"])
        positions = self.rank_positions(rank, keys=keys)
        if _is_torch(x):
            import torch
            return x.index_select(2, torch.as_tensor(positions, device=x.device)).contiguous()
        return np.ascontiguousarray(np.asarray(x)[:, :, positions])

    def unshard(self, chunks):
        """The whole sequence from every rank's chunk (a list in rank order,
        e.g. run_rank's outputs gathered from all ranks): the inverse of
        shard along dim 2."""
        self._require_ring()
        if len(chunks) != self.ranks:
            raise AttnError(f"unshard: expected {self.ranks} chunks (one per rank), "
                            f"got {len(chunks)}")
        ring = self.manifest["ring"]
        first = chunks[0]
        if first.ndim < 3:
            raise AttnError(f"unshard: expected chunks [B, H, C, ...], got shape {tuple(first.shape)}")
        keys = self._holds_keys("unshard", first.shape[2], ring["q_chunk"], ring["kv_chunk"])
        shape = list(first.shape)
        shape[2] = ring["kv_len"] if keys else ring["q_len"]
        if _is_torch(first):
            import torch
            whole = first.new_empty(shape)
            for rank, chunk in enumerate(chunks):
                index = torch.as_tensor(self.rank_positions(rank, keys=keys), device=chunk.device)
                whole.index_copy_(2, index, chunk)
            return whole
        whole = np.empty(shape, dtype=np.asarray(first).dtype)
        for rank, chunk in enumerate(chunks):
            whole[:, :, self.rank_positions(rank, keys=keys)] = chunk
        return whole

    def _require_ring(self):
        if self.ranks == 0:
            raise AttnError(f"package {self.manifest['name']} is not distributed: "
                            "it has no ranks")

    def _rank_or_joined(self, rank):
        self._require_ring()
        if rank is None:
            rank = getattr(self, "rank", None)
            if rank is None:
                raise AttnError("no rank given and this process has not joined the ring "
                                "(call join() first, or pass rank=)")
        return int(rank)

    def join(self, group=None):
        """Joins this process to the ring of a GPU ring package over NCCL:
        torch.distributed must be initialised (torchrun sets RANK,
        WORLD_SIZE, LOCAL_RANK); rank 0's NCCL id reaches the others through
        `group`. Call once per process, with the current CUDA device set."""
        rank, world, nccl_id = nccl_id_from_rank0(group)
        lib = _runtime()
        if lib.attn_package_join(self._handle, rank, world, nccl_id) != 0:
            raise AttnError(lib.attn_last_error().decode())
        self.rank = rank

    def run_rank(self, q, k, v, lengths=None, return_lse=False, out=None, wait=True,
                 timeout=300.0):
        """This rank's part of a GPU ring package (after join): q [B,H,C,D],
        k, v [B,Hkv,C,D] are its chunk of the sequence (shard() takes it
        from the whole sequence; docs/Ring.md for the layouts), lengths
        global. Queued on the current stream; with wait=True returns once done, raising instead of hanging when a peer
        fails. `bytes_sent` holds what this rank sent and, with wait=True,
        `step_ms` the time of each ring step on the compute stream."""
        import torch
        if out is None and _torch_needs_grad(q, k, v):
            from . import _torchop
            return _torchop.ring_rank(self, q, k, v, lengths, return_lse, wait, timeout)
        t = self._torch_args(q, k, v, lengths, return_lse, out)
        lib = _runtime()
        sent = ctypes.c_int64(0)
        with torch.cuda.device(q.device):
            stream = ctypes.c_void_p(torch.cuda.current_stream(q.device).cuda_stream)
            rc = lib.attn_package_run_rank(self._handle, *t["ptrs"], stream, ctypes.byref(sent))
            if rc == 0 and wait:
                rc = lib.attn_package_wait_rank(self._handle, stream, float(timeout))
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())
        self.bytes_sent = [sent.value]
        if wait:
            ms = (ctypes.c_float * 256)()
            n = lib.attn_package_step_ms(self._handle, ms, 256)
            self.step_ms = list(ms[:max(n, 0)])
        return (t["out"], t["lse"]) if return_lse else t["out"]

    def run_rank_backward(self, q, k, v, out, lse, grad_out, lengths=None, wait=True,
                          timeout=300.0):
        """The backward pass of this rank of a GPU ring package compiled with
        "backward": true (after join): from the rank's chunks of q, k, v, the
        forward's out and lse (run_rank(..., return_lse=True)) and grad_out,
        returns the rank's (dq, dk, dv) as new float32 CUDA tensors. Every
        rank calls it, in the same order as its other ring calls: key/value
        rows travel as in the forward and the gradients of the rows a rank
        received go back to their owner (docs/Ring.md). Queued on the
        current stream; with wait=True returns once done, raising instead of
        hanging when a peer fails. run_rank on tensors that require grad
        records it for loss.backward()."""
        import torch
        if not self.ranks:
            raise AttnError(f"package {self.manifest['name']} is not distributed: "
                            "call backward")
        if not self.has_backward:
            raise AttnError(f"package {self.manifest['name']} has no backward pass: "
                            "compile it with \"backward\": true")
        # (Ring packages add into float32 gradients: no sums.)
        args, grads, _, _ = self._torch_backward_args(q, k, v, out, lse, grad_out, lengths,
                                                      None)
        lib = _runtime()
        sent = ctypes.c_int64(0)
        with torch.cuda.device(q.device):
            stream = ctypes.c_void_p(torch.cuda.current_stream(q.device).cuda_stream)
            # run_backward's arguments without key_bias.
            rc = lib.attn_package_run_rank_backward(self._handle, *args[:7], *args[8:],
                                                    stream, ctypes.byref(sent))
            if rc == 0 and wait:
                rc = lib.attn_package_wait_rank(self._handle, stream, float(timeout))
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())
        self.bytes_sent = [sent.value]
        return grads

    def _torch_args(self, q, k, v, lengths, return_lse, out, key_bias=None, key_ids=None):
        """Checks PyTorch CUDA tensors and returns the C tensors (`ptrs`, in
        the C API's order q, k, v, lengths, out, lse) and the outputs."""
        import torch
        if self.target == "cpu":
            raise AttnError(f"package {self.manifest['name']} targets cpu: pass NumPy arrays, "
                            "or compile with target='sm_90a' for CUDA tensors")
        want = {"bf16": torch.bfloat16, "f16": torch.float16}[self.manifest["dtype"]]
        code = {"bf16": _BF16, "f16": _F16}[self.manifest["dtype"]]
        keep = []

        device = q.device if isinstance(q, torch.Tensor) else None

        def tensor(name, t, dtype, code, strided=False):
            if not isinstance(t, torch.Tensor):
                raise AttnError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_cuda:
                raise AttnError(f"{name}: on {t.device}; package {self.manifest['name']} "
                                f"targets {self.target} and takes CUDA tensors")
            if t.device != device:
                raise AttnError(f"{name}: on {t.device}, expected {device} (q's device)")
            if t.dtype != dtype:
                raise AttnError(f"{name}: dtype {t.dtype}, the package expects {dtype}")
            if t.is_contiguous():
                shape, strides = _c_layout(t.shape)
            elif strided:
                # A strided view (e.g. the [B, H, L, D] view of a [B, L, H, D]
                # tensor): the runtime checks its strides.
                shape, strides = _c_layout(t.shape, t.stride())
            else:
                raise AttnError(f"{name}: must be contiguous (call .contiguous())")
            keep.append((shape, strides))
            return _Tensor(t.data_ptr(), shape, len(shape), code, strides)

        tq = tensor("q", q, want, code, strided=True)
        tk = tensor("k", k, want, code, strided=True)
        tv = tensor("v", v, want, code, strided=True)
        tl = None
        if lengths is not None:
            if not isinstance(lengths, torch.Tensor):
                lengths = torch.as_tensor(lengths, device=q.device)
            lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
            tl = tensor("lengths", lengths, torch.int32, _I32)
        if out is None:
            # In q's layout (its dimensions' order; dense): a [B, H, L, D]
            # view of a [B, L, H, D] q gets its out in [B, L, H, D] order.
            out = torch.empty_like(q)
        tout = tensor("out", out, want, code, strided=True)
        lse = None
        if return_lse:
            lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        tlse = tensor("lse", lse, torch.float32, _F32) if lse is not None else None
        tb = ti = None
        if key_bias is not None:
            tb = tensor("key_bias", key_bias, torch.float32, _F32)
        if key_ids is not None:
            key_ids = key_ids.to(dtype=torch.int32).contiguous()
            ti = tensor("key_ids", key_ids, torch.int32, _I32)
        ref = lambda t: ctypes.byref(t) if t is not None else None
        return {"ptrs": [ref(tq), ref(tk), ref(tv), ref(tl), ref(tout), ref(tlse)],
                "bias": ref(tb), "ids": ref(ti), "out": out, "lse": lse,
                "keep": (keep, tq, tk, tv, tl, tout, tlse, lengths, tb, ti, key_ids)}

    def _call_torch(self, q, k, v, lengths, return_lse, out, key_bias=None, key_ids=None):
        """pkg(q, k, v, ...) on CUDA tensors. Its checks (_torch_args) depend
        on the tensors' layouts alone: dtype, device, shape and strides. So
        the C tensors built for a layout are kept, and a later call with
        that layout only sets their data pointers; that saves several µs of
        host time per call (bench/host_ab.py), and tens of µs for the
        tokenized layers' calls with key inputs. The runtime checks each
        call's alignment itself. Lengths, key_bias and key_ids are kept only
        where they need no conversion (int32 lengths and ids, float32 bias,
        contiguous, on q's device). One set per thread: a call fills them in
        just before its runtime call."""
        import torch
        if out is None:
            out = torch.empty_like(q)  # in q's layout, as _torch_args makes it
        try:
            key = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype,
                   k.device, v.shape, v.stride(), v.dtype, v.device, out.shape, out.stride(),
                   out.dtype, out.device, return_lse, threading.get_ident())
            for x, dtype in ((lengths, torch.int32), (key_bias, torch.float32),
                             (key_ids, torch.int32)):
                if x is None:
                    key += (None,)
                elif x.dtype == dtype and x.device == q.device and x.is_contiguous():
                    key += (x.shape,)
                else:  # _torch_args converts it: a new tensor each call
                    key = None
                    break
        except (AttributeError, TypeError):  # not tensors: _torch_args says what is wrong
            key = None
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            t = self._torch_args(q, k, v, lengths, return_lse, out, key_bias, key_ids)
            # The C tensors q, k, v, lengths, out, lse, key_bias, key_ids;
            # the pointers for the runtime call; the device; what keeps
            # their arrays alive.
            plan = (t["keep"][1:7] + t["keep"][8:10], (t["ptrs"], t["bias"], t["ids"]),
                    q.device.index, t["keep"])
            if key is not None:
                _keep(self._plans, key, plan, 64)
            lse = t["lse"]
        else:
            tq, tk, tv, tl, tout, tlse, tb, ti = plan[0]
            tq.data, tk.data, tv.data = q.data_ptr(), k.data_ptr(), v.data_ptr()
            tout.data = out.data_ptr()
            for c, x in ((tl, lengths), (tb, key_bias), (ti, key_ids)):
                if c is not None:
                    c.data = x.data_ptr()
            lse = None
            if return_lse:
                lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
                tlse.data = lse.data_ptr()
        (ptrs, bias, ids), device = plan[1], plan[2]
        self._launch(device, ptrs, bias, ids)
        return (out, lse) if return_lse else out

    def _launch(self, device, ptrs, bias=None, ids=None):
        """Queues the package's kernels on the current stream of CUDA device
        `device` (an index) for the C tensors `ptrs` (q, k, v, lengths, out,
        lse, checked by the caller), with that device current during the
        call (the runtime runs kernels in the context they were loaded in)."""
        lib = _runtime()
        handle = self._handle_on(device)
        stream = _raw_stream(device)
        with _on_device(device):
            rc = lib.attn_package_run_keys(handle, *ptrs[:4], bias, ids, *ptrs[4:], stream)
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())


def nccl_id_from_rank0(group=None):
    """(rank, world size, NCCL id): rank 0 of the torch.distributed `group`
    makes the id and broadcasts it to the others."""
    import torch.distributed as dist
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    box = [None]
    if rank == 0:
        lib = _runtime()
        buf = ctypes.create_string_buffer(128)
        if lib.attn_nccl_unique_id(buf) != 0:
            raise AttnError(lib.attn_last_error().decode())
        box = [buf.raw]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return rank, world, box[0]


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _cache_dir():
    """$ATTN_CACHE_DIR, else $XDG_CACHE_HOME/attn, else ~/.cache/attn."""
    env = os.environ.get("ATTN_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "attn")


def _host_cpu():
    """What a cpu package's native code depends on: it is compiled for the
    host CPU (CpuTarget.cpp), so a cache shared between machines keys it."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return platform.machine() + "/" + model


def _cache_key(spec_text, target, q_tile, kv_tile, compiler):
    """The package's identity: the spec (canonical JSON), the target and
    tiles, the compiler binary (path, size, modification time) and, for cpu
    packages, the host CPU."""
    st = os.stat(compiler)
    parts = [spec_text, target, str(q_tile), str(kv_tile), compiler, str(st.st_size),
             str(st.st_mtime_ns), _host_cpu() if target == "cpu" else ""]
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _run_compiler(compiler, spec_path, out_dir, target, q_tile, kv_tile):
    cmd = [compiler, spec_path, "-o", out_dir, "--target", target, "--quiet"]
    if q_tile:
        cmd += ["--q-tile", str(q_tile)]
    if kv_tile:
        cmd += ["--kv-tile", str(kv_tile)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise AttnError(result.stderr.strip().replace(spec_path + ": ", ""))


def _load_compiled(out_dir, target):
    try:
        return Package(out_dir)
    except AttnError as e:
        if target == "cpu":
            raise
        raise AttnError(f"compiled {out_dir}, but it cannot be loaded here: {e} "
                        f"(copy it to the GPU machine and attn.load it there)") from None


def compile(spec, out_dir=None, target="cpu", q_tile=None, kv_tile=None, cache=None):
    """Compiles a spec (a dict or a path to a .json file) into a Package.

    Without out_dir, packages are cached by content: compiling a spec that
    was compiled before with the same target, tiles and compiler (on the
    same CPU, for the cpu target) loads the earlier package instead of
    compiling again, in this process or a later one. The cache is
    $ATTN_CACHE_DIR (default ~/.cache/attn, or $XDG_CACHE_HOME/attn), one
    folder per package, written whole or not at all; cache=False or
    ATTN_CACHE=0 compiles into a fresh temporary folder instead. With
    out_dir the package is compiled into out_dir.

    GPU targets compile anywhere; loading the package needs the GPU's
    driver. Where it cannot be loaded (a build machine), the error says
    where the package was written, for attn.load on the GPU machine."""
    compiler = _tool("attn-compile")
    if isinstance(spec, dict):
        spec_text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        name = str(spec.get("name", "spec"))
    else:
        spec_path = os.fspath(spec)
        try:
            with open(spec_path) as f:
                parsed = json.load(f)
            spec_text = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
            name = str(parsed.get("name", "spec")) if isinstance(parsed, dict) else "spec"
        except (OSError, ValueError):
            spec_text = None  # attn-compile reports what is wrong with it
    if cache is None:
        cache = os.environ.get("ATTN_CACHE", "1") != "0"

    final = None
    if out_dir is None and cache and spec_text is not None:
        root = _cache_dir()
        key = _cache_key(spec_text, target, q_tile, kv_tile, compiler)
        final = os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] + "-" + key)
        if os.path.exists(os.path.join(final, "manifest.json")):
            return _load_compiled(final, target)
        try:
            os.makedirs(root, exist_ok=True)
            out_dir = tempfile.mkdtemp(prefix=".partial-", dir=root)
        except OSError:
            final = None  # an unwritable cache: compile without it
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="attn-pkg-")

    if isinstance(spec, dict):
        fd, spec_path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
    try:
        _run_compiler(compiler, spec_path, out_dir, target, q_tile, kv_tile)
    except AttnError:
        if final:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        if isinstance(spec, dict):
            os.unlink(spec_path)
    if final:
        # Into place in one step; where another process put the same
        # package there first, keep that one.
        try:
            os.rename(out_dir, final)
        except OSError:
            shutil.rmtree(out_dir, ignore_errors=True)
        out_dir = final
    return _load_compiled(out_dir, target)


def load(path):
    """Loads a package written by attn-compile -o PATH."""
    return Package(path)


def _load_or_compile(spec, target, package_dir):
    """The layers' packages (TokenizedAttention, SparseAttention): with
    package_dir, the package package_dir/<spec name> if it is there
    (machines without the compiler load it), else compiled into it; without,
    through compile's package cache."""
    path = os.path.join(package_dir, spec["name"]) if package_dir else None
    if path and os.path.exists(os.path.join(path, "manifest.json")):
        return load(path)
    return compile(spec, out_dir=path, target=target)


from .tokenized import (InProcessGroup, NcclGroup, TableEmbedding,  # noqa: E402
                        TokenizedAttention)
from .sparse import SparseAttention  # noqa: E402
