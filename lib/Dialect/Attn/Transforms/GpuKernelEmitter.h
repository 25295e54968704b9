//===- GpuKernelEmitter.h - the kernels of convert-attn-to-gpu ------------===//
//
// What the files of convert-attn-to-gpu share: the static shape of one
// attention function (AttentionShape), which kernel shape each component
// gets (warp-specialised, resident keys, one warpgroup), and KernelEmitter,
// which builds the gpu.func kernels of a package. Its definitions are split
// by kernel family:
//
//   GpuKernelEmitter.cpp       fragments, MMAs (mma.sync, wgmma), shared
//                              tiles, cp.async and TMA, where a block's
//                              group lies
//   GpuComponentKernel.cpp     the forward's component kernels
//   GpuElementwiseKernels.cpp  init, finalize, grad_prepare, grad_add
//   GpuBackwardKernels.cpp     grad_q and grad_kv
//   ConvertToGpu.cpp           the pass that drives them
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_LIB_DIALECT_ATTN_TRANSFORMS_GPUKERNELEMITTER_H
#define ATTN_LIB_DIALECT_ATTN_TRANSFORMS_GPUKERNELEMITTER_H

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Pattern/Pattern.h"
#include "attn/Utils/FloatMath.h"
#include "attn/Utils/IndexMath.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/GPU/IR/GPUDialect.h"
#include "mlir/Dialect/LLVMIR/LLVMDialect.h"
#include "mlir/Dialect/LLVMIR/NVVMDialect.h"
#include "mlir/Dialect/NVGPU/IR/NVGPUDialect.h"
#include "mlir/Dialect/Vector/IR/VectorOps.h"

#include <array>
#include <cmath>

