//===- CpuTarget.h - compile attention specs for the CPU target -*- C++ -*-===//
//
// Runs the attn pipeline on a spec's module down to LLVM, emits a native
// object and links it into the shared object of a CPU package, next to its
// manifest.json (docs/Package.md).
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_TARGET_CPUTARGET_H
#define ATTN_TARGET_CPUTARGET_H

#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Pattern/RingPlan.h"
#include "attn/Spec/Spec.h"

#include <nlohmann/json.hpp>

#include <string>

namespace mlir::attn {

/// The stages attn-compile --emit can stop after.
enum class Stage { Mlir, Decomposed, Tiled, Fused, Llvm, LlvmIR };

/// Runs the pipeline on `module` (from buildAttentionModule) up to `stage`,
/// in place. Errors are reported as diagnostics.
LogicalResult lowerToStage(ModuleOp module, Stage stage,
                           const CpuPipelineOptions &opts);

/// Compiles `module` for the host CPU into the package directory `outDir`
/// (created if needed): kernels.so and manifest.json. Progress lines go to
/// `log` when it is non-null. On failure `error` says what went wrong.
LogicalResult compileCpuPackage(ModuleOp module, const Spec &spec,
                                const CpuPipelineOptions &opts,
                                const std::string &outDir, std::string &error,
                                llvm::raw_ostream *log);

/// Translates an LLVM-dialect module to textual LLVM IR.
/// A package for `spec.distribution.ranks` ranks: the ring kernels
/// (init, one per planned component with origins, finalize) and the ring
/// schedule in manifest.json (docs/Ring.md).
LogicalResult compileCpuRingPackage(const Spec &spec,
                                    const CpuPipelineOptions &opts,
                                    const std::string &outDir,
                                    std::string &error, llvm::raw_ostream *log);

/// The ring plan of a distributed spec (errors start with "distribution:").
std::optional<RingPlan> planRingForSpec(const Spec &spec, std::string &error);

/// The manifest's "ring" section.
nlohmann::json manifestRingPlan(const RingPlan &plan);

/// One rank's argument shapes: the row dimension of k and v becomes the
/// plan's key chunk, that of q, out and lse its query chunk (lengths stay
/// global).
void setRingArgRows(nlohmann::json &args, const RingPlan &plan);

LogicalResult printLLVMIR(ModuleOp module, llvm::raw_ostream &os);

} // namespace mlir::attn

#endif // ATTN_TARGET_CPUTARGET_H
