//===- GpuTarget.cpp - compile attention specs for NVIDIA GPUs ------------===//
//
// spec module --attn-decompose, convert-attn-to-gpu--> gpu.module of kernels
//   --gpu-lower-to-nvvm-pipeline (format=isa)--> PTX --ptxas--> cubin
//
// The NVVM lowering is upstream's gpu-lower-to-nvvm-pipeline with one pass
// added after gpu-to-nvvm: kernels that take TMA tensor maps get them as
// byval, grid-constant parameters (MarkTensorMapParams below).
//
// The launch plan recorded by convert-attn-to-gpu on the kernels (kind,
// block, shared memory, component) is read before lowering and written to
// the manifest; ptxas's resource report (registers, spills) is added to it.
//
//===----------------------------------------------------------------------===//

#include "attn/Target/GpuTarget.h"
#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Target/CpuTarget.h"
#include "ManifestUtils.h"

#include "mlir/Conversion/AffineToStandard/AffineToStandard.h"
#include "mlir/Conversion/ArithToLLVM/ArithToLLVM.h"
#include "mlir/Conversion/FuncToLLVM/ConvertFuncToLLVMPass.h"
#include "mlir/Conversion/GPUCommon/GPUCommonPass.h"
#include "mlir/Conversion/GPUToNVVM/GPUToNVVMPass.h"
#include "mlir/Conversion/IndexToLLVM/IndexToLLVM.h"
#include "mlir/Conversion/MathToLLVM/MathToLLVM.h"
#include "mlir/Conversion/NVGPUToNVVM/NVGPUToNVVM.h"
#include "mlir/Conversion/NVVMToLLVM/NVVMToLLVM.h"
#include "mlir/Conversion/ReconcileUnrealizedCasts/ReconcileUnrealizedCasts.h"
#include "mlir/Conversion/SCFToControlFlow/SCFToControlFlow.h"
#include "mlir/Conversion/VectorToSCF/VectorToSCF.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/GPU/IR/GPUDialect.h"
#include "mlir/Dialect/GPU/Transforms/Passes.h"
#include "mlir/Dialect/LLVMIR/LLVMDialect.h"
#include "mlir/Dialect/LLVMIR/NVVMDialect.h"
#include "mlir/Dialect/MemRef/Transforms/Passes.h"
#include "mlir/Pass/Pass.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Transforms/Passes.h"

#include "llvm/Support/FileSystem.h"
#include "llvm/Support/MemoryBuffer.h"
#include "llvm/Support/Path.h"
#include "llvm/Support/Program.h"
#include "llvm/Support/Regex.h"

#include <cstdlib>

using namespace mlir;
using namespace mlir::attn;

static void addKernelPasses(OpPassManager &pm, const std::string &arch,
                            bool alwaysState = false,
                            bool warpSpecialize = false) {
  pm.addPass(createAttnDecompose());
  ConvertAttnToGpuOptions options;
  options.alwaysState = alwaysState;
  // Warpgroup MMA needs the sm_90a feature set; other targets use mma.sync.
  options.wgmma = arch == "sm_90a";
  options.warpSpecialize = warpSpecialize && options.wgmma;
  pm.addPass(createConvertAttnToGpu(options));
  pm.addPass(createCanonicalizerPass());
  pm.addPass(createCSEPass());
}

