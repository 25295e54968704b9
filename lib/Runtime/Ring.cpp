//===- Ring.cpp - run ring-attention packages across ranks ----------------===//
//
// One rank's program, for the CPU target: init the f32 state of its chunk;
// for every step, pack the rows the receiver attends (K then V, per batch
// and kv head, in the order of the row runs), exchange them over the
// Transport, unpack what arrives into a zero-filled receive buffer at the
// same local rows (two buffers alternate), and call each update's kernel on
// views of the query/key pieces with their global origins; then finalize.
// Rows that did not travel are never attended, and zero-filled buffers keep
// them finite so masked products stay 0.
//
// The backward pass of a rank walks the same steps: the same key/value rows
// arrive, each update's gradient kernel adds to the rank's dq and to dk/dv
// buffers for the received rows, and those partial gradients go back to the
// rows' owner in a second exchange of the step, which adds them into its
// own dk and dv.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/Ring.h"
#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Package.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <dlfcn.h>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

using namespace attn::runtime;
using json = nlohmann::json;

namespace {
double now() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

RowSet parseRowSet(const json &runs) {
  RowSet set;
  for (const json &r : runs)
    set.push_back({r.at(0).get<int64_t>(), r.at(1).get<int64_t>(),
                   r.at(2).get<int64_t>(), r.at(3).get<int64_t>()});
  return set;
}


/// Calls `fn(localRow)` for every row of `set`, in order.
template <typename Fn> void forEachRow(const RowSet &set, Fn fn) {
  for (const RowRun &r : set)
    for (int64_t c = 0; c < r.count; ++c)
      for (int64_t i = 0; i < r.len; ++i)
        fn(r.start + c * r.pitch + i);
}

enum class RowCopy { ToPacked, FromPacked, AddFromPacked };

/// Copies the rows of `sets` (per kv head, or one for all) of `tensor`
/// [B, Hkv, C, D] to or from the packed buffer `packed` (or adds the packed
/// rows to the tensor's); returns floats moved.
int64_t copyRows(const std::vector<RowSet> &sets, float *tensor, int64_t B,
                 int64_t Hkv, int64_t C, int64_t D, float *packed,
                 RowCopy how) {
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const RowSet &set = sets.size() == 1 ? sets[0] : sets[g];
      float *base = tensor + (b * Hkv + g) * C * D;
      forEachRow(set, [&](int64_t row) {
        float *t = base + row * D, *p = packed + n;
        if (how == RowCopy::ToPacked)
          std::memcpy(p, t, D * sizeof(float));
        else if (how == RowCopy::FromPacked)
          std::memcpy(t, p, D * sizeof(float));
        else
          for (int64_t d = 0; d < D; ++d)
            t[d] += p[d];
        n += D;
      });
    }
  return n;
}

int64_t packedFloats(const std::vector<RowSet> &sets, int64_t B, int64_t Hkv,
                     int64_t D) {
  return packedRowCount(sets, Hkv) * B * D;
}

/// A memref descriptor {allocated, aligned, offset, sizes[r], strides[r]}
/// of rows [offset, offset + rows) of a dense [.., C(, D)] tensor.
struct Descriptor {
  std::vector<int64_t> words;
  Descriptor(const void *data, std::vector<int64_t> shape, int64_t rowDim,
             int64_t rowOffset, int64_t rows) {
    size_t rank = shape.size();
    words.assign(3 + 2 * rank, 0);
    words[0] = words[1] = reinterpret_cast<int64_t>(data);
    int64_t stride = 1;
    for (size_t i = rank; i-- > 0;) {
      words[3 + rank + i] = stride;
      stride *= shape[i];
    }
    words[2] = rowOffset * words[3 + rank + rowDim];
    shape[rowDim] = rows;
    for (size_t i = 0; i < rank; ++i)
      words[3 + i] = shape[i];
  }
  void *get() { return words.data(); }
};

/// The key/value rows of one rank's ring steps (CPU packages): packs the
/// rows a step sends (K then V), exchanges them, and unpacks what arrives
/// into zero-filled buffers [B, Hkv, Ck, D] at the same local rows: two
/// alternating buffers, or one per step when every exchange comes first
/// (`kv: allgather`).
struct KvExchange {
  Transport &transport;
  const RankSchedule &rs;
  int64_t B, Hkv, Ck, D;
  float *k, *v;
  bool bufferPerStep;
  std::vector<std::vector<float>> kBuf, vBuf;
  std::vector<float> sendBuf, recvBuf;
  std::vector<int64_t> sentBytes;
  int exchanges = 0;

  KvExchange(Transport &t, const RankSchedule &rs, const Tensor &k,
             const Tensor &v, bool bufferPerStep)
      : transport(t), rs(rs), B(k.shape[0]), Hkv(k.shape[1]), Ck(k.shape[2]),
        D(k.shape[3]), k(static_cast<float *>(k.data)),
        v(static_cast<float *>(v.data)), bufferPerStep(bufferPerStep),
        kBuf(bufferPerStep ? rs.steps.size() : 2), vBuf(kBuf.size()),
        sentBytes(rs.steps.size(), 0) {}

  /// Whether step `i`'s updates read rows from a peer (else the rank's own).
  bool receives(size_t i) const {
    const RingStep &step = rs.steps[i];
    return step.recvFrom >= 0 && step.step != 0;
  }