namespace mlir::attn::gpu_codegen {

constexpr int64_t kBlockKeys = 64;
/// K/V slots of a warp-specialised kernel (one block per SM leaves the
/// shared memory for them).
constexpr int64_t kWsSlots = 4;
/// Registers per thread after setmaxnreg in a warp-specialised kernel of
/// 512 threads (launched at 128): 128 x 24 + 384 x 160 <= 65536, the
/// registers the launch gave the block (setmaxnreg.inc waits until the
/// block holds what it asks for: more would hang the kernel).
constexpr int64_t kProducerRegisters = 24;
constexpr int64_t kConsumerRegisters = 160;
constexpr int64_t kKeyNTiles = kBlockKeys / 8;
constexpr int64_t kElementwiseThreads = 256;
/// How far (log2 units) a row's running max may lag its true max before
/// the accumulators are rescaled: probabilities stay below 2^8 = 256, far
/// inside f16/bf16 and f32 range.
constexpr float kRescaleSlack = 8.0f;

/// Elements per thread of init/finalize: 16-byte accesses to out and a
/// 16-bit state, 32-byte ones to an f32 state.
constexpr int64_t kElementwiseVector = 8;


/// Static facts of one attention function, from its types.
struct AttentionShape {
  int64_t batch, heads, kvHeads, headDim;
  bool bf16;
  bool hasLengths, hasLse;
  /// Scores take key_bias[b, j]; keys are rows key_ids[b, j] of k/v tables.
  bool hasKeyBias = false, hasKeyIds = false;
  /// Warpgroup MMA (sm_90a) from swizzled tiles instead of mma.sync.
  bool wgmma = false;
  /// The state's acc holds O / l in the 16-bit storage type (half the bytes
  /// of f32 O between component kernels) rather than f32 O; ring packages,
  /// whose partial states travel between ranks, keep f32.
  bool halfState = false;
  /// Each kernel after the first runs as a programmatic dependent launch of
  /// the one before (sm_90a with a 16-bit state; the manifest's
  /// "dependent_launch"): it merges the stored state after its key loop,
  /// behind griddepcontrol.wait (see ComponentKernel::mergeEarlierState).
  bool dependentLaunch() const { return wgmma && halfState; }
  /// Warp-specialised kernels where the keys are contiguous (the
  /// `warp-specialize` option; see ComponentKernel).
  bool warpSpecialize = false;
  /// K/V tiles arrive by TMA (sm_90a, no key_ids): every kernel then takes
  /// two tensor maps, K's and V's for its period, by value after the
  /// scalars (docs/Package.md).
  bool tma = false;
  double scale;
  /// Row stride of the mma.sync shared-memory tiles in elements: padded by 8
  /// so that the 8 rows one ldmatrix reads start in different banks.
  int64_t smemStride() const { return headDim + 8; }
  /// 16 query rows per warp: one warpgroup (4 warps, 64 rows) with
  /// mma.sync, two (8 warps, 128 rows) sharing each K/V tile with wgmma.
  /// Warpgroups that compute (wgmma): 2, or 3 in warp-specialised kernels.
  int64_t warpgroups = 2;
  int64_t warps() const { return wgmma ? 4 * warpgroups : 4; }
  int64_t threads() const { return 32 * warps(); }
  int64_t blockRows() const { return 16 * warps(); }
  /// Bytes of one tile row: padded for ldmatrix, or 128-byte swizzle rows
  /// (the tile is then D/64 panels of rows x 128 bytes).
  int64_t rowBytes() const { return wgmma ? headDim * 2 : smemStride() * 2; }
  int64_t qTileBytes() const { return blockRows() * rowBytes(); }
  int64_t kvTileBytes() const { return kBlockKeys * rowBytes(); }
};

/// Whether `comp` gets a warp-specialised kernel: with the
/// `warp-specialize` option, where its keys are contiguous (always by TMA)
/// and its rows may attend more than kShortRowKeys keys. Blocks of rows that
/// attend few keys (local windows, the strided band, LongNet's short
/// segments) are short, and with one block per SM nothing hides their
/// prologue and epilogue: they stay on the two-blocks-per-SM kernels.
constexpr int64_t kShortRowKeys = 4096;
/// At head dim 64 a package whose one component is warp-specialised also
/// carries that component's two-blocks-an-SM kernel, which runs instead on
/// calls of at most this many query rows (ConvertAttnToGpuPass).
constexpr int64_t kShortSequenceRows = 4096;
inline bool isWarpSpecialized(const AttentionShape &shape,
                              ComponentAttr comp) {
  if (!shape.warpSpecialize || !shape.tma || comp.getPeriod() != 1)
    return false;
  int64_t keys = std::numeric_limits<int64_t>::max();
  if (comp.getBandLo() != ComponentAttr::kNegInf &&
      comp.getBandHi() != ComponentAttr::kPosInf)
    keys = comp.getBandHi() - comp.getBandLo() + 1;
  if (comp.getSegment() > 0)
    keys = std::min(keys, comp.getSegment());
  return keys > kShortRowKeys;
}

/// Key tiles a 64-row block of `comp` holds all at once, or 0 where its
/// kernel walks the key tiles. A band at most kMaxResidentTiles tiles wide
/// for 64 consecutive rows (hi - lo <= 128: strided's band, narrow local
/// windows) gets one-warpgroup blocks that load every key tile they need
/// up front and take the softmax in one step over all of them: no online
/// rescaling of O, one row max and sum, and no per-tile waits (see
/// ComponentKernel's `resident`). Its V tiles load into K's shared memory
/// once S is done, so that a block takes 64 KB and three fit an SM.
/// Components that continue a loaded state before their loop (f32 ring
/// states) keep the walking kernels.
constexpr int64_t kMaxResidentTiles = 3;
inline int64_t residentKeyTiles(const AttentionShape &shape,
                                ComponentAttr comp) {
  if (!shape.tma || !shape.halfState || comp.getPeriod() != 1 ||
      isWarpSpecialized(shape, comp))
    return 0;
  int64_t lo = comp.getBandLo(), hi = comp.getBandHi();
  if (lo == ComponentAttr::kNegInf || hi == ComponentAttr::kPosInf ||
      hi - lo > (kMaxResidentTiles - 1) * kBlockKeys)
    return 0;
  return (kBlockKeys + hi - lo + kBlockKeys - 1) / kBlockKeys;
}

/// Whether `comp` runs on one-warpgroup blocks (64 rows, two blocks an SM,
/// up to 255 registers a thread) although its kernel walks its key tiles:
/// gathered components with filters (LongNet union's later branches,
/// which exclude the earlier ones). Their per-element predicates on top
/// of a two-warpgroup block's 128 registers spilled 156-284 bytes; on one
/// warpgroup they spill none and LongNet's union ran 1-2% faster
/// (bench/gpu_ab.md, "One warpgroup for filtered gathered components").
/// Gathered components without filters stay on two warpgroups, where
/// strided and LongNet's sum are faster, and so do those whose exclusions
/// are all key ranges (exclusionsAsRanges: no predicates; LongNet's union
/// 431 -> 445 TF/s at L = 32768 and 447 -> 474 at 131072 against one
/// warpgroup with the predicates, while one warpgroup without them did
/// not gain: bench/gpu_ab.md).
inline bool exclusionsAsRanges(const AttentionShape &shape, ComponentAttr comp);
inline bool needsOneWarpgroup(const AttentionShape &shape,
                              ComponentAttr comp) {
  // (Warp-specialised components have period 1.)
  return shape.wgmma && comp.getPeriod() > 1 && comp.hasFilters() &&
         !exclusionsAsRanges(shape, comp);
}

/// The segments w of `comp`'s exclusions that take, from every row at
/// position P, each of its keys at positions floor(P / w) * w .. P: LongNet
/// branches (dilated, segment w, rate r) that hold every pair of `comp`
/// inside one of their segments. That takes `comp` causal (its keys at or
/// before the row) and each position of its groups in the branch's class:
/// rate 1; a head offset where `comp` takes the head's class h % period
/// and r divides its period and segment; or no head offset (the branch's
/// class is 0) where `comp` takes a fixed class c with c % r == 0 and r
/// divides its period and segment. Such keys form a suffix of every
/// row's keys, so the kernels end their key ranges before it rather than
/// masking its tiles: LongNet's union, whose (8192, 4) branch excludes the
/// keys of the row's own 2048-segment and whose (32768, 16) branch those of
/// its 8192-segment. Not in ring packages (an f32 state), whose predicates
/// see positions other than the groups'.
inline SmallVector<int64_t> segmentExclusions(const AttentionShape &shape,
                                              ComponentAttr comp) {
  SmallVector<int64_t> segments;
  if (!shape.halfState || comp.getBandLo() == ComponentAttr::kNegInf ||
      comp.getBandLo() < 0)
    return segments;
  for (Attribute excluded : comp.getExclude()) {
    auto branch = dyn_cast<DilatedAttr>(excluded);
    if (!branch)
      continue;
    const int64_t rate = branch.getRate();
    const bool classesAligned =
        comp.getPeriod() % rate == 0 && comp.getSegment() % rate == 0;
    const bool inBranchClass =
        branch.getHeadOffset()
            ? comp.isPlainHeadResidue()
            : comp.getResidue() >= 0 && comp.getResidue() % rate == 0;
    if (rate == 1 || (classesAligned && inBranchClass))
      segments.push_back(branch.getSegment());
  }
  return segments;
}

/// Whether every filter of `comp` is an exclusion that segmentExclusions
/// turns into key ranges (LongNet's union): its forward kernels then need
/// no predicate at all, ending each row's keys at its excluded segment in
/// the edge tiles' window masks, and run as unfiltered components do.
inline bool exclusionsAsRanges(const AttentionShape &shape,
                               ComponentAttr comp) {
  return comp.getInclude().empty() && !comp.getExclude().empty() &&
         segmentExclusions(shape, comp).size() == comp.getExclude().size();
}

/// One 16x8 f32 accumulator fragment: c[0], c[1] are row lane/4, columns
/// 2*(lane%4) + {0, 1}; c[2], c[3] the same columns of row lane/4 + 8.
using AccFrag = std::array<Value, 4>;

class KernelEmitter {
public:
  KernelEmitter(OpBuilder &b, Location loc, const AttentionShape &shape)
      : b(b), loc(loc), m{b, loc}, f{b, loc}, shape(shape) {
    ctx = b.getContext();
    f16 = b.getF16Type();
    f32 = b.getF32Type();
    i32 = b.getI32Type();
    auto global = gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Global);
    storageType = MemRefType::get({ShapedType::kDynamic}, f16, MemRefLayoutAttrInterface{}, global);
    floatType = MemRefType::get({ShapedType::kDynamic}, f32, MemRefLayoutAttrInterface{}, global);
    lengthsType = MemRefType::get({ShapedType::kDynamic}, i32, MemRefLayoutAttrInterface{}, global);
  }