namespace {
/// A kernel marked `attn.tensor_maps = N` by convert-attn-to-gpu takes N
/// CUtensorMaps as its last parameters. TMA reads a map where it lies (a
/// kernel parameter, 64-byte aligned), so each becomes a 128-byte byval
/// parameter marked nvvm.grid_constant: NVPTX then declares
/// `.param .align 64 .b8 p[128]` and hands the kernel its generic address
/// instead of a local copy. A gpu.func cannot carry these attributes, so
/// they are set on the llvm.func that gpu-to-nvvm made of it.
struct MarkTensorMapParams
    : PassWrapper<MarkTensorMapParams, OperationPass<gpu::GPUModuleOp>> {
  MLIR_DEFINE_EXPLICIT_INTERNAL_INLINE_TYPE_ID(MarkTensorMapParams)
  StringRef getArgument() const override {
    return "attn-mark-tensor-map-params";
  }
  void runOnOperation() override {
    getOperation().walk([](LLVM::LLVMFuncOp fn) {
      auto count = fn->getAttrOfType<IntegerAttr>("attn.tensor_maps");
      if (!count)
        return;
      Builder b(fn.getContext());
      auto mapType = LLVM::LLVMArrayType::get(b.getI8Type(), 128);
      unsigned n = fn.getNumArguments();
      for (unsigned i = n - unsigned(count.getInt()); i < n; ++i) {
        fn.setArgAttr(i, LLVM::LLVMDialect::getByValAttrName(),
                      TypeAttr::get(mapType));
        fn.setArgAttr(i, LLVM::LLVMDialect::getAlignAttrName(),
                      b.getI64IntegerAttr(64));
        fn.setArgAttr(i, NVVM::NVVMDialect::getGridConstantAttrName(),
                      b.getUnitAttr());
      }
      fn->removeAttr("attn.tensor_maps");
    });
  }
};
} // namespace

/// MLIR 22's gpu-lower-to-nvvm-pipeline (its passes as
/// `--dump-pass-pipeline` lists them: common, GPU-module and host parts)
/// down to PTX text in a gpu.binary, with MarkTensorMapParams after
/// gpu-to-nvvm.
static void addPtxPasses(OpPassManager &pm, const std::string &arch) {
  pm.addPass(createConvertNVGPUToNVVMPass());
  pm.addPass(createGpuKernelOutliningPass());
  pm.addPass(createConvertVectorToSCFPass());
  pm.addPass(createSCFToControlFlowPass());
  pm.addPass(createConvertNVVMToLLVMPass());
  pm.addPass(createConvertFuncToLLVMPass());
  pm.addPass(memref::createExpandStridedMetadataPass());
  GpuNVVMAttachTargetOptions target;
  target.chip = arch;
  // PTX ISA 8.0 is the first to know sm_90a, 8.1 the first with vector
  // reductions (the grad kernels' red.global.add.v2.f32); sm_80 takes 8.0.
  target.features = arch == "sm_90a" ? "+ptx81" : "+ptx80";
  target.optLevel = 3;
  pm.addPass(createGpuNVVMAttachTarget(target));
  pm.addPass(createLowerAffinePass());
  pm.addPass(createArithToLLVMConversionPass());
  ConvertIndexToLLVMPassOptions index;
  index.indexBitwidth = 64;
  pm.addPass(createConvertIndexToLLVMPass(index));
  pm.addPass(createCanonicalizerPass());
  pm.addPass(createCSEPass());

  ConvertGpuOpsToNVVMOpsOptions gpuToNvvm;
  gpuToNvvm.indexBitwidth = 64;
  pm.addNestedPass<gpu::GPUModuleOp>(createConvertGpuOpsToNVVMOps(gpuToNvvm));
  pm.addNestedPass<gpu::GPUModuleOp>(std::make_unique<MarkTensorMapParams>());
  pm.addNestedPass<gpu::GPUModuleOp>(createCanonicalizerPass());
  pm.addNestedPass<gpu::GPUModuleOp>(createCSEPass());
  pm.addNestedPass<gpu::GPUModuleOp>(createReconcileUnrealizedCastsPass());

  pm.addPass(createGpuToLLVMConversionPass());
  GpuModuleToBinaryPassOptions binary;
  binary.compilationTarget = "isa";
  pm.addPass(createGpuModuleToBinaryPass(binary));
  pm.addPass(createConvertMathToLLVMPass());
  pm.addPass(createCanonicalizerPass());
  pm.addPass(createCSEPass());
  pm.addPass(createReconcileUnrealizedCastsPass());
}

