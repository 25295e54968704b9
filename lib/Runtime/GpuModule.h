//===- GpuModule.h - a loaded GPU package (runtime internals) ---*- C++ -*-===//
//
// What GpuPackage.cpp loads from a GPU package (the cubin's kernels in launch
// order, device scratch) and its one way to launch a kernel, shared with the
// ring executor (GpuRing.cpp).
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_LIB_RUNTIME_GPUMODULE_H
#define ATTN_LIB_RUNTIME_GPUMODULE_H

#include "attn/Runtime/CudaDriver.h"

#include <mutex>
#include <string>
#include <vector>

namespace attn::runtime {
using namespace attn::runtime::cuda;

struct GpuKernel {
  std::string name, kind;
  int64_t block = 0, blockRows = 0, sharedBytes = 0;
  /// init/finalize: consecutive elements each thread takes.
  int64_t elementsPerThread = 1;
  int64_t period = 1, residue = -1 /* all */, segment = 0;
  /// dedup_sort_chunks/dedup_merge_chunks: the ids a block takes (their
  /// grid is chunks x B).
  int64_t chunk = 0;
  /// The query rows a call must have for this kernel to run (-1: any):
  /// at most rowsAtMost, more than rowsAbove (a component's kernel for
  /// short sequences and its kernel for the others).
  int64_t rowsAtMost = -1, rowsAbove = -1;
  bool runsAt(int64_t rows) const {
    return (rowsAtMost < 0 || rows <= rowsAtMost) &&
           (rowsAbove < 0 || rows > rowsAbove);
  }
  CUfunction function = nullptr;
};

/// What a K or V tensor map of a kernel depends on besides the address:
/// the tensor's batches, heads and rows, element strides (batch, head,
/// row), D and the kernel's period.
struct KeyMapShape {
  int64_t batch = 0, heads = 0, rows = 0, strides[3] = {0, 0, 0};
  int64_t headDim = 0, period = 1;
  bool operator==(const KeyMapShape &o) const {
    return batch == o.batch && heads == o.heads && rows == o.rows &&
           strides[0] == o.strides[0] && strides[1] == o.strides[1] &&
           strides[2] == o.strides[2] && headDim == o.headDim &&
           period == o.period;
  }
};

/// The end of the last call's work on its stream. A call on another stream
/// first waits for it, so that two streams never use a package's shared
/// buffers (its state scratch, a ring's buffers) at once.
struct CallOrder {
  CUevent done = nullptr;
  CUstream stream = nullptr;