  /// Step `i`'s exchange; `keys`/`values` are what its updates read.
  bool operator()(size_t i, float *&keys, float *&values, std::string &error) {
    const RingStep &step = rs.steps[i];
    keys = k;
    values = v;
    if (step.sendTo < 0 && step.recvFrom < 0)
      return true;
    size_t slot = bufferPerStep ? i : exchanges++ % 2;
    int64_t sendFloats =
        step.sendTo >= 0 ? packedFloats(step.sendRows, B, Hkv, D) : 0;
    int64_t recvFloats =
        step.recvFrom >= 0 ? packedFloats(step.recvRows, B, Hkv, D) : 0;
    sendBuf.resize(2 * sendFloats);
    recvBuf.resize(2 * recvFloats);
    if (step.sendTo >= 0) {
      copyRows(step.sendRows, k, B, Hkv, Ck, D, sendBuf.data(),
               RowCopy::ToPacked);
      copyRows(step.sendRows, v, B, Hkv, Ck, D, sendBuf.data() + sendFloats,
               RowCopy::ToPacked);
    }
    if (!transport.exchange(step.step, step.sendTo, sendBuf.data(),
                            sendBuf.size() * sizeof(float), step.recvFrom,
                            recvBuf.data(), recvBuf.size() * sizeof(float),
                            error))
      return false;
    sentBytes[i] = sendBuf.size() * sizeof(float);
    if (!receives(i))
      return true;
    if (kBuf[slot].empty()) {
      kBuf[slot].assign(B * Hkv * Ck * D, 0.0f);
      vBuf[slot].assign(B * Hkv * Ck * D, 0.0f);
    }
    copyRows(step.recvRows, kBuf[slot].data(), B, Hkv, Ck, D, recvBuf.data(),
             RowCopy::FromPacked);
    copyRows(step.recvRows, vBuf[slot].data(), B, Hkv, Ck, D,
             recvBuf.data() + recvFloats, RowCopy::FromPacked);
    keys = kBuf[slot].data();
    values = vBuf[slot].data();
    return true;
  }
};

/// Whether update `u` names one of `kernels` kernels and pieces of `rs`.
bool validUpdate(const RingUpdate &u, const RankSchedule &rs,
                 size_t kernels) {
  return u.kernel >= 0 && u.kernel < int64_t(kernels) && u.qPiece >= 0 &&
         u.qPiece < int64_t(rs.qPieces.size()) && u.kPiece >= 0 &&
         u.kPiece < int64_t(rs.kvPieces.size());
}

} // namespace

std::string attn::runtime::ringStepName(int64_t step) {
  return step >= 0 ? "step " + std::to_string(step)
                   : "the gradient exchange of step " +
                         std::to_string(-1 - step);
}

int64_t attn::runtime::rowCount(const RowSet &set) {
  int64_t n = 0;
  for (const RowRun &r : set)
    n += r.len * r.count;
  return n;
}

int64_t attn::runtime::packedRowCount(const std::vector<RowSet> &sets,
                                      int64_t kvHeads) {
  int64_t rows = 0;
  for (const RowSet &s : sets)
    rows += rowCount(s);
  return sets.size() == 1 ? rows * kvHeads : rows;
}

int64_t RingProgram::globalRow(int64_t rank, int64_t row, bool keys) const {
  if (layout == "striped")
    return rank + ranks * row;
  const RankSchedule &rs = schedule.at(rank);
  for (const RingPiece &p : keys ? rs.kvPieces : rs.qPieces)
    if (row >= p.offset && row < p.offset + p.rows)
      return p.origin + row - p.offset;
  return -1;
}

//===----------------------------------------------------------------------===//
// In-process transport
//===----------------------------------------------------------------------===//

struct InProcessHub::State {
  int ranks;
  double timeout;
  std::mutex mutex;
  std::condition_variable arrived;
  /// (from, to, step) -> bytes (device exchanges: the sender's device
  /// address and byte count)
  std::map<std::tuple<int, int, int64_t>, std::vector<char>> mailbox;
  /// Device exchanges: (sender, receiver, step) whose rows the receiver
  /// has copied, so that the sender may reuse its buffer.
  std::set<std::tuple<int, int, int64_t>> copied;
  std::string failure; ///< set when a rank aborted
};

namespace {
class InProcessTransport final : public Transport {
public:
  InProcessTransport(std::shared_ptr<InProcessHub::State> s, int rank)
      : s_(std::move(s)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return s_->ranks; }

  bool exchange(int64_t step, int to, const void *send, size_t sendBytes,
                int from, void *recv, size_t recvBytes,
                std::string &error) override {
    std::unique_lock<std::mutex> lock(s_->mutex);
    if (to >= 0) {
      const char *p = static_cast<const char *>(send);
      s_->mailbox[{rank_, to, step}] = std::vector<char>(p, p + sendBytes);
      s_->arrived.notify_all();
    }
    if (from < 0)
      return true;
    std::vector<char> bytes;
    if (!take(lock, step, from, recvBytes, bytes, error))
      return false;
    std::memcpy(recv, bytes.data(), recvBytes);
    return true;
  }

