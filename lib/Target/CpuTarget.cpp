//===- CpuTarget.cpp - compile attention specs for the CPU target ---------===//
//
// attn-decompose .. attn-fuse-online-softmax, then upstream conversions to the
// LLVM dialect, translation to LLVM IR, O3, a native object for the host, and
// a link into kernels.so with the system C compiler driver (it supplies libc
// and libm, which the kernels call for malloc, expf and logf). The entry
// point is the C interface of the spec's function:
//   void _mlir_ciface_<name>(memref descriptors of q, k, v[, lengths], out[, lse])
//
//===----------------------------------------------------------------------===//

#include "attn/Target/CpuTarget.h"
#include "attn/Pattern/Pattern.h"
#include "ManifestUtils.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/LLVMIR/LLVMDialect.h"
#include "mlir/ExecutionEngine/OptUtils.h"
#include "mlir/Target/LLVMIR/Dialect/Builtin/BuiltinToLLVMIRTranslation.h"
#include "mlir/Target/LLVMIR/Dialect/LLVMIR/LLVMToLLVMIRTranslation.h"
#include "mlir/Target/LLVMIR/Export.h"

#include "llvm/IR/LegacyPassManager.h"
#include "llvm/IR/Module.h"
#include "llvm/MC/TargetRegistry.h"
#include "llvm/Support/FileSystem.h"
#include "llvm/Support/Path.h"
#include "llvm/Support/Program.h"
#include "llvm/Support/TargetSelect.h"
#include "llvm/Target/TargetMachine.h"
#include "llvm/TargetParser/Host.h"

#include <nlohmann/json.hpp>

using namespace mlir;
using namespace mlir::attn;

LogicalResult mlir::attn::lowerToStage(ModuleOp module, Stage stage,
                                       const CpuPipelineOptions &opts) {
  if (stage == Stage::Mlir)
    return success();
  module.walk([&](func::FuncOp f) {
    f->setAttr(LLVM::LLVMDialect::getEmitCWrapperAttrName(),
               UnitAttr::get(module.getContext()));
  });
  PassManager pm(module.getContext());
  if (stage == Stage::Decomposed) {
    pm.addPass(createAttnDecompose());
  } else {
    buildAttnTilingPipeline(pm, opts);
    if (stage != Stage::Tiled)
      buildAttnFusionPipeline(pm);
    if (stage == Stage::Llvm || stage == Stage::LlvmIR)
      buildLowerToLLVMPipeline(pm);
  }
  return pm.run(module);
}

LogicalResult mlir::attn::printLLVMIR(ModuleOp module, llvm::raw_ostream &os) {
  DialectRegistry registry;
  registerBuiltinDialectTranslation(registry);
  registerLLVMDialectTranslation(registry);
  module.getContext()->appendDialectRegistry(registry);
  llvm::LLVMContext llvmContext;
  auto llvmModule = translateModuleToLLVMIR(module, llvmContext);
  if (!llvmModule)
    return failure();
  llvmModule->print(os, nullptr);
  return success();
}

/// Emits `llvmModule` as a native object file at `path`.
static LogicalResult emitObject(llvm::Module &llvmModule,
                                const std::string &path, std::string &error) {
  llvm::InitializeNativeTarget();
  llvm::InitializeNativeTargetAsmPrinter();
  llvm::Triple triple(llvm::sys::getDefaultTargetTriple());
  const llvm::Target *target =
      llvm::TargetRegistry::lookupTarget(triple, error);
  if (!target)
    return failure();
  llvm::TargetOptions options;
  std::unique_ptr<llvm::TargetMachine> machine(target->createTargetMachine(
      triple, llvm::sys::getHostCPUName(), "", options, llvm::Reloc::PIC_,
      std::nullopt, llvm::CodeGenOptLevel::Aggressive));
  llvmModule.setTargetTriple(triple);
  llvmModule.setDataLayout(machine->createDataLayout());

  auto optimize = makeOptimizingTransformer(3, 0, machine.get());
  if (llvm::Error err = optimize(&llvmModule)) {
    error = "LLVM optimisation failed: " + llvm::toString(std::move(err));
    return failure();
  }
  std::error_code ec;
  llvm::raw_fd_ostream out(path, ec, llvm::sys::fs::OF_None);
  if (ec) {
    error = "cannot write " + path + ": " + ec.message();
    return failure();
  }
  llvm::legacy::PassManager codegen;
  if (machine->addPassesToEmitFile(codegen, out, nullptr,
                                   llvm::CodeGenFileType::ObjectFile)) {
    error = "the host target cannot emit object files";
    return failure();
  }
  codegen.run(llvmModule);
  return success();
}

