"""Tokenized attention (the RFC in the project's seeds): attention over token
ids whose query, key and value come from an embedding of the id alone.

When K and V depend only on the id, the duplicates of a token in a sequence
are one key attended `count` times:

    sum_j exp(s_ij) v_j  =  sum_u count_u exp(s_iu) v_u  =  sum_u exp(s_iu + log count_u) v_u

so attention over the unique ids of each sequence, with the score bias
log(count_u), is exact (docs/Tokenized.md). Queries that are tokens give the
same output for every duplicate, so they are computed once per unique id too
and scattered back to the positions. Target attention (many candidate items
of one user against the user's behaviour sequence) takes the candidates as
the queries of one call per batch, not one call per candidate.

The attention runs in one compiled package with `"key_bias": true` and
`"key_ids": true`: K and V are tables [1, Hkv, V, D] that the kernels read
at the ids (the user's own tables for a TableEmbedding, else the embeddings
of the batch's unique ids), so no per-position K/V is ever built. Unique ids
and counts are computed in one vectorised pass over the batch, with NumPy for
NumPy/CPU inputs and with PyTorch on the GPU for CUDA tensors.

With nranks > 1 every rank holds the embedding rows of the ids it owns
(id % nranks == rank) and fetches the rows of its batch's unique ids from
their owners with two all-to-alls (ids out, rows back) over an exchange
group: attn.InProcessGroup (threads for ranks) or attn.NcclGroup.
"""

import ctypes

import numpy as np

from . import AttnError, _load_or_compile, nccl_id_from_rank0, _runtime

__all__ = ["TokenizedAttention", "TableEmbedding", "InProcessGroup", "NcclGroup"]


def _is_torch(x):
    return type(x).__module__.startswith("torch")


class _Ops:
    """The few array operations of the dedup, for NumPy or PyTorch."""

    def __init__(self, like):
        self.torch = _is_torch(like)
        self.gpu = False
        if self.torch:
            import torch
            self.t = torch
            self.device = like.device
            self.gpu = like.device.type == "cuda"

    def kernel_dtype(self):
        """What the packages take: bf16 on the GPU, float32 on the cpu target."""
        return self.t.bfloat16 if self.gpu else (self.t.float32 if self.torch else np.float32)

    def table(self, rows):
        """Embedding rows [N, h, D] as a kernel table [1, h, N, D] (contiguous,
        of kernel_dtype(), where the kernels run)."""
        if self.torch:
            rows = self.t.as_tensor(rows).to(device=self.device, dtype=self.kernel_dtype())
            return rows.permute(1, 0, 2).unsqueeze(0).contiguous()
        _refuse_cpu_gradients([rows], "embedding tables")
        if _is_torch(rows):
            rows = rows.detach().cpu()
        return np.ascontiguousarray(np.asarray(rows, np.float32).transpose(1, 0, 2)[None])

    def concat(self, a, b):
        return self.t.cat([a, b]) if self.torch else np.concatenate([a, b])

    def arange(self, n):
        return self.t.arange(n, device=self.device) if self.torch else np.arange(n)

    def full(self, shape, value, dtype):
        if self.torch:
            return self.t.full(shape, value, dtype=dtype, device=self.device)
        return np.full(shape, value, dtype=dtype)

    def unique(self, x):
        """Sorted unique values, the inverse map and the counts."""
        if self.torch:
            return self.t.unique(x, sorted=True, return_inverse=True, return_counts=True)
        return np.unique(x, return_inverse=True, return_counts=True)

    def nonzero(self, mask):
        return self.t.nonzero(mask, as_tuple=True) if self.torch else np.nonzero(mask)

    def bincount(self, x, n):
        return (self.t.bincount(x, minlength=n) if self.torch
                else np.bincount(x, minlength=n))

    def cumsum(self, x):
        return self.t.cumsum(x, 0) if self.torch else np.cumsum(x)

    def log(self, x):
        return self.t.log(x.float()) if self.torch else np.log(x).astype(np.float32)

    def item(self, x):
        return int(x.item()) if self.torch else int(x)

    def int64(self, x):
        return x.long() if self.torch else np.asarray(x, np.int64)

    def contiguous(self, x):
        return x.contiguous() if self.torch else np.ascontiguousarray(x)

    def f32(self):
        return self.t.float32 if self.torch else np.float32

    def i32(self):
        return self.t.int32 if self.torch else np.int32


def _refuse_cpu_gradients(tensors, what):
    """The cpu target runs on NumPy arrays: tensors that require grad (with
    grad mode on) would lose their gradients there, so they are refused."""
    if any(_is_torch(t) and t.requires_grad for t in tensors):
        import torch
        if torch.is_grad_enabled():
            raise AttnError(f"{what} that require grad, but TokenizedAttention computes "
                            "gradients on CUDA tensors only (the cpu target runs on NumPy "
                            "arrays); pass CUDA tokens, or call it under torch.no_grad()")


def _like(result, tokens):
    """Results as PyTorch tensors when the tokens were CPU tensors (the cpu
    target computed them as NumPy arrays)."""
    if not _is_torch(tokens) or tokens.device.type == "cuda":
        return result
    import torch
    if isinstance(result, tuple):
        return tuple(torch.from_numpy(r) for r in result)
    return torch.from_numpy(result)