  /// Ranks as threads on one GPU, in one CUDA context: the sender posts its
  /// buffer's address once the rows are packed; the receiver copies them
  /// device to device and tells the sender, who waits for that before
  /// reusing the buffer. Synchronous (the ring's overlap of transfers and
  /// kernels is NCCL's); what it checks is the schedule and the GPU
  /// executor, on one GPU.
  bool exchangeDevice(int64_t step, int to, uint64_t send, size_t sendBytes,
                      int from, uint64_t recv, size_t recvBytes, void *stream,
                      std::string &error) override {
    const cuda::Driver *d = cuda::driver(error);
    if (!d)
      return false;
    auto st = static_cast<cuda::CUstream>(stream);
    auto succeeded = [&](cuda::CUresult rc, const char *what) {
      if (rc != cuda::CUDA_SUCCESS)
        error = "rank " + std::to_string(rank_) + ": " +
                cuda::describe(*d, rc, what);
      return rc == cuda::CUDA_SUCCESS;
    };
    if (!succeeded(d->cuStreamSynchronize(st), "packing the rows of a ring step"))
      return false;
    std::unique_lock<std::mutex> lock(s_->mutex);
    if (to >= 0) {
      uint64_t message[2] = {send, sendBytes};
      const char *p = reinterpret_cast<const char *>(message);
      s_->mailbox[{rank_, to, step}] = std::vector<char>(p, p + sizeof(message));
      s_->arrived.notify_all();
    }
    if (from >= 0) {
      std::vector<char> bytes;
      if (!take(lock, step, from, sizeof(uint64_t) * 2, bytes, error))
        return false;
      uint64_t message[2];
      std::memcpy(message, bytes.data(), sizeof(message));
      if (message[1] != recvBytes) {
        error = sizeMismatch(step, from, recvBytes, message[1]);
        return false;
      }
      lock.unlock();
      if (!succeeded(d->cuMemcpyDtoDAsync(cuda::CUdeviceptr(recv),
                                          cuda::CUdeviceptr(message[0]),
                                          recvBytes, st),
                     "copying a peer's rows") ||
          !succeeded(d->cuStreamSynchronize(st), "copying a peer's rows"))
        return false;
      lock.lock();
      s_->copied.insert({from, rank_, step});
      s_->arrived.notify_all();
    }
    if (to < 0)
      return true;
    auto key = std::make_tuple(rank_, to, step);
    if (!waitFor(lock, [&] { return s_->copied.count(key) > 0; }, step, to,
                 " to copy this rank's rows", error))
      return false;
    s_->copied.erase(key);
    return true;
  }

  void abort(const std::string &why) override {
    std::lock_guard<std::mutex> lock(s_->mutex);
    if (s_->failure.empty())
      s_->failure = "rank " + std::to_string(rank_) + " failed: " + why;
    s_->arrived.notify_all();
  }

private:
  /// Waits (lock held) until `done` or a peer's failure; bounded.
  template <typename Done>
  bool waitFor(std::unique_lock<std::mutex> &lock, Done done, int64_t step,
               int peer, const char *what, std::string &error) {
    bool ready = s_->arrived.wait_for(
        lock, std::chrono::duration<double>(s_->timeout),
        [&] { return done() || !s_->failure.empty(); });
    if (!s_->failure.empty()) {
      error = "rank " + std::to_string(rank_) + ": stopped at " +
              ringStepName(step) + " because " + s_->failure;
      return false;
    }
    if (!ready) {
      error = "rank " + std::to_string(rank_) + ": timed out after " +
              std::to_string(int(s_->timeout)) + " s waiting for rank " +
              std::to_string(peer) + what + " of " + ringStepName(step) +
              " (did a peer fail or run another package?)";
      return false;
    }
    return true;
  }

  /// Takes the message of `step` from rank `from` (lock held), which must
  /// be `bytes` long.
  bool take(std::unique_lock<std::mutex> &lock, int64_t step, int from,
            size_t size, std::vector<char> &bytes, std::string &error) {
    auto key = std::make_tuple(from, rank_, step);
    if (!waitFor(lock, [&] { return s_->mailbox.count(key) > 0; }, step, from,
                 "'s rows", error))
      return false;
    bytes = std::move(s_->mailbox[key]);
    s_->mailbox.erase(key);
    if (bytes.size() != size) {
      error = sizeMismatch(step, from, size, bytes.size());
      return false;
    }
    return true;
  }

  std::string sizeMismatch(int64_t step, int from, size_t want, size_t got) {
    return "rank " + std::to_string(rank_) + ": " + ringStepName(step) +
           " expected " + std::to_string(want) + " bytes from rank " +
           std::to_string(from) + ", got " + std::to_string(got) +
           " (ranks disagree on the package)";
  }

  std::shared_ptr<InProcessHub::State> s_;
  int rank_;
};
} // namespace

InProcessHub::InProcessHub(int ranks, double timeoutSeconds)
    : state_(std::make_shared<State>()) {
  state_->ranks = ranks;
  state_->timeout = timeoutSeconds;
}
InProcessHub::~InProcessHub() = default;

std::unique_ptr<Transport> InProcessHub::transport(int rank) {
  return std::make_unique<InProcessTransport>(state_, rank);
}

//===----------------------------------------------------------------------===//
// Package: loading and running one rank
//===----------------------------------------------------------------------===//

