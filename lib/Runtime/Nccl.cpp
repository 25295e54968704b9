//===- Nccl.cpp - the NCCL transport of ring packages ---------------------===//
//
// libnccl.so.2 is opened with dlopen on first use (nothing NCCL is linked, so
// the runtime still builds and runs CPU packages without it). One exchange is
// a grouped ncclSend/ncclRecv of bytes on the caller's stream. At start-up
// every rank sends a hash of its package to the next rank and compares what
// it receives from the previous one, so ranks that load different packages
// fail at once with both names instead of hanging in a mismatched step.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/CudaDriver.h"
#include "attn/Runtime/Ring.h"

#include <dlfcn.h>
#include <functional>
#include <mutex>

using namespace attn::runtime;

namespace {
using ncclComm_t = struct ncclComm *;
using ncclResult_t = int;
constexpr int ncclInt8 = 0;

struct NcclApi {
  ncclResult_t (*getUniqueId)(NcclId *);
  ncclResult_t (*commInitRank)(ncclComm_t *, int, NcclId, int);
  ncclResult_t (*commDestroy)(ncclComm_t);
  ncclResult_t (*commAbort)(ncclComm_t);
  ncclResult_t (*commGetAsyncError)(ncclComm_t, ncclResult_t *);
  ncclResult_t (*send)(const void *, size_t, int, int, ncclComm_t, void *);
  ncclResult_t (*recv)(void *, size_t, int, int, ncclComm_t, void *);
  ncclResult_t (*groupStart)();
  ncclResult_t (*groupEnd)();
  const char *(*getErrorString)(ncclResult_t);
};

NcclApi api;
std::string apiError;
bool apiOk = false;

void loadNccl() {
  void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    apiError = std::string("cannot load NCCL libnccl.so.2 (") + dlerror() +
               "): GPU ring packages need NCCL installed (or on "
               "LD_LIBRARY_PATH)";
    return;
  }
  auto get = [&](auto &fn, const char *name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(
        dlsym(lib, name));
    if (!fn)
      apiError = std::string("libnccl.so.2 has no ") + name;
    return fn != nullptr;
  };
  apiOk = get(api.getUniqueId, "ncclGetUniqueId") &&
          get(api.commInitRank, "ncclCommInitRank") &&
          get(api.commDestroy, "ncclCommDestroy") &&
          get(api.commAbort, "ncclCommAbort") &&
          get(api.commGetAsyncError, "ncclCommGetAsyncError") &&
          get(api.send, "ncclSend") && get(api.recv, "ncclRecv") &&
          get(api.groupStart, "ncclGroupStart") &&
          get(api.groupEnd, "ncclGroupEnd") &&
          get(api.getErrorString, "ncclGetErrorString");
}

const NcclApi *nccl(std::string &error) {
  static std::once_flag once;
  std::call_once(once, loadNccl);
  if (!apiOk) {
    error = apiError;
    return nullptr;
  }
  return &api;
}

std::string describeNccl(ncclResult_t rc, const std::string &what) {
  return what + " failed: NCCL error " + std::to_string(rc) + " (" +
         api.getErrorString(rc) + ")";
}

class NcclTransport final : public Transport {
public:
  NcclTransport(int rank, int ranks, ncclComm_t comm)
      : rank_(rank), ranks_(ranks), comm_(comm) {}
  ~NcclTransport() override {
    if (comm_)
      api.commDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return ranks_; }

  bool exchange(int64_t, int, const void *, size_t, int, void *, size_t,
                std::string &error) override {
    error = "the NCCL transport moves device memory only";
    return false;
  }

  bool exchangeDevice(int64_t step, int to, uint64_t send, size_t sendBytes,
                      int from, uint64_t recv, size_t recvBytes, void *stream,
                      std::string &error) override {
    ncclResult_t rc = api.groupStart();
    if (rc == 0 && to >= 0 && sendBytes)
      rc = api.send(reinterpret_cast<const void *>(send), sendBytes, ncclInt8,
                    to, comm_, stream);
    if (rc == 0 && from >= 0 && recvBytes)
      rc = api.recv(reinterpret_cast<void *>(recv), recvBytes, ncclInt8, from,
                    comm_, stream);
    ncclResult_t end = api.groupEnd();
    if (rc == 0)
      rc = end;
    if (rc != 0) {
      error = describeNccl(rc, "rank " + std::to_string(rank_) + ": ring " +
                                   ringStepName(step));
      return false;
    }
    return true;
  }

  bool deviceError(std::string &error) override {
    ncclResult_t async = 0;
    if (api.commGetAsyncError(comm_, &async) == 0 && async != 0) {
      error = describeNccl(async, "rank " + std::to_string(rank_) +
                                      ": NCCL communication (a peer failed?)");
      return true;
    }
    return false;
  }

  void abort(const std::string &) override {
    if (comm_)
      api.commAbort(comm_);
    comm_ = nullptr;
  }

private:
  int rank_, ranks_;
  ncclComm_t comm_;
};
} // namespace

bool attn::runtime::ncclUniqueId(NcclId &id, std::string &error) {
  const NcclApi *n = nccl(error);
  if (!n)
    return false;
  ncclResult_t rc = n->getUniqueId(&id);
  if (rc != 0) {
    error = describeNccl(rc, "ncclGetUniqueId");
    return false;
  }
  return true;
}

std::unique_ptr<Transport>
attn::runtime::ncclTransport(int rank, int ranks, const NcclId &id,
                             const std::string &packageId,
                             std::string &error) {
  using namespace attn::runtime::cuda;
  const NcclApi *n = nccl(error);
  const Driver *d = n ? driver(error) : nullptr;
  if (!d || !ensureContext(*d, error, rank))
    return nullptr;
  ncclComm_t comm = nullptr;
  ncclResult_t rc = n->commInitRank(&comm, ranks, id, rank);
  if (rc != 0) {
    error = describeNccl(rc, "rank " + std::to_string(rank) + " of " +
                                 std::to_string(ranks) + ": ncclCommInitRank");
    return nullptr;
  }
  auto transport = std::make_unique<NcclTransport>(rank, ranks, comm);
  if (ranks == 1)
    return transport;

  // Package identity: send my hash to rank + 1, compare rank - 1's.
  uint64_t mine = std::hash<std::string>()(packageId), theirs = 0;
  CUdeviceptr buf = 0;
  CUresult crc = d->cuMemAlloc(&buf, 16);
  if (crc != CUDA_SUCCESS) {
    error = describe(*d, crc, "allocating the start-up check buffer");
    return nullptr;
  }
  bool ok = d->cuMemcpyHtoD(buf, &mine, 8) == CUDA_SUCCESS &&
            transport->exchangeDevice(-1, (rank + 1) % ranks, buf, 8,
                                      (rank + ranks - 1) % ranks, buf + 8, 8,
                                      nullptr, error) &&
            d->cuCtxSynchronize() == CUDA_SUCCESS &&
            d->cuMemcpyDtoH(&theirs, buf + 8, 8) == CUDA_SUCCESS;
  d->cuMemFree(buf);
  if (!ok) {
    if (error.empty())
      error = "rank " + std::to_string(rank) + ": the start-up check failed";
    return nullptr;
  }
  if (theirs != mine) {
    error = "rank " + std::to_string(rank) + " runs package '" + packageId +
            "' but rank " + std::to_string((rank + ranks - 1) % ranks) +
            " runs another: every rank must load the same package";
    transport->abort(error);
    return nullptr;
  }
  return transport;
}