  /// The uniform kernel signature (the runtime passes the same arguments to
  /// every kernel of a package):
  ///   q, k, v, lengths, out, lse, acc, max, sum, keyBias, keyIds,
  ///   qLen, kLen, qOrigin, kOrigin, rowLenShift, qPos, kPos, posStride,
  ///   bhOffset, qStrideB, qStrideH, qStrideR, kStrideB, kStrideH, kStrideR,
  ///   oStrideB, oStrideH, oStrideR
  ///   [kMap, vMap, qMap, oMap]   (with TMA: CUtensorMaps by value, see
  ///                  beginKernel; q's and out's for the component's period,
  ///                  as k's and v's)
  /// For the component's groups and bands, query row i sits at position
  /// qOrigin + i and key j at kOrigin + j. Lengths and filters see global
  /// positions: rows with rowLenShift + posStride * i >= lengths[b] and keys
  /// with kPos + posStride * j >= lengths[b] are padding, and the filters
  /// see row i at qPos + posStride * i, key j at kPos + posStride * j.
  /// A whole sequence passes (Lk - Lq, 0, 0, Lk - Lq, 0, 1); a rank's slice
  /// of a ring (qo, ko, qo, qo, ko, 1); a striped rank rq with keys of rank
  /// rk (0, 0, rq, rq, rk, ranks). A component kernel's block z takes
  /// (batch, head) pair bhOffset + z: the runtime may launch a package a
  /// few pairs at a time (docs/Package.md). q's element (b, h, i, d) sits
  /// at b*qStrideB + h*qStrideH + i*qStrideR + d, and k's and v's likewise
  /// with the k strides (a [B, L, H, D] tensor passes as its [B, H, L, D]
  /// view, without a copy), and out's (with a 16-bit state in it) with the
  /// o strides; an f32 state and lse are contiguous.
  FunctionType kernelType() {
    Type index = b.getIndexType();
    Type accType = shape.halfState ? storageType : floatType;
    SmallVector<Type> args{storageType, storageType, storageType, lengthsType,
                           storageType, floatType,   accType,     floatType,
                           floatType,   floatType,   lengthsType};
    args.append(kNumScalarArgs, index);
    if (shape.tma)
      args.append(4, LLVM::LLVMPointerType::get(ctx));
    return FunctionType::get(ctx, args, {});
  }

  /// How a component kernel meets the softmax state of the other
  /// components: `single` and `begin` start from the empty state, `update`
  /// and `end` load it from global memory; `single` and `end` write out and
  /// lse, `begin` and `update` store the state.
  enum class StateMode { Single, Begin, Update, End };
  /// A component of the forward as one kernel (GpuComponentKernel.cpp,
  /// ComponentKernel).
  gpu::GPUFuncOp emitComponent(StringRef name, ComponentAttr comp,
                               StateMode mode);
  gpu::GPUFuncOp emitInit(StringRef name);
  static StringRef kindName(StateMode mode) {
    switch (mode) {
    case StateMode::Single: return "single";
    case StateMode::Begin: return "begin";
    case StateMode::Update: return "update";
    case StateMode::End: return "end";
    }
    llvm_unreachable("unknown state mode");
  }
  gpu::GPUFuncOp emitFinalize(StringRef name);

  // The backward pass (docs/Backward.md): mma.sync kernels on both GPU
  // targets, taking gradKernelType's arguments.
  /// delta = rowsum(dO * O) per query row (one thread a row).
  gpu::GPUFuncOp emitGradPrepare(StringRef name);
  /// dq += scale * dS K over the component's pairs, query-major (the
  /// forward's blocks and key tiles).
  gpu::GPUFuncOp emitGradQueries(StringRef name, ComponentAttr comp);
  /// dk += scale * dS^T Q and dv += P^T dO, key-major: a block takes 64
  /// keys of a group and walks the query tiles that attend them.
  gpu::GPUFuncOp emitGradKeys(StringRef name, ComponentAttr comp);
  /// Ring packages: dk += dq over qLen planes of kLen rows of D f32
  /// elements, each addressed through its own plane and row strides
  /// (DKStrideH, DKStrideR; DQStrideH, DQStrideR). A rank adds the key
  /// gradients its peers computed for its rows (packed, passed as dq)
  /// where those rows sit in its own (docs/Ring.md, "The backward pass").
  gpu::GPUFuncOp emitGradAdd(StringRef name);

protected:
  static constexpr int64_t kNumScalarArgs = 18;
  enum Arg {
    Q, K, V, Lengths, Out, Lse, Acc, Max, Sum, KeyBias, KeyIds, QLen, KLen,
    QOrigin, KOrigin, RowLenShift, QPos, KPos, PosStride, BhOffset,
    QStrideB, QStrideH, QStrideR, KStrideB, KStrideH, KStrideR,
    OStrideB, OStrideH, OStrideR, KMap, VMap, QMap, OMap
  };

