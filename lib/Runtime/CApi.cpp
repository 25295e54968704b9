//===- CApi.cpp - the runtime's C API -------------------------------------===//
//
// Thin C wrappers over attn::runtime::Package with a thread-local last error.
//
//===----------------------------------------------------------------------===//

#include "attn-c/attn.h"
#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Exchange.h"
#include "attn/Runtime/Package.h"
#include "attn/Runtime/Ring.h"

#include <cstring>
#include <string>

using attn::runtime::Package;
using attn::runtime::Tensor;

struct attn_package {
  std::unique_ptr<Package> impl;
  std::unique_ptr<attn::runtime::Transport> transport; ///< after join
};

static thread_local std::string lastError;

static attn_status failWith(attn_status status, const std::string &message) {
  lastError = message;
  return status;
}

static bool toTensor(const attn_tensor *t, const char *name, Tensor &out) {
  if (!t || !t->shape || t->rank < 0 || t->rank > 8) {
    lastError = std::string(name) + ": missing tensor or bad rank";
    return false;
  }
  out.data = t->data;
  out.shape.assign(t->shape, t->shape + t->rank);
  out.strides.clear();
  if (t->strides)
    out.strides.assign(t->strides, t->strides + t->rank);
  out.dtype = t->dtype == ATTN_F32    ? "f32"
              : t->dtype == ATTN_I32  ? "i32"
              : t->dtype == ATTN_BF16 ? "bf16"
              : t->dtype == ATTN_F16  ? "f16"
                                      : "?";
  return true;
}

/// The C tensors of a run as runtime tensors (lengths and lse optional).
struct RunTensors {
  Tensor q, k, v, lengths, out, lse;
  bool hasLengths = false, hasLse = false;
  Tensor *lengthsOrNull() { return hasLengths ? &lengths : nullptr; }
  Tensor *lseOrNull() { return hasLse ? &lse : nullptr; }
};

static bool toRunTensors(const attn_tensor *q, const attn_tensor *k,
                         const attn_tensor *v, const attn_tensor *lengths,
                         const attn_tensor *out, const attn_tensor *lse,
                         RunTensors &t) {
  t.hasLengths = lengths != nullptr;
  t.hasLse = lse != nullptr;
  return toTensor(q, "q", t.q) && toTensor(k, "k", t.k) &&
         toTensor(v, "v", t.v) && toTensor(out, "out", t.out) &&
         (!lengths || toTensor(lengths, "lengths", t.lengths)) &&
         (!lse || toTensor(lse, "lse", t.lse));
}

