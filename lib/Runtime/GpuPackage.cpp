//===- GpuPackage.cpp - run GPU packages through the CUDA driver API ------===//
//
// A GPU package is kernels.cubin plus a manifest listing its kernels in
// launch order (docs/Package.md). Every kernel takes the same parameters:
//
//   q, k, v, lengths, out, lse, acc, max, sum,  (memref<?xT> descriptors:
//   key_bias, key_ids                            allocated, aligned, offset,
//                                                size, stride)
//   q_len, kv_len, q_origin, k_origin,          (int64)
//   row_len_shift, q_pos, k_pos, pos_stride, bh_offset,
//   q_stride_b, q_stride_h, q_stride_r,         (element strides of q, and
//   k_stride_b, k_stride_h, k_stride_r,          of k and v, and of out)
//   o_stride_b, o_stride_h, o_stride_r
//   [k_map, v_map]                               (manifest "tensor_maps":
//                                                 CUtensorMaps by value)
//
// A component kernel's grid follows from its component (period r, residue,
// segment w) and the run's lengths, as convert-attn-to-gpu maps blocks:
//
//   x = ceil(rows per group / block_rows), y = residues * segments,
//   z = the launch's (batch, head) pairs (B*H, or a round's: pairsPerLaunch;
//       at most maxPairsPerLaunch, 65535 in whole batches, a launch)
//
// with rows per group = ceil(Lq / r) (w = 0) or ceil(min(w, Lq) / r), and
// segments = floor((d + Lq - 1) / w) - floor(d / w) + 1 for d = Lk - Lq.
// init/finalize kernels are element-wise over B*H*Lq*D. The state (acc,
// max and sum; none of them where the manifest says "state_in_out", where
// the kernels keep O / l in out with each row's lse) and an LSE scratch
// buffer are device allocations owned by the package and grown on demand (a
// call captured in a CUDA graph takes its own from the graph). Calls take turns
// queueing, and a package with a state orders its calls across streams
// (runGpu); kernels run only in the CUDA context the package was loaded in
// (checkContext).
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Package.h"
#include "attn/Runtime/Ring.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

using namespace attn::runtime;
using namespace attn::runtime::cuda;
using json = nlohmann::json;

#include "GpuModule.h"

#include <dlfcn.h>

Package::Package() = default;

int Package::device() const { return gpu_ ? gpu_->device : -1; }

Package::~Package() {
  gpu_.reset();
  if (library_)
    dlclose(library_);
}

static int64_t floorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
static int64_t ceilDiv(int64_t a, int64_t b) { return -floorDiv(-a, b); }

bool Package::loadGpu(const std::string &manifestPath, const void *manifestPtr,
                      std::string &error) {
  const json &m = *static_cast<const json *>(manifestPtr);
  gpu_ = std::make_unique<GpuModule>();
  GpuModule &g = *gpu_;
  // The kernels `launchOrder` names, from `kernelList`, in that order.
  auto readKernels = [&](const json &kernelList, const json &launchOrder,
                         std::vector<GpuKernel> &into) {
    for (const std::string &name : launchOrder) {
      const json *k = nullptr;
      for (const json &c : kernelList)
        if (c.at("name") == name)
          k = &c;
      if (!k) {
        error = manifestPath + ": launch_order names " + name +
                " but kernels has no such entry";
        return false;
      }
      GpuKernel kernel;
      kernel.name = name;
      kernel.kind = k->at("kind");
      kernel.block = k->at("block");
      kernel.elementsPerThread = k->value("elements_per_thread", int64_t(1));
      kernel.sharedBytes = k->at("shared_bytes");
      kernel.chunk = k->value("chunk", int64_t(0));
      kernel.rowsAtMost = k->value("rows_at_most", int64_t(-1));
      kernel.rowsAbove = k->value("rows_above", int64_t(-1));
      // Kernels of a component (single, begin, update, end, grad_kv,
      // grad_q) carry their grid plan.
      if (k->contains("block_rows")) {
        kernel.blockRows = k->at("block_rows");
        kernel.period = k->at("period");
        kernel.segment = k->at("segment");
        std::string res = k->at("residue");
        kernel.residue =
            res == "all" ? -1 : res == "head" ? -2 : std::stoll(res);
      }
      into.push_back(kernel);
    }
    return true;
  };
  if (!readKernels(m.at("kernels"), m.at("launch_order"), g.kernels))
    return false;
  if (m.contains("backward") &&
      !readKernels(m.at("backward").at("kernels"),
                   m.at("backward").at("launch_order"), g.gradKernels))
    return false;
  if (m.contains("dedup")) {
    if (!readKernels(m.at("dedup").at("kernels"),
                     m.at("dedup").at("launch_order"), g.dedupKernels))
      return false;
    g.dedupMaxLen = m.at("dedup").at("max_len");
  }
  g.needsState = m.at("state");
  g.stateElementBytes = m.value("state_dtype", std::string("f32")) == "f32" ? 4 : 2;
  g.stateInOut = m.value("state_in_out", false);
  g.headDim = args_.at(0).shape.at(3);
  g.tensorMaps = m.value("tensor_maps", false);
  g.dependentLaunch = m.value("dependent_launch", false);
  g.storesGrads =
      m.contains("backward") && m.at("backward").value("stores_grads", false);
  g.overwritesGrads = m.contains("backward") &&
                      m.at("backward").value("overwrites_grads", false);
  g.finishesGrads = m.contains("backward") &&
                    m.at("backward").value("finishes_grads", false);

  std::string cubinPath = dir_ + "/" + m.at("cubin").get<std::string>();
  std::ifstream in(cubinPath, std::ios::binary);
  if (!in) {
    error = "cannot open " + cubinPath;
    return false;
  }
  std::string image((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());

  g.d = driver(error);
  if (!g.d || !ensureContext(*g.d, error))
    return false;
  const Driver &d = *g.d;

  // The architecture: sm_90a runs only on 9.0; sm_80 on 8.0 and newer.
  CUdevice dev;
  int major = 0, minor = 0;
  d.cuCtxGetDevice(&dev);
  d.cuCtxGetCurrent(&g.context);
  g.device = dev;
  d.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                         dev);
  d.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                         dev);
  int l2 = 0;
  if (d.cuDeviceGetAttribute(&l2, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, dev) ==
      CUDA_SUCCESS)
    g.l2Bytes = l2;
  char deviceName[256] = {0};
  d.cuDeviceGetName(deviceName, sizeof(deviceName), dev);
  bool archOk = target_ == "sm_90a" ? (major == 9 && minor == 0)
                                    : (major * 10 + minor >= 80);
  if (!archOk) {
    error = "package " + name_ + " was compiled for " + target_ +
            " but the GPU is " + deviceName + " (sm_" + std::to_string(major) +
            std::to_string(minor) + "); recompile with a matching --target";
    return false;
  }

  char log[8192] = {0};
  int options[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
  void *values[] = {log, reinterpret_cast<void *>(uintptr_t(sizeof(log)))};
  CUresult rc = d.cuModuleLoadDataEx(&g.module, image.data(), 2, options, values);
  // A cubin runs only on its own architecture family (sm_80 on 8.x): on a
  // newer GPU the driver compiles the package's PTX instead.
  std::string loaded = cubinPath;
  if (rc == CUDA_ERROR_NO_BINARY_FOR_GPU && m.contains("ptx")) {
    std::string ptxPath = dir_ + "/" + m.at("ptx").get<std::string>();
    std::ifstream ptxIn(ptxPath, std::ios::binary);
    if (ptxIn) {
      std::string ptx((std::istreambuf_iterator<char>(ptxIn)),
                      std::istreambuf_iterator<char>());
      log[0] = 0;
      rc = d.cuModuleLoadDataEx(&g.module, ptx.c_str(), 2, options, values);
      loaded = ptxPath;
    }
  }
  if (rc != CUDA_SUCCESS) {
    error = describe(d, rc, "loading " + loaded) +
            (log[0] ? std::string("\n") + log : std::string());
    return false;
  }
  std::vector<GpuKernel *> all;
  for (GpuKernel &k : g.kernels)
    all.push_back(&k);
  for (GpuKernel &k : g.gradKernels)
    all.push_back(&k);
  for (GpuKernel &k : g.dedupKernels)
    all.push_back(&k);
  for (GpuKernel *kp : all) {
    GpuKernel &k = *kp;
    rc = d.cuModuleGetFunction(&k.function, g.module, k.name.c_str());
    if (rc != CUDA_SUCCESS) {
      error = describe(d, rc, cubinPath + ": kernel " + k.name);
      return false;
    }
    if (k.sharedBytes > 48 * 1024) {
      rc = d.cuFuncSetAttribute(k.function,
                                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                int(k.sharedBytes));
      if (rc != CUDA_SUCCESS) {
        error = describe(d, rc, "reserving " + std::to_string(k.sharedBytes) +
                                    " bytes of shared memory for " + k.name);
        return false;
      }
    }
  }
  return true;
}

