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
#include "attn/Pattern/RingPlan.h"
#include "ManifestUtils.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/LLVMIR/LLVMDialect.h"
#include "mlir/IR/Verifier.h"
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

/// Lowers `module` (attn ops on memrefs or the attention function) to LLVM,
/// compiles it for the host and links `outDir/kernels.so`.
static LogicalResult buildSharedObject(ModuleOp module, StringRef name,
                                       const CpuPipelineOptions &opts,
                                       const std::string &outDir,
                                       std::string &error,
                                       llvm::raw_ostream *log) {
  if (failed(lowerToStage(module, Stage::Llvm, opts))) {
    error = "the lowering pipeline failed (see the diagnostics above)";
    return failure();
  }
  DialectRegistry registry;
  registerBuiltinDialectTranslation(registry);
  registerLLVMDialectTranslation(registry);
  module.getContext()->appendDialectRegistry(registry);
  llvm::LLVMContext llvmContext;
  auto llvmModule = translateModuleToLLVMIR(module, llvmContext, name);
  if (!llvmModule) {
    error = "translation to LLVM IR failed";
    return failure();
  }
  if (std::error_code ec = llvm::sys::fs::create_directories(outDir)) {
    error = "cannot create package directory " + outDir + ": " + ec.message();
    return failure();
  }
  SmallString<256> object(outDir), library(outDir);
  llvm::sys::path::append(object, "kernels.o");
  llvm::sys::path::append(library, "kernels.so");
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
  return success();
}

/// Writes `outDir/manifest.json`.
static LogicalResult writeManifest(const nlohmann::json &manifest,
                                   const std::string &outDir,
                                   std::string &error, llvm::raw_ostream *log) {
  SmallString<256> path(outDir);
  llvm::sys::path::append(path, "manifest.json");
  std::error_code ec;
  llvm::raw_fd_ostream out(path, ec);
  if (ec) {
    error = "cannot write " + std::string(path) + ": " + ec.message();
    return failure();
  }
  out << manifest.dump(2) << "\n";
  if (log)
    *log << "attn-compile: wrote package " << outDir << "\n";
  return success();
}

static LogicalResult checkCpuDtype(const Spec &spec, std::string &error) {
  if (spec.dtype == "f32")
    return success();
  error = "dtype: the cpu target computes in f32 only, got " + spec.dtype +
          " (use --target sm_90a or sm_80 for bf16/f16)";
  return failure();
}

LogicalResult mlir::attn::compileCpuPackage(ModuleOp module, const Spec &spec,
                                            const CpuPipelineOptions &opts,
                                            const std::string &outDir,
                                            std::string &error,
                                            llvm::raw_ostream *log) {
  if (failed(checkCpuDtype(spec, error)))
    return failure();
  // The manifest's argument layout comes from the function before lowering.
  auto func = *module.getOps<func::FuncOp>().begin();
  FunctionType type = func.getFunctionType();
  nlohmann::json args = manifestArgs(type);
  nlohmann::json components = manifestComponents(spec);
  nlohmann::json backward;
  if (spec.backward) {
    auto grad = module.lookupSymbol<func::FuncOp>(spec.name + "_backward");
    backward = {{"name", grad.getName().str()},
                {"symbol", "_mlir_ciface_" + grad.getName().str()},
                {"args", manifestBackwardArgs(grad.getFunctionType())}};
  }

  if (log)
    *log << "attn-compile: lowering " << spec.name << " ("
         << components.size()
         << (components.size() == 1 ? " component" : " components")
         << ", tiles " << opts.qTile << "x"
         << opts.kvTile << ")\n";
  if (failed(buildSharedObject(module, spec.name, opts, outDir, error, log)))
    return failure();

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
  if (spec.backward)
    manifest["backward"] = backward;
  return writeManifest(manifest, outDir, error, log);
}

//===----------------------------------------------------------------------===//
// Ring packages
//===----------------------------------------------------------------------===//