extern "C" {

attn_status attn_package_load(const char *path, attn_package **out) {
  if (!path || !out)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_load: null argument");
  std::string error;
  auto pkg = Package::load(path, error);
  if (!pkg)
    return failWith(error.find("cannot open") != std::string::npos
                        ? ATTN_ERROR_IO
                        : ATTN_ERROR_PACKAGE,
                    error);
  *out = new attn_package{std::move(pkg)};
  return ATTN_OK;
}

void attn_package_free(attn_package *package) { delete package; }

const char *attn_package_target(const attn_package *package) {
  return package ? package->impl->target().c_str() : "";
}
int attn_package_device(const attn_package *package) {
  return package ? package->impl->device() : -1;
}
int attn_package_uses_lengths(const attn_package *package) {
  return package && package->impl->usesLengths();
}
int attn_package_uses_key_bias(const attn_package *package) {
  return package && package->impl->usesKeyBias();
}
int attn_package_uses_key_ids(const attn_package *package) {
  return package && package->impl->usesKeyIds();
}
int attn_package_has_lse(const attn_package *package) {
  return package && package->impl->hasLse();
}

/// After a GPU package's work was queued on `stream`: waits for it where the
/// call is synchronous (`wait`), naming `what` ran if it failed.
static attn_status finishOnStream(const attn_package *package, void *stream,
                                  bool wait, const std::string &what) {
  if (!wait || !package->impl->isGpu())
    return ATTN_OK;
  std::string error;
  const attn::runtime::cuda::Driver *d = attn::runtime::cuda::driver(error);
  attn::runtime::cuda::CUresult rc = d->cuStreamSynchronize(
      static_cast<attn::runtime::cuda::CUstream>(stream));
  if (rc != attn::runtime::cuda::CUDA_SUCCESS)
    return failWith(ATTN_ERROR_RUNTIME,
                    attn::runtime::cuda::describe(*d, rc, "running " + what));
  return ATTN_OK;
}

static attn_status runPackage(attn_package *package, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v,
                              const attn_tensor *lengths, attn_tensor *out,
                              attn_tensor *lse, void *stream, bool wait,
                              const attn_tensor *keyBias = nullptr,
                              const attn_tensor *keyIds = nullptr) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_run: null package");
  RunTensors t;
  if (!toRunTensors(q, k, v, lengths, out, lse, t))
    return ATTN_ERROR_ARGUMENT;
  Tensor bias, ids;
  if (keyBias && !toTensor(keyBias, "key_bias", bias))
    return ATTN_ERROR_ARGUMENT;
  if (keyIds && !toTensor(keyIds, "key_ids", ids))
    return ATTN_ERROR_ARGUMENT;
  std::string error;
  if (!package->impl->run(t.q, t.k, t.v, t.lengthsOrNull(), t.out,
                          t.lseOrNull(), error, stream,
                          {keyBias ? &bias : nullptr, keyIds ? &ids : nullptr}))
    return failWith(error.find("failed:") != std::string::npos
                        ? ATTN_ERROR_RUNTIME
                        : ATTN_ERROR_ARGUMENT,
                    error);
  return finishOnStream(package, stream, wait, package->impl->name());
}

attn_status attn_package_run(attn_package *package, const attn_tensor *q,
                             const attn_tensor *k, const attn_tensor *v,
                             const attn_tensor *lengths, attn_tensor *out,
                             attn_tensor *lse) {
  return runPackage(package, q, k, v, lengths, out, lse, nullptr, true);
}

attn_status attn_package_run_biased(attn_package *package, const attn_tensor *q,
                                    const attn_tensor *k, const attn_tensor *v,
                                    const attn_tensor *lengths,
                                    const attn_tensor *key_bias,
                                    attn_tensor *out, attn_tensor *lse) {
  if (!key_bias)
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_package_run_biased: null key_bias (use "
                    "attn_package_run)");
  return runPackage(package, q, k, v, lengths, out, lse, nullptr, true,
                    key_bias);
}

attn_status attn_package_run_keys(attn_package *package, const attn_tensor *q,
                                  const attn_tensor *k, const attn_tensor *v,
                                  const attn_tensor *lengths,
                                  const attn_tensor *key_bias,
                                  const attn_tensor *key_ids, attn_tensor *out,
                                  attn_tensor *lse, void *stream) {
  bool gpu = package && package->impl->isGpu();
  return runPackage(package, q, k, v, lengths, out, lse, stream,
                    /*wait=*/!gpu, key_bias, key_ids);
}

int64_t attn_package_dedup_max_len(const attn_package *package) {
  return package ? package->impl->dedupMaxLen() : 0;
}

attn_status attn_package_dedup_keys(attn_package *package, const int64_t *tokens,
                                    const int64_t *lengths, int64_t batch,
                                    int64_t seq_len, int32_t *key_ids,
                                    float *key_bias, int64_t *slot_at,
                                    int64_t *info, void *stream) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_dedup_keys: null package");
  attn::runtime::Package::DedupKeys args;
  args.tokens = tokens;
  args.lengths = lengths;
  args.keyIds = key_ids;
  args.keyBias = key_bias;
  args.slotAt = slot_at;
  args.info = info;
  args.batch = batch;
  args.seqLen = seq_len;
  std::string error;
  if (!package->impl->dedupKeys(args, error, stream))
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_dedup_keys: " + error);
  return ATTN_OK;
}

int attn_package_has_backward(const attn_package *package) {
  return package && package->impl->hasBackward();
}