class TableEmbedding:
    """An embedding function given as tables: ids [N] -> (q, k, v), rows of
    q_table [vocab, H, D] and k_table, v_table [vocab, Hkv, D] (NumPy arrays
    or PyTorch tensors). On a single rank the kernels read K and V from these
    tables in place (docs/Tokenized.md)."""

    def __init__(self, q_table, k_table, v_table):
        self.torch = _is_torch(q_table)
        if not self.torch:
            q_table, k_table, v_table = (np.asarray(t, dtype=np.float32)
                                         for t in (q_table, k_table, v_table))
        self.q_table, self.k_table, self.v_table = q_table, k_table, v_table
        if tuple(k_table.shape) != tuple(v_table.shape):
            raise AttnError(f"k_table {tuple(k_table.shape)} and v_table "
                            f"{tuple(v_table.shape)} differ")
        if (q_table.ndim != 3 or k_table.ndim != 3 or q_table.shape[0] != k_table.shape[0]
                or q_table.shape[2] != k_table.shape[2]):
            raise AttnError("tables must be [vocab, heads, head_dim] with one vocab and head_dim, "
                            f"got q {tuple(q_table.shape)}, k {tuple(k_table.shape)}")
        self.vocab, self.heads, self.head_dim = (int(n) for n in q_table.shape)
        self.kv_heads = int(k_table.shape[1])
        self._kernel_tables = {}

    def check_ids(self, ids):
        if ids.numel() if _is_torch(ids) else ids.size:
            if _is_torch(ids):  # one reduction, one wait for the GPU
                lo, hi = (int(x) for x in ids.aminmax())
            else:
                lo, hi = int(ids.min()), int(ids.max())
            self.check_range(lo, hi)

    def check_range(self, lo, hi, what="token ids"):
        """Raises unless ids from lo to hi are rows of the tables."""
        if lo < 0 or hi >= self.vocab:
            raise AttnError(f"{what} must lie in [0, {self.vocab}), got [{lo}, {hi}]")

    def __call__(self, ids):
        self.check_ids(ids)
        if self.torch:
            ids = ids.to(self.q_table.device).long()
        return self.q_table[ids], self.k_table[ids], self.v_table[ids]

    def kernel_tables(self, ops):
        """k and v as [1, Hkv, vocab, D] kernel tables where the kernels run
        (inference: no autograd), made once and cached while the tables stay
        as they are (a tensor's version counts its in-place updates, an
        optimizer's step included)."""
        key = str(ops.device) if ops.torch else "numpy"
        if self.torch:
            key += f"/{self.k_table._version}/{self.v_table._version}"
        if key not in self._kernel_tables:
            if ops.torch:
                with ops.t.no_grad():
                    made = ops.table(self.k_table), ops.table(self.v_table)
            else:
                made = ops.table(self.k_table), ops.table(self.v_table)
            self._kernel_tables = {key: made}
        return self._kernel_tables[key]


class _Member:
    """One rank's handle on an exchange group: all-to-alls of byte blocks."""

    def __init__(self, handle, rank, nranks, device):
        self._handle, self.rank, self.nranks, self.device = handle, rank, nranks, device

    def __del__(self):
        if getattr(self, "_handle", None):
            _runtime().attn_member_free(self._handle)
            self._handle = None

    def all_to_all(self, send, send_counts, recv_counts):
        """send: rows for ranks 0..N-1 back to back (send_counts[p] rows for
        rank p); returns the rows from ranks 0..N-1 (recv_counts[p] each).
        NumPy arrays for in-process groups, CUDA tensors for NCCL groups."""
        ops = _Ops(send)
        shape_tail = tuple(send.shape[1:])
        itemsize = send.element_size() if ops.torch else send.itemsize
        row_bytes = itemsize * int(np.prod(shape_tail, dtype=np.int64))
        total = int(sum(recv_counts))
        if ops.torch:
            recv = ops.t.empty((total,) + shape_tail, dtype=send.dtype, device=send.device)
            send = send.contiguous()
            src, dst = ctypes.c_void_p(send.data_ptr()), ctypes.c_void_p(recv.data_ptr())
            stream = ctypes.c_void_p(ops.t.cuda.current_stream(send.device).cuda_stream)
        else:
            send = np.ascontiguousarray(send)
            recv = np.empty((total,) + shape_tail, dtype=send.dtype)
            src, dst = ctypes.c_void_p(send.ctypes.data), ctypes.c_void_p(recv.ctypes.data)
            stream = None
        n = self.nranks
        sb = (ctypes.c_int64 * n)(*[int(c) * row_bytes for c in send_counts])
        rb = (ctypes.c_int64 * n)(*[int(c) * row_bytes for c in recv_counts])
        lib = _runtime()
        if lib.attn_all_to_all(self._handle, src, sb, dst, rb, stream) != 0:
            raise AttnError(lib.attn_last_error().decode())
        return recv


class InProcessGroup:
    """Threads standing for `nranks` ranks (host memory): member(rank) is
    what rank's TokenizedAttention takes as `group`. A rank that fails or
    stops answering makes the others fail after `timeout` seconds."""

    def __init__(self, nranks, timeout=60.0):
        lib = _runtime()
        self._handle = ctypes.c_void_p()
        if lib.attn_hub_create(int(nranks), float(timeout), ctypes.byref(self._handle)) != 0:
            raise AttnError(lib.attn_last_error().decode())
        self.nranks = int(nranks)

    def __del__(self):
        if getattr(self, "_handle", None):
            _runtime().attn_hub_free(self._handle)
            self._handle = None

    def member(self, rank):
        lib = _runtime()
        handle = ctypes.c_void_p()
        if lib.attn_hub_member(self._handle, int(rank), ctypes.byref(handle)) != 0:
            raise AttnError(lib.attn_last_error().decode())
        return _Member(handle, int(rank), self.nranks, device=False)