bool Package::loadRing(const void *manifest, std::string &error) {
  const json &m = *static_cast<const json *>(manifest);
  const json &r = m.at("ring");
  auto ring = std::make_unique<RingProgram>();
  ring->ranks = r.at("ranks").get<int64_t>();
  if (!r.contains("q_len"))
    throw std::runtime_error("the ring section has no q_len (a package from "
                             "an older attn-compile: compile it again)");
  ring->qLen = r.at("q_len").get<int64_t>();
  ring->kvLen = r.at("kv_len").get<int64_t>();
  ring->qChunk = r.at("q_chunk").get<int64_t>();
  ring->kvChunk = r.at("kv_chunk").get<int64_t>();
  ring->kvHeads = r.at("kv_heads").get<int64_t>();
  ring->layout = r.at("layout").get<std::string>();
  ring->kv = r.at("kv").get<std::string>();
  for (const json &rank : r.at("schedule")) {
    RankSchedule rs;
    rs.rowsSent = rank.at("rows_sent").get<int64_t>();
    auto pieces = [](const json &list) {
      std::vector<RingPiece> out;
      for (const json &p : list)
        out.push_back({p.at(0).get<int64_t>(), p.at(1).get<int64_t>(),
                       p.at(2).get<int64_t>()});
      return out;
    };
    rs.qPieces = pieces(rank.at("q_pieces"));
    rs.kvPieces = pieces(rank.at("kv_pieces"));
    for (const json &s : rank.at("steps")) {
      RingStep step;
      step.step = s.at("step").get<int64_t>();
      step.sendTo = s.at("send_to").get<int>();
      step.recvFrom = s.at("recv_from").get<int>();
      for (const json &set : s.at("send_rows"))
        step.sendRows.push_back(parseRowSet(set));
      for (const json &set : s.at("recv_rows"))
        step.recvRows.push_back(parseRowSet(set));
      for (const json &u : s.at("updates")) {
        RingUpdate up{u.at(0).get<int64_t>(), u.at(1).get<int64_t>(),
                      u.at(2).get<int64_t>(), u.at(3).get<int64_t>(),
                      u.at(4).get<int64_t>()};
        // [kernel, q piece, k piece, q origin, k origin, q pos, k pos, stride]
        up.qPos = u.at(5).get<int64_t>();
        up.kPos = u.at(6).get<int64_t>();
        up.stride = u.at(7).get<int64_t>();
        if (up.stride < 1)
          throw std::runtime_error("ring update stride must be >= 1");
        step.updates.push_back(up);
      }
      rs.steps.push_back(std::move(step));
    }
    ring->schedule.push_back(std::move(rs));
  }
  if (static_cast<int64_t>(ring->schedule.size()) != ring->ranks) {
    error = "the ring schedule lists " +
            std::to_string(ring->schedule.size()) + " ranks, not " +
            std::to_string(ring->ranks);
    return false;
  }
  ring_ = std::move(ring);
  if (isGpu())
    return true; // the kernels are in the cubin (GpuPackage.cpp)
  auto symbol = [&](const std::string &name) -> void * {
    void *p = dlsym(library_, name.c_str());
    if (!p)
      error = dir_ + "/kernels.so has no kernel " + name;
    return p;
  };
  if (!(ringInit_ = symbol(m.at("init").get<std::string>())) ||
      !(ringFinalize_ = symbol(m.at("finalize").get<std::string>())))
    return false;
  for (const json &k : m.at("kernels")) {
    void *p = symbol(k.at("symbol").get<std::string>());
    if (!p)
      return false;
    ringKernels_.push_back(p);
  }
  if (!m.contains("backward"))
    return true;
  const json &grad = m.at("backward");
  if (!(ringGradInit_ = symbol(grad.at("init").get<std::string>())))
    return false;
  for (const json &k : grad.at("kernels")) {
    void *p = symbol(k.at("symbol").get<std::string>());
    if (!p)
      return false;
    ringGradKernels_.push_back(p);
  }
  return true;
}

bool Package::checkRingTransport(Transport &transport,
                                 std::string &error) const {
  if (!ring_) {
    error = "package " + name_ + " is not a ring package (compile a spec with "
            "a \"distribution\" section)";
    return false;
  }
  const int rank = transport.rank();
  if (transport.size() != ring_->ranks || rank < 0 || rank >= ring_->ranks) {
    error = "package " + name_ + " is compiled for " +
            std::to_string(ring_->ranks) + " ranks, but the transport has " +
            std::to_string(transport.size()) + " (this is rank " +
            std::to_string(rank) + ")";
    return false;
  }
  return true;
}

bool Package::runRank(Transport &transport, const Tensor &q, const Tensor &k,
                      const Tensor &v, const Tensor *lengths, Tensor &out,
                      Tensor *lse, RingStats *stats, std::string &error,
                      void *stream) {
  if (!checkRingTransport(transport, error) ||
      !checkArguments(q, k, v, lengths, out, lse, error))
    return false;
  const int rank = transport.rank();
  if (isGpu())
    return runRankGpu(transport, q, k, v, lengths, out, lse, stats, error,
                      stream);

  const double start = now();
  // C query rows (q, out, lse) and Ck key rows (k, v) on this rank.
  const int64_t B = q.shape[0], H = q.shape[1], C = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Ck = k.shape[2];
  std::vector<float> acc(B * H * C * D), max(B * H * C), sum(B * H * C);
  std::vector<float> lseScratch;
  void *lseData = lse ? lse->data : nullptr;
  if (hasLse() && !lse) {
    lseScratch.resize(B * H * C);
    lseData = lseScratch.data();
  }
  const std::vector<int64_t> qShape{B, H, C, D}, kShape{B, Hkv, Ck, D},
      rowShape{B, H, C};
  using P = void *;
  {
    Descriptor a(acc.data(), qShape, 2, 0, C), m(max.data(), rowShape, 2, 0, C),
        s(sum.data(), rowShape, 2, 0, C);
    reinterpret_cast<void (*)(P, P, P)>(ringInit_)(a.get(), m.get(), s.get());
  }

  const RankSchedule &rs = ring_->schedule[rank];
  // Received rows: two alternating buffers for `ring` (step s computes while
  // the next exchange lands in the other), one per step for `allgather`
  // (every exchange first, then every update).
  const bool gatherFirst = ring_->kv == "allgather";
  KvExchange exchange(transport, rs, k, v, gatherFirst);
  std::vector<double> seconds(rs.steps.size(), 0);
  if (stats) {
    *stats = RingStats();
    stats->rank = rank;
    stats->expectedBytes = rs.rowsSent * B * D * 4 * 2;
  }

  // Step `i`'s component updates on keys/values.
  auto update = [&](size_t i, float *keys, float *values) {
    for (const RingUpdate &u : rs.steps[i].updates) {
      if (!validUpdate(u, rs, ringKernels_.size())) {
        error = "the ring schedule names a missing kernel or piece";
        return false;
      }
      const RingPiece &qp = rs.qPieces[u.qPiece], &kp = rs.kvPieces[u.kPiece];
      Descriptor dq(q.data, qShape, 2, qp.offset, qp.rows),
          dk(keys, kShape, 2, kp.offset, kp.rows),
          dv(values, kShape, 2, kp.offset, kp.rows),
          da(acc.data(), qShape, 2, qp.offset, qp.rows),
          dm(max.data(), rowShape, 2, qp.offset, qp.rows),
          ds(sum.data(), rowShape, 2, qp.offset, qp.rows);
      void *fn = ringKernels_[u.kernel];
      if (lengths) {
        Descriptor dl(lengths->data, {B}, 0, 0, B);
        using I = int64_t;
        reinterpret_cast<void (*)(P, P, P, P, P, P, P, I, I, I, I, I)>(fn)(
            dq.get(), dk.get(), dv.get(), dl.get(), da.get(), dm.get(),
            ds.get(), u.qOrigin, u.kOrigin, u.qPos, u.kPos, u.stride);
      } else {
        using I = int64_t;
        reinterpret_cast<void (*)(P, P, P, P, P, P, I, I, I, I, I)>(fn)(
            dq.get(), dk.get(), dv.get(), da.get(), dm.get(), ds.get(),
            u.qOrigin, u.kOrigin, u.qPos, u.kPos, u.stride);
      }
    }
    return true;
  };

  std::vector<float *> keysOf(rs.steps.size()), valuesOf(rs.steps.size());
  for (size_t i = 0; i < rs.steps.size(); ++i) {
    double t0 = now();
    bool ok = exchange(i, keysOf[i], valuesOf[i], error) &&
              (gatherFirst || update(i, keysOf[i], valuesOf[i]));
    seconds[i] = now() - t0;
    if (!ok) {
      transport.abort(error);
      return false;
    }
  }
  for (size_t i = 0; gatherFirst && i < rs.steps.size(); ++i) {
    double t0 = now();
    if (!update(i, keysOf[i], valuesOf[i])) {
      transport.abort(error);
      return false;
    }
    seconds[i] += now() - t0;
  }
  if (stats)
    for (size_t i = 0; i < rs.steps.size(); ++i) {
      stats->bytesSent += exchange.sentBytes[i];
      stats->steps.push_back({rs.steps[i].step, exchange.sentBytes[i],
                              int64_t(rs.steps[i].updates.size()), seconds[i]});
    }
  {
    Descriptor a(acc.data(), qShape, 2, 0, C), m(max.data(), rowShape, 2, 0, C),
        s(sum.data(), rowShape, 2, 0, C), o(out.data, qShape, 2, 0, C);
    if (hasLse()) {
      Descriptor l(lseData, rowShape, 2, 0, C);
      reinterpret_cast<void (*)(P, P, P, P, P)>(ringFinalize_)(
          a.get(), m.get(), s.get(), o.get(), l.get());
    } else {
      reinterpret_cast<void (*)(P, P, P, P)>(ringFinalize_)(a.get(), m.get(),
                                                             s.get(), o.get());
    }
  }
  if (stats)
    stats->seconds = now() - start;
  return true;
}