int attn_package_stores_gradients(const attn_package *package) {
  return package && package->impl->storesGradients();
}

int attn_package_finishes_gradients(const attn_package *package) {
  return package && package->impl->finishesGradients();
}

namespace {
/// The C tensors of a backward call (lengths and key_bias may be null).
struct BackwardTensors {
  Tensor q, k, v, out, lse, gradOut, lengths, keyBias, dq, dk, dv;
  bool hasLengths = false, hasKeyBias = false;
  const Tensor *lengthsOrNull() const { return hasLengths ? &lengths : nullptr; }
  const Tensor *keyBiasOrNull() const { return hasKeyBias ? &keyBias : nullptr; }
};

/// Converts (and checks) a backward call's tensors; false after failWith.
bool toBackwardTensors(const attn_tensor *q, const attn_tensor *k,
                       const attn_tensor *v, const attn_tensor *out,
                       const attn_tensor *lse, const attn_tensor *grad_out,
                       const attn_tensor *lengths, const attn_tensor *key_bias,
                       attn_tensor *dq, attn_tensor *dk, attn_tensor *dv,
                       BackwardTensors &t) {
  t.hasLengths = lengths != nullptr;
  t.hasKeyBias = key_bias != nullptr;
  return toTensor(q, "q", t.q) && toTensor(k, "k", t.k) &&
         toTensor(v, "v", t.v) && toTensor(out, "out", t.out) &&
         toTensor(lse, "lse", t.lse) &&
         toTensor(grad_out, "grad_out", t.gradOut) &&
         toTensor(dq, "dq", t.dq) && toTensor(dk, "dk", t.dk) &&
         toTensor(dv, "dv", t.dv) &&
         (!lengths || toTensor(lengths, "lengths", t.lengths)) &&
         (!key_bias || toTensor(key_bias, "key_bias", t.keyBias));
}
} // namespace

static attn_status runBackward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv, void *stream, bool wait, const char *what,
    attn_tensor *const *sums = nullptr) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT, std::string(what) + ": null package");
  BackwardTensors t;
  if (!toBackwardTensors(q, k, v, out, lse, grad_out, lengths, key_bias, dq, dk,
                         dv, t))
    return ATTN_ERROR_ARGUMENT;
  Tensor sumTensors[3];
  const char *sumNames[3] = {"dq_sum", "dk_sum", "dv_sum"};
  for (int i = 0; sums && i < 3; ++i)
    if (!toTensor(sums[i], sumNames[i], sumTensors[i]))
      return ATTN_ERROR_ARGUMENT;
  std::string error;
  if (!package->impl->runBackward(t.q, t.k, t.v, t.out, t.lse, t.gradOut,
                                  t.lengthsOrNull(), t.keyBiasOrNull(), t.dq,
                                  t.dk, t.dv, error, stream,
                                  sums ? sumTensors : nullptr))
    return failWith(error.find("failed:") != std::string::npos
                        ? ATTN_ERROR_RUNTIME
                        : ATTN_ERROR_ARGUMENT,
                    error);
  return finishOnStream(package, stream, wait,
                        "the backward pass of " + package->impl->name());
}

attn_status attn_package_run_backward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv) {
  return runBackward(package, q, k, v, out, lse, grad_out, lengths, key_bias,
                     dq, dk, dv, nullptr, /*wait=*/true,
                     "attn_package_run_backward");
}

attn_status attn_package_run_backward_async(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv, void *stream) {
  if (package && !package->impl->isGpu())
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_package_run_backward_async: package " +
                        package->impl->name() +
                        " targets cpu; use attn_package_run_backward");
  return runBackward(package, q, k, v, out, lse, grad_out, lengths, key_bias,
                     dq, dk, dv, stream, /*wait=*/false,
                     "attn_package_run_backward_async");
}