bool attn::runtime::growDeviceBuffer(const Driver &d, CUdeviceptr &buffer,
                                     size_t &bytes, size_t need,
                                     const std::string &what,
                                     std::string &error, bool *grown) {
  if (grown)
    *grown = false;
  if (need <= bytes)
    return true;
  if (buffer)
    d.cuMemFree(buffer);
  buffer = 0;
  bytes = 0;
  CUresult rc = d.cuMemAlloc(&buffer, need);
  if (rc != CUDA_SUCCESS) {
    error = describe(d, rc, "allocating " + std::to_string(need) +
                                " bytes of " + what);
    // A stream capture (a CUDA graph) refuses allocations.
    if (rc == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED ||
        rc == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)
      error += "; a package sizes its device scratch on its first call with "
               "larger shapes: call it once with these shapes before "
               "capturing it in a CUDA graph";
    return false;
  }
  bytes = need;
  if (grown)
    *grown = true;
  return true;
}

bool attn::runtime::checkContext(const GpuModule &g, const std::string &name,
                                 std::string &error) {
  CUcontext current = nullptr;
  g.d->cuCtxGetCurrent(&current);
  if (current == g.context)
    return true;
  CUdevice dev = -1;
  g.d->cuCtxGetDevice(&dev);
  error = "package " + name + " was loaded on GPU " + std::to_string(g.device) +
          " (in its CUDA context), but this call runs " +
          (dev == g.device ? "in another CUDA context of that GPU"
                           : "on GPU " + std::to_string(dev)) +
          ": load the package once per GPU and context (Python packages "
          "load themselves again for each GPU their tensors are on)";
  return false;
}

bool attn::runtime::prepareRun(const Driver &d, const void *q, const void *k,
                               const void *v, const void *out,
                               std::string &error) {
  if (!ensureContext(d, error))
    return false;
  for (auto [name, data] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"out", out}})
    if (uintptr_t(data) % 16 != 0) {
      error = std::string(name) +
              ": the data pointer is not 16-byte aligned (the GPU kernels "
              "move rows in 16-byte pieces); pass a tensor whose storage "
              "starts at a 16-byte boundary";
      return false;
    }
  return true;
}

