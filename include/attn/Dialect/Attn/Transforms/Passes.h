//===- Passes.h - attn transformation passes --------------------*- C++ -*-===//
//
// Declarations of the attn passes and the named pipelines built from them.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_DIALECT_ATTN_TRANSFORMS_PASSES_H
#define ATTN_DIALECT_ATTN_TRANSFORMS_PASSES_H

#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "mlir/Dialect/Math/IR/Math.h"
#include "mlir/Pass/Pass.h"
#include "mlir/Pass/PassManager.h"

namespace mlir::attn {

#define GEN_PASS_DECL
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"

#define GEN_PASS_REGISTRATION
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"

struct CpuPipelineOptions {
  int64_t qTile = 32;
  int64_t kvTile = 32;
};

/// attn-decompose, attn-bufferize, attn-tile (the "tiled" stage).
void buildAttnTilingPipeline(OpPassManager &pm, const CpuPipelineOptions &opts);
/// attn-fuse-online-softmax and cleanups (the "fused" stage).
void buildAttnFusionPipeline(OpPassManager &pm);
/// Lowering of fused loops to the LLVM dialect for the CPU target.
void buildLowerToLLVMPipeline(OpPassManager &pm);

/// Registers the passes and the `attn-cpu-pipeline` named pipeline.
void registerAttnPassesAndPipelines();

} // namespace mlir::attn

#endif // ATTN_DIALECT_ATTN_TRANSFORMS_PASSES_H