attn_status attn_package_run_backward_with_sums_async(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv, attn_tensor *dq_sum, attn_tensor *dk_sum,
    attn_tensor *dv_sum, void *stream) {
  const char *what = "attn_package_run_backward_with_sums_async";
  if (package && !package->impl->isGpu())
    return failWith(ATTN_ERROR_ARGUMENT,
                    std::string(what) + ": package " + package->impl->name() +
                        " targets cpu; use attn_package_run_backward");
  attn_tensor *sums[3] = {dq_sum, dk_sum, dv_sum};
  for (attn_tensor *s : sums)
    if (!s)
      return failWith(ATTN_ERROR_ARGUMENT,
                      std::string(what) + ": null sum tensor");
  return runBackward(package, q, k, v, out, lse, grad_out, lengths, key_bias,
                     dq, dk, dv, stream, /*wait=*/false, what, sums);
}

attn_status attn_package_run_async(attn_package *package, const attn_tensor *q,
                                   const attn_tensor *k, const attn_tensor *v,
                                   const attn_tensor *lengths, attn_tensor *out,
                                   attn_tensor *lse, void *stream) {
  if (package && !package->impl->isGpu())
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_package_run_async: package " + package->impl->name() +
                        " targets cpu; use attn_package_run");
  return runPackage(package, q, k, v, lengths, out, lse, stream, false);
}

int64_t attn_package_ranks(const attn_package *package) {
  return package && package->impl->ring() ? package->impl->ring()->ranks : 0;
}

namespace {
/// attn_package_rank_positions (keys = false) and
/// attn_package_rank_key_positions (keys = true).
int64_t rankRows(const char *fn, const attn_package *package, int64_t rank,
                 int64_t *positions, bool keys) {
  const attn::runtime::RingProgram *ring =
      package ? package->impl->ring() : nullptr;
  if (!ring) {
    failWith(ATTN_ERROR_ARGUMENT,
             std::string(fn) + ": " +
                 (package ? "package " + package->impl->name() +
                                " is not distributed (no \"distribution\" "
                                "section in its spec)"
                          : std::string("null package")));
    return -1;
  }
  if (rank < 0 || rank >= ring->ranks) {
    failWith(ATTN_ERROR_ARGUMENT,
             std::string(fn) + ": rank " + std::to_string(rank) +
                 " is outside [0, " + std::to_string(ring->ranks) + ")");
    return -1;
  }
  const int64_t rows = keys ? ring->kvChunk : ring->qChunk;
  if (positions)
    for (int64_t row = 0; row < rows; ++row)
      positions[row] = ring->globalRow(rank, row, keys);
  return rows;
}
} // namespace

int64_t attn_package_rank_positions(const attn_package *package, int64_t rank,
                                    int64_t *positions) {
  return rankRows("attn_package_rank_positions", package, rank, positions,
                  false);
}

int64_t attn_package_rank_key_positions(const attn_package *package,
                                        int64_t rank, int64_t *positions) {
  return rankRows("attn_package_rank_key_positions", package, rank, positions,
                  true);
}

attn_status attn_package_run_ranks(attn_package *package, const attn_tensor *q,
                                   const attn_tensor *k, const attn_tensor *v,
                                   const attn_tensor *lengths, attn_tensor *out,
                                   attn_tensor *lse, int64_t *bytes_sent) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_run_ranks: null package");
  RunTensors t;
  if (!toRunTensors(q, k, v, lengths, out, lse, t))
    return ATTN_ERROR_ARGUMENT;
  std::string error;
  std::vector<attn::runtime::RingStats> stats;
  if (!attn::runtime::runRanksInProcess(*package->impl, t.q, t.k, t.v,
                                        t.lengthsOrNull(), t.out, t.lseOrNull(),
                                        stats, error))
    return failWith(ATTN_ERROR_RUNTIME, error);
  if (bytes_sent)
    for (size_t r = 0; r < stats.size(); ++r)
      bytes_sent[r] = stats[r].bytesSent;
  return ATTN_OK;
}