/// Links `object` into the shared object `library` with the C compiler driver.
static LogicalResult linkSharedObject(const std::string &object,
                                      const std::string &library,
                                      std::string &error) {
  std::string driver;
  for (const char *name : {"cc", "gcc", "clang", "clang-22"}) {
    if (auto found = llvm::sys::findProgramByName(name)) {
      driver = *found;
      break;
    }
  }
  if (driver.empty()) {
    error = "no C compiler driver (cc, gcc or clang) on PATH to link the "
            "kernels; install gcc";
    return failure();
  }
  SmallVector<StringRef> args{driver, "-shared", "-o", library, object, "-lm"};
  std::string message;
  int rc = llvm::sys::ExecuteAndWait(driver, args, std::nullopt, {}, 0, 0,
                                     &message);
  if (rc != 0) {
    error = "linking " + library + " with " + driver + " failed" +
            (message.empty() ? "" : ": " + message);
    return failure();
  }
  return success();
}

LogicalResult mlir::attn::compileCpuPackage(ModuleOp module, const Spec &spec,
                                            const CpuPipelineOptions &opts,
                                            const std::string &outDir,
                                            std::string &error,
                                            llvm::raw_ostream *log) {
  if (spec.dtype != "f32") {
    error = "dtype: the cpu target computes in f32 only, got " + spec.dtype +
            " (use --target sm_90a or sm_80 for bf16/f16)";
    return failure();
  }
  // The manifest's argument layout comes from the function before lowering.
  auto func = *module.getOps<func::FuncOp>().begin();
  FunctionType type = func.getFunctionType();
  nlohmann::json args = manifestArgs(type);
  nlohmann::json components = manifestComponents(spec);

  if (log)
    *log << "attn-compile: lowering " << spec.name << " ("
         << components.size() << " components, tiles " << opts.qTile << "x"
         << opts.kvTile << ")\n";
  if (failed(lowerToStage(module, Stage::Llvm, opts))) {
    error = "the lowering pipeline failed (see the diagnostics above)";
    return failure();
  }

  DialectRegistry registry;
  registerBuiltinDialectTranslation(registry);
  registerLLVMDialectTranslation(registry);
  module.getContext()->appendDialectRegistry(registry);
  llvm::LLVMContext llvmContext;
  auto llvmModule = translateModuleToLLVMIR(module, llvmContext, spec.name);
  if (!llvmModule) {
    error = "translation to LLVM IR failed";
    return failure();
  }

  if (std::error_code ec = llvm::sys::fs::create_directories(outDir)) {
    error = "cannot create package directory " + outDir + ": " + ec.message();
    return failure();
  }
  SmallString<256> object(outDir), library(outDir), manifestPath(outDir);
  llvm::sys::path::append(object, "kernels.o");
  llvm::sys::path::append(library, "kernels.so");
  llvm::sys::path::append(manifestPath, "manifest.json");
  if (log)
    *log << "attn-compile: generating native code\n";
  if (failed(emitObject(*llvmModule, std::string(object), error)))
    return failure();
  if (log)
    *log << "attn-compile: linking " << library << "\n";
  if (failed(linkSharedObject(std::string(object), std::string(library),
                              error)))
    return failure();
  llvm::sys::fs::remove(object);

  nlohmann::json manifest = {
      {"format", "attn-package"},
      {"version", 1},
      {"target", "cpu"},
      {"name", spec.name},
      {"library", "kernels.so"},
      {"kernels",
       {{{"name", spec.name},
         {"symbol", "_mlir_ciface_" + spec.name},
         {"args", args}}}},
      {"launch_order", {spec.name}},
      {"components", components},
      {"tile", {{"q_tile", opts.qTile}, {"kv_tile", opts.kvTile}}},
      {"scale", spec.effectiveScale()},
      {"spec", nlohmann::json::parse(spec.json)}};
  std::error_code ec;
  llvm::raw_fd_ostream out(manifestPath, ec);
  if (ec) {
    error = "cannot write " + std::string(manifestPath) + ": " + ec.message();
    return failure();
  }
  out << manifest.dump(2) << "\n";
  if (log)
    *log << "attn-compile: wrote package " << outDir << "\n";
  return success();
}
