//===- Pipelines.cpp - the attn pass pipelines ----------------------------===//
//
// The stages attn-compile stops at with --emit (decomposed, tiled, fused,
// llvm) and the `attn-cpu-pipeline` registered for attn-opt, which runs all
// of them down to the LLVM dialect.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/Transforms/Passes.h"

#include "mlir/Conversion/Passes.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/MemRef/Transforms/Passes.h"
#include "mlir/Pass/PassRegistry.h"
#include "mlir/Transforms/Passes.h"

using namespace mlir;
using namespace mlir::attn;

void mlir::attn::buildAttnTilingPipeline(OpPassManager &pm,
                                         const CpuPipelineOptions &opts) {
  pm.addPass(createAttnDecompose());
  pm.addPass(createAttnBufferize());
  AttnTileOptions tileOpts;
  tileOpts.qTile = opts.qTile;
  tileOpts.kvTile = opts.kvTile;
  pm.addPass(createAttnTile(tileOpts));
  pm.addPass(createCanonicalizerPass());
}

void mlir::attn::buildAttnFusionPipeline(OpPassManager &pm) {
  pm.addPass(createAttnFuseOnlineSoftmax());
  pm.addPass(createAttnLowerGrad());
  pm.addPass(createCanonicalizerPass());
  pm.addPass(createCSEPass());
  pm.addPass(createLoopInvariantCodeMotionPass());
}

void mlir::attn::buildLowerToLLVMPipeline(OpPassManager &pm) {
  pm.addPass(createSCFToControlFlowPass());
  pm.addPass(memref::createExpandStridedMetadataPass());
  pm.addPass(createFinalizeMemRefToLLVMConversionPass());
  pm.addPass(createConvertMathToLLVMPass());
  pm.addPass(createArithToLLVMConversionPass());
  pm.addPass(createConvertIndexToLLVMPass());
  pm.addPass(createConvertControlFlowToLLVMPass());
  pm.addPass(createConvertFuncToLLVMPass());
  pm.addPass(createReconcileUnrealizedCastsPass());
  pm.addPass(createCanonicalizerPass());
}

namespace {
struct CpuPipelineCLOptions
    : public PassPipelineOptions<CpuPipelineCLOptions> {
  Option<int64_t> qTile{*this, "q-tile", llvm::cl::desc("Rows per tile"),
                        llvm::cl::init(32)};
  Option<int64_t> kvTile{*this, "kv-tile", llvm::cl::desc("Keys per tile"),
                         llvm::cl::init(32)};
};
} // namespace

void mlir::attn::registerAttnPassesAndPipelines() {
  registerAttnPasses();
  PassPipelineRegistration<CpuPipelineCLOptions>(
      "attn-cpu-pipeline",
      "Decompose, bufferize, tile, fuse and lower attention to the LLVM "
      "dialect for the CPU target",
      [](OpPassManager &pm, const CpuPipelineCLOptions &cl) {
        CpuPipelineOptions opts;
        opts.qTile = cl.qTile;
        opts.kvTile = cl.kvTile;
        buildAttnTilingPipeline(pm, opts);
        buildAttnFusionPipeline(pm);
        buildLowerToLLVMPipeline(pm);
      });
}
