//===- Package.h - load and run compiled attention packages -----*- C++ -*-===//
//
// The runtime's C++ core (no MLIR or LLVM): reads manifest.json, checks every
// tensor against the manifest's argument layout, and runs the kernels: a CPU
// package's shared object through MLIR's C memref-descriptor interface, a GPU
// package's cubin through the CUDA driver API (GpuPackage.cpp).
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_RUNTIME_PACKAGE_H
#define ATTN_RUNTIME_PACKAGE_H

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace attn::runtime {

/// A caller-owned dense tensor.
struct Tensor {
  void *data = nullptr;
  std::vector<int64_t> shape;
  std::string dtype; ///< "f32", "bf16", "f16" or "i32"
  /// Element strides, one per dimension; empty: C-contiguous. GPU packages
  /// take strided q, k, v and out (each row's elements contiguous;
  /// docs/Package.md).
  std::vector<int64_t> strides;
};

/// The strides of a C-contiguous tensor of `shape`, in elements.
std::vector<int64_t> contiguousStrides(const std::vector<int64_t> &shape);
/// The element strides of `t`: its own, or the contiguous ones.
inline std::vector<int64_t> stridesOf(const Tensor &t) {
  return t.strides.empty() ? contiguousStrides(t.shape) : t.strides;
}

/// The optional per-key inputs of tokenized packages (docs/Tokenized.md):
/// a score bias [B, Lk] f32 and table row ids [B, Lk] i32.
struct KeyInputs {
  const Tensor *bias = nullptr;
  const Tensor *ids = nullptr;
};

struct GpuModule;   // GpuPackage.cpp
struct RingProgram; // Ring.h
struct RingStats;
class Transport;

/// One argument of the entry point, from the manifest.
struct ArgSpec {
  std::string name, role, dtype;
  std::vector<int64_t> shape; ///< -1 = dynamic
};

class Package {
public:
  ~Package();
  /// Loads the package in `dir`; on failure returns null and sets `error`.
  static std::unique_ptr<Package> load(const std::string &dir,
                                       std::string &error);

  /// Reads only the manifest: the target and the number of ranks (0 when
  /// the package is not distributed). Touches no GPU.
  static bool peek(const std::string &dir, std::string &target,
                   int64_t &ranks, std::string &error);

  const std::string &dir() const { return dir_; }
  const std::string &target() const { return target_; }
  const std::string &name() const { return name_; }
  const std::string &specJson() const { return specJson_; }
  const std::vector<ArgSpec> &args() const { return args_; }
  bool usesLengths() const;
  bool hasLse() const;
  bool isGpu() const { return target_ != "cpu"; }
  /// GPU packages: the device whose CUDA context (the caller's current one
  /// at load, or else device 0's primary context) holds the kernels; they
  /// run only in that context. -1 for cpu packages.
  int device() const;
  /// The ring schedule of a distributed package, else null.
  const RingProgram *ring() const { return ring_.get(); }

  /// Runs on q, k, v[, lengths] -> out[, lse]. `lengths` and `lse` may be
  /// null. Returns false and sets `error` on bad arguments or a failed
  /// launch. For GPU packages every data pointer is a device pointer and the
  /// kernels are queued on `stream` (a CUstream; null = the default stream)
  /// without waiting for them; lengths outside [0, Lk] are clamped on the
  /// device. For CPU packages `stream` is ignored and lengths are checked.
  /// `keys.bias` ([B, Lk] f32, added to every score of a key) is required by
  /// packages compiled with "key_bias": true and refused by the others;
  /// likewise `keys.ids` ([B, Lk] i32, "key_ids": true): k and v are then
  /// tables [1, Hkv, V, D] and key j of batch b is row ids[b, j] (checked
  /// to lie in [0, V) on the CPU; GPU kernels read rows outside as zeros).
  bool run(const Tensor &q, const Tensor &k, const Tensor &v,
           const Tensor *lengths, Tensor &out, Tensor *lse, std::string &error,
           void *stream = nullptr, KeyInputs keys = {});
  bool usesKeyBias() const;
  bool usesKeyIds() const;

  /// The device buffers of dedupKeys: tokens i64 [B, L] and lengths i64
  /// [B] in; keyIds i32, keyBias f32 and slotAt i64 [B, L] and info i64
  /// [B, 4] out (docs/Tokenized.md, "The dedup_keys kernel").
  struct DedupKeys {
    const void *tokens = nullptr, *lengths = nullptr;
    void *keyIds = nullptr, *keyBias = nullptr, *slotAt = nullptr,
         *info = nullptr;
    int64_t batch = 0, seqLen = 0;
  };
  /// GPU packages compiled with "key_ids": true: queues dedup_keys on
  /// `stream` (a CUstream; null: the default stream), which writes each
  /// sequence's unique ids ascending (keyIds, 0 past them), their log(count)
  /// (keyBias, -inf past them), each position's slot among them (slotAt,
  /// -1 past the length) and per sequence (unique ids, the length as
  /// given, smallest id, largest id) into info. Lengths are clamped to
  /// [0, L]; the caller checks info before it reads tables at the ids.
  bool dedupKeys(const DedupKeys &args, std::string &error,
                 void *stream = nullptr);
  /// The longest sequence dedupKeys takes; 0 without a dedup_keys kernel.
  int64_t dedupMaxLen() const;

  /// Whether the package was compiled with "backward": true.
  bool hasBackward() const { return !backwardArgs_.empty(); }
  /// Whether runBackward also takes dq, dk and dv of the input type, in any
  /// layout with contiguous rows, which the kernels store (one component
  /// writes every element once: the manifest's "stores_grads"), besides
  /// contiguous f32 ones, which they add into.
  bool storesGradients() const;
  /// Whether storing gradients of the input type also takes float32 sums
  /// (`sums`, below): the package has several components, and each element's
  /// last writer finishes it (the manifest's "finishes_grads";
  /// docs/Backward.md).
  bool finishesGradients() const;
  /// The backward pass (docs/Backward.md): from the forward's q, k, v[,
  /// lengths][, keyBias], its out and lse, and the gradient of out, writes
  /// dq, dk and dv (each shaped like its input, f32, contiguous; the CPU
  /// target takes f32 inputs throughout). For GPU packages every pointer is
  /// device memory and the work is queued on `stream` (a CUstream; null:
  /// the default stream) without waiting for it. Returns false and sets
  /// `error` on bad arguments or a package without a backward pass.
  /// Gradients of the input type in a package that finishesGradients()
  /// take `sums`: three contiguous f32 tensors shaped like q, k and v, where
  /// the components before the last add their shares (their contents
  /// afterwards are unspecified); null elsewhere.
  bool runBackward(const Tensor &q, const Tensor &k, const Tensor &v,
                   const Tensor &out, const Tensor &lse, const Tensor &gradOut,
                   const Tensor *lengths, const Tensor *keyBias, Tensor &dq,
                   Tensor &dk, Tensor &dv, std::string &error,
                   void *stream = nullptr, const Tensor *sums = nullptr);

  /// Runs this rank's part of a ring package (Ring.h) on its local chunk:
  /// q [B,H,C,D], k/v [B,Hkv,C,D] -> out [B,H,C,D][, lse [B,H,C]], with
  /// global lengths [B]. Rows travel over `transport`; `stats` (may be null)
  /// receives the bytes sent and the time per step.
  /// For GPU packages every pointer is device memory, the transport must
  /// move device memory (NCCL), and the work is queued on `stream` (a
  /// CUstream) and on a communication stream of the package; call
  /// waitRank to wait for it without hanging on a dead peer.
  bool runRank(Transport &transport, const Tensor &q, const Tensor &k,
               const Tensor &v, const Tensor *lengths, Tensor &out,
               Tensor *lse, RingStats *stats, std::string &error,
               void *stream = nullptr);
  /// The backward pass of this rank of a ring package compiled with
  /// "backward": true (CPU target): from the rank's chunks of q, k, v, the
  /// forward's out and lse, and grad_out, writes the rank's dq, dk and dv
  /// (f32, contiguous, shaped like q, k and v). Key/value rows travel over
  /// `transport` as in the forward, and the gradients of the rows a rank
  /// received travel back to their owner (docs/Ring.md). `stats` (may be
  /// null) counts the bytes of both.
  /// GPU ring packages: every pointer is device memory (q, k, v, out and
  /// grad_out in the package's 16-bit dtype, all contiguous), the transport
  /// moves device memory, and the work is queued on `stream` (a CUstream);
  /// call waitRank to wait for it.
  bool runRankBackward(Transport &transport, const Tensor &q, const Tensor &k,
                       const Tensor &v, const Tensor *lengths,
                       const Tensor &out, const Tensor &lse,
                       const Tensor &gradOut, Tensor &dq, Tensor &dk,
                       Tensor &dv, RingStats *stats, std::string &error,
                       void *stream = nullptr);
  /// Waits for the GPU work of runRank on `stream`, polling the transport
  /// for failed peers; gives up after `timeoutSeconds`.
  bool waitRank(Transport &transport, void *stream, double timeoutSeconds,
                std::string &error);
  /// GPU ring packages, after waitRank: milliseconds of each step of the
  /// last runRank on the compute stream (including waits for its rows).
  bool stepMilliseconds(std::vector<float> &ms, std::string &error);

private:
  Package();
  /// Whether the manifest lists an argument `name`.
  bool hasArg(const std::string &name) const;
  bool loadRing(const void *manifest, std::string &error);
  /// Whether this is a ring package and `transport` has its ranks.
  bool checkRingTransport(Transport &transport, std::string &error) const;
  /// Whether a backward call whose dq is `dq` stores the gradients in the
  /// input type (the package stores them and dq has q's dtype) rather than
  /// adding into float32 ones.
  bool storesGradientsInto(const Tensor &q, const Tensor &dq) const {
    return storesGradients() && dq.dtype == q.dtype;
  }
  /// grad_out like out, dq, dk and dv like q, k and v in the gradients'
  /// dtype; all contiguous.
  bool checkGradients(const Tensor &q, const Tensor &k, const Tensor &v,
                      const Tensor &out, const Tensor &gradOut,
                      const Tensor &dq, const Tensor &dk, const Tensor &dv,
                      std::string &error) const;
  bool runRankBackwardGpu(Transport &transport, const Tensor &q,
                          const Tensor &k, const Tensor &v,
                          const Tensor *lengths, const Tensor &out,
                          const Tensor &lse, const Tensor &gradOut,
                          Tensor &dq, Tensor &dk, Tensor &dv,
                          RingStats *stats, std::string &error, void *stream);
  bool runRankGpu(Transport &transport, const Tensor &q, const Tensor &k,
                  const Tensor &v, const Tensor *lengths, Tensor &out,
                  Tensor *lse, RingStats *stats, std::string &error,
                  void *stream);
  /// The tensors in the manifest's argument order.
  bool inManifestOrder(const Tensor &q, const Tensor &k, const Tensor &v,
                       const Tensor *lengths, const Tensor &out,
                       const Tensor *lse, std::vector<const Tensor *> &tensors,
                       std::string &error, KeyInputs keys = {}) const;
  bool checkArguments(const Tensor &q, const Tensor &k, const Tensor &v,
                      const Tensor *lengths, const Tensor &out,
                      const Tensor *lse, std::string &error,
                      KeyInputs keys = {}) const;
  /// Calls a CPU entry point with the memref descriptors of `tensors`.
  static bool callEntry(void *entry, const std::vector<const Tensor *> &tensors,
                        std::string &error);
  bool runCpu(const Tensor &q, const Tensor &k, const Tensor &v,
              const Tensor *lengths, Tensor &out, Tensor *lse,
              std::string &error, KeyInputs keys);
  bool loadGpu(const std::string &manifestPath, const void *manifest,
               std::string &error);
  bool runGpuBackward(const Tensor &q, const Tensor &k, const Tensor &v,
                      const Tensor &out, const Tensor &lse,
                      const Tensor &gradOut, const Tensor *lengths,
                      const Tensor *keyBias, Tensor &dq, Tensor &dk,
                      Tensor &dv, std::string &error, void *stream,
                      const Tensor *sums);
  bool runGpu(const Tensor &q, const Tensor &k, const Tensor &v,
              const Tensor *lengths, Tensor &out, Tensor *lse,
              std::string &error, void *stream, KeyInputs keys);

  std::string dir_, target_, name_, specJson_;
  std::vector<ArgSpec> args_;
  void *library_ = nullptr;
  void *entry_ = nullptr;
  std::vector<ArgSpec> backwardArgs_;
  void *backwardEntry_ = nullptr;
  std::unique_ptr<GpuModule> gpu_;
  std::unique_ptr<RingProgram> ring_;
  void *ringInit_ = nullptr, *ringFinalize_ = nullptr;
  std::vector<void *> ringKernels_;
  void *ringGradInit_ = nullptr;
  std::vector<void *> ringGradKernels_;
};

} // namespace attn::runtime

#endif // ATTN_RUNTIME_PACKAGE_H