  /// The backward kernels' signature: kernelType's (without tensor maps),
  /// then grad_out (16-bit), dq, dk, dv and delta, then whether the kernels
  /// store the gradients (GradStore: 1) or add into f32 ones (0), and the
  /// element strides (batch, head, row) of stored dq and of stored dk and dv,
  /// then the float32 sums of the components before the last (contiguous,
  /// like dq, dk and dv), which a finishing kernel adds to its own share
  /// before it stores (null elsewhere).
  /// The gradient memrefs are f32; stored ones hold the input type, which
  /// the stores address by hand (storeGradPair).
  /// With TMA (sm_90a), two tensor maps follow, by value: grad_kv's walk
  /// reads Q and dO tiles through them, grad_q's K and V tiles (the other
  /// kernels take empty ones).
  FunctionType gradKernelType() {
    SmallVector<Type> args(kernelType().getInputs());
    if (shape.tma)
      args.resize(args.size() - 4);
    args.append({storageType, floatType, floatType, floatType, floatType});
    args.append(7, b.getIndexType());
    args.append({floatType, floatType, floatType});
    if (shape.tma)
      args.append(2, LLVM::LLVMPointerType::get(ctx));
    return FunctionType::get(ctx, args, {});
  }
  /// Where the backward kernels' own arguments sit (after the scalars).
  static constexpr unsigned kGradOutArg = 11 + kNumScalarArgs;
  enum GradArg : unsigned {
    GradOut = kGradOutArg, DQ, DK, DV, Delta, GradStore,
    DQStrideB, DQStrideH, DQStrideR, DKStrideB, DKStrideH, DKStrideR,
    DQAcc, DKAcc, DVAcc, WalkMap0, WalkMap1
  };

public:
  /// The backward kernels may store the gradients in the input type instead
  /// of adding into f32 ones (the runtime's choice, GradStore): set where
  /// one component's kernels write every element of dq, dk and dv exactly
  /// once (ConvertAttnToGpuPass::convertBackward), so it implies writesOnce.
  bool storeGrads = false;
  /// The next component's grad kernels write each element of dq, dk and dv
  /// exactly once (ConvertAttnToGpuPass::convertBackward): their float32
  /// path then stores too, zeros included, rather than adding, so that the
  /// runtime need not zero the gradients when this is the first component.
  bool writesOnce = false;
  /// The package finishes the gradients (ConvertAttnToGpuPass::
  /// convertBackward: several components, a kv head per q head, one of
  /// them over every element). Where the runtime stores gradients in the
  /// input type (GradStore), each component's kernels write every row (or
  /// key) of their groups once: into the float32 sums (DQAcc, DKAcc,
  /// DVAcc) where a later component's groups hold it too
  /// (`laterComponents`; stored by a first component that writes every
  /// element once, added otherwise), and elsewhere, as its last writer,
  /// the total in the input type: its share plus the earlier components'
  /// sums. No float32 pass follows. Their float32 paths add as any
  /// component's.
  bool finishing = false;
  /// With `finishing`: whether the next component is the first (the sums
  /// hold no earlier share for it to add), and the components after it.
  bool firstComponent = true;
  SmallVector<ComponentAttr> laterComponents;

protected:
  /// The f32 pair (element, element + 1) of the earlier components' sum
  /// `acc` (DQAcc, DKAcc or DVAcc) added to (x, y), where the package
  /// finishes the gradients and an earlier component wrote that sum;
  /// (x, y) elsewhere.
  std::pair<Value, Value> withEarlierSum(GradArg acc, Value element, Value x,
                                         Value y);
  /// With `finishing`: `intoSums()` where one of the later components'
  /// groups (placeGroup) holds the row or key at `position` of head `h`,
  /// `finish()` elsewhere; a test in the kernel only where a later
  /// component holds some rows and not others (LongNet's head classes).
  void byLaterComponents(Value h, Value position, function_ref<void()> intoSums,
                         function_ref<void()> finish);
  /// Stores one row (or key) of a gradient in the input type: its share
  /// (share(dn, e)) plus, where the package finishes the gradients, the
  /// earlier components' sums in `acc` from element `accRow` on
  /// (withEarlierSum), one 4-byte store a pair from element `rowBase` of
  /// `grad`. Every sum is loaded before the first store: a store may alias
  /// a later load, so interleaved they would wait one by one.
  void storeTotalRow(GradArg grad, GradArg acc, Value accRow, Value rowBase,
                     Value laneCol,
                     function_ref<Value(int64_t dn, int64_t e)> share);
  /// An scf.if on `condition` with `thenBody` and `elseBody` (no results);
  /// the builder goes on after it.
  void ifElse(Value condition, function_ref<void()> thenBody,
              function_ref<void()> elseBody);
  /// This component's share (value(grad index, dn, e)) of the row (or
  /// key) whose first element in `grads` is `row`, into those float32
  /// gradients or sums (DQ, DK and DV, or DQAcc, DKAcc and DVAcc): stored
  /// by a component that writes every element once (writesOnce), added by
  /// the others, by a read-modify-write (grad_q: a block owns its rows) or,
  /// with `atomic` (grad_kv), by reductions.
  void
  writeShareF32(ArrayRef<GradArg> grads, Value row, Value laneCol, bool atomic,
                function_ref<Value(size_t grad, int64_t dn, int64_t e)> value);
  /// The global address (i64) of element `element` of gradient `grad`, whose
  /// elements take `elementBytes` (its memref's aligned pointer plus that).
  Value elementAddress(GradArg grad, Value element, int64_t elementBytes);
  /// Stores (x, y) in the input type at element `element` of a stored
  /// gradient (dq, dk or dv): one 4-byte store.
  void storeGradPair(GradArg grad, Value element, Value x, Value y);
  /// Adds the pairs values[i] into elements (elements[i], elements[i] + 1)
  /// of an f32 gradient that no other block of the kernel writes: 8-byte
  /// loads, all issued before the first 8-byte store (interleaved, each
  /// load would wait for the store before it, which may alias it).
  void addF32Pairs(GradArg grad, ArrayRef<Value> elements,
                   ArrayRef<std::pair<Value, Value>> values);
  /// Adds (x, y) into elements (element, element + 1) of an f32 gradient
  /// atomically: one 8-byte vector reduction on sm_90a (PTX ISA 8.1), two
  /// scalar atomics on sm_80.
  void reduceF32Pair(GradArg grad, Value element, Value x, Value y);
  /// The end of a grad kernel: `addInto` (adding into f32 gradients), or
  /// where the kernel may store gradients (`store`: the runtime's GradStore
  /// test) and they do, `storeRow(half)` for each of the thread's two rows
  /// (or keys) that `exists`.
  /// The float32 stores of a kernel that writes each row once: for each
  /// half of this thread's rows whose row exists, its pairs of every grad
  /// in `grads` (value(grad index, dn, half, e)) at element
  /// rowAt(half) + laneCol + 8 dn of the contiguous gradient, 0 where
  /// valid(half) does not hold.
  void storeF32Rows(
      ArrayRef<GradArg> grads, Value laneCol, ArrayRef<Value> exists,
      function_ref<Value(int64_t half)> valid,
      function_ref<Value(int64_t half)> rowAt,
      function_ref<Value(size_t grad, int64_t dn, int64_t half, int64_t e)>
          value);
  void finishGrads(Value store, function_ref<void()> addInto,
                   ArrayRef<Value> exists,
                   function_ref<void(int64_t half)> storeRow);