/// The PTX of the module's (only) gpu.binary.
static std::string binaryPtx(ModuleOp module) {
  auto binary = *module.getOps<gpu::BinaryOp>().begin();
  return cast<gpu::ObjectAttr>(binary.getObjects()[0])
      .getObject()
      .getValue()
      .str();
}

LogicalResult mlir::attn::lowerForGpu(ModuleOp module, GpuStage stage,
                                      const std::string &arch,
                                      std::string *ptx, bool warpSpecialize) {
  PassManager pm(module.getContext());
  addKernelPasses(pm, arch, /*alwaysState=*/false, warpSpecialize);
  if (stage == GpuStage::Ptx)
    addPtxPasses(pm, arch);
  if (failed(pm.run(module)))
    return failure();
  if (stage == GpuStage::Ptx)
    *ptx = binaryPtx(module);
  return success();
}

/// ptxas from CUDA_ROOT, CUDA_HOME, CUDA_PATH, /usr/local/cuda or PATH.
static std::string findPtxas() {
  for (const char *var : {"CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"})
    if (const char *dir = std::getenv(var)) {
      std::string p = std::string(dir) + "/bin/ptxas";
      if (llvm::sys::fs::can_execute(p))
        return p;
    }
  if (llvm::sys::fs::can_execute("/usr/local/cuda/bin/ptxas"))
    return "/usr/local/cuda/bin/ptxas";
  if (auto p = llvm::sys::findProgramByName("ptxas"))
    return *p;
  return "";
}

/// Per-kernel registers and spill bytes from `ptxas -v`.
static nlohmann::json parsePtxasReport(StringRef report) {
  nlohmann::json out = nlohmann::json::object();
  llvm::Regex entry("Compiling entry function '([A-Za-z0-9_]+)'");
  llvm::Regex regs("Used ([0-9]+) registers");
  llvm::Regex spill("([0-9]+) bytes spill stores");
  std::string current;
  SmallVector<StringRef> lines;
  report.split(lines, '\n');
  for (StringRef line : lines) {
    SmallVector<StringRef> g;
    if (entry.match(line, &g))
      current = g[1].str();
    else if (!current.empty() && regs.match(line, &g))
      out[current]["registers"] = std::stoi(g[1].str());
    if (!current.empty() && spill.match(line, &g))
      out[current]["spill_bytes"] = std::stoi(g[1].str());
  }
  return out;
}

static LogicalResult writeFile(StringRef path, StringRef data,
                               std::string &error) {
  std::error_code ec;
  llvm::raw_fd_ostream out(path, ec);
  if (ec) {
    error = "cannot write " + path.str() + ": " + ec.message();
    return failure();
  }
  out << data;
  return success();
}

std::string mlir::attn::gpuSpecUnsupported(const Spec &spec) {
  if (spec.dtype != "bf16" && spec.dtype != "f16")
    return "dtype: GPU targets take bf16 or f16 inputs (f32 accumulation), "
           "got " +
           spec.dtype;
  if (spec.headDim != 64 && spec.headDim != 128)
    return "head_dim: GPU targets support 64 and 128, got " +
           std::to_string(spec.headDim);
  return "";
}

