"""Ring attention on the CPU target: every rank of a ring package runs in its
own thread over the in-process transport. Each result must equal the
single-rank package's on the same fresh random inputs (outputs poisoned with
NaN first), for 1, 2, 3, 4 and 8 ranks, every layout and every pattern; the
bytes each rank sends must be exactly the minimum: the K and V rows that some
query of the receiving rank attends, computed here from the plain
multiplicity m(h, i, j)."""

import functools
import json
import zlib

import numpy as np
import pytest

import attn
from attn.reference import multiplicity

B, H, HKV, D, L = 2, 4, 2, 16, 192

PATTERNS = {
    "causal": {"causal": {}},
    "full": {"full": {}},
    "local": {"local": {"window": 40}},
    "local_bidir": {"local": {"window": 9, "causal": False}},
    "strided": {"strided": {"stride": 16, "local": 8}},
    "longnet": {"sum": [{"dilated": {"segment": 48, "rate": 1, "causal": True}},
                        {"dilated": {"segment": 96, "rate": 2, "head_offset": True, "causal": True}},
                        {"dilated": {"segment": 192, "rate": 4, "head_offset": True, "causal": True}}]},
    "tokenized": {"tokenized": {}},
    "dilated": {"dilated": {"segment": 48, "rate": 4, "causal": True}},
    "union": {"union": [{"local": {"window": 16}}, {"strided": {"stride": 32}}]},
    "sum_bands": {"sum": [{"causal": {}}, {"local": {"window": 24}}]},
}
# Striped positions r + N*a map a component onto local indices when its period
# divides or is a multiple of the number of ranks and its segment is a
# multiple of it: (periods, segments) of each pattern's components.
GEOMETRY = {"strided": ([16], []), "longnet": ([1, 2, 4], [48, 96, 192]),
            "dilated": ([4], [48]), "union": ([1, 32], [])}


def striped_maps(name, ranks):
    periods, segments = GEOMETRY.get(name, ([1], []))
    return (all(p % ranks == 0 or ranks % p == 0 for p in periods)
            and all(w % ranks == 0 for w in segments))


LENGTHS = np.array([0, 150], dtype=np.int32)  # an empty sequence and a partial one


def spec(name, distribution=None, pattern=None):
    """The spec of PATTERNS[name], or of `pattern` under `name`."""
    s = {"name": name, "batch": B, "heads": H, "kv_heads": HKV, "head_dim": D,
         "seq_len": L, "pattern": pattern or PATTERNS[name]}
    if distribution:
        s["distribution"] = distribution
    return s


@functools.lru_cache(maxsize=None)
def single(name):
    return attn.compile(spec(name))


def inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (B, H, L, D)).astype(np.float32)
    k = rng.uniform(-1, 1, (B, HKV, L, D)).astype(np.float32)
    v = rng.uniform(-1, 1, (B, HKV, L, D)).astype(np.float32)
    return q, k, v


def global_rows(layout, ranks, rank, length=L):
    """Global rows of a rank's local rows, as the layouts define them, for a
    sequence of `length` rows (queries or keys)."""
    c = length // ranks
    if layout == "contiguous":
        return np.arange(rank * c, (rank + 1) * c)
    if layout == "zigzag":
        h = c // 2
        return np.concatenate([np.arange(rank * h, (rank + 1) * h),
                               np.arange((2 * ranks - 1 - rank) * h, (2 * ranks - rank) * h)])
    return rank + ranks * np.arange(c)