/// The tensor map of k, v, q, out (or grad_out) for the TMA loads of a
/// kernel whose rows are gathered with period r: the tensor as
/// [batch][heads][rows][D] 16-bit elements over its strides for r = 1, as
/// [batch][heads][rows / r][r][D] (row j = r*a + c at plane c, row a) for
/// r > 1; read in boxes of 64 columns x 64 rows (one 128-byte-swizzled
/// panel of a 64-row tile) with zeros past each head's rows. When r does
/// not divide rows the map stays empty and the kernel loads by cp.async (it
/// checks the same condition).
static bool encodeKeyMap(const Driver &d, CUdeviceptr data,
                         const KeyMapShape &s, const char *what,
                         TensorMap &map, std::string &error) {
  map = TensorMap{};
  const int64_t rows = s.rows, D = s.headDim, period = s.period;
  if (!data || rows == 0 || s.heads == 0 || s.batch == 0 ||
      rows % period != 0)
    return true; // no tile is loaded by TMA
  if (!d.cuTensorMapEncodeTiled) {
    error = "this package loads its tiles by TMA, which needs "
            "cuTensorMapEncodeTiled (a CUDA 12 or newer driver)";
    return false;
  }
  using u64 = unsigned long long;
  const u64 rowBytes = u64(s.strides[2]) * 2;
  // Innermost first: columns, [plane,] rows, heads, batches.
  std::vector<u64> dims{u64(D)}, strides;
  std::vector<unsigned> box{64};
  if (period > 1) {
    dims.push_back(u64(period));
    strides.push_back(rowBytes);
    box.push_back(1);
  }
  dims.push_back(u64(rows / period));
  strides.push_back(rowBytes * u64(period));
  box.push_back(64);
  dims.push_back(u64(s.heads));
  strides.push_back(u64(s.strides[1]) * 2);
  box.push_back(1);
  dims.push_back(u64(s.batch));
  strides.push_back(u64(s.strides[0]) * 2);
  box.push_back(1);
  const unsigned elementStrides[5] = {1, 1, 1, 1, 1};
  CUresult rc = d.cuTensorMapEncodeTiled(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT16, unsigned(dims.size()),
      reinterpret_cast<void *>(uintptr_t(data)), dims.data(), strides.data(),
      box.data(), elementStrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (rc != CUDA_SUCCESS) {
    error = describe(d, rc, std::string("encoding the TMA tensor map of ") +
                                what + " [" + std::to_string(s.batch) + " x " +
                                std::to_string(s.heads) + " x " +
                                std::to_string(rows) + " x " +
                                std::to_string(D) + "]");
    return false;
  }
  return true;
}

/// encodeKeyMap through the module's cache of recent maps.
static bool cachedKeyMap(const GpuModule &g, CUdeviceptr data,
                         const KeyMapShape &shape, const char *what,
                         TensorMap &map, std::string &error) {
  for (const GpuModule::KeyMapEntry &e : g.keyMaps)
    if (e.data == data && e.shape == shape) {
      map = e.map;
      return true;
    }
  if (!encodeKeyMap(*g.d, data, shape, what, map, error))
    return false;
  GpuModule::KeyMapEntry entry{data, shape, map};
  if (g.keyMaps.size() < GpuModule::kKeyMapCacheSize) {
    g.keyMaps.push_back(entry);
  } else {
    g.keyMaps[g.nextKeyMap] = entry;
    g.nextKeyMap = (g.nextKeyMap + 1) % GpuModule::kKeyMapCacheSize;
  }
  return true;
}

/// A kernel's memref argument of `size` elements at device address `ptr`,
/// as the lowered kernels take it: five words (allocated, aligned, offset,
/// size, stride) at `w`.
static void putMemref(int64_t *w, uintptr_t ptr, int64_t size) {
  w[0] = w[1] = int64_t(ptr);
  w[2] = 0;
  w[3] = ptr ? size : 0;
  w[4] = 1;
}

/// The most (batch, head) pairs one launch of a component or gradient
/// kernel takes: its grid's z dimension (at most 65535), rounded down to
/// whole batches of H heads (the GQA walk of grad_kv pairs the blocks of a
/// batch's heads). More pairs take several launches (launchKernel, and the
/// forward's rounds in runGpu).
int64_t attn::runtime::maxPairsPerLaunch(int64_t H) {
  constexpr int64_t kMaxGridZ = 65535;
  return H > 0 && H <= kMaxGridZ ? kMaxGridZ / H * H : kMaxGridZ;
}

bool attn::runtime::launchKernel(const GpuModule &g, const GpuKernel &kernel,
                                 const KernelArgs &a, CUstream stream,
                                 std::string &error, bool dependent) {
  const Driver &d = *g.d;
  // More (batch, head) pairs than a grid's z dimension holds: one launch
  // per maxPairsPerLaunch pairs, one after the other on the stream (the
  // kernels take their first pair from bh_offset). Not for a programmatic
  // dependent launch: the kernel after it would wait for the last launch
  // alone, so runGpu's rounds keep those within one grid.
  // Element-wise kernels (over every row at once) take no pairs.
  const bool elementwise = kernel.kind == "init" || kernel.kind == "finalize" ||
                           kernel.kind == "grad_prepare" ||
                           kernel.kind == "grad_add";
  const int64_t pairs = a.bhCount ? a.bhCount : a.B * a.H;
  const int64_t most = maxPairsPerLaunch(a.H);
  if (!elementwise && pairs > most && !dependent) {
    KernelArgs part = a;
    for (int64_t first = 0; first < pairs; first += most) {
      part.bhOffset = a.bhOffset + first;
      part.bhCount = std::min(most, pairs - first);
      if (!launchKernel(g, kernel, part, stream, error))
        return false;
    }
    return true;
  }
  const int64_t rows = a.B * a.H * a.Lq;
  // Parameters: 11 descriptors of 5 words, then q_len, kv_len, q_origin,
  // k_origin, row_len_shift, q_pos, k_pos, pos_stride, bh_offset and the
  // strides (batch, head, row) of q, of k and v, and of out.
  // The backward kernels take grad_out, dq, dk, dv and delta after the
  // scalars (and no tensor maps), then whether they store the gradients,
  // the strides of stored dq and of stored dk and dv, and the float32 sums
  // that a finishing kernel adds (dq, dk, dv).
  constexpr int kDescriptors = 11, kWords = 5 * kDescriptors + 18;
  constexpr int kGradDescriptors = 5, kGradScalars = 7, kGradSums = 3;
  constexpr int kGradWords =
      5 * kGradDescriptors + kGradScalars + 5 * kGradSums;
  const bool grad = kernel.kind.rfind("grad_", 0) == 0;
  int64_t words[kWords + kGradWords];
  auto put = [&](int slot, CUdeviceptr ptr, int64_t size) {
    putMemref(words + 5 * slot, uintptr_t(ptr), size);
  };
  const int64_t kvRows = a.kvRows ? a.kvRows : a.Lk;
  const int64_t kvBatch = a.keyIds ? 1 : a.B;
  // Strides: the caller's, or those of contiguous [B, H, L, D] tensors.
  int64_t qs[3] = {a.H * a.Lq * a.D, a.Lq * a.D, a.D};
  int64_t ks[3] = {a.Hkv * kvRows * a.D, kvRows * a.D, a.D};
  if (a.qStrides[2])
    std::copy(a.qStrides, a.qStrides + 3, qs);
  if (a.kStrides[2])
    std::copy(a.kStrides, a.kStrides + 3, ks);
  int64_t os[3] = {a.H * a.Lq * a.D, a.Lq * a.D, a.D};
  if (a.oStrides[2])
    std::copy(a.oStrides, a.oStrides + 3, os);
  // The elements a strided tensor spans, for the descriptors' sizes.
  auto span = [&](const int64_t *st, int64_t b, int64_t h, int64_t l) {
    return (b - 1) * st[0] + (h - 1) * st[1] + (l - 1) * st[2] + a.D;
  };
  put(0, a.q, span(qs, a.B, a.H, a.Lq));
  put(1, a.k, span(ks, kvBatch, a.Hkv, kvRows));
  put(2, a.v, span(ks, kvBatch, a.Hkv, kvRows));
  put(3, a.lengths, a.B);
  put(4, a.out, span(os, a.B, a.H, a.Lq));
  put(5, a.lse, rows);
  put(6, a.acc, rows * a.D);
  put(7, a.max, rows);
  put(8, a.sum, rows);
  put(9, a.keyBias, a.B * a.Lk);
  put(10, a.keyIds, a.B * a.Lk);
  int64_t *scalars = words + 5 * kDescriptors;
  scalars[0] = a.Lq;
  scalars[1] = a.Lk;
  scalars[2] = a.qOrigin;
  scalars[3] = a.kOrigin;
  scalars[4] = a.rowLenShift;
  scalars[5] = a.qPos;
  scalars[6] = a.kPos;
  scalars[7] = a.posStride;
  scalars[8] = a.bhOffset;
  std::copy(qs, qs + 3, scalars + 9);
  std::copy(ks, ks + 3, scalars + 12);
  std::copy(os, os + 3, scalars + 15);
  if (grad) {
    // Stored gradients: 16-bit elements at their strides (the descriptors'
    // sizes count f32 elements; the kernels address them by hand).
    const int64_t kvElements = a.B * a.Hkv * a.Lk * a.D;
    putMemref(words + kWords, uintptr_t(a.gradOut), span(qs, a.B, a.H, a.Lq));
    putMemref(words + kWords + 5, uintptr_t(a.dq), rows * a.D);
    putMemref(words + kWords + 10, uintptr_t(a.dk), kvElements);
    putMemref(words + kWords + 15, uintptr_t(a.dv), kvElements);
    putMemref(words + kWords + 20, uintptr_t(a.delta), rows);
    int64_t *gradScalars = words + kWords + 5 * kGradDescriptors;
    gradScalars[0] = a.gradStore;
    std::copy(a.dqStrides, a.dqStrides + 3, gradScalars + 1);
    std::copy(a.dkStrides, a.dkStrides + 3, gradScalars + 4);
    int64_t *sums = gradScalars + kGradScalars;
    putMemref(sums, uintptr_t(a.dqSum), rows * a.D);
    putMemref(sums + 5, uintptr_t(a.dkSum), kvElements);
    putMemref(sums + 10, uintptr_t(a.dvSum), kvElements);
  }
  const int numWords = grad ? kWords + kGradWords : kWords;
  void *params[kWords + kGradWords + 4];
  for (int i = 0; i < numWords; ++i)
    params[i] = &words[i];
  // TMA packages: tensor maps, by value. The component kernels take K's,
  // V's, Q's and out's, each for the kernel's period (empty where it does
  // not divide the rows: the kernel then loads by cp.async); init and
  // finalize take empty ones. The backward kernels take two: grad_kv walks
  // the rows of q and grad_out (which shares q's strides), grad_q the keys.
  TensorMap maps[4] = {};
  if (g.tensorMaps) {
    const bool walksQueries = kernel.kind == "grad_kv";
    auto mapShape = [&](int64_t batch, int64_t heads, int64_t rows,
                        const int64_t *strides) {
      KeyMapShape shape;
      shape.batch = batch;
      shape.heads = heads;
      shape.rows = rows;
      std::copy(strides, strides + 3, shape.strides);
      shape.headDim = a.D;
      shape.period = std::max<int64_t>(kernel.period, 1);
      return shape;
    };
    const KeyMapShape queries = mapShape(a.B, a.H, a.Lq, qs),
                      keys = mapShape(kvBatch, a.Hkv, kvRows, ks);
    const KeyMapShape &walked = walksQueries ? queries : keys;
    const CUdeviceptr first = walksQueries ? a.q : a.k,
                      second = walksQueries ? a.gradOut : a.v;
    const char *firstName = walksQueries ? "q" : "k",
               *secondName = walksQueries ? "grad_out" : "v";
    if (!elementwise &&
        (!cachedKeyMap(g, first, walked, firstName, maps[0], error) ||
         !cachedKeyMap(g, second, walked, secondName, maps[1], error)))
      return false;
    if (!elementwise && !grad &&
        (!cachedKeyMap(g, a.q, queries, "q", maps[2], error) ||
         !cachedKeyMap(g, a.out, mapShape(a.B, a.H, a.Lq, os), "out", maps[3],
                       error)))
      return false;
    const int numMaps = grad ? 2 : 4;
    for (int i = 0; i < numMaps; ++i)
      params[numWords + i] = &maps[i];
  }

  int64_t gx, gy = 1, gz = 1;
  if (elementwise) {
    // grad_add runs over Lq planes of Lk rows (dk += dq; GpuRing.cpp).
    const int64_t elements =
        kernel.kind == "grad_add" ? a.Lq * a.Lk * a.D : rows * a.D;
    gx = ceilDiv(elements, kernel.block * kernel.elementsPerThread);
  } else {
    int64_t r = kernel.period, w = kernel.segment, first = a.qOrigin;
    int64_t residues = kernel.residue == -1 ? r : 1;
    // Blocks of grad_kv take the group's keys, the others its rows.
    const int64_t rowsOrKeys = kernel.kind == "grad_kv" ? a.Lk : a.Lq;
    int64_t segments = 1, rowsPerGroup = ceilDiv(rowsOrKeys, r);
    if (w > 0) {
      // The segments of the rows, and for grad_kv of the keys as well
      // (ConvertToGpu's placeGroup with keySegments).
      int64_t lo = first, end = first + a.Lq;
      if (kernel.kind == "grad_kv") {
        lo = std::min(lo, a.kOrigin);
        end = std::max(end, a.kOrigin + a.Lk);
      }
      segments = floorDiv(end - 1, w) - floorDiv(lo, w) + 1;
      rowsPerGroup = ceilDiv(std::min(w, rowsOrKeys), r);
    }
    gx = ceilDiv(rowsPerGroup, kernel.blockRows);
    gy = residues * segments;
    gz = a.bhCount ? a.bhCount : a.B * a.H;
  }
  if (gx > 0x7fffffff || gy > 65535 || gz > 65535) {
    error = "kernel " + kernel.name + ": grid (" + std::to_string(gx) + ", " +
            std::to_string(gy) + ", " + std::to_string(gz) +
            ") exceeds the GPU's limits for these sizes";
    return false;
  }
  if (gx <= 0 || gy <= 0)
    return true;
  CUresult rc;
  if (dependent && d.cuLaunchKernelEx) {
    LaunchAttribute attr{};
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    LaunchConfig config{unsigned(gx), unsigned(gy), unsigned(gz),
                        unsigned(kernel.block), 1, 1,
                        unsigned(kernel.sharedBytes), stream, &attr, 1};
    rc = d.cuLaunchKernelEx(&config, kernel.function, params, nullptr);
  } else {
    rc = d.cuLaunchKernel(kernel.function, unsigned(gx), unsigned(gy),
                          unsigned(gz), unsigned(kernel.block), 1, 1,
                          unsigned(kernel.sharedBytes), stream, params,
                          nullptr);
  }
  if (rc != CUDA_SUCCESS) {
    error = describe(d, rc, "launching " + kernel.name);
    return false;
  }
  return true;
}

/// The element strides (batch, head, row) of strided q, k (and v) and out
/// into the kernels' arguments; contiguous tensors keep the defaults.
static void setStrides(KernelArgs &a, const Tensor &q, const Tensor &k,
                       const Tensor &out) {
  for (auto [t, to] : {std::pair{&q, a.qStrides}, {&k, a.kStrides},
                       {&out, a.oStrides}})
    if (!t->strides.empty())
      std::copy(t->strides.begin(), t->strides.begin() + 3, to);
}

/// How many (batch, head) pairs each round of a package's kernels takes:
/// all of them, or where the kernels are a chain of dependent launches that
/// starts its state afresh (`begin`, no init or finalize) and every kernel
/// covers every residue class of its rows (strided, not LongNet's
/// head-offset branches), the most pairs whose q, k, v and out fit in 3/4
/// of the L2. Measured on an H100 (bench/gpu_ab.md): strided +9% at
/// L = 16384 and 32768 (one pair's 32 MB at a time there); LongNet, whose
/// later branches cover a quarter or a sixteenth of a head's rows and would
/// run as sub-wave kernels, -3 to -6%. Each round's first kernel does not
/// wait for the round before (its pairs' rows are its own), and the kernels
/// after it wait for theirs. ATTN_GPU_ROUNDS=0 in the environment turns
/// rounds off (bench/gpu_rounds_ab.py compares both), and ATTN_GPU_ROUNDS=N
/// takes N pairs a round wherever rounds are possible: in packages without
/// element-wise kernels (init and finalize cover every pair at once).
static int64_t pairsPerLaunch(const GpuModule &g, const KernelArgs &a) {
  const int64_t all = a.B * a.H;
  const char *rounds = std::getenv("ATTN_GPU_ROUNDS");
  if (rounds && std::string(rounds) == "0")
    return all;
  for (const GpuKernel &k : g.kernels)
    if (k.kind == "init" || k.kind == "finalize")
      return all;
  if (rounds && std::atoll(rounds) > 0) // pairs per round, for A/B runs
    return std::min<int64_t>(std::atoll(rounds), all);
  if (!g.dependentLaunch || g.kernels.size() < 2 ||
      g.kernels.front().kind != "begin" || g.l2Bytes <= 0)
    return all;
  for (const GpuKernel &k : g.kernels)
    if ((k.kind != "begin" && k.kind != "update" && k.kind != "end") ||
        k.residue != -1)
      return all;
  const int64_t elementBytes = 2; // 16-bit q, k, v and out
  const int64_t perPair =
      elementBytes * a.D * (2 * a.Lq + 2 * a.Lk * a.Hkv / a.H);
  const int64_t budget = g.l2Bytes * 3 / 4;
  if (perPair > budget)
    return all;
  int64_t pairs = std::max<int64_t>(1, budget / perPair);
  return std::min(pairs, all);
}

/// A call's device scratch. Calls use the package's own, grown on demand
/// (calls on other streams wait for the last call: CallOrder). A call
/// captured in a CUDA graph takes scratch the graph owns instead, allocated
/// and freed on the capturing stream (graph memory nodes), so that even a
/// first call can be captured and replays never share the scratch of eager
/// calls; a captured call neither waits for nor records the package's last
/// call (waitForLastCall, recordCall: an event recorded outside the capture
/// would invalidate it).
struct CallScratch {
  CUdeviceptr ptr = 0;
  bool capturing = false, graphOwned = false;

  bool acquire(GpuModule &g, CUstream stream, size_t bytes,
               const std::string &what, std::string &error) {
    const Driver &d = *g.d;
    int captureStatus = 0;
    if (d.cuStreamIsCapturing)
      d.cuStreamIsCapturing(stream, &captureStatus);
    capturing = captureStatus != 0;
    if (bytes == 0)
      return true;
    graphOwned = capturing && d.cuMemAllocAsync && d.cuMemFreeAsync;
    if (!graphOwned) {
      if (!growDeviceBuffer(d, g.scratch, g.scratchBytes, bytes,
                            "device scratch (" + what + ")", error))
        return false;
      ptr = g.scratch;
      return true;
    }
    CUresult rc = d.cuMemAllocAsync(&ptr, bytes, stream);
    if (rc != CUDA_SUCCESS) {
      error = describe(d, rc,
                       "allocating " + std::to_string(bytes) +
                           " bytes of scratch in the captured graph");
      return false;
    }
    return true;
  }
  /// Unless the call is captured: makes `stream` wait for the package's
  /// last call where that ran on another stream.
  bool waitForLastCall(const Driver &d, const CallOrder &order, CUstream stream,
                       std::string &error) const {
    CUresult rc = capturing ? CUDA_SUCCESS : order.waitIfOtherStream(d, stream);
    if (rc != CUDA_SUCCESS)
      error = describe(d, rc, "ordering after the previous call's stream");
    return rc == CUDA_SUCCESS;
  }
  /// Unless the call is captured: records its end for the next call.
  bool recordCall(const Driver &d, CallOrder &order, CUstream stream,
                  std::string &error) const {
    CUresult rc = capturing ? CUDA_SUCCESS : order.record(d, stream);
    if (rc != CUDA_SUCCESS)
      error = describe(d, rc, "recording the end of the call");
    return rc == CUDA_SUCCESS;
  }
  bool release(const Driver &d, CUstream stream, std::string &error) {
    if (!graphOwned)
      return true;
    CUresult rc = d.cuMemFreeAsync(ptr, stream);
    if (rc != CUDA_SUCCESS) {
      error = describe(d, rc, "freeing the captured graph's scratch");
      return false;
    }
    return true;
  }
};

bool Package::runGpu(const Tensor &q, const Tensor &k, const Tensor &v,
                     const Tensor *lengths, Tensor &out, Tensor *lse,
                     std::string &error, void *streamPtr, KeyInputs keys) {
  GpuModule &g = *gpu_;
  const Driver &d = *g.d;
  if (!prepareRun(d, q.data, k.data, v.data, out.data, error) ||
      !checkContext(g, name_, error))
    return false;
  CUstream stream = static_cast<CUstream>(streamPtr);
  std::lock_guard<std::mutex> lock(g.mutex);
  const int64_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2],
                Lk = keys.ids ? keys.ids->shape[1] : k.shape[2],
                D = q.shape[3];
  const int64_t rows = B * H * Lq;

  // Scratch: [lse if the caller gave none][acc, max, sum if needed].
  // (256-byte aligned, for the kernels' vector accesses to the state.) The
  // kernels write each row's lse even where the package was compiled
  // without one (`"lse": false`): a single or `end` kernel with out, and a
  // state in out merges from it.
  size_t lseBytes = !lse ? size_t(rows + 63) / 64 * 256 : 0;
  // acc [rows, D] (256-byte aligned size), then max and sum [rows] f32;
  // none of them where the state lives in out (O / l there, with the
  // row's lse: docs/Package.md).
  size_t accBytes =
      g.stateInOut ? 0
                   : (size_t(rows) * D * g.stateElementBytes + 255) / 256 * 256;
  size_t stateBytes =
      g.needsState && !g.stateInOut ? accBytes + size_t(rows) * 2 * 4 : 0;
  size_t need = lseBytes + stateBytes;
  CallScratch callScratch;
  if (!callScratch.acquire(g, stream, need, "state/LSE", error))
    return false;
  CUdeviceptr scratch = callScratch.ptr;
  CUdeviceptr lsePtr = lse ? CUdeviceptr(uintptr_t(lse->data))
                           : (lseBytes ? scratch : 0);
  CUdeviceptr state = stateBytes ? scratch + lseBytes : 0;
  CUdeviceptr acc = state; // the state block starts with acc
  CUdeviceptr mx = state ? state + accBytes : 0;
  CUdeviceptr sm = state ? mx + size_t(rows) * 4 : 0;

  KernelArgs args;
  auto dev = [](const void *p) { return CUdeviceptr(uintptr_t(p)); };
  args.q = dev(q.data);
  args.k = dev(k.data);
  args.v = dev(v.data);
  args.lengths = lengths ? dev(lengths->data) : 0;
  args.out = dev(out.data);
  args.lse = lsePtr;
  args.acc = acc;
  args.max = mx;
  args.sum = sm;
  args.keyBias = keys.bias ? dev(keys.bias->data) : 0;
  args.keyIds = keys.ids ? dev(keys.ids->data) : 0;
  args.kvRows = k.shape[2];
  args.B = B;
  args.H = H;
  args.Hkv = k.shape[1];
  args.D = D;
  args.Lq = Lq;
  args.Lk = Lk;
  args.qOrigin = args.qPos = Lk - Lq; // bottom-right alignment
  setStrides(args, q, k, out); // (checked by checkArguments)
  // The state between the kernels lives in the package's scratch (or in
  // out and the lse, which may be scratch too): a call on another stream
  // than the last one waits for that call's kernels, so that two streams
  // never share it at once. (A captured call has scratch
  // of its own and neither waits nor records.)
  if (g.needsState &&
      !callScratch.waitForLastCall(d, g.stateOrder, stream, error))
    return false;
  // Each kernel after the first may overlap the tail of the one before
  // (programmatic dependent launch) where the package's kernels wait for
  // their predecessor's results themselves. Such a package runs for
  // `pairs` (batch, head) pairs at a time (all of its kernels, then the
  // next pairs), so that its later kernels find what the earlier ones read
  // and wrote for those pairs in L2.
  // Rounds also keep each launch within a grid's z dimension
  // (maxPairsPerLaunch): the element-wise init and finalize, which cover
  // every pair, run before the first round and after the last, the
  // finalize then as an ordinary launch, after every round's kernels.
  const int64_t pairs = std::min(pairsPerLaunch(g, args), maxPairsPerLaunch(H));
  for (int64_t first = 0; first < B * H; first += pairs) {
    args.bhOffset = first;
    args.bhCount = std::min(pairs, B * H - first);
    const bool lastRound = first + pairs >= B * H;
    // A kernel launches as a dependent of the one before it in this call:
    // one that does not run at this length (GpuKernel::runsAt) is no
    // predecessor.
    int64_t launched = 0;
    for (const GpuKernel &kernel : g.kernels) {
      if ((kernel.kind == "init" && first > 0) ||
          (kernel.kind == "finalize" && !lastRound) || !kernel.runsAt(args.Lq))
        continue;
      const bool afterRounds = kernel.kind == "finalize" && first > 0;
      if (!launchKernel(g, kernel, args, stream, error,
                        /*dependent=*/g.dependentLaunch && !afterRounds &&
                            (launched > 0 || first > 0)))
        return false;
      ++launched;
    }
  }
  if (!callScratch.release(d, stream, error))
    return false;
  return !g.needsState ||
         callScratch.recordCall(d, g.stateOrder, stream, error);
}

