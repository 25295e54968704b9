//===- GpuRanks.cpp - attn-run --nranks N for GPU ring packages -----------===//
//
// Forks one process per GPU (rank r on device r) before any CUDA call. Rank 0
// makes the NCCL id and publishes it in shared memory; every rank joins the
// ring, takes its rows of the global float32 inputs by the package's layout,
// converts them to the package dtype, runs its part (--repeat times, timed
// with CUDA events), and writes its rows of the output and LSE into shared
// memory; the parent writes the .npy files and reports bytes and times.
// A rank that fails records its error and the parent stops the others.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Half.h"
#include "attn/Runtime/Npy.h"
#include "attn/Runtime/Package.h"
#include "attn/Runtime/Ring.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <sys/mman.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace attn::runtime;
using namespace attn::runtime::cuda;

namespace {
struct Shared {
  std::atomic<int> idReady;
  NcclId id;
  struct Rank {
    int done; // 1 ok, -1 failed
    char error[1024];
    int64_t bytesSent;
    float ms;
  } ranks[64];
};

int64_t count(const std::vector<int64_t> &s) {
  int64_t n = 1;
  for (int64_t x : s)
    n *= x;
  return n;
}

/// Rank `r`'s whole program; returns an error message or "".
std::string runRank(const std::string &pkgDir, int r, int N, Shared *sh,
                    const NpyArray &q, const NpyArray &k, const NpyArray &v,
                    const std::vector<int32_t> *lengths, float *out,
                    float *lse, int repeat) {
  std::string error;
  const Driver *d = driver(error);
  if (!d || !ensureContext(*d, error, r))
    return error;
  auto pkg = Package::load(pkgDir, error);
  if (!pkg)
    return error;
  if (r == 0) {
    if (!ncclUniqueId(sh->id, error))
      return error;
    sh->idReady.store(1);
  }
  for (int waited = 0; !sh->idReady.load(); ++waited) {
    if (waited > 60000)
      return "timed out waiting for rank 0's NCCL id";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  auto transport = ncclTransport(r, N, sh->id, pkg->name() + ":" + pkg->specJson(),
                                 error);
  if (!transport)
    return error;

  const RingProgram &ring = *pkg->ring();
  // C query rows of L (q, out, lse) and Ck key rows of Lk (k, v).
  const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3],
                Hkv = k.shape[1], L = q.shape[2], C = ring.qChunk,
                Lk = k.shape[2], Ck = ring.kvChunk;
  if (L != ring.qLen)
    return "q has " + std::to_string(L) + " rows but the package splits " +
           std::to_string(ring.qLen);
  if (Lk != ring.kvLen || v.shape[2] != Lk)
    return "k and v have " + std::to_string(Lk) + " and " +
           std::to_string(v.shape[2]) + " rows but the package splits " +
           std::to_string(ring.kvLen);
  const bool bf16 = pkg->args().front().dtype == "bf16";
  auto local = [&](const NpyArray &a, int64_t heads, bool keys) {
    const int64_t rows = keys ? Ck : C, whole = keys ? Lk : L;
    std::vector<uint16_t> h(B * heads * rows * D);
    const float *f = reinterpret_cast<const float *>(a.data.data());
    for (int64_t s = 0; s < B * heads; ++s)
      for (int64_t row = 0; row < rows; ++row) {
        const float *src = f + (s * whole + ring.globalRow(r, row, keys)) * D;
        uint16_t *dst = h.data() + (s * rows + row) * D;
        for (int64_t x = 0; x < D; ++x)
          dst[x] = bf16 ? floatToBf16(src[x]) : floatToF16(src[x]);
      }
    return h;
  };
  std::vector<CUdeviceptr> allocs;
  auto upload = [&](const void *host, size_t bytes) -> CUdeviceptr {
    CUdeviceptr p = 0;
    if (d->cuMemAlloc(&p, bytes ? bytes : 4) != CUDA_SUCCESS)
      return 0;
    allocs.push_back(p);
    if (bytes)
      d->cuMemcpyHtoD(p, host, bytes);
    return p;
  };
  auto hq = local(q, H, false), hk = local(k, Hkv, true),
       hv = local(v, Hkv, true);
  std::vector<uint16_t> hout(hq.size(), 0xffff);
  std::vector<float> hlse(B * H * C, std::nanf(""));
  CUdeviceptr pq = upload(hq.data(), hq.size() * 2),
              pk = upload(hk.data(), hk.size() * 2),
              pv = upload(hv.data(), hv.size() * 2),
              po = upload(hout.data(), hout.size() * 2),
              pl = upload(hlse.data(), hlse.size() * 4),
              pn = lengths ? upload(lengths->data(), lengths->size() * 4) : 0;
  if (!pq || !pk || !pv || !po || !pl || (lengths && !pn))
    return "rank " + std::to_string(r) + ": out of GPU memory for the inputs";
  auto ptr = [](CUdeviceptr p) { return reinterpret_cast<void *>(uintptr_t(p)); };
  const std::string dt = bf16 ? "bf16" : "f16";
  Tensor tq{ptr(pq), {B, H, C, D}, dt}, tk{ptr(pk), {B, Hkv, Ck, D}, dt},
      tv{ptr(pv), {B, Hkv, Ck, D}, dt}, to{ptr(po), {B, H, C, D}, dt},
      tl{ptr(pl), {B, H, C}, "f32"}, tn{ptr(pn), {B}, "i32"};
  CUevent start, stop;
  d->cuEventCreate(&start, 0);
  d->cuEventCreate(&stop, 0);
  float best = 1e30f;
  RingStats stats;
  for (int i = 0; i < repeat; ++i) {
    d->cuEventRecord(start, nullptr);
    if (!pkg->runRank(*transport, tq, tk, tv, lengths ? &tn : nullptr, to,
                      pkg->hasLse() ? &tl : nullptr, &stats, error, nullptr) ||
        !pkg->waitRank(*transport, nullptr, 300, error))
      return error;
    d->cuEventRecord(stop, nullptr);
    d->cuEventSynchronize(stop);
    float ms = 0;
    d->cuEventElapsedTime(&ms, start, stop);
    best = std::min(best, ms);
  }
  d->cuMemcpyDtoH(hout.data(), po, hout.size() * 2);
  d->cuMemcpyDtoH(hlse.data(), pl, hlse.size() * 4);
  for (CUdeviceptr p : allocs)
    d->cuMemFree(p);
  for (int64_t s = 0; s < B * H; ++s)
    for (int64_t row = 0; row < C; ++row) {
      int64_t g = ring.globalRow(r, row);
      for (int64_t x = 0; x < D; ++x) {
        uint16_t h = hout[(s * C + row) * D + x];
        out[(s * L + g) * D + x] = bf16 ? bf16ToFloat(h) : f16ToFloat(h);
      }
      lse[s * L + g] = hlse[s * C + row];
    }
  sh->ranks[r].bytesSent = stats.bytesSent;
  sh->ranks[r].ms = best;
  return "";
}
} // namespace

