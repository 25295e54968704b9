//===- GpuRanks.cpp - attn-run --nranks N for GPU ring packages -----------===//
//
// Forks one process per GPU (rank r on device r) before any CUDA call. Rank 0
// makes the NCCL id and publishes it in shared memory; every rank joins the
// ring and runs runRankFromHost (lib/Runtime/GpuRing.cpp): its rows of the
// global float32 inputs by the package's layout, in the package dtype, its
// part --repeat times (timed with CUDA events), and its rows of the output
// and LSE written into shared memory; the parent writes the .npy files and reports bytes and times.
// A rank that fails records its error and the parent stops the others.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/CudaDriver.h"
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
  if (!d)
    return error;
  int gpus = 0;
  if (d->cuDeviceGetCount(&gpus) == CUDA_SUCCESS && r >= gpus)
    return "rank " + std::to_string(r) + " runs on GPU " + std::to_string(r) +
           ", but this machine has " + std::to_string(gpus) +
           " GPU(s): run with --gpus 1 to put every rank on GPU 0 (to check "
           "the package), or on a machine with " + std::to_string(N) +
           " GPUs";
  if (!ensureContext(*d, error, r))
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

  auto tensor = [](const NpyArray &a) {
    return Tensor{const_cast<char *>(a.data.data()), a.shape, "f32"};
  };
  std::vector<int32_t> noLengths;
  Tensor tn{const_cast<int32_t *>(lengths ? lengths->data() : noLengths.data()),
            {q.shape[0]}, "i32"};
  RingStats stats;
  float best = 0;
  if (!runRankFromHost(*pkg, *transport, tensor(q), tensor(k), tensor(v),
                       lengths ? &tn : nullptr, out, lse, repeat, stats, best,
                       error))
    return error;
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
