"""attn: compile attention specs and run the packages from Python.

    import attn, numpy as np
    pkg = attn.compile({"name": "local", "heads": 4, "head_dim": 64,
                        "pattern": {"local": {"window": 128}}})
    out, lse = pkg(q, k, v, return_lse=True)      # NumPy float32 arrays

`compile` runs the `attn-compile` driver; packages run through the runtime's
C API (libattn_runtime.so) with ctypes. The CPU target takes NumPy arrays;
GPU targets are not available yet.
"""

import ctypes
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

__all__ = ["compile", "load", "Package", "AttnError"]


class AttnError(RuntimeError):
    """A spec, package or argument error reported by the compiler or runtime."""


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
    _fields_ = [("data", ctypes.c_void_p), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("rank", ctypes.c_int32), ("dtype", ctypes.c_int32)]


_F32, _I32 = 0, 1
_lib = None


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
        lib.attn_package_run.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(_Tensor)] * 6
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
        self.has_lse = bool(lib.attn_package_has_lse(handle))

    def __del__(self):
        if getattr(self, "_handle", None) and _lib is not None:
            _lib.attn_package_free(self._handle)
            self._handle = None

    def __call__(self, q, k, v, lengths=None, return_lse=False):
        """Attention of q [B,H,Lq,D] over k, v [B,Hkv,Lk,D] (float32 NumPy arrays).

        Returns the output [B,H,Lq,D], and the LSE [B,H,Lq] with return_lse=True.
        """
        if return_lse and not self.has_lse:
            raise AttnError("this package was compiled with \"lse\": false")
        keep = []
        tq = _tensor("q", q, np.float32, _F32, keep)
        tk = _tensor("k", k, np.float32, _F32, keep)
        tv = _tensor("v", v, np.float32, _F32, keep)
        tl = None
        if lengths is not None:
            tl = _tensor("lengths", np.asarray(lengths).astype(np.int32), np.int32, _I32, keep)
        out = np.full(q.shape, np.nan, dtype=np.float32)
        lse = np.full(q.shape[:-1], np.nan, dtype=np.float32) if q.ndim == 4 else None
        tout = _tensor("out", out, np.float32, _F32, keep)
        tlse = _tensor("lse", lse, np.float32, _F32, keep) if (return_lse and lse is not None) else None
        lib = _runtime()
        rc = lib.attn_package_run(self._handle, ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv),
                                  ctypes.byref(tl) if tl is not None else None, ctypes.byref(tout),
                                  ctypes.byref(tlse) if tlse is not None else None)
        if rc != 0:
            raise AttnError(lib.attn_last_error().decode())
        return (out, lse) if return_lse else out


def compile(spec, out_dir=None, target="cpu", q_tile=None, kv_tile=None):
    """Compiles a spec (a dict or a path to a .json file) into a Package."""
    if isinstance(spec, dict):
        fd, spec_path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
    else:
        spec_path = os.fspath(spec)
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="attn-pkg-")
    cmd = [_tool("attn-compile"), spec_path, "-o", out_dir, "--target", target, "--quiet"]
    if q_tile:
        cmd += ["--q-tile", str(q_tile)]
    if kv_tile:
        cmd += ["--kv-tile", str(kv_tile)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if isinstance(spec, dict):
        os.unlink(spec_path)
    if result.returncode != 0:
        raise AttnError(result.stderr.strip().replace(spec_path + ": ", ""))
    return Package(out_dir)


def load(path):
    """Loads a package written by attn-compile -o PATH."""
    return Package(path)