  /// The block's group of `comp` for by (group) and bz (batch * heads +
  /// head): rows and keys as gathered indices t (position base + r*t).
  struct GroupItem {
    Value bIdx, h, hk;
    /// Rows and keys inside lengths[b] (all without lengths), and
    /// lengths[b] itself (null without).
    Value rowsEnd, keysEnd, length;
    /// The residue class, and (head residues) whether head h has one.
    Value c, headHasClass;
    Value base, tRowLo, tRowHi, tRowAll, tKeyLo, tKeyHi;
    /// Keys that exist (tKeyHi without lengths).
    Value tKeyAll;
  };
  /// With `keySegments` (grad_kv), segment by 0 is the first that holds a
  /// row or a key, rather than the first that holds a row: the runtime's
  /// grid then spans every key's segment too (docs/Package.md).
  GroupItem placeGroup(ComponentAttr comp, Value by, Value bz,
                       bool keySegments = false);
  /// Whether gathered row t and key tk are a pair of the component's band
  /// and filters (not counting rows and keys outside the group's ends).
  Value pairInBand(ComponentAttr comp, const GroupItem &g, Value t, Value tk);
  /// The position of gathered row (or key) t of group g: base + period*t.
  Value groupPosition(ComponentAttr comp, const GroupItem &g, Value t);
  /// The first key position that a row at position `rowPos` excludes with
  /// every later key (segmentExclusions: the earliest start of its segments
  /// in those branches), or null where `comp` has none.
  Value excludedPositionsFrom(ComponentAttr comp, Value rowPos);
  /// The same as a gathered key index of group g, for gathered row t: the
  /// end of the keys row t attends past its exclusions (null without).
  Value excludedKeysFrom(ComponentAttr comp, const GroupItem &g, Value t);
  /// The first gathered row of group g that attends gathered key tk past
  /// `comp`'s segment exclusions (the latest end of the key's segments in
  /// those branches), or null where it has none.
  Value rowsAttendFrom(ComponentAttr comp, const GroupItem &g, Value tk);

  gpu::GPUFuncOp beginKernel(StringRef name, int64_t threads,
                             bool grad = false);

