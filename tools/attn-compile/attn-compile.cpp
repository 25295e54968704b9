//===- attn-compile.cpp - compile attention specs -------------------------===//
//
//   attn-compile SPEC.json --emit mlir|decomposed|tiled|fused|llvm|llvm-ir
//   attn-compile SPEC.json --emit ring          (distributed specs)
//   attn-compile SPEC.json --target sm_90a --emit kernels|ptx
//   attn-compile SPEC.json -o PKG/ [--target cpu|sm_90a|sm_80]
//                [--q-tile N] [--kv-tile N]
//
// Parses a JSON spec (errors name the JSON path), builds the attn IR, and
// either prints it after a pipeline stage or compiles a package.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Spec/Spec.h"
#include "attn/Target/CpuTarget.h"
#include "attn/Target/GpuTarget.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/LLVMIR/LLVMDialect.h"
#include "mlir/Dialect/Math/IR/Math.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/InitAllDialects.h"
#include "mlir/InitAllExtensions.h"
#include "mlir/Target/LLVMIR/Dialect/All.h"
#include "mlir/IR/Verifier.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Support/FileUtilities.h"

#include "llvm/Support/CommandLine.h"
#include "llvm/Support/InitLLVM.h"
#include "llvm/Support/MemoryBuffer.h"
#include "llvm/Support/ToolOutputFile.h"

using namespace mlir;
using namespace mlir::attn;
namespace cl = llvm::cl;

// attn-compile's own options; --help lists only these (--help-hidden also
// lists the LLVM and MLIR options linked into the tool).
static cl::OptionCategory attnCategory("attn-compile options");
static cl::opt<std::string> specFile(cl::Positional, cl::desc("<spec.json>"),
                                     cl::Required, cl::cat(attnCategory));
static cl::opt<std::string>
    outPath("o", cl::desc("Package directory (or output file with --emit)"),
            cl::value_desc("path"), cl::init(""), cl::cat(attnCategory));
static cl::opt<std::string> emit(
    "emit",
    cl::desc("Print the IR after a stage instead of building a package: "
             "mlir, decomposed, ring (distributed specs), tiled, fused, llvm, "
             "llvm-ir (cpu); "
             "mlir, decomposed, kernels, ptx (sm_90a, sm_80)"),
    cl::init(""), cl::cat(attnCategory));
static cl::opt<std::string>
    targetOpt("target", cl::desc("cpu, sm_90a or sm_80 (default: the spec's "
                                 "target.arch, else cpu)"),
              cl::init(""), cl::cat(attnCategory));
static cl::opt<int64_t> qTileOpt("q-tile", cl::desc("Rows per tile (cpu)"),
                                 cl::init(0), cl::cat(attnCategory));
static cl::opt<int64_t> kvTileOpt("kv-tile", cl::desc("Keys per tile (cpu)"),
                                  cl::init(0), cl::cat(attnCategory));
static cl::opt<bool> warpSpecialize(
    "warp-specialize",
    cl::desc("sm_90a: components whose rows attend many contiguous keys "
             "(causal, tokenized) get a producer warpgroup for the K/V loads "
             "and three consumer warpgroups that overlap the softmax with "
             "the MMAs (docs/passes/convert-attn-to-gpu.md); on by default, "
             "--warp-specialize=false turns it off"),
    cl::init(true), cl::cat(attnCategory));
static cl::opt<bool> quiet("quiet", cl::desc("No progress messages"),
                           cl::init(false), cl::cat(attnCategory));

static int fail(const std::string &message) {
  llvm::errs() << specFile << ": error: " << message << "\n";
  return 1;
}

