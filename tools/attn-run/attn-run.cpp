//===- attn-run.cpp - run a compiled attention package --------------------===//
//
//   attn-run PKG --q q.npy --k k.npy --v v.npy [--lengths len.npy]
//            -o out.npy [--lse lse.npy] [--device cpu|cuda] [--repeat N]
//            [--nranks N [--gpus 1]]
//
// Reads float32 .npy inputs (lengths int32 or int64), runs the package and
// writes float32 outputs. GPU packages (--device cuda, the default for them)
// get their inputs converted to the package's bf16/f16 and copied to the
// GPU; --repeat times the kernels with CUDA events. A ring package (a spec
// with a distribution section) runs its N ranks as N threads of this process
// on the whole sequence (--nranks N must match) and reports the bytes each
// rank sent and the time of each step; a GPU ring package runs one process
// per GPU over NCCL, or with --gpus 1 every rank as a thread on GPU 0. Links only the runtime:
// no MLIR, no LLVM.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Half.h"
#include "attn/Runtime/Npy.h"
#include "attn/Runtime/Package.h"
#include "attn/Runtime/Ring.h"
#include "attn/Utils/WholeNumber.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <map>
#include <string>

using namespace attn::runtime;

static const char *kUsage =
    "usage: attn-run PKG --q q.npy --k k.npy --v v.npy "
    "[--lengths len.npy] -o out.npy [--lse lse.npy] "
    "[--device cpu|cuda] [--repeat N] [--nranks N [--gpus 1]]\n"
    "\n"
    "Runs a package on inputs from .npy files and writes its output.\n"
    "\n"
    "  --q, --k, --v F   float32 q [B,H,Lq,D], k and v [B,Hkv,Lk,D]\n"
    "                    (converted to a GPU package's bf16 or f16)\n"
    "  --lengths F       valid lengths per batch (int32 or int64), for\n"
    "                    packages compiled with lengths\n"
    "  -o, --out F       the output [B,H,Lq,D]\n"
    "  --lse F           also the log-sum-exp [B,H,Lq]\n"
    "  --device D        cpu or cuda (default: the package's target)\n"
    "  --repeat N        run N times and print the best time\n"
    "  --nranks N        ring packages: their number of ranks, run as one\n"
    "                    process per GPU (cuda) or in this process (cpu)\n"
    "  --gpus G          GPU ring packages: N (default: rank r on GPU r,\n"
    "                    NCCL) or 1 (every rank as a thread on GPU 0,\n"
    "                    device-to-device copies; to check a package on\n"
    "                    one GPU, not to time the ring)\n";

/// The usage text on stderr, for a command line that cannot run.
static int usage() {
  std::fputs(kUsage, stderr);
  return 2;
}

static int fail(const std::string &message) {
  std::fprintf(stderr, "attn-run: error: %s\n", message.c_str());
  return 1;
}

// GpuRanks.cpp
int runGpuRanks(const std::string &pkgDir, int ranks, const NpyArray &q,
                const NpyArray &k, const NpyArray &v,
                const std::vector<int32_t> *lengths, const std::string &outPath,
                const std::string &lsePath, int repeat);