/// The backward pass of a GPU package (docs/Backward.md): dq, dk and dv are
/// zeroed on the stream, grad_prepare writes each row's delta into the
/// package's scratch, and each component's grad_kv and grad_q add its share.
/// Stored gradients of a package that finishes them: the components' kernels
/// add into `sums` (f32) where a later component writes the same elements,
/// and each element's last writer stores its share plus those sums. The
/// arguments were checked by runBackward.
bool Package::runGpuBackward(const Tensor &q, const Tensor &k, const Tensor &v,
                             const Tensor &out, const Tensor &lse,
                             const Tensor &gradOut, const Tensor *lengths,
                             const Tensor *keyBias, Tensor &dq, Tensor &dk,
                             Tensor &dv, std::string &error,
                             void *streamPtr, const Tensor *sums) {
  GpuModule &g = *gpu_;
  const Driver &d = *g.d;
  if (!prepareRun(d, q.data, k.data, v.data, out.data, error) ||
      !checkContext(g, name_, error))
    return false;
  for (auto [name, data] :
       {std::pair<const char *, const void *>{"grad_out", gradOut.data},
        {"dq", dq.data},
        {"dk", dk.data},
        {"dv", dv.data},
        {"dq_sum", sums ? sums[0].data : nullptr},
        {"dk_sum", sums ? sums[1].data : nullptr},
        {"dv_sum", sums ? sums[2].data : nullptr}})
    if (uintptr_t(data) % 16 != 0) {
      error = std::string(name) + ": the data pointer is not 16-byte aligned";
      return false;
    }
  CUstream stream = static_cast<CUstream>(streamPtr);
  std::lock_guard<std::mutex> lock(g.mutex);
  const int64_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2],
                Lk = k.shape[2], D = q.shape[3], Hkv = k.shape[1];
  const int64_t rows = B * H * Lq;
  // Scratch: delta [rows] f32, the package's scratch as the forward's
  // state is, or the graph's for a captured call (CallScratch).
  CallScratch delta;
  if (!delta.acquire(g, stream, size_t(rows) * 4, "delta", error))
    return false;
  if (!delta.waitForLastCall(d, g.stateOrder, stream, error))
    return false;
  CUresult rc = CUDA_SUCCESS;
  auto dev = [](const void *p) { return CUdeviceptr(uintptr_t(p)); };
  // The kernels add every component's share into f32 gradients, zeroed
  // here unless the first component overwrites them ("overwrites_grads"),
  // or store gradients of the input type (checkGradients allowed those
  // only where the package stores them): every element once.
  const bool store = dq.dtype != "f32";
  // Where they add, the f32 gradients or the f32 sums (stored gradients of
  // a package that finishes them) start at zero unless the first
  // component overwrites them.
  // (The sums are zeroed round by round, below.)
  if (!store && !g.overwritesGrads)
    for (auto [t, n] : {std::pair{&dq, rows * D},
                        {&dk, B * Hkv * Lk * D},
                        {&dv, B * Hkv * Lk * D}})
      if (rc == CUDA_SUCCESS)
        rc = d.cuMemsetD8Async(dev(t->data), 0, size_t(n) * 4, stream);
  if (rc != CUDA_SUCCESS) {
    error = describe(d, rc, "zeroing the gradients");
    return false;
  }

  KernelArgs args;
  args.q = dev(q.data);
  args.k = dev(k.data);
  args.v = dev(v.data);
  args.lengths = lengths ? dev(lengths->data) : 0;
  args.out = dev(out.data);
  args.lse = dev(lse.data);
  args.keyBias = keyBias ? dev(keyBias->data) : 0;
  args.kvRows = Lk;
  args.B = B;
  args.H = H;
  args.Hkv = Hkv;
  args.D = D;
  args.Lq = Lq;
  args.Lk = Lk;
  args.qOrigin = args.qPos = Lk - Lq; // bottom-right, as runGpu
  setStrides(args, q, k, out); // (checked by runBackward; grad_out has q's)
  args.gradOut = dev(gradOut.data);
  args.dq = dev(dq.data);
  args.dk = dev(dk.data);
  args.dv = dev(dv.data);
  args.delta = delta.ptr;
  if (store) {
    args.gradStore = 1;
    std::vector<int64_t> dqs = stridesOf(dq), dks = stridesOf(dk);
    std::copy(dqs.begin(), dqs.begin() + 3, args.dqStrides);
    std::copy(dks.begin(), dks.begin() + 3, args.dkStrides);
  }
  // A package that finishes the gradients: every component's kernels take
  // the stored gradients and the float32 sums, and write each element of
  // theirs into one or the other (docs/Backward.md, "Finished gradients").
  // The sums may hold a round of P (batch, head) pairs rather than all of
  // them (checkGradientSums): grad_prepare, over every row, runs first,
  // then every component's kernels for pairs [first, first + P), the sums
  // zeroed before each round and addressed from the round's first pair.
  // The kernels index the sums by the global pair (bhOffset + blockIdx.z,
  // and its kv head for dk and dv), so each round passes the sums' base
  // moved back by its first pair's elements: the round's rows land at the
  // start of the buffer. A round holds whole groups of the G q heads of a
  // kv head, whose grad_kv blocks add into the same dk and dv rows.
  const int64_t group = H / Hkv;
  const char *overlapEnv = std::getenv("ATTN_GPU_BACKWARD_OVERLAP");
  const bool overlap =
      g.dependentLaunch && !(overlapEnv && std::string(overlapEnv) == "0");
  const int64_t pairs = sums && sums[0].shape.size() == 3
                            ? std::min(sums[0].shape[0], B * H)
                            : B * H;
  for (const GpuKernel &kernel : g.gradKernels)
    if (kernel.kind == "grad_prepare" &&
        !launchKernel(g, kernel, args, stream, error))
      return false;
  for (int64_t first = 0; first < B * H; first += pairs) {
    args.bhOffset = first;
    args.bhCount = std::min(pairs, B * H - first);
    if (sums) {
      const size_t qElements = size_t(args.bhCount) * Lq * D;
      const size_t kvElements = size_t(args.bhCount / group) * Lk * D;
      for (auto [t, n] : {std::pair{&sums[0], qElements},
                          {&sums[1], kvElements},
                          {&sums[2], kvElements}})
        if (rc == CUDA_SUCCESS && !g.overwritesGrads)
          rc = d.cuMemsetD8Async(dev(t->data), 0, n * 4, stream);
      if (rc != CUDA_SUCCESS) {
        error = describe(d, rc, "zeroing the gradients' float32 sums");
        return false;
      }
      const size_t qBefore = size_t(first) * Lq * D * 4;
      const size_t kvBefore = size_t(first / group) * Lk * D * 4;
      args.dqSum = dev(sums[0].data) - qBefore;
      args.dkSum = dev(sums[1].data) - kvBefore;
      args.dvSum = dev(sums[2].data) - kvBefore;
    }
    // Each kernel after the round's first starts as a programmatic
    // dependent launch of the one before: its key or query loop, which
    // reads only the inputs, delta and lse, overlaps the tail of the kernel
    // before, and it waits for that kernel (griddepcontrol.wait) before it
    // writes the gradients or their sums and again before it exits, so the
    // round's kernels complete in order (docs/Backward.md). The round's
    // first launches plainly, after grad_prepare and the sums' zeroing.
    // ATTN_GPU_BACKWARD_OVERLAP=0 launches every kernel plainly (A/B runs).
    bool firstOfRound = true;
    for (const GpuKernel &kernel : g.gradKernels) {
      if (kernel.kind == "grad_add" || kernel.kind == "grad_prepare")
        continue;
      const bool dependent =
          overlap && !firstOfRound && args.bhCount <= maxPairsPerLaunch(H);
      if (!launchKernel(g, kernel, args, stream, error, dependent))
        return false;
      firstOfRound = false;
    }
  }
  if (!delta.release(d, stream, error))
    return false;
  return delta.recordCall(d, g.stateOrder, stream, error);
}