int main(int argc, char **argv) {
  llvm::InitLLVM init(argc, argv);
  cl::HideUnrelatedOptions(attnCategory);
  cl::ParseCommandLineOptions(
      argc, argv,
      "attn spec compiler: a JSON spec (docs/SpecFormat.md) to a package for "
      "the cpu, sm_90a or sm_80 target (docs/Package.md), or its IR after a "
      "stage with --emit\n");

  std::string error;
  auto file = openInputFile(specFile, &error);
  if (!file)
    return fail(error);

  DialectRegistry registry;
  registry.insert<AttnDialect>();
  // The GPU path runs upstream pipelines that load many dialects and
  // translate kernels to LLVM IR.
  registerAllDialects(registry);
  registerAllExtensions(registry);
  registerAllToLLVMIRTranslations(registry);
  MLIRContext ctx(registry);
  ctx.loadAllAvailableDialects();
  std::optional<Spec> spec = parseSpec(file->getBuffer().str(), &ctx, error);
  if (!spec)
    return fail(error);

  std::string target = targetOpt.empty() ? spec->target.arch : targetOpt;
  if (target != "cpu" && target != "sm_90a" && target != "sm_80")
    return fail("--target must be cpu, sm_90a or sm_80, got '" + target + "'");
  if (warpSpecialize.getNumOccurrences() && warpSpecialize &&
      target != "sm_90a")
    return fail("--warp-specialize needs --target sm_90a, got '" + target +
                "'");
  CpuPipelineOptions opts;
  opts.qTile = qTileOpt > 0 ? qTileOpt : spec->target.qTile;
  opts.kvTile = kvTileOpt > 0 ? kvTileOpt : spec->target.kvTile;
  if (qTileOpt < 0 || kvTileOpt < 0)
    return fail("--q-tile and --kv-tile must be >= 1");

  OwningOpRef<ModuleOp> module = buildAttentionModule(*spec, &ctx);
  if (failed(verify(*module)))
    return fail("the spec produced invalid IR (see the diagnostics above)");

  const bool distributed = spec->distribution.present;
  if (emit == "ring") {
    if (!distributed)
      return fail("--emit ring needs a spec with a \"distribution\" section");
    PassManager pm(&ctx);
    pm.addPass(createAttnDecompose());
    pm.addPass(createAttnBufferize());
    pm.addPass(createAttnInsertRingComm());
    if (failed(pm.run(*module)))
      return fail("attn-insert-ring-comm failed (see the diagnostics above)");
    auto output = openOutputFile(
        outPath.empty() ? std::string("-") : outPath.getValue(), &error);
    if (!output)
      return fail(error);
    module->print(output->os());
    output->keep();
    return 0;
  }

  if (!emit.empty() && target != "cpu") {
    if (emit != "mlir" && emit != "decomposed" && emit != "kernels" &&
        emit != "ptx")
      return fail("--emit for target " + target +
                  " must be one of mlir, decomposed, kernels, ptx; got '" +
                  emit + "'");
    // The kernels' stages need what the GPU packages need; say so at the
    // spec's field rather than from inside the conversion.
    if (emit == "kernels" || emit == "ptx")
      if (std::string why = gpuSpecUnsupported(*spec); !why.empty())
        return fail(why);
    std::string ptx;
    if (emit == "decomposed" &&
        failed(lowerToStage(*module, Stage::Decomposed, opts)))
      return fail("lowering to stage 'decomposed' failed");
    if (emit == "kernels" &&
        failed(lowerForGpu(*module, GpuStage::Kernels, target, nullptr,
                           warpSpecialize)))
      return fail("convert-attn-to-gpu failed");
    if (emit == "ptx" &&
        failed(lowerForGpu(*module, GpuStage::Ptx, target, &ptx,
                           warpSpecialize)))
      return fail("lowering the kernels to PTX failed");
    auto output = openOutputFile(
        outPath.empty() ? std::string("-") : outPath.getValue(), &error);
    if (!output)
      return fail(error);
    if (emit == "ptx")
      output->os() << ptx;
    else
      module->print(output->os());
    output->keep();
    return 0;
  }

  if (!emit.empty()) {
    static const std::pair<const char *, Stage> stages[] = {
        {"mlir", Stage::Mlir},   {"decomposed", Stage::Decomposed},
        {"tiled", Stage::Tiled}, {"fused", Stage::Fused},
        {"llvm", Stage::Llvm},   {"llvm-ir", Stage::LlvmIR}};
    auto it = llvm::find_if(stages, [](auto &s) { return emit == s.first; });
    if (it == std::end(stages))
      return fail("--emit must be one of mlir, decomposed, tiled, fused, "
                  "llvm, llvm-ir; got '" + emit + "'");
    if (failed(lowerToStage(*module, it->second, opts)))
      return fail("lowering to stage '" + emit + "' failed");
    auto output = openOutputFile(outPath.empty() ? std::string("-") : outPath.getValue(), &error);
    if (!output)
      return fail(error);
    if (it->second == Stage::LlvmIR) {
      if (failed(printLLVMIR(*module, output->os())))
        return fail("translation to LLVM IR failed");
    } else {
      module->print(output->os());
    }
    output->keep();
    return 0;
  }

  if (outPath.empty())
    return fail("give a package directory with -o, or a stage with --emit");
  if (distributed) {
    if (target != "cpu") {
      if (failed(compileGpuRingPackage(*spec, target, outPath, error,
                                       quiet ? nullptr : &llvm::errs(),
                                       warpSpecialize)))
        return fail(error);
      return 0;
    }
    if (failed(compileCpuRingPackage(*spec, opts, outPath, error,
                                     quiet ? nullptr : &llvm::errs())))
      return fail(error);
    return 0;
  }
  if (target != "cpu") {
    if (failed(compileGpuPackage(*module, *spec, target, outPath, error,
                                 quiet ? nullptr : &llvm::errs(),
                                 /*alwaysState=*/false, warpSpecialize)))
      return fail(error);
    return 0;
  }
  if (failed(compileCpuPackage(*module, *spec, opts, outPath, error,
                               quiet ? nullptr : &llvm::errs())))
    return fail(error);
  return 0;
}
