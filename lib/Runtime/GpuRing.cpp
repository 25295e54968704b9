//===- GpuRing.cpp - one rank of a GPU ring package -----------------------===//
//
// The CPU executor's program (Ring.cpp) on the GPU, asynchronously:
//
//   compute stream (the caller's)          communication stream (the package's)
//   split pieces, init state               wait for the inputs
//   ...                                    step i: wait until slot i%2 is free,
//                                          pack rows (2-D copies), NCCL
//                                          send/recv, unpack into the slot
//   step i: wait for its exchange,  <----  record exchanged[i]
//   run its updates, record slot free
//   finalize, merge pieces into out/lse
//
// so step i+1's transfer overlaps step i's kernels (kv = ring); with
// kv = allgather every exchange is queued before the first update. Zigzag
// ranks hold two pieces; the kernels address contiguous [B, H, rows, D]
// tensors, so pieces are copied apart at the start and back at the end
// (one pass over q, k, v and out). Received rows land in a zero-filled
// [B, Hkv, Ck, D] buffer at their local rows (never-sent rows stay finite and
// are never attended), then into piece buffers.
//
//===----------------------------------------------------------------------===//

#include "GpuModule.h"
#include "attn/Runtime/Half.h"
#include "attn/Runtime/Package.h"
#include "attn/Runtime/Ring.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <thread>

using namespace attn::runtime;
using namespace attn::runtime::cuda;

namespace {
/// Sub-allocations of one device buffer.
struct Arena {
  size_t used = 0;
  size_t take(size_t bytes) {
    size_t at = used;
    used += (bytes + 255) / 256 * 256;
    return at;
  }
};
/// The ring executors' device copies, queued on a stream: rows of a chunk
/// [slabs, rows, D] to and from piece buffers, and the rows of a step's row
/// sets to and from a packed buffer. Elements are `es` bytes (16-bit
/// inputs, f32 gradients). The first failure sticks in `rc`.
struct RingCopies {
  const Driver &d;
  int64_t B, Hkv, Ck, D;
  CUresult rc = CUDA_SUCCESS;

  void copy2d(CUdeviceptr src, size_t srcPitch, CUdeviceptr dst,
              size_t dstPitch, size_t width, size_t height, CUstream st) {
    if (rc != CUDA_SUCCESS || !width || !height)
      return;
    Memcpy2D c;
    c.srcDevice = src;
    c.srcPitch = srcPitch;
    c.dstDevice = dst;
    c.dstPitch = dstPitch;
    c.WidthInBytes = width;
    c.Height = height;
    rc = d.cuMemcpy2DAsync(&c, st);
  }
  /// Rows [p.offset, p.offset + p.rows) of every [.., rows, D] slab of
  /// `chunk` <-> the piece buffer `piece`.
  void pieceCopy(CUdeviceptr chunk, int64_t rows, CUdeviceptr piece,
                 int64_t slabs, const RingPiece &p, bool toPiece, CUstream st,
                 size_t es) {
    size_t rowBytes = size_t(D) * es;
    if (toPiece)
      copy2d(chunk + p.offset * rowBytes, rows * rowBytes, piece,
             p.rows * rowBytes, p.rows * rowBytes, slabs, st);
    else
      copy2d(piece, p.rows * rowBytes, chunk + p.offset * rowBytes,
             rows * rowBytes, p.rows * rowBytes, slabs, st);
  }
  /// Rows of `sets` of [B, Hkv, Ck, D] `chunk` <-> `packed`, (b, g)-major;
  /// returns the packed bytes.
  size_t packRows(const std::vector<RowSet> &sets, CUdeviceptr chunk,
                  CUdeviceptr packed, bool toPacked, CUstream st, size_t es) {
    size_t rowBytes = size_t(D) * es, n = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t gI = 0; gI < Hkv; ++gI) {
        const RowSet &set = sets.size() == 1 ? sets[0] : sets[gI];
        CUdeviceptr slab = chunk + size_t((b * Hkv + gI) * Ck) * rowBytes;
        for (const RowRun &r : set) {
          size_t width = r.len * rowBytes;
          size_t pitch = (r.count > 1 ? r.pitch : r.len) * rowBytes;
          if (toPacked)
            copy2d(slab + r.start * rowBytes, pitch, packed + n, width, width,
                   r.count, st);
          else
            copy2d(packed + n, width, slab + r.start * rowBytes, pitch, width,
                   r.count, st);
          n += width * r.count;
        }
      }
    return n;
  }
};

/// Where a rank keeps float32 key gradients: the chunk's rows
/// [offset, offset + rows) in a [B, Hkv, rows, D] buffer (the whole chunk,
/// or one of its pieces).
struct GradRows {
  CUdeviceptr base = 0;
  int64_t offset = 0, rows = 0;
};

/// Part of a row set inside one GradRows buffer, as f32 element offsets:
/// `rows` rows `rowStride` apart in each of `planes` planes `planeStride`
/// apart from `dst`, packed (RingCopies::packRows's layout) from row
/// `packedRow` on, the planes `packedPlaneStride` apart.
struct RowsInBuffer {
  CUdeviceptr dst = 0;
  int64_t planes = 0, planeStride = 0, rows = 0, rowStride = 0;
  int64_t packedRow = 0, packedPlaneStride = 0;
};

/// Calls `each` for every part of `sets` (a rank's key rows, one set for
/// every kv head or one each) inside each of `targets`: per run, or per
/// piece of a run of several rows, and per kv head where the heads' sets
/// differ. Returns false as soon as `each` does.
bool forRowsInBuffers(const std::vector<RowSet> &sets,
                      const std::vector<GradRows> &targets, int64_t B,
                      int64_t Hkv, int64_t D,
                      const std::function<bool(const RowsInBuffer &)> &each) {
  if (sets.empty()) // a step that sends or receives nothing
    return true;
  const bool perHead = sets.size() > 1;
  int64_t total = 0; // packed rows of one batch's slabs
  for (int64_t gI = 0; gI < Hkv; ++gI)
    total += rowCount(perHead ? sets[gI] : sets[0]);
  // ceil(a / b) for b > 0 and any a.
  auto up = [](int64_t a, int64_t b) {
    return a >= 0 ? (a + b - 1) / b : -((-a) / b);
  };
  // Chunk rows dst0 + j * pitch (j < n), packed from row src0 + j on, of
  // every (b, g) slab, or of head gI's slab of every batch.
  auto run = [&](int64_t gI, int64_t src0, int64_t dst0, int64_t pitch,
                 int64_t n) {
    for (const GradRows &t : targets) {
      int64_t lo = std::max<int64_t>(0, up(t.offset - dst0, pitch));
      int64_t hi = std::min<int64_t>(n, up(t.offset + t.rows - dst0, pitch));
      if (lo >= hi)
        continue;
      const int64_t slab = t.rows * D;
      RowsInBuffer r;
      r.planes = perHead ? B : B * Hkv;
      r.planeStride = perHead ? Hkv * slab : slab;
      r.rows = hi - lo;
      r.rowStride = pitch * D;
      r.dst = t.base + size_t((perHead ? gI * slab : 0) +
                              (dst0 + lo * pitch - t.offset) * D) *
                           4;
      r.packedRow = src0 + lo;
      r.packedPlaneStride = (perHead ? total : rowCount(sets[0])) * D;
      if (!each(r))
        return false;
    }
    return true;
  };
  for (int64_t gI = 0, before = 0; gI < (perHead ? Hkv : 1); ++gI) {
    const RowSet &set = sets[perHead ? gI : 0];
    int64_t src = before;
    for (const RowRun &r : set) {
      if (r.len == 1) { // `count` rows, `pitch` apart
        if (!run(gI, src, r.start, r.count > 1 ? r.pitch : 1, r.count))
          return false;
      } else {
        for (int64_t c = 0; c < r.count; ++c)
          if (!run(gI, src + c * r.len, r.start + c * r.pitch, 1, r.len))
            return false;
      }
      src += r.len * r.count;
    }
    before += rowCount(set);
  }
  return true;
}

