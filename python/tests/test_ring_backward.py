"""The backward pass of ring packages on the CPU target ("backward": true
with a "distribution" section; docs/Ring.md): every rank runs in its own
thread over the in-process transport, receives the forward's key/value rows
again and sends their gradients back to the rows' owner. dq, dk and dv of
the whole sequence must match the float64 reference of test_backward.py on
fresh random inputs (the gradients NaN-poisoned first), for every pattern
and layout on 4 ranks, other rank counts, allgather, cross attention and
tokenized lengths; each rank must send exactly twice the forward's minimum
bytes (the rows out, their gradients back)."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

import attn
from attn.reference import multiplicity
from test_backward import backward64
from test_ring import (B, D, H, HKV, L, LENGTHS, PATTERNS, cross_spec, global_rows,
                       minimum_bytes, spec, striped_maps)


def received_bytes(name, layout, ranks):
    """Per rank: bytes of the K and V rows of other ranks that its queries
    attend (what it receives in the forward, and sends back as gradients)."""
    m = multiplicity(PATTERNS[name], H, L, L, lengths=np.full(B, L))[0] > 0  # [H, L, L]
    per_kv = m.reshape(HKV, H // HKV, L, L).any(axis=1)                       # [HKV, L, L]
    got = []
    for dst in range(ranks):
        queries = global_rows(layout, ranks, dst)
        rows = sum(per_kv[:, queries][:, :, global_rows(layout, ranks, src)].any(axis=1).sum()
                   for src in range(ranks) if src != dst)
        got.append(int(rows) * B * D * 4 * 2)
    return got


def ring_gradients(s, lq, lk, seed, lengths=None):
    """Compiles spec `s` with "backward": true, runs its forward and backward
    over the ranks on fresh inputs and returns (grads, reference grads,
    package)."""
    ring = attn.compile({**s, "backward": True})
    assert ring.has_backward
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (B, H, lq, D)).astype(np.float32)
    k = rng.uniform(-1, 1, (B, HKV, lk, D)).astype(np.float32)
    v = rng.uniform(-1, 1, (B, HKV, lk, D)).astype(np.float32)
    g = rng.uniform(-1, 1, (B, H, lq, D)).astype(np.float32)
    out, lse = ring.run_ranks(q, k, v, lengths=lengths, return_lse=True)
    grads = ring.run_ranks_backward(q, k, v, out, lse, g, lengths=lengths)
    m = multiplicity(s["pattern"], H, lq, lk, lengths)
    want = backward64(q, k, v, m, g, 1 / np.sqrt(D))
    return grads, want, ring


def check_gradients(grads, want):
    for got, ref, what in zip(grads, want, ("dq", "dk", "dv")):
        assert np.all(np.isfinite(got)), what
        scale = max(np.abs(ref).max(), 1e-3)
        assert np.abs(got - ref).max() / scale < 2e-5, (what, np.abs(got - ref).max())


def check_ring_backward(name, layout, ranks, seed, kv="ring"):
    lengths = LENGTHS if name == "tokenized" else None
    grads, want, ring = ring_gradients(
        spec(name, {"ranks": ranks, "layout": layout, "kv": kv}), L, L, seed, lengths)
    check_gradients(grads, want)
    # Each rank sends its own rows that peers attend, and the gradients of the
    # rows it received: what the other ranks sent it in the forward.
    assert ring.bytes_sent == [a + b for a, b in zip(minimum_bytes(name, layout, ranks),
                                                      received_bytes(name, layout, ranks))]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_and_layout_on_4_ranks(name, layout):
    if layout == "striped" and not striped_maps(name, 4):
        pytest.skip("no striped form on 4 ranks (test_ring.py checks the error)")
    check_ring_backward(name, layout, 4, seed=zlib.crc32(f"grad{name}{layout}".encode()))


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_rank_counts(layout, ranks):
    name = "longnet" if layout != "striped" or striped_maps("longnet", ranks) else "causal"
    check_ring_backward(name, layout, ranks, seed=ranks)


def test_allgather():
    check_ring_backward("causal", "zigzag", 4, seed=5, kv="allgather")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("q_len,kv_len", [(96, 192), (192, 96)])
def test_cross_attention(layout, q_len, kv_len):
    s = cross_spec("causal", q_len, kv_len, {"ranks": 4, "layout": layout})
    grads, want, _ = ring_gradients(s, q_len, kv_len, seed=q_len + 7 * kv_len)
    check_gradients(grads, want)


def test_ring_backward_errors(tmp_path):
    x = lambda *shape: np.zeros(shape, np.float32)
    fwd = attn.compile(spec("causal", {"ranks": 2}))
    q, k = x(B, H, L, D), x(B, HKV, L, D)
    out, lse = fwd.run_ranks(q, k, k, return_lse=True)
    with pytest.raises(attn.AttnError, match='compile it with "backward": true'):
        fwd.run_ranks_backward(q, k, k, out, lse, q)
    ring = attn.compile({**spec("causal", {"ranks": 2}), "backward": True})
    with pytest.raises(attn.AttnError, match=r"grad_out: expected a float32 \[B, H, 192, D\]"):
        ring.run_ranks_backward(q, k, k, out, lse, x(B, H, L - 1, D))
    with pytest.raises(attn.AttnError, match=r"lse: expected the forward's"):
        ring.run_ranks_backward(q, k, k, out, lse[:, :, :5], q)
    with pytest.raises(attn.AttnError, match="runs per rank"):
        ring.backward(q, k, k, out, lse, q)
    single = attn.compile({**spec("causal"), "backward": True})
    with pytest.raises(attn.AttnError, match="not distributed"):
        single.run_ranks_backward(q, k, k, out, lse, q)



def test_gpu_ring_package_lists_its_backward_kernels(tmp_path):
    """A GPU ring package with "backward": true (assembled here; run by
    test_gpu_backward.py on a GPU): grad_prepare, grad_kv_<n> and grad_q_<n>
    for each of the plan's kernels, grad_add, and one rank's shapes."""
    if not (shutil.which("ptxas") or os.path.exists("/usr/local/cuda/bin/ptxas")):
        pytest.skip("ptxas is not installed")
    s = {**spec("causal", {"ranks": 4, "layout": "zigzag"}), "dtype": "bf16", "head_dim": 64,
         "backward": True}
    try:
        attn.compile(s, out_dir=str(tmp_path / "gpu"), target="sm_90a")
    except attn.AttnError as e:  # compiled, but no GPU driver to load it here
        assert "cannot be loaded here" in str(e), e
    with open(tmp_path / "gpu" / "manifest.json") as f:
        manifest = json.load(f)
    grad = manifest["backward"]
    # The plan's kernels (update), each with its begin/end/single forms
    # (causal covers every row).
    forward = [k["name"] for k in manifest["kernels"] if k["kind"] == "update"]
    assert forward and forward == [f"component_{n}" for n in range(len(forward))]
    for name in forward:
        assert {f"{name}_{kind}" for kind in ("begin", "end", "single")} <= set(
            manifest["launch_order"])
    # grad_add; no `_once` forms under GQA (a kv head's q heads add into its
    # dk and dv; test/Target/gpu-package.test checks them with a kv head per
    # q head).
    assert HKV < H
    grads = [f"grad_{kind}_{n}" for n in range(len(forward)) for kind in ("kv", "q")]
    assert grad["launch_order"] == ["grad_prepare"] + grads + ["grad_add"]
    shapes = {a["name"]: a["shape"] for a in grad["args"]}
    assert shapes["dq"] == [B, H, L // 4, 64] and shapes["dk"] == [B, HKV, L // 4, 64]