int runGpuRanks(const std::string &pkgDir, int N, const NpyArray &q,
                const NpyArray &k, const NpyArray &v,
                const std::vector<int32_t> *lengths, const std::string &outPath,
                const std::string &lsePath, int repeat) {
  if (N > 64 || q.shape.size() != 4) {
    std::fprintf(stderr, "attn-run: error: expected q [B,H,L,D] and at most 64 ranks\n");
    return 1;
  }
  size_t outN = count(q.shape), lseN = outN / q.shape[3];
  size_t bytes = sizeof(Shared) + (outN + lseN) * sizeof(float);
  void *mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    std::fprintf(stderr, "attn-run: error: cannot map %zu bytes of shared memory\n", bytes);
    return 1;
  }
  auto *sh = new (mem) Shared();
  float *out = reinterpret_cast<float *>(static_cast<char *>(mem) + sizeof(Shared));
  float *lse = out + outN;
  std::fill(out, out + outN, std::nanf(""));
  std::fill(lse, lse + lseN, std::nanf(""));

  std::vector<pid_t> pids;
  for (int r = 0; r < N; ++r) {
    pid_t pid = fork();
    if (pid == 0) {
      std::string err = runRank(pkgDir, r, N, sh, q, k, v, lengths, out, lse, repeat);
      sh->ranks[r].done = err.empty() ? 1 : -1;
      std::snprintf(sh->ranks[r].error, sizeof(sh->ranks[r].error), "%s", err.c_str());
      std::fflush(nullptr);
      _exit(err.empty() ? 0 : 1);
    }
    pids.push_back(pid);
  }
  // Wait; once a rank fails, give the others a moment, then stop them.
  int failed = -1, left = N;
  auto failedAt = std::chrono::steady_clock::now();
  while (left > 0) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      --left;
      int r = int(std::find(pids.begin(), pids.end(), pid) - pids.begin());
      if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && failed < 0) {
        failed = r;
        failedAt = std::chrono::steady_clock::now();
        if (sh->ranks[r].done == 0)
          std::snprintf(sh->ranks[r].error, sizeof(sh->ranks[r].error),
                        "rank %d died (signal %d)", r,
                        WIFSIGNALED(status) ? WTERMSIG(status) : 0);
      }
      continue;
    }
    if (failed >= 0 && std::chrono::steady_clock::now() - failedAt >
                           std::chrono::seconds(10))
      for (pid_t p : pids)
        kill(p, SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (failed >= 0) {
    std::fprintf(stderr, "attn-run: error: %s\n", sh->ranks[failed].error);
    return 1;
  }
  std::printf("attn-run: %d ranks on %d GPUs (NCCL)\n", N, N);
  for (int r = 0; r < N; ++r)
    std::printf("  rank %d: sent %lld bytes, best of %d: %.3f ms\n", r,
                (long long)sh->ranks[r].bytesSent, repeat, sh->ranks[r].ms);
  std::string error;
  std::vector<int64_t> lseShape(q.shape.begin(), q.shape.end() - 1);
  bool ok = writeNpy(outPath, q.shape, out, error) &&
            (lsePath.empty() || writeNpy(lsePath, lseShape, lse, error));
  munmap(mem, bytes);
  if (!ok) {
    std::fprintf(stderr, "attn-run: error: %s\n", error.c_str());
    return 1;
  }
  return 0;
}