bool Package::runRankBackward(Transport &transport, const Tensor &q,
                              const Tensor &k, const Tensor &v,
                              const Tensor *lengths, const Tensor &out,
                              const Tensor &lse, const Tensor &gradOut,
                              Tensor &dq, Tensor &dk, Tensor &dv,
                              RingStats *stats, std::string &error,
                              void *stream) {
  if (!checkRingTransport(transport, error))
    return false;
  if (!hasBackward()) {
    error = "package " + name_ + " has no backward pass (compile it with "
            "\"backward\": true)";
    return false;
  }
  if (!checkArguments(q, k, v, lengths, out, &lse, error) ||
      !checkGradients(q, k, v, out, gradOut, dq, dk, dv, error))
    return false;
  if (isGpu()) {
    // The backward kernels read q, k, v and out as contiguous tensors.
    for (auto [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v},
                           {"out", &out}})
      if (stridesOf(*t) != contiguousStrides(t->shape)) {
        error = std::string(name) + ": must be contiguous for the backward "
                                    "pass";
        return false;
      }
    return runRankBackwardGpu(transport, q, k, v, lengths, out, lse, gradOut,
                              dq, dk, dv, stats, error, stream);
  }
  const int rank = transport.rank();
  const double start = now();
  const int64_t B = q.shape[0], H = q.shape[1], C = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Ck = k.shape[2];
  const std::vector<int64_t> qShape{B, H, C, D}, kShape{B, Hkv, Ck, D},
      rowShape{B, H, C};
  using P = void *;
  using I = int64_t;
  std::vector<float> delta(B * H * C);
  {
    Descriptor o(out.data, qShape, 2, 0, C), g(gradOut.data, qShape, 2, 0, C),
        dl(delta.data(), rowShape, 2, 0, C), a(dq.data, qShape, 2, 0, C),
        b(dk.data, kShape, 2, 0, Ck), c(dv.data, kShape, 2, 0, Ck);
    reinterpret_cast<void (*)(P, P, P, P, P, P)>(ringGradInit_)(
        o.get(), g.get(), dl.get(), a.get(), b.get(), c.get());
  }

  const RankSchedule &rs = ring_->schedule[rank];
  KvExchange exchange(transport, rs, k, v, /*bufferPerStep=*/false);
  // dk and dv of the rows a step received, sent back to their owner.
  std::vector<float> dkRecv, dvRecv, sendBuf, recvBuf;
  std::vector<double> seconds(rs.steps.size(), 0);
  std::vector<int64_t> gradBytes(rs.steps.size(), 0);

  // Step `i`'s gradient kernels: dq of the rank's rows, dk/dv of `keys`.
  auto update = [&](size_t i, float *keys, float *values, float *gradKeys,
                    float *gradValues) {
    for (const RingUpdate &u : rs.steps[i].updates) {
      if (!validUpdate(u, rs, ringGradKernels_.size())) {
        error = "the ring schedule names a missing kernel or piece";
        return false;
      }
      const RingPiece &qp = rs.qPieces[u.qPiece], &kp = rs.kvPieces[u.kPiece];
      auto qRows = [&](void *data) {
        return Descriptor(data, qShape, 2, qp.offset, qp.rows);
      };
      auto kRows = [&](void *data) {
        return Descriptor(data, kShape, 2, kp.offset, kp.rows);
      };
      Descriptor dQ = qRows(q.data), dK = kRows(keys), dV = kRows(values),
                 dO = qRows(gradOut.data),
                 dL(lse.data, rowShape, 2, qp.offset, qp.rows),
                 dD(delta.data(), rowShape, 2, qp.offset, qp.rows),
                 gQ = qRows(dq.data), gK = kRows(gradKeys),
                 gV = kRows(gradValues);
      void *fn = ringGradKernels_[u.kernel];
      if (lengths) {
        Descriptor dLen(lengths->data, {B}, 0, 0, B);
        reinterpret_cast<void (*)(P, P, P, P, P, P, P, P, P, P, I, I, I, I,
                                  I)>(fn)(
            dQ.get(), dK.get(), dV.get(), dO.get(), dL.get(), dD.get(),
            dLen.get(), gQ.get(), gK.get(), gV.get(), u.qOrigin, u.kOrigin,
            u.qPos, u.kPos, u.stride);
      } else {
        reinterpret_cast<void (*)(P, P, P, P, P, P, P, P, P, I, I, I, I, I)>(
            fn)(dQ.get(), dK.get(), dV.get(), dO.get(), dL.get(), dD.get(),
                gQ.get(), gK.get(), gV.get(), u.qOrigin, u.kOrigin, u.qPos,
                u.kPos, u.stride);
      }
    }
    return true;
  };

  // The gradients of step `i`'s received rows go back to their owner
  // (recvFrom), and the owner's peer (sendTo) returns those of the rows this
  // rank sent, which add into dk and dv.
  auto returnGradients = [&](size_t i) {
    const RingStep &step = rs.steps[i];
    int to = exchange.receives(i) ? step.recvFrom : -1;
    int from = step.step != 0 ? step.sendTo : -1;
    if (to < 0 && from < 0)
      return true;
    int64_t sendFloats = to >= 0 ? packedFloats(step.recvRows, B, Hkv, D) : 0;
    int64_t recvFloats =
        from >= 0 ? packedFloats(step.sendRows, B, Hkv, D) : 0;
    sendBuf.resize(2 * sendFloats);
    recvBuf.resize(2 * recvFloats);
    if (to >= 0) {
      copyRows(step.recvRows, dkRecv.data(), B, Hkv, Ck, D, sendBuf.data(),
               RowCopy::ToPacked);
      copyRows(step.recvRows, dvRecv.data(), B, Hkv, Ck, D,
               sendBuf.data() + sendFloats, RowCopy::ToPacked);
    }
    if (!transport.exchange(gradientStep(step.step), to, sendBuf.data(),
                            sendBuf.size() * sizeof(float), from,
                            recvBuf.data(), recvBuf.size() * sizeof(float),
                            error))
      return false;
    gradBytes[i] = sendBuf.size() * sizeof(float);
    if (from >= 0) {
      copyRows(step.sendRows, static_cast<float *>(dk.data), B, Hkv, Ck, D,
               recvBuf.data(), RowCopy::AddFromPacked);
      copyRows(step.sendRows, static_cast<float *>(dv.data), B, Hkv, Ck, D,
               recvBuf.data() + recvFloats, RowCopy::AddFromPacked);
    }
    return true;
  };

  for (size_t i = 0; i < rs.steps.size(); ++i) {
    double t0 = now();
    float *keys = nullptr, *values = nullptr;
    bool ok = exchange(i, keys, values, error);
    if (ok) {
      float *gradKeys = static_cast<float *>(dk.data),
            *gradValues = static_cast<float *>(dv.data);
      if (exchange.receives(i)) {
        dkRecv.assign(B * Hkv * Ck * D, 0.0f);
        dvRecv.assign(B * Hkv * Ck * D, 0.0f);
        gradKeys = dkRecv.data();
        gradValues = dvRecv.data();
      }
      ok = update(i, keys, values, gradKeys, gradValues) && returnGradients(i);
    }
    seconds[i] = now() - t0;
    if (!ok) {
      transport.abort(error);
      return false;
    }
  }
  if (stats) {
    *stats = RingStats();
    stats->rank = rank;
    // This rank's key/value rows out, the gradients of its peers' back.
    int64_t rows = rs.rowsSent;
    for (size_t i = 0; i < rs.steps.size(); ++i)
      if (exchange.receives(i))
        rows += packedRowCount(rs.steps[i].recvRows, Hkv);
    stats->expectedBytes = rows * B * D * 4 * 2;
    for (size_t i = 0; i < rs.steps.size(); ++i) {
      int64_t bytes = exchange.sentBytes[i] + gradBytes[i];
      stats->bytesSent += bytes;
      stats->steps.push_back({rs.steps[i].step, bytes,
                              int64_t(rs.steps[i].updates.size()), seconds[i]});
    }
    stats->seconds = now() - start;
  }
  return true;
}