LogicalResult mlir::attn::compileGpuPackage(ModuleOp module, const Spec &spec,
                                            const std::string &arch,
                                            const std::string &outDir,
                                            std::string &error,
                                            llvm::raw_ostream *log,
                                            bool alwaysState,
                                            bool warpSpecialize) {
  error = gpuSpecUnsupported(spec);
  if (!error.empty())
    return failure();
  auto func = *module.getOps<func::FuncOp>().begin();
  nlohmann::json args = manifestArgs(func.getFunctionType());
  FunctionType backwardType;
  if (spec.backward)
    backwardType = module.lookupSymbol<func::FuncOp>(spec.name + "_backward")
                       .getFunctionType();
  nlohmann::json components = manifestComponents(spec);

  if (log)
    *log << "attn-compile: generating " << arch << " kernels for " << spec.name
         << " (" << components.size()
         << (components.size() == 1 ? " component)\n" : " components)\n");
  PassManager pm(module.getContext());
  addKernelPasses(pm, arch, alwaysState, warpSpecialize);
  if (failed(pm.run(module))) {
    error = "convert-attn-to-gpu failed (see the diagnostics above)";
    return failure();
  }

  // The launch plan, before lowering erases the attributes.
  auto gpuModule = *module.getOps<gpu::GPUModuleOp>().begin();
  bool needsState = false, tensorMaps = false;
  bool dependentLaunch = gpuModule->hasAttr("attn.dependent_launch");
  // The kernels named by `orderAttr` as manifest entries, and their names.
  auto describeKernels = [&](StringRef orderAttr, nlohmann::json &kernels,
                             nlohmann::json &order) {
    kernels = nlohmann::json::array();
    order = nlohmann::json::array();
    for (Attribute name : cast<ArrayAttr>(gpuModule->getAttr(orderAttr))) {
      StringRef kernelName = cast<StringAttr>(name).getValue();
      auto kernel = gpuModule.lookupSymbol<gpu::GPUFuncOp>(kernelName);
      auto launch = cast<DictionaryAttr>(kernel->getAttr("attn.launch"));
      auto intOf = [&](StringRef key) {
        return cast<IntegerAttr>(launch.get(key)).getInt();
      };
      std::string kind = cast<StringAttr>(launch.get("kind")).getValue().str();
      nlohmann::json k = {{"name", kernelName.str()},
                          {"kind", kind},
                          {"block", intOf("block")},
                          {"shared_bytes", intOf("shared_bytes")}};
      if (auto comp =
              dyn_cast_or_null<ComponentAttr>(launch.get("component"))) {
        k["block_rows"] = intOf("block_rows");
        k["period"] = comp.getPeriod();
        k["residue"] = comp.getResidue() == ComponentAttr::kAllResidues ? "all"
                       : comp.getResidue() == ComponentAttr::kHeadResidue
                           ? "head"
                           : std::to_string(comp.getResidue());
        k["segment"] = comp.getSegment();
      }
      if (launch.get("elements_per_thread"))
        k["elements_per_thread"] = intOf("elements_per_thread");
      if (launch.get("chunk"))
        k["chunk"] = intOf("chunk");
      // A kernel that runs only on calls of some lengths (query rows).
      for (StringRef range : {"rows_at_most", "rows_above"})
        if (auto rows =
                kernel->getAttrOfType<IntegerAttr>(("attn." + range).str()))
          k[range.str()] = rows.getInt();
      tensorMaps |= kernel->hasAttr("attn.tensor_maps");
      kernels.push_back(k);
      order.push_back(kernelName.str());
    }
  };
  nlohmann::json kernels, order;
  describeKernels("attn.launch_order", kernels, order);
  for (const nlohmann::json &k : kernels)
    needsState |= k["kind"] != "single";
  // The backward pass ("backward": true): its kernels, their order and its
  // arguments. GPU packages add every component's share into f32
  // gradients; where the first component writes each element once it
  // overwrites them instead ("overwrites_grads": the runtime does not zero
  // them), and where one such component is the whole pattern
  // ("stores_grads") they also store gradients of the input type in any
  // layout; so do packages of several components, one of which writes each
  // element once ("finishes_grads": each element's last writer stores its
  // share plus the earlier components' float32 sums; docs/Package.md).
  nlohmann::json backward;
  if (gpuModule->hasAttr("attn.backward_order")) {
    nlohmann::json gradKernels, gradOrder;
    describeKernels("attn.backward_order", gradKernels, gradOrder);
    nlohmann::json gradArgs = manifestBackwardArgs(backwardType);
    for (nlohmann::json &a : gradArgs)
      if (a["role"] == "output")
        a["dtype"] = "f32";
    backward = {{"name", gpuModule->getAttrOfType<StringAttr>(
                             "attn.backward_name")
                             .getValue()
                             .str()},
                {"args", gradArgs},
                {"kernels", gradKernels},
                {"launch_order", gradOrder},
                {"stores_grads", gpuModule->hasAttr("attn.stores_grads") ||
                                     gpuModule->hasAttr("attn.finishes_grads")},
                {"finishes_grads", gpuModule->hasAttr("attn.finishes_grads")},
                {"overwrites_grads",
                 gpuModule->hasAttr("attn.overwrites_grads")}};
  }

  // Packages with key_ids: the dedup kernels (DedupKernel.h), which the
  // runtime runs on their own (attn_package_dedup_keys), for sequences of
  // up to max_len ids.
  nlohmann::json dedup;
  if (gpuModule->hasAttr("attn.dedup_order")) {
    nlohmann::json dedupKernels, dedupOrder;
    describeKernels("attn.dedup_order", dedupKernels, dedupOrder);
    auto kernel = gpuModule.lookupSymbol<gpu::GPUFuncOp>(
        dedupOrder[0].get<std::string>());
    auto launch = cast<DictionaryAttr>(kernel->getAttr("attn.launch"));
    dedup = {{"kernels", dedupKernels},
             {"launch_order", dedupOrder},
             {"max_len", cast<IntegerAttr>(launch.get("max_len")).getInt()}};
  }

  if (log)
    *log << "attn-compile: lowering " << kernels.size()
         << " kernels through NVVM to PTX\n";
  std::string ptx;
  {
    PassManager lower(module.getContext());
    addPtxPasses(lower, arch);
    if (failed(lower.run(module))) {
      error = "lowering the kernels to PTX failed (see the diagnostics above)";
      return failure();
    }
    ptx = binaryPtx(module);
  }

  if (std::error_code ec = llvm::sys::fs::create_directories(outDir)) {
    error = "cannot create package directory " + outDir + ": " + ec.message();
    return failure();
  }
  SmallString<256> ptxPath(outDir), cubinPath(outDir), reportPath(outDir),
      manifestPath(outDir);
  llvm::sys::path::append(ptxPath, "kernels.ptx");
  llvm::sys::path::append(cubinPath, "kernels.cubin");
  llvm::sys::path::append(reportPath, "ptxas.log");
  llvm::sys::path::append(manifestPath, "manifest.json");
  if (failed(writeFile(ptxPath, ptx, error)))
    return failure();

  std::string ptxas = findPtxas();
  if (ptxas.empty()) {
    error = "ptxas not found (looked in $CUDA_ROOT, $CUDA_HOME, $CUDA_PATH, "
            "/usr/local/cuda and PATH); install the CUDA toolkit. The PTX is "
            "in " + std::string(ptxPath);
    return failure();
  }
  if (log)
    *log << "attn-compile: assembling with " << ptxas << "\n";
  std::string archFlag = "-arch=" + arch;
  SmallVector<StringRef> ptxasArgs{ptxas, archFlag, "-O3", "-v", ptxPath,
                                   "-o", cubinPath};
  std::optional<StringRef> redirects[] = {std::nullopt, StringRef(reportPath),
                                          StringRef(reportPath)};
  std::string message;
  int rc = llvm::sys::ExecuteAndWait(ptxas, ptxasArgs, std::nullopt,
                                     redirects, 0, 0, &message);
  auto report = llvm::MemoryBuffer::getFile(reportPath);
  std::string reportText = report ? (*report)->getBuffer().str() : "";
  if (rc != 0) {
    error = "ptxas failed on " + std::string(ptxPath) +
            (message.empty() ? "" : ": " + message) + "\n" + reportText;
    return failure();
  }
  nlohmann::json resources = parsePtxasReport(reportText);
  // Each kernel's registers and spills, the backward's as well.
  auto addResources = [&](nlohmann::json &k) {
    std::string name = k["name"];
    if (resources.contains(name)) {
      k["registers"] = resources[name].value("registers", 0);
      k["spill_bytes"] = resources[name].value("spill_bytes", 0);
      if (log)
        *log << "attn-compile:   " << name << ": " << k["registers"].get<int>()
             << " registers, " << k["spill_bytes"].get<int>()
             << " bytes spilled, " << k["shared_bytes"].get<int64_t>()
             << " bytes shared memory\n";
    }
  };
  for (nlohmann::json &k : kernels)
    addResources(k);
  if (!backward.is_null())
    for (nlohmann::json &k : backward["kernels"])
      addResources(k);
  if (!dedup.is_null())
    for (nlohmann::json &k : dedup["kernels"])
      addResources(k);

  nlohmann::json manifest = {
      {"format", "attn-package"},
      {"version", 11}, // 3: kernels take q's and k's strides, 4: out's,
                       // 5: grad kernels read through them, 6: and may
                       // store the gradients, 7: grad_kv's grid spans the
                       // keys' segments, 8: grad_add adds strided runs of
                       // rows, 9: grad kernels take tensor maps with TMA,
                       // 10: forward kernels take q's and out's maps too,
                       // 11: every component of a package that finishes
                       // the gradients takes the stored ones and the sums
                       // (Package.md)
      {"target", arch},
      {"name", spec.name},
      {"dtype", spec.dtype},
      {"cubin", "kernels.cubin"},
      {"ptx", "kernels.ptx"},
      {"args", args},
      {"state", needsState},
      // acc between component kernels: O / l in the input type, kept in out
      // itself, or f32 O in a buffer of its own for ring packages (their
      // partial states travel between ranks).
      {"state_dtype", alwaysState ? std::string("f32") : spec.dtype},
      {"state_in_out", !alwaysState},
      // Each kernel after the first waits for its predecessor's results
      // (griddepcontrol.wait), so the runtime may launch it as a
      // programmatic dependent launch (convert-attn-to-gpu says which).
      {"dependent_launch", dependentLaunch},
      // The kernels take K's and V's TMA tensor maps after the scalars.
      {"tensor_maps", tensorMaps},
      {"kernels", kernels},
      {"launch_order", order},
      {"components", components},
      {"tile", {{"q_tile", 64}, {"kv_tile", 64}}},
      {"scale", spec.effectiveScale()},
      {"spec", nlohmann::json::parse(spec.json)}};
  if (!backward.is_null())
    manifest["backward"] = backward;
  if (!dedup.is_null())
    manifest["dedup"] = dedup;
  if (failed(writeFile(manifestPath, manifest.dump(2) + "\n", error)))
    return failure();
  if (log)
    *log << "attn-compile: wrote package " << outDir << "\n";
  return success();
}