bool Package::storesGradients() const { return gpu_ && gpu_->storesGrads; }

bool Package::finishesGradients() const {
  return gpu_ && gpu_->finishesGrads;
}

int64_t Package::dedupMaxLen() const {
  return gpu_ ? gpu_->dedupMaxLen : 0;
}

bool Package::dedupKeys(const DedupKeys &a, std::string &error,
                        void *streamPtr) {
  if (!gpu_ || gpu_->dedupKernels.empty()) {
    error = "package " + name_ +
            " has no dedup_keys kernel (GPU packages compiled with "
            "\"key_ids\": true have one)";
    return false;
  }
  GpuModule &g = *gpu_;
  const Driver &d = *g.d;
  if (a.batch < 1 || a.seqLen < 1 || a.seqLen > g.dedupMaxLen) {
    error = "dedup_keys takes B >= 1 sequences of 1 to " +
            std::to_string(g.dedupMaxLen) + " ids, got B = " +
            std::to_string(a.batch) + ", L = " + std::to_string(a.seqLen);
    return false;
  }
  for (auto [name, data] :
       {std::pair{"tokens", a.tokens}, {"lengths", a.lengths},
        {"key_ids", static_cast<const void *>(a.keyIds)},
        {"key_bias", static_cast<const void *>(a.keyBias)},
        {"slot_at", static_cast<const void *>(a.slotAt)},
        {"info", static_cast<const void *>(a.info)}})
    if (!data || uintptr_t(data) % 8 != 0) {
      error = std::string("dedup_keys: ") + name +
              (data ? " is not 8-byte aligned" : " is null");
      return false;
    }
  if (!ensureContext(d, error) || !checkContext(g, name_, error))
    return false;
  // The sort size: the least power of two >= L (DedupKernel.h).
  int64_t logP = 0;
  while ((int64_t(1) << logP) < a.seqLen)
    ++logP;
  const int64_t n = a.batch * a.seqLen;
  // Six memref descriptors (allocated, aligned, offset, size, stride),
  // then L and logP.
  int64_t words[6 * 5 + 2];
  auto put = [&](int slot, const void *ptr, int64_t size) {
    putMemref(words + 5 * slot, uintptr_t(ptr), size);
  };
  put(0, a.tokens, n);
  put(1, a.lengths, a.batch);
  put(2, a.keyIds, n);
  put(3, a.keyBias, n);
  put(4, a.slotAt, n);
  put(5, a.info, 4 * a.batch);
  words[30] = a.seqLen;
  words[31] = logP;
  void *params[32];
  for (int i = 0; i < 32; ++i)
    params[i] = &words[i];
  std::lock_guard<std::mutex> lock(g.mutex);
  // The chunk kernels take a grid of (B, chunks) and run only where a
  // sequence has more than one chunk; dedup_keys takes one block a
  // sequence and sorts a single chunk itself (DedupKernel.h). (The
  // sequences on x, whose grids hold 2^31 - 1 blocks, any batch.)
  for (const GpuKernel &k : g.dedupKernels) {
    unsigned grid[2] = {unsigned(a.batch), 1};
    if (k.kind != "dedup_keys") {
      if ((int64_t(1) << logP) <= k.chunk)
        continue;
      grid[1] = unsigned((a.seqLen + k.chunk - 1) / k.chunk);
    }
    CUresult rc = d.cuLaunchKernel(
        k.function, grid[0], grid[1], 1, unsigned(k.block), 1, 1,
        unsigned(k.sharedBytes), static_cast<CUstream>(streamPtr), params,
        nullptr);
    if (rc != CUDA_SUCCESS) {
      error = describe(d, rc, "launching " + k.name);
      return false;
    }
  }
  return true;
}