//===----------------------------------------------------------------------===//
// All ranks in one process
//===----------------------------------------------------------------------===//

namespace {
/// Runs `rank(r, transport, error)` for every rank r in a thread of its own
/// over one InProcessHub (a rank that fails stops the others). Returns
/// whether all succeeded; else `error` is the rank that failed first, not
/// one of the peers it stopped.
template <typename RankFn>
bool runRankThreads(int64_t ranks, RankFn rank, std::string &error) {
  InProcessHub hub{int(ranks)};
  std::vector<std::string> errors(ranks);
  std::vector<char> ok(ranks, 0);
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      std::unique_ptr<Transport> t = hub.transport(int(r));
      ok[r] = rank(r, *t, errors[r]);
      if (!ok[r])
        t->abort(errors[r]);
    });
  for (std::thread &t : threads)
    t.join();
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t r = 0; r < ranks; ++r)
      if (!ok[r] && (pass == 1 || errors[r].find("stopped at ") ==
                                      std::string::npos)) {
        error = errors[r];
        return false;
      }
  return true;
}

/// Copies rows between a global [.., L, inner] tensor and rank `rank`'s local
/// [.., C, inner] one: query rows (L = Lq), or key rows with `keys`.
void moveRows(const RingProgram &ring, int64_t rank, bool keys, int64_t outer,
              int64_t inner, float *global, float *local, bool toLocal) {
  const int64_t L = keys ? ring.kvLen : ring.qLen,
                C = keys ? ring.kvChunk : ring.qChunk;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t row = 0; row < C; ++row) {
      float *g = global + (o * L + ring.globalRow(rank, row, keys)) * inner;
      float *l = local + (o * C + row) * inner;
      if (toLocal)
        std::memcpy(l, g, inner * sizeof(float));
      else
        std::memcpy(g, l, inner * sizeof(float));
    }
}
} // namespace