  // Backward helpers (mma.sync, padded tiles; see "The backward pass").
  struct GradContext;
  // Tiles are byte offsets of 64-row tiles in the dynamic shared memory:
  // padded rows for mma.sync, 128-byte swizzled panels for wgmma (sm_90a).
  /// X Y^T for this warp's 16 rows of aTile and the 64 rows of bTile.
  SmallVector<AccFrag> rowsTimesTileT(Value aTile, Value bTile);
  /// mma.sync: A Y^T for A given as this warp's ldmatrix fragments (D/16
  /// of 16 columns) and the 64 rows of the tile memref bTile (the forward's
  /// S = Q K^T too).
  SmallVector<AccFrag> fragsTimesTileT(ArrayRef<std::array<Value, 4>> aFrag,
                                       Value bTile);
  /// mma.sync: o + A tile, A packed [16 x 64], the tile memref [64 x D]
  /// read transposed by ldmatrix.trans (the forward's O += P V too).
  SmallVector<AccFrag> addPackedTimesTileMmaSync(SmallVector<AccFrag> o,
                                                 ArrayRef<Value> a,
                                                 Value tile);
  /// wgmma: sets tilesOffset and tilesAddress for the dynamic shared
  /// memory `dyn` (its tiles start at a 1024-byte boundary, where the
  /// 128-byte swizzle pattern starts; sharedTile adds tilesOffset).
  void alignTiles(Value dyn);
  /// The wgmma descriptor of the tile at byte offset `tile` from
  /// tilesAddress.
  Value tileDescriptor(Value tile, int64_t lbo, int64_t sbo);
  /// 16 x 64 accumulators (P, dS) as 16-bit A fragments (16 columns
  /// each): the mma.sync operand layout, which is also wgmma's register A
  /// layout.
  SmallVector<Value> packAccumulators(ArrayRef<AccFrag> p);
  /// acc (D/8 fragments, flat) + A . tile, A packed [16 x 64] (this
  /// warp's rows), tile [64 x D] read transposed.
  SmallVector<Value> addPackedTimesTile(ValueRange acc, ArrayRef<Value> a,
                                        Value tile);
  /// keySegments: as placeGroup's (grad_kv).
  GradContext beginGradKernel(StringRef name, ComponentAttr comp, Value &bx,
                              bool keySegments = false);
  /// Walked tile `which` (0: Q or K, 1: dO or V) of shared slot `slot`.
  Value walkedTile(Value slot, int64_t which);
  /// TMA (sm_90a), from tilesAddress: the 32-bit shared address of byte
  /// offset `byteOffset`; thread 0's arrival on mbarrier `bar` expecting
  /// `bytes` (tmaExpectMoreBytes: `bytes` more in the current phase, no
  /// arrival); the box loads (64 columns x 64 rows each, 128-byte swizzle:
  /// the wgmma layout) of one 64-row tile of tensor map `map` into the
  /// tile at `tileOffset`, whose 64-column panels are `panelBytes` apart
  /// (0: a 64-row tile's 8 KB), at box coordinates `coords` after the
  /// column (i32: row, head, batch, or plane and row in it for gathered
  /// rows), completing on `bar`; and every thread's wait for phase
  /// `parity` of `bar`.
  Value sharedAddress32(Value byteOffset);
  void tmaExpectBytes(Value bar, int64_t bytes);
  void tmaExpectMoreBytes(Value bar, int64_t bytes);
  /// The TMA stores of one 64-row tile at `tileOffset` (panels
  /// `panelBytes` apart) to tensor map `map` at box coordinates `coords`
  /// after the column, in the issuing thread's bulk group.
  void tmaStoreTile(Value map, Value tileOffset, ArrayRef<Value> coords,
                    int64_t panelBytes);
  /// `issue(shared address, first column)` for each 64-column panel of the
  /// tile at `tileOffset` (panels `panelBytes` apart).
  void forEachTilePanel(Value tileOffset, int64_t panelBytes,
                        function_ref<void(Value shared, Value column)> issue);
  void tmaLoadTile(Value map, Value tileOffset, ArrayRef<Value> coords,
                   Value bar, int64_t panelBytes = 0);
  void waitBarrierParity(Value bar, Value parity);
  /// Zeros the rows of the swizzled tile memref `tile` (`rows` rows) for which
  /// `zeroed(row)` holds, 16 bytes a store (every thread takes its share).
  void zeroTileRows(Value tile, function_ref<Value(Value)> zeroed,
                    int64_t rows = kBlockKeys);
  /// Zeros rows [firstRow, 64) of the backward's tile at `tileOffset`.
  void zeroTileRowsFrom(Value tileOffset, Value firstRow);
  /// Commits this thread's cp.asyncs since the last commit as one group.
  void commitAsyncGroup();
  /// scf.for over `numTiles` walked tiles in two shared slots: tile i + 1's
  /// copies (`load(i + 1, its slot)`) fly while tile i computes
  /// (`compute(i, slot, acc)` returns the next acc). Tile 0 is loaded
  /// before the loop with whatever the caller issued before it. With
  /// walkBarriers set, `load` also issues the slot's TMA loads (its leader
  /// arming the slot's mbarrier, walkBarrier), every thread waits for
  /// that phase, and `arrived(i, slot)` runs after the wait (zeroing rows
  /// TMA brought in past the walk's end).
  scf::ForOp
  walkTiles(Value numTiles, ValueRange init,
            function_ref<void(Value, Value)> load,
            function_ref<SmallVector<Value>(Value, Value, ValueRange)> compute,
            function_ref<void(Value, Value)> arrived = nullptr);
  /// The walked slots' mbarriers (two, 8 bytes each, byte offset from
  /// tilesAddress) where the walked tiles may come by TMA; null otherwise.
  Value walkBarriers;
  /// Whether they do (i1): gathered rows (period r) come by TMA where r
  /// divides the rows, as the runtime's maps need, else by cp.async; null
  /// where they always do (period 1).
  Value walkUsesTma;
  /// Slot `slot`'s mbarrier (a 32-bit shared address).
  Value walkBarrier(Value slot);
  /// Where a grad kernel's walked tiles come by TMA (sm_90a): initialises
  /// walkBarriers after the kernel's tiles, and walkUsesTma for rows of
  /// period `period` of which there are `rows` a head.
  void beginTmaWalk(int64_t barrierOffset, int64_t period, Value rows);
  /// Thread 0 fetches both walked tiles of `slot` (the tensors of WalkMap0
  /// and WalkMap1) from walked row t0 on, arming the slot's mbarrier: rows
  /// base + period * t - origin of (head, batch), at box coordinates
  /// (row, head, batch), or (plane, row in the plane, head, batch) for
  /// gathered rows (the runtime's [rows / r][r][D] view, as the forward's
  /// keys); rows past a head's arrive as zeros.
  void tmaLoadWalkedTiles(Value slot, Value base, Value origin, Value t0,
                          int64_t period, Value head, Value batch);
  /// Zeros the rows from `firstRow` on of both walked tiles of `slot`
  /// (those TMA brought in past the walk's end).
  void zeroWalkedTails(Value slot, Value firstRow);
  /// A walked slot's loads: `byTma` where the walk uses TMA (walkBarriers,
  /// under walkUsesTma), `byCopies` (cp.async) where it does not.
  void walkedLoad(function_ref<void()> byTma, function_ref<void()> byCopies);
  Value gradQueryRow(const GradContext &cx, Value t);
  Value gradKeyRow(const GradContext &cx, Value t);
  /// cp.async of 64 gathered rows t0.. (zeros from `end` on) of q, grad_out
  /// or (keys) k/v into `tile`.
  void loadGradRows(const GradContext &cx, Value tile, Value t0, Value end,
                    bool keys, Value src);
  /// key_bias of gathered key tk over the scale (key 0's where tk >= end).
  Value keyBiasOver(const GradContext &cx, Value tk, Value end);
  /// `s` with -inf where !inside(n, e), on tiles where `masked` holds.
  SmallVector<AccFrag> maskScores(const GradContext &cx, SmallVector<AccFrag> s,
                                  Value masked,
                                  function_ref<Value(int64_t, int64_t)> inside);
  Value negLse2(Value valid, Value row);
  /// Continues a backward block inside `if (hasWork)`, where its head has
  /// the group's residue class (per-head classes) as well.
  void enterIfWork(const GroupItem &g, Value hasWork);
  /// sm_90a: waits until the kernel launched before this one has completed
  /// and its writes are visible (griddepcontrol.wait). The runtime chains
  /// a round's backward kernels as programmatic dependent launches; each
  /// waits before its first write of the gradients or their sums, and
  /// again before it exits, so that it completes only after the kernel
  /// before it: the chain completes in order, and what the stream runs
  /// after it finds every kernel of it done.
  void dependencyWait();
  /// The backward kernel's dynamic shared memory.
  Value gradShared;
  /// An element-wise kernel over B*H*Lq*D, kElementwiseVector elements per
  /// thread: `idx` is this thread's first element, `row` its row; the
  /// builder is left inside the `idx < n` guard.
  gpu::GPUFuncOp beginElementwise(StringRef name, Value &idx, Value &row);
  /// Continues inside `if (idx is the first element of its row)`.
  void ifFirstOfRow(Value idx);
  /// The attn.launch plan of a grad_kv or grad_q kernel: one warpgroup a
  /// block of kBlockKeys rows (or keys) of `comp`.
  DictionaryAttr gradLaunch(StringRef kind, int64_t sharedBytes,
                            ComponentAttr comp) {
    return b.getDictionaryAttr(
        {b.getNamedAttr("kind", b.getStringAttr(kind)),
         b.getNamedAttr("block", b.getI64IntegerAttr(shape.threads())),
         b.getNamedAttr("block_rows", b.getI64IntegerAttr(kBlockKeys)),
         b.getNamedAttr("shared_bytes", b.getI64IntegerAttr(sharedBytes)),
         b.getNamedAttr("component", comp)});
  }
  /// The attn.launch plan of an element-wise kernel (init, finalize,
  /// grad_prepare, grad_add).
  DictionaryAttr elementwiseLaunch(StringRef kind,
                                   int64_t elementsPerThread = kElementwiseVector) {
    return b.getDictionaryAttr(
        {b.getNamedAttr("kind", b.getStringAttr(kind)),
         b.getNamedAttr("block", b.getI64IntegerAttr(kElementwiseThreads)),
         b.getNamedAttr("elements_per_thread",
                        b.getI64IntegerAttr(elementsPerThread)),
         b.getNamedAttr("shared_bytes", b.getI64IntegerAttr(0))});
  }
  Value arg(Arg a) { return entry->getArgument(a); }
  Value arg(GradArg a) { return entry->getArgument(a); }
  /// Where the state's acc lives. A 16-bit acc holds O / l in the input
  /// type, which is what out holds in the end: such a state lives in out
  /// itself (no finalize pass copies it there, and rows no later component
  /// touches are done). An f32 acc (ring packages) has its own buffer.
  Value stateAcc() { return shape.halfState ? arg(Out) : arg(Acc); }
  /// An element-wise kernel's element `idx` is column column(idx) of row
  /// idx / D. Element (row, col) of out, for a global row (b*H + h)*Lq + i,
  /// is at b*oStrideB + h*oStrideH +
  /// i*oStrideR + col, since out may be a strided view (the [B, H, L, D]
  /// view of a [B, L, H, D] tensor).
  Value column(Value idx) {
    return arith::RemUIOp::create(b, loc, idx, m.c(shape.headDim));
  }
  Value outElement(Value row, Value col) {
    return rowElement(row, col, OStrideB, OStrideH, OStrideR);
  }
  /// Element (row, col) of a [B, H, Lq, D] tensor with the strides of
  /// kernel arguments (sb, sh, sr), row counting over B * H * Lq.
  Value rowElement(Value row, Value col, Arg sb, Arg sh, Arg sr) {
    Value qLen = arg(QLen);
    Value bh = arith::DivUIOp::create(b, loc, row, qLen);
    Value i = arith::RemUIOp::create(b, loc, row, qLen);
    Value batch = arith::DivUIOp::create(b, loc, bh, m.c(shape.heads));
    Value head = arith::RemUIOp::create(b, loc, bh, m.c(shape.heads));
    return m.add(m.add(m.mul(batch, arg(sb)), m.mul(head, arg(sh))),
                 m.add(m.mul(i, arg(sr)), col));
  }