nlohmann::json mlir::attn::manifestRingPlan(const RingPlan &plan) {
  auto rowSets = [](const std::vector<RowSet> &sets) {
    nlohmann::json out = nlohmann::json::array();
    for (const RowSet &set : sets) {
      nlohmann::json runs = nlohmann::json::array();
      for (const RowRun &r : set.runs)
        runs.push_back({r.start, r.len, r.count, r.pitch});
      out.push_back(runs);
    }
    return out;
  };
  nlohmann::json ranks = nlohmann::json::array();
  for (const RankPlan &rp : plan.rankPlans) {
    auto piecesJson = [](const std::vector<RingPiece> &pieces) {
      nlohmann::json out = nlohmann::json::array();
      for (const RingPiece &p : pieces)
        out.push_back({p.offset, p.rows, p.origin});
      return out;
    };
    nlohmann::json steps = nlohmann::json::array();
    for (const RingStep &s : rp.steps) {
      nlohmann::json updates = nlohmann::json::array();
      for (const RingUpdate &u : s.updates)
        updates.push_back({u.kernel, u.qPiece, u.kPiece, u.qOrigin, u.kOrigin,
                           u.qPos, u.kPos, u.stride});
      steps.push_back({{"step", s.step},
                       {"send_to", s.sendTo},
                       {"recv_from", s.recvFrom},
                       {"send_rows", rowSets(s.sendRows)},
                       {"recv_rows", rowSets(s.recvRows)},
                       {"updates", updates}});
    }
    ranks.push_back({{"q_pieces", piecesJson(rp.qPieces)},
                     {"kv_pieces", piecesJson(rp.kvPieces)},
                     {"rows_sent", rp.rowsSent},
                     {"steps", steps}});
  }
  return {{"ranks", plan.ranks},       {"layout", plan.layout},
          {"kv", plan.kv},             {"q_len", plan.qLen},
          {"kv_len", plan.kvLen},      {"q_chunk", plan.qChunk},
          {"kv_chunk", plan.kvChunk},  {"kv_heads", plan.kvHeads},
          {"schedule", ranks}};
}

void mlir::attn::setRingArgRows(nlohmann::json &args, const RingPlan &plan) {
  for (nlohmann::json &arg : args) {
    if (arg["name"] == "lengths")
      continue;
    bool keyRows = arg["name"] == "k" || arg["name"] == "v" ||
                   arg["name"] == "dk" || arg["name"] == "dv";
    arg["shape"][2] = keyRows ? plan.kvChunk : plan.qChunk;
  }
}

std::optional<RingPlan> mlir::attn::planRingForSpec(const Spec &spec,
                                                    std::string &error) {
  if (!spec.qLen || !spec.kvLen) {
    error = "distribution: ring attention needs fixed lengths (seq_len, or "
            "q_len and kv_len)";
    return std::nullopt;
  }
  // The kernels locate rows by position (row index + kv_len - q_len), and
  // lengths count row indices: under a ring the two agree only when the
  // lengths are equal.
  if (*spec.qLen != *spec.kvLen &&
      cast<PatternAttrInterface>(spec.pattern).usesLengths()) {
    error = "distribution: tokenized lengths need equal query and key "
            "lengths under a ring, got q_len " + std::to_string(*spec.qLen) +
            " and kv_len " + std::to_string(*spec.kvLen);
    return std::nullopt;
  }
  std::vector<ComponentAttr> components;
  for (ComponentAttr c : decompose(spec.pattern))
    components.push_back(c);
  std::optional<RingPlan> plan =
      planRing(components, spec.heads, spec.kvHeads, *spec.qLen,
               *spec.kvLen, spec.distribution.ranks, spec.distribution.layout,
               spec.distribution.kv, error);
  if (!plan)
    error = "distribution: " + error;
  return plan;
}