namespace {
struct WholeTensor {
  const char *name;
  const Tensor *tensor;
  bool keys; ///< key rows (k, v, dk, dv), else query rows
};

/// Whether each of `tensors` holds the whole sequence's rows, float32 and
/// contiguous (the ranks' chunks are cut from it).
bool checkWholeSequence(const RingProgram &ring,
                        std::initializer_list<WholeTensor> tensors,
                        std::string &error) {
  for (const WholeTensor &w : tensors) {
    const Tensor &t = *w.tensor;
    const std::string name = w.name;
    const int64_t L = w.keys ? ring.kvLen : ring.qLen;
    if (t.shape.size() != 4 || t.shape[2] != L || t.dtype != "f32") {
      error = name + ": expected a float32 [B, H, " + std::to_string(L) +
              ", D] tensor for the whole sequence" +
              (ring.qLen != ring.kvLen
                   ? w.keys ? " (its " + std::to_string(L) + " key rows)"
                            : " (its " + std::to_string(L) + " query rows)"
                   : "");
      return false;
    }
    if (stridesOf(t) != contiguousStrides(t.shape)) {
      error = name + ": the whole sequence must be contiguous (ring packages "
              "cut their chunks from it; pass a contiguous " + name + ")";
      return false;
    }
  }
  return true;
}

/// Runs `rank(package, transport, error)` for every rank of GPU ring
/// package `pkg` in a thread of its own on the package's GPU and context,
/// each with its own copy of the package (a rank's buffers and streams live
/// in its package), over one hub.
template <typename RankFn>
bool runGpuRankThreads(Package &pkg, RankFn rank, std::string &error) {
  const int64_t N = pkg.ring()->ranks;
  const cuda::Driver *d = cuda::driver(error);
  if (!d)
    return false;
  std::vector<std::unique_ptr<Package>> copies(N);
  for (int64_t r = 1; r < N; ++r)
    if (!(copies[r] = Package::load(pkg.dir(), error)))
      return false;
  return runRankThreads(
      N,
      [&](int64_t r, Transport &t, std::string &err) {
        return cuda::ensureContext(*d, err, pkg.device()) &&
               rank(r ? *copies[r] : pkg, t, err);
      },
      error);
}

/// runRanksInProcess for GPU ring packages.
bool runGpuRanksInProcess(Package &pkg, const Tensor &q, const Tensor &k,
                          const Tensor &v, const Tensor *lengths, Tensor &out,
                          Tensor *lse, std::vector<RingStats> &stats,
                          std::string &error) {
  float *lseData = lse ? static_cast<float *>(lse->data) : nullptr;
  stats.assign(pkg.ring()->ranks, RingStats());
  return runGpuRankThreads(
      pkg,
      [&](Package &p, Transport &t, std::string &err) {
        float ms = 0;
        return runRankFromHost(p, t, q, k, v, lengths,
                               static_cast<float *>(out.data), lseData, 1,
                               stats[t.rank()], ms, err);
      },
      error);
}
} // namespace

bool attn::runtime::runRanksInProcess(Package &pkg, const Tensor &q,
                                      const Tensor &k, const Tensor &v,
                                      const Tensor *lengths, Tensor &out,
                                      Tensor *lse,
                                      std::vector<RingStats> &stats,
                                      std::string &error) {
  const RingProgram *ring = pkg.ring();
  if (!ring) {
    error = "package " + pkg.name() + " is not a ring package";
    return false;
  }
  const int64_t N = ring->ranks, C = ring->qChunk, Ck = ring->kvChunk;
  if (!checkWholeSequence(*ring, {{"q", &q, false},
                                  {"k", &k, true},
                                  {"v", &v, true},
                                  {"out", &out, false}},
                          error))
    return false;
  if (lse && stridesOf(*lse) != contiguousStrides(lse->shape)) {
    error = "lse: must be contiguous";
    return false;
  }
  const int64_t B = q.shape[0], H = q.shape[1], Hkv = k.shape[1],
                D = q.shape[3];
  if (pkg.isGpu())
    return runGpuRanksInProcess(pkg, q, k, v, lengths, out, lse, stats, error);
  struct Local {
    std::vector<float> q, k, v, out, lse;
  };
  std::vector<Local> locals(N);
  for (int64_t r = 0; r < N; ++r) {
    Local &l = locals[r];
    l.q.resize(B * H * C * D);
    l.k.resize(B * Hkv * Ck * D);
    l.v.resize(B * Hkv * Ck * D);
    l.out.assign(B * H * C * D, std::nanf(""));
    l.lse.assign(B * H * C, std::nanf(""));
    moveRows(*ring, r, false, B * H, D, static_cast<float *>(q.data),
             l.q.data(), true);
    moveRows(*ring, r, true, B * Hkv, D, static_cast<float *>(k.data),
             l.k.data(), true);
    moveRows(*ring, r, true, B * Hkv, D, static_cast<float *>(v.data),
             l.v.data(), true);
  }
  stats.assign(N, RingStats());
  bool ok = runRankThreads(
      N,
      [&](int64_t r, Transport &t, std::string &err) {
        Local &l = locals[r];
        Tensor lq{l.q.data(), {B, H, C, D}, "f32"};
        Tensor lk{l.k.data(), {B, Hkv, Ck, D}, "f32"};
        Tensor lv{l.v.data(), {B, Hkv, Ck, D}, "f32"};
        Tensor lo{l.out.data(), {B, H, C, D}, "f32"};
        Tensor ll{l.lse.data(), {B, H, C}, "f32"};
        return pkg.runRank(t, lq, lk, lv, lengths, lo,
                           pkg.hasLse() ? &ll : nullptr, &stats[r], err);
      },
      error);
  if (!ok)
    return false;
  for (int64_t r = 0; r < N; ++r) {
    moveRows(*ring, r, false, B * H, D, static_cast<float *>(out.data),
             locals[r].out.data(), false);
    if (lse)
      moveRows(*ring, r, false, B * H, 1, static_cast<float *>(lse->data),
               locals[r].lse.data(), false);
  }
  return true;
}