def minimum_bytes(name, layout, ranks, pattern=None):
    """Per rank: bytes of the K and V rows that other ranks' queries attend
    (of PATTERNS[name], or of `pattern`)."""
    pattern = pattern or PATTERNS[name]
    m = multiplicity(pattern, H, L, L, lengths=np.full(B, L))[0] > 0  # [H, L, L]
    per_kv = m.reshape(HKV, H // HKV, L, L).any(axis=1)                       # [HKV, L, L]
    sent = []
    for src in range(ranks):
        keys = global_rows(layout, ranks, src)
        rows = 0
        for dst in range(ranks):
            if dst != src:
                queries = global_rows(layout, ranks, dst)
                rows += per_kv[:, queries][:, :, keys].any(axis=1).sum()
        sent.append(int(rows) * B * D * 4 * 2)
    return sent


def check_ring(name, layout, ranks, seed, kv="ring", pattern=None):
    """The ring package of PATTERNS[name] (or of `pattern`) against the
    same pattern on one rank, on the same inputs: the same output and lse,
    and each rank sends exactly the minimum. Failures name the ring spec."""
    ring_spec = spec(name, {"ranks": ranks, "layout": layout, "kv": kv}, pattern)
    shown = json.dumps(ring_spec)
    ring = attn.compile(ring_spec)
    assert ring.ranks == ranks
    q, k, v = inputs(seed)
    lengths = LENGTHS if "tokenized" in str(ring_spec["pattern"]) else None
    one = single(name) if pattern is None else attn.compile(spec(name, pattern=pattern))
    want_out, want_lse = one(q, k, v, lengths=lengths, return_lse=True)
    out, lse = ring.run_ranks(q, k, v, lengths=lengths, return_lse=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any(), shown
    assert np.abs(out - want_out).max() < 1e-5, shown
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse)), shown
    finite = np.isfinite(want_lse)
    assert np.abs(lse[finite] - want_lse[finite]).max() < 1e-5, shown
    assert ring.bytes_sent == minimum_bytes(name, layout, ranks, pattern), shown


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_and_layout_on_4_ranks(name, layout):
    if layout == "striped" and not striped_maps(name, 4):
        with pytest.raises(attn.AttnError, match="layout 'striped' needs every component"):
            attn.compile(spec(name, {"ranks": 4, "layout": layout}))
        return
    check_ring(name, layout, 4, seed=zlib.crc32(f"{name}{layout}".encode()))


def test_a_filtered_component_sends_only_what_its_filters_reach():
    """A union whose first member is a sum decomposes into a full band
    filtered by that sum; the sum is causal, so no key goes to an earlier
    rank: the last contiguous rank sends nothing (it sent its whole chunk
    when the plan took the full band alone)."""
    pattern = {"union": [
        {"sum": [{"strided": {"stride": 14, "local": 16}},
                 {"dilated": {"segment": 256, "rate": 4, "causal": True}}]},
        {"dilated": {"segment": 48, "rate": 3, "causal": False}}]}
    base = {"name": "filtered", "batch": B, "heads": H, "kv_heads": HKV, "head_dim": D,
            "seq_len": L, "pattern": pattern}
    ring = attn.compile(dict(base, distribution={"ranks": 4, "layout": "contiguous"}))
    q, k, v = inputs(84)
    want = attn.compile(base)(q, k, v)
    assert np.abs(ring.run_ranks(q, k, v) - want).max() < 1e-5
    assert ring.bytes_sent == minimum_bytes(None, "contiguous", 4, pattern)
    assert ring.bytes_sent[3] == 0


@pytest.mark.parametrize("ranks,pattern", [
    # A dilated branch (period 4) filtered by strided classes with a band
    # (two components: no closed form), whose period 16 maps onto 4 ranks.
    (4, {"intersect": [{"dilated": {"segment": 64, "rate": 4, "causal": True}},
                       {"strided": {"stride": 16, "local": 3}}]}),
    # A branch of rate 3 filtered by strided classes of period 64 and a
    # branch of rate 2, which have no local form on 3 ranks: their
    # reach is found key by key.
    (3, {"intersect": [{"dilated": {"segment": 72, "rate": 3, "causal": True}},
                       {"strided": {"stride": 64, "local": 7}},
                       {"dilated": {"segment": 144, "rate": 2, "causal": True}}]}),
])
def test_striped_filtered_components_send_only_what_their_filters_reach(ranks, pattern):
    """Under the striped layout too, a filtered component sends only the keys
    its filters reach from the receiving rank's rows."""
    check_ring("striped_filtered", "striped", ranks, seed=ranks, pattern=pattern)


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("name", ["causal", "local", "longnet", "tokenized", "dilated"])
def test_rank_counts(name, layout, ranks):
    if layout == "striped" and not striped_maps(name, ranks):
        with pytest.raises(attn.AttnError, match="layout 'striped' needs every component"):
            attn.compile(spec(name, {"ranks": ranks, "layout": layout}))
        return
    check_ring(name, layout, ranks, seed=ranks)


