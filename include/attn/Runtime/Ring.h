//===- Ring.h - run ring-attention packages across ranks --------*- C++ -*-===//
//
// A ring package (attn-compile on a spec with a `distribution` section)
// carries its schedule in manifest.json: for every rank its pieces of the
// sequence and its steps, each an optional exchange of key/value rows with
// two peers and a list of component updates. The runtime executes the
// schedule of one rank over a Transport that moves the rows: the in-process
// transport here (threads standing for ranks; what CI runs) or NCCL.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_RUNTIME_RING_H
#define ATTN_RUNTIME_RING_H

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace attn::runtime {

class Package;
struct Tensor;

/// `count` runs of `len` rows, `pitch` rows apart, from `start`.
struct RowRun {
  int64_t start = 0, len = 0, count = 1, pitch = 0;
};
using RowSet = std::vector<RowRun>;

/// Rows of a set of runs.
int64_t rowCount(const RowSet &set);
/// Rows moved for `sets` (one per kv head, or one for all `kvHeads`).
int64_t packedRowCount(const std::vector<RowSet> &sets, int64_t kvHeads);

/// One kernel run: query piece against key piece, groups at the origins,
/// lengths and filters at positions qPos + stride * row, kPos + stride * key.
struct RingUpdate {
  int64_t kernel = 0, qPiece = 0, kPiece = 0, qOrigin = 0, kOrigin = 0;
  int64_t qPos = 0, kPos = 0, stride = 1;
};

struct RingStep {
  int64_t step = 0;
  int sendTo = -1, recvFrom = -1;
  /// Rows per kv head, or one set for every kv head.
  std::vector<RowSet> sendRows, recvRows;
  std::vector<RingUpdate> updates;
};

struct RingPiece {
  int64_t offset = 0, rows = 0, origin = 0;
};

struct RankSchedule {
  /// The rank's query rows (q, out, lse) and key rows (k, v).
  std::vector<RingPiece> qPieces, kvPieces;
  std::vector<RingStep> steps;
  int64_t rowsSent = 0;
};

/// The manifest's "ring" section.
struct RingProgram {
  int64_t ranks = 1, kvHeads = 1;
  /// Query and key rows of the whole sequence and of one rank (they differ
  /// for cross attention).
  int64_t qLen = 0, kvLen = 0, qChunk = 0, kvChunk = 0;
  std::string layout, kv;
  std::vector<RankSchedule> schedule;

  /// Global index of local query row `row` of `rank` (key rows: `keys`).
  int64_t globalRow(int64_t rank, int64_t row, bool keys = false) const;
};

/// What one rank did: bytes it sent (K and V) and time per step.
struct RingStats {
  int rank = 0;
  int64_t bytesSent = 0, expectedBytes = 0;
  struct Step {
    int64_t step = 0, bytesSent = 0, updates = 0;
    double seconds = 0;
  };
  std::vector<Step> steps;
  double seconds = 0;
};

/// The transport's step number for the gradient exchange of ring step
/// `step` in the backward pass: a key of its own, apart from the step's
/// key/value rows.
inline int64_t gradientStep(int64_t step) { return -1 - step; }
/// "step 3", or for a gradient exchange "the gradient exchange of step 3".
std::string ringStepName(int64_t step);

/// Moves the rows of one ring step between this rank and two peers.
class Transport {
public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Sends `sendBytes` at `send` to rank `to` (none when to < 0) and
  /// receives `recvBytes` into `recv` from rank `from` (none when from < 0),
  /// as ring step `step`. Returns false and sets `error` on failure
  /// (a timeout or a failed peer), never hangs.
  virtual bool exchange(int64_t step, int to, const void *send,
                        size_t sendBytes, int from, void *recv,
                        size_t recvBytes, std::string &error) = 0;
  /// The same for device memory (GPU packages): queued on the CUstream
  /// `stream` without waiting. Transports that move host memory only refuse.
  virtual bool exchangeDevice(int64_t step, int to, uint64_t send,
                              size_t sendBytes, int from, uint64_t recv,
                              size_t recvBytes, void *stream,
                              std::string &error) {
    error = "this transport moves host memory only; GPU ring packages need "
            "the NCCL transport";
    return false;
  }
  /// Whether queued device exchanges failed (a dead peer): sets `error`.
  virtual bool deviceError(std::string &error) { return false; }
  /// Tells the peers that this rank failed, so that none waits for it.
  virtual void abort(const std::string &why) {}
};

/// Threads standing for ranks: messages go through shared mailboxes. Its
/// transports move host memory, and device memory between ranks that share
/// one GPU and CUDA context (synchronous device-to-device copies): GPU ring
/// packages then run every rank on one GPU, to check them where no second
/// GPU is at hand.
class InProcessHub {
public:
  /// `timeoutSeconds` bounds every wait for a peer.
  explicit InProcessHub(int ranks, double timeoutSeconds = 60);
  ~InProcessHub();
  std::unique_ptr<Transport> transport(int rank);

  struct State; ///< mailboxes shared by the ranks' transports (Ring.cpp)

private:
  std::shared_ptr<State> state_;
};

/// NCCL's 128-byte unique id: made once (rank 0) and given to every rank.
struct NcclId {
  char bytes[128] = {0};
};
/// ncclGetUniqueId (opens libnccl.so.2 on first use).
bool ncclUniqueId(NcclId &id, std::string &error);
/// A transport over NCCL for rank `rank` of `ranks` (device memory; the
/// calling thread's CUDA context picks the GPU). `packageId` identifies the
/// package: ranks that run different packages fail at start-up, naming both.
std::unique_ptr<Transport> ncclTransport(int rank, int ranks, const NcclId &id,
                                         const std::string &packageId,
                                         std::string &error);

/// Runs `pkg` (a ring package) on global tensors q [B,H,Lq,D], k/v
/// [B,Hkv,Lk,D] with one thread per rank over an InProcessHub: splits the
/// rows by the package's layout, runs every rank's schedule and gathers out
/// [B,H,Lq,D] and lse [B,H,Lq] (may be null). Fills one RingStats per rank.
/// GPU ring packages run every rank on the package's GPU (each rank with
/// its own copy of the package, loaded from its directory), through
/// runRankFromHost.
bool runRanksInProcess(Package &pkg, const Tensor &q, const Tensor &k,
                       const Tensor &v, const Tensor *lengths, Tensor &out,
                       Tensor *lse, std::vector<RingStats> &stats,
                       std::string &error);

/// The backward pass of a ring package compiled with "backward": true (CPU
/// target), one thread per rank: from the whole sequence's q, k, v, the
/// forward's out and lse, and grad_out (float32, contiguous), writes dq, dk
/// and dv of the whole sequence (shaped like q, k and v). Fills one
/// RingStats per rank (key/value rows out and their gradients back).
bool runRanksBackwardInProcess(Package &pkg, const Tensor &q, const Tensor &k,
                               const Tensor &v, const Tensor *lengths,
                               const Tensor &out, const Tensor &lse,
                               const Tensor &gradOut, Tensor &dq, Tensor &dk,
                               Tensor &dv, std::vector<RingStats> &stats,
                               std::string &error);

/// Runs rank transport.rank() of GPU ring package `pkg` on the whole
/// sequence's float32 host tensors q [B,H,Lq,D], k, v [B,Hkv,Lk,D] (lengths:
/// host int32 [B] or null), in the calling thread's CUDA context: uploads
/// the rank's rows in the package's 16-bit dtype, runs `repeat` times
/// (the best time, CUDA events, in `bestMs`) and writes the rank's rows of
/// out [B,H,Lq,D] and, when not null, lse [B,H,Lq] (host float32). Rows of
/// other ranks are left as they are. What attn-run --nranks runs in each
/// process (NCCL) and runRanksInProcess in each thread (one GPU).
bool runRankFromHost(Package &pkg, Transport &transport, const Tensor &q,
                     const Tensor &k, const Tensor &v, const Tensor *lengths,
                     float *out, float *lse, int repeat, RingStats &stats,
                     float &bestMs, std::string &error);

/// The backward pass of rank transport.rank() of a GPU ring package on the
/// whole sequence's float32 host tensors (q, k, v, the forward's out and lse,
/// grad_out; lengths: host int32 [B] or null), in the calling thread's CUDA
/// context: uploads the rank's rows, runs runRankBackward and writes the
/// rank's rows of dq [B,H,Lq,D], dk and dv [B,Hkv,Lk,D] (host float32).
/// What runRanksBackwardInProcess runs in each thread (one GPU).
bool runRankBackwardFromHost(Package &pkg, Transport &transport,
                             const Tensor &q, const Tensor &k, const Tensor &v,
                             const Tensor *lengths, const Tensor &out,
                             const Tensor &lse, const Tensor &gradOut,
                             float *dq, float *dk, float *dv, RingStats &stats,
                             std::string &error);

} // namespace attn::runtime

#endif // ATTN_RUNTIME_RING_H
