"""The Python API on the CPU target, against a NumPy float64 reference."""

import json
import os
import shutil

import numpy as np
import pytest

import attn


def reference(q, k, v, mask):
    """Float64 attention; mask[h, i, j] is the multiplicity."""
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64 = np.repeat(k64, group, axis=1)
    v64 = np.repeat(v64, group, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q64, k64) / np.sqrt(q.shape[-1])
    s = np.where(mask > 0, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    w = mask * np.exp(s - m)
    denom = w.sum(axis=-1, keepdims=True)
    out = np.where(denom > 0, np.einsum("bhij,bhjd->bhid", w, v64) / np.where(denom > 0, denom, 1), 0)
    lse = np.where(denom[..., 0] > 0, m[..., 0] + np.log(np.where(denom[..., 0] > 0, denom[..., 0], 1)), -np.inf)
    return out, lse


def rand(*shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("lq,lk", [(70, 70), (33, 90), (90, 33)])
def test_local_gqa(lq, lk):
    pkg = attn.compile({"name": "local", "heads": 4, "kv_heads": 2, "head_dim": 32,
                        "pattern": {"local": {"window": 17}}})
    q, k, v = rand(1, 4, lq, 32, seed=1), rand(1, 2, lk, 32, seed=2), rand(1, 2, lk, 32, seed=3)
    out, lse = pkg(q, k, v, return_lse=True)
    i = np.arange(lq)[:, None] + lk - lq
    j = np.arange(lk)[None, :]
    mask = np.broadcast_to(((j <= i) & (i - j < 17)).astype(np.float64), (1, 4, lq, lk))
    ref_out, ref_lse = reference(q, k, v, mask)
    assert np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out) < 1e-5
    assert np.array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.abs(lse[finite] - ref_lse[finite]).max() < 1e-5


def test_tokenized_lengths():
    pkg = attn.compile({"name": "tok", "batch": 2, "heads": 2, "head_dim": 16,
                        "pattern": {"tokenized": {}}})
    q, k, v = rand(2, 2, 40, 16, seed=4), rand(2, 2, 40, 16, seed=5), rand(2, 2, 40, 16, seed=6)
    lengths = np.array([0, 23], dtype=np.int64)
    out = pkg(q, k, v, lengths=lengths)
    i = np.arange(40)[:, None]
    j = np.arange(40)[None, :]
    mask = np.stack([np.broadcast_to(((i < n) & (j < n)).astype(np.float64), (2, 40, 40)) for n in lengths])
    ref_out, _ = reference(q, k, v, mask)
    assert np.all(out[0] == 0)
    assert np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out) < 1e-5


def test_spec_error_names_the_path():
    with pytest.raises(attn.AttnError, match=r"pattern.local.window: must be >= 1, got 0"):
        attn.compile({"name": "bad", "head_dim": 8, "pattern": {"local": {"window": 0}}})


def test_argument_errors():
    pkg = attn.compile({"name": "causal", "heads": 2, "head_dim": 16, "pattern": {"causal": {}}})
    q = rand(1, 2, 8, 16, seed=7)
    with pytest.raises(attn.AttnError, match=r"dtype float64, expected float32"):
        pkg(q.astype(np.float64), q, q)
    with pytest.raises(attn.AttnError, match=r"q: shape \[1, 3, 8, 16\] does not match"
                                             r".*the spec's \"heads\" fixes dimension 1"):
        pkg(rand(1, 3, 8, 16, seed=8), q, q)
    with pytest.raises(attn.AttnError, match=r"the spec's \"batch\" fixes dimension 0"):
        pkg(rand(2, 2, 8, 16, seed=9), q, q)
    with pytest.raises(attn.AttnError, match=r"k: shape .*the spec's \"head_dim\" fixes"):
        pkg(q, rand(1, 2, 8, 8, seed=9), q)
    with pytest.raises(attn.AttnError, match=r"takes no lengths"):
        pkg(q, q, q, lengths=np.array([3]))