@pytest.mark.parametrize("name", ["causal", "longnet", "tokenized"])
def test_allgather(name):
    """kv = allgather: every exchange before the first update; same rows."""
    check_ring(name, "zigzag", 4, seed=11, kv="allgather")


def test_local_window_sends_one_window():
    """W = 40 < chunk: each rank sends its last W - 1 rows to the next rank only."""
    ring = attn.compile(spec("local", {"ranks": 4, "layout": "contiguous"}))
    q, k, v = inputs(7)
    ring.run_ranks(q, k, v)
    row_bytes = B * HKV * D * 4 * 2
    assert ring.bytes_sent == [39 * row_bytes] * 3 + [0]
    assert all(b <= 40 * HKV * D * 4 * 2 * B for b in ring.bytes_sent)


def test_errors():
    with pytest.raises(attn.AttnError, match="multiple of 10"):
        attn.compile(dict(spec("causal", {"ranks": 5, "layout": "zigzag"})))
    ring = attn.compile(spec("causal", {"ranks": 2}))
    q, k, v = inputs(1)
    with pytest.raises(attn.AttnError, match="distributed over 2 ranks"):
        ring(q, k, v)
    with pytest.raises(attn.AttnError, match="whole sequence"):
        ring.run_ranks(q[:, :, :100], k, v)
    with pytest.raises(attn.AttnError, match="not distributed"):
        single("causal").run_ranks(q, k, v)
    # Through the C API, a whole sequence given with strides is refused
    # (the ranks' chunks are cut from contiguous tensors).
    import ctypes
    lib = attn._runtime()
    keep = []

    def tensor(array, strides=None, dims=None):
        shape = (ctypes.c_int64 * 4)(*(dims or array.shape))
        c_strides = (ctypes.c_int64 * 4)(*strides) if strides else None
        keep.extend([array, shape, c_strides])
        return ctypes.byref(attn._Tensor(array.ctypes.data, shape, 4, attn._F32, c_strides))

    out = np.empty_like(q)
    blhd = np.ascontiguousarray(q.transpose(0, 2, 1, 3))
    view = [L * H * D, D, H * D, 1]
    rc = lib.attn_package_run_ranks(ring._handle, tensor(blhd, view, q.shape), tensor(k), tensor(v),
                                    None, tensor(out), None, None)
    assert rc != 0 and lib.attn_last_error().decode() == (
        "q: the whole sequence must be contiguous (ring packages cut their chunks from it; "
        "pass a contiguous q)")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_rank_positions_shard_and_unshard(layout):
    """rank_positions gives each rank's global positions as the layouts
    define them (the table in docs/Ring.md, global_rows above); shard takes
    a rank's rows of a whole-sequence array and unshard puts every rank's
    chunk back, LSE-shaped [B, H, L] arrays included."""
    ring = attn.compile(spec("causal", {"ranks": 4, "layout": layout}))
    for rank in range(4):
        assert np.array_equal(ring.rank_positions(rank), global_rows(layout, 4, rank))
    q, _, _ = inputs(5)
    chunks = [ring.shard(q, rank) for rank in range(4)]
    assert all(c.shape == (B, H, L // 4, D) and c.flags.c_contiguous for c in chunks)
    assert np.array_equal(chunks[1], q[:, :, global_rows(layout, 4, 1)])
    assert np.array_equal(ring.unshard(chunks), q)
    lse = q[..., 0]
    assert np.array_equal(ring.unshard([ring.shard(lse, r) for r in range(4)]), lse)


def test_zigzag_positions_by_hand():
    """seq_len 16 on 2 ranks, zigzag: chunks of 4, rank 0 holds chunks 0
    and 3, rank 1 chunks 1 and 2."""
    s = dict(spec("causal", {"ranks": 2, "layout": "zigzag"}), seq_len=16)
    ring = attn.compile(s)
    assert ring.rank_positions(0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert ring.rank_positions(1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_rank_position_errors():
    ring = attn.compile(spec("causal", {"ranks": 2}))
    with pytest.raises(attn.AttnError, match=r"rank 2 is outside \[0, 2\)"):
        ring.rank_positions(2)
    with pytest.raises(attn.AttnError, match="has not joined the ring"):
        ring.rank_positions()
    with pytest.raises(attn.AttnError, match="expected dim 2 of length 192"):
        ring.shard(np.zeros((1, 1, 100, 4)), 0)
    with pytest.raises(attn.AttnError, match="expected 2 chunks"):
        ring.unshard([np.zeros((1, 1, 96, 4))])
    with pytest.raises(attn.AttnError, match="not distributed"):
        single("causal").rank_positions(0)
    with pytest.raises(attn.AttnError, match="not distributed"):
        single("causal").unshard([np.zeros((1, 1, 96, 4))])


# Cross attention: q_len != kv_len. Query row i sits at key position
# i + kv_len - q_len (bottom-right); each layout splits the query rows and
# the key rows alike, into chunks of q_len / N and kv_len / N.
CROSS_LENGTHS = [(96, 192), (192, 96)]


def cross_spec(name, q_len, kv_len, distribution=None):
    s = spec(name, distribution)
    del s["seq_len"]
    s.update(q_len=q_len, kv_len=kv_len)
    return s


@pytest.mark.parametrize("q_len,kv_len", CROSS_LENGTHS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("name", ["full", "causal", "local_bidir", "strided", "longnet", "union"])
def test_cross_attention(name, layout, q_len, kv_len):
    """A ring package with q_len != kv_len equals the single-rank package of
    the same lengths (NaN-poisoned outputs, fresh inputs), and each rank
    sends exactly the key rows some query of the receiver attends."""
    ranks = 4
    ring = attn.compile(cross_spec(name, q_len, kv_len, {"ranks": ranks, "layout": layout}))
    assert ring.manifest["ring"]["q_chunk"] == q_len // ranks
    assert ring.manifest["ring"]["kv_chunk"] == kv_len // ranks
    rng = np.random.default_rng(zlib.crc32(f"cross{name}{layout}{q_len}".encode()))
    q = rng.uniform(-1, 1, (B, H, q_len, D)).astype(np.float32)
    k = rng.uniform(-1, 1, (B, HKV, kv_len, D)).astype(np.float32)
    v = rng.uniform(-1, 1, (B, HKV, kv_len, D)).astype(np.float32)
    want_out, want_lse = attn.compile(cross_spec(name, q_len, kv_len))(q, k, v, return_lse=True)
    out, lse = ring.run_ranks(q, k, v, return_lse=True)
    assert out.shape == (B, H, q_len, D) and lse.shape == (B, H, q_len)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.abs(out - want_out).max() < 1e-5
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    finite = np.isfinite(want_lse)
    assert np.abs(lse[finite] - want_lse[finite]).max() < 1e-5
    # Bytes: the key rows of each source that other ranks' queries attend.
    m = multiplicity(PATTERNS[name], H, q_len, kv_len)[0] > 0
    per_kv = m.reshape(HKV, H // HKV, q_len, kv_len).any(axis=1)
    want_bytes = []
    for src in range(ranks):
        keys = global_rows(layout, ranks, src, kv_len)
        rows = sum(per_kv[:, global_rows(layout, ranks, dst, q_len)][:, :, keys].any(axis=1).sum()
                   for dst in range(ranks) if dst != src)
        want_bytes.append(int(rows) * B * D * 4 * 2)
    assert ring.bytes_sent == want_bytes


def test_cross_attention_positions_shard_and_unshard():
    """Query rows and key rows are split alike over their own lengths:
    rank_positions(keys=True) lists a rank's key rows, and shard/unshard
    tell q-like from k-like arrays by their length."""
    ring = attn.compile(cross_spec("causal", 96, 192, {"ranks": 4, "layout": "zigzag"}))
    q = np.arange(B * H * 96 * D, dtype=np.float32).reshape(B, H, 96, D)
    k = np.arange(B * HKV * 192 * D, dtype=np.float32).reshape(B, HKV, 192, D)
    for rank in range(4):
        assert np.array_equal(ring.rank_positions(rank), global_rows("zigzag", 4, rank, 96))
        assert np.array_equal(ring.rank_positions(rank, keys=True),
                              global_rows("zigzag", 4, rank, 192))
        assert np.array_equal(ring.shard(q, rank), q[:, :, global_rows("zigzag", 4, rank, 96)])
        assert np.array_equal(ring.shard(k, rank), k[:, :, global_rows("zigzag", 4, rank, 192)])
    assert np.array_equal(ring.unshard([ring.shard(q, r) for r in range(4)]), q)
    assert np.array_equal(ring.unshard([ring.shard(k, r) for r in range(4)]), k)
    with pytest.raises(attn.AttnError, match=r"length 96 \(query rows\) or 192 \(key rows\), got 100"):
        ring.shard(np.zeros((1, 1, 100, 4)), 0)


def test_cross_attention_errors():
    with pytest.raises(attn.AttnError, match="the key length 190 must be a positive multiple of 8"):
        attn.compile(cross_spec("causal", 96, 190, {"ranks": 4, "layout": "zigzag"}))
    with pytest.raises(attn.AttnError, match="the query length 90 must be a positive multiple of 4"):
        attn.compile(cross_spec("causal", 90, 192, {"ranks": 4}))
    with pytest.raises(attn.AttnError, match="tokenized lengths need equal query and key lengths"):
        attn.compile(cross_spec("tokenized", 96, 192, {"ranks": 2}))
    ring = attn.compile(cross_spec("causal", 96, 192, {"ranks": 2}))
    q, k, v = inputs(3)
    with pytest.raises(attn.AttnError, match=r"q: expected a float32 \[B, H, 96, D\] tensor for the "
                                             r"whole sequence \(its 96 query rows\)"):
        ring.run_ranks(q, k, v)


def test_cross_attention_gpu_package_shapes(tmp_path):
    """A GPU ring package for cross attention takes each rank's 48 query and
    96 key rows (test_gpu.py runs its ranks on one GPU)."""
    import json
    import subprocess
    spec = dict(cross_spec("causal", 96, 192, {"ranks": 2}), dtype="bf16", head_dim=64)
    (tmp_path / "s.json").write_text(json.dumps(spec))
    subprocess.run([attn._tool("attn-compile"), str(tmp_path / "s.json"), "--target", "sm_90a",
                    "-o", str(tmp_path / "pkg")], check=True, capture_output=True)
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    shapes = {a["name"]: a["shape"] for a in manifest["args"]}
    assert shapes["q"][2] == shapes["out"][2] == shapes["lse"][2] == 48
    assert shapes["k"][2] == shapes["v"][2] == 96
    assert [r["q_pieces"] for r in manifest["ring"]["schedule"]] == [[[0, 48, 0]], [[0, 48, 48]]]
    assert [r["kv_pieces"] for r in manifest["ring"]["schedule"]] == [[[0, 96, 0]], [[0, 96, 96]]]
