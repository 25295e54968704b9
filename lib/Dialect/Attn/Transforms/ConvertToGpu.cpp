//===- ConvertToGpu.cpp - attention components as tensor-core kernels -----===//
//
// convert-attn-to-gpu: every function holding decomposed attention becomes a
// gpu.module of kernels, one per component
// (docs/passes/convert-attn-to-gpu.md). The kernels themselves are built by
// KernelEmitter (GpuKernelEmitter.h, and the files it lists); this file
// reads a function's shape, chooses each component's kernel and records
// the launch plan the package manifest is written from.
//
//===----------------------------------------------------------------------===//

#include "DedupKernel.h"
#include "GpuKernelEmitter.h"

namespace mlir::attn {
#define GEN_PASS_DEF_CONVERTATTNTOGPU
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;
using namespace mlir::attn::gpu_codegen;

namespace {

/// GQA packages store gradients, their grad_kv blocks walking every q head
/// of a kv head, where a key's rows span a band with hi - lo below this
/// (in gathered rows): local windows, not causal or full attention.
constexpr int64_t kGqaWalkRows = 4096;

//===----------------------------------------------------------------------===//
// The pass
//===----------------------------------------------------------------------===//

struct ConvertAttnToGpuPass
    : public mlir::attn::impl::ConvertAttnToGpuBase<ConvertAttnToGpuPass> {
  using ConvertAttnToGpuBase::ConvertAttnToGpuBase;

  void runOnOperation() override {
    ModuleOp module = getOperation();
    SmallVector<func::FuncOp> funcs;
    module.walk([&](func::FuncOp f) {
      if (!f.getOps<InitStateOp>().empty())
        funcs.push_back(f);
    });
    if (funcs.empty())
      return;
    if (funcs.size() > 1) {
      funcs[1].emitError("convert-attn-to-gpu: one attention function per "
                         "module (each package holds one)");
      return signalPassFailure();
    }
    if (failed(convert(funcs.front())))
      return signalPassFailure();
  }

  LogicalResult convert(func::FuncOp func) {
    SmallVector<ComponentOp> comps(func.getOps<ComponentOp>());
    auto finalize = *func.getOps<FinalizeOp>().begin();
    if (comps.empty())
      return func.emitError("convert-attn-to-gpu: no attn.component");
    auto qType = cast<RankedTensorType>(comps.front().getQuery().getType());
    auto kType = cast<RankedTensorType>(comps.front().getKey().getType());
    for (int64_t d : {dims::kBatch, dims::kHeads, dims::kHeadDim})
      if (qType.isDynamicDim(d) || kType.isDynamicDim(d))
        return func.emitError("convert-attn-to-gpu: batch, heads and head "
                              "dim must be static for GPU targets");
    Type elem = qType.getElementType();
    if (!elem.isBF16() && !elem.isF16())
      return func.emitError("convert-attn-to-gpu: GPU targets take bf16 or "
                            "f16 inputs, got ")
             << elem;
    AttentionShape shape;
    shape.batch = qType.getDimSize(dims::kBatch);
    shape.heads = qType.getDimSize(dims::kHeads);
    shape.kvHeads = kType.getDimSize(dims::kHeads);
    shape.headDim = qType.getDimSize(dims::kHeadDim);
    shape.bf16 = elem.isBF16();
    shape.hasLengths = comps.front().getLengths() != nullptr;
    shape.hasLse = finalize.getNumResults() > 1;
    shape.scale = comps.front().getScaleAttr().getValueAsDouble();
    if (shape.headDim != 64 && shape.headDim != 128)
      return func.emitError("convert-attn-to-gpu: head dim must be 64 or 128 "
                            "for GPU targets, got ")
             << shape.headDim;
    shape.hasKeyBias = comps.front().getKeyBias() != nullptr;
    shape.hasKeyIds = comps.front().getKeyIds() != nullptr;
    shape.wgmma = wgmma;
    shape.warpSpecialize = warpSpecialize;
    shape.halfState = !alwaysState;
    shape.tma = wgmma && !shape.hasKeyIds;
    for (ComponentOp c : comps)
      if ((c.getKeyBias() != nullptr) != shape.hasKeyBias ||
          (c.getKeyIds() != nullptr) != shape.hasKeyIds)
        return c.emitError("convert-attn-to-gpu: components of one attention "
                           "must all take key_bias / key_ids or none");
    for (ComponentOp c : comps)
      if (c.getScaleAttr().getValueAsDouble() != shape.scale)
        return c.emitError("convert-attn-to-gpu: components of one attention "
                           "must share the scale");

    ModuleOp module = getOperation();
    OpBuilder b(module.getBodyRegion());
    b.setInsertionPointToEnd(module.getBody());
    module->setAttr(gpu::GPUDialect::getContainerModuleAttrName(),
                    b.getUnitAttr());
    Location loc = func.getLoc();
    auto gpuModule = gpu::GPUModuleOp::create(b, loc, "attn_kernels");
    b.setInsertionPointToStart(gpuModule.getBody());

    // The state lives in global memory between component kernels. A first
    // component that covers every row starts it (`begin`, no init kernel);
    // a last one that covers every row ends it (`end`: out and lse, not the
    // state's max and sum). One such component alone is `single` (no state
    // at all). A 16-bit state lives in out (stateAcc), so no finalize
    // kernel follows. Ring packages continue an f32 state across steps, so
    // they always take init, update..., finalize.
    auto coversEveryRow = [](ComponentOp op) {
      ComponentAttr c = op.getComponent();
      // Every residue class, or the only class of period 1 (for every head).
      return c.getResidue() == ComponentAttr::kAllResidues ||
             (c.getPeriod() == 1 &&
              (c.getResidue() == 0 || c.isPlainHeadResidue()));
    };
    bool begins = !alwaysState && coversEveryRow(comps.front());
    bool ends = !alwaysState && coversEveryRow(comps.back());
    bool single = begins && comps.size() == 1;
    using StateMode = KernelEmitter::StateMode;
    auto modeOf = [&](size_t i) {
      if (single)
        return StateMode::Single;
      if (i == 0 && begins)
        return StateMode::Begin;
      if (i + 1 == comps.size() && ends)
        return StateMode::End;
      return StateMode::Update;
    };
    SmallVector<Attribute> order;
    KernelEmitter emit(b, loc, shape);
    // Warp-specialised components: three consumer warpgroups (192 rows).
    AttentionShape wsShape = shape;
    wsShape.warpgroups = 3;
    KernelEmitter emitWs(b, loc, wsShape);
    // Narrow bands: one warpgroup (64 rows) with its keys resident. (Two
    // warpgroups sharing a window of 4 tiles, 2 blocks/SM, spilled 160
    // bytes and ran slower: bench/gpu_ab.md.) Filtered gathered
    // components: one warpgroup walking its key tiles (needsOneWarpgroup).
    AttentionShape oneWarpgroupShape = shape;
    oneWarpgroupShape.warpgroups = 1;
    KernelEmitter emitOneWarpgroup(b, loc, oneWarpgroupShape);
    auto add = [&](gpu::GPUFuncOp f) {
      order.push_back(b.getStringAttr(f.getName()));
      b.setInsertionPointToEnd(gpuModule.getBody());
      ++numKernels;
    };
    if (!begins)
      add(emit.emitInit("init"));
    auto emitterOf = [&](ComponentAttr c) -> KernelEmitter & {
      return isWarpSpecialized(shape, c) ? emitWs
             : residentKeyTiles(shape, c) > 0 || needsOneWarpgroup(shape, c)
                 ? emitOneWarpgroup
                 : emit;
    };
    // Head dim 64, one warp-specialised component alone: the two-blocks-an-SM
    // kernel is faster on sequences of up to kShortSequenceRows rows (at
    // 8 x 4096 causal 730 -> 648 µs, tokenized 660 -> 630, full 1238 ->
    // 1216; at 8192 full is 3% slower, and from 16384 on causal too:
    // bench/gpu_ab.md, "Kernels by the call's length"). The package
    // carries both kernels, each with the range of query rows it runs at
    // (attn.rows_at_most, attn.rows_above), and the runtime launches the
    // one whose range holds the call's.
    AttentionShape shortShape = shape;
    shortShape.warpSpecialize = false;
    KernelEmitter emitShort(b, loc, shortShape);
    for (auto [i, c] : llvm::enumerate(comps)) {
      std::string name = ("component_" + Twine(i)).str();
      gpu::GPUFuncOp kernel =
          emitterOf(c.getComponent())
              .emitComponent(name, c.getComponent(), modeOf(i));
      // (`single` is never a ring package's, whose ranks pick their kernels
      // by piece, not by length.)
      const bool byLength = single && shape.headDim == 64 &&
                            isWarpSpecialized(shape, c.getComponent());
      if (byLength)
        kernel->setAttr("attn.rows_above",
                        b.getI64IntegerAttr(kShortSequenceRows));
      add(kernel);
      if (byLength) {
        gpu::GPUFuncOp shortKernel = emitShort.emitComponent(
            name + "_short", c.getComponent(), modeOf(i));
        shortKernel->setAttr("attn.rows_at_most",
                             b.getI64IntegerAttr(kShortSequenceRows));
        add(shortKernel);
      }
    }
    // A 16-bit state lives in out (KernelEmitter::stateAcc): nothing is
    // left to finalize.
    if (!ends && alwaysState)
      add(emit.emitFinalize("finalize"));
    // A ring rank's piece of rows may meet a component that covers every
    // row first, last or alone: the runtime then launches its `begin`
    // variant (no init of that piece's state), its `end` variant (out and
    // lse, no finalize) or its `single` one (no state at all) in place of
    // the `update` kernel (docs/Ring.md).
    if (alwaysState)
      for (auto [i, c] : llvm::enumerate(comps)) {
        if (!coversEveryRow(c))
          continue;
        for (StateMode mode :
             {StateMode::Begin, StateMode::End, StateMode::Single})
          add(emitterOf(c.getComponent())
                  .emitComponent(("component_" + Twine(i) + "_" +
                                  KernelEmitter::kindName(mode))
                                     .str(),
                                 c.getComponent(), mode));
      }
    gpuModule->setAttr("attn.launch_order", b.getArrayAttr(order));
    // Packages over embedding tables also turn token sequences into their
    // key_ids and key_bias (DedupKernel.h), up to the sort size whose
    // shared memory the architecture gives one block (227 KB on sm_90,
    // 99 KB on sm_86).
    if (shape.hasKeyIds) {
      ArrayAttr dedupOrder =
          emitDedupKernels(b, loc, shape.wgmma ? 16384 : 8192);
      b.setInsertionPointToEnd(gpuModule.getBody());
      gpuModule->setAttr("attn.dedup_order", dedupOrder);
    }
    if (shape.dependentLaunch())
      gpuModule->setAttr("attn.dependent_launch", b.getUnitAttr());
    // The keys: k's rows, or the columns of key_ids [B, Lk].
    ShapedType keysType = kType;
    unsigned keysDim = dims::kRows;
    if (Value ids = comps.front().getKeyIds()) {
      keysType = cast<ShapedType>(ids.getType());
      keysDim = 1;
    }
    gpuModule->setAttr(
        "attn.signature",
        b.getDictionaryAttr(
            {b.getNamedAttr("name", b.getStringAttr(func.getSymName())),
             b.getNamedAttr("dtype", b.getStringAttr(shape.bf16 ? "bf16" : "f16")),
             b.getNamedAttr("batch", b.getI64IntegerAttr(shape.batch)),
             b.getNamedAttr("heads", b.getI64IntegerAttr(shape.heads)),
             b.getNamedAttr("kv_heads", b.getI64IntegerAttr(shape.kvHeads)),
             b.getNamedAttr("head_dim", b.getI64IntegerAttr(shape.headDim)),
             b.getNamedAttr("q_len", b.getI64IntegerAttr(
                                         qType.isDynamicDim(dims::kRows)
                                             ? -1
                                             : qType.getDimSize(dims::kRows))),
             b.getNamedAttr("kv_len", b.getI64IntegerAttr(
                                          keysType.isDynamicDim(keysDim)
                                              ? -1
                                              : keysType.getDimSize(keysDim))),
             b.getNamedAttr("key_bias", b.getBoolAttr(shape.hasKeyBias)),
             b.getNamedAttr("key_ids", b.getBoolAttr(shape.hasKeyIds)),
             b.getNamedAttr("lengths", b.getBoolAttr(shape.hasLengths)),
             b.getNamedAttr("lse", b.getBoolAttr(shape.hasLse)),
             b.getNamedAttr("scale", b.getF64FloatAttr(shape.scale))}));
    func.erase();
    return convertBackward(gpuModule, shape);
  }

  /// The backward function of the module (one with attn.grad_init, after
  /// attn-decompose), if any, becomes grad kernels in `gpuModule`: one
  /// grad_prepare, then grad_kv and grad_q per component, listed in the
  /// module's attn.backward_order. They use mma.sync on both targets.
  LogicalResult convertBackward(gpu::GPUModuleOp gpuModule,
                                const AttentionShape &shape) {
    func::FuncOp gradFunc;
    getOperation().walk([&](func::FuncOp f) {
      if (!f.getOps<GradInitOp>().empty())
        gradFunc = f;
    });
    if (!gradFunc)
      return success();
    if (shape.hasKeyIds)
      return gradFunc.emitError("convert-attn-to-gpu: the backward pass takes "
                                "no key_ids");
    SmallVector<ComponentGradOp> comps(gradFunc.getOps<ComponentGradOp>());
    for (ComponentGradOp c : comps)
      if (c.getScaleAttr().getValueAsDouble() != shape.scale)
        return c.emitError("convert-attn-to-gpu: the backward pass must share "
                           "the forward's scale");
    // One warpgroup of 64 rows (or keys) a block: wgmma on sm_90a,
    // mma.sync on sm_80; the walked tiles by TMA on sm_90a where their rows
    // have period 1, the others by cp.async.
    AttentionShape gradShape = shape;
    gradShape.warpgroups = 1;
    gradShape.warpSpecialize = false;
    OpBuilder b(gpuModule.getBody(), gpuModule.getBody()->end());
    KernelEmitter emit(b, gradFunc.getLoc(), gradShape);
    // A component over every row and key (period 1, or all residue
    // classes; segments too, since grad_kv's grid spans the keys'
    // segments as well as the rows'): its grad_q writes each row of dq once
    // and its grad_kv each row of dk and dv once. Under GQA a grad_kv block
    // then walks every q head of its kv head, which pays where a key's rows
    // span a narrow band (kGqaWalkRows) and loses where they run to the end
    // (causal: the q heads' rows that concurrent blocks read outgrow the
    // L2; bench/gqa_grads_h100.md), so wider GQA components add.
    auto coversEveryElement = [&](ComponentAttr c) {
      const int64_t lo = c.getBandLo(), hi = c.getBandHi();
      const bool narrow = lo != ComponentAttr::kNegInf &&
                          hi != ComponentAttr::kPosInf &&
                          hi - lo < kGqaWalkRows;
      return (c.getPeriod() == 1 ||
              c.getResidue() == ComponentAttr::kAllResidues) &&
             (shape.heads == shape.kvHeads || narrow);
    };
    // Ring packages (an f32 state) add their peers' shares: they add, but
    // for their `_once` kernels below.
    auto writesOnce = [&](ComponentAttr c) {
      return shape.halfState && coversEveryElement(c);
    };
    // The first component writing every element once overwrites the f32
    // gradients (attn.overwrites_grads: the runtime does not zero them),
    // the later ones add. A package of one such component may also store
    // the gradients in the input type (attn.stores_grads).
    const bool firstWritesOnce = writesOnce(comps.front().getComponent());
    emit.storeGrads = comps.size() == 1 && firstWritesOnce;
    // Several components, one of which writes every element once, finish
    // the gradients (attn.finishes_grads; KernelEmitter::finishing): each
    // element's last writer stores it in the input type, its share plus the
    // earlier ones' float32 sums, and the earlier writers add into those
    // sums. Every element has a last writer (the one component covers
    // them all), and each component writes every row and key of its groups.
    // (Under GQA a block per key would need the walk's float32 path as
    // well: not done.)
    const bool finishing = comps.size() > 1 && shape.heads == shape.kvHeads &&
                           llvm::any_of(comps, [&](ComponentGradOp c) {
                             return writesOnce(c.getComponent());
                           });
    SmallVector<Attribute> order;
    auto add = [&](gpu::GPUFuncOp f) {
      order.push_back(b.getStringAttr(f.getName()));
      b.setInsertionPointToEnd(gpuModule.getBody());
      ++numKernels;
    };
    add(emit.emitGradPrepare("grad_prepare"));
    for (auto [i, c] : llvm::enumerate(comps)) {
      emit.writesOnce = i == 0 && firstWritesOnce;
      emit.finishing = finishing;
      emit.firstComponent = i == 0;
      emit.laterComponents.clear();
      for (ComponentGradOp later : ArrayRef(comps).drop_front(i + 1))
        emit.laterComponents.push_back(later.getComponent());
      add(emit.emitGradKeys(("grad_kv_" + Twine(i)).str(), c.getComponent()));
      add(emit.emitGradQueries(("grad_q_" + Twine(i)).str(),
                               c.getComponent()));
    }
    // Ring packages (an f32 state across steps) add their peers' key
    // gradients into their own; the ring executor launches it by name.
    if (!shape.halfState)
      add(emit.emitGradAdd("grad_add"));
    // And where a component writes every element once (over every row and
    // key, with a kv head per q head or, under GQA, a narrow band, whose
    // grad_kv blocks walk the q heads of their kv head), its `_once`
    // kernels overwrite the f32 gradients: a rank launches them for the
    // first update into a piece of its dq, dk and dv (or of a step's
    // received rows), which then need no zeroing (docs/Ring.md).
    if (!shape.halfState)
      for (auto [i, c] : llvm::enumerate(comps)) {
        ComponentAttr comp = c.getComponent();
        if (!coversEveryElement(comp))
          continue;
        emit.writesOnce = true;
        emit.finishing = false;
        emit.laterComponents.clear();
        add(emit.emitGradKeys(("grad_kv_" + Twine(i) + "_once").str(), comp));
        add(emit.emitGradQueries(("grad_q_" + Twine(i) + "_once").str(),
                                 comp));
      }
    gpuModule->setAttr("attn.backward_order", b.getArrayAttr(order));
    if (emit.storeGrads)
      gpuModule->setAttr("attn.stores_grads", b.getUnitAttr());
    if (firstWritesOnce)
      gpuModule->setAttr("attn.overwrites_grads", b.getUnitAttr());
    if (finishing)
      gpuModule->setAttr("attn.finishes_grads", b.getUnitAttr());
    gpuModule->setAttr("attn.backward_name",
                       b.getStringAttr(gradFunc.getSymName()));
    gradFunc.erase();
    return success();
  }
};

} // namespace