def test_strided_tensors_are_checked_through_the_c_api():
    """attn_tensor.strides (NULL: contiguous): the runtime says what is wrong
    with a tensor's layout, naming the tensor and its strides. GPU packages
    take strided q, k, v and out (rows contiguous, 16-byte strides; the GPU
    suite runs them); cpu packages and every other tensor stay contiguous."""
    import ctypes
    pkg = attn.compile({"name": "causal", "heads": 2, "head_dim": 16, "pattern": {"causal": {}}})
    lib = attn._runtime()
    B, H, L, D = 1, 2, 8, 16
    # [B, L, H, D] storage seen as [B, H, L, D].
    blhd = rand(B, L, H, D, seed=9)
    view_strides = [L * H * D, D, H * D, 1]
    q, k, v = rand(B, H, L, D, seed=10), rand(B, H, L, D, seed=11), rand(B, H, L, D, seed=12)
    out = np.empty_like(q)
    lse = np.empty((B, H, L), dtype=np.float32)
    keep = []

    def tensor(array, shape, strides=None):
        c_shape = (ctypes.c_int64 * len(shape))(*shape)
        c_strides = (ctypes.c_int64 * len(strides))(*strides) if strides else None
        keep.extend([array, c_shape, c_strides])
        return attn._Tensor(array.ctypes.data, c_shape, len(shape), attn._F32, c_strides)

    def run(**strided):
        args = {n: tensor(a, a.shape) for n, a in
                (("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse))}
        for name, strides in strided.items():
            args[name] = tensor(blhd, (B, H, L, D), strides)
        rc = lib.attn_package_run_keys(pkg._handle, ctypes.byref(args["q"]),
                                       ctypes.byref(args["k"]), ctypes.byref(args["v"]),
                                       None, None, None, ctypes.byref(args["out"]),
                                       ctypes.byref(args["lse"]), None)
        return rc, lib.attn_last_error().decode()

    assert run()[0] == 0
    # Contiguous strides given explicitly are the same as none.
    assert run(q=[H * L * D, L * D, D, 1])[0] == 0
    rc, msg = run(q=view_strides)
    assert rc != 0 and msg == ("q: strides [256, 16, 32, 1]: cpu packages take contiguous "
                               "tensors (strided q, k, v and out are for GPU packages)")
    rc, msg = run(out=view_strides)
    assert rc != 0 and msg == ("out: strides [256, 16, 32, 1]: cpu packages take contiguous "
                               "tensors (strided q, k, v and out are for GPU packages)")
    rc, msg = run(k=[L * H * D, D, 1, H * L])
    assert rc != 0 and "the last dimension (D) must be contiguous (stride 1)" in msg
    rc, msg = run(v=[L * H * D, 4, H * D, 1])
    assert rc != 0 and "stride 4 of dimension 1 must be a non-negative multiple of 8 " \
        "elements (16 bytes)" in msg


LONGNET_SEGMENTS = {"sum": [
    {"dilated": {"segment": 64, "rate": 1, "head_offset": True, "causal": True}},
    {"dilated": {"segment": 128, "rate": 2, "head_offset": True, "causal": True}}]}


@pytest.mark.parametrize("pattern,kv_heads,stores,overwrites,finishes", [
    ({"causal": {}}, 2, True, True, False),
    ({"strided": {"stride": 16, "local": 1}}, 2, True, True, False),  # one gathered component
    # Band (first: overwrites) + residue classes (last: finishes).
    ({"strided": {"stride": 16, "local": 16}}, 2, True, True, True),
    ({"local": {"window": 64}}, 1, True, True, False),  # two q heads a kv head: grad_kv walks both
    ({"causal": {}}, 1, False, False, False),  # ... but not over rows that run to the end
    # Its band walks; its residue classes would need the walk to finish.
    ({"strided": {"stride": 16, "local": 16}}, 1, False, True, False),
    ({"sum": [{"causal": {}}, {"local": {"window": 32}}]}, 2, True, True, True),
    # Segmented components too: grad_kv's grid spans the keys' segments.
    # The first branch writes every element once; each row or key's last
    # branch (the second, on its head's class) finishes it.
    (LONGNET_SEGMENTS, 2, True, True, True),
    # Under GQA none of them writes every element once: they add.
    (LONGNET_SEGMENTS, 1, False, False, False),
    ({"dilated": {"segment": 64, "rate": 1, "causal": True}}, 2, True, True, False),
    # One residue class (LongNet's rows i % r == 0, or the head's class):
    # the other rows and keys get no block.
    ({"dilated": {"segment": 64, "rate": 2}}, 2, False, False, False),
    ({"dilated": {"segment": 64, "rate": 2, "head_offset": True}}, 2, False, False, False),
])
def test_gpu_backward_stores_gradients_where_each_is_written_once(tmp_path, pattern,
                                                                  kv_heads, stores,
                                                                  overwrites, finishes):
    """The manifest's "stores_grads": a GPU backward of one component writes
    each gradient element once (under GQA where a key's rows span a narrow
    band, grad_kv's block walking every q head of its kv head), so it may
    store gradients in the input type; so may several components whose
    one writes every element once ("finishes_grads": each element's last
    writer stores its share plus the earlier ones' float32 sums); others,
    and GQA over rows that run to the end, add into float32 ones. "overwrites_grads": the first
    component writes every element once (no GPU needed: the compiler
    decides)."""
    import json
    import subprocess
    spec = {"name": "s", "dtype": "bf16", "heads": 2, "kv_heads": kv_heads,
            "head_dim": 64, "pattern": pattern, "backward": True}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    subprocess.run([attn._tool("attn-compile"), str(tmp_path / "s.json"), "-o",
                    str(tmp_path / "pkg"), "--target", "sm_90a", "--quiet"], check=True)
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["backward"]["stores_grads"] is stores
    # Where the first component writes every element once, it overwrites the
    # float32 gradients and the runtime does not zero them.
    assert manifest["backward"]["overwrites_grads"] is overwrites
    assert manifest["backward"]["finishes_grads"] is finishes
    # The gradient args stay float32 (the path every package takes).
    assert all(a["dtype"] == "f32" for a in manifest["backward"]["args"]
               if a["name"] in ("dq", "dk", "dv"))


def test_gpu_package_of_another_version_is_refused(tmp_path):
    """GPU packages are manifest version 11 (kernels take bh_offset and the
    strides of q, k and out, the backward kernels read through them and may
    store the gradients, grad_kv's grid spans the keys' segments, grad_add
    adds strided runs of rows, the backward kernels take tensor maps on
    sm_90a, the forward kernels those of q and out as well, and every
    component of a package that finishes the gradients takes the stored
    gradients and the float32 sums):
    one written by an older attn-compile is refused with a clear error,
    before any GPU is touched."""
    import json
    import subprocess
    spec = {"name": "v", "dtype": "bf16", "heads": 2, "head_dim": 64,
            "pattern": {"causal": {}}, "backward": True}
    (tmp_path / "v.json").write_text(json.dumps(spec))
    pkg_dir = tmp_path / "pkg"
    subprocess.run([attn._tool("attn-compile"), str(tmp_path / "v.json"), "-o", str(pkg_dir),
                    "--target", "sm_90a", "--quiet"], check=True)
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    assert manifest["version"] == 11
    # One component, a kv head per q head: the kernels store gradients.
    assert manifest["backward"]["stores_grads"] is True
    manifest["version"] = 5
    (pkg_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(attn.AttnError, match=r"manifest version 5 is not supported "
                       r"\(this runtime reads 11 for sm_90a packages\); recompile it"):
        attn.load(str(pkg_dir))


def test_gpu_compile_without_a_gpu_says_where_the_package_is(tmp_path):
    """attn.compile for a GPU target writes the package anywhere; where it
    cannot be loaded (no driver, as in CI) the error names the folder to
    copy to the GPU machine; with a GPU the package loads."""
    spec = {"name": "g", "dtype": "bf16", "heads": 2, "head_dim": 64,
            "pattern": {"local": {"window": 32}}}
    out_dir = str(tmp_path / "g")
    try:
        pkg = attn.compile(spec, out_dir=out_dir, target="sm_90a")
    except attn.AttnError as e:
        assert str(e).startswith(f"compiled {out_dir}, but it cannot be loaded here: ")
        assert "attn.load it there" in str(e)
        assert (tmp_path / "g" / "kernels.cubin").exists()
    else:
        assert pkg.target == "sm_90a"


CACHED_SPEC = {"name": "cached_local", "heads": 2, "head_dim": 16,
               "pattern": {"local": {"window": 5}}}


def _check_local_window(pkg, window, seed):
    q, k, v = rand(1, 2, 30, 16, seed=seed), rand(1, 2, 30, 16, seed=seed + 1), rand(1, 2, 30, 16, seed=seed + 2)
    i = np.arange(30)[:, None]
    j = np.arange(30)[None, :]
    mask = np.broadcast_to(((j <= i) & (i - j < window)).astype(np.float64), (1, 2, 30, 30))
    ref_out, _ = reference(q, k, v, mask)
    assert np.linalg.norm(pkg(q, k, v) - ref_out) / np.linalg.norm(ref_out) < 1e-5


def test_compile_cache_reuses_packages(tmp_path, monkeypatch):
    """A spec compiled before (the same content, whatever its key order)
    loads from the cache without running the compiler; another spec, other
    tiles, or a file holding the same spec are their own entries or hits as
    their content says; each package computes its own pattern."""
    monkeypatch.setenv("ATTN_CACHE_DIR", str(tmp_path / "cache"))
    first = attn.compile(CACHED_SPEC)
    assert os.path.dirname(first.path) == str(tmp_path / "cache")
    assert os.path.basename(first.path).startswith("cached_local-")
    _check_local_window(first, 5, seed=30)

    def no_compiler(*args, **kwargs):
        raise AssertionError("attn-compile ran for a cached spec")

    with monkeypatch.context() as m:
        m.setattr(attn.subprocess, "run", no_compiler)
        again = attn.compile(dict(reversed(list(CACHED_SPEC.items()))))
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(CACHED_SPEC, indent=2))
        from_file = attn.compile(str(spec_file))
    assert again.path == first.path == from_file.path
    _check_local_window(again, 5, seed=33)

    wider = attn.compile(dict(CACHED_SPEC, pattern={"local": {"window": 9}}))
    tiled = attn.compile(CACHED_SPEC, q_tile=16, kv_tile=16)
    assert len({first.path, wider.path, tiled.path}) == 3
    _check_local_window(wider, 9, seed=36)
    _check_local_window(tiled, 5, seed=39)
    # Only whole packages: no partial folders are left behind.
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        os.path.basename(p.path) for p in (first, wider, tiled))


def test_compile_cache_can_be_turned_off(tmp_path, monkeypatch):
    """ATTN_CACHE=0, cache=False and an explicit out_dir compile every time,
    and leave the cache folder alone; a failed compile caches nothing."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTN_CACHE_DIR", str(cache))
    a = attn.compile(CACHED_SPEC, cache=False)
    monkeypatch.setenv("ATTN_CACHE", "0")
    b = attn.compile(CACHED_SPEC)
    monkeypatch.delenv("ATTN_CACHE")
    c = attn.compile(CACHED_SPEC, out_dir=str(tmp_path / "pkg"))
    assert len({a.path, b.path, c.path}) == 3 and c.path == str(tmp_path / "pkg")
    assert not cache.exists()
    with pytest.raises(attn.AttnError, match=r"pattern.local.window: must be >= 1, got 0"):
        attn.compile({"name": "bad", "head_dim": 8, "pattern": {"local": {"window": 0}}})
    assert not cache.exists() or os.listdir(cache) == []


def test_compile_cache_follows_the_compiler(tmp_path, monkeypatch):
    """Another compiler binary (another path, or the same one rebuilt: a new
    modification time) compiles anew rather than reusing what the old one
    wrote."""
    monkeypatch.setenv("ATTN_CACHE_DIR", str(tmp_path / "cache"))
    attn._runtime()  # loaded from the real build before ATTN_BUILD_DIR moves
    first = attn.compile(CACHED_SPEC)
    copy = tmp_path / "build" / "bin" / "attn-compile"
    copy.parent.mkdir(parents=True)
    shutil.copy2(attn._tool("attn-compile"), copy)
    monkeypatch.setenv("ATTN_BUILD_DIR", str(tmp_path / "build"))
    second = attn.compile(CACHED_SPEC)
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = attn.compile(CACHED_SPEC)
    assert len({first.path, second.path, third.path}) == 3
    _check_local_window(third, 5, seed=42)


def test_packages_copy_and_pickle(tmp_path):
    """copy.copy and copy.deepcopy (of a package, or of a model holding one)
    share the package; pickling stores its folder and loads it again, and
    the loaded package computes the same output."""
    import copy
    import pickle
    pkg = attn.compile(CACHED_SPEC, out_dir=str(tmp_path / "pkg"))
    model = {"attention": pkg, "weights": np.ones(3)}
    clone = copy.deepcopy(model)
    assert clone["attention"] is pkg and copy.copy(pkg) is pkg
    assert clone["weights"] is not model["weights"]
    again = pickle.loads(pickle.dumps(pkg))
    assert again is not pkg and again.path == pkg.path
    q, k, v = rand(1, 2, 30, 16, seed=50), rand(1, 2, 30, 16, seed=51), rand(1, 2, 30, 16, seed=52)
    assert np.array_equal(again(q, k, v), pkg(q, k, v))
    del pkg, clone, model  # the copies share one runtime handle: no double free
    _check_local_window(again, 5, seed=53)


def test_a_non_contiguous_numpy_out_is_refused():
    """A cpu package writes its output through a C-contiguous buffer: an
    `out` that is a strided view would be copied and the copy written, so
    it is refused instead of left unwritten."""
    pkg = attn.compile({"name": "causal", "heads": 2, "head_dim": 16, "pattern": {"causal": {}}})
    q = rand(1, 2, 8, 16, seed=13)
    out = np.empty((1, 8, 2, 16), dtype=np.float32).transpose(0, 2, 1, 3)
    with pytest.raises(attn.AttnError, match=r"out: cpu packages write a C-contiguous float32 "
                       r"NumPy array \(np.ascontiguousarray\(out\) first\)"):
        pkg(q, q, q, out=out)
    given = np.full((1, 2, 8, 16), np.nan, dtype=np.float32)
    assert pkg(q, q, q, out=given) is given and not np.isnan(given).any()