def NcclGroup(name="tokenized", group=None):
    """This process's member of an NCCL exchange group (device memory):
    torch.distributed must be initialised; rank 0's NCCL id reaches the
    others through `group`. Call once per process with its CUDA device set."""
    rank, world, nccl_id = nccl_id_from_rank0(group)
    lib = _runtime()
    handle = ctypes.c_void_p()
    if lib.attn_nccl_member(rank, world, nccl_id, name.encode(), ctypes.byref(handle)) != 0:
        raise AttnError(lib.attn_last_error().decode())
    return _Member(handle, rank, world, device=True)


def _exchange_with_gradients(packed, layer, ops, send_counts, recv_counts):
    """layer._exchange_rows(packed, ...) recorded for autograd (RowsExchange,
    made on first use: torch is optional)."""
    global _rows_exchange
    if _rows_exchange is None:
        _rows_exchange = _rows_exchange_function()
    return _rows_exchange.apply(packed, layer, ops, send_counts, recv_counts)


_rows_exchange = None


def _rows_exchange_function():
    import torch

    class RowsExchange(torch.autograd.Function):
        """Forward: this rank's rows to the ranks that asked for them, their
        rows back. Backward: the gradients of the received rows go back to
        the rows' owners (the reverse all-to-all), a collective like the
        forward: every rank's backward must reach it, in the same order."""

        @staticmethod
        def forward(ctx, packed, layer, ops, send_counts, recv_counts):
            ctx.layer, ctx.ops = layer, ops
            ctx.send_counts, ctx.recv_counts = send_counts, recv_counts
            return layer._exchange_rows(packed, ops, send_counts, recv_counts)

        @staticmethod
        def backward(ctx, grad):
            back = ctx.layer._exchange_rows(grad.contiguous(), ctx.ops, ctx.recv_counts,
                                            ctx.send_counts)
            return back, None, None, None, None

    return RowsExchange