/// How many parts forRowsInBuffers finds (grad_add launches or memsets).
int64_t countRowsInBuffers(const std::vector<RowSet> &sets,
                           const std::vector<GradRows> &targets, int64_t B,
                           int64_t Hkv, int64_t D) {
  int64_t n = 0;
  forRowsInBuffers(sets, targets, B, Hkv, D, [&](const RowsInBuffer &) {
    ++n;
    return true;
  });
  return n;
}

/// Row sets that break into more parts than this (a kv head's several
/// residue classes, `len` > 1 rows `pitch` apart, `count` times) travel
/// through whole chunks instead: unpacked into a zeroed chunk, added with
/// one launch a buffer.
constexpr int64_t kMaxRowParts = 64;

/// Adds the packed f32 rows of `sets` at `packed` into the rows they were
/// packed from, in whichever of `targets` holds each, with `add` (grad_add
/// over planes of rows with strides). Rows the sets do not name are not
/// touched.
bool addPackedRows(const GpuModule &g, const GpuKernel &add,
                   const std::vector<RowSet> &sets, CUdeviceptr packed,
                   const std::vector<GradRows> &targets, int64_t B, int64_t Hkv,
                   int64_t D, CUstream stream, std::string &error) {
  return forRowsInBuffers(sets, targets, B, Hkv, D, [&](const RowsInBuffer &r) {
    KernelArgs a;
    a.B = B;
    a.Hkv = Hkv;
    a.D = D;
    a.Lq = r.planes;
    a.Lk = r.rows;
    a.dk = r.dst;
    a.dkStrides[1] = r.planeStride;
    a.dkStrides[2] = r.rowStride;
    a.dq = packed + size_t(r.packedRow * D) * 4;
    a.dqStrides[1] = r.packedPlaneStride;
    a.dqStrides[2] = D;
    return launchKernel(g, add, a, stream, error);
  });
}

/// Zeroes the f32 rows of `sets` in `targets` (2-D memsets), and only them.
CUresult zeroRows(const Driver &d, const std::vector<RowSet> &sets,
                  const std::vector<GradRows> &targets, int64_t B, int64_t Hkv,
                  int64_t D, CUstream stream) {
  CUresult rc = CUDA_SUCCESS;
  forRowsInBuffers(sets, targets, B, Hkv, D, [&](const RowsInBuffer &r) {
    if (r.rows == 1 || r.rowStride == D) // one block of rows a plane
      rc = d.cuMemsetD2D32Async(r.dst, size_t(r.planeStride) * 4, 0,
                                size_t(r.rows * D), size_t(r.planes), stream);
    else
      for (int64_t p = 0; p < r.planes && rc == CUDA_SUCCESS; ++p)
        rc = d.cuMemsetD2D32Async(r.dst + size_t(p * r.planeStride) * 4,
                                  size_t(r.rowStride) * 4, 0, size_t(D),
                                  size_t(r.rows), stream);
    return rc == CUDA_SUCCESS;
  });
  return rc;
}

/// The arguments every kernel of a rank's ring call shares.
KernelArgs ringBaseArgs(int64_t B, int64_t H, int64_t Hkv, int64_t D,
                        const Tensor *lengths) {
  KernelArgs a;
  a.B = B;
  a.H = H;
  a.Hkv = Hkv;
  a.D = D;
  a.lengths = lengths ? CUdeviceptr(uintptr_t(lengths->data)) : 0;
  return a;
}

/// A rank's pieces as views: a piece of q, out or grad_out is rows
/// [offset, offset + rows) of the [B, H, C, D] chunk, and a piece of k, v or
/// a received chunk rows of [B, Hkv, Ck, D], addressed with the chunk's
/// strides (one piece, offset 0, when not split). query() and key() set
/// those strides in `a` and return piece p's byte offset from the chunk's
/// start (16-bit elements).
struct PieceViews {
  const RankSchedule &rs;
  int64_t H, C, Hkv, Ck, D;

  size_t query(KernelArgs &a, size_t p) const {
    a.qStrides[0] = H * C * D;
    a.qStrides[1] = C * D;
    a.qStrides[2] = D;
    std::copy(a.qStrides, a.qStrides + 3, a.oStrides);
    return size_t(rs.qPieces[p].offset * D) * 2;
  }
  size_t key(KernelArgs &a, size_t p) const {
    a.kStrides[0] = Hkv * Ck * D;
    a.kStrides[1] = Ck * D;
    a.kStrides[2] = D;
    return size_t(rs.kvPieces[p].offset * D) * 2;
  }
};

/// An update's rows, keys, origins and positions (RingUpdate): groups at
/// the origins, lengths and filters at the global positions.
void placeUpdate(KernelArgs &a, const RingUpdate &u, const RankSchedule &rs) {
  a.Lq = rs.qPieces[u.qPiece].rows;
  a.Lk = a.kvRows = rs.kvPieces[u.kPiece].rows;
  a.qOrigin = u.qOrigin;
  a.kOrigin = u.kOrigin;
  a.rowLenShift = a.qPos = u.qPos;
  a.kPos = u.kPos;
  a.posStride = u.stride;
}
} // namespace