  /// Makes `next` wait for the last call if that ran on another stream.
  CUresult waitIfOtherStream(const Driver &d, CUstream next) const {
    return done && stream != next ? d.cuStreamWaitEvent(next, done, 0)
                                  : CUDA_SUCCESS;
  }
  /// Records the end of a call on `s` (the event is made on first use).
  CUresult record(const Driver &d, CUstream s) {
    CUresult rc =
        done ? CUDA_SUCCESS : d.cuEventCreate(&done, CU_EVENT_DISABLE_TIMING);
    if (rc == CUDA_SUCCESS)
      rc = d.cuEventRecord(done, s);
    if (rc == CUDA_SUCCESS)
      stream = s;
    return rc;
  }
  void destroy(const Driver &d) {
    if (done)
      d.cuEventDestroy(done);
    done = nullptr;
  }
};

struct GpuModule {
  const Driver *d = nullptr;
  /// Ring packages: device buffers of the last runRank (grown on demand), a
  /// communication stream and its events.
  CUdeviceptr ringScratch = 0;
  size_t ringScratchBytes = 0;
  /// The ring backward pass's buffers, apart from the forward's (whose
  /// receive buffers must keep zeros in the rows no step sends).
  CUdeviceptr ringGradScratch = 0;
  size_t ringGradScratchBytes = 0;
  /// Timing events of the last runRank on the compute stream: its start, then
  /// the end of every step (read by Package::stepMilliseconds).
  std::vector<CUevent> stepMarks;
  CUstream commStream = nullptr;
  /// The end of the last runRank's work on its compute stream: a call on
  /// another stream waits for it before it touches the ring's buffers.
  CallOrder ringOrder;
  CUmodule module = nullptr;
  /// The CUDA context the module was loaded in, and its device: kernels run
  /// only there (checkContext).
  CUcontext context = nullptr;
  int device = -1;
  std::vector<GpuKernel> kernels; // in launch order
  /// The backward pass's kernels in launch order (packages compiled with
  /// "backward": true; Package::runGpuBackward).
  std::vector<GpuKernel> gradKernels;
  /// Packages with key_ids: dedup_keys (Package::dedupKeys), and the
  /// longest sequence it sorts.
  std::vector<GpuKernel> dedupKernels;
  int64_t dedupMaxLen = 0;
  bool needsState = false;
  /// Bytes per acc element of the state (4: f32 O, 2: O / l in 16 bits).
  int64_t stateElementBytes = 4;
  /// The state's acc lives in out (a 16-bit state): no acc buffer.
  bool stateInOut = false;
  int64_t headDim = 0;
  /// The kernels take K's and V's TMA tensor maps after the scalars.
  bool tensorMaps = false;
  /// A component kernel after the first may start while the one before
  /// finishes: it waits for that one's results (griddepcontrol.wait).
  bool dependentLaunch = false;
  /// The backward kernels may store gradients of the input type (one
  /// component writes each element once) instead of adding into f32 ones.
  bool storesGrads = false;
  /// The first component's backward kernels write every element of the f32
  /// gradients (zeros included), so the runtime does not zero them first.
  bool overwritesGrads = false;
  /// Stored gradients: each component's kernels add into float32 sums
  /// where a later component writes the same elements, and each element's
  /// last writer stores its share plus those sums (every grad kernel takes
  /// the stored gradients and the sums).
  bool finishesGrads = false;
  /// The TMA tensor maps last encoded (launchKernel: K's, V's, Q's and
  /// out's, and the backward's of q and grad_out): the same tensor, shape
  /// and period give the same map, so the kernels of a call and of the calls
  /// after it on the same tensors reuse it instead of encoding it again for
  /// every launch (a package in rounds launches its kernels once per round).
  /// 32 hold a training step of three periods (LongNet: k, v, q and out for
  /// the forward and grad_q, grad_out for grad_kv, per period).
  struct KeyMapEntry {
    CUdeviceptr data = 0;
    KeyMapShape shape;
    TensorMap map;
  };
  static constexpr size_t kKeyMapCacheSize = 32;
  mutable std::vector<KeyMapEntry> keyMaps;
  mutable size_t nextKeyMap = 0;
  /// Bytes of the GPU's L2 cache (runs a few (batch, head) pairs at a time
  /// where one pair's tensors fit it: Package::runGpu).
  int64_t l2Bytes = 0;
  // Device scratch, grown on demand.
  CUdeviceptr scratch = 0;
  size_t scratchBytes = 0;
  /// Host-side state (scratch, tensor maps, the events below) is touched by
  /// one call at a time: calls from several threads take turns queueing
  /// their launches.
  std::mutex mutex;
  /// Packages whose kernels pass a state through the scratch (needsState):
  /// the end of the last call's launches, which a call on another stream
  /// waits for before its kernels use the scratch.
  CallOrder stateOrder;