attn_status attn_package_run_ranks_backward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths, attn_tensor *dq,
    attn_tensor *dk, attn_tensor *dv, int64_t *bytes_sent) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_package_run_ranks_backward: null package");
  BackwardTensors t;
  if (!toBackwardTensors(q, k, v, out, lse, grad_out, lengths, nullptr, dq, dk,
                         dv, t))
    return ATTN_ERROR_ARGUMENT;
  std::string error;
  std::vector<attn::runtime::RingStats> stats;
  if (!attn::runtime::runRanksBackwardInProcess(
          *package->impl, t.q, t.k, t.v, t.lengthsOrNull(), t.out, t.lse,
          t.gradOut, t.dq, t.dk, t.dv, stats, error))
    return failWith(ATTN_ERROR_RUNTIME, error);
  if (bytes_sent)
    for (size_t r = 0; r < stats.size(); ++r)
      bytes_sent[r] = stats[r].bytesSent;
  return ATTN_OK;
}

attn_status attn_nccl_unique_id(char id[128]) {
  attn::runtime::NcclId nid;
  std::string error;
  if (!id)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_nccl_unique_id: null id");
  if (!attn::runtime::ncclUniqueId(nid, error))
    return failWith(ATTN_ERROR_RUNTIME, error);
  std::memcpy(id, nid.bytes, sizeof(nid.bytes));
  return ATTN_OK;
}

attn_status attn_package_join(attn_package *package, int rank, int nranks,
                              const char id[128]) {
  if (!package || !id)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_join: null argument");
  const attn::runtime::RingProgram *ring = package->impl->ring();
  if (!ring)
    return failWith(ATTN_ERROR_ARGUMENT,
                    "package " + package->impl->name() + " is not a ring package");
  if (nranks != ring->ranks || rank < 0 || rank >= nranks)
    return failWith(ATTN_ERROR_ARGUMENT,
                    "package " + package->impl->name() + " is compiled for " +
                        std::to_string(ring->ranks) + " ranks; joined as rank " +
                        std::to_string(rank) + " of " + std::to_string(nranks));
  attn::runtime::NcclId nid;
  std::memcpy(nid.bytes, id, sizeof(nid.bytes));
  std::string error;
  package->transport = attn::runtime::ncclTransport(
      rank, nranks, nid, package->impl->name() + ":" + package->impl->specJson(),
      error);
  if (!package->transport)
    return failWith(ATTN_ERROR_RUNTIME, error);
  return ATTN_OK;
}

attn_status attn_package_run_rank(attn_package *package, const attn_tensor *q,
                                  const attn_tensor *k, const attn_tensor *v,
                                  const attn_tensor *lengths, attn_tensor *out,
                                  attn_tensor *lse, void *stream,
                                  int64_t *bytes_sent) {
  if (!package || !package->transport)
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_package_run_rank: join the ring first (attn_package_join)");
  RunTensors t;
  if (!toRunTensors(q, k, v, lengths, out, lse, t))
    return ATTN_ERROR_ARGUMENT;
  std::string error;
  attn::runtime::RingStats stats;
  if (!package->impl->runRank(*package->transport, t.q, t.k, t.v,
                              t.lengthsOrNull(), t.out, t.lseOrNull(), &stats,
                              error, stream))
    return failWith(ATTN_ERROR_RUNTIME, error);
  if (bytes_sent)
    *bytes_sent = stats.bytesSent;
  return ATTN_OK;
}

attn_status attn_package_run_rank_backward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths, attn_tensor *dq,
    attn_tensor *dk, attn_tensor *dv, void *stream, int64_t *bytes_sent) {
  if (!package || !package->transport)
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_package_run_rank_backward: join the ring first "
                    "(attn_package_join)");
  BackwardTensors t;
  if (!toBackwardTensors(q, k, v, out, lse, grad_out, lengths, nullptr, dq, dk,
                         dv, t))
    return ATTN_ERROR_ARGUMENT;
  std::string error;
  attn::runtime::RingStats stats;
  if (!package->impl->runRankBackward(*package->transport, t.q, t.k, t.v,
                                      t.lengthsOrNull(), t.out, t.lse,
                                      t.gradOut, t.dq, t.dk, t.dv, &stats,
                                      error, stream))
    return failWith(ATTN_ERROR_RUNTIME, error);
  if (bytes_sent)
    *bytes_sent = stats.bytesSent;
  return ATTN_OK;
}