LogicalResult mlir::attn::compileCpuRingPackage(const Spec &spec,
                                                const CpuPipelineOptions &opts,
                                                const std::string &outDir,
                                                std::string &error,
                                                llvm::raw_ostream *log) {
  if (failed(checkCpuDtype(spec, error)))
    return failure();
  std::optional<RingPlan> plan = planRingForSpec(spec, error);
  if (!plan)
    return failure();

  // Kernels: ring_init, ring_component_<n> (with origins, positions and
  // stride), ring_finalize, on
  // strided views with dynamic rows so that any piece of a chunk fits.
  MLIRContext *ctx = spec.pattern.getContext();
  OpBuilder b(ctx);
  Location loc = b.getUnknownLoc();
  OwningOpRef<ModuleOp> module = ModuleOp::create(loc);
  b.setInsertionPointToEnd(module->getBody());
  const int64_t dyn = ShapedType::kDynamic;
  auto f32 = b.getF32Type();
  auto view = [&](ArrayRef<int64_t> shape) {
    SmallVector<int64_t> strides(shape.size(), dyn);
    strides.back() = 1;
    return MemRefType::get(
        shape, f32, StridedLayoutAttr::get(ctx, dyn, strides));
  };
  Type qT = view({spec.batch, spec.heads, dyn, spec.headDim});
  Type kT = view({spec.batch, spec.kvHeads, dyn, spec.headDim});
  Type rowT = view({spec.batch, spec.heads, dyn});
  Type lenT = MemRefType::get({spec.batch}, b.getI32Type());
  auto makeFunc = [&](StringRef name, ArrayRef<Type> inputs) {
    auto f = func::FuncOp::create(b, loc, name, b.getFunctionType(inputs, {}));
    f->setAttr(LLVM::LLVMDialect::getEmitCWrapperAttrName(), b.getUnitAttr());
    Block *entry = f.addEntryBlock();
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(entry);
    func::ReturnOp::create(b, loc);
    return f;
  };
  {
    auto f = makeFunc("ring_init", {qT, rowT, rowT});
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPoint(f.getBody().front().getTerminator());
    ValueRange a = f.getArguments();
    InitStateOp::create(b, loc, TypeRange{}, a[0], a[1], a[2]);
  }
  bool usesLengths = cast<PatternAttrInterface>(spec.pattern).usesLengths();
  nlohmann::json kernels = nlohmann::json::array();
  for (auto [n, comp] : llvm::enumerate(plan->kernels)) {
    SmallVector<Type> inputs{qT, kT, kT};
    if (usesLengths)
      inputs.push_back(lenT);
    // Origins (q, k), then positions (q, k) and stride (AttnOrigins.h).
    inputs.append({qT, rowT, rowT});
    inputs.append(5, b.getIndexType());
    std::string name = "ring_component_" + std::to_string(n);
    auto f = makeFunc(name, inputs);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPoint(f.getBody().front().getTerminator());
    ValueRange a = f.getArguments();
    size_t s = usesLengths ? 4 : 3;
    bool readsLengths = comp.getUseLengths() || comp.hasFilters();
    ComponentOp::create(b, loc, TypeRange{}, a[0], a[1], a[2],
                        readsLengths && usesLengths ? a[3] : Value(),
                        /*key_bias=*/Value(), /*key_ids=*/Value(), a[s],
                        a[s + 1], a[s + 2], a.slice(s + 3, 5),
                        comp, b.getF64FloatAttr(spec.effectiveScale()));
    std::string text;
    llvm::raw_string_ostream os(text);
    os << Attribute(comp);
    kernels.push_back({{"name", name},
                       {"symbol", "_mlir_ciface_" + name},
                       {"component", text}});
  }
  // The backward pass ("backward": true): ring_grad_init (delta, zeroed
  // gradients) and ring_component_grad_<n>, the gradient counterpart of
  // ring_component_<n> on the same pieces and origins (docs/Ring.md).
  nlohmann::json gradKernels = nlohmann::json::array();
  if (spec.backward) {
    {
      auto f = makeFunc("ring_grad_init", {qT, qT, rowT, qT, kT, kT});
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPoint(f.getBody().front().getTerminator());
      ValueRange a = f.getArguments();
      GradInitOp::create(b, loc, TypeRange{}, a[0], a[1], a[2], a[3], a[4],
                         a[5]);
    }
    for (auto [n, comp] : llvm::enumerate(plan->kernels)) {
      // q, k, v, grad_out, lse, delta[, lengths], dq, dk, dv, then the
      // update's five origins as for ring_component_<n>.
      SmallVector<Type> inputs{qT, kT, kT, qT, rowT, rowT};
      if (usesLengths)
        inputs.push_back(lenT);
      inputs.append({qT, kT, kT});
      inputs.append(5, b.getIndexType());
      std::string name = "ring_component_grad_" + std::to_string(n);
      auto f = makeFunc(name, inputs);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPoint(f.getBody().front().getTerminator());
      ValueRange a = f.getArguments();
      size_t s = usesLengths ? 7 : 6;
      bool readsLengths = comp.getUseLengths() || comp.hasFilters();
      ComponentGradOp::create(
          b, loc, TypeRange{}, a[0], a[1], a[2], a[3], a[4], a[5],
          readsLengths && usesLengths ? a[6] : Value(), /*key_bias=*/Value(),
          a[s], a[s + 1], a[s + 2], a.slice(s + 3, 5), comp,
          b.getF64FloatAttr(spec.effectiveScale()));
      gradKernels.push_back({{"name", name}, {"symbol", "_mlir_ciface_" + name}});
    }
  }
  {
    SmallVector<Type> inputs{qT, rowT, rowT, qT};
    if (spec.lse)
      inputs.push_back(rowT);
    auto f = makeFunc("ring_finalize", inputs);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPoint(f.getBody().front().getTerminator());
    ValueRange a = f.getArguments();
    FinalizeOp::create(b, loc, TypeRange{}, a[0], a[1], a[2], a[3],
                       spec.lse ? a[4] : Value());
  }
  if (failed(verify(*module))) {
    error = "the ring kernels are invalid IR (see the diagnostics above)";
    return failure();
  }
  if (log)
    *log << "attn-compile: lowering " << spec.name << " for "
         << plan->ranks << " ranks (" << plan->layout << ", "
         << plan->kernels.size() << " kernels)\n";
  if (failed(buildSharedObject(*module, spec.name, opts, outDir, error, log)))
    return failure();

  // Per-rank arguments: the chunk of every row dimension; lengths global.
  OwningOpRef<ModuleOp> whole = buildAttentionModule(spec, ctx);
  FunctionType type = (*whole->getOps<func::FuncOp>().begin()).getFunctionType();
  nlohmann::json args = manifestArgs(type);
  setRingArgRows(args, *plan);

  nlohmann::json manifest = {
      {"format", "attn-package"},
      {"version", 1},
      {"target", "cpu"},
      {"name", spec.name},
      {"library", "kernels.so"},
      {"args", args},
      {"kernels", kernels},
      {"init", "_mlir_ciface_ring_init"},
      {"finalize", "_mlir_ciface_ring_finalize"},
      {"ring", manifestRingPlan(*plan)},
      {"components", manifestComponents(spec)},
      {"tile", {{"q_tile", opts.qTile}, {"kv_tile", opts.kvTile}}},
      {"scale", spec.effectiveScale()},
      {"spec", nlohmann::json::parse(spec.json)}};
  if (spec.backward) {
    // One rank's shapes; the kernels pair with "kernels" by index, so that
    // an update's kernel number names both.
    auto grad = whole->lookupSymbol<func::FuncOp>(spec.name + "_backward");
    nlohmann::json gradArgs = manifestBackwardArgs(grad.getFunctionType());
    setRingArgRows(gradArgs, *plan);
    manifest["backward"] = {{"name", grad.getName().str()},
                            {"args", gradArgs},
                            {"init", "_mlir_ciface_ring_grad_init"},
                            {"kernels", gradKernels}};
  }
  return writeManifest(manifest, outDir, error, log);
}
