//===- Exchange.cpp - all-to-all of variable-sized blocks -----------------===//
//
// See Exchange.h: N-1 pairwise steps over the ring's Transport, and a copy
// of the rank's own block.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/Exchange.h"
#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Ring.h"

#include <cstring>

using namespace attn::runtime;

bool attn::runtime::allToAll(Transport &t, int64_t tag, const void *send,
                             const std::vector<int64_t> &sendBytes, void *recv,
                             const std::vector<int64_t> &recvBytes,
                             bool device, void *stream, std::string &error) {
  const int n = t.size(), r = t.rank();
  if (int(sendBytes.size()) != n || int(recvBytes.size()) != n) {
    error = "all-to-all: " + std::to_string(sendBytes.size()) + " send and " +
            std::to_string(recvBytes.size()) + " receive sizes for " +
            std::to_string(n) + " ranks";
    return false;
  }
  std::vector<int64_t> sendAt(n + 1, 0), recvAt(n + 1, 0);
  for (int p = 0; p < n; ++p) {
    if (sendBytes[p] < 0 || recvBytes[p] < 0) {
      error = "all-to-all: negative block size for rank " + std::to_string(p);
      return false;
    }
    sendAt[p + 1] = sendAt[p] + sendBytes[p];
    recvAt[p + 1] = recvAt[p] + recvBytes[p];
  }
  if (sendBytes[r] != recvBytes[r]) {
    error = "all-to-all: rank " + std::to_string(r) + " sends itself " +
            std::to_string(sendBytes[r]) + " bytes but expects " +
            std::to_string(recvBytes[r]);
    return false;
  }
  const char *s = static_cast<const char *>(send);
  char *d = static_cast<char *>(recv);
  // The rank's own block.
  if (recvBytes[r] > 0) {
    if (device) {
      const cuda::Driver *drv = cuda::driver(error);
      if (!drv)
        return false;
      cuda::CUresult rc = drv->cuMemcpyDtoDAsync(
          cuda::CUdeviceptr(uintptr_t(d + recvAt[r])),
          cuda::CUdeviceptr(uintptr_t(s + sendAt[r])), size_t(recvBytes[r]),
          static_cast<cuda::CUstream>(stream));
      if (rc != cuda::CUDA_SUCCESS) {
        error = cuda::describe(*drv, rc, "all-to-all: copying rank " +
                                             std::to_string(r) + "'s own block");
        return false;
      }
    } else {
      std::memcpy(d + recvAt[r], s + sendAt[r], size_t(recvBytes[r]));
    }
  }
  for (int step = 1; step < n; ++step) {
    const int to = (r + step) % n, from = (r - step + n) % n;
    const int64_t id = tag * n + step;
    bool ok = device
                  ? t.exchangeDevice(id, to, uint64_t(uintptr_t(s + sendAt[to])),
                                     size_t(sendBytes[to]), from,
                                     uint64_t(uintptr_t(d + recvAt[from])),
                                     size_t(recvBytes[from]), stream, error)
                  : t.exchange(id, to, s + sendAt[to], size_t(sendBytes[to]),
                               from, d + recvAt[from], size_t(recvBytes[from]),
                               error);
    if (!ok) {
      error = "all-to-all step " + std::to_string(step) + ": " + error;
      t.abort(error);
      return false;
    }
  }
  return true;
}