attn_status attn_package_wait_rank(attn_package *package, void *stream,
                                   double timeout_seconds) {
  if (!package || !package->transport)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_wait_rank: not joined");
  std::string error;
  if (!package->impl->waitRank(*package->transport, stream, timeout_seconds,
                               error))
    return failWith(ATTN_ERROR_RUNTIME, error);
  return ATTN_OK;
}

int attn_package_step_ms(attn_package *package, float *ms, int capacity) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_step_ms: null package"), -1;
  std::vector<float> times;
  std::string error;
  if (!package->impl->stepMilliseconds(times, error))
    return failWith(ATTN_ERROR_RUNTIME, error), -1;
  for (int i = 0; i < capacity && i < int(times.size()); ++i)
    ms[i] = times[i];
  return int(times.size());
}

const char *attn_last_error(void) { return lastError.c_str(); }

} // extern "C"

//===----------------------------------------------------------------------===//
// Exchange groups (distributed tokenized attention)
//===----------------------------------------------------------------------===//

struct attn_hub {
  attn::runtime::InProcessHub hub;
  explicit attn_hub(int ranks, double timeout) : hub(ranks, timeout) {}
};

struct attn_member {
  std::unique_ptr<attn::runtime::Transport> transport;
  bool device = false; ///< NCCL: buffers are device memory
  int64_t calls = 0;   ///< all-to-alls so far (their tags)
};

attn_status attn_hub_create(int ranks, double timeout_seconds, attn_hub **out) {
  if (!out || ranks < 1 || !(timeout_seconds > 0))
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_hub_create: need ranks >= 1, a positive timeout and "
                    "an output pointer");
  *out = new attn_hub(ranks, timeout_seconds);
  return ATTN_OK;
}

void attn_hub_free(attn_hub *hub) { delete hub; }

attn_status attn_hub_member(attn_hub *hub, int rank, attn_member **out) {
  if (!hub || !out)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_hub_member: null argument");
  auto member = std::make_unique<attn_member>();
  member->transport = hub->hub.transport(rank);
  if (rank < 0 || rank >= member->transport->size())
    return failWith(ATTN_ERROR_ARGUMENT,
                    "attn_hub_member: rank " + std::to_string(rank) +
                        " outside [0, " +
                        std::to_string(member->transport->size()) + ")");
  *out = member.release();
  return ATTN_OK;
}

attn_status attn_nccl_member(int rank, int nranks, const char id[128],
                             const char *group_name, attn_member **out) {
  if (!id || !out || !group_name)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_nccl_member: null argument");
  if (rank < 0 || rank >= nranks)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_nccl_member: rank " +
                                             std::to_string(rank) + " of " +
                                             std::to_string(nranks));
  attn::runtime::NcclId nid;
  std::memcpy(nid.bytes, id, sizeof(nid.bytes));
  std::string error;
  auto member = std::make_unique<attn_member>();
  member->transport =
      attn::runtime::ncclTransport(rank, nranks, nid, group_name, error);
  if (!member->transport)
    return failWith(ATTN_ERROR_RUNTIME, error);
  member->device = true;
  *out = member.release();
  return ATTN_OK;
}

void attn_member_free(attn_member *member) { delete member; }

attn_status attn_all_to_all(attn_member *member, const void *send,
                            const int64_t *send_bytes, void *recv,
                            const int64_t *recv_bytes, void *stream) {
  if (!member || !send_bytes || !recv_bytes)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_all_to_all: null argument");
  const int n = member->transport->size();
  std::vector<int64_t> s(send_bytes, send_bytes + n), r(recv_bytes, recv_bytes + n);
  std::string error;
  if (!attn::runtime::allToAll(*member->transport, member->calls++, send, s,
                               recv, r, member->device, stream, error))
    return failWith(ATTN_ERROR_RUNTIME, error);
  return ATTN_OK;
}