bool attn::runtime::runRanksBackwardInProcess(
    Package &pkg, const Tensor &q, const Tensor &k, const Tensor &v,
    const Tensor *lengths, const Tensor &out, const Tensor &lse,
    const Tensor &gradOut, Tensor &dq, Tensor &dk, Tensor &dv,
    std::vector<RingStats> &stats, std::string &error) {
  const RingProgram *ring = pkg.ring();
  if (!ring) {
    error = "package " + pkg.name() + " is not a ring package";
    return false;
  }
  if (!pkg.hasBackward()) {
    error = "package " + pkg.name() + " has no backward pass (compile it "
            "with \"backward\": true)";
    return false;
  }
  if (!checkWholeSequence(*ring, {{"q", &q, false},
                                  {"k", &k, true},
                                  {"v", &v, true},
                                  {"out", &out, false},
                                  {"grad_out", &gradOut, false},
                                  {"dq", &dq, false},
                                  {"dk", &dk, true},
                                  {"dv", &dv, true}},
                          error))
    return false;
  if (lse.dtype != "f32" || lse.shape.size() != 3 ||
      lse.shape[2] != ring->qLen ||
      stridesOf(lse) != contiguousStrides(lse.shape)) {
    error = "lse: expected the forward's contiguous float32 [B, H, " +
            std::to_string(ring->qLen) + "] lse of the whole sequence";
    return false;
  }
  const int64_t N = ring->ranks, C = ring->qChunk, Ck = ring->kvChunk;
  const int64_t B = q.shape[0], H = q.shape[1], Hkv = k.shape[1],
                D = q.shape[3];
  if (pkg.isGpu()) {
    stats.assign(N, RingStats());
    return runGpuRankThreads(
        pkg,
        [&](Package &p, Transport &t, std::string &err) {
          return runRankBackwardFromHost(
              p, t, q, k, v, lengths, out, lse, gradOut,
              static_cast<float *>(dq.data), static_cast<float *>(dk.data),
              static_cast<float *>(dv.data), stats[t.rank()], err);
        },
        error);
  }
  // Every rank's chunks: inputs cut from the whole sequence, gradients
  // poisoned so that rows a rank never writes show.
  struct Local {
    std::vector<float> q, k, v, out, lse, gradOut, dq, dk, dv;
  };
  std::vector<Local> locals(N);
  auto cut = [&](int64_t r, bool keys, int64_t outer, int64_t inner,
                 const Tensor &whole, std::vector<float> &local) {
    local.resize(outer * (keys ? Ck : C) * inner);
    moveRows(*ring, r, keys, outer, inner, static_cast<float *>(whole.data),
             local.data(), true);
  };
  for (int64_t r = 0; r < N; ++r) {
    Local &l = locals[r];
    cut(r, false, B * H, D, q, l.q);
    cut(r, true, B * Hkv, D, k, l.k);
    cut(r, true, B * Hkv, D, v, l.v);
    cut(r, false, B * H, D, out, l.out);
    cut(r, false, B * H, 1, lse, l.lse);
    cut(r, false, B * H, D, gradOut, l.gradOut);
    l.dq.assign(l.q.size(), std::nanf(""));
    l.dk.assign(l.k.size(), std::nanf(""));
    l.dv.assign(l.v.size(), std::nanf(""));
  }
  stats.assign(N, RingStats());
  bool ok = runRankThreads(
      N,
      [&](int64_t r, Transport &t, std::string &err) {
        Local &l = locals[r];
        auto rows = [&](std::vector<float> &data, bool keys) {
          return Tensor{data.data(), {B, keys ? Hkv : H, keys ? Ck : C, D},
                        "f32"};
        };
        Tensor lq = rows(l.q, false), lk = rows(l.k, true),
               lv = rows(l.v, true), lo = rows(l.out, false),
               lg = rows(l.gradOut, false), gq = rows(l.dq, false),
               gk = rows(l.dk, true), gv = rows(l.dv, true);
        Tensor ll{l.lse.data(), {B, H, C}, "f32"};
        return pkg.runRankBackward(t, lq, lk, lv, lengths, lo, ll, lg, gq, gk,
                                   gv, &stats[r], err);
      },
      error);
  if (!ok)
    return false;
  for (int64_t r = 0; r < N; ++r) {
    moveRows(*ring, r, false, B * H, D, static_cast<float *>(dq.data),
             locals[r].dq.data(), false);
    moveRows(*ring, r, true, B * Hkv, D, static_cast<float *>(dk.data),
             locals[r].dk.data(), false);
    moveRows(*ring, r, true, B * Hkv, D, static_cast<float *>(dv.data),
             locals[r].dv.data(), false);
  }
  return true;
}