  ~GpuModule() {
    for (CUevent e : stepMarks)
      d->cuEventDestroy(e);
    ringOrder.destroy(*d);
    stateOrder.destroy(*d);
    if (ringScratch)
      d->cuMemFree(ringScratch);
    if (ringGradScratch)
      d->cuMemFree(ringGradScratch);
    if (commStream)
      d->cuStreamDestroy(commStream);
    if (scratch)
      d->cuMemFree(scratch);
    if (module)
      d->cuModuleUnload(module);
  }
};

/// A device buffer that only grows: reallocated when `need` exceeds its size.
/// Returns false and sets `error` (naming `what`) if the allocation fails;
/// sets `grown` when the buffer was (re)allocated.
bool growDeviceBuffer(const Driver &d, CUdeviceptr &buffer, size_t &bytes,
                      size_t need, const std::string &what, std::string &error,
                      bool *grown = nullptr);

/// Before a run: the driver's context is current, and q, k, v and out start
/// at 16-byte boundaries (the kernels move rows of q, k, v in 16-byte copies
/// and write out in up to 16-byte pieces). False, with `error` naming the
/// cause, otherwise.
bool prepareRun(const Driver &d, const void *q, const void *k, const void *v,
                const void *out, std::string &error);

/// Whether the calling thread's current CUDA context is the one package
/// `name` was loaded in; false, with an error saying to load the package
/// once per GPU, otherwise.
bool checkContext(const GpuModule &g, const std::string &name,
                  std::string &error);

/// One kernel launch: device pointers (0 = absent), shapes and positions.
struct KernelArgs {
  CUdeviceptr q = 0, k = 0, v = 0, lengths = 0, out = 0, lse = 0, acc = 0,
              max = 0, sum = 0, keyBias = 0, keyIds = 0;
  int64_t B = 0, H = 0, Hkv = 0, D = 0, Lq = 0, Lk = 0;
  /// Rows of k/v per (batch, kv head): Lk, or the table rows V with keyIds.
  int64_t kvRows = 0;
  /// Groups at origin + index; lengths and filters (GpuKernelEmitter.h's
  /// kernelType) at rowLenShift / qPos / kPos + posStride * index.
  int64_t qOrigin = 0, kOrigin = 0, rowLenShift = 0;
  int64_t qPos = 0, kPos = 0, posStride = 1;
  /// Component kernels take (batch, head) pairs bhOffset .. bhOffset +
  /// bhCount - 1 (grid z; bhCount 0: all B * H).
  int64_t bhOffset = 0, bhCount = 0;
  /// Element strides (batch, head, row) of q, of k and v (which share
  /// them) and of out; a row stride of 0 means the contiguous [B, H, L, D]
  /// layout. Each row's D elements are contiguous.
  int64_t qStrides[3] = {0, 0, 0}, kStrides[3] = {0, 0, 0};
  int64_t oStrides[3] = {0, 0, 0};
  /// The backward kernels' own buffers (GpuKernelEmitter.h's gradKernelType):
  /// grad_out (16-bit, at q's strides), delta (f32), and dq, dk, dv: f32
  /// and contiguous, which the kernels add into, or (gradStore, packages
  /// with "stores_grads") of the input type at dqStrides and dkStrides (dk
  /// and dv share them), which they store.
  CUdeviceptr gradOut = 0, dq = 0, dk = 0, dv = 0, delta = 0;
  int64_t gradStore = 0;
  int64_t dqStrides[3] = {0, 0, 0}, dkStrides[3] = {0, 0, 0};
  /// The float32 sums of the earlier components that a finishing kernel
  /// adds before it stores (contiguous, like f32 dq, dk and dv), or 0.
  CUdeviceptr dqSum = 0, dkSum = 0, dvSum = 0;
};

/// The most (batch, head) pairs one launch takes with H heads a batch
/// (the grid's z dimension, 65535, in whole batches).
int64_t maxPairsPerLaunch(int64_t H);

/// Launches `kernel` with the grid of docs/Package.md on `stream`; with
/// `dependent`, as a programmatic dependent launch of the kernel before it
/// (the package's manifest says its kernels wait for that one's results:
/// "dependent_launch"). A component or gradient kernel over more pairs
/// than maxPairsPerLaunch launches once per that many, unless `dependent`.
bool launchKernel(const GpuModule &g, const GpuKernel &kernel,
                  const KernelArgs &args, CUstream stream, std::string &error,
                  bool dependent = false);

} // namespace attn::runtime

#endif // ATTN_LIB_RUNTIME_GPUMODULE_H