bool Package::runRankGpu(Transport &transport, const Tensor &q,
                         const Tensor &k, const Tensor &v,
                         const Tensor *lengths, Tensor &out, Tensor *lse,
                         RingStats *stats, std::string &error,
                         void *streamPtr) {
  GpuModule &g = *gpu_;
  const Driver &d = *g.d;
  if (!prepareRun(d, q.data, k.data, v.data, out.data, error) ||
      !checkContext(g, name_, error)) {
    transport.abort(error); // the other ranks must not wait for this one
    return false;
  }
  CUstream stream = static_cast<CUstream>(streamPtr);
  // Calls of this rank from several threads take turns queueing their work
  // (the ring's buffers, its communication stream and its events serve one
  // call at a time), and a call on another stream than the last one waits
  // for that call's work first. (Each call is a collective: every rank must
  // still make its calls in the same order.)
  std::lock_guard<std::mutex> lock(g.mutex);
  {
    CUresult rc = g.ringOrder.waitIfOtherStream(d, stream);
    if (rc != CUDA_SUCCESS) {
      error = describe(d, rc, "ordering after the previous call's stream");
      transport.abort(error); // the other ranks must not wait for this one
      return false;
    }
  }
  const RankSchedule &rs = ring_->schedule[transport.rank()];
  // C query rows (q, out, lse) and Ck key rows (k, v) on this rank; they
  // differ for cross attention. Both are split into P pieces alike.
  const int64_t B = q.shape[0], H = q.shape[1], C = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Ck = k.shape[2], es = 2; // bf16 / f16
  const size_t P = rs.qPieces.size();
  if (rs.kvPieces.size() != P) {
    error = "the ring schedule splits queries and keys into different pieces";
    transport.abort(error); // the other ranks must not wait for this one
    return false;
  }
  const int64_t rowsP = rs.qPieces[0].rows, kRowsP = rs.kvPieces[0].rows;
  const bool split = P > 1;
  const bool gatherFirst = ring_->kv == "allgather";
  const size_t steps = rs.steps.size();
  const size_t slots = gatherFirst ? std::max<size_t>(steps, 1) : 2;
  auto dev = [](const void *p) { return CUdeviceptr(uintptr_t(p)); };

  auto kernelNamed = [&](const std::string &name) -> const GpuKernel * {
    for (const GpuKernel &kn : g.kernels)
      if (kn.name == name)
        return &kn;
    return nullptr;
  };
  const GpuKernel *init = kernelNamed("init"), *fin = kernelNamed("finalize");
  if (!init || !fin) {
    error = "package " + name_ + " has no init/finalize kernels";
    return false;
  }

  // Bytes of each step's packed K+V, both ways.
  auto packedBytes = [&](const std::vector<RowSet> &sets) {
    return size_t(packedRowCount(sets, Hkv) * B * D * es * 2);
  };
  size_t maxSend = 0, maxRecv = 0;
  for (const RingStep &s : rs.steps) {
    if (s.sendTo >= 0)
      maxSend = std::max(maxSend, packedBytes(s.sendRows));
    if (s.recvFrom >= 0)
      maxRecv = std::max(maxRecv, packedBytes(s.recvRows));
  }

  // Device scratch layout. The pieces of q, k, v, out and the received
  // chunks are views of them (the kernels take strides), so only the f32
  // state and lse of each piece have buffers of their own.
  const size_t rowsF32 = size_t(B * H * rowsP * 4);
  const size_t kChunk = size_t(B * Hkv * Ck * D * es);
  Arena arena;
  std::vector<size_t> lP(P), acc(P), mx(P), sm(P);
  for (size_t p = 0; p < P; ++p) {
    lP[p] = arena.take(rowsF32);
    acc[p] = arena.take(rowsF32 * D);
    mx[p] = arena.take(rowsF32);
    sm[p] = arena.take(rowsF32);
  }
  // Receive slots, in the chunk layout.
  std::vector<size_t> rK(slots), rV(slots);
  size_t zeroFrom = arena.used;
  for (size_t s = 0; s < slots; ++s) {
    rK[s] = arena.take(kChunk);
    rV[s] = arena.take(kChunk);
  }
  size_t zeroTo = arena.used;
  size_t sendAt = arena.take(maxSend), recvAt = arena.take(maxRecv);

  bool grown = false;
  if (!growDeviceBuffer(d, g.ringScratch, g.ringScratchBytes, arena.used,
                        "the ring's buffers", error, &grown))
    return false;
  // Rows that never travel must stay finite: zero fresh receive buffers.
  if (grown)
    d.cuMemsetD8Async(g.ringScratch + zeroFrom, 0, zeroTo - zeroFrom, stream);
  const CUdeviceptr base = g.ringScratch;
  auto at = [&](size_t off) { return base + off; };

  if (!g.commStream &&
      d.cuStreamCreate(&g.commStream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS) {
    error = "cannot create the ring's communication stream";
    return false;
  }
  CUstream cs = g.commStream;
  std::vector<CUevent> events;
  auto event = [&]() {
    CUevent e = nullptr;
    d.cuEventCreate(&e, CU_EVENT_DISABLE_TIMING);
    events.push_back(e);
    return e;
  };
  struct EventsGuard {
    const Driver &d;
    std::vector<CUevent> &events;
    ~EventsGuard() {
      for (CUevent e : events)
        d.cuEventDestroy(e); // destroyed once their work completes
    }
  } guard{d, events};

  RingCopies copies{d, B, Hkv, Ck, D};
  CUresult &crc = copies.rc;
  auto copy2d = [&](CUdeviceptr src, size_t srcPitch, CUdeviceptr dst,
                    size_t dstPitch, size_t width, size_t height, CUstream st) {
    copies.copy2d(src, srcPitch, dst, dstPitch, width, height, st);
  };
  auto packRows = [&](const std::vector<RowSet> &sets, CUdeviceptr chunk,
                      CUdeviceptr packed, bool toPacked, CUstream st) {
    return copies.packRows(sets, chunk, packed, toPacked, st, es);
  };

  // Inputs are ready on the caller's stream; the comm stream waits for them.
  CUevent inputsReady = event();
  d.cuEventRecord(inputsReady, stream);
  d.cuStreamWaitEvent(cs, inputsReady, 0);
  const PieceViews views{rs, H, C, Hkv, Ck, D};
  const KernelArgs base0 = ringBaseArgs(B, H, Hkv, D, lengths);
  // The element-wise kernels' arguments for piece p's state.
  auto stateArgs = [&](size_t p) {
    KernelArgs a = base0;
    a.Lq = a.Lk = rowsP;
    a.acc = at(acc[p]);
    a.max = at(mx[p]);
    a.sum = at(sm[p]);
    return a;
  };
  // A piece's first, last and only update may start, end or skip its
  // state, where the update's component covers every row: the package then
  // has component_<n>_begin, _end and _single (ConvertToGpu). `variant[i][j]`
  // is what update j of step i launches; a piece whose state such a kernel
  // starts needs no init, one whose out it writes no finalize.
  std::vector<std::vector<const GpuKernel *>> variant(steps);
  std::vector<bool> begun(P, false), ended(P, false);
  {
    std::vector<std::pair<size_t, size_t>> firstOf(P, {steps, 0}),
        lastOf(P, {steps, 0});
    std::vector<int> updates(P, 0);
    // An `end` kernel loads every row's state and writes out; where a
    // step's keys are a few received rows (a neighbour's window), its
    // `update` blocks without keys return and finalize is cheaper (local
    // at L = 131072 on one H100: 441 µs against about 290,
    // bench/ring_forward_one_gpu_h100.log). So only steps on this rank's
    // keys or on at least half a chunk of received rows end a piece.
    auto reachesMostRows = [&](const RingStep &st) {
      if (st.step == 0 || st.recvFrom < 0)
        return true;
      return packedRowCount(st.recvRows, Hkv) * 2 >= Ck * Hkv;
    };
    for (size_t i = 0; i < steps; ++i)
      for (size_t j = 0; j < rs.steps[i].updates.size(); ++j) {
        size_t p = size_t(rs.steps[i].updates[j].qPiece);
        if (p >= P)
          continue; // reported when the update runs
        if (updates[p]++ == 0)
          firstOf[p] = {i, j};
        lastOf[p] = {i, j};
      }
    for (size_t i = 0; i < steps; ++i)
      for (size_t j = 0; j < rs.steps[i].updates.size(); ++j) {
        const RingUpdate &u = rs.steps[i].updates[j];
        std::string name = "component_" + std::to_string(u.kernel);
        const GpuKernel *kn = kernelNamed(name), *other = nullptr;
        size_t p = size_t(u.qPiece);
        if (p < P) {
          bool first = firstOf[p] == std::pair{i, j},
               last = lastOf[p] == std::pair{i, j};
          if (first && last && (other = kernelNamed(name + "_single")))
            begun[p] = ended[p] = true;
          else if (first && (other = kernelNamed(name + "_begin")))
            begun[p] = true;
          else if (last && reachesMostRows(rs.steps[i]) &&
                   (other = kernelNamed(name + "_end")))
            ended[p] = true;
        }
        variant[i].push_back(other ? other : kn);
      }
  }
  for (size_t p = 0; p < P; ++p)
    if (!begun[p] && !launchKernel(g, *init, stateArgs(p), stream, error))
      return false;
  // Where piece p's out and lse go: out's rows, and the piece's own lse
  // when split (the kernels take a contiguous lse).
  auto setOut = [&](KernelArgs &a, size_t p) {
    a.out = dev(out.data) + views.query(a, p);
    a.lse = split || !lse ? at(lP[p]) : dev(lse->data);
  };

  std::vector<CUevent> exchanged(steps, nullptr), slotFree(slots, nullptr);
  std::vector<int64_t> sentBytes(steps, 0);
  std::vector<size_t> slotOf(steps, 0);
  int exchanges = 0;
  auto exchange = [&](size_t i) {
    const RingStep &s = rs.steps[i];
    if (s.sendTo < 0 && s.recvFrom < 0)
      return true;
    size_t slot = gatherFirst ? i : size_t(exchanges++ % 2);
    slotOf[i] = slot;
    if (slotFree[slot])
      d.cuStreamWaitEvent(cs, slotFree[slot], 0);
    size_t sendN = 0, recvN = s.recvFrom >= 0 ? packedBytes(s.recvRows) : 0;
    if (s.sendTo >= 0) {
      sendN = packRows(s.sendRows, dev(k.data), at(sendAt), true, cs);
      sendN += packRows(s.sendRows, dev(v.data), at(sendAt) + sendN, true, cs);
    }
    if (!transport.exchangeDevice(s.step, s.sendTo, at(sendAt), sendN,
                                  s.recvFrom, at(recvAt), recvN, cs, error))
      return false;
    sentBytes[i] = int64_t(sendN);
    if (s.recvFrom >= 0 && s.step > 0) {
      size_t half = packRows(s.recvRows, at(rK[slot]), at(recvAt), false, cs);
      packRows(s.recvRows, at(rV[slot]), at(recvAt) + half, false, cs);
    }
    exchanged[i] = event();
    d.cuEventRecord(exchanged[i], cs);
    return crc == CUDA_SUCCESS;
  };
  auto update = [&](size_t i) {
    const RingStep &s = rs.steps[i];
    if (exchanged[i])
      d.cuStreamWaitEvent(stream, exchanged[i], 0);
    bool remote = s.step > 0 && s.recvFrom >= 0;
    size_t slot = slotOf[i];
    for (size_t j = 0; j < s.updates.size(); ++j) {
      const RingUpdate &u = s.updates[j];
      if (u.kernel < 0 || size_t(u.qPiece) >= P || size_t(u.kPiece) >= P) {
        error = "the ring schedule names a missing kernel or piece";
        return false;
      }
      const GpuKernel *kn = variant[i][j];
      if (!kn) {
        error = "package " + name_ + " has no kernel component_" +
                std::to_string(u.kernel);
        return false;
      }
      KernelArgs a = base0;
      size_t qp = u.qPiece, kp = u.kPiece;
      a.q = dev(q.data) + views.query(a, qp);
      const size_t kAt = views.key(a, kp);
      a.k = (remote ? at(rK[slot]) : dev(k.data)) + kAt;
      a.v = (remote ? at(rV[slot]) : dev(v.data)) + kAt;
      a.acc = at(acc[qp]);
      a.max = at(mx[qp]);
      a.sum = at(sm[qp]);
      if (kn->kind == "end" || kn->kind == "single")
        setOut(a, qp);
      placeUpdate(a, u, rs);
      if (!launchKernel(g, *kn, a, stream, error))
        return false;
    }
    if (remote) {
      slotFree[slot] = event();
      d.cuEventRecord(slotFree[slot], stream);
    }
    return true;
  };

  // Step times: marks on the compute stream before the first step and after
  // each one (a step's time includes any wait for its rows).
  for (CUevent e : g.stepMarks)
    d.cuEventDestroy(e);
  g.stepMarks.assign(steps + 1, nullptr);
  for (CUevent &e : g.stepMarks)
    d.cuEventCreate(&e, 0);
  d.cuEventRecord(g.stepMarks[0], stream);
  auto timedUpdate = [&](size_t i) {
    bool done = update(i);
    d.cuEventRecord(g.stepMarks[i + 1], stream);
    return done;
  };
  bool ok = true;
  for (size_t i = 0; ok && i < steps; ++i)
    ok = exchange(i) && (gatherFirst || timedUpdate(i));
  for (size_t i = 0; ok && gatherFirst && i < steps; ++i)
    ok = timedUpdate(i);
  if (!ok) {
    if (error.empty())
      error = describe(d, crc, "queueing a ring step");
    transport.abort(error);
    return false;
  }

  for (size_t p = 0; p < P; ++p) {
    KernelArgs a = stateArgs(p);
    setOut(a, p);
    if (!ended[p] && !launchKernel(g, *fin, a, stream, error))
      return false;
    if (split) {
      if (lse) {
        const RingPiece &pc = rs.qPieces[p];
        copy2d(at(lP[p]), pc.rows * 4, dev(lse->data) + pc.offset * 4, C * 4,
               pc.rows * 4, B * H, stream);
      }
    }
  }
  // The end of this call on the compute stream: the next call's comm
  // stream work must not overwrite buffers this call's kernels still read
  // (the comm stream waits for it), nor may the next call's compute stream,
  // if another (it waits for it at its start).
  CUresult orc = g.ringOrder.record(d, stream);
  if (orc == CUDA_SUCCESS)
    orc = d.cuStreamWaitEvent(cs, g.ringOrder.done, 0);
  if (crc != CUDA_SUCCESS) {
    error = describe(d, crc, "a ring copy");
    return false;
  }
  if (orc != CUDA_SUCCESS) {
    error = describe(d, orc, "recording the end of the ring call");
    return false;
  }
  if (stats) {
    *stats = RingStats();
    stats->rank = transport.rank();
    stats->expectedBytes = rs.rowsSent * B * D * es * 2;
    for (size_t i = 0; i < steps; ++i) {
      stats->bytesSent += sentBytes[i];
      stats->steps.push_back({rs.steps[i].step, sentBytes[i],
                              int64_t(rs.steps[i].updates.size()), 0.0});
    }
  }
  return true;
}

// The backward pass of one rank (Ring.cpp's CPU program on the GPU), every
// copy, kernel and exchange in order on the caller's stream:
//
//   split pieces: views of q, out, grad_out, k, v, a copy of lse;
//   grad_prepare per piece
//   step i: exchange the forward's key/value rows (into a zero-filled
//           chunk, whose pieces are views); grad_kv_<n> and grad_q_<n> of each
//           update add to dq and to dk/dv of the rows' owner: this rank's
//           (step 0) or buffers of the received rows; those go back to
//           their owner (pieces -> chunk -> packed f32 rows), and the rows
//           this rank sent come back and add into an f32 accumulator
//           (grad_add)
//   gradient pieces back into dq, dk, dv; dk += accumulator, dv likewise
//
// so transfers do not overlap kernels here (the forward's executor above
// does that).
bool Package::runRankBackwardGpu(Transport &transport, const Tensor &q,
                                 const Tensor &k, const Tensor &v,
                                 const Tensor *lengths, const Tensor &out,
                                 const Tensor &lse, const Tensor &gradOut,
                                 Tensor &dq, Tensor &dk, Tensor &dv,
                                 RingStats *stats, std::string &error,
                                 void *streamPtr) {
  GpuModule &g = *gpu_;
  const Driver &d = *g.d;
  auto fail = [&](const std::string &why) {
    error = why;
    transport.abort(error); // the other ranks must not wait for this one
    return false;
  };
  if (!prepareRun(d, q.data, k.data, v.data, out.data, error) ||
      !checkContext(g, name_, error))
    return fail(error);
  CUstream stream = static_cast<CUstream>(streamPtr);
  std::lock_guard<std::mutex> lock(g.mutex);
  if (CUresult rc = g.ringOrder.waitIfOtherStream(d, stream);
      rc != CUDA_SUCCESS)
    return fail(describe(d, rc, "ordering after the previous call's stream"));
  const RankSchedule &rs = ring_->schedule[transport.rank()];
  const int64_t B = q.shape[0], H = q.shape[1], C = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Ck = k.shape[2];
  const size_t es = 2, fs = 4; // 16-bit inputs, f32 gradients
  const size_t P = rs.qPieces.size();
  if (rs.kvPieces.size() != P)
    return fail("the ring schedule splits queries and keys into different "
                "pieces");
  const int64_t rowsP = rs.qPieces[0].rows, kRowsP = rs.kvPieces[0].rows;
  const bool split = P > 1;
  const size_t steps = rs.steps.size();
  auto dev = [](const void *p) { return CUdeviceptr(uintptr_t(p)); };
  auto kernelNamed = [&](const std::string &name) -> const GpuKernel * {
    for (const GpuKernel &kn : g.gradKernels)
      if (kn.name == name)
        return &kn;
    return nullptr;
  };
  const GpuKernel *prepare = kernelNamed("grad_prepare"),
                  *add = kernelNamed("grad_add");
  if (!prepare || !add)
    return fail("package " + name_ + " has no grad_prepare/grad_add kernels "
                "(compile it again)");

  // Bytes of the packed rows of `sets`, K and V, at `bytes` an element.
  auto packedBytes = [&](const std::vector<RowSet> &sets, size_t bytes) {
    return size_t(packedRowCount(sets, Hkv) * B * D) * bytes * 2;
  };
  size_t maxSend = 0, maxRecv = 0;
  for (const RingStep &st : rs.steps) {
    // Key/value rows (16-bit) out and in, their gradients (f32) back.
    size_t sendRows = st.sendTo >= 0 ? packedBytes(st.sendRows, fs) : 0;
    size_t recvRows = st.recvFrom >= 0 ? packedBytes(st.recvRows, fs) : 0;
    maxSend = std::max({maxSend, sendRows, recvRows});
    maxRecv = std::max({maxRecv, sendRows, recvRows});
  }

  // Device scratch layout.
  const size_t qPieceF = size_t(B * H * rowsP * D) * fs,
               rowsF = size_t(B * H * rowsP) * fs,
               kPieceF = size_t(B * Hkv * kRowsP * D) * fs,
               kChunk16 = size_t(B * Hkv * Ck * D) * es,
               kChunkF = size_t(B * Hkv * Ck * D) * fs;
  Arena arena;
  // The 16-bit inputs' pieces are views of the chunks (PieceViews); the
  // kernels take a contiguous lse and contiguous f32 gradients, so those
  // get piece buffers when split.
  std::vector<size_t> delta(P), lP(P), dqP(P), dkP(P), dvP(P), gKP(P), gVP(P);
  for (size_t p = 0; p < P; ++p) {
    delta[p] = arena.take(rowsF);
    if (!split)
      continue;
    lP[p] = arena.take(rowsF);
    dqP[p] = arena.take(qPieceF);
    dkP[p] = arena.take(kPieceF);
    dvP[p] = arena.take(kPieceF);
    gKP[p] = arena.take(kPieceF);
    gVP[p] = arena.take(kPieceF);
  }
  size_t zeroFrom = arena.used;
  size_t rK = arena.take(kChunk16), rV = arena.take(kChunk16);
  size_t zeroTo = arena.used;
  size_t gK = arena.take(kChunkF), gV = arena.take(kChunkF);
  // Where the chunk's rows of f32 key gradients live: `whole` (the chunk)
  // or `piece(p)`, as GradRows for addPackedRows and zeroRows.
  auto gradRows = [&](std::function<CUdeviceptr(size_t)> piece,
                      CUdeviceptr whole) {
    std::vector<GradRows> rows;
    if (!split)
      return std::vector<GradRows>{{whole, 0, Ck}};
    for (size_t p = 0; p < P; ++p)
      rows.push_back({piece(p), rs.kvPieces[p].offset, rs.kvPieces[p].rows});
    return rows;
  };
  // The whole chunk as one row set, for row sets of too many parts.
  const std::vector<RowSet> wholeChunk{RowSet{RowRun{0, Ck, 1, 0}}};
  // Whether each step's rows sent (whose gradients come back) and rows
  // received (whose gradients it zeroes) break into few enough parts.
  // (Only the buffers' rows count, not where they are.)
  const std::vector<GradRows> chunkRows =
      gradRows([](size_t) { return CUdeviceptr(0); }, 0);
  auto fewParts = [&](const std::vector<RowSet> &sets) {
    return countRowsInBuffers(sets, chunkRows, B, Hkv, D) <= kMaxRowParts;
  };
  std::vector<bool> fewSent(steps), fewReceived(steps);
  bool chunkPath = false;
  for (size_t i = 0; i < steps; ++i) {
    const RingStep &st = rs.steps[i];
    fewSent[i] = fewParts(st.sendRows);
    fewReceived[i] = fewParts(st.recvRows);
    chunkPath |= st.step > 0 && st.sendTo >= 0 && !fewSent[i];
  }
  // Unpacked returning gradients of such sets.
  size_t inK = chunkPath ? arena.take(kChunkF) : 0,
         inV = chunkPath ? arena.take(kChunkF) : 0;
  size_t sendAt = arena.take(maxSend), recvAt = arena.take(maxRecv);
  bool grown = false;
  if (!growDeviceBuffer(d, g.ringGradScratch, g.ringGradScratchBytes,
                        arena.used, "the ring backward's buffers", error,
                        &grown))
    return fail(error);
  const CUdeviceptr base = g.ringGradScratch;
  auto at = [&](size_t off) { return base + off; };

  CUresult mrc = CUDA_SUCCESS;
  auto zero = [&](CUdeviceptr p, size_t bytes) {
    if (mrc == CUDA_SUCCESS)
      mrc = d.cuMemsetD8Async(p, 0, bytes, stream);
  };
  // Rows that never travel must stay finite: zero fresh receive buffers.
  if (grown)
    zero(at(zeroFrom), zeroTo - zeroFrom);
  RingCopies copies{d, B, Hkv, Ck, D};
  // This rank's gradients: its pieces when split, else dq, dk, dv.
  auto qGrad = [&](size_t p) { return split ? at(dqP[p]) : dev(dq.data); };
  auto kGrad = [&](size_t p) { return split ? at(dkP[p]) : dev(dk.data); };
  auto vGrad = [&](size_t p) { return split ? at(dvP[p]) : dev(dv.data); };
  const std::vector<GradRows> ownK = gradRows(kGrad, dev(dk.data)),
                              ownV = gradRows(vGrad, dev(dv.data));
  const std::vector<GradRows> peerK = gradRows(
                                  [&](size_t p) { return at(gKP[p]); }, at(gK)),
                              peerV = gradRows(
                                  [&](size_t p) { return at(gVP[p]); }, at(gV));
  // The update that first writes a piece of f32 gradients may overwrite it
  // with its component's `_once` kernels (ConvertToGpu; a component over
  // every row and key): dq's piece over the whole call, dk's and dv's over
  // the updates on this rank's own keys, and a received chunk's piece within
  // its step. Those pieces need no zeroing. onceKv[i][j] and onceQ[i][j]
  // say whether update j of step i launches them.
  auto onceKernel = [&](const char *kind, int kernel) {
    return kernelNamed(kind + std::to_string(kernel) + "_once");
  };
  std::vector<std::vector<bool>> onceKv(steps), onceQ(steps),
      peerOnce(steps, std::vector<bool>(P, false));
  std::vector<bool> qOnce(P, false), kOnce(P, false);
  {
    std::vector<bool> qSeen(P, false), kSeen(P, false);
    for (size_t i = 0; i < steps; ++i) {
      const RingStep &st = rs.steps[i];
      const bool remote = st.step > 0 && st.recvFrom >= 0;
      std::vector<bool> peerSeen(P, false);
      std::vector<bool> &seen = remote ? peerSeen : kSeen;
      for (const RingUpdate &u : st.updates) {
        bool kv = false, qFirst = false;
        if (u.qPiece >= 0 && size_t(u.qPiece) < P && u.kPiece >= 0 &&
            size_t(u.kPiece) < P) { // else refused when it runs
          size_t qp = u.qPiece, kp = u.kPiece;
          if (!qSeen[qp]) {
            qSeen[qp] = true;
            qFirst = qOnce[qp] = onceKernel("grad_q_", u.kernel) != nullptr;
          }
          if (!seen[kp]) {
            seen[kp] = true;
            kv = onceKernel("grad_kv_", u.kernel) != nullptr;
            (remote ? peerOnce[i][kp] : kOnce[kp]) = kv;
          }
        }
        onceKv[i].push_back(kv);
        onceQ[i].push_back(qFirst);
      }
    }
  }
  for (size_t p = 0; p < P; ++p) {
    if (!qOnce[p])
      zero(qGrad(p), split ? qPieceF : size_t(B * H * C * D) * fs);
    if (!kOnce[p]) {
      zero(kGrad(p), split ? kPieceF : kChunkF);
      zero(vGrad(p), split ? kPieceF : kChunkF);
    }
    if (!split)
      continue;
    const RingPiece &qp = rs.qPieces[p];
    copies.copy2d(dev(lse.data) + qp.offset * fs, C * fs, at(lP[p]),
                  qp.rows * fs, qp.rows * fs, B * H, stream);
  }
  const PieceViews views{rs, H, C, Hkv, Ck, D};

  const KernelArgs base0 = ringBaseArgs(B, H, Hkv, D, lengths);
  for (size_t p = 0; p < P; ++p) {
    KernelArgs a = base0;
    a.Lq = a.Lk = rowsP;
    const size_t qAt = views.query(a, p);
    a.out = dev(out.data) + qAt;
    a.gradOut = dev(gradOut.data) + qAt; // at q's strides
    a.delta = at(delta[p]);
    if (!launchKernel(g, *prepare, a, stream, error))
      return fail(error);
  }

  std::vector<int64_t> sentBytes(steps, 0);
  for (size_t i = 0; i < steps; ++i) {
    const RingStep &st = rs.steps[i];
    const bool remote = st.step > 0 && st.recvFrom >= 0;
    // The forward's key/value rows.
    if (st.sendTo >= 0 || st.recvFrom >= 0) {
      size_t sendN = 0,
             recvN = st.recvFrom >= 0 ? packedBytes(st.recvRows, es) : 0;
      if (st.sendTo >= 0) {
        sendN = copies.packRows(st.sendRows, dev(k.data), at(sendAt), true,
                                stream, es);
        sendN += copies.packRows(st.sendRows, dev(v.data), at(sendAt) + sendN,
                                 true, stream, es);
      }
      if (copies.rc != CUDA_SUCCESS)
        return fail(describe(d, copies.rc, "packing a ring step's rows"));
      if (!transport.exchangeDevice(st.step, st.sendTo, at(sendAt), sendN,
                                    st.recvFrom, at(recvAt), recvN, stream,
                                    error))
        return fail(error);
      sentBytes[i] += int64_t(sendN);
      if (remote) {
        size_t half =
            copies.packRows(st.recvRows, at(rK), at(recvAt), false, stream, es);
        copies.packRows(st.recvRows, at(rV), at(recvAt) + half, false, stream,
                        es);
      }
    }
    // The received rows' gradients start at zero (only they go back), but
    // in the pieces a `_once` kernel overwrites.
    if (remote && mrc == CUDA_SUCCESS) {
      const std::vector<RowSet> &rows =
          fewReceived[i] ? st.recvRows : wholeChunk;
      std::vector<GradRows> zeroK, zeroV;
      for (size_t p = 0; p < peerK.size(); ++p)
        if (!peerOnce[i][p]) {
          zeroK.push_back(peerK[p]);
          zeroV.push_back(peerV[p]);
        }
      mrc = zeroRows(d, rows, zeroK, B, Hkv, D, stream);
      if (mrc == CUDA_SUCCESS)
        mrc = zeroRows(d, rows, zeroV, B, Hkv, D, stream);
    }
    for (size_t j = 0; j < st.updates.size(); ++j) {
      const RingUpdate &u = st.updates[j];
      if (u.kernel < 0 || u.qPiece < 0 || u.kPiece < 0 ||
          size_t(u.qPiece) >= P || size_t(u.kPiece) >= P)
        return fail("the ring schedule names a missing kernel or piece");
      size_t qp = u.qPiece, kp = u.kPiece;
      KernelArgs a = base0;
      const size_t qAt = views.query(a, qp), kAt = views.key(a, kp);
      a.q = dev(q.data) + qAt;
      a.out = dev(out.data) + qAt;
      a.gradOut = dev(gradOut.data) + qAt; // at q's strides
      a.lse = split ? at(lP[qp]) : dev(lse.data);
      a.delta = at(delta[qp]);
      a.dq = qGrad(qp);
      if (remote) {
        a.k = at(rK) + kAt;
        a.v = at(rV) + kAt;
        a.dk = split ? at(gKP[kp]) : at(gK);
        a.dv = split ? at(gVP[kp]) : at(gV);
      } else {
        a.k = dev(k.data) + kAt;
        a.v = dev(v.data) + kAt;
        a.dk = kGrad(kp);
        a.dv = vGrad(kp);
      }
      placeUpdate(a, u, rs);
      for (const char *kind : {"grad_kv_", "grad_q_"}) {
        const bool once =
            std::string(kind) == "grad_kv_" ? onceKv[i][j] : onceQ[i][j];
        const GpuKernel *kn = once ? onceKernel(kind, u.kernel)
                                   : kernelNamed(kind + std::to_string(u.kernel));
        if (!kn)
          return fail("package " + name_ + " has no kernel " + kind +
                      std::to_string(u.kernel));
        if (!launchKernel(g, *kn, a, stream, error))
          return fail(error);
      }
    }
    // The received rows' gradients go back to their owner (recv_from); the
    // gradients of the rows this rank sent come back from send_to.
    int to = remote ? st.recvFrom : -1;
    int from = st.step > 0 ? st.sendTo : -1;
    if (to < 0 && from < 0)
      continue;
    size_t sendN = 0, recvN = from >= 0 ? packedBytes(st.sendRows, fs) : 0;
    if (to >= 0) {
      for (size_t p = 0; p < P && split; ++p) {
        copies.pieceCopy(at(gK), Ck, at(gKP[p]), B * Hkv, rs.kvPieces[p],
                         false, stream, fs);
        copies.pieceCopy(at(gV), Ck, at(gVP[p]), B * Hkv, rs.kvPieces[p],
                         false, stream, fs);
      }
      sendN = copies.packRows(st.recvRows, at(gK), at(sendAt), true, stream,
                              fs);
      sendN += copies.packRows(st.recvRows, at(gV), at(sendAt) + sendN, true,
                               stream, fs);
    }
    if (copies.rc != CUDA_SUCCESS)
      return fail(describe(d, copies.rc, "packing a ring step's gradients"));
    if (!transport.exchangeDevice(gradientStep(st.step), to, at(sendAt),
                                  sendN, from, at(recvAt), recvN, stream,
                                  error))
      return fail(error);
    sentBytes[i] += int64_t(sendN);
    // They add into this rank's own gradients where those rows sit
    // (through a zeroed chunk where the rows break into too many parts).
    if (from >= 0) {
      CUdeviceptr inKRows = at(recvAt),
                  inVRows = at(recvAt) + packedBytes(st.sendRows, fs) / 2;
      const std::vector<RowSet> *rows = &st.sendRows;
      if (!fewSent[i]) {
        zero(at(inK), kChunkF);
        zero(at(inV), kChunkF);
        copies.packRows(st.sendRows, at(inK), inKRows, false, stream, fs);
        copies.packRows(st.sendRows, at(inV), inVRows, false, stream, fs);
        inKRows = at(inK);
        inVRows = at(inV);
        rows = &wholeChunk;
      }
      if (!addPackedRows(g, *add, *rows, inKRows, ownK, B, Hkv, D, stream,
                         error) ||
          !addPackedRows(g, *add, *rows, inVRows, ownV, B, Hkv, D, stream,
                         error))
        return fail(error);
    }
  }

  // The pieces' gradients (the peers' share included) into dq, dk and dv.
  for (size_t p = 0; p < P && split; ++p) {
    copies.pieceCopy(dev(dq.data), C, at(dqP[p]), B * H, rs.qPieces[p], false,
                     stream, fs);
    copies.pieceCopy(dev(dk.data), Ck, at(dkP[p]), B * Hkv, rs.kvPieces[p],
                     false, stream, fs);
    copies.pieceCopy(dev(dv.data), Ck, at(dvP[p]), B * Hkv, rs.kvPieces[p],
                     false, stream, fs);
  }
  if (copies.rc != CUDA_SUCCESS)
    return fail(describe(d, copies.rc, "a ring copy"));
  if (mrc != CUDA_SUCCESS)
    return fail(describe(d, mrc, "zeroing the ring's gradient buffers"));
  if (CUresult orc = g.ringOrder.record(d, stream); orc != CUDA_SUCCESS)
    return fail(describe(d, orc, "recording the end of the ring call"));
  if (stats) {
    *stats = RingStats();
    stats->rank = transport.rank();
    int64_t expected = rs.rowsSent * int64_t(es), rows = 0;
    for (const RingStep &st : rs.steps)
      if (st.step > 0 && st.recvFrom >= 0)
        rows += packedRowCount(st.recvRows, Hkv);
    stats->expectedBytes = (expected + rows * int64_t(fs)) * B * D * 2;
    for (size_t i = 0; i < steps; ++i) {
      stats->bytesSent += sentBytes[i];
      stats->steps.push_back({rs.steps[i].step, sentBytes[i],
                              int64_t(rs.steps[i].updates.size()), 0.0});
    }
  }
  return true;
}

bool Package::waitRank(Transport &transport, void *streamPtr,
                       double timeoutSeconds, std::string &error) {
  if (!isGpu())
    return true;
  const Driver &d = *gpu_->d;
  CUevent done = nullptr;
  d.cuEventCreate(&done, CU_EVENT_DISABLE_TIMING);
  d.cuEventRecord(done, static_cast<CUstream>(streamPtr));
  auto start = std::chrono::steady_clock::now();
  bool ok = false;
  while (true) {
    CUresult rc = d.cuEventQuery(done);
    if (rc == CUDA_SUCCESS) {
      ok = true;
      break;
    }
    if (rc != 600 /* CUDA_ERROR_NOT_READY */) {
      error = describe(d, rc, "running the ring");
      break;
    }
    if (transport.deviceError(error))
      break;
    double waited = std::chrono::duration<double>(
                        std::chrono::steady_clock::now() - start)
                        .count();
    if (waited > timeoutSeconds) {
      error = "rank " + std::to_string(transport.rank()) + ": the ring did not "
              "finish within " + std::to_string(int(timeoutSeconds)) +
              " s (a peer stopped or runs another schedule)";
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  if (!ok)
    transport.abort(error);
  else
    d.cuEventDestroy(done);
  return ok;
}

bool Package::stepMilliseconds(std::vector<float> &ms, std::string &error) {
  ms.clear();
  if (!gpu_) {
    error = "step times are recorded for GPU ring packages";
    return false;
  }
  const Driver &d = *gpu_->d;
  // (The marks of the last call of any thread: a call replaces them.)
  std::lock_guard<std::mutex> lock(gpu_->mutex);
  const std::vector<CUevent> &marks = gpu_->stepMarks;
  for (size_t i = 1; i < marks.size(); ++i) {
    float t = 0;
    CUresult rc = d.cuEventElapsedTime(&t, marks[i - 1], marks[i]);
    if (rc != CUDA_SUCCESS) {
      error = describe(d, rc, "reading the step times (wait for the run first)");
      return false;
    }
    ms.push_back(t);
  }
  return true;
}

namespace {
/// The driver, where `pkg` is a GPU ring package; else null with `error`
/// set and the peers told.
const Driver *gpuRingDriver(Package &pkg, Transport &transport,
                            std::string &error) {
  const Driver *d = driver(error);
  if (d && (!pkg.ring() || !pkg.isGpu())) {
    error = "package " + pkg.name() + " is not a GPU ring package";
    d = nullptr;
  }
  if (!d)
    transport.abort(error);
  return d;
}

/// A stream of a rank's own, destroyed with it: ranks that share a GPU
/// (threads of one process) must not queue behind each other's waits on
/// the legacy default stream.
struct RankStream {
  const Driver &d;
  CUstream stream = nullptr;
  RankStream(const Driver &d, Transport &transport, std::string &error)
      : d(d) {
    if (d.cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS) {
      stream = nullptr;
      error = "rank " + std::to_string(transport.rank()) +
              ": cannot create a stream";
      transport.abort(error);
    }
  }
  ~RankStream() {
    if (stream)
      d.cuStreamDestroy(stream);
  }
};

/// One rank's device copies of whole-sequence float32 host tensors (the
/// rank's rows in the package's 16-bit dtype), freed with it.
struct RankUploads {
  const Driver &d;
  const RingProgram &ring;
  int rank;
  int64_t B, D;
  bool bf16;
  std::vector<CUdeviceptr> allocs;
  bool outOfMemory = false; ///< an allocation failed (ok() reports it)
  ~RankUploads() {
    for (CUdeviceptr p : allocs)
      d.cuMemFree(p);
  }
  /// This rank's rows of a whole-sequence [B, heads, rows, D] tensor.
  std::vector<uint16_t> local(const Tensor &a, int64_t heads, bool keys) const {
    const int64_t rows = keys ? ring.kvChunk : ring.qChunk,
                  whole = keys ? ring.kvLen : ring.qLen;
    std::vector<uint16_t> h(B * heads * rows * D);
    const float *f = static_cast<const float *>(a.data);
    for (int64_t s = 0; s < B * heads; ++s)
      for (int64_t row = 0; row < rows; ++row) {
        const float *src =
            f + (s * whole + ring.globalRow(rank, row, keys)) * D;
        uint16_t *dst = h.data() + (s * rows + row) * D;
        for (int64_t x = 0; x < D; ++x)
          dst[x] = bf16 ? floatToBf16(src[x]) : floatToF16(src[x]);
      }
    return h;
  }
  /// A device tensor of `shape` and `dtype` holding the `bytes` at `host`
  /// (null data when out of memory: ok() says so).
  Tensor tensor(const void *host, size_t bytes, std::vector<int64_t> shape,
                std::string dtype) {
    CUdeviceptr p = 0;
    if (d.cuMemAlloc(&p, bytes ? bytes : 4) != CUDA_SUCCESS) {
      outOfMemory = true;
      p = 0;
    } else {
      allocs.push_back(p);
      if (bytes)
        d.cuMemcpyHtoD(p, host, bytes);
    }
    return {reinterpret_cast<void *>(uintptr_t(p)), std::move(shape),
            std::move(dtype)};
  }
  /// This rank's rows of whole-sequence `a` [B, heads, rows, D] on the
  /// device, in the package's 16-bit dtype.
  Tensor rows(const Tensor &a, int64_t heads, bool keys) {
    std::vector<uint16_t> h = local(a, heads, keys);
    return tensor(h.data(), h.size() * 2,
                  {B, heads, keys ? ring.kvChunk : ring.qChunk, D},
                  bf16 ? "bf16" : "f16");
  }
  /// Lengths [B] (int32) on the device.
  Tensor lengths(const Tensor &l) {
    return tensor(l.data, size_t(B) * 4, {B}, "i32");
  }
  /// Whether every tensor was made; else `error` says so and the peers are
  /// told.
  bool ok(Transport &transport, std::string &error) const {
    if (!outOfMemory)
      return true;
    error = "rank " + std::to_string(rank) +
            ": out of GPU memory for the inputs";
    transport.abort(error);
    return false;
  }
  /// Copies device tensor `t` (`bytes`) to `host`.
  void download(const Tensor &t, void *host, size_t bytes) const {
    d.cuMemcpyDtoH(host, CUdeviceptr(uintptr_t(t.data)), bytes);
  }
};
} // namespace

bool attn::runtime::runRankFromHost(Package &pkg, Transport &transport,
                                    const Tensor &q, const Tensor &k,
                                    const Tensor &v, const Tensor *lengths,
                                    float *out, float *lse, int repeat,
                                    RingStats &stats, float &bestMs,
                                    std::string &error) {
  const Driver *d = gpuRingDriver(pkg, transport, error);
  if (!d)
    return false;
  const RingProgram &ring = *pkg.ring();
  const int r = transport.rank();
  // C query rows of L (q, out, lse); k and v have Lk rows.
  const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3],
                Hkv = k.shape[1], L = q.shape[2], C = ring.qChunk,
                Lk = k.shape[2];
  if (L != ring.qLen || Lk != ring.kvLen || v.shape[2] != Lk) {
    error = "q, k and v have " + std::to_string(L) + ", " +
            std::to_string(Lk) + " and " + std::to_string(v.shape[2]) +
            " rows but the package splits " + std::to_string(ring.qLen) +
            " query and " + std::to_string(ring.kvLen) + " key rows";
    transport.abort(error);
    return false;
  }
  const bool bf16 = pkg.args().front().dtype == "bf16";
  RankUploads up{*d, ring, r, B, D, bf16};
  // out and lse start as NaN: rows never written show.
  std::vector<uint16_t> hout(B * H * C * D, 0xffff);
  std::vector<float> hlse(B * H * C, std::nanf(""));
  Tensor tq = up.rows(q, H, false), tk = up.rows(k, Hkv, true),
         tv = up.rows(v, Hkv, true),
         to = up.tensor(hout.data(), hout.size() * 2, {B, H, C, D},
                        bf16 ? "bf16" : "f16"),
         tl = up.tensor(hlse.data(), hlse.size() * 4, {B, H, C}, "f32"),
         tn = lengths ? up.lengths(*lengths) : Tensor();
  if (!up.ok(transport, error))
    return false;
  RankStream own(*d, transport, error);
  if (!own.stream)
    return false;
  CUstream stream = own.stream;
  CUevent start = nullptr, stop = nullptr;
  d->cuEventCreate(&start, 0);
  d->cuEventCreate(&stop, 0);
  bestMs = 1e30f;
  bool ok = true;
  for (int i = 0; ok && i < std::max(repeat, 1); ++i) {
    d->cuEventRecord(start, stream);
    ok = pkg.runRank(transport, tq, tk, tv, lengths ? &tn : nullptr, to,
                     pkg.hasLse() ? &tl : nullptr, &stats, error, stream) &&
         pkg.waitRank(transport, stream, 300, error);
    if (!ok)
      break;
    d->cuEventRecord(stop, stream);
    d->cuEventSynchronize(stop);
    float ms = 0;
    d->cuEventElapsedTime(&ms, start, stop);
    bestMs = std::min(bestMs, ms);
  }
  d->cuEventDestroy(start);
  d->cuEventDestroy(stop);
  if (ok)
    d->cuStreamSynchronize(stream);
  if (!ok)
    return false;
  up.download(to, hout.data(), hout.size() * 2);
  up.download(tl, hlse.data(), hlse.size() * 4);
  for (int64_t s = 0; s < B * H; ++s)
    for (int64_t row = 0; row < C; ++row) {
      int64_t g = ring.globalRow(r, row);
      for (int64_t x = 0; x < D; ++x) {
        uint16_t h = hout[(s * C + row) * D + x];
        out[(s * L + g) * D + x] = bf16 ? bf16ToFloat(h) : f16ToFloat(h);
      }
      if (lse)
        lse[s * L + g] = hlse[s * C + row];
    }
  return true;
}

bool attn::runtime::runRankBackwardFromHost(
    Package &pkg, Transport &transport, const Tensor &q, const Tensor &k,
    const Tensor &v, const Tensor *lengths, const Tensor &out,
    const Tensor &lse, const Tensor &gradOut, float *dq, float *dk, float *dv,
    RingStats &stats, std::string &error) {
  const Driver *d = gpuRingDriver(pkg, transport, error);
  if (!d)
    return false;
  const RingProgram &ring = *pkg.ring();
  const int r = transport.rank();
  const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3],
                Hkv = k.shape[1], L = ring.qLen, Lk = ring.kvLen,
                C = ring.qChunk, Ck = ring.kvChunk;
  const bool bf16 = pkg.args().front().dtype == "bf16";
  RankUploads up{*d, ring, r, B, D, bf16};
  std::vector<float> hl(B * H * C);
  for (int64_t s = 0; s < B * H; ++s)
    for (int64_t row = 0; row < C; ++row)
      hl[s * C + row] =
          static_cast<const float *>(lse.data)[s * L + ring.globalRow(r, row)];
  const size_t qF = size_t(B * H * C * D) * 4, kF = size_t(B * Hkv * Ck * D) * 4;
  // NaN-poisoned gradients: rows the backward never writes show.
  const std::vector<float> nan(std::max(qF, kF) / 4, std::nanf(""));
  Tensor tq = up.rows(q, H, false), tk = up.rows(k, Hkv, true),
         tv = up.rows(v, Hkv, true), to = up.rows(out, H, false),
         tg = up.rows(gradOut, H, false),
         tl = up.tensor(hl.data(), hl.size() * 4, {B, H, C}, "f32"),
         tn = lengths ? up.lengths(*lengths) : Tensor(),
         tdq = up.tensor(nan.data(), qF, {B, H, C, D}, "f32"),
         tdk = up.tensor(nan.data(), kF, {B, Hkv, Ck, D}, "f32"),
         tdv = up.tensor(nan.data(), kF, {B, Hkv, Ck, D}, "f32");
  if (!up.ok(transport, error))
    return false;
  RankStream own(*d, transport, error);
  if (!own.stream)
    return false;
  CUstream stream = own.stream;
  bool ok = pkg.runRankBackward(transport, tq, tk, tv, lengths ? &tn : nullptr,
                                to, tl, tg, tdq, tdk, tdv, &stats, error,
                                stream) &&
            pkg.waitRank(transport, stream, 300, error);
  if (!ok)
    return false;
  d->cuStreamSynchronize(stream);
  std::vector<float> hdq(B * H * C * D), hdk(B * Hkv * Ck * D),
      hdv(hdk.size());
  up.download(tdq, hdq.data(), qF);
  up.download(tdk, hdk.data(), kF);
  up.download(tdv, hdv.data(), kF);
  // This rank's rows into the whole sequence's gradients.
  auto scatter = [&](const std::vector<float> &local, float *whole,
                     int64_t slabs, bool keys) {
    const int64_t rows = keys ? Ck : C, all = keys ? Lk : L;
    for (int64_t s = 0; s < slabs; ++s)
      for (int64_t row = 0; row < rows; ++row)
        std::copy_n(local.data() + (s * rows + row) * D, D,
                    whole + (s * all + ring.globalRow(r, row, keys)) * D);
  };
  scatter(hdq, dq, B * H, false);
  scatter(hdk, dk, B * Hkv, true);
  scatter(hdv, dv, B * Hkv, true);
  return true;
}