class TokenizedAttention:
    """Attention over token sequences: tokens [B, L] int ids, lengths [B].

    embedding_fn(ids [N]) -> (q [N, H, D], k [N, Hkv, D], v [N, Hkv, D]): a
    TableEmbedding (its tables are read by the kernels in place) or any
    function of the id alone. forward() returns out [B, H, L, D] (0 beyond
    lengths) and, with return_lse, the LSE [B, H, L] (-inf beyond lengths):
    full attention over the first lengths[b] tokens, computed over the
    unique ids with log(count) biases (dedup=True) or over every position
    (dedup=False, the naive form). target_forward() is target attention.

    Inputs are NumPy arrays / CPU tensors (float32, the cpu target) or CUDA
    tensors (bf16 kernels for `target`, default sm_90a; unique/count on the
    GPU). With nranks > 1, `group` is this rank's member of an exchange
    group (InProcessGroup(n).member(rank) or NcclGroup()) and embedding_fn
    is called only with the ids this rank owns (id % nranks == rank).
    `last_stats` describes the last call: positions, unique ids and, with
    nranks > 1, the bytes received against fetching every position's rows.
    Packages are compiled on first use: into `package_dir` if given, where
    later instances load them, else through attn.compile's package cache,
    so that later instances and processes with the same shapes load them
    too.
    """

    def __init__(self, batch_size, sequence_length, nranks, embedding_fn, dedup=True,
                 group=None, target="sm_90a", heads=None, kv_heads=None, head_dim=None,
                 package_dir=None):
        if batch_size < 1 or sequence_length < 1:
            raise AttnError(f"batch_size and sequence_length must be >= 1, got "
                            f"{batch_size}, {sequence_length}")
        if nranks < 1:
            raise AttnError(f"nranks must be >= 1, got {nranks}")
        if nranks > 1 and (group is None or group.nranks != nranks):
            raise AttnError(f"nranks = {nranks} needs group=, this rank's member of an exchange "
                            "group of as many ranks (attn.InProcessGroup(nranks).member(rank) "
                            "or attn.NcclGroup())")
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.nranks, self.group = nranks, group
        self.embedding_fn, self.dedup, self.target = embedding_fn, dedup, target
        self.package_dir = package_dir
        if isinstance(embedding_fn, TableEmbedding):
            heads, kv_heads, head_dim = (embedding_fn.heads, embedding_fn.kv_heads,
                                         embedding_fn.head_dim)
        elif heads is None or kv_heads is None or head_dim is None:
            if nranks > 1:
                raise AttnError("with nranks > 1 and an embedding function (not a "
                                "TableEmbedding), give heads=, kv_heads= and head_dim=")
            probe = [np.asarray(t, dtype=np.float32)
                     for t in embedding_fn(np.zeros(1, np.int64))]
            if len(probe) != 3 or probe[0].ndim != 3 or probe[1].shape != probe[2].shape:
                raise AttnError("embedding_fn(ids) must return (q [N, H, D], k [N, Hkv, D], "
                                "v [N, Hkv, D])")
            heads, head_dim = probe[0].shape[1:]
            kv_heads = probe[1].shape[1]
        self.heads, self.kv_heads, self.head_dim = int(heads), int(kv_heads), int(head_dim)
        if self.heads % self.kv_heads:
            raise AttnError(f"kv heads {self.kv_heads} do not divide heads {self.heads}")
        self._packages = {}
        self.last_stats = {}

    # -- packages ----------------------------------------------------------

    # The kinds of package a layer runs (package_spec):
    #   dedup  queries against the unique ids' keys (key_bias, key_ids): target
    #          attention, and self-attention on NumPy arrays;
    #   self   the same with lengths: each sequence's unique count, so that
    #          the unique ids' queries and keys are rows [0, count) of the
    #          dedup kernels' [B, L]-wide outputs, used as they come (rows
    #          past the count give 0): self-attention on CUDA tensors;
    #   naive  the tokenized pattern over every position's q, k and v
    #          (dedup=False);
    #   train  the unique keys' rows gathered per sequence, with a backward.
    KINDS = ("dedup", "self", "naive", "train")

    def _package(self, ops, naive=False):
        return self.package(ops.gpu, "naive" if naive else "dedup")

    def package_spec(self, gpu, kind="dedup"):
        """The spec and target of package(gpu, kind), kind one of KINDS; its
        name says its shape, so that a folder can hold the packages of
        several layers."""
        if kind not in self.KINDS:
            raise AttnError(f"package kind {kind!r}: expected one of {', '.join(self.KINDS)}")
        target = self.target if gpu else "cpu"
        name = (f"tokenized_{kind}_b{self.batch_size}"
                f"_h{self.heads}x{self.kv_heads}_d{self.head_dim}"
                + (f"_l{self.sequence_length}" if kind == "naive" else "") + f"_{target}")
        spec = {"name": name, "batch": self.batch_size, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim}
        if kind == "naive":
            spec.update({"seq_len": self.sequence_length, "pattern": {"tokenized": {}}})
        elif kind == "train":
            spec.update({"key_bias": True, "backward": True, "pattern": {"full": {}}})
        else:
            pattern = "tokenized" if kind == "self" else "full"
            spec.update({"key_bias": True, "key_ids": True, "pattern": {pattern: {}}})
        if gpu:
            spec["dtype"] = "bf16"
        return spec, target

    def package(self, gpu, kind="dedup"):
        """The package of `kind` (KINDS) for the CPU (gpu=False) or for
        `target` (bf16). With package_dir, a package already there is loaded
        (machines without the compiler) and a new one is kept there."""
        key = (gpu, kind)
        if key not in self._packages:
            spec, target = self.package_spec(gpu, kind)
            self._packages[key] = _load_or_compile(spec, target, self.package_dir)
        return self._packages[key]

    def _attend(self, ops, q, keys, return_lse):
        """q [B, H, Q, D] against the keys of _unique_keys or _position_keys.
        The kernels read K and V from the tables at the ids; where autograd
        needs gradients of the tables or of q (CUDA tensors), the rows are
        gathered per sequence instead, so that the backward kernels' dk and
        dv flow back through the gather into the tables (and embedding_fn),
        and the training package runs forward and backward."""
        k_rows, v_rows = keys["rows"]
        if not self._needs_grad(ops, q, k_rows, v_rows):
            k, v = keys["tables"]()
            return self._package(ops)(q, k, v, key_bias=keys["bias"],
                                      key_ids=keys["key_ids"], return_lse=return_lse)
        # Rows [N, Hkv, D] -> [B, Hkv, U, D] at the key ids.
        ids = keys["key_ids"].long()
        gather = lambda rows: (ops.t.as_tensor(rows).to(ops.device)[ids]
                               .to(ops.kernel_dtype()).permute(0, 2, 1, 3).contiguous())
        # The backward kernels take q contiguous (a no-op where it is).
        return self.package(True, "train")(q.contiguous(), gather(k_rows),
                                              gather(v_rows), key_bias=keys["bias"],
                                              return_lse=return_lse)

    def _needs_grad(self, ops, *tensors):
        """Whether autograd records this call: CUDA tensors of which one
        requires grad, with grad mode on."""
        return bool(ops.torch and ops.t.is_grad_enabled() and
                    any(getattr(t, "requires_grad", False) for t in tensors))

    # -- inputs ------------------------------------------------------------

    def _check(self, tokens, lengths):
        """(ops, tokens, lengths) checked; CPU tensors become NumPy arrays
        (the cpu target's kind; _like turns results back into tensors). The
        lengths' range is checked here for NumPy arrays; for CUDA tensors
        the caller checks it (_check_lengths, or with the dedup_keys kernel's
        results in one read)."""
        if _is_torch(tokens) and tokens.device.type != "cuda":
            tokens = tokens.numpy()
        if _is_torch(lengths) and lengths.device.type != "cuda":
            lengths = lengths.numpy()
        ops = _Ops(tokens)
        B, L = self.batch_size, self.sequence_length
        if ops.torch:
            if tokens.is_floating_point():
                raise AttnError(f"tokens: expected integer ids, got {tokens.dtype}")
            lengths = ops.t.as_tensor(lengths, device=tokens.device).long()
            tokens = tokens.long()
        else:
            tokens, lengths = np.asarray(tokens), np.asarray(lengths)
            for name, x in (("tokens", tokens), ("lengths", lengths)):
                if not np.issubdtype(x.dtype, np.integer):
                    raise AttnError(f"{name}: expected integer ids/lengths, got {x.dtype}")
            tokens, lengths = tokens.astype(np.int64), lengths.astype(np.int64)
        if tuple(tokens.shape) != (B, L):
            raise AttnError(f"tokens: shape {tuple(tokens.shape)}, expected (batch_size, "
                            f"sequence_length) = ({B}, {L})")
        if tuple(lengths.shape) != (B,):
            raise AttnError(f"lengths: shape {tuple(lengths.shape)}, expected ({B},)")
        if not ops.torch:
            self._check_lengths(ops, lengths)
        return ops, tokens, lengths

    def _check_lengths(self, ops, lengths):
        """Raises for the first length outside [0, L] (a wait for the GPU on
        CUDA tensors)."""
        outside = (lengths < 0) | (lengths > self.sequence_length)
        if bool(outside.any()):
            b = ops.item(ops.nonzero(outside)[0][0])
            raise self._length_outside(b, ops.item(lengths[b]))

    def _length_outside(self, b, given):
        return AttnError(f"lengths[{b}] = {given} is outside [0, {self.sequence_length}]")

    def _may_dedup_on_gpu(self, ops):
        """Whether the batch's keys may come from _unique_keys_on_gpu: CUDA
        tensors, a TableEmbedding, one rank, dedup."""
        return (ops.gpu and self.dedup and self.nranks == 1
                and isinstance(self.embedding_fn, TableEmbedding))

    # -- embeddings --------------------------------------------------------

    def _embed_local(self, ids, ops):
        """(q, k, v) rows of `ids` from this rank's embedding_fn, as arrays of
        the ops' kind on its device."""
        rows = self.embedding_fn(ids)
        if len(rows) != 3:
            raise AttnError("embedding_fn(ids) must return (q, k, v)")
        if ops.torch:
            return tuple(ops.t.as_tensor(r).to(ops.device) for r in rows)
        _refuse_cpu_gradients(rows, "embedding_fn returned tensors")
        return tuple(np.asarray(r.detach().cpu() if _is_torch(r) else r, np.float32)
                     for r in rows)

    def _embed(self, ids, ops):
        """(q, k, v) of `ids` (sorted, unique): locally, or with nranks > 1
        from their owners through the group (ids out, rows back)."""
        if self.nranks == 1:
            return self._embed_local(ids, ops)
        n, H, Hkv, D = self.nranks, self.heads, self.kv_heads, self.head_dim
        owner = ids % n
        order = (ops.t.argsort(owner, stable=True) if ops.torch
                 else np.argsort(owner, kind="stable"))
        send_ids = ids[order]
        send_counts = ops.bincount(owner, n)
        to_list = lambda x: (x.cpu() if _is_torch(x) else x).tolist()
        recv_counts = to_list(self.group.all_to_all(self._host_or_device(send_counts, ops),
                                                    [1] * n, [1] * n))
        send_counts = to_list(send_counts)
        asked = self.group.all_to_all(self._host_or_device(send_ids, ops), send_counts,
                                      recv_counts)
        if len(asked) and bool(((asked % n) != self.group.rank).any()):
            raise AttnError(f"rank {self.group.rank} was asked for ids it does not own")
        if ops.torch and not self.group.device:
            asked = ops.t.as_tensor(asked, device=ops.device)
        q, k, v = self._embed_local(asked, ops)
        width = (H + 2 * Hkv) * D
        packed = (ops.t.cat([q.reshape(len(asked), -1), k.reshape(len(asked), -1),
                             v.reshape(len(asked), -1)], 1) if ops.torch
                  else np.concatenate([q.reshape(len(asked), -1), k.reshape(len(asked), -1),
                                       v.reshape(len(asked), -1)], 1))
        if ops.torch:
            # Rows back to the askers; under autograd their gradients return
            # to this rank (the reverse all-to-all) in the backward pass. An
            # in-process group's exchange runs on CPU tensors, so that its
            # backward runs in the rank's own thread (autograd runs a
            # device's work on one thread for all ranks sharing the GPU,
            # where one rank's wait for another would block both).
            if not self.group.device:
                packed = packed.cpu()
            got = _exchange_with_gradients(packed, self, ops, recv_counts, send_counts)
            got = got.to(ops.device)
            rows = ops.t.zeros((len(ids), width), dtype=got.dtype, device=got.device)
        else:
            got = self.group.all_to_all(packed, recv_counts, send_counts)
            rows = ops.full((len(ids), width), 0.0, got.dtype)
        rows[order] = got
        esize = got.element_size() if ops.torch else got.itemsize
        remote = sum(c for p, c in enumerate(send_counts) if p != self.group.rank)
        self.last_stats.update({
            "bytes_received": int(8 * (n - 1) + 8 * sum(c for p, c in enumerate(recv_counts)
                                                        if p != self.group.rank)
                                  + remote * width * esize),
            "row_bytes": width * esize, "remote_unique": int(remote)})
        return (rows[:, :H * D].reshape(-1, H, D), rows[:, H * D:(H + Hkv) * D].reshape(-1, Hkv, D),
                rows[:, (H + Hkv) * D:].reshape(-1, Hkv, D))

    def _host_or_device(self, x, ops):
        """Buffers for the group: host memory for in-process groups (NumPy),
        device memory for NCCL groups."""
        if self.group.device:
            if not ops.torch or ops.device.type != "cuda":
                raise AttnError("an NCCL group exchanges device memory: pass CUDA tensors")
            return x.contiguous()
        return x.detach().cpu().numpy() if ops.torch else x

    def _exchange_rows(self, x, ops, send_counts, recv_counts):
        """The group's all-to-all of tensor rows: CUDA tensors for NCCL
        groups, CPU tensors for in-process groups (host memory)."""
        if self.group.device:
            return self.group.all_to_all(self._host_or_device(x, ops), send_counts,
                                         recv_counts)
        # Host bytes; NumPy has no bfloat16, so its rows travel as int16.
        host = x.detach().cpu()
        bf16 = host.dtype == ops.t.bfloat16
        got = self.group.all_to_all((host.view(ops.t.int16) if bf16 else host).numpy(),
                                    send_counts, recv_counts)
        got = ops.t.from_numpy(got)
        return got.view(ops.t.bfloat16) if bf16 else got

    # -- the keys of a batch -----------------------------------------------

    def _unique_keys(self, ops, tokens, lengths, extra_ids=None):
        """Per sequence: its unique ids, their counts and every position's
        unique slot, in one pass over the batch. Returns a dict with
        U (most unique ids of a sequence), the positions (bpos, ipos), each
        position's slot, the per-slot key ids [B, U] into the K/V tables,
        the bias [B, U] (log count, -inf for padding), the K/V rows the ids
        index ([N, Hkv, D] each) and a function making the kernels' tables of
        them, and the q rows of the slots; `extra_ids` (candidates) get q
        rows too."""
        B, L = self.batch_size, self.sequence_length
        valid = ops.arange(L)[None, :] < lengths[:, None]
        bpos, ipos = ops.nonzero(valid)
        tok = tokens[bpos, ipos]
        emb = self.embedding_fn
        table_mode = isinstance(emb, TableEmbedding) and self.nranks == 1
        if table_mode and len(tok):
            emb.check_ids(tok)
        # (sequence, id) pairs as one integer b * width + id.
        if table_mode:
            width = emb.vocab
        else:
            width = (ops.item(tok.max()) + 1) if len(tok) else 1
        uk, inverse, counts = ops.unique(bpos * width + tok)
        ub, uid = uk // width, uk % width
        per_seq = ops.bincount(ub, B)
        start = ops.cumsum(per_seq) - per_seq
        slot = ops.arange(len(uk)) - start[ub]
        U = max(1, ops.item(per_seq.max()) if len(uk) else 0)

        # Rows of the K/V tables: the user's tables indexed by id, or the
        # embeddings of the batch's unique ids (fetched once per id).
        if table_mode:
            kv_rows = (emb.k_table, emb.v_table)
            tables = lambda: emb.kernel_tables(ops)
            row = uid
            q_rows = emb.q_table
            if ops.torch:
                q_rows = ops.t.as_tensor(q_rows).to(ops.device)
            else:
                _refuse_cpu_gradients([q_rows], "embedding tables")
            q_slots = q_rows[uid]
            q_extra = q_rows[extra_ids] if extra_ids is not None else None
        else:
            ids = uid if extra_ids is None else ops.concat(uid, extra_ids.reshape(-1))
            tid, tinv, _ = ops.unique(ids)
            q, k, v = self._embed(tid, ops)
            row = tinv[:len(uid)]
            q_slots = q[row]
            q_extra = q[tinv[len(uid):]].reshape(tuple(extra_ids.shape) + tuple(q.shape[1:])) \
                if extra_ids is not None else None
            kv_rows = (k, v)
            tables = lambda: (ops.table(k), ops.table(v))

        key_ids = ops.full((B, U), 0, ops.i32())
        key_ids[ub, slot] = row.int() if ops.torch else row.astype(np.int32)
        bias = ops.full((B, U), float("-inf"), ops.f32())
        bias[ub, slot] = ops.log(counts)
        self.last_stats.update({"positions": int(len(tok)), "unique": int(len(uk)),
                                "padded_unique": U})
        if self.nranks > 1:  # what fetching every position's rows would take
            remote = ops.item(((tok % self.nranks) != self.group.rank).sum())
            self.last_stats["per_position_bytes"] = remote * self.last_stats["row_bytes"]
        return {"U": U, "bpos": bpos, "ipos": ipos, "slot": slot[inverse], "ub": ub,
                "uslot": slot, "key_ids": key_ids, "bias": bias, "rows": kv_rows,
                "tables": tables,
                "q_slots": q_slots, "q_extra": q_extra, "dtype": ops.kernel_dtype()}

    def _dedup_on_gpu(self, ops, tokens, lengths, extra_ids=None, kind="dedup"):
        """The dedup kernels of the `kind` package on CUDA tokens over a
        TableEmbedding on one rank (one launch, where the NumPy-shaped path
        takes dozens of small operations and several waits for the GPU;
        docs/Tokenized.md), and one read of their per-sequence counts, which
        also checks the lengths and the ids (the candidates' `extra_ids`
        too). Returns (key_ids, bias, slot_at, info) as dedup_keys gives
        them, U (most unique ids of a sequence), the q table on the tokens'
        device and the candidates' q rows [B, C, H, D] (or None); or None
        where the sequences are longer than the kernels sort."""
        got = self.package(True, kind).dedup_keys(tokens, lengths)
        if got is None:
            return None
        info = got[3]
        t = ops.t
        B, L, emb = self.batch_size, self.sequence_length, self.embedding_fn
        q_table = t.as_tensor(emb.q_table).to(tokens.device)
        # The candidates' q rows, gathered while the GPU sorts: their ids are
        # clamped into the table here and refused after the read below
        # where any lies outside it, before the rows are used.
        # (index_select and narrow below: PyTorch's indexing operator costs
        # the host several times more per call.)
        q_extra = None
        if extra_ids is not None:
            q_extra = (q_table.index_select(0, extra_ids.clamp(0, emb.vocab - 1).reshape(-1))
                       .view(tuple(extra_ids.shape) + tuple(q_table.shape[1:])))
        reads = info.reshape(-1)
        if extra_ids is not None:
            reads = t.cat([reads, t.stack(t.aminmax(extra_ids))])
        reads = reads.tolist()
        per_seq = [reads[4 * b:4 * b + 4] for b in range(B)]
        for b, (_, given, _, _) in enumerate(per_seq):
            if not 0 <= given <= L:
                raise self._length_outside(b, given)
        bounds = [("token ids", [(lo, hi) for _, n, lo, hi in per_seq if n > 0])]
        if extra_ids is not None:
            bounds.append(("candidate ids", [tuple(reads[4 * B:])]))
        for what, ranges in bounds:
            if ranges:
                emb.check_range(min(r[0] for r in ranges), max(r[1] for r in ranges), what)
        U = max(1, max(p[0] for p in per_seq))
        self.last_stats.update({"positions": sum(p[1] for p in per_seq),
                                "unique": sum(p[0] for p in per_seq), "padded_unique": U})
        return got, U, q_table, q_extra

    def _unique_keys_on_gpu(self, ops, tokens, lengths, extra_ids=None):
        """_unique_keys from _dedup_on_gpu: its dict, whose q rows come
        [B, U, H, D] ("q_padded", a function), and each position's slot
        ("slot_at", -1 past the length); or None where the sequences are
        longer than the kernels sort."""
        got = self._dedup_on_gpu(ops, tokens, lengths, extra_ids)
        if got is None:
            return None
        (key_ids, bias, slot_at, _), U, q_table, q_extra = got
        emb = self.embedding_fn
        key_ids, bias = key_ids.narrow(1, 0, U).contiguous(), bias.narrow(1, 0, U).contiguous()
        return {"U": U, "key_ids": key_ids, "bias": bias,
                "rows": (emb.k_table, emb.v_table), "tables": lambda: emb.kernel_tables(ops),
                # (made where self-attention needs them) Slots past a
                # sequence's unique ids read row 0: queries that no position
                # takes (their gradient is 0).
                "q_padded": lambda: q_table[key_ids.long()],
                "q_extra": q_extra,
                "slot_at": slot_at, "dtype": ops.kernel_dtype()}

    def _self_on_gpu(self, ops, tokens, lengths, return_lse):
        """Self-attention on CUDA tensors over a TableEmbedding, without
        autograd, in few operations (a short sequence's call is bound by the
        host's time per operation: bench/tokenized_host_profile.py). The
        dedup kernels' [B, L]-wide outputs go to the "self" package as they
        are, each sequence's unique count its length, so that the unique
        ids are its first rows as queries and as keys; then each position
        takes its slot's row. Returns None where the sequences are longer
        than the kernels sort."""
        got = self._dedup_on_gpu(ops, tokens, lengths, kind="self")
        if got is None:
            return None
        (key_ids, bias, slot_at, info), _, q_table, _ = got
        B, L, H, D = self.batch_size, self.sequence_length, self.heads, self.head_dim
        # The slots' q rows, read at their ids (0 past a sequence's unique
        # ids: rows the package leaves empty); the kernels take the
        # [B, H, L, D] view.
        q = (q_table.index_select(0, key_ids.view(-1)).to(ops.kernel_dtype())
             .view(B, L, H, D).transpose(1, 2))
        k, v = self.embedding_fn.kernel_tables(ops)
        res = self.package(True, "self")(q, k, v, lengths=info[:, 0].int(), key_bias=bias,
                                         key_ids=key_ids, return_lse=return_lse)
        out_u, lse_u = res if return_lse else (res, None)
        # Position i takes row slot_at[b, i]. Past the length slot_at is -1,
        # taken as row L - 1: there the length is below L, so the row lies
        # past the sequence's unique count (at most its length), and the
        # package left it 0 (and its LSE -inf).
        at = slot_at.remainder(L).view(B, 1, L)
        out = out_u.gather(2, at.view(B, 1, L, 1).expand(B, H, L, D))
        return (out, lse_u.gather(2, at.expand(B, H, L))) if return_lse else out

    # -- self-attention ----------------------------------------------------

    def forward(self, tokens, lengths, return_lse=False):
        """Self-attention of each sequence's first lengths[b] tokens."""
        return _like(self._forward(tokens, lengths, return_lse), tokens)

    def _forward(self, tokens, lengths, return_lse):
        ops, tokens, lengths = self._check(tokens, lengths)
        self.last_stats = {}
        B, L, H, D = self.batch_size, self.sequence_length, self.heads, self.head_dim
        keys = None
        if self._may_dedup_on_gpu(ops):
            emb = self.embedding_fn
            if not self._needs_grad(ops, emb.q_table, emb.k_table, emb.v_table):
                got = self._self_on_gpu(ops, tokens, lengths, return_lse)
                if got is not None:
                    return got
            else:  # training: the unique keys' rows gathered per sequence
                keys = self._unique_keys_on_gpu(ops, tokens, lengths)
        if keys is not None:
            q = keys["q_padded"]().to(keys["dtype"]).transpose(1, 2).contiguous()
            out_u, lse_u = self._attend(ops, q, keys, return_lse=True)
            # Back to positions: each position's row of its slot; 0 and -inf
            # past the lengths.
            slot_at = keys["slot_at"]
            hidden = (slot_at < 0)[:, None, :]
            at = slot_at.clamp(min=0)[:, None, :]
            out = out_u.gather(2, at[..., None].expand(B, H, L, D)).masked_fill(
                hidden[..., None], 0.0)
            lse = lse_u.gather(2, at.expand(B, H, L)).masked_fill(hidden, float("-inf"))
            return (out, lse) if return_lse else out
        if ops.torch:
            self._check_lengths(ops, lengths)
        if not self.dedup:
            return self._forward_naive(ops, tokens, lengths, return_lse)
        keys = self._unique_keys(ops, tokens, lengths)
        U = keys["U"]
        q = ops.full((B, U, H, D), 0.0, keys["dtype"])
        q[keys["ub"], keys["uslot"]] = (keys["q_slots"].to(keys["dtype"]) if ops.torch
                                        else keys["q_slots"])
        q = ops.contiguous(q.transpose(1, 2) if ops.torch else q.transpose(0, 2, 1, 3))
        out_u, lse_u = self._attend(ops, q, keys, return_lse=True)
        out = ops.full((B, H, L, D), 0.0, out_u.dtype)
        lse = ops.full((B, H, L), float("-inf"), ops.f32())
        bpos, ipos, slot = keys["bpos"], keys["ipos"], keys["slot"]
        out[bpos, :, ipos] = out_u[bpos, :, slot]
        lse[bpos, :, ipos] = lse_u[bpos, :, slot]
        return (out, lse) if return_lse else out

    __call__ = forward

    def _forward_naive(self, ops, tokens, lengths, return_lse):
        """Every position's q/k/v materialised, the tokenized pattern (the
        form the dedup path must equal; single rank)."""
        if self.nranks > 1:
            raise AttnError("dedup=False (the naive form) runs on one rank")
        B, L = self.batch_size, self.sequence_length
        q, k, v = self._embed_local(tokens.reshape(-1), ops)
        if ops.torch:
            dtype = ops.kernel_dtype()
            to_bhld = lambda t: t.reshape(B, L, -1, self.head_dim).transpose(1, 2).to(dtype).contiguous()
            lens = lengths.int()
        else:
            to_bhld = lambda t: np.ascontiguousarray(
                t.reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3))
            lens = lengths.astype(np.int32)
        self.last_stats = {"positions": ops.item(lengths.sum())}
        return self._package(ops, naive=True)(to_bhld(q), to_bhld(k), to_bhld(v), lengths=lens,
                                              return_lse=return_lse)

    # -- target attention --------------------------------------------------

    def target_forward(self, candidates, tokens, lengths, return_lse=False):
        """Target attention: candidates [B, C] item ids attend to their
        user's behaviour sequence tokens[b, :lengths[b]]; returns
        out [B, H, C, D] (and LSE [B, H, C]). One attention call for all
        candidates of all users, over the unique behaviour ids (dedup=False:
        over every behaviour position)."""
        return _like(self._target_forward(candidates, tokens, lengths, return_lse), tokens)

    def _target_forward(self, candidates, tokens, lengths, return_lse):
        ops, tokens, lengths = self._check(tokens, lengths)
        if not ops.torch and _is_torch(candidates):
            candidates = candidates.numpy()
        self.last_stats = {}
        B = self.batch_size
        cand = candidates.long() if ops.torch else np.asarray(candidates)
        if not ops.torch and not np.issubdtype(cand.dtype, np.integer):
            raise AttnError(f"candidates: expected integer ids, got {cand.dtype}")
        if cand.ndim != 2 or cand.shape[0] != B or cand.shape[1] < 1:
            raise AttnError(f"candidates: shape {tuple(cand.shape)}, expected ({B}, C) "
                            "with C >= 1")
        cand = ops.int64(cand)
        # The candidates' ids are checked with the dedup_keys kernel's read.
        keys = (self._unique_keys_on_gpu(ops, tokens, lengths, extra_ids=cand)
                if self._may_dedup_on_gpu(ops) else None)
        if keys is None:
            if ops.torch:
                self._check_lengths(ops, lengths)
            if isinstance(self.embedding_fn, TableEmbedding):
                self.embedding_fn.check_ids(cand)
            keys = (self._unique_keys(ops, tokens, lengths, extra_ids=cand) if self.dedup
                    else self._position_keys(ops, tokens, lengths, cand))
        q = keys["q_extra"]  # [B, C, H, D]
        if ops.torch:
            # The kernels read q as the [B, H, C, D] view (_attend makes it
            # contiguous for the backward pass).
            q = q.to(keys["dtype"]).transpose(1, 2)
        else:
            q = ops.contiguous(q.transpose(0, 2, 1, 3))
        return self._attend(ops, q, keys, return_lse)

    def _position_keys(self, ops, tokens, lengths, cand):
        """Every behaviour position a key of its own (bias 0, -inf beyond
        lengths): the naive form of target attention."""
        B, L = self.batch_size, self.sequence_length
        ids = ops.contiguous(tokens.reshape(-1))
        q, k, v = self._embed_local(ops.concat(ids, cand.reshape(-1)), ops)
        n = B * L
        key_ids = ops.arange(n).reshape(B, L)
        key_ids = key_ids.int() if ops.torch else key_ids.astype(np.int32)
        inside = ops.arange(L)[None, :] < lengths[:, None]
        bias = ops.full((B, L), float("-inf"), ops.f32())
        bias[inside] = 0.0
        return {"rows": (k[:n], v[:n]), "tables": lambda: (ops.table(k[:n]), ops.table(v[:n])),
                "key_ids": key_ids, "bias": bias,
                "q_extra": q[n:].reshape(tuple(cand.shape) + tuple(q.shape[1:])),
                "dtype": ops.kernel_dtype()}