LogicalResult mlir::attn::compileGpuRingPackage(const Spec &spec,
                                                const std::string &arch,
                                                const std::string &outDir,
                                                std::string &error,
                                                llvm::raw_ostream *log,
                                                bool warpSpecialize) {
  std::optional<RingPlan> plan = planRingForSpec(spec, error);
  if (!plan)
    return failure();
  // The kernels run on pieces of any length: dynamic rows, and exactly the
  // plan's kernels as update kernels with the state in global memory.
  Spec local = spec;
  local.qLen = local.kvLen = std::nullopt;
  MLIRContext *ctx = spec.pattern.getContext();
  OwningOpRef<ModuleOp> module = buildAttentionModule(local, ctx);
  PassManager pm(ctx);
  pm.addPass(createAttnDecompose());
  if (failed(pm.run(*module))) {
    error = "attn-decompose failed (see the diagnostics above)";
    return failure();
  }
  auto func = *module->getOps<func::FuncOp>().begin();
  SmallVector<ComponentOp> old(func.getOps<ComponentOp>());
  auto finalize = *func.getOps<FinalizeOp>().begin();
  auto init = *func.getOps<InitStateOp>().begin();
  OpBuilder b(finalize);
  ValueRange state = init.getResults();
  SmallVector<Type> stateTypes(state.getTypes());
  ComponentOp first = old.front();
  Value lengths = func.getNumArguments() > 3 ? func.getArgument(3) : Value();
  for (ComponentAttr comp : plan->kernels) {
    auto c = ComponentOp::create(
        b, first.getLoc(), stateTypes, first.getQuery(), first.getKey(),
        first.getValue(),
        comp.getUseLengths() || comp.hasFilters() ? lengths : Value(),
        first.getKeyBias(), first.getKeyIds(), state[0], state[1], state[2], ValueRange{}, comp,
        first.getScaleAttr());
    state = c.getResults();
  }
  finalize.getAccMutable().assign(state[0]);
  finalize.getMaxMutable().assign(state[1]);
  finalize.getSumMutable().assign(state[2]);
  for (ComponentOp c : llvm::reverse(old))
    c.erase();
  // The backward pass: likewise the plan's kernels as component_grad ops
  // (grad_kv_<n> and grad_q_<n> pair with component_<n>).
  if (spec.backward) {
    auto grad = module->lookupSymbol<func::FuncOp>(spec.name + "_backward");
    SmallVector<ComponentGradOp> oldGrads(grad.getOps<ComponentGradOp>());
    ComponentGradOp firstGrad = oldGrads.front();
    auto ret = cast<func::ReturnOp>(grad.getBody().front().getTerminator());
    OpBuilder gb(ret);
    SmallVector<Value> grads{firstGrad.getDq(), firstGrad.getDk(),
                             firstGrad.getDv()};
    SmallVector<Type> gradTypes(firstGrad.getResultTypes());
    Value gradLengths = grad.getNumArguments() > 6 ? grad.getArgument(6)
                                                   : Value();
    for (ComponentAttr comp : plan->kernels) {
      auto c = ComponentGradOp::create(
          gb, firstGrad.getLoc(), gradTypes, firstGrad.getQuery(),
          firstGrad.getKey(), firstGrad.getValue(), firstGrad.getGradOutput(),
          firstGrad.getLse(), firstGrad.getDelta(),
          comp.getUseLengths() || comp.hasFilters() ? gradLengths : Value(),
          firstGrad.getKeyBias(), grads[0], grads[1], grads[2], ValueRange{},
          comp, firstGrad.getScaleAttr());
      grads.assign(c->result_begin(), c->result_end());
    }
    ret->setOperands(grads);
    for (ComponentGradOp c : llvm::reverse(oldGrads))
      c.erase();
  }

  if (failed(compileGpuPackage(*module, local, arch, outDir, error, log,
                               /*alwaysState=*/true, warpSpecialize)))
    return failure();

  // The manifest: one rank's shapes, the original spec and the ring plan.
  SmallString<256> manifestPath(outDir);
  llvm::sys::path::append(manifestPath, "manifest.json");
  auto text = llvm::MemoryBuffer::getFile(manifestPath);
  if (!text) {
    error = "cannot read back " + std::string(manifestPath);
    return failure();
  }
  nlohmann::json manifest = nlohmann::json::parse((*text)->getBuffer().str());
  setRingArgRows(manifest["args"], *plan);
  if (manifest.contains("backward"))
    setRingArgRows(manifest["backward"]["args"], *plan);
  manifest["spec"] = nlohmann::json::parse(spec.json);
  manifest["ring"] = manifestRingPlan(*plan);
  return writeFile(manifestPath, manifest.dump(2) + "\n", error);
}
