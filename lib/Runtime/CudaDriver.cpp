//===- CudaDriver.cpp - the CUDA driver API, loaded at run time -----------===//

#include "attn/Runtime/CudaDriver.h"

#include <dlfcn.h>
#include <mutex>

using namespace attn::runtime::cuda;

namespace {
Driver loaded;
std::string loadError;
bool loadedOk = false;

template <typename Fn>
bool resolve(void *lib, Fn &fn, const char *name) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (!fn)
    loadError = std::string("libcuda.so.1 has no ") + name +
                " (driver too old for this runtime?)";
  return fn != nullptr;
}

void load() {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    loadError = std::string("cannot load the CUDA driver libcuda.so.1 (") +
                dlerror() +
                "): GPU packages need an NVIDIA GPU with its driver installed";
    return;
  }
  Driver &d = loaded;
  bool ok = resolve(lib, d.cuInit, "cuInit") &&
            resolve(lib, d.cuDeviceGet, "cuDeviceGet") &&
            resolve(lib, d.cuDeviceGetCount, "cuDeviceGetCount") &&
            resolve(lib, d.cuDeviceGetAttribute, "cuDeviceGetAttribute") &&
            resolve(lib, d.cuDeviceGetName, "cuDeviceGetName") &&
            resolve(lib, d.cuDevicePrimaryCtxRetain,
                    "cuDevicePrimaryCtxRetain") &&
            resolve(lib, d.cuCtxGetCurrent, "cuCtxGetCurrent") &&
            resolve(lib, d.cuCtxSetCurrent, "cuCtxSetCurrent") &&
            resolve(lib, d.cuCtxGetDevice, "cuCtxGetDevice") &&
            resolve(lib, d.cuCtxSynchronize, "cuCtxSynchronize") &&
            resolve(lib, d.cuModuleLoadDataEx, "cuModuleLoadDataEx") &&
            resolve(lib, d.cuModuleUnload, "cuModuleUnload") &&
            resolve(lib, d.cuModuleGetFunction, "cuModuleGetFunction") &&
            resolve(lib, d.cuFuncSetAttribute, "cuFuncSetAttribute") &&
            resolve(lib, d.cuLaunchKernel, "cuLaunchKernel") &&
            resolve(lib, d.cuMemAlloc, "cuMemAlloc_v2") &&
            resolve(lib, d.cuMemFree, "cuMemFree_v2") &&
            resolve(lib, d.cuMemcpyHtoD, "cuMemcpyHtoD_v2") &&
            resolve(lib, d.cuMemcpyDtoH, "cuMemcpyDtoH_v2") &&
            resolve(lib, d.cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2") &&
            resolve(lib, d.cuStreamSynchronize, "cuStreamSynchronize") &&
            resolve(lib, d.cuEventCreate, "cuEventCreate") &&
            resolve(lib, d.cuEventRecord, "cuEventRecord") &&
            resolve(lib, d.cuEventSynchronize, "cuEventSynchronize") &&
            resolve(lib, d.cuEventElapsedTime, "cuEventElapsedTime_v2") &&
            resolve(lib, d.cuEventDestroy, "cuEventDestroy_v2") &&
            resolve(lib, d.cuMemcpy2DAsync, "cuMemcpy2DAsync_v2") &&
            resolve(lib, d.cuMemsetD8Async, "cuMemsetD8Async") &&
            resolve(lib, d.cuMemsetD2D32Async, "cuMemsetD2D32Async") &&
            resolve(lib, d.cuStreamCreate, "cuStreamCreate") &&
            resolve(lib, d.cuStreamDestroy, "cuStreamDestroy_v2") &&
            resolve(lib, d.cuStreamWaitEvent, "cuStreamWaitEvent") &&
            resolve(lib, d.cuEventQuery, "cuEventQuery") &&
            resolve(lib, d.cuGetErrorName, "cuGetErrorName") &&
            resolve(lib, d.cuGetErrorString, "cuGetErrorString");
  if (!ok)
    return;
  d.cuTensorMapEncodeTiled = reinterpret_cast<decltype(
      d.cuTensorMapEncodeTiled)>(dlsym(lib, "cuTensorMapEncodeTiled"));
  d.cuLaunchKernelEx = reinterpret_cast<decltype(d.cuLaunchKernelEx)>(
      dlsym(lib, "cuLaunchKernelEx"));
  d.cuStreamIsCapturing = reinterpret_cast<decltype(d.cuStreamIsCapturing)>(
      dlsym(lib, "cuStreamIsCapturing"));
  d.cuMemAllocAsync = reinterpret_cast<decltype(d.cuMemAllocAsync)>(
      dlsym(lib, "cuMemAllocAsync"));
  d.cuMemFreeAsync = reinterpret_cast<decltype(d.cuMemFreeAsync)>(
      dlsym(lib, "cuMemFreeAsync"));
  CUresult rc = d.cuInit(0);
  if (rc != CUDA_SUCCESS) {
    loadError = describe(d, rc, "cuInit") +
                " (no usable NVIDIA GPU, or the driver is not running)";
    return;
  }
  loadedOk = true;
}
} // namespace

const Driver *attn::runtime::cuda::driver(std::string &error) {
  static std::once_flag once;
  std::call_once(once, load);
  if (!loadedOk) {
    error = loadError;
    return nullptr;
  }
  return &loaded;
}

std::string attn::runtime::cuda::describe(const Driver &d, CUresult rc,
                                          const std::string &what) {
  const char *name = nullptr, *text = nullptr;
  d.cuGetErrorName(rc, &name);
  d.cuGetErrorString(rc, &text);
  return what + " failed: " + (name ? name : "CUDA error " + std::to_string(rc)) +
         (text ? std::string(" (") + text + ")" : std::string());
}

bool attn::runtime::cuda::ensureContext(const Driver &d, std::string &error,
                                        int device) {
  CUcontext ctx = nullptr;
  if (d.cuCtxGetCurrent(&ctx) == CUDA_SUCCESS && ctx)
    return true;
  CUdevice dev;
  CUresult rc = d.cuDeviceGet(&dev, device);
  if (rc == CUDA_SUCCESS)
    rc = d.cuDevicePrimaryCtxRetain(&ctx, dev);
  if (rc == CUDA_SUCCESS)
    rc = d.cuCtxSetCurrent(ctx);
  if (rc != CUDA_SUCCESS) {
    error = describe(d, rc, "creating a CUDA context on device " +
                                std::to_string(device));
    return false;
  }
  return true;
}