  /// 2^x and log2(x) with the hardware's approximate units (ex2/lg2.approx).
  Value exp2(Value x) {
    return LLVM::CallIntrinsicOp::create(b, loc, f32,
                                         b.getStringAttr("llvm.nvvm.ex2.approx.ftz.f"),
                                         ValueRange{x})
        .getResult(0);
  }
  /// 2^x on the FMA pipe: x = j + r with j = round(x) and |r| <= 1/2,
  /// 2^r by a degree-3 polynomial (relative error 7.5e-5, far below the
  /// 16-bit rounding of P), and j added to its exponent bits. Below 2^-126
  /// the result is 0 or a denormal (exactly 0 for -inf, as a masked score
  /// must give): x is clamped at -127.5, where j = -128 pushes the
  /// exponent below zero and the integer max with 0 clears it.
  Value exp2Polynomial(Value x) {
    Value magic = f.c(12582912.0); // 1.5 * 2^23: x + magic rounds x
    x = f.max(x, f.c(-127.5));
    Value t = f.add(x, magic);
    Value r = f.sub(x, f.sub(t, magic));
    Value p = f.c(0.055171453633924596);
    for (double c : {0.24261113792283268, 0.6932610273880977,
                     0.9999280728460054})
      p = LLVM::FMAOp::create(b, loc, p, r, f.c(c));
    // t's low bits hold j (two's complement): shifted by 23 they add j to
    // p's exponent.
    Value tBits = arith::BitcastOp::create(b, loc, i32, t);
    Value pBits = arith::BitcastOp::create(b, loc, i32, p);
    Value shift = arith::ConstantIntOp::create(b, loc, i32, 23);
    Value scaled = arith::AddIOp::create(
        b, loc, pBits, arith::ShLIOp::create(b, loc, tBits, shift));
    scaled = arith::MaxSIOp::create(
        b, loc, scaled, arith::ConstantIntOp::create(b, loc, i32, 0));
    return arith::BitcastOp::create(b, loc, f32, scaled);
  }
  Value log2(Value x) {
    return LLVM::CallIntrinsicOp::create(b, loc, f32,
                                         b.getStringAttr("llvm.nvvm.lg2.approx.ftz.f"),
                                         ValueRange{x})
        .getResult(0);
  }
  /// Butterfly over the 4 lanes of a quad (lanes sharing a row).
  Value quadReduce(Value x, bool isMax);
  /// Butterfly over aligned groups of `lanes` lanes (a power of two up to
  /// 32): every lane gets its group's max or sum.
  Value laneReduce(Value x, bool isMax, int32_t lanes);