/// Converts the f32 host tensors to the package dtype, runs on the GPU with
/// poisoned outputs, copies back and writes the .npy files.
static int runOnGpu(Package &pkg, const Tensor &q, const Tensor &k,
                    const Tensor &v, const Tensor *lengths, Tensor &out,
                    Tensor *lse, int repeat, const std::string &outPath,
                    const std::string &lsePath) {
  using namespace attn::runtime::cuda;
  std::string error;
  const Driver *d = driver(error);
  if (!d || !ensureContext(*d, error))
    return fail(error);
  const std::string dtype = pkg.args().front().dtype;
  const bool bf16 = dtype == "bf16";
  auto count = [](const std::vector<int64_t> &s) {
    int64_t n = 1;
    for (int64_t x : s)
      n *= x;
    return n;
  };
  if (lengths)
    for (int64_t b = 0; b < count(lengths->shape); ++b) {
      int32_t l = static_cast<const int32_t *>(lengths->data)[b];
      if (k.shape.size() == 4 && (l < 0 || l > k.shape[2]))
        return fail("lengths[" + std::to_string(b) + "] = " + std::to_string(l) +
                    " is outside [0, Lk = " + std::to_string(k.shape[2]) + "]");
    }
  std::vector<CUdeviceptr> allocations;
  auto cleanup = [&]() {
    for (CUdeviceptr p : allocations)
      d->cuMemFree(p);
  };
  auto upload = [&](const void *host, size_t bytes, CUdeviceptr &dev) {
    CUresult rc = d->cuMemAlloc(&dev, bytes ? bytes : 4);
    if (rc != CUDA_SUCCESS) {
      error = describe(*d, rc, "allocating " + std::to_string(bytes) + " bytes");
      return false;
    }
    allocations.push_back(dev);
    rc = d->cuMemcpyHtoD(dev, host, bytes);
    if (rc != CUDA_SUCCESS)
      error = describe(*d, rc, "copying to the GPU");
    return rc == CUDA_SUCCESS;
  };
  auto toHalf = [&](const Tensor &t) {
    std::vector<uint16_t> h(count(t.shape));
    const float *f = static_cast<const float *>(t.data);
    for (size_t i = 0; i < h.size(); ++i)
      h[i] = bf16 ? floatToBf16(f[i]) : floatToF16(f[i]);
    return h;
  };
  // Device tensors; outputs poisoned with NaN (0xffff in both dtypes).
  Tensor dq = q, dk = k, dv = v, dout = out, dlse, dlen;
  CUdeviceptr pq, pk, pv, pout, plse = 0, plen = 0;
  auto hq = toHalf(q), hk = toHalf(k), hv = toHalf(v);
  std::vector<uint16_t> hout(count(out.shape), 0xffff);
  std::vector<float> hlse(lse ? count(lse->shape) : 0, std::nanf(""));
  bool ok = upload(hq.data(), hq.size() * 2, pq) &&
            upload(hk.data(), hk.size() * 2, pk) &&
            upload(hv.data(), hv.size() * 2, pv) &&
            upload(hout.data(), hout.size() * 2, pout) &&
            (!lse || upload(hlse.data(), hlse.size() * 4, plse)) &&
            (!lengths ||
             upload(lengths->data, count(lengths->shape) * 4, plen));
  if (!ok)
    return cleanup(), fail(error);
  auto asPtr = [](CUdeviceptr p) { return reinterpret_cast<void *>(uintptr_t(p)); };
  dq.data = asPtr(pq), dq.dtype = dtype;
  dk.data = asPtr(pk), dk.dtype = dtype;
  dv.data = asPtr(pv), dv.dtype = dtype;
  dout.data = asPtr(pout), dout.dtype = dtype;
  if (lse)
    dlse = {asPtr(plse), lse->shape, "f32"};
  if (lengths)
    dlen = {asPtr(plen), lengths->shape, "i32"};

  CUevent start = nullptr, stop = nullptr;
  d->cuEventCreate(&start, 0);
  d->cuEventCreate(&stop, 0);
  float best = 1e30f;
  for (int r = 0; r < repeat; ++r) {
    d->cuEventRecord(start, nullptr);
    if (!pkg.run(dq, dk, dv, lengths ? &dlen : nullptr, dout,
                 lse ? &dlse : nullptr, error))
      return cleanup(), fail(error);
    d->cuEventRecord(stop, nullptr);
    CUresult rc = d->cuEventSynchronize(stop);
    if (rc != CUDA_SUCCESS)
      return cleanup(), fail(describe(*d, rc, "running " + pkg.name()));
    float ms = 0;
    d->cuEventElapsedTime(&ms, start, stop);
    best = std::min(best, ms);
  }
  d->cuEventDestroy(start);
  d->cuEventDestroy(stop);
  if (repeat > 1)
    std::printf("attn-run: best of %d runs: %.3f ms (GPU events)\n", repeat,
                best);
  CUresult rc = d->cuMemcpyDtoH(hout.data(), pout, hout.size() * 2);
  if (rc == CUDA_SUCCESS && lse)
    rc = d->cuMemcpyDtoH(hlse.data(), plse, hlse.size() * 4);
  if (rc != CUDA_SUCCESS)
    return cleanup(), fail(describe(*d, rc, "copying results back"));
  cleanup();
  std::vector<float> result(hout.size());
  for (size_t i = 0; i < hout.size(); ++i)
    result[i] = bf16 ? bf16ToFloat(hout[i]) : f16ToFloat(hout[i]);
  if (!writeNpy(outPath, out.shape, result.data(), error))
    return fail(error);
  if (lse && !writeNpy(lsePath, lse->shape, hlse.data(), error))
    return fail(error);
  return 0;
}

