//===- GpuTarget.h - compile attention specs for NVIDIA GPUs ----*- C++ -*-===//
//
// Runs attn-decompose and convert-attn-to-gpu on a spec's module, lowers the
// kernels through NVVM to PTX, assembles the PTX with ptxas and writes a GPU
// package: kernels.cubin, kernels.ptx and manifest.json (docs/Package.md).
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_TARGET_GPUTARGET_H
#define ATTN_TARGET_GPUTARGET_H

#include "attn/Spec/Spec.h"

#include "mlir/IR/BuiltinOps.h"

#include <string>

namespace mlir::attn {

/// The stages attn-compile --emit can stop after for a GPU target.
enum class GpuStage {
  Kernels, ///< gpu.module of gpu/nvgpu/nvvm kernels (convert-attn-to-gpu)
  Ptx,     ///< the PTX text of those kernels
};

/// Lowers `module` in place to `stage` for `arch` (sm_90a or sm_80); for
/// GpuStage::Ptx the PTX is returned in `ptx`. `warpSpecialize` is
/// convert-attn-to-gpu's option of that name (sm_90a, experimental).
LogicalResult lowerForGpu(ModuleOp module, GpuStage stage,
                          const std::string &arch, std::string *ptx,
                          bool warpSpecialize = false);

/// Why the GPU targets cannot compile `spec` (its dtype or head dim), as
/// an error naming the spec field, or "" when they can.
std::string gpuSpecUnsupported(const Spec &spec);

/// Compiles `module` for `arch` into the package directory `outDir`.
/// Progress lines (including ptxas's register and spill report) go to `log`
/// when it is non-null.
LogicalResult compileGpuPackage(ModuleOp module, const Spec &spec,
                                const std::string &arch,
                                const std::string &outDir, std::string &error,
                                llvm::raw_ostream *log,
                                bool alwaysState = false,
                                bool warpSpecialize = false);

/// A GPU ring package (docs/Ring.md): one update kernel per planned
/// component (origins as launch parameters), init, finalize, and the ring
/// plan in the manifest. `warpSpecialize` as for compileGpuPackage.
LogicalResult compileGpuRingPackage(const Spec &spec, const std::string &arch,
                                    const std::string &outDir,
                                    std::string &error, llvm::raw_ostream *log,
                                    bool warpSpecialize = false);

} // namespace mlir::attn

#endif // ATTN_TARGET_GPUTARGET_H