  // Fragments.
  /// A 16-bit pair as an mma operand: i32 for bf16, vector<2xf16> for f16.
  Value operand(Value pairF16);
  /// ldmatrix.x4 from `tile` at (row, col); returns 4 operand registers.
  std::array<Value, 4> ldmatrix(Value tile, Value row, Value col,
                                bool transpose);
  /// A 16-bit pair register as the i32 a wgmma register operand takes.
  Value asI32(Value pair) {
    if (pair.getType() == i32)
      return pair;
    return LLVM::BitcastOp::create(b, loc, i32, pair);
  }
  AccFrag mma(ArrayRef<Value> a, ArrayRef<Value> bOps, const AccFrag &c);
  /// Two f32 as one operand register of the storage type.
  Value pack(Value x, Value y);
  /// Columns (at, at + 1) of the state's acc as f32 O; `rowSum` is the
  /// row's l (a 16-bit acc holds O / l).
  SmallVector<Value> loadStatePair(Value at, Value rowSum);
  /// Stores O columns (x, y) at (at, at + 1) of an f32 acc (a 16-bit acc
  /// leaves through shared memory with out's rows).
  void storeStatePair(Value at, Value x, Value y);

  // Warpgroup MMA (sm_90a). The MMAs are PTX in inline assembly: MLIR's
  // wgmma op has no register A operand, and the accumulators must be threaded
  // through the fence and the wait so that no register access moves across
  // them.
  /// A shared-memory matrix descriptor for the swizzled tile at `address`
  /// (i64 shared-window address): 128-byte swizzle, leading and stride byte
  /// offsets `lbo`, `sbo`.
  Value matrixDescriptor(Value address, int64_t lbo, int64_t sbo);
  /// `desc` advanced by `bytes` (the start address field counts 16 bytes).
  Value advance(Value desc, int64_t bytes);
  /// wgmma.fence, ordering the register accesses before it (the values are
  /// passed through) before the next wgmma.
  SmallVector<Value> wgmmaFence(ValueRange values);
  /// Commits the issued wgmmas and waits for them; the accumulators come
  /// back through the wait so that nothing reads them earlier.
  SmallVector<Value> wgmmaCommitAndWait(ValueRange acc);
  /// Commits the issued wgmmas as one group, or waits until at most
  /// `pending` groups are in flight; the accumulators are threaded through
  /// as in wgmmaCommitAndWait.
  SmallVector<Value> wgmmaCommit(ValueRange acc);
  SmallVector<Value> wgmmaWait(ValueRange acc, int pending);
  /// acc = A.B (+ acc unless `accumulate` is false), m64 n{acc*2} k16. A is a
  /// descriptor (one i64 value) or 4 registers of 16-bit pairs.
  SmallVector<Value> wgmma(ValueRange acc, ValueRange a, Value descB,
                           bool transposeB, bool accumulate);
  /// Inline PTX with side effects, results of `resultTypes`.
  SmallVector<Value> inlinePtx(TypeRange resultTypes, ValueRange operands,
                               StringRef text, StringRef constraints);

  /// cp.async of `rows` rows x D into `tile`; rowAt(row) gives (element
  /// offset of the row in global memory, whether the row exists). Missing
  /// rows are zero-filled.
  void asyncLoadTile(Value tile, int64_t rows, Value src,
                     function_ref<std::pair<Value, Value>(Value)> rowAt);
  /// The tile of `rows` rows at `byteOffset` of the dynamic shared memory:
  /// rows x (D+8), or rows*D swizzled elements with wgmma.
  Value sharedTile(Value dynamicShared, Value byteOffset, int64_t rows);
  /// Element offset in a swizzled tile of `rows` rows of 16-byte chunk
  /// `chunk` of `row`.
  Value swizzledOffset(Value row, Value chunk, int64_t rows);

  OpBuilder &b;
  Location loc;
  IndexMath m;
  FloatMath f;
  const AttentionShape &shape;
  MLIRContext *ctx;
  Type f16, f32, i32;
  MemRefType storageType, floatType, lengthsType;
  Block *entry = nullptr;
  Value tid, lane, warp;
  /// wgmma: byte offset of tile 0 in the dynamic shared memory (aligned to
  /// 1024 bytes) and its shared-window address (i64).
  Value tilesOffset, tilesAddress;
};

} // namespace mlir::attn::gpu_codegen

#endif // ATTN_LIB_DIALECT_ATTN_TRANSFORMS_GPUKERNELEMITTER_H