int main(int argc, char **argv) {
  std::string pkgDir;
  std::map<std::string, std::string> opts{{"--device", "auto"},
                                          {"--repeat", "1"}};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help")
      return std::fputs(kUsage, stdout), 0;
    if (a == "-o")
      a = "--out";
    if (a.rfind("--", 0) == 0) {
      static const char *known[] = {"--q", "--k", "--v", "--lengths", "--out",
                                    "--lse", "--device", "--repeat",
                                    "--nranks", "--gpus"};
      if (std::find(std::begin(known), std::end(known), a) == std::end(known))
        return fail("unknown option " + a), usage();
      if (i + 1 >= argc)
        return fail(a + " needs a value");
      opts[a] = argv[++i];
    } else if (pkgDir.empty()) {
      pkgDir = a;
    } else {
      return fail("unexpected argument " + a);
    }
  }
  if (pkgDir.empty())
    return usage();
  for (const char *required : {"--q", "--k", "--v", "--out"})
    if (!opts.count(required))
      return fail(std::string("missing ") + required);
  std::string device = opts["--device"];
  if (device != "cpu" && device != "cuda" && device != "auto")
    return fail("--device must be cpu or cuda, got " + device);
  // Whole numbers >= 1, or an error naming the option (not atoi's 0 for
  // "x" or 5 for "5x").
  auto count = [&](const char *option, int64_t &value) {
    std::string message;
    if (::attn::parseWholeNumber(option, opts[option], 1, value, message))
      return true;
    fail(message);
    return false;
  };
  int64_t repeats = 1, nranks = 0, gpus = 0;
  if (!count("--repeat", repeats) ||
      (opts.count("--nranks") && !count("--nranks", nranks)) ||
      (opts.count("--gpus") && !count("--gpus", gpus)))
    return 1;
  if (repeats > 1000000)
    return fail("--repeat takes at most 1000000, got " + opts["--repeat"]);
  const int repeat = int(repeats);

  std::string error, target;
  int64_t packageRanks = 0;
  if (!Package::peek(pkgDir, target, packageRanks, error))
    return fail(error);
  const bool gpu = target != "cpu";
  if (device == "auto")
    device = gpu ? "cuda" : "cpu";
  if (device == "cuda" && !gpu)
    return fail("package " + pkgDir + " targets cpu; --device cuda needs a "
                "package compiled with --target sm_90a or sm_80");
  if (device == "cpu" && gpu)
    return fail("package " + pkgDir + " targets " + target +
                "; run it with --device cuda (or compile with --target cpu)");
  if (opts.count("--nranks") && packageRanks == 0)
    return fail("--nranks given but package " + pkgDir +
                " is not distributed (compile a spec with a \"distribution\" section)");
  if (packageRanks > 0 && nranks != packageRanks)
    return fail("package " + pkgDir + " is compiled for " +
                std::to_string(packageRanks) + " ranks; pass --nranks " +
                std::to_string(packageRanks));
  if (opts.count("--gpus") && !(gpu && packageRanks > 0))
    return fail("--gpus is for GPU ring packages; " + pkgDir + " is " +
                (gpu ? "not distributed" : "a cpu package"));
  if (opts.count("--gpus") && gpus != 1 && gpus != packageRanks)
    return fail("--gpus takes 1 (every rank on GPU 0) or " +
                std::to_string(packageRanks) + " (one GPU per rank), got " +
                opts["--gpus"]);
  const bool ranksOnOneGpu = gpus == 1 && packageRanks > 1;

  NpyArray q, k, v, len;
  for (auto [name, array] : {std::pair<const char *, NpyArray *>{"--q", &q},
                             {"--k", &k}, {"--v", &v}}) {
    if (!readNpy(opts[name], *array, error))
      return fail(error);
    if (array->dtype != "f32")
      return fail(opts[name] + ": " + (name + 2) + " must be float32, got " +
                  array->dtype);
  }
  std::vector<int32_t> lengths32;
  Tensor lengthsTensor;
  if (opts.count("--lengths")) {
    if (!readNpy(opts["--lengths"], len, error))
      return fail(error);
    if (len.dtype == "f32")
      return fail(opts["--lengths"] + ": lengths must be int32 or int64");
    for (int64_t i = 0; i < len.numElements(); ++i)
      lengths32.push_back(len.dtype == "i32"
                              ? reinterpret_cast<int32_t *>(len.data.data())[i]
                              : int32_t(reinterpret_cast<int64_t *>(len.data.data())[i]));
    lengthsTensor = {lengths32.data(), len.shape, "i32"};
  }

  // GPU ring packages: one process per GPU, forked before any CUDA call
  // (with --gpus 1, threads of this process: the in-process ring below).
  if (gpu && packageRanks > 0 && !ranksOnOneGpu)
    return runGpuRanks(pkgDir, int(packageRanks), q, k, v,
                       opts.count("--lengths") ? &lengths32 : nullptr,
                       opts["--out"], opts.count("--lse") ? opts["--lse"] : "",
                       repeat);

  auto pkg = Package::load(pkgDir, error);
  if (!pkg)
    return fail(error);

  auto tensor = [](NpyArray &a) { return Tensor{a.data.data(), a.shape, "f32"}; };
  Tensor tq = tensor(q), tk = tensor(k), tv = tensor(v);
  // Outputs start poisoned with NaN so that an element the kernel skips shows.
  std::vector<float> out(q.numElements(), std::nanf(""));
  std::vector<int64_t> lseShape(q.shape.begin(), q.shape.end() - (q.shape.empty() ? 0 : 1));
  std::vector<float> lse(q.shape.size() == 4 ? q.shape[0] * q.shape[1] * q.shape[2] : 0,
                         std::nanf(""));
  Tensor tout{out.data(), q.shape, "f32"}, tlse{lse.data(), lseShape, "f32"};
  bool wantLse = opts.count("--lse");
  if (wantLse && !pkg->hasLse())
    return fail("--lse given but package " + pkgDir + " was compiled with \"lse\": false");

  const RingProgram *ring = pkg->ring();
  if (ring) {
    std::vector<RingStats> stats;
    auto t0 = std::chrono::steady_clock::now();
    if (!runRanksInProcess(*pkg, tq, tk, tv,
                           opts.count("--lengths") ? &lengthsTensor : nullptr,
                           tout, wantLse ? &tlse : nullptr, stats, error))
      return fail(error);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("attn-run: %lld ranks (%s layout, in-process transport%s): "
                "%.3f ms\n",
                (long long)ring->ranks, ring->layout.c_str(),
                pkg->isGpu() ? ", all on GPU 0" : "", s * 1e3);
    for (const RingStats &r : stats) {
      // (On one GPU the ranks' steps are not timed: the copies between them
      // are synchronous, nothing like a ring's.)
      if (pkg->isGpu()) {
        std::printf("  rank %d: sent %lld bytes in %zu steps\n", r.rank,
                    (long long)r.bytesSent, r.steps.size());
        continue;
      }
      std::printf("  rank %d: sent %lld bytes in %zu steps, %.3f ms\n", r.rank,
                  (long long)r.bytesSent, r.steps.size(), r.seconds * 1e3);
      for (const RingStats::Step &st : r.steps)
        std::printf("    step %lld: sent %lld bytes, %lld updates, %.3f ms\n",
                    (long long)st.step, (long long)st.bytesSent,
                    (long long)st.updates, st.seconds * 1e3);
    }
    if (!writeNpy(opts["--out"], q.shape, out.data(), error))
      return fail(error);
    if (wantLse && !writeNpy(opts["--lse"], lseShape, lse.data(), error))
      return fail(error);
    return 0;
  }

  if (pkg->isGpu())
    return runOnGpu(*pkg, tq, tk, tv,
                    opts.count("--lengths") ? &lengthsTensor : nullptr, tout,
                    wantLse ? &tlse : nullptr, repeat, opts["--out"],
                    wantLse ? opts["--lse"] : "");

  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    if (!pkg->run(tq, tk, tv, opts.count("--lengths") ? &lengthsTensor : nullptr,
                  tout, wantLse ? &tlse : nullptr, error))
      return fail(error);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  if (repeat > 1)
    std::printf("attn-run: best of %d runs: %.3f ms\n", repeat, best * 1e3);
  if (!writeNpy(opts["--out"], q.shape, out.data(), error))
    return fail(error);
  if (wantLse && !writeNpy(opts["--lse"], lseShape, lse.data(), error))
    return fail(error);
  return 0;
}
