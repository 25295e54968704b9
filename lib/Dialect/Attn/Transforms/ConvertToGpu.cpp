//===- ConvertToGpu.cpp - attention components as tensor-core kernels -----===//
//
// convert-attn-to-gpu: every function holding decomposed attention becomes a
// gpu.module of kernels, one per component
// (docs/passes/convert-attn-to-gpu.md).
//
// Work split. A component's rows fall into groups (segment s, residue c); a
// group holds the gathered positions base + r*t (t = 0, 1, ...). One thread
// block of 4 warps takes 64 consecutive t of one group for one (batch, head)
// (8 warps and 128 t with wgmma):
//
//     grid = (ceil(max rows per group / 64), groups, B*H),  block = 128
//
// and walks the key tiles of the group in closed form, exactly as attn-tile
// does on the CPU: keys t_k with lo <= t_q - t_k <= hi for some row of the
// tile, clipped to the group and to lengths[b]. Tiles wholly inside the band
// for every row need no mask; edge tiles evaluate the predicate per element.
//
// Per warp (16 rows) and key tile (64 keys), with mma.sync.m16n8k16:
//
//     S[16x64]  = Q[16xD] . K^T          (D/16 k-steps x 8 n-tiles)
//     m'        = max(m, rowmax(S)*c)    (c = scale*log2(e); quad shuffles;
//                                          kept at m unless it grew by > 8:
//                                          lazy rescaling, see below)
//     P         = exp2(S*c - m'),  l = l*exp2(m - m') + rowsum(P)
//     O[16xD]   = O*exp2(m - m') + P . V  (P re-packed in registers as the A
//                                          operand: the m16n8 accumulator
//                                          layout is the m16k16 A layout)
//
// K and V tiles are double-buffered in shared memory by cp.async (the next
// tile loads while this one computes); rows are padded by 8 elements so that
// ldmatrix reads are free of bank conflicts. Q, K, V and out are passed as
// 16-bit storage (f16 memrefs); only the mma and the conversions know whether
// the bits are bf16 or f16.
//
// With `wgmma` (sm_90a) a block is two warpgroups (8 warps, 128 rows, two
// blocks per SM) sharing each K/V tile (by TMA, one mbarrier per slot; see
// emitComponent), and per warpgroup
// (64 rows) the two products are warpgroup MMAs reading shared memory
// directly:
//
//     S[64x64] = Q . K^T   D/16 x wgmma.m64n64k16, A = Q and B = K from
//                          shared memory (K-major)
//     O[64xD] += P . V     4 x wgmma.m64nDk16, A = P from registers, B = V
//                          from shared memory (MN-major, transposed)
//
// The tiles are then stored in the 128-byte swizzle the MMA descriptors
// name: 64-column panels of 128-byte rows, 16-byte chunk c of row r at chunk
// c ^ (r % 8), panels 1024-byte aligned. The accumulators of a wgmma have
// the mma.sync layout per warp (warp w owns rows 16w..16w+15, lane l rows
// l/4 and l/4 + 8 at columns 2(l%4) + {0,1} of every 8-column block), and P
// as the register A operand has the m16k16 A layout: the softmax between
// the two products is the same code for both paths.
//
// Narrow bands (at most 129 keys wide, period 1) get one-warpgroup blocks
// of 64 rows that hold all of their (at most three) key tiles at once and
// take the softmax in one step (residentKeyTiles, emitComponent's
// residentStep). Gathered components with filters walk their key tiles on
// one-warpgroup blocks too, where their predicates fit the registers
// (needsOneWarpgroup), unless their exclusions are all key ranges
// (exclusionsAsRanges).
//
// With `warp-specialize`, components whose rows attend many contiguous keys
// get FlashAttention-3's structure instead: a producer warpgroup issuing
// the TMA loads into a ring of slots, three consumer warpgroups (192 rows)
// whose softmax of one tile overlaps their P . V of the previous one, one
// block per SM (isWarpSpecialized, emitComponent's `ws`, overlappedLoop).
//
//===----------------------------------------------------------------------===//

#include "DedupKernel.h"
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

namespace mlir::attn {
#define GEN_PASS_DEF_CONVERTATTNTOGPU
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

namespace {

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
  /// behind griddepcontrol.wait (see emitComponent).
  bool dependentLaunch() const { return wgmma && halfState; }
  /// Warp-specialised kernels where the keys are contiguous (the
  /// `warp-specialize` option; see emitComponent).
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
static bool isWarpSpecialized(const AttentionShape &shape,
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
/// emitComponent's `resident`). Its V tiles load into K's shared memory
/// once S is done, so that a block takes 64 KB and three fit an SM.
/// Components that continue a loaded state before their loop (f32 ring
/// states) keep the walking kernels.
constexpr int64_t kMaxResidentTiles = 3;
static int64_t residentKeyTiles(const AttentionShape &shape,
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
static bool exclusionsAsRanges(const AttentionShape &shape, ComponentAttr comp);
static bool needsOneWarpgroup(const AttentionShape &shape,
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
static SmallVector<int64_t> segmentExclusions(const AttentionShape &shape,
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
static bool exclusionsAsRanges(const AttentionShape &shape,
                               ComponentAttr comp) {
  return comp.getInclude().empty() && !comp.getExclude().empty() &&
         segmentExclusions(shape, comp).size() == comp.getExclude().size();
}

/// One 16x8 f32 accumulator fragment: c[0], c[1] are row lane/4, columns
/// 2*(lane%4) + {0, 1}; c[2], c[3] the same columns of row lane/4 + 8.
using AccFrag = std::array<Value, 4>;

/// Builds the kernels of one attention function.
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

private:
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

private:
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
  /// Zeros the rows of the swizzled 64-row tile memref `tile` for which
  /// `zeroed(row)` holds, 16 bytes a store (every thread takes its share).
  void zeroTileRows(Value tile, function_ref<Value(Value)> zeroed);
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

gpu::GPUFuncOp KernelEmitter::beginKernel(StringRef name, int64_t threads,
                                          bool grad) {
  auto func = gpu::GPUFuncOp::create(b, loc, name,
                                     grad ? gradKernelType() : kernelType());
  func->setAttr(gpu::GPUDialect::getKernelFuncAttrName(), b.getUnitAttr());
  func.setKnownBlockSizeAttr(
      b.getDenseI32ArrayAttr({int32_t(threads), 1, 1}));
  // The tensor maps are the last arguments (four, the backward's two). TMA
  // reads a map in place, so after gpu-to-nvvm the GPU target turns them
  // into 128-byte byval parameters with nvvm.grid_constant (a gpu.func
  // cannot carry those).
  if (shape.tma)
    func->setAttr("attn.tensor_maps", b.getI64IntegerAttr(grad ? 2 : 4));
  entry = &func.getBody().front();
  b.setInsertionPointToStart(entry);
  tid = gpu::ThreadIdOp::create(b, loc, gpu::Dimension::x);
  lane = arith::RemUIOp::create(b, loc, tid, m.c(32));
  warp = arith::DivUIOp::create(b, loc, tid, m.c(32));
  return func;
}

Value KernelEmitter::quadReduce(Value x, bool isMax) {
  return laneReduce(x, isMax, 4);
}

Value KernelEmitter::laneReduce(Value x, bool isMax, int32_t lanes) {
  for (int32_t offset = 1; offset < lanes; offset *= 2) {
    Value off = arith::ConstantIntOp::create(b, loc, i32, offset);
    Value width = arith::ConstantIntOp::create(b, loc, i32, 32);
    Value other = gpu::ShuffleOp::create(b, loc, x, off, width,
                                         gpu::ShuffleMode::XOR)
                      .getShuffleResult();
    x = isMax ? f.max(x, other) : f.add(x, other);
  }
  return x;
}

Value KernelEmitter::operand(Value pairF16) {
  if (!shape.bf16)
    return pairF16;
  return LLVM::BitcastOp::create(b, loc, i32, pairF16);
}

std::array<Value, 4> KernelEmitter::ldmatrix(Value tile, Value row, Value col,
                                             bool transpose) {
  auto fragType = VectorType::get({4, 2}, f16);
  Value frag = nvgpu::LdMatrixOp::create(b, loc, fragType, tile,
                                         ValueRange{row, col}, transpose, 4);
  std::array<Value, 4> regs;
  for (int64_t i = 0; i < 4; ++i)
    regs[i] = operand(vector::ExtractOp::create(b, loc, frag, i));
  return regs;
}

AccFrag KernelEmitter::mma(ArrayRef<Value> a, ArrayRef<Value> bOps,
                           const AccFrag &c) {
  auto resultType = LLVM::LLVMStructType::getLiteral(ctx, {f32, f32, f32, f32});
  NVVM::MMATypes type = shape.bf16 ? NVVM::MMATypes::bf16 : NVVM::MMATypes::f16;
  auto op = b.create<NVVM::MmaOp>(
      loc, resultType, a, bOps, ValueRange(ArrayRef<Value>(c)), ArrayRef<int64_t>{16, 8, 16},
      std::nullopt, std::nullopt, std::array<NVVM::MMATypes, 2>{type, type},
      std::array<NVVM::MMALayout, 2>{NVVM::MMALayout::row,
                                     NVVM::MMALayout::col});
  AccFrag d;
  for (int64_t i = 0; i < 4; ++i)
    d[i] = LLVM::ExtractValueOp::create(b, loc, op.getResult(), i);
  return d;
}

Value KernelEmitter::pack(Value x, Value y) {
  auto pairF32 = VectorType::get({2}, f32);
  Value v = vector::FromElementsOp::create(b, loc, pairF32, ValueRange{x, y});
  Type elem = shape.bf16 ? Type(b.getBF16Type()) : f16;
  Value narrow =
      arith::TruncFOp::create(b, loc, VectorType::get({2}, elem), v);
  if (!shape.bf16)
    return narrow;
  return LLVM::BitcastOp::create(b, loc, i32, narrow);
}

Value KernelEmitter::elementAddress(GradArg grad, Value element,
                                   int64_t elementBytes) {
  Value base = memref::ExtractAlignedPointerAsIndexOp::create(b, loc, arg(grad));
  return arith::IndexCastOp::create(
      b, loc, b.getI64Type(), m.add(base, m.mul(element, m.c(elementBytes))));
}

void KernelEmitter::storeGradPair(GradArg grad, Value element, Value x,
                                  Value y) {
  Value address = elementAddress(grad, element, 2);
  Value bits = pack(x, y);
  if (!shape.bf16) // a vector of two f16
    bits = LLVM::BitcastOp::create(b, loc, i32, bits);
  inlinePtx({}, {address, bits}, "st.global.b32 [$0], $1;", "l,r");
}

void KernelEmitter::addF32Pairs(GradArg grad, ArrayRef<Value> elements,
                                ArrayRef<std::pair<Value, Value>> values) {
  auto pairType = VectorType::get({2}, f32);
  SmallVector<Value> olds;
  for (Value element : elements)
    olds.push_back(vector::LoadOp::create(b, loc, pairType, arg(grad),
                                          ValueRange{element}, false,
                                          llvm::MaybeAlign(8)));
  for (auto [element, old, xy] : llvm::zip(elements, olds, values)) {
    Value add = vector::FromElementsOp::create(
        b, loc, pairType, ValueRange{xy.first, xy.second});
    vector::StoreOp::create(b, loc, arith::AddFOp::create(b, loc, old, add),
                            arg(grad), ValueRange{element}, false,
                            llvm::MaybeAlign(8));
  }
}

std::pair<Value, Value> KernelEmitter::withEarlierSum(GradArg acc,
                                                      Value element, Value x,
                                                      Value y) {
  // Every row (or key) of a later component's groups is in the first
  // component's sums, or in zeroed sums where the first does not write
  // every element (no "overwrites_grads").
  if (!finishing || firstComponent)
    return {x, y};
  Value pair = vector::LoadOp::create(b, loc, VectorType::get({2}, f32),
                                      arg(acc), ValueRange{element}, false,
                                      llvm::MaybeAlign(8));
  return {f.add(vector::ExtractOp::create(b, loc, pair, 0), x),
          f.add(vector::ExtractOp::create(b, loc, pair, 1), y)};
}

void KernelEmitter::reduceF32Pair(GradArg grad, Value element, Value x,
                                  Value y) {
  if (!shape.wgmma) {
    const Value pair[2] = {x, y};
    for (int64_t i = 0; i < 2; ++i)
      memref::AtomicRMWOp::create(b, loc, arith::AtomicRMWKind::addf, pair[i],
                                  arg(grad),
                                  ValueRange{m.add(element, m.c(i))});
    return;
  }
  inlinePtx({}, {elementAddress(grad, element, 4), x, y}, "red.global.add.v2.f32 [$0], {$1, $2};",
            "l,f,f");
}

Value KernelEmitter::groupPosition(ComponentAttr comp, const GroupItem &g,
                                   Value t) {
  return m.add(g.base, m.mul(m.c(comp.getPeriod()), t));
}

Value KernelEmitter::excludedPositionsFrom(ComponentAttr comp, Value rowPos) {
  Value from;
  for (int64_t w : segmentExclusions(shape, comp)) {
    Value start = m.mul(m.floorDiv(rowPos, w), m.c(w));
    from = from ? m.min(from, start) : start;
  }
  return from;
}

Value KernelEmitter::excludedKeysFrom(ComponentAttr comp, const GroupItem &g,
                                      Value t) {
  Value from = excludedPositionsFrom(comp, groupPosition(comp, g, t));
  return from ? m.ceilDiv(m.sub(from, g.base), m.c(comp.getPeriod())) : Value();
}

Value KernelEmitter::rowsAttendFrom(ComponentAttr comp, const GroupItem &g,
                                    Value tk) {
  Value from;
  Value keyPos = groupPosition(comp, g, tk);
  for (int64_t w : segmentExclusions(shape, comp)) {
    Value end = m.mul(m.add(m.floorDiv(keyPos, w), m.c(1)), m.c(w));
    from = from ? m.max(from, end) : end;
  }
  return from ? m.ceilDiv(m.sub(from, g.base), m.c(comp.getPeriod())) : Value();
}

void KernelEmitter::byLaterComponents(Value h, Value position,
                                      function_ref<void()> intoSums,
                                      function_ref<void()> finish) {
  auto holdsEveryRow = [](ComponentAttr c) {
    return c.getPeriod() == 1 || c.getResidue() == ComponentAttr::kAllResidues;
  };
  if (laterComponents.empty())
    return finish();
  if (llvm::any_of(laterComponents, holdsEveryRow))
    return intoSums();
  // A group of component c holds positions s * segment + class + period * t
  // (placeGroup; segments start at multiples of `segment`), of every row
  // and key inside the tensor: its kernels write them all.
  Value held = m.truth(false);
  for (ComponentAttr later : laterComponents) {
    Value p = later.getSegment() > 0 ? m.floorMod(position, later.getSegment())
                                     : position;
    Value inClass, hasClass;
    if (later.getResidue() == ComponentAttr::kHeadResidue) {
      Value c;
      std::tie(c, hasClass) = buildHeadClass(b, loc, later, h);
      inClass = m.eq(m.floorMod(p, later.getPeriod()), c);
    } else {
      inClass = m.eq(m.floorMod(p, later.getPeriod()), m.c(later.getResidue()));
    }
    if (hasClass)
      inClass = m.both(inClass, hasClass);
    held = m.either(held, inClass);
  }
  ifElse(held, intoSums, finish);
}

void KernelEmitter::storeTotalRow(
    GradArg grad, GradArg acc, Value accRow, Value rowBase, Value laneCol,
    function_ref<Value(int64_t dn, int64_t e)> share) {
  SmallVector<std::pair<Value, Value>> pairs;
  for (int64_t dn = 0; dn < shape.headDim / 8; ++dn)
    pairs.push_back(withEarlierSum(acc,
                                   m.add(accRow, m.add(laneCol, m.c(dn * 8))),
                                   share(dn, 0), share(dn, 1)));
  for (auto [dn, pair] : llvm::enumerate(pairs))
    storeGradPair(grad, m.add(rowBase, m.add(laneCol, m.c(int64_t(dn) * 8))),
                  pair.first, pair.second);
}

void KernelEmitter::ifElse(Value condition, function_ref<void()> thenBody,
                           function_ref<void()> elseBody) {
  auto branch = scf::IfOp::create(b, loc, TypeRange{}, condition,
                                  /*withElseRegion=*/true);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(branch.thenBlock());
  thenBody();
  b.setInsertionPointToStart(branch.elseBlock());
  elseBody();
}

void KernelEmitter::writeShareF32(
    ArrayRef<GradArg> grads, Value row, Value laneCol, bool atomic,
    function_ref<Value(size_t grad, int64_t dn, int64_t e)> value) {
  auto pairType = VectorType::get({2}, f32);
  for (auto [i, grad] : llvm::enumerate(grads)) {
    SmallVector<Value> elements;
    SmallVector<std::pair<Value, Value>> values;
    for (int64_t dn = 0; dn < shape.headDim / 8; ++dn) {
      elements.push_back(m.add(row, m.add(laneCol, m.c(dn * 8))));
      values.push_back({value(i, dn, 0), value(i, dn, 1)});
    }
    if (writesOnce) {
      for (auto [element, xy] : llvm::zip(elements, values))
        vector::StoreOp::create(
            b, loc,
            vector::FromElementsOp::create(b, loc, pairType,
                                           ValueRange{xy.first, xy.second}),
            arg(grad), ValueRange{element}, false, llvm::MaybeAlign(8));
    } else if (atomic) {
      for (auto [element, xy] : llvm::zip(elements, values))
        reduceF32Pair(grad, element, xy.first, xy.second);
    } else {
      addF32Pairs(grad, elements, values);
    }
  }
}

void KernelEmitter::finishGrads(Value store, function_ref<void()> addInto,
                                ArrayRef<Value> exists,
                                function_ref<void(int64_t half)> storeRow) {
  if (!store) {
    addInto();
    return;
  }
  auto ifStore = scf::IfOp::create(b, loc, TypeRange{}, store,
                                   /*withElseRegion=*/true);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(ifStore.elseBlock());
  addInto();
  for (int64_t half = 0; half < 2; ++half) {
    b.setInsertionPoint(ifStore.thenBlock()->getTerminator());
    auto ifExists =
        scf::IfOp::create(b, loc, TypeRange{}, exists[half], false);
    b.setInsertionPointToStart(ifExists.thenBlock());
    storeRow(half);
  }
}

void KernelEmitter::storeF32Rows(
    ArrayRef<GradArg> grads, Value laneCol, ArrayRef<Value> exists,
    function_ref<Value(int64_t half)> valid,
    function_ref<Value(int64_t half)> rowAt,
    function_ref<Value(size_t grad, int64_t dn, int64_t half, int64_t e)>
        value) {
  auto pairType = VectorType::get({2}, f32);
  Value zeroF = f.c(0.0);
  for (int64_t half = 0; half < 2; ++half) {
    auto ifExists = scf::IfOp::create(b, loc, TypeRange{}, exists[half], false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(ifExists.thenBlock());
    Value ok = valid(half);
    Value row = rowAt(half);
    for (int64_t dn = 0; dn < shape.headDim / 8; ++dn) {
      Value at = m.add(row, m.add(laneCol, m.c(dn * 8)));
      for (auto [i, grad] : llvm::enumerate(grads)) {
        auto pairValue = [&](int64_t e) {
          return f.select(ok, value(i, dn, half, e), zeroF);
        };
        Value pair = vector::FromElementsOp::create(
            b, loc, pairType, ValueRange{pairValue(0), pairValue(1)});
        vector::StoreOp::create(b, loc, pair, arg(grad), ValueRange{at}, false,
                                llvm::MaybeAlign(8));
      }
    }
  }
}

SmallVector<Value> KernelEmitter::loadStatePair(Value at, Value rowSum) {
  if (!shape.halfState) {
    Value pair = vector::LoadOp::create(b, loc, VectorType::get({2}, f32),
                                        arg(Acc), ValueRange{at},
                                        /*nontemporal=*/false,
                                        llvm::MaybeAlign(8));
    return {vector::ExtractOp::create(b, loc, pair, 0),
            vector::ExtractOp::create(b, loc, pair, 1)};
  }
  Value pair = vector::LoadOp::create(b, loc, VectorType::get({2}, f16),
                                      stateAcc(), ValueRange{at},
                                      /*nontemporal=*/false,
                                      llvm::MaybeAlign(4));
  if (shape.bf16)
    pair = arith::BitcastOp::create(
        b, loc, VectorType::get({2}, b.getBF16Type()), pair);
  Value wide = arith::ExtFOp::create(b, loc, VectorType::get({2}, f32), pair);
  return {f.mul(vector::ExtractOp::create(b, loc, wide, 0), rowSum),
          f.mul(vector::ExtractOp::create(b, loc, wide, 1), rowSum)};
}

void KernelEmitter::storeStatePair(Value at, Value x, Value y) {
  Value pair = vector::FromElementsOp::create(
      b, loc, VectorType::get({2}, f32), ValueRange{x, y});
  vector::StoreOp::create(b, loc, pair, arg(Acc), at, /*nontemporal=*/false,
                          llvm::MaybeAlign(8));
}

SmallVector<Value> KernelEmitter::inlinePtx(TypeRange resultTypes,
                                            ValueRange operands,
                                            StringRef text,
                                            StringRef constraints) {
  Type resultType;
  if (resultTypes.size() == 1)
    resultType = resultTypes.front();
  else if (!resultTypes.empty())
    resultType = LLVM::LLVMStructType::getLiteral(
        ctx, SmallVector<Type>(resultTypes.begin(), resultTypes.end()));
  auto op = LLVM::InlineAsmOp::create(
      b, loc, resultType, operands, text, constraints,
      /*has_side_effects=*/true, /*is_align_stack=*/false,
      LLVM::tailcallkind::TailCallKind::None,
      LLVM::AsmDialectAttr::get(ctx, LLVM::AsmDialect::AD_ATT), ArrayAttr());
  if (resultTypes.size() <= 1)
    return SmallVector<Value>(op.getResults());
  SmallVector<Value> results;
  for (int64_t i = 0, e = resultTypes.size(); i < e; ++i)
    results.push_back(LLVM::ExtractValueOp::create(b, loc, op.getResult(0), i));
  return results;
}

/// "=f,=f,...,0,1,..." for values passed through an asm statement: one
/// output per value, each tied to its input.
static std::string tiedConstraints(ValueRange values) {
  std::string outs, ins;
  for (auto [i, v] : llvm::enumerate(values)) {
    outs += (i ? ",=" : "=") + std::string(v.getType().isF32() ? "f" : "r");
    ins += "," + std::to_string(i);
  }
  return outs + ins;
}

SmallVector<Value> KernelEmitter::wgmmaFence(ValueRange values) {
  return inlinePtx(values.getTypes(), values, "wgmma.fence.sync.aligned;",
                   tiedConstraints(values));
}

SmallVector<Value> KernelEmitter::wgmmaCommit(ValueRange acc) {
  return inlinePtx(acc.getTypes(), acc, "wgmma.commit_group.sync.aligned;",
                   tiedConstraints(acc));
}

SmallVector<Value> KernelEmitter::wgmmaWait(ValueRange acc, int pending) {
  return inlinePtx(acc.getTypes(), acc,
                   "wgmma.wait_group.sync.aligned " + std::to_string(pending) +
                       ";",
                   tiedConstraints(acc));
}

SmallVector<Value> KernelEmitter::wgmmaCommitAndWait(ValueRange acc) {
  return inlinePtx(acc.getTypes(), acc,
                   "wgmma.commit_group.sync.aligned;\n\t"
                   "wgmma.wait_group.sync.aligned 0;",
                   tiedConstraints(acc));
}

Value KernelEmitter::matrixDescriptor(Value address, int64_t lbo,
                                      int64_t sbo) {
  // Bits 0-13: start address / 16; 16-29: leading byte offset / 16; 32-45:
  // stride byte offset / 16; 49-51: base offset (0: the swizzle pattern
  // starts at a 1024-byte boundary); 62-63: layout (1 = 128-byte swizzle).
  Type i64 = b.getI64Type();
  auto c64 = [&](int64_t v) {
    return arith::ConstantIntOp::create(b, loc, i64, v);
  };
  Value start = arith::AndIOp::create(
      b, loc, arith::ShRUIOp::create(b, loc, address, c64(4)), c64(0x3FFF));
  int64_t fields = ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (int64_t(1) << 62);
  return arith::OrIOp::create(b, loc, start, c64(fields));
}

Value KernelEmitter::advance(Value desc, int64_t bytes) {
  if (bytes == 0)
    return desc;
  return arith::AddIOp::create(
      b, loc, desc,
      arith::ConstantIntOp::create(b, loc, b.getI64Type(), bytes >> 4));
}

SmallVector<Value> KernelEmitter::wgmma(ValueRange acc, ValueRange a,
                                        Value descB, bool transposeB,
                                        bool accumulate) {
  const int64_t n = acc.size();
  const bool registerA = a.size() == 4;
  // Without `accumulate` the MMA does not read the accumulators (scale-d is
  // 0): they are outputs only, so nothing has to zero them first.
  const int64_t firstInput = accumulate ? 2 * n : n;
  std::string ty = shape.bf16 ? "bf16" : "f16";
  std::string text = "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $" +
                     std::to_string(firstInput + a.size() + 1) +
                     ", 0;\n\twgmma.mma_async.sync.aligned.m64n" +
                     std::to_string(n * 2) + "k16.f32." + ty + "." + ty + " {";
  for (int64_t i = 0; i < n; ++i)
    text += (i ? ", $" : "$") + std::to_string(i);
  text += "}, ";
  int64_t next = firstInput;
  if (registerA) {
    text += "{$" + std::to_string(next) + ", $" + std::to_string(next + 1) +
            ", $" + std::to_string(next + 2) + ", $" +
            std::to_string(next + 3) + "}";
    next += 4;
  } else {
    text += "$" + std::to_string(next++);
  }
  text += ", $" + std::to_string(next) + ", p, 1, 1";
  // Register A has no transpose immediate.
  if (!registerA)
    text += ", 0";
  text += transposeB ? ", 1;\n\t}" : ", 0;\n\t}";

  SmallVector<Value> operands;
  std::string constraints;
  if (accumulate) {
    operands.append(acc.begin(), acc.end());
    constraints = tiedConstraints(acc);
  } else {
    for (int64_t i = 0; i < n; ++i)
      constraints += i ? ",=f" : "=f";
  }
  for (Value v : a) {
    operands.push_back(v);
    constraints += registerA ? ",r" : ",l";
  }
  operands.push_back(descB);
  operands.push_back(arith::ConstantIntOp::create(b, loc, i32, accumulate));
  constraints += ",l,r";
  return inlinePtx(acc.getTypes(), operands, text, constraints);
}

Value KernelEmitter::sharedTile(Value dynamicShared, Value byteOffset,
                               int64_t rows) {
  auto workgroup =
      gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
  if (shape.wgmma) {
    auto type = MemRefType::get({rows * shape.headDim}, f16,
                                MemRefLayoutAttrInterface{}, workgroup);
    return memref::ViewOp::create(b, loc, type, dynamicShared,
                                  m.add(tilesOffset, byteOffset),
                                  ValueRange{});
  }
  auto type = MemRefType::get({rows, shape.smemStride()}, f16,
                              MemRefLayoutAttrInterface{}, workgroup);
  return memref::ViewOp::create(b, loc, type, dynamicShared, byteOffset,
                                ValueRange{});
}

void KernelEmitter::alignTiles(Value dyn) {
  Value address = memref::ExtractAlignedPointerAsIndexOp::create(b, loc, dyn);
  tilesOffset = arith::RemUIOp::create(
      b, loc, m.sub(m.c(1024), arith::RemUIOp::create(b, loc, address,
                                                      m.c(1024))),
      m.c(1024));
  tilesAddress = arith::IndexCastUIOp::create(
      b, loc, b.getI64Type(), m.add(address, tilesOffset));
}

Value KernelEmitter::tileDescriptor(Value tile, int64_t lbo, int64_t sbo) {
  Value at = arith::IndexCastUIOp::create(b, loc, b.getI64Type(), tile);
  return matrixDescriptor(arith::AddIOp::create(b, loc, tilesAddress, at), lbo,
                          sbo);
}

Value KernelEmitter::swizzledOffset(Value row, Value chunk, int64_t rows) {
  // Panel chunk/8 holds columns [64p, 64p + 64); in it, row r is 128 bytes
  // at r*128 and its chunk c sits at chunk c ^ (r % 8).
  Value panel = arith::DivUIOp::create(b, loc, chunk, m.c(8));
  Value inRow = arith::RemUIOp::create(b, loc, chunk, m.c(8));
  Value swizzled = arith::XOrIOp::create(
      b, loc, inRow, arith::RemUIOp::create(b, loc, row, m.c(8)));
  return m.add(m.add(m.mul(panel, m.c(rows * 64)), m.mul(row, m.c(64))),
               m.mul(swizzled, m.c(8)));
}

void KernelEmitter::asyncLoadTile(
    Value tile, int64_t rows, Value src,
    function_ref<std::pair<Value, Value>(Value)> rowAt) {
  // 16-byte chunks: D/8 per row, 64*D/8 per tile, consecutive threads take
  // consecutive chunks of a row (coalesced).
  int64_t chunksPerRow = shape.headDim / 8;
  int64_t rowsPerPass = shape.threads() / chunksPerRow;
  Value rowInPass = arith::DivUIOp::create(b, loc, tid, m.c(chunksPerRow));
  Value col = m.mul(arith::RemUIOp::create(b, loc, tid, m.c(chunksPerRow)),
                    m.c(8));
  // The swizzle of a row depends on row % 8 only and each pass moves
  // rowsPerPass (a multiple of 8) rows on: this thread's destinations are
  // one offset plus constants (one live register across the loop, not one
  // per pass).
  assert(rowsPerPass % 8 == 0 && "passes must keep the swizzle phase");
  Value firstSwizzled;
  if (shape.wgmma)
    firstSwizzled = swizzledOffset(
        rowInPass, arith::DivUIOp::create(b, loc, col, m.c(8)), rows);
  for (int64_t pass = 0; pass < rows / rowsPerPass; ++pass) {
    Value row = m.add(rowInPass, m.c(pass * rowsPerPass));
    auto [offset, exists] = rowAt(row);
    Value srcIndex = f.select(exists, m.add(offset, col), m.c(0));
    Value srcElements = f.select(exists, m.c(8), m.c(0));
    SmallVector<Value, 2> dst{row, col};
    if (shape.wgmma)
      dst = {m.add(firstSwizzled, m.c(pass * rowsPerPass * 64))};
    nvgpu::DeviceAsyncCopyOp::create(
        b, loc, nvgpu::DeviceAsyncTokenType::get(ctx), tile, dst, src,
        ValueRange{srcIndex}, b.getIndexAttr(8), srcElements,
        b.getUnitAttr());
  }
}

//===----------------------------------------------------------------------===//
// Where a block's group lies
//===----------------------------------------------------------------------===//

KernelEmitter::GroupItem KernelEmitter::placeGroup(ComponentAttr comp,
                                                   Value by, Value bz,
                                                   bool keySegments) {
  GroupItem g;
  Value zero = m.c(0), r = m.c(comp.getPeriod());
  Value qLen = arg(QLen), kLen = arg(KLen);
  Value delta = arg(QOrigin), kOrigin = arg(KOrigin);
  Value rowLenShift = arg(RowLenShift), kPos = arg(KPos);
  Value posStride = arg(PosStride);
  const int64_t H = shape.heads;
  g.bIdx = arith::DivUIOp::create(b, loc, bz, m.c(H));
  g.h = arith::RemUIOp::create(b, loc, bz, m.c(H));
  g.hk = arith::DivUIOp::create(b, loc, g.h,
                                m.c(shape.heads / shape.kvHeads));

  g.rowsEnd = qLen;
  g.keysEnd = kLen;
  if (comp.getUseLengths()) {
    Value length = memref::LoadOp::create(b, loc, arg(Lengths), g.bIdx);
    length = arith::IndexCastOp::create(b, loc, b.getIndexType(), length);
    g.length = m.max(length, zero);
    // Row i is inside when rowLenShift + posStride * i < length.
    g.rowsEnd = m.min(qLen, m.max(m.ceilDiv(m.sub(g.length, rowLenShift),
                                            posStride),
                                  zero));
    g.keysEnd =
        m.min(kLen, m.max(m.ceilDiv(m.sub(g.length, kPos), posStride), zero));
  }

  // Group (segment, residue) of this block.
  Value segIdx = by;
  int64_t res = comp.getResidue();
  if (res == ComponentAttr::kAllResidues) {
    g.c = arith::RemUIOp::create(b, loc, by, r);
    segIdx = arith::DivUIOp::create(b, loc, by, r);
  } else if (res == ComponentAttr::kHeadResidue) {
    std::tie(g.c, g.headHasClass) = buildHeadClass(b, loc, comp, g.h);
    if (comp.isPlainHeadResidue())
      g.headHasClass = Value();
  } else {
    g.c = m.c(res);
  }
  Value rowPosLo = delta;
  Value rowPosHi = m.add(delta, g.rowsEnd), rowPosAll = m.add(delta, qLen);
  Value rLo = rowPosLo, rHi = rowPosHi, rAll = rowPosAll;
  Value kLo = kOrigin, kHi = m.add(kOrigin, g.keysEnd);
  Value kAll = m.add(kOrigin, kLen);
  g.base = g.c;
  if (comp.getSegment() != 0) {
    Value w = m.c(comp.getSegment());
    Value first = keySegments ? m.min(rowPosLo, kOrigin) : rowPosLo;
    Value segLo = m.mul(m.add(m.floorDiv(first, w), segIdx), w);
    Value segHi = m.add(segLo, w);
    g.base = m.add(segLo, g.c);
    rLo = m.max(rowPosLo, segLo);
    rHi = m.min(rowPosHi, segHi);
    rAll = m.min(rowPosAll, segHi);
    kLo = m.max(kOrigin, segLo);
    kHi = m.min(m.add(kOrigin, g.keysEnd), segHi);
    kAll = m.min(kAll, segHi);
  }
  // Gathered indices t: position = base + r*t.
  g.tRowLo = m.ceilDiv(m.sub(rLo, g.base), r);
  g.tRowHi = m.ceilDiv(m.sub(rHi, g.base), r);   // rows that compute
  g.tRowAll = m.ceilDiv(m.sub(rAll, g.base), r); // rows that exist
  g.tKeyLo = m.ceilDiv(m.sub(kLo, g.base), r);
  g.tKeyHi = m.ceilDiv(m.sub(kHi, g.base), r);   // keys that compute
  g.tKeyAll = m.ceilDiv(m.sub(kAll, g.base), r); // keys that exist
  return g;
}

Value KernelEmitter::pairInBand(ComponentAttr comp, const GroupItem &g,
                                Value t, Value tk) {
  const int64_t lo = comp.getBandLo(), hi = comp.getBandHi();
  Value inside = m.truth(true);
  Value dt = m.sub(t, tk);
  if (lo != ComponentAttr::kNegInf)
    inside = m.both(inside, m.le(m.c(lo), dt));
  if (hi != ComponentAttr::kPosInf)
    inside = m.both(inside, m.le(dt, m.c(hi)));
  if (!comp.hasFilters())
    return inside;
  // Exclusions as key ranges: inside the band (causal), a key is excluded
  // exactly from the start of the row's excluded segment on.
  if (exclusionsAsRanges(shape, comp)) {
    Value from = excludedPositionsFrom(comp, groupPosition(comp, g, t));
    return m.both(inside, m.lt(groupPosition(comp, g, tk), from));
  }
  // The predicates see row rowLenShift + posStride * i (for lengths) at
  // position qPos + posStride * i: with their (qLen, kLen) =
  // (0, qPos - rowLenShift) that is exactly it.
  Value r = m.c(comp.getPeriod());
  Value posStride = arg(PosStride);
  Value qLenV = m.c(0), kLenV = m.sub(arg(QPos), arg(RowLenShift));
  Value qRow = m.sub(m.add(g.base, m.mul(r, t)), arg(QOrigin));
  Value i = m.add(arg(RowLenShift), m.mul(posStride, qRow));
  Value j = m.add(arg(KPos), m.mul(posStride, m.sub(m.add(g.base, m.mul(r, tk)),
                                                    arg(KOrigin))));
  for (Attribute inc : comp.getInclude())
    inside = m.both(inside, buildPatternPredicate(b, loc, inc, g.h, i, j, qLenV,
                                                  kLenV, g.length));
  for (Attribute exc : comp.getExclude()) {
    Value in = buildPatternPredicate(b, loc, exc, g.h, i, j, qLenV, kLenV,
                                     g.length);
    inside = m.both(inside, m.eq(in, m.truth(false)));
  }
  return inside;
}

//===----------------------------------------------------------------------===//
// Component kernels
//===----------------------------------------------------------------------===//

gpu::GPUFuncOp KernelEmitter::emitComponent(StringRef name, ComponentAttr comp,
                                            StateMode mode) {
  const bool loadsState = mode == StateMode::Update || mode == StateMode::End;
  const bool writesOut = mode == StateMode::Single || mode == StateMode::End;
  const int64_t kBlockRows = shape.blockRows();
  // Warp specialisation (the `warp-specialize` option; components whose
  // keys are contiguous, so always by TMA): a producer warpgroup (threads
  // 0-127) issues every K/V load into a ring of kWsSlots slots, handed
  // back by the consumers through "empty" mbarriers, and the consumer
  // warpgroups (threads 128.., shape.warpgroups of them: 3, 192 rows) run
  // overlappedLoop below. One block per SM; setmaxnreg moves registers
  // from the producer (kProducerRegisters) to the consumers
  // (kConsumerRegisters).
  const bool ws = isWarpSpecialized(shape, comp);
  // Resident keys (residentKeyTiles): a one-warpgroup block loads all its
  // key tiles into the slots at once and takes one softmax step over them.
  // The block's rows [q0, q0 + 64) attend keys inside the residentTiles
  // tiles of its window, which starts at key q0 - hi (see residentStep).
  const int64_t residentTiles = shape.wgmma && shape.warpgroups == 1 && !ws
                                    ? residentKeyTiles(shape, comp)
                                    : 0;
  const bool resident = residentTiles > 0;
  const int64_t threads = ws ? shape.threads() + 128 : shape.threads();
  auto func = beginKernel(name, threads);
  // Two blocks per SM, so that one block's softmax overlaps the other's
  // MMAs: ptxas then keeps the 256-thread wgmma kernels within 128
  // registers per thread. Resident blocks (one warpgroup, 64 KB) fit three;
  // a warp-specialised block takes the SM.
  if (shape.wgmma)
    func->setAttr(NVVM::NVVMDialect::getMinctasmAttrName(),
                  b.getI32IntegerAttr(ws ? 1 : resident ? 3 : 2));
  // The next kernel of the package may launch as soon as every block of
  // this one has started (it waits for this one's results before touching
  // them: mergeEarlierState).
  if (shape.dependentLaunch())
    inlinePtx({}, {}, "griddepcontrol.launch_dependents;", "");
  const int64_t slots = ws ? kWsSlots : resident ? residentTiles : 2;
  // Shared memory: Q, K[slots], V[slots], then with TMA the 8-byte
  // mbarriers: one "full" per slot and, with ws, one "empty" per slot.
  // Resident keys: V[i] is K[i] (V arrives once S is done), and two
  // barriers, one for the K tiles and one for the V tiles.
  // wgmma tiles start at the first 1024-byte boundary of the dynamic shared
  // memory (the swizzle repeats every 1024 bytes and the descriptors assume
  // it starts at one): 1024 bytes of slack.
  const int64_t barrierOffset =
      shape.qTileBytes() +
      (resident ? 1 : 2) * slots * shape.kvTileBytes();
  const int64_t numBarriers = resident ? 2 : slots * (ws ? 2 : 1);
  const int64_t sharedBytes = barrierOffset + (shape.wgmma ? 1024 : 0) +
                              (shape.tma ? 8 * numBarriers : 0);
  // A barrier of every thread that computes (with ws, named barrier 1 of
  // the consumer threads).
  auto consumerBarrier = [&]() {
    if (ws)
      inlinePtx({}, {},
                "bar.sync 1, " + std::to_string(shape.threads()) + ";", "");
    else
      gpu::BarrierOp::create(b, loc);
  };
  const int64_t D = shape.headDim, H = shape.heads;
  const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
  const int64_t lo = comp.getBandLo(), hi = comp.getBandHi();
  const int64_t period = comp.getPeriod();
  Value zero = m.c(0), one = m.c(1), r = m.c(period);
  Value qLen = arg(QLen), kLen = arg(KLen);

  // Query row i sits at position i + delta, key j at j + kOrigin.
  Value delta = arg(QOrigin), kOrigin = arg(KOrigin);
  Value qPos = arg(QPos), kPos = arg(KPos), posStride = arg(PosStride);

  // The block's work item: (row tile, group, batch * heads + head), as the
  // block coordinates (bx, by, bz) of the component's grid give it, or as
  // a persistent block's loop computes it per item. placeItem sets the
  // values below and returns whether the item has rows; itemRange the key
  // range of its rows.
  Value tileIdx, bIdx, h, hk, rowsEnd, keysEnd, length, c, headHasClass;
  Value base, tRowLo, tRowHi, tRowAll, tKeyLo, tKeyHi, q0;
  Value q1, first, last, fullLo, fullHi, numTiles, qHead, qBase, kBase, oBase;
  GroupItem item;
  auto placeItem = [&](Value bx, Value by, Value bz, Value nbx) {
    // Heavy (late) row tiles first for causal balance.
    tileIdx = m.sub(m.sub(nbx, one), bx);
    item = placeGroup(comp, by, bz);
    const GroupItem &g = item;
    bIdx = g.bIdx, h = g.h, hk = g.hk, rowsEnd = g.rowsEnd;
    keysEnd = g.keysEnd, length = g.length, c = g.c;
    headHasClass = g.headHasClass, base = g.base, tRowLo = g.tRowLo;
    tRowHi = g.tRowHi, tRowAll = g.tRowAll, tKeyLo = g.tKeyLo;
    tKeyHi = g.tKeyHi;
    q0 = m.add(tRowLo, m.mul(tileIdx, m.c(kBlockRows)));

    // Items past the group's rows, or of a head without a class, have
    // nothing to do.
    Value hasWork = m.lt(q0, tRowAll);
    if (headHasClass)
      hasWork = m.both(hasWork, headHasClass);
    return hasWork;
  };
  auto itemRange = [&]() {
    q1 = m.max(m.min(m.add(q0, m.c(kBlockRows)), tRowHi), q0);
    // Key tiles attended by some row of [q0, q1), and those by every row.
    first = hi == inf ? tKeyLo : m.max(tKeyLo, m.sub(q0, m.c(hi)));
    last = lo == ninf ? tKeyHi : m.min(tKeyHi, m.sub(q1, m.c(lo)));
    // Keys from the last row's excluded segment on are no row's.
    if (Value end = excludedKeysFrom(comp, item, m.sub(q1, one)))
      last = m.min(last, end);
    last = f.select(m.lt(q0, q1), m.max(last, first), first);
    fullLo = hi == inf ? first
                       : m.max(first, m.sub(m.sub(q1, one), m.c(hi)));
    fullHi = lo == ninf ? last : m.min(last, m.add(m.sub(q0, m.c(lo)), one));
    // Every row attends keys before the first row's excluded segment.
    if (Value end = excludedKeysFrom(comp, item, q0))
      fullHi = m.min(fullHi, end);
    numTiles = m.ceilDiv(m.sub(last, first), m.c(kBlockKeys));

    // qHead: the head's first row in lse and the contiguous f32 state;
    // qBase, kBase, oBase: its first element in q, in k and v, and in out
    // (their strides).
    qHead = m.mul(m.add(m.mul(bIdx, m.c(H)), h), qLen);
    qBase = m.add(m.mul(bIdx, arg(QStrideB)), m.mul(h, arg(QStrideH)));
    kBase = m.add(m.mul(bIdx, arg(KStrideB)), m.mul(hk, arg(KStrideH)));
    oBase = m.add(m.mul(bIdx, arg(OStrideB)), m.mul(h, arg(OStrideH)));
  };

  Value hasWork = placeItem(gpu::BlockIdOp::create(b, loc, gpu::Dimension::x),
                            gpu::BlockIdOp::create(b, loc, gpu::Dimension::y),
                            m.add(arg(BhOffset), gpu::BlockIdOp::create(
                                                     b, loc, gpu::Dimension::z)),
                            gpu::GridDimOp::create(b, loc, gpu::Dimension::x));
  auto inRange = scf::IfOp::create(b, loc, TypeRange{}, hasWork,
                                   /*withElse=*/false);
  b.setInsertionPointToStart(inRange.thenBlock());
  itemRange();
  // An `update` whose rows attend none of its keys leaves their state as it
  // is: the block is done. (A ring step launches over a whole piece of rows
  // and its received keys may reach a few of them: local's neighbour, 1024
  // rows of a 65536-row chunk. Loading and storing every other row's f32
  // state would move the whole state twice.) Not in a chain of dependent
  // launches: there a block that skips its griddepcontrol.wait would let
  // the next kernel's wait, which covers this grid alone, pass before the
  // kernel before this one has finished.
  if (mode == StateMode::Update && !shape.dependentLaunch()) {
    auto some =
        scf::IfOp::create(b, loc, TypeRange{}, m.lt(zero, numTiles), false);
    b.setInsertionPointToStart(some.thenBlock());
  }
  auto qRowIndex = [&](Value t) { // query row i of gathered t
    return m.sub(m.add(base, m.mul(r, t)), delta);
  };
  auto keyPos = [&](Value t) { return m.add(base, m.mul(r, t)); };
  // Key tk as the filter predicates see it: its global key index.
  auto predicateKey = [&](Value tk) {
    return m.add(kPos, m.mul(posStride, m.sub(keyPos(tk), kOrigin)));
  };

  // Shared memory: Q, K[2], V[2].
  auto workgroup =
      gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
  Value dyn = gpu::DynamicSharedMemoryOp::create(
      b, loc,
      MemRefType::get({ShapedType::kDynamic}, b.getI8Type(), MemRefLayoutAttrInterface{}, workgroup));
  if (shape.wgmma)
    alignTiles(dyn);
  // Q, then K of slots 0 and 1, then V of slots 0 and 1.
  auto keyOffset = [&](Value slot) {
    return m.add(m.c(shape.qTileBytes()),
                 m.mul(slot, m.c(shape.kvTileBytes())));
  };
  auto valueOffset = [&](Value slot) {
    if (resident)
      return keyOffset(slot);
    return m.add(m.c(shape.qTileBytes() + slots * shape.kvTileBytes()),
                 m.mul(slot, m.c(shape.kvTileBytes())));
  };
  Value qTile = sharedTile(dyn, zero, kBlockRows);
  auto keyTile = [&](Value slot) {
    return sharedTile(dyn, keyOffset(slot), kBlockKeys);
  };
  auto valueTile = [&](Value slot) {
    return sharedTile(dyn, valueOffset(slot), kBlockKeys);
  };

  // With key_ids, k and v are tables [1, Hkv, V, D] (V from the
  // descriptor's size) and key j is row key_ids[b, j]; ids outside [0, V)
  // read as zero rows.
  Value tableRows, idsRow;
  if (shape.hasKeyIds) {
    Value size = memref::DimOp::create(b, loc, arg(K), 0);
    tableRows = arith::DivUIOp::create(b, loc, size,
                                       m.c(shape.kvHeads * shape.headDim));
    idsRow = m.mul(bIdx, kLen);
  }
  // cp.async of the K/V tile pair of keys k0.. into a slot; rows past
  // `last` (or with ids outside the table) are zero-filled.
  auto loadKeyTile = [&](Value k0, Value slot) {
    auto rowAt = [&](Value row) -> std::pair<Value, Value> {
      Value t = m.add(k0, row);
      Value exists = m.lt(t, last);
      Value j = m.sub(keyPos(t), kOrigin);
      if (!shape.hasKeyIds)
        return {m.add(kBase, m.mul(j, arg(KStrideR))), exists};
      Value at = f.select(exists, m.add(idsRow, j), zero);
      Value id = memref::LoadOp::create(b, loc, arg(KeyIds), at);
      id = arith::IndexCastOp::create(b, loc, b.getIndexType(), id);
      // Negative ids wrap to huge unsigned indices: one compare covers both.
      exists = m.both(exists, arith::CmpIOp::create(b, loc,
                                                    arith::CmpIPredicate::ult,
                                                    id, tableRows));
      return {m.add(m.mul(hk, arg(KStrideH)), m.mul(id, arg(KStrideR))),
              exists};
    };
    asyncLoadTile(keyTile(slot), kBlockKeys, arg(K), rowAt);
    asyncLoadTile(valueTile(slot), kBlockKeys, arg(V), rowAt);
  };
  auto commitGroup = [&]() {
    return nvgpu::DeviceAsyncCreateGroupOp::create(
        b, loc, nvgpu::DeviceAsyncTokenType::get(ctx), ValueRange{});
  };

  // With TMA, thread 0 fetches a K/V tile pair: it arms the slot's
  // mbarrier with the pair's bytes and issues D/64 box loads (64 columns x
  // 64 rows, 128-byte swizzle: the wgmma layout) per tensor; every thread
  // then waits on the mbarrier's phase. Keys past the head's rows read as
  // zeros; keys past `last` but inside the tensor arrive as they are (see
  // zeroValueTail).
  //
  // The runtime encodes the maps for the kernel's period r over k's and
  // v's strides, with heads and batches as their own dimensions: the keys
  // of a head as [rows / r][r][D] for r > 1, so that gathered key
  // j = r*a + c is box row a of residue plane c. That view needs r | rows; otherwise the
  // maps are empty and the kernel loads by cp.async (a uniform branch).
  const bool tmaKeys = shape.tma;
  Value useTma;
  if (tmaKeys)
    useTma = period == 1
                 ? m.truth(true)
                 : m.eq(arith::RemUIOp::create(b, loc, kLen, r), zero);
  // Key t sits at j = base + r*t - kOrigin = r*(planeRow0 + t) + plane,
  // and query row t at i = base + r*t - qOrigin = r*(qPlaneRow0 + t) +
  // qPlane.
  Value plane, planeRow0, qPlane, qPlaneRow0;
  if (tmaKeys && period > 1) {
    auto split = [&](Value origin, Value &inPlane, Value &row0) {
      Value rel = m.sub(base, origin);
      row0 = m.floorDiv(rel, r);
      inPlane = m.sub(rel, m.mul(row0, r));
    };
    split(kOrigin, plane, planeRow0);
    split(delta, qPlane, qPlaneRow0);
  }
  // Q's tile comes by TMA too, on the first key tile's mbarrier, where the
  // keys do and q's map exists (r divides q's rows; a uniform branch). Out's
  // map exists where q's does (the same rows).
  Value useTmaQ;
  if (tmaKeys)
    useTmaQ = period == 1
                  ? useTma
                  : m.both(useTma,
                           m.eq(arith::RemUIOp::create(b, loc, qLen, r), zero));
  Value isLeader = m.eq(tid, zero);
  auto barrierAt = [&](Value slot) {
    return sharedAddress32(
        m.add(m.c(barrierOffset), m.mul(slot, m.c(8))));
  };
  auto emptyAt = [&](Value slot) {
    return sharedAddress32(
        m.add(m.c(barrierOffset + 8 * slots), m.mul(slot, m.c(8))));
  };
  auto toI32 = [&](Value index) {
    return arith::IndexCastOp::create(b, loc, i32, index);
  };
  // The leader's box loads of one K (or V) tile of keys k0.. into the
  // shared bytes at `offset`, completing on `bar`.
  auto tmaLoadBoxes = [&](Value map, Value offset, Value k0, Value bar) {
    // Box coordinates after the column: (row, head, batch), or (plane,
    // row in the plane, head, batch) for r > 1.
    SmallVector<Value> coords;
    if (period == 1)
      coords = {toI32(m.sub(keyPos(k0), kOrigin))};
    else
      coords = {toI32(plane), toI32(m.add(planeRow0, k0))};
    coords.append({toI32(hk), toI32(bIdx)});
    tmaLoadTile(map, offset, coords, bar);
  };
  // The box coordinates of the 64 rows from gathered row t0 in q's and
  // out's maps (which share them).
  auto queryBoxCoords = [&](Value t0) {
    SmallVector<Value> coords;
    if (period == 1)
      coords = {toI32(qRowIndex(t0))};
    else
      coords = {toI32(qPlane), toI32(m.add(qPlaneRow0, t0))};
    coords.append({toI32(h), toI32(bIdx)});
    return coords;
  };
  // The leader fetches Q's tile (rows q0..) on `bar`: boxes of 64 rows, in
  // the tile's panels of kBlockRows rows. Rows past the group's end arrive
  // as they are (or as zeros past q's rows): they only make rows that are
  // never stored, since no product mixes rows.
  // (issueQueryTile: the leader's part, where the caller is the leader.)
  auto issueQueryTile = [&](Value bar) {
    tmaExpectMoreBytes(bar, shape.qTileBytes());
    for (int64_t part = 0; part < kBlockRows / 64; ++part)
      tmaLoadTile(arg(QMap), m.c(part * 64 * 128),
                  queryBoxCoords(m.add(q0, m.c(64 * part))), bar,
                  /*panelBytes=*/kBlockRows * 128);
  };
  auto tmaLoadQueryTile = [&](Value bar) {
    auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                    /*withElse=*/false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(leader.thenBlock());
    issueQueryTile(bar);
  };
  // The leader fetches the K/V tile pair of keys k0.. into a slot.
  auto tmaLoadKeyTile = [&](Value k0, Value slot) {
    auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                    /*withElse=*/false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(leader.thenBlock());
    // One arrival (the leader's) that expects both tiles' bytes.
    Value bar = barrierAt(slot);
    tmaExpectBytes(bar, 2 * shape.kvTileBytes());
    tmaLoadBoxes(arg(KMap), keyOffset(slot), k0, bar);
    tmaLoadBoxes(arg(VMap), valueOffset(slot), k0, bar);
  };
  // Resident keys: the block's window of keys starts at q0 - hi, whether or
  // not such keys exist: the leader fetches the K (or V) tiles of keys
  // window + 64 i into every slot i, completing on one mbarrier. Keys
  // outside the tensor arrive as zeros (TMA); keys outside [first, last)
  // are masked, and V's rows there zeroed (zeroValueTail).
  Value window;
  if (resident)
    window = m.sub(q0, m.c(hi));
  auto residentLoad = [&](Value bar, bool values) {
    auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                    /*withElse=*/false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(leader.thenBlock());
    tmaExpectBytes(bar, slots * shape.kvTileBytes());
    for (int64_t i = 0; i < slots; ++i)
      tmaLoadBoxes(arg(values ? VMap : KMap), keyOffset(m.c(i)),
                   m.add(window, m.c(i * kBlockKeys)), bar);
  };
  // Waits for the phase of step `it` of the mbarrier `barrier()` builds:
  // a slot's barrier completes one phase per tile through it, so step it
  // waits for phase parity (it / slots) % 2. (The address is built after
  // the parity: the PTX of the default kernels stays as it was.)
  auto waitTile = [&](Value it, function_ref<Value()> barrier) {
    Value parity = toI32(arith::RemUIOp::create(
        b, loc, arith::DivUIOp::create(b, loc, it, m.c(slots)), m.c(2)));
    waitBarrierParity(barrier(), parity);
  };
  auto waitKeyTile = [&](Value it, Value slot) {
    waitTile(it, [&] { return barrierAt(slot); });
  };
  // A tile reaching past `last` holds keys no row attends; their scores are
  // masked, so K's rows may hold anything, but P . V multiplies V's rows by
  // zero and 0 * inf (say, padding past lengths[b]) would be NaN: zero
  // those rows of V, as cp.async's zero fill does.
  // A resident window's tiles may also start before `first`: their rows
  // before it (keys of no row here, or zeros) are zeroed as well.
  auto zeroValueTail = [&](Value k0, Value slot) {
    Value tailStart = m.sub(last, k0);
    Value headEnd = resident ? m.sub(first, k0) : Value();
    Value outside = m.lt(tailStart, m.c(kBlockKeys));
    if (resident)
      outside = m.either(outside, m.lt(zero, headEnd));
    auto edge = scf::IfOp::create(b, loc, TypeRange{}, outside,
                                  /*withElse=*/false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(edge.thenBlock());
    zeroTileRows(valueTile(slot), [&](Value row) {
      Value inTailRows = m.le(tailStart, row);
      if (resident)
        inTailRows = m.either(inTailRows, m.lt(row, headEnd));
      return inTailRows;
    });
    // The wgmmas read V through the async proxy.
    inlinePtx({}, {}, "fence.proxy.async.shared::cta;", "");
  };

  // Prologue: the mbarriers (TMA), Q and the first key tile.
  if (tmaKeys) {
    auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                    /*withElse=*/false);
    {
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(leader.thenBlock());
      for (int64_t slot = 0; slot < (resident ? 2 : slots); ++slot) {
        inlinePtx({}, {barrierAt(m.c(slot))},
                  "mbarrier.init.shared::cta.b64 [$0], 1;", "r");
        if (ws)
          inlinePtx({}, {emptyAt(m.c(slot))},
                    "mbarrier.init.shared::cta.b64 [$0], " +
                        std::to_string(shape.threads()) + ";",
                    "r");
      }
      inlinePtx({}, {}, "fence.mbarrier_init.release.cluster;", "");
    }
    if (ws) {
      // Every thread sees the initialised barriers; then the producer
      // warpgroup gives registers up and its thread 0 loads every key tile
      // of the block, into slot it % slots once the consumers have handed
      // back that slot's previous tile (its "empty" barrier, one arrival
      // a phase). The consumer warpgroups take the registers and continue
      // below with their own thread and warp numbers (from 0).
      gpu::BarrierOp::create(b, loc);
      auto split = scf::IfOp::create(b, loc, TypeRange{},
                                     m.lt(tid, m.c(128)), /*withElse=*/true);
      b.setInsertionPointToStart(split.thenBlock());
      inlinePtx({}, {}, "setmaxnreg.dec.sync.aligned.u32 " +
                            std::to_string(kProducerRegisters) + ";", "");
      auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader, false);
      b.setInsertionPointToStart(leader.thenBlock());
      {
        // Q's tile with the first key tile (a block without key tiles
        // waits for nothing, so it loads nothing).
        OpBuilder::InsertionGuard g(b);
        auto withQuery = scf::IfOp::create(
            b, loc, TypeRange{}, m.both(useTmaQ, m.lt(zero, numTiles)), false);
        b.setInsertionPointToStart(withQuery.thenBlock());
        issueQueryTile(barrierAt(zero));
      }
      auto produce = scf::ForOp::create(b, loc, zero, numTiles, one);
      b.setInsertionPointToStart(produce.getBody());
      Value it = produce.getInductionVar();
      Value slot = arith::RemUIOp::create(b, loc, it, m.c(slots));
      auto reuse = scf::IfOp::create(b, loc, TypeRange{},
                                     m.le(m.c(slots), it), false);
      {
        OpBuilder::InsertionGuard g(b);
        b.setInsertionPointToStart(reuse.thenBlock());
        waitTile(m.sub(it, m.c(slots)), [&] { return emptyAt(slot); });
      }
      tmaLoadKeyTile(m.add(first, m.mul(it, m.c(kBlockKeys))), slot);
      b.setInsertionPointToStart(split.elseBlock());
      inlinePtx({}, {}, "setmaxnreg.inc.sync.aligned.u32 " +
                            std::to_string(kConsumerRegisters) + ";", "");
      tid = m.sub(tid, m.c(128));
      warp = arith::DivUIOp::create(b, loc, tid, m.c(32));
    } else {
      // No load may be left in flight when the block exits.
      auto byTma = scf::IfOp::create(b, loc, TypeRange{}, useTma,
                                     /*withElse=*/true);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(byTma.thenBlock());
      // Q first (its expected bytes before the leader's arrival).
      auto loadQuery = [&]() {
        auto byTmaQ = scf::IfOp::create(b, loc, TypeRange{}, useTmaQ, false);
        OpBuilder::InsertionGuard g(b);
        b.setInsertionPointToStart(byTmaQ.thenBlock());
        tmaLoadQueryTile(barrierAt(zero));
      };
      if (resident) {
        loadQuery();
        residentLoad(barrierAt(zero), /*values=*/false);
      } else {
        auto some = scf::IfOp::create(b, loc, TypeRange{},
                                      m.lt(zero, numTiles), false);
        b.setInsertionPointToStart(some.thenBlock());
        loadQuery();
        tmaLoadKeyTile(first, zero);
      }
      b.setInsertionPointToStart(byTma.elseBlock());
      loadKeyTile(first, zero);
    }
  } else {
    loadKeyTile(first, zero);
  }
  {
    OpBuilder::InsertionGuard guard(b);
    if (tmaKeys) {
      auto byCopy =
          scf::IfOp::create(b, loc, TypeRange{}, m.negate(useTmaQ), false);
      b.setInsertionPointToStart(byCopy.thenBlock());
    }
    asyncLoadTile(qTile, kBlockRows, arg(Q),
                  [&](Value row) -> std::pair<Value, Value> {
      Value t = m.add(q0, row);
      return {m.add(qBase, m.mul(qRowIndex(t), arg(QStrideR))),
              m.lt(t, tRowAll)};
    });
  }
  Value token = commitGroup();
  nvgpu::DeviceAsyncWaitOp::create(b, loc, token, b.getI32IntegerAttr(0));
  // The wgmmas read shared memory through the async proxy: make this
  // thread's copies visible to it before the barrier.
  auto fenceForWgmma = [&]() {
    if (shape.wgmma)
      inlinePtx({}, {}, "fence.proxy.async.shared::cta;", "");
  };
  fenceForWgmma();
  consumerBarrier();

  Value laneRow = arith::DivUIOp::create(b, loc, lane, m.c(4)); // lane / 4
  Value laneCol = m.mul(arith::RemUIOp::create(b, loc, lane, m.c(4)), m.c(2));
  Value warpRow = m.mul(warp, m.c(16));
  // This thread's two rows (gathered t) and their validity.
  Value tqA = m.add(q0, m.add(warpRow, laneRow));
  Value tqB = m.add(tqA, m.c(8));
  Value tq[2] = {tqA, tqB};
  // Exclusions as ranges: the last key column before each row's excluded
  // segment, in 32 bits, worked out once (the edge tiles' window masks end
  // the row's run of columns there).
  Value lastBeforeExclusion[2];
  if (exclusionsAsRanges(shape, comp))
    for (int64_t r2 = 0; r2 < 2; ++r2)
      lastBeforeExclusion[r2] =
          toI32(m.sub(excludedKeysFrom(comp, item, tq[r2]), m.c(1)));

  // Q fragments, kept in registers for the whole loop (mma.sync; wgmma
  // reads Q from shared memory).
  SmallVector<std::array<Value, 4>> qFrag;
  if (!shape.wgmma) {
    Value row = m.add(warpRow, arith::RemUIOp::create(b, loc, lane, m.c(16)));
    Value colOff = m.mul(arith::DivUIOp::create(b, loc, lane, m.c(16)), m.c(8));
    for (int64_t kk = 0; kk < D / 16; ++kk)
      qFrag.push_back(
          ldmatrix(qTile, row, m.add(colOff, m.c(kk * 16)), false));
  }

  // The loop state: O fragments (D/8 of them), then max and sum per row half.
  const int64_t oFrags = D / 8;
  SmallVector<Value> init;
  Value isQuadLeader = m.eq(arith::RemUIOp::create(b, loc, lane, m.c(4)), zero);
  // The stored state of this thread's row `half`: its max (-inf for a row
  // this block does not compute, which reads row 0 and weighs nothing), its
  // sum l, and l on the quad leader only (the loop's l is summed over the
  // quad at the end). A 16-bit state is O / l and the row's lse, which is
  // all a merge needs: as max m' = lse / ln 2 (log2 units) and sum 1, the
  // merge weighs O / l by 2^(m' - M) = l 2^(max - M), exactly as (max, l)
  // would, so its kernels store and load no max and sum.
  // `row` numbers the row in lse and the f32 state, `outAt` is its first
  // element in out (a 16-bit state's home); both 0 for a row not computed.
  struct StoredRow {
    Value valid, row, outAt, max, sum, leaderSum;
  };
  auto loadStoredRow = [&](int64_t half) {
    StoredRow s;
    s.valid = m.lt(tq[half], q1);
    s.row = f.select(s.valid, m.add(qHead, qRowIndex(tq[half])), zero);
    s.outAt = f.select(
        s.valid, m.add(oBase, m.mul(qRowIndex(tq[half]), arg(OStrideR))), zero);
    Value mx;
    if (shape.halfState) {
      mx = f.mul(memref::LoadOp::create(b, loc, arg(Lse), s.row),
                 f.c(M_LOG2E));
      s.sum = f.c(1.0);
    } else {
      mx = memref::LoadOp::create(b, loc, arg(Max), s.row);
      s.sum = memref::LoadOp::create(b, loc, arg(Sum), s.row);
    }
    s.max = f.select(s.valid, mx, f.negInf());
    s.leaderSum =
        f.select(m.both(s.valid, isQuadLeader), s.sum, f.c(0.0));
    return s;
  };
  // Columns dn*8 + laneCol and the next of a stored row as f32 O (0 where
  // the row is not valid): each thread's pair is one load (f32 O, or O / l
  // in 16 bits, scaled back by the row's l).
  auto loadStoredPair = [&](const StoredRow &s, int64_t dn) {
    Value rowAt = shape.halfState ? s.outAt : m.mul(s.row, m.c(D));
    Value at = m.add(rowAt, m.add(laneCol, m.c(dn * 8)));
    SmallVector<Value> pair;
    for (Value a : loadStatePair(at, s.sum))
      pair.push_back(f.select(s.valid, a, f.c(0.0)));
    return pair;
  };
  // `update` and `end` continue the earlier components' state. Where the
  // kernel is a programmatic dependent launch of the one before
  // (shape.dependentLaunch) they start from the empty state and merge the
  // stored one in after the loop (mergeEarlierState), so that all of the
  // loop may overlap the kernel before; otherwise they load it first, where
  // its loads overlap Q's and the first key tile's.
  const bool mergesAfterLoop = loadsState && shape.dependentLaunch();
  if (!loadsState || mergesAfterLoop) {
    for (int64_t i = 0; i < oFrags * 4; ++i)
      init.push_back(f.c(0.0));
    init.append({f.negInf(), f.negInf(), f.c(0.0), f.c(0.0)});
  } else {
    StoredRow stored[2] = {loadStoredRow(0), loadStoredRow(1)};
    for (int64_t dn = 0; dn < oFrags; ++dn)
      for (int64_t half = 0; half < 2; ++half)
        init.append(loadStoredPair(stored[half], dn));
    init.append({stored[0].max, stored[1].max, stored[0].leaderSum,
                 stored[1].leaderSum});
  }

  const double scaleLog2 = shape.scale * M_LOG2E;
  // 128-byte rows: a K/V panel is 64 rows, a Q panel blockRows rows.
  const int64_t kvPanelBytes = kBlockKeys * 128;
  const int64_t qPanelBytes = kBlockRows * 128;
  auto toFrags = [&](ValueRange flat) {
    SmallVector<AccFrag> frags(flat.size() / 4);
    for (auto [i, v] : llvm::enumerate(flat))
      frags[i / 4][i % 4] = v;
    return frags;
  };
  auto flatten = [&](ArrayRef<AccFrag> frags) {
    SmallVector<Value> flat;
    for (const AccFrag &frag : frags)
      flat.append(frag.begin(), frag.end());
    return flat;
  };

  // S = Q K^T with wgmma, A = Q and B = K from shared memory, K-major:
  // 8-row groups 1024 bytes apart (the leading offset is unused: a k16 step
  // stays inside one 128-byte row); k step kk is 32 bytes into panel kk/4.
  // (Q as a register A operand kept across the loop is miscompiled by
  // ptxas 13.0 for D = 64: it reuses the registers after the first wgmma.)
  // Warpgroup g multiplies Q rows 64g..64g+63. Issued only: the caller
  // commits and waits.
  auto issueScoresWgmma = [&](Value slot) {
    Value qDesc = tileDescriptor(
        m.mul(arith::DivUIOp::create(b, loc, warp, m.c(4)), m.c(64 * 128)),
        16, 1024);
    Value kDesc = tileDescriptor(keyOffset(slot), 16, 1024);
    // The first k step overwrites the accumulators (see wgmma()): they
    // need no zeros, only their types.
    SmallVector<Value> acc(kKeyNTiles * 4, f.c(0.0));
    for (int64_t kk = 0; kk < D / 16; ++kk) {
      int64_t inRow = (kk % 4) * 32;
      acc = wgmma(acc, advance(qDesc, (kk / 4) * qPanelBytes + inRow),
                  advance(kDesc, (kk / 4) * kvPanelBytes + inRow),
                  /*transposeB=*/false, /*accumulate=*/kk > 0);
    }
    return acc;
  };
  // S = Q K^T with mma.sync from the Q fragments and ldmatrix'ed K.
  auto scoresMmaSync = [&](Value slot) {
    return fragsTimesTileT(qFrag, keyTile(slot));
  };

  // The scores of the tile of keys k0..: key bias added, and -inf outside
  // the component on edge tiles.
  auto biasAndMask = [&](SmallVector<AccFrag> &s, Value k0) {
    // key_bias[b, j] joins the score scale*q.k + bias; the scores here are
    // q.k and scaled by scale*log2(e) below, so add bias / scale. Keys past
    // `last` read key 0's bias: they lie in an edge tile and are masked.
    if (shape.hasKeyBias) {
      Value invScale = f.c(1.0 / shape.scale);
      Value biasRow = m.mul(bIdx, kLen);
      for (int64_t n = 0; n < kKeyNTiles; ++n)
        for (int64_t e = 0; e < 2; ++e) {
          Value tk = m.add(k0, m.add(laneCol, m.c(n * 8 + e)));
          Value j = m.sub(keyPos(tk), kOrigin);
          Value at = f.select(m.lt(tk, last), m.add(biasRow, j), zero);
          Value bias = memref::LoadOp::create(b, loc, arg(KeyBias), at);
          bias = f.mul(bias, invScale);
          s[n][e] = f.add(s[n][e], bias);         // row lane/4
          s[n][e + 2] = f.add(s[n][e + 2], bias); // row lane/4 + 8
        }
    }

    // Edge tiles: scores outside the component become -inf.
    Value masked = m.either(m.lt(k0, fullLo),
                            m.lt(fullHi, m.add(k0, m.c(kBlockKeys))));
    const bool rangesOnly = exclusionsAsRanges(shape, comp);
    if (!comp.getInclude().empty()) {
      masked = m.truth(true);
    } else if (!comp.getExclude().empty() && !rangesOnly) {
      // An exclusion needs the per-element predicate only on tiles it can
      // reach (a union's later branch excludes the earlier branches, which
      // share few tiles with it): test the tile's position ranges, in the
      // predicate's coordinates (below), against each excluded pattern.
      Value pLo = m.add(qPos, m.mul(posStride, qRowIndex(q0)));
      Value pHi = m.add(qPos, m.mul(posStride, qRowIndex(m.sub(q1, one))));
      Value jLo = predicateKey(k0);
      Value jHi = predicateKey(m.add(k0, m.c(kBlockKeys - 1)));
      for (Attribute exc : comp.getExclude())
        masked = m.either(
            masked, buildPatternMayHitTile(b, loc, exc, pLo, pHi, jLo, jHi));
    }
    SmallVector<Type> sTypes(kKeyNTiles * 4, f32);
    auto maskIf = scf::IfOp::create(b, loc, sTypes, masked, /*withElse=*/true);
    {
      OpBuilder::InsertionGuard g2(b);
      b.setInsertionPointToStart(maskIf.thenBlock());
      SmallVector<Value> out;
      // Without filters, each row's attended keys in this tile are one run
      // of columns: key k0 + laneCol + cc (cc = 8n + e % 2, a constant per
      // element) is inside when lower <= cc <= upper, with
      //
      //   u     = t - (k0 + laneCol)
      //   upper = min(last - 1 - (k0 + laneCol), u - lo)   (-1 past q1)
      //   lower = u - hi
      //
      // worked out per row and clamped to [-1, 64], so that each element
      // costs one compare against a constant (a band with both ends folds
      // its two into one unsigned compare: cc - lower <= upper - lower) and
      // one select. The band, lengths and the group's end then cost nothing
      // more per element (bench/gpu_ab.md, "Edge-tile masks as one run of
      // columns per row"). In 32-bit arithmetic: gathered indices are below
      // 2^31 (as the TMA coordinates already assume), and 64-bit tests per
      // element took twice the instructions. u is clamped to
      // [end - 1, end + 64] before an end is taken off, so nothing
      // overflows; bands of 2^30 keys or more and filters keep the 64-bit
      // test per element below.
      const bool windowMask =
          (!comp.hasFilters() || rangesOnly) &&
          (lo == ninf || std::abs(lo) < (int64_t(1) << 30)) &&
          (hi == inf || std::abs(hi) < (int64_t(1) << 30));
      if (windowMask) {
        auto c32 = [&](int64_t v) {
          return arith::ConstantIntOp::create(b, loc, i32, v).getResult();
        };
        auto clamp32 = [&](Value x, int64_t from, int64_t to) {
          return m.min(m.max(x, c32(from)), c32(to));
        };
        // x - end, clamped to the tile's columns [-1, 64].
        auto columnsPast = [&](Value x, int64_t end) {
          return arith::SubIOp::create(
              b, loc, clamp32(x, end - 1, end + kBlockKeys), c32(end));
        };
        Value col0 = toI32(m.add(k0, laneCol));
        Value lastCol = clamp32(arith::SubIOp::create(
                                    b, loc, toI32(m.sub(last, one)), col0),
                                -1, kBlockKeys);
        Value q132 = toI32(q1);
        Value lower[2], span[2], upper[2];
        for (int64_t r2 = 0; r2 < 2; ++r2) {
          Value row = toI32(tq[r2]);
          Value u = arith::SubIOp::create(b, loc, row, col0);
          Value up = lastCol;
          if (lo != ninf)
            up = m.min(up, columnsPast(u, lo));
          // Exclusions as ranges: the row's keys end before its excluded
          // segment.
          if (rangesOnly)
            up = m.min(up, clamp32(arith::SubIOp::create(
                                       b, loc, lastBeforeExclusion[r2], col0),
                                   -1, kBlockKeys));
          upper[r2] = arith::SelectOp::create(b, loc, m.lt(row, q132), up,
                                              c32(-1));
          if (hi == inf)
            continue;
          Value low = columnsPast(u, hi);
          // A resident window may start before `first`.
          if (resident)
            low = m.max(low, clamp32(arith::SubIOp::create(
                                         b, loc, toI32(first), col0),
                                     -1, kBlockKeys));
          // An empty run: no cc - lower is at most 0 (unsigned).
          Value empty = m.lt(upper[r2], low);
          lower[r2] = arith::SelectOp::create(b, loc, empty,
                                              c32(2 * kBlockKeys), low);
          span[r2] = arith::SelectOp::create(
              b, loc, empty, c32(0),
              arith::SubIOp::create(b, loc, upper[r2], low));
        }
        for (int64_t n = 0; n < kKeyNTiles; ++n)
          for (int64_t e = 0; e < 4; ++e) {
            int64_t cc = n * 8 + e % 2, r2 = e / 2;
            Value inside =
                hi == inf
                    ? m.le(c32(cc), upper[r2])
                    : m.cmp(arith::CmpIPredicate::ule,
                            arith::SubIOp::create(b, loc, c32(cc), lower[r2]),
                            span[r2]);
            out.push_back(f.select(inside, s[n][e], f.negInf()));
          }
      } else {
        // Otherwise the test and the filters' predicates per element.
        for (int64_t n = 0; n < kKeyNTiles; ++n)
          for (int64_t e = 0; e < 4; ++e) {
            Value t = tq[e / 2];
            Value tk = m.add(k0, m.add(laneCol, m.c(n * 8 + e % 2)));
            Value inside = m.both(m.lt(tk, last), m.lt(t, q1));
            if (resident)
              inside = m.both(inside, m.le(first, tk));
            inside = m.both(inside, pairInBand(comp, item, t, tk));
            out.push_back(f.select(inside, s[n][e], f.negInf()));
          }
      }
      scf::YieldOp::create(b, loc, out);
      b.setInsertionPointToStart(maskIf.elseBlock());
      scf::YieldOp::create(b, loc, flatten(s));
    }
    s = toFrags(maskIf.getResults());
  };

  // Online softmax of one tile's scores s (turned into probabilities in
  // place) against the running max and sum [max0, max1, sum0, sum1], with
  // lazy rescaling: a row keeps its old max m unless the tile's max
  // exceeds it by more than kRescaleSlack (in log2 units), so p =
  // exp2(s*c - m) stays below 2^kRescaleSlack and O and l stay consistent
  // with the m they were scaled by. The warp decides as one (vote.any), so
  // in the common case - no row of the warp grew by that much - the D/2
  // multiplies of O by alpha are skipped.
  struct SoftmaxStep {
    Value rescale;   // i1: multiply O by alpha
    Value alpha[2];  // per row half
    SmallVector<Value> stats; // the new [max0, max1, sum0, sum1]
  };
  // The first polynomialExps of each row half's 2 * kKeyNTiles scores are
  // exponentiated on the FMA pipe (exp2Polynomial), the rest by ex2 on the
  // MUFU pipe, which does 16 a clock per SM against the FMA pipe's 128
  // lanes: with wgmma the ex2s were on the critical path (a kernel without
  // them ran 11% faster). 2 of 16 balances the pipes best on the H100
  // (causal 548-567 -> 595 TF/s; 3 of 16 loses it again); bench/gpu_ab.md.
  // The warp-specialised kernels overlap the softmax with the MMAs and are
  // faster with ex2 throughout (causal 632 -> 646, tokenized 528 -> 548).
  // So are the others at head dim 64, where the MMAs take half as long
  // against the same softmax: local 330 -> 334, LongNet's union 334 -> 351
  // TF/s (bench/gpu_ab.md, "Head dim 64").
  const int64_t polynomialExps =
      shape.wgmma && !ws && shape.headDim > 64 ? 2 : 0;
  auto softmaxStep = [&](SmallVector<AccFrag> &s, ValueRange stats) {
    // One key tile's fragments, or all of a resident block's (the same
    // share of them by polynomial).
    const int64_t numFrags = s.size();
    const int64_t polynomials = polynomialExps * numFrags / kKeyNTiles;
    Value c2 = f.c(scaleLog2);
    Value tileMaxC[2], grows = m.truth(false);
    for (int64_t half = 0; half < 2; ++half) {
      Value oldMax = stats[half];
      Value tileMax = f.negInf();
      for (int64_t n = 0; n < numFrags; ++n)
        for (int64_t e = 0; e < 2; ++e)
          tileMax = f.max(tileMax, s[n][half * 2 + e]);
      tileMax = quadReduce(tileMax, /*isMax=*/true);
      tileMaxC[half] = f.mul(tileMax, c2);
      // -inf > -inf is false: a row that has seen no key does not vote.
      grows = m.either(grows, f.gt(tileMaxC[half],
                                   f.add(oldMax, f.c(kRescaleSlack))));
    }
    SoftmaxStep step;
    step.rescale = NVVM::VoteSyncOp::create(
        b, loc, b.getI1Type(),
        arith::ConstantIntOp::create(b, loc, i32, -1), grows,
        NVVM::VoteSyncKind::any);
    Value newMax[2], newSum[2];
    for (int64_t half = 0; half < 2; ++half) {
      Value oldMax = stats[half];
      Value oldSum = stats[2 + half];
      Value mx = f.select(step.rescale, f.max(oldMax, tileMaxC[half]), oldMax);
      // A row that has seen no key keeps -inf; exponentiate against 0 then.
      Value mUse = f.select(f.eq(mx, f.negInf()), f.c(0.0), mx);
      step.alpha[half] = exp2(f.sub(oldMax, mUse));
      Value sum =
          f.select(step.rescale, f.mul(oldSum, step.alpha[half]), oldSum);
      // p = exp2(s * c - m) as one fma per score.
      Value negM = arith::NegFOp::create(b, loc, mUse);
      for (int64_t n = 0; n < numFrags; ++n)
        for (int64_t e = 0; e < 2; ++e) {
          Value &x = s[n][half * 2 + e];
          x = LLVM::FMAOp::create(b, loc, x, c2, negM);
          x = n * 2 + e < polynomials ? exp2Polynomial(x) : exp2(x);
          sum = f.add(sum, x);
        }
      newMax[half] = mx;
      newSum[half] = sum;
    }
    step.stats = {newMax[0], newMax[1], newSum[0], newSum[1]};
    return step;
  };
  // O * alpha, the multiply only where the warp rescales.
  auto rescaleAcc = [&](ValueRange o, const SoftmaxStep &step) {
    SmallVector<Type> oTypes(o.size(), f32);
    auto rescaleIf =
        scf::IfOp::create(b, loc, oTypes, step.rescale, /*withElse=*/true);
    OpBuilder::InsertionGuard g2(b);
    b.setInsertionPointToStart(rescaleIf.thenBlock());
    SmallVector<Value> scaled;
    for (auto [i, v] : llvm::enumerate(o))
      scaled.push_back(f.mul(v, step.alpha[(i % 4) / 2]));
    scf::YieldOp::create(b, loc, scaled);
    b.setInsertionPointToStart(rescaleIf.elseBlock());
    scf::YieldOp::create(b, loc, o);
    return SmallVector<Value>(rescaleIf.getResults());
  };
  // O += P V with wgmma, P (as i32 registers) from registers, V is B =
  // [keys x D] with D contiguous (MN-major, transposed): the 64-column
  // panels are 8192 bytes apart (leading offset), 8-key groups 1024
  // (stride offset); k step j starts 16 keys = 2048 bytes on. Issued only.
  // With `fresh`, O = P V: o only gives the accumulators' types.
  auto issueValuesWgmma = [&](ValueRange o, ValueRange p, Value slot,
                              bool fresh = false) {
    Value vDesc = tileDescriptor(valueOffset(slot), kvPanelBytes, 1024);
    SmallVector<Value> acc(o);
    for (int64_t j = 0; j < kKeyNTiles / 2; ++j)
      acc = wgmma(acc, p.slice(j * 4, 4), advance(vDesc, j * 2048),
                  /*transposeB=*/true, /*accumulate=*/!fresh || j > 0);
    return acc;
  };
  // O += P V with mma.sync and ldmatrix'ed (transposed) V.
  auto valuesMmaSync = [&](SmallVector<AccFrag> o, ArrayRef<Value> p,
                           Value slot) {
    return addPackedTimesTileMmaSync(std::move(o), p, valueTile(slot));
  };

  // The consumers' key loop of a warp-specialised kernel, after
  // FlashAttention-3:
  //
  //   S(0); softmax(0)
  //   step it = 1 .. n-1:  issue S(it) and P.V(it-1); wait for S(it) only;
  //                        softmax(it) while P.V(it-1) runs; wait for it;
  //                        hand slot it-1 back; O *= alpha(it)
  //   P.V(n-1)
  //
  // O and P stay in flight across the softmax: the consumers' 160
  // registers hold them (ptxas serializes the wgmmas at 128, C7512). Three
  // warpgroups interleave on their own; ping-pong turns between two
  // (named barriers) did not pay (bench/gpu_ab.md).
  auto handBack = [&](Value slot) {
    inlinePtx({}, {emptyAt(slot)},
              "mbarrier.arrive.shared::cta.b64 _, [$0];", "r");
  };
  // Waits for key tile `it`; on an edge tile both warpgroups zero V's rows
  // past `last` (the same zeros) and meet before either reads them.
  auto awaitKeyTile = [&](Value it, Value slot, Value k0) {
    waitKeyTile(it, slot);
    auto edge = scf::IfOp::create(
        b, loc, TypeRange{}, m.lt(m.sub(last, k0), m.c(kBlockKeys)), false);
    OpBuilder::InsertionGuard g2(b);
    b.setInsertionPointToStart(edge.thenBlock());
    zeroValueTail(k0, slot);
    consumerBarrier();
  };
  auto slotOf = [&](Value it) {
    return arith::RemUIOp::create(b, loc, it, m.c(slots));
  };
  auto overlappedLoop = [&]() -> SmallVector<Value> {
    SmallVector<Type> types;
    for (Value v : init)
      types.push_back(v.getType());
    auto some = scf::IfOp::create(b, loc, types, m.lt(zero, numTiles), true);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(some.elseBlock());
    scf::YieldOp::create(b, loc, init);
    b.setInsertionPointToStart(some.thenBlock());

    // O and P (as i32 pairs) through wgmma.fence: P.V reads both.
    const int64_t oRegs = oFrags * 4, pRegs = kKeyNTiles / 2 * 4;
    auto fencedValues = [&](ValueRange o, ValueRange p) {
      SmallVector<Value> operands(o);
      operands.append(p.begin(), p.end());
      return wgmmaFence(operands);
    };
    auto issueValues = [&](ArrayRef<Value> fenced, Value slot) {
      return wgmmaCommit(issueValuesWgmma(fenced.take_front(oRegs),
                                          fenced.drop_front(oRegs), slot));
    };
    auto packed = [&](ArrayRef<AccFrag> s) {
      SmallVector<Value> p;
      for (Value reg : packAccumulators(s))
        p.push_back(asI32(reg));
      return p;
    };

    // Tile 0: S and softmax.
    awaitKeyTile(zero, zero, first);
    inlinePtx({}, {}, "wgmma.fence.sync.aligned;", "");
    SmallVector<AccFrag> s0 =
        toFrags(wgmmaCommitAndWait(issueScoresWgmma(zero)));
    biasAndMask(s0, first);
    SoftmaxStep step0 =
        softmaxStep(s0, ArrayRef<Value>(init).drop_front(oRegs));
    // Loop state: O, [max0, max1, sum0, sum1], P of the previous tile.
    SmallVector<Value> state0 =
        rescaleAcc(ArrayRef<Value>(init).take_front(oRegs), step0);
    state0.append(step0.stats);
    state0.append(packed(s0));

    auto loop = scf::ForOp::create(b, loc, one, numTiles, one, state0);
    {
      OpBuilder::InsertionGuard g2(b);
      b.setInsertionPointToStart(loop.getBody());
      Value it = loop.getInductionVar();
      ValueRange state = loop.getRegionIterArgs();
      Value slot = slotOf(it), prevSlot = slotOf(m.sub(it, one));
      Value k0 = m.add(first, m.mul(it, m.c(kBlockKeys)));
      awaitKeyTile(it, slot, k0);
      SmallVector<Value> fenced =
          fencedValues(state.take_front(oRegs), state.take_back(pRegs));
      SmallVector<Value> scores = wgmmaCommit(issueScoresWgmma(slot));
      SmallVector<Value> o = issueValues(fenced, prevSlot);
      SmallVector<AccFrag> s = toFrags(wgmmaWait(scores, 1));
      biasAndMask(s, k0);
      SoftmaxStep step =
          softmaxStep(s, state.drop_front(oRegs).take_front(4));
      SmallVector<Value> p = packed(s);
      o = wgmmaWait(o, 0);
      handBack(prevSlot);
      SmallVector<Value> next = rescaleAcc(o, step);
      next.append(step.stats);
      next.append(p);
      scf::YieldOp::create(b, loc, next);
    }

    // The last tile's P.V.
    ValueRange res = loop.getResults();
    Value lastSlot = slotOf(m.sub(numTiles, one));
    SmallVector<Value> out = issueValues(
        fencedValues(res.take_front(oRegs), res.take_back(pRegs)), lastSlot);
    out = wgmmaWait(out, 0);
    handBack(lastSlot);
    ValueRange stats = res.drop_front(oRegs).take_front(4);
    out.append(stats.begin(), stats.end());
    scf::YieldOp::create(b, loc, out);
    return SmallVector<Value>(some.getResults());
  };
  // Resident keys (residentKeyTiles): every key tile of the block is in
  // its slot after one mbarrier phase, and the whole row is one step:
  //
  //   wait for K; S[i] = Q . K[i]^T for every slot i (one commit group)
  //   barrier (no warp reads K any more); the leader loads V[i] into K[i]
  //   mask each tile; softmax with one max and one sum per row (O is 0:
  //     nothing to rescale)
  //   wait for V; zero its rows outside [first, last); O = sum over i of
  //     P[i] . V[i]
  //
  // The softmax runs while V arrives.
  auto residentStep = [&]() -> SmallVector<Value> {
    const int64_t oRegs = oFrags * 4, pRegs = kKeyNTiles / 2 * 4;
    // Tile i holds keys window + 64 i.
    auto tileK0 = [&](int64_t i) {
      return m.add(window, m.c(i * kBlockKeys));
    };
    waitKeyTile(zero, zero);
    inlinePtx({}, {}, "wgmma.fence.sync.aligned;", "");
    SmallVector<Value> scores;
    for (int64_t i = 0; i < slots; ++i)
      llvm::append_range(scores, issueScoresWgmma(m.c(i)));
    SmallVector<AccFrag> s = toFrags(wgmmaCommitAndWait(scores));
    gpu::BarrierOp::create(b, loc);
    residentLoad(barrierAt(one), /*values=*/true);
    for (int64_t i = 0; i < slots; ++i) {
      auto from = s.begin() + i * kKeyNTiles;
      SmallVector<AccFrag> tile(from, from + kKeyNTiles);
      biasAndMask(tile, tileK0(i));
      std::copy(tile.begin(), tile.end(), from);
    }
    SoftmaxStep step =
        softmaxStep(s, ArrayRef<Value>(init).drop_front(oRegs));
    SmallVector<Value> operands;
    for (Value reg : packAccumulators(s))
      operands.push_back(asI32(reg));
    waitTile(zero, [&] { return barrierAt(one); });
    {
      Value windowEnd = m.add(window, m.c(slots * kBlockKeys));
      auto outside = scf::IfOp::create(
          b, loc, TypeRange{},
          m.either(m.lt(last, windowEnd), m.lt(window, first)), false);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(outside.thenBlock());
      for (int64_t i = 0; i < slots; ++i)
        zeroValueTail(tileK0(i), m.c(i));
      gpu::BarrierOp::create(b, loc);
    }
    operands = wgmmaFence(operands);
    ArrayRef<Value> p(operands);
    // O starts as the first tile's P . V (no zeros to add to).
    SmallVector<Value> o(ArrayRef<Value>(init).take_front(oRegs));
    for (int64_t i = 0; i < slots; ++i)
      o = issueValuesWgmma(o, p.slice(i * pRegs, pRegs), m.c(i),
                           /*fresh=*/i == 0);
    o = wgmmaCommitAndWait(o);
    o.append(step.stats);
    return o;
  };
  SmallVector<Value> finValues;
  if (ws) {
    finValues = overlappedLoop();
  } else if (resident) {
    finValues = residentStep();
  } else {
    // One step per key tile: wait for the tile; after the barrier every warp
    // is also done with the previous one, so the next tile can load into its
    // slot while this one computes (one barrier per tile). cp.async
    // zero-fills rows past the last key; TMA brings them as they are, so V's
    // are zeroed (only tiles that a later step waits for are loaded: none
    // may be in flight when the block exits).
    auto loop = scf::ForOp::create(b, loc, zero, numTiles, one, init);
    {
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(loop.getBody());
      Value it = loop.getInductionVar();
      ValueRange state = loop.getRegionIterArgs();
      Value k0 = m.add(first, m.mul(it, m.c(kBlockKeys)));
      Value slot = arith::RemUIOp::create(b, loc, it, m.c(slots));
      Value nextSlot = m.sub(one, slot);
      Value nextK0 = m.add(k0, m.c(kBlockKeys));
      auto copyStep = [&]() {
        nvgpu::DeviceAsyncWaitOp::create(b, loc, commitGroup(),
                                         b.getI32IntegerAttr(0));
        fenceForWgmma();
        gpu::BarrierOp::create(b, loc);
        loadKeyTile(nextK0, nextSlot);
        commitGroup();
      };
      if (tmaKeys) {
        auto byTma = scf::IfOp::create(b, loc, TypeRange{}, useTma,
                                       /*withElse=*/true);
        OpBuilder::InsertionGuard g2(b);
        b.setInsertionPointToStart(byTma.thenBlock());
        waitKeyTile(it, slot);
        zeroValueTail(k0, slot);
        gpu::BarrierOp::create(b, loc);
        auto more = scf::IfOp::create(b, loc, TypeRange{},
                                      m.lt(m.add(it, one), numTiles), false);
        b.setInsertionPointToStart(more.thenBlock());
        tmaLoadKeyTile(nextK0, nextSlot);
        b.setInsertionPointToStart(byTma.elseBlock());
        copyStep();
      } else {
        copyStep();
      }

      SmallVector<AccFrag> s;
      if (shape.wgmma) {
        inlinePtx({}, {}, "wgmma.fence.sync.aligned;", "");
        s = toFrags(wgmmaCommitAndWait(issueScoresWgmma(slot)));
      } else {
        s = scoresMmaSync(slot);
      }
      biasAndMask(s, k0);
      SoftmaxStep step = softmaxStep(s, state.drop_front(oFrags * 4));
      SmallVector<Value> o = rescaleAcc(state.take_front(oFrags * 4), step);
      SmallVector<Value> p = packAccumulators(s);
      SmallVector<Value> next;
      if (shape.wgmma) {
        SmallVector<Value> operands(o);
        for (Value reg : p)
          operands.push_back(asI32(reg));
        operands = wgmmaFence(operands);
        ArrayRef<Value> ops(operands);
        next = wgmmaCommitAndWait(issueValuesWgmma(
            ops.take_front(oFrags * 4), ops.drop_front(oFrags * 4), slot));
      } else {
        next = flatten(valuesMmaSync(toFrags(o), p, slot));
      }
      next.append(step.stats);
      scf::YieldOp::create(b, loc, next);
    }
    // Drain the (empty) prefetch group of the last iteration.
    nvgpu::DeviceAsyncWaitOp::create(b, loc, commitGroup(),
                                     b.getI32IntegerAttr(0));
    finValues.assign(loop.getResults().begin(),
                     loop.getResults().end());
  }
  // The earlier components' state of this block's rows (m', l', O'),
  // merged into the loop's (m, l, O) per row: both move to
  // M = max(m, m'), O = O 2^(m - M) + O' 2^(m' - M), likewise l (l' on the
  // quad leader only: the loop's l is summed over the quad at the end). An
  // empty state (max -inf) weighs nothing. The kernel is a programmatic
  // dependent launch of the one before (the runtime's "dependent_launch"):
  // everything above ran while that one finished, and griddepcontrol.wait
  // waits for its results here.
  auto mergeEarlierState = [&](ArrayRef<Value> own) {
    inlinePtx({}, {}, "griddepcontrol.wait;", "");
    SmallVector<Value> merged(own);
    Value zeroF = f.c(0.0);
    for (int64_t half = 0; half < 2; ++half) {
      StoredRow theirs = loadStoredRow(half);
      Value theirMax = theirs.max;
      Value ownMax = own[oFrags * 4 + half];
      Value top = f.max(ownMax, theirMax);
      auto weight = [&](Value mx) {
        return f.select(f.eq(mx, f.negInf()), zeroF, exp2(f.sub(mx, top)));
      };
      Value ownWeight = weight(ownMax), theirWeight = weight(theirMax);
      merged[oFrags * 4 + half] = top;
      merged[oFrags * 4 + 2 + half] =
          f.add(f.mul(own[oFrags * 4 + 2 + half], ownWeight),
                f.mul(theirs.leaderSum, theirWeight));
      for (int64_t dn = 0; dn < oFrags; ++dn) {
        SmallVector<Value> pair = loadStoredPair(theirs, dn);
        for (int64_t e = 0; e < 2; ++e) {
          int64_t i = dn * 4 + half * 2 + e;
          merged[i] =
              f.add(f.mul(own[i], ownWeight), f.mul(pair[e], theirWeight));
        }
      }
    }
    return merged;
  };
  if (mergesAfterLoop)
    finValues = mergeEarlierState(finValues);
  ValueRange fin = finValues;
  Value ln2 = f.c(M_LN2);
  // 16-bit rows (out, or a 16-bit state's O / sum) go through shared memory
  // (free once every warp has left the loop): each thread writes its
  // normalized pairs into rows of D + 8 elements (the 8 rows of a store then
  // fall in different banks), and each warp copies its 16 rows out in
  // 16-byte pieces, whole rows per store. An f32 state is stored directly.
  const bool staged = writesOut || shape.halfState;
  // With TMA the staged rows take Q's tile, in its swizzled panels (of
  // kBlockRows rows), and each 64-row part whose rows are all written
  // leaves by TMA stores through out's map (thread 0 issues them and waits
  // until they have read shared memory); the threads store the other parts
  // as before (rows past the group's end inside the tensor, or no map).
  const bool storeByTma = staged && tmaKeys;
  Value rowTile;
  if (storeByTma) {
    consumerBarrier();
    rowTile = sharedTile(dyn, zero, kBlockRows);
  } else if (staged) {
    consumerBarrier();
    auto workgroup =
        gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
    auto type = MemRefType::get({kBlockRows, D + 8}, f16,
                                MemRefLayoutAttrInterface{}, workgroup);
    rowTile = memref::ViewOp::create(b, loc, type, dyn,
                                     shape.wgmma ? tilesOffset : zero,
                                     ValueRange{});
  }
  // Rows written: out every existing row (those not computed, past
  // lengths[b], as 0 / -inf); `begin` every existing row (those it does not
  // compute hold the empty state, as init would have left them); `update`
  // only its own rows: those before writtenEnd.
  Value writtenEnd = writesOut || mode == StateMode::Begin ? tRowAll : q1;
  auto rowWritten = [&](Value t) { return m.lt(t, writtenEnd); };
  // Where staged element (row, 8 dn + e) sits in rowTile, e < 8.
  auto stagedAt = [&](Value row, Value dn, Value e) -> SmallVector<Value, 2> {
    if (storeByTma)
      return {m.add(swizzledOffset(row, dn, kBlockRows), e)};
    return {row, m.add(m.mul(dn, m.c(8)), e)};
  };
  // Whether the 64-row part `part` of the block's rows leaves by TMA.
  auto partByTma = [&](Value part) {
    Value end = m.add(q0, m.mul(m.add(part, one), m.c(64)));
    return m.both(useTmaQ, m.le(end, writtenEnd));
  };
  for (int64_t half = 0; half < 2; ++half) {
    Value t = tq[half];
    Value valid = m.lt(t, q1);
    Value mx = fin[oFrags * 4 + half];
    Value sum = quadReduce(fin[oFrags * 4 + 2 + half], /*isMax=*/false);
    Value rowIdx = m.add(qHead, qRowIndex(t));
    Value ok = m.both(valid, f.gt(sum, f.c(0.0)));
    if (staged) {
      Value inv = f.select(ok, arith::DivFOp::create(b, loc, f.c(1.0), sum),
                           f.c(0.0));
      auto pairType = VectorType::get({2}, f16);
      Value tileRow = m.add(warpRow, m.add(laneRow, m.c(half * 8)));
      for (int64_t dn = 0; dn < oFrags; ++dn) {
        Value x = f.mul(fin[dn * 4 + half * 2], inv);
        Value y = f.mul(fin[dn * 4 + half * 2 + 1], inv);
        Value pair = pack(x, y);
        if (shape.bf16)
          pair = LLVM::BitcastOp::create(b, loc, pairType, pair);
        vector::StoreOp::create(b, loc, pair, rowTile,
                                stagedAt(tileRow, m.c(dn), laneCol),
                                /*nontemporal=*/false, llvm::MaybeAlign(4));
      }
    } else {
      auto ifWritten =
          scf::IfOp::create(b, loc, TypeRange{}, rowWritten(t), false);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(ifWritten.thenBlock());
      for (int64_t dn = 0; dn < oFrags; ++dn) {
        Value at = m.add(m.mul(rowIdx, m.c(D)), m.add(laneCol, m.c(dn * 8)));
        storeStatePair(at, fin[dn * 4 + half * 2], fin[dn * 4 + half * 2 + 1]);
      }
    }
    // Per row: lse, or the state's max and sum.
    auto ifLeader = scf::IfOp::create(
        b, loc, TypeRange{}, m.both(rowWritten(t), isQuadLeader), false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(ifLeader.thenBlock());
    // (A state in out is the row's output so far: its lse goes with it,
    // since no finalize follows.)
    if (writesOut || shape.halfState) {
      Value lse = f.select(ok, f.mul(f.add(mx, log2(sum)), ln2), f.negInf());
      memref::StoreOp::create(b, loc, lse, arg(Lse), rowIdx);
    }
    if (!writesOut && !shape.halfState) {
      memref::StoreOp::create(b, loc, mx, arg(Max), rowIdx);
      memref::StoreOp::create(b, loc, sum, arg(Sum), rowIdx);
    }
  }
  if (staged) {
    // The warp's 16 rows, D/8 16-byte chunks each, 32 chunks per step.
    if (storeByTma)
      inlinePtx({}, {}, "fence.proxy.async.shared::cta;", "");
    consumerBarrier();
    OpBuilder::InsertionGuard guard(b);
    if (storeByTma) {
      auto leader = scf::IfOp::create(b, loc, TypeRange{}, m.eq(tid, zero),
                                      /*withElse=*/false);
      {
        OpBuilder::InsertionGuard g(b);
        b.setInsertionPointToStart(leader.thenBlock());
        for (int64_t part = 0; part < kBlockRows / 64; ++part) {
          auto whole = scf::IfOp::create(b, loc, TypeRange{},
                                         partByTma(m.c(part)), false);
          OpBuilder::InsertionGuard g2(b);
          b.setInsertionPointToStart(whole.thenBlock());
          tmaStoreTile(arg(OMap), m.c(part * 64 * 128),
                       queryBoxCoords(m.add(q0, m.c(64 * part))),
                       /*panelBytes=*/kBlockRows * 128);
        }
        inlinePtx({}, {}, "cp.async.bulk.commit_group;", "");
        inlinePtx({}, {}, "cp.async.bulk.wait_group.read 0;", "");
      }
      // The other parts: each warp stores its 16 rows itself.
      Value part = arith::DivUIOp::create(b, loc, warpRow, m.c(64));
      auto byThreads = scf::IfOp::create(b, loc, TypeRange{},
                                         m.negate(partByTma(part)), false);
      b.setInsertionPointToStart(byThreads.thenBlock());
    }
    const int64_t chunksPerRow = D / 8;
    auto chunkType = VectorType::get({8}, f16);
    Value dst = writesOut ? arg(Out) : stateAcc();
    for (int64_t i = 0; i < 16 * chunksPerRow / 32; ++i) {
      Value chunk = m.add(lane, m.c(32 * i));
      Value tileRow = m.add(
          warpRow, arith::DivUIOp::create(b, loc, chunk, m.c(chunksPerRow)));
      Value col = m.mul(
          arith::RemUIOp::create(b, loc, chunk, m.c(chunksPerRow)), m.c(8));
      Value t = m.add(q0, tileRow);
      auto ifWritten =
          scf::IfOp::create(b, loc, TypeRange{}, rowWritten(t), false);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(ifWritten.thenBlock());
      Value v = vector::LoadOp::create(
          b, loc, chunkType, rowTile,
          stagedAt(tileRow, arith::DivUIOp::create(b, loc, col, m.c(8)), zero),
          /*nontemporal=*/false, llvm::MaybeAlign(16));
      Value at = m.add(m.add(oBase, m.mul(qRowIndex(t), arg(OStrideR))), col);
      vector::StoreOp::create(b, loc, v, dst, at, /*nontemporal=*/false,
                              llvm::MaybeAlign(16));
    }
  }

  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  func->setAttr("attn.launch",
                b.getDictionaryAttr({
                    b.getNamedAttr("kind", b.getStringAttr(kindName(mode))),
                    b.getNamedAttr("block", b.getI64IntegerAttr(threads)),
                    b.getNamedAttr("block_rows",
                                   b.getI64IntegerAttr(kBlockRows)),
                    b.getNamedAttr("shared_bytes",
                                   b.getI64IntegerAttr(sharedBytes)),
                    b.getNamedAttr("component", comp),
                }));
  return func;
}

//===----------------------------------------------------------------------===//
// State init and finalize (element-wise over B*H*Lq*D)
//===----------------------------------------------------------------------===//

gpu::GPUFuncOp KernelEmitter::beginElementwise(StringRef name, Value &idx,
                                               Value &row) {
  auto func = beginKernel(name, kElementwiseThreads);
  const int64_t D = shape.headDim;
  Value bx = gpu::BlockIdOp::create(b, loc, gpu::Dimension::x);
  idx = m.mul(m.add(m.mul(bx, m.c(kElementwiseThreads)), tid),
              m.c(kElementwiseVector));
  // D is a multiple of the vector: a thread's elements share one row.
  Value n = m.mul(m.c(shape.batch * shape.heads * D), arg(QLen));
  auto ifIn = scf::IfOp::create(b, loc, TypeRange{}, m.lt(idx, n), false);
  b.setInsertionPointToStart(ifIn.thenBlock());
  row = arith::DivUIOp::create(b, loc, idx, m.c(D));
  return func;
}

void KernelEmitter::ifFirstOfRow(Value idx) {
  Value first =
      m.eq(arith::RemUIOp::create(b, loc, idx, m.c(shape.headDim)), m.c(0));
  auto ifRow = scf::IfOp::create(b, loc, TypeRange{}, first, false);
  b.setInsertionPointToStart(ifRow.thenBlock());
}

gpu::GPUFuncOp KernelEmitter::emitInit(StringRef name) {
  Value idx, row;
  auto func = beginElementwise(name, idx, row);
  Type accElem = shape.halfState ? f16 : f32;
  auto vecType = VectorType::get({kElementwiseVector}, accElem);
  Value zeros = arith::ConstantOp::create(
      b, loc, vecType, DenseElementsAttr::get(vecType, b.getZeroAttr(accElem)));
  // A 16-bit state is out's elements (out's strides); an f32 one is
  // contiguous.
  Value at = shape.halfState ? outElement(row, column(idx)) : idx;
  vector::StoreOp::create(
      b, loc, zeros, stateAcc(), at, /*nontemporal=*/false,
      llvm::MaybeAlign(accElem.getIntOrFloatBitWidth() / 8 * kElementwiseVector));
  ifFirstOfRow(idx);
  // A state in out is O / l with its lse (no max and sum: loadStoredRow),
  // and needs no finalize: a row no component reaches is done.
  if (shape.halfState) {
    memref::StoreOp::create(b, loc, f.negInf(), arg(Lse), row);
  } else {
    memref::StoreOp::create(b, loc, f.negInf(), arg(Max), row);
    memref::StoreOp::create(b, loc, f.c(0.0), arg(Sum), row);
  }
  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  func->setAttr("attn.launch", elementwiseLaunch("init"));
  return func;
}

gpu::GPUFuncOp KernelEmitter::emitFinalize(StringRef name) {
  // Only an f32 state (ring packages) is finalized: a 16-bit one lives in
  // out (stateAcc).
  assert(!shape.halfState && "a 16-bit state needs no finalize");
  Value idx, row;
  auto func = beginElementwise(name, idx, row);
  Value sum = memref::LoadOp::create(b, loc, arg(Sum), row);
  Value ok = f.gt(sum, f.c(0.0));
  auto outType = VectorType::get({kElementwiseVector}, f16);
  auto vecType = VectorType::get({kElementwiseVector}, f32);
  Value acc = vector::LoadOp::create(
      b, loc, vecType, arg(Acc), ValueRange{idx}, /*nontemporal=*/false,
      llvm::MaybeAlign(4 * kElementwiseVector));
  // Rows that saw no key are written as 0.
  Value inv = f.select(ok, arith::DivFOp::create(b, loc, f.c(1.0), sum),
                       f.c(0.0));
  Value o = arith::MulFOp::create(
      b, loc, acc, vector::BroadcastOp::create(b, loc, vecType, inv));
  Type elem = shape.bf16 ? Type(b.getBF16Type()) : f16;
  Value narrow = arith::TruncFOp::create(
      b, loc, VectorType::get({kElementwiseVector}, elem), o);
  if (shape.bf16)
    narrow = arith::BitcastOp::create(b, loc, outType, narrow);
  vector::StoreOp::create(b, loc, narrow, arg(Out), outElement(row, column(idx)),
                          /*nontemporal=*/false,
                          llvm::MaybeAlign(2 * kElementwiseVector));
  ifFirstOfRow(idx);
  Value mx = memref::LoadOp::create(b, loc, arg(Max), row);
  Value lse = f.select(ok, f.mul(f.add(mx, log2(sum)), f.c(M_LN2)), f.negInf());
  memref::StoreOp::create(b, loc, lse, arg(Lse), row);
  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  func->setAttr("attn.launch", elementwiseLaunch("finalize"));
  return func;
}

//===----------------------------------------------------------------------===//
// The backward pass (mma.sync on both targets)
//===----------------------------------------------------------------------===//
//
// Per component, two kernels recompute P = exp(s - lse) from the forward's
// lse (FlashAttention-2's backward, split so that no kernel needs atomics
// on dq, and both keep the forward's closed-form schedules):
//
//   grad_q  (query-major, the forward's blocks and key tiles), per warp of
//           16 rows and key tile of 64 keys:
//             S  = Q K^T,  P = exp2(S c - lse log2 e)  (masked S: -inf)
//             dP = dO V^T,  dS = P (dP - delta)
//             dQ += dS K                 -> dq += scale dQ (the block's rows)
//   grad_kv (key-major: a block takes 64 keys of a group and walks the
//           query tiles that attend them), per warp of 16 keys:
//             S^T = K Q^T,  P^T = exp2(S^T c - lse log2 e)
//             dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta)
//             dK += dS^T Q               -> dk += scale dK, dv += dV
//
// grad_kv blocks of the q heads that share a kv head (GQA) add into the
// same dk and dv rows: those adds are atomic. The products reuse the
// forward's fragment layouts: X Y^T takes X's rows as the A operand
// (ldmatrix) and Y's as B (ldmatrix), and P-like accumulators re-packed in
// registers are the A operand of the next product, whose B tile is read
// transposed (ldmatrix.trans). Tiles are padded rows of D + 8 elements.

SmallVector<AccFrag> KernelEmitter::rowsTimesTileT(Value aOffset,
                                                   Value bOffset) {
  const int64_t D = shape.headDim;
  if (shape.wgmma) {
    // The forward's S = Q K^T (emitComponent's issueScoresWgmma): both
    // operands K-major from shared memory, k step kk 32 bytes into panel
    // kk / 4 of 64 rows x 128 bytes.
    const int64_t panelBytes = kBlockKeys * 128;
    Value aDesc = tileDescriptor(aOffset, 16, 1024);
    Value bDesc = tileDescriptor(bOffset, 16, 1024);
    SmallVector<Value> acc(kKeyNTiles * 4, f.c(0.0));
    wgmmaFence({});
    for (int64_t kk = 0; kk < D / 16; ++kk) {
      int64_t at = (kk / 4) * panelBytes + (kk % 4) * 32;
      acc = wgmma(acc, advance(aDesc, at), advance(bDesc, at),
                  /*transposeB=*/false, /*accumulate=*/kk > 0);
    }
    acc = wgmmaCommitAndWait(acc);
    SmallVector<AccFrag> c(kKeyNTiles);
    for (auto [i, v] : llvm::enumerate(acc))
      c[i / 4][i % 4] = v;
    return c;
  }
  Value aTile = sharedTile(gradShared, aOffset, kBlockKeys);
  Value bTile = sharedTile(gradShared, bOffset, kBlockKeys);
  Value warpRow = m.mul(warp, m.c(16));
  Value aRow = m.add(warpRow, arith::RemUIOp::create(b, loc, lane, m.c(16)));
  Value aCol = m.mul(arith::DivUIOp::create(b, loc, lane, m.c(16)), m.c(8));
  SmallVector<std::array<Value, 4>> aFrag;
  for (int64_t kk = 0; kk < D / 16; ++kk)
    aFrag.push_back(ldmatrix(aTile, aRow, m.add(aCol, m.c(kk * 16)), false));
  return fragsTimesTileT(aFrag, bTile);
}

SmallVector<AccFrag>
KernelEmitter::fragsTimesTileT(ArrayRef<std::array<Value, 4>> aFrag,
                               Value bTile) {
  Value rowOff = arith::RemUIOp::create(b, loc, lane, m.c(8));
  Value colOff = m.mul(arith::DivUIOp::create(b, loc, lane, m.c(8)), m.c(8));
  SmallVector<AccFrag> c(kKeyNTiles);
  for (int64_t n = 0; n < kKeyNTiles; ++n) {
    AccFrag acc = {f.c(0.0), f.c(0.0), f.c(0.0), f.c(0.0)};
    for (int64_t kk = 0; kk < shape.headDim / 16; kk += 2) {
      auto bb = ldmatrix(bTile, m.add(rowOff, m.c(n * 8)),
                         m.add(colOff, m.c(kk * 16)), false);
      acc = mma(aFrag[kk], {bb[0], bb[1]}, acc);
      acc = mma(aFrag[kk + 1], {bb[2], bb[3]}, acc);
    }
    c[n] = acc;
  }
  return c;
}

SmallVector<Value> KernelEmitter::packAccumulators(ArrayRef<AccFrag> p) {
  SmallVector<Value> packed;
  for (int64_t j = 0; j < int64_t(p.size()) / 2; ++j)
    packed.append({pack(p[2 * j][0], p[2 * j][1]),
                   pack(p[2 * j][2], p[2 * j][3]),
                   pack(p[2 * j + 1][0], p[2 * j + 1][1]),
                   pack(p[2 * j + 1][2], p[2 * j + 1][3])});
  return packed;
}

SmallVector<Value> KernelEmitter::addPackedTimesTile(ValueRange acc,
                                                     ArrayRef<Value> a,
                                                     Value offset) {
  const int64_t frags = shape.headDim / 8;
  if (shape.wgmma) {
    // The forward's O += P V (issueValuesWgmma): A from registers, B =
    // [64 x D] MN-major, 64-column panels 8192 bytes apart, k step j 16
    // rows (2048 bytes) on. The fence orders the registers' last writes
    // before the wgmmas read them.
    SmallVector<Value> fenced(acc);
    fenced.append(a.begin(), a.end());
    fenced = wgmmaFence(fenced);
    SmallVector<Value> o(ArrayRef<Value>(fenced).take_front(acc.size()));
    ArrayRef<Value> packed = ArrayRef<Value>(fenced).drop_front(acc.size());
    Value desc = tileDescriptor(offset, kBlockKeys * 128, 1024);
    for (int64_t j = 0; j < kKeyNTiles / 2; ++j)
      o = wgmma(o, packed.slice(j * 4, 4), advance(desc, j * 2048),
                /*transposeB=*/true, /*accumulate=*/true);
    return wgmmaCommitAndWait(o);
  }
  SmallVector<AccFrag> o(frags);
  for (int64_t i = 0; i < frags * 4; ++i)
    o[i / 4][i % 4] = acc[i];
  o = addPackedTimesTileMmaSync(std::move(o), a,
                                sharedTile(gradShared, offset, kBlockKeys));
  SmallVector<Value> flat;
  for (const AccFrag &frag : o)
    flat.append(frag.begin(), frag.end());
  return flat;
}

SmallVector<AccFrag>
KernelEmitter::addPackedTimesTileMmaSync(SmallVector<AccFrag> o,
                                         ArrayRef<Value> a, Value tile) {
  Value rowOff = m.add(arith::RemUIOp::create(b, loc, lane, m.c(8)),
                       m.mul(arith::RemUIOp::create(
                                 b, loc,
                                 arith::DivUIOp::create(b, loc, lane, m.c(8)),
                                 m.c(2)),
                             m.c(8)));
  Value colOff = m.mul(arith::DivUIOp::create(b, loc, lane, m.c(16)), m.c(8));
  for (int64_t dn = 0; dn < int64_t(o.size()); dn += 2)
    for (int64_t j = 0; j < kKeyNTiles / 2; ++j) {
      auto tb = ldmatrix(tile, m.add(rowOff, m.c(j * 16)),
                         m.add(colOff, m.c(dn * 8)), true);
      ArrayRef<Value> aj = a.slice(j * 4, 4);
      o[dn] = mma({aj[0], aj[1], aj[2], aj[3]}, {tb[0], tb[1]}, o[dn]);
      o[dn + 1] = mma({aj[0], aj[1], aj[2], aj[3]}, {tb[2], tb[3]}, o[dn + 1]);
    }
  return o;
}

gpu::GPUFuncOp KernelEmitter::emitGradPrepare(StringRef name) {
  auto func = beginKernel(name, kElementwiseThreads, /*grad=*/true);
  const int64_t D = shape.headDim;
  // A row's D elements are read by D / 8 neighbouring lanes, 16 bytes each
  // (a warp reads two rows of D = 128 as two runs of 256 bytes), and the
  // lanes' partial dot products are summed with shuffles. One thread a row,
  // reading it alone 16 bytes at a time, took 259 µs at L = 32768 (16 heads
  // of 128), six times the bytes' DRAM time.
  const int32_t lanesPerRow = D / kElementwiseVector; // 8 or 16: divides 32
  Value bx = gpu::BlockIdOp::create(b, loc, gpu::Dimension::x);
  Value chunk = m.add(m.mul(bx, m.c(kElementwiseThreads)), tid);
  Value row = arith::DivUIOp::create(b, loc, chunk, m.c(lanesPerRow));
  Value part = arith::RemUIOp::create(b, loc, chunk, m.c(lanesPerRow));
  Value col = m.mul(part, m.c(kElementwiseVector));
  Value rows = m.mul(m.c(shape.batch * shape.heads), arg(QLen));
  Value inside = m.lt(row, rows);
  // out through its strides, grad_out through q's (Package::runBackward
  // checks that it has them); delta is contiguous.
  auto chunkType = VectorType::get({kElementwiseVector}, f16);
  auto wideType = VectorType::get({kElementwiseVector}, f32);
  auto widen = [&](Value x) {
    if (shape.bf16)
      x = arith::BitcastOp::create(
          b, loc, VectorType::get({kElementwiseVector}, b.getBF16Type()), x);
    return arith::ExtFOp::create(b, loc, wideType, x).getResult();
  };
  // Lanes past the last row load nothing but still join the shuffles.
  auto ifInside = scf::IfOp::create(b, loc, TypeRange{f32}, inside,
                                    /*withElseRegion=*/true);
  {
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(ifInside.thenBlock());
    Value o = widen(vector::LoadOp::create(b, loc, chunkType, arg(Out),
                                           ValueRange{outElement(row, col)},
                                           false, llvm::MaybeAlign(16)));
    Value gradAt = rowElement(row, col, QStrideB, QStrideH, QStrideR);
    Value g = widen(vector::LoadOp::create(b, loc, chunkType, arg(GradOut),
                                           ValueRange{gradAt}, false,
                                           llvm::MaybeAlign(16)));
    Value dot = vector::ReductionOp::create(
        b, loc, vector::CombiningKind::ADD,
        arith::MulFOp::create(b, loc, o, g));
    scf::YieldOp::create(b, loc, dot);
    b.setInsertionPointToStart(ifInside.elseBlock());
    scf::YieldOp::create(b, loc, f.c(0.0));
  }
  Value sum = laneReduce(ifInside.getResult(0), /*isMax=*/false, lanesPerRow);
  auto ifFirst = scf::IfOp::create(
      b, loc, TypeRange{}, m.both(inside, m.eq(part, m.c(0))), false);
  b.setInsertionPointToStart(ifFirst.thenBlock());
  memref::StoreOp::create(b, loc, sum, arg(Delta), row);
  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  // One 16-byte chunk a thread: the runtime's element-wise grid over
  // rows * D elements at kElementwiseVector elements a thread.
  func->setAttr("attn.launch", elementwiseLaunch("grad_prepare"));
  return func;
}

gpu::GPUFuncOp KernelEmitter::emitGradAdd(StringRef name) {
  auto func = beginKernel(name, kElementwiseThreads, /*grad=*/true);
  constexpr int64_t kFloats = 4; // one 16-byte vector a thread
  // Vector `at` / 4 of the planes x rows x D index space: element d of row
  // i of plane p, with p < QLen, i < KLen (docs/Ring.md, "The backward
  // pass": a plane is a (batch, kv head) slab or a batch; the rows are a run
  // of the slab's rows, contiguous or `pitch` apart).
  Value bx = gpu::BlockIdOp::create(b, loc, gpu::Dimension::x);
  Value at = m.mul(m.add(m.mul(bx, m.c(kElementwiseThreads)), tid),
                   m.c(kFloats));
  Value rows = arg(KLen);
  Value n = m.mul(m.mul(arg(QLen), rows), m.c(shape.headDim));
  auto ifIn = scf::IfOp::create(b, loc, TypeRange{}, m.lt(at, n), false);
  b.setInsertionPointToStart(ifIn.thenBlock());
  Value d = arith::RemUIOp::create(b, loc, at, m.c(shape.headDim));
  Value row = arith::DivUIOp::create(b, loc, at, m.c(shape.headDim));
  Value i = arith::RemUIOp::create(b, loc, row, rows);
  Value plane = arith::DivUIOp::create(b, loc, row, rows);
  // dk's element (p, i, d) at p * DKStrideH + i * DKStrideR + d, and dq's
  // (the rows added in) likewise with its strides.
  auto element = [&](GradArg planeStride, GradArg rowStride) {
    return m.add(
        m.add(m.mul(plane, arg(planeStride)), m.mul(i, arg(rowStride))), d);
  };
  Value dst = element(DKStrideH, DKStrideR),
        src = element(DQStrideH, DQStrideR);
  auto vecType = VectorType::get({kFloats}, f32);
  auto load = [&](Value buffer, Value index) {
    return vector::LoadOp::create(b, loc, vecType, buffer, ValueRange{index},
                                  false, llvm::MaybeAlign(16))
        .getResult();
  };
  Value sum =
      arith::AddFOp::create(b, loc, load(arg(DK), dst), load(arg(DQ), src));
  vector::StoreOp::create(b, loc, sum, arg(DK), ValueRange{dst}, false,
                          llvm::MaybeAlign(16));
  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  // The runtime's element-wise grid over q_len * kv_len * D elements.
  func->setAttr("attn.launch", elementwiseLaunch("grad_add", kFloats));
  return func;
}

/// What both backward kernels of a component share: the group, the four
/// shared tiles, row and key addresses, and the scores' key bias and mask.
struct KernelEmitter::GradContext {
  ComponentAttr comp;
  GroupItem g;
  /// Element offsets of the block's (batch, head) in q and grad_out (which
  /// shares q's strides: a walked tile's Q and dO rows share one offset)
  /// and in k and v; qHead is its first row of the contiguous lse, delta
  /// and dq.
  Value qHead, qBase, kBase;
  /// The block's own shared tiles of 64 rows (Q and dO, or K and V); the
  /// walked ones are walkedTile's two slots after them.
  Value tiles[2];
};

/// GQA packages store gradients, their grad_kv blocks walking every q head
/// of a kv head, where a key's rows span a band with hi - lo below this
/// (in gathered rows): local windows, not causal or full attention.
static constexpr int64_t kGqaWalkRows = 4096;

/// Shared memory of a backward kernel: its own two tiles, then two slots of
/// two walked tiles.
static constexpr int64_t kGradTiles = 6;

KernelEmitter::GradContext KernelEmitter::beginGradKernel(StringRef name,
                                                          ComponentAttr comp,
                                                          Value &bx,
                                                          bool keySegments) {
  GradContext cx;
  cx.comp = comp;
  beginKernel(name, shape.threads(), /*grad=*/true);
  bx = gpu::BlockIdOp::create(b, loc, gpu::Dimension::x);
  cx.g = placeGroup(comp, gpu::BlockIdOp::create(b, loc, gpu::Dimension::y),
                    m.add(arg(BhOffset),
                          gpu::BlockIdOp::create(b, loc, gpu::Dimension::z)),
                    keySegments);
  const GroupItem &g = cx.g;
  cx.qHead = m.mul(m.add(m.mul(g.bIdx, m.c(shape.heads)), g.h), arg(QLen));
  cx.qBase = m.add(m.mul(g.bIdx, arg(QStrideB)), m.mul(g.h, arg(QStrideH)));
  cx.kBase = m.add(m.mul(g.bIdx, arg(KStrideB)), m.mul(g.hk, arg(KStrideH)));
  auto workgroup =
      gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
  Value dyn = gpu::DynamicSharedMemoryOp::create(
      b, loc,
      MemRefType::get({ShapedType::kDynamic}, b.getI8Type(),
                      MemRefLayoutAttrInterface{}, workgroup));
  gradShared = dyn;
  if (shape.wgmma)
    alignTiles(dyn);
  for (int64_t i = 0; i < 2; ++i)
    cx.tiles[i] = m.c(i * shape.kvTileBytes());
  return cx;
}

Value KernelEmitter::walkedTile(Value slot, int64_t which) {
  Value tileIndex = m.add(m.c(2 + which), m.mul(slot, m.c(2)));
  return m.mul(tileIndex, m.c(shape.kvTileBytes()));
}

void KernelEmitter::commitAsyncGroup() {
  nvgpu::DeviceAsyncCreateGroupOp::create(
      b, loc, nvgpu::DeviceAsyncTokenType::get(ctx), ValueRange{});
}

Value KernelEmitter::sharedAddress32(Value byteOffset) {
  Value at = arith::IndexCastUIOp::create(b, loc, b.getI64Type(), byteOffset);
  return arith::TruncIOp::create(
      b, loc, b.getI32Type(), arith::AddIOp::create(b, loc, tilesAddress, at));
}

void KernelEmitter::tmaExpectBytes(Value bar, int64_t bytes) {
  Value count = arith::ConstantIntOp::create(b, loc, b.getI32Type(), bytes);
  inlinePtx({}, {bar, count},
            "{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 "
            "st, [$0], $1; }",
            "r,r");
}

void KernelEmitter::tmaExpectMoreBytes(Value bar, int64_t bytes) {
  Value count = arith::ConstantIntOp::create(b, loc, b.getI32Type(), bytes);
  inlinePtx({}, {bar, count},
            "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;", "r,r");
}

/// The operands of a TMA box after its map: "{$first, ...}" for the column
/// and `coords` more coordinates.
static std::string boxOperands(size_t first, size_t coords) {
  std::string text = "{$" + std::to_string(first);
  for (size_t i = 1; i <= coords; ++i)
    text += ", $" + std::to_string(first + i);
  return text + "}";
}

void KernelEmitter::forEachTilePanel(
    Value tileOffset, int64_t panelBytes,
    function_ref<void(Value shared, Value column)> issue) {
  for (int64_t panel = 0; panel < shape.headDim / 64; ++panel)
    issue(sharedAddress32(m.add(tileOffset, m.c(panel * panelBytes))),
          arith::ConstantIntOp::create(b, loc, b.getI32Type(), panel * 64));
}

void KernelEmitter::tmaLoadTile(Value map, Value tileOffset,
                                ArrayRef<Value> coords, Value bar,
                                int64_t panelBytes) {
  std::string text = "cp.async.bulk.tensor." +
                     std::to_string(coords.size() + 1) +
                     "d.shared::cluster.global.tile.mbarrier::complete_tx::"
                     "bytes [$0], [$1, " +
                     boxOperands(2, coords.size()) + "], [$" +
                     std::to_string(coords.size() + 3) + "];";
  std::string constraints = "r,l,r";
  for (size_t i = 0; i <= coords.size(); ++i)
    constraints += ",r";
  forEachTilePanel(tileOffset, panelBytes ? panelBytes : kBlockKeys * 128,
                   [&](Value dst, Value col) {
    SmallVector<Value> operands{dst, map, col};
    operands.append(coords.begin(), coords.end());
    operands.push_back(bar);
    inlinePtx({}, operands, text, constraints);
  });
}

void KernelEmitter::tmaStoreTile(Value map, Value tileOffset,
                                 ArrayRef<Value> coords, int64_t panelBytes) {
  std::string text = "cp.async.bulk.tensor." +
                     std::to_string(coords.size() + 1) +
                     "d.global.shared::cta.bulk_group [$0, " +
                     boxOperands(1, coords.size()) + "], [$" +
                     std::to_string(coords.size() + 2) + "];";
  std::string constraints = "l,r";
  for (size_t i = 0; i <= coords.size(); ++i)
    constraints += ",r";
  forEachTilePanel(tileOffset, panelBytes, [&](Value src, Value col) {
    SmallVector<Value> operands{map, col};
    operands.append(coords.begin(), coords.end());
    operands.push_back(src);
    inlinePtx({}, operands, text, constraints);
  });
}

void KernelEmitter::waitBarrierParity(Value bar, Value parity) {
  Type i32 = b.getI32Type();
  auto spin = scf::WhileOp::create(b, loc, TypeRange{}, ValueRange{});
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(b.createBlock(&spin.getBefore()));
  Value done = inlinePtx({i32}, {bar, parity},
                         "{ .reg .pred p; mbarrier.try_wait.parity."
                         "shared::cta.b64 p, [$1], $2; selp.u32 $0, 1, 0, "
                         "p; }",
                         "=r,r,r")[0];
  Value zero32 = arith::ConstantIntOp::create(b, loc, i32, 0);
  scf::ConditionOp::create(
      b, loc,
      arith::CmpIOp::create(b, loc, arith::CmpIPredicate::eq, done, zero32),
      ValueRange{});
  b.setInsertionPointToStart(b.createBlock(&spin.getAfter()));
  scf::YieldOp::create(b, loc);
}

void KernelEmitter::zeroTileRows(Value tile,
                                 function_ref<Value(Value)> zeroed) {
  const int64_t chunksPerRow = shape.headDim / 8;
  auto zeros = arith::ConstantOp::create(
      b, loc,
      DenseElementsAttr::get(VectorType::get({8}, f16), b.getZeroAttr(f16)));
  const int64_t chunks = kBlockKeys * chunksPerRow;
  for (int64_t pass = 0; pass * shape.threads() < chunks; ++pass) {
    Value idx = m.add(tid, m.c(pass * shape.threads()));
    Value row = arith::DivUIOp::create(b, loc, idx, m.c(chunksPerRow));
    Value chunk = arith::RemUIOp::create(b, loc, idx, m.c(chunksPerRow));
    Value inRows = zeroed(row);
    // (A last pass that only some threads fill when the threads do not
    // divide the chunks: rows past the tile are not in it.)
    if ((pass + 1) * shape.threads() > chunks)
      inRows = m.both(inRows, m.lt(row, m.c(kBlockKeys)));
    auto ifRow = scf::IfOp::create(b, loc, TypeRange{}, inRows, false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(ifRow.thenBlock());
    vector::StoreOp::create(b, loc, zeros, tile,
                            swizzledOffset(row, chunk, kBlockKeys));
  }
}

void KernelEmitter::zeroTileRowsFrom(Value tileOffset, Value firstRow) {
  auto edge =
      scf::IfOp::create(b, loc, TypeRange{}, m.lt(firstRow, m.c(kBlockKeys)),
                        /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(edge.thenBlock());
  zeroTileRows(sharedTile(gradShared, tileOffset, kBlockKeys),
               [&](Value row) { return m.le(firstRow, row); });
}

Value KernelEmitter::walkBarrier(Value slot) {
  return sharedAddress32(m.add(walkBarriers, m.mul(slot, m.c(8))));
}

void KernelEmitter::tmaLoadWalkedTiles(Value slot, Value base, Value origin,
                                       Value t0, int64_t period, Value head,
                                       Value batch) {
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, m.eq(tid, m.c(0)),
                                  /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(leader.thenBlock());
  Value bar = walkBarrier(slot);
  tmaExpectBytes(bar, 2 * shape.kvTileBytes());
  // Row base + r t - origin = r (planeRow0 + t) + plane.
  Value rel = m.sub(base, origin);
  SmallVector<Value> rowCoords{m.add(rel, t0)};
  if (period > 1) {
    Value planeRow0 = m.floorDiv(rel, m.c(period));
    rowCoords = {m.sub(rel, m.mul(planeRow0, m.c(period))),
                 m.add(planeRow0, t0)};
  }
  SmallVector<Value> coords;
  for (Value c : rowCoords)
    coords.push_back(arith::IndexCastOp::create(b, loc, b.getI32Type(), c));
  for (Value c : {head, batch})
    coords.push_back(arith::IndexCastOp::create(b, loc, b.getI32Type(), c));
  tmaLoadTile(arg(WalkMap0), walkedTile(slot, 0), coords, bar);
  tmaLoadTile(arg(WalkMap1), walkedTile(slot, 1), coords, bar);
}

void KernelEmitter::walkedLoad(function_ref<void()> byTma,
                               function_ref<void()> byCopies) {
  if (!walkBarriers)
    return byCopies();
  if (!walkUsesTma)
    return byTma();
  ifElse(walkUsesTma, byTma, byCopies);
}

void KernelEmitter::zeroWalkedTails(Value slot, Value firstRow) {
  zeroTileRowsFrom(walkedTile(slot, 0), firstRow);
  zeroTileRowsFrom(walkedTile(slot, 1), firstRow);
}

void KernelEmitter::beginTmaWalk(int64_t barrierOffset, int64_t period,
                                 Value rows) {
  walkBarriers = m.c(barrierOffset);
  walkUsesTma = Value();
  if (period > 1)
    walkUsesTma =
        m.eq(arith::RemUIOp::create(b, loc, rows, m.c(period)), m.c(0));
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, m.eq(tid, m.c(0)),
                                  /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(leader.thenBlock());
  for (int64_t slot = 0; slot < 2; ++slot)
    inlinePtx({}, {walkBarrier(m.c(slot))},
              "mbarrier.init.shared::cta.b64 [$0], 1;", "r");
  inlinePtx({}, {}, "fence.mbarrier_init.release.cluster;", "");
  // (walkTiles' first barrier comes before any wait on them.)
}

scf::ForOp KernelEmitter::walkTiles(
    Value numTiles, ValueRange init, function_ref<void(Value, Value)> load,
    function_ref<SmallVector<Value>(Value, Value, ValueRange)> compute,
    function_ref<void(Value, Value)> arrived) {
  Value zero = m.c(0), one = m.c(1);
  // Every thread sees the initialised mbarriers before the first TMA load.
  if (walkBarriers)
    gpu::BarrierOp::create(b, loc);
  // Tile 0 (zero-filled where there is none) joins the caller's copies.
  // (A TMA load must not outlive its block: none where the loop is empty.)
  if (walkBarriers) {
    auto any = scf::IfOp::create(b, loc, TypeRange{}, m.lt(zero, numTiles),
                                 /*withElse=*/false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(any.thenBlock());
    load(zero, zero);
  } else {
    load(zero, zero);
  }
  commitAsyncGroup();
  auto loop = scf::ForOp::create(b, loc, zero, numTiles, one, init);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(loop.getBody());
  Value i = loop.getInductionVar();
  Value slot = arith::RemUIOp::create(b, loc, i, m.c(2));
  Value next = m.add(i, one);
  // Every warp is done with tile i - 1, whose slot tile i + 1 takes.
  gpu::BarrierOp::create(b, loc);
  auto ifNext = scf::IfOp::create(b, loc, TypeRange{}, m.lt(next, numTiles),
                                  /*withElse=*/false);
  {
    OpBuilder::InsertionGuard g2(b);
    b.setInsertionPointToStart(ifNext.thenBlock());
    load(next, m.sub(one, slot));
  }
  // One group an iteration (empty on the last): waiting for all but the
  // newest leaves tile i's copies done, then the barrier makes every
  // thread's visible.
  Value token = nvgpu::DeviceAsyncCreateGroupOp::create(
      b, loc, nvgpu::DeviceAsyncTokenType::get(ctx), ValueRange{});
  nvgpu::DeviceAsyncWaitOp::create(b, loc, token, b.getI32IntegerAttr(1));
  // A slot's mbarrier completes one phase per tile through it.
  if (walkBarriers) {
    OpBuilder::InsertionGuard g2(b);
    if (walkUsesTma) {
      auto ifTma = scf::IfOp::create(b, loc, TypeRange{}, walkUsesTma,
                                     /*withElse=*/false);
      b.setInsertionPointToStart(ifTma.thenBlock());
    }
    Value parity = arith::IndexCastOp::create(
        b, loc, b.getI32Type(),
        arith::RemUIOp::create(
            b, loc, arith::DivUIOp::create(b, loc, i, m.c(2)), m.c(2)));
    waitBarrierParity(walkBarrier(slot), parity);
    if (arrived)
      arrived(i, slot);
  }
  // wgmma reads shared memory through the async proxy: this thread's
  // copies (and zeros) become visible to it before the barrier.
  if (shape.wgmma)
    inlinePtx({}, {}, "fence.proxy.async.shared::cta;", "");
  gpu::BarrierOp::create(b, loc);
  scf::YieldOp::create(b, loc, compute(i, slot, loop.getRegionIterArgs()));
  return loop;
}

Value KernelEmitter::gradQueryRow(const GradContext &cx, Value t) {
  return m.sub(groupPosition(cx.comp, cx.g, t), arg(QOrigin));
}
Value KernelEmitter::gradKeyRow(const GradContext &cx, Value t) {
  return m.sub(groupPosition(cx.comp, cx.g, t), arg(KOrigin));
}

void KernelEmitter::loadGradRows(const GradContext &cx, Value tile, Value t0,
                                 Value end, bool keys, Value src) {
  Value zero = m.c(0);
  asyncLoadTile(sharedTile(gradShared, tile, kBlockKeys), kBlockKeys, src,
                [&](Value row) -> std::pair<Value, Value> {
    Value t = m.add(t0, row);
    Value exists = m.lt(t, end);
    Value at;
    if (keys)
      at = m.add(cx.kBase, m.mul(gradKeyRow(cx, t), arg(KStrideR)));
    else // q, and grad_out through q's strides
      at = m.add(cx.qBase, m.mul(gradQueryRow(cx, t), arg(QStrideR)));
    return {f.select(exists, at, zero), exists};
  });
}

Value KernelEmitter::keyBiasOver(const GradContext &cx, Value tk, Value end) {
  Value j = gradKeyRow(cx, tk);
  Value at = f.select(m.lt(tk, end), m.add(m.mul(cx.g.bIdx, arg(KLen)), j),
                      m.c(0));
  Value bias = memref::LoadOp::create(b, loc, arg(KeyBias), at);
  return f.mul(bias, f.c(1.0 / shape.scale));
}

SmallVector<AccFrag> KernelEmitter::maskScores(
    const GradContext &cx, SmallVector<AccFrag> s, Value masked,
    function_ref<Value(int64_t n, int64_t e)> inside) {
  SmallVector<Type> types(s.size() * 4, f32);
  auto maskIf = scf::IfOp::create(b, loc, types, masked, /*withElse=*/true);
  SmallVector<Value> flat;
  for (const AccFrag &frag : s)
    flat.append(frag.begin(), frag.end());
  {
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(maskIf.thenBlock());
    SmallVector<Value> out;
    for (int64_t n = 0; n < int64_t(s.size()); ++n)
      for (int64_t e = 0; e < 4; ++e)
        out.push_back(f.select(inside(n, e), s[n][e], f.negInf()));
    scf::YieldOp::create(b, loc, out);
    b.setInsertionPointToStart(maskIf.elseBlock());
    scf::YieldOp::create(b, loc, flat);
  }
  for (auto [i, v] : llvm::enumerate(maskIf.getResults()))
    s[i / 4][i % 4] = v;
  return s;
}

void KernelEmitter::enterIfWork(const GroupItem &g, Value hasWork) {
  if (g.headHasClass)
    hasWork = m.both(hasWork, g.headHasClass);
  auto inRange = scf::IfOp::create(b, loc, TypeRange{}, hasWork, false);
  b.setInsertionPointToStart(inRange.thenBlock());
}

/// -lse * log2(e) of a row, or -inf for a row that computes nothing (not
/// valid, or an lse of -inf: no key): its P is then 0.
Value KernelEmitter::negLse2(Value valid, Value row) {
  Value lse = memref::LoadOp::create(b, loc, arg(Lse), row);
  Value ok = m.both(valid, f.gt(lse, f.negInf()));
  return f.select(ok, f.mul(lse, f.c(-M_LOG2E)), f.negInf());
}

gpu::GPUFuncOp KernelEmitter::emitGradQueries(StringRef name,
                                              ComponentAttr comp) {
  const int64_t D = shape.headDim, frags = D / 8;
  const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
  const int64_t lo = comp.getBandLo(), hi = comp.getBandHi();
  // K and V tiles by TMA (sm_90a; gathered keys where their period
  // divides the key rows): two mbarriers after the tiles.
  const bool tmaWalk = shape.tma;
  const int64_t barriersOffset = kGradTiles * shape.kvTileBytes();
  const int64_t sharedBytes =
      barriersOffset + (tmaWalk ? 16 : 0) + (shape.wgmma ? 1024 : 0);
  Value bx;
  GradContext cx = beginGradKernel(name, comp, bx);
  auto func = cast<gpu::GPUFuncOp>(entry->getParentOp());
  const GroupItem &g = cx.g;
  Value zero = m.c(0), one = m.c(1);
  walkBarriers = Value();
  if (tmaWalk)
    beginTmaWalk(barriersOffset, comp.getPeriod(), arg(KLen));
  Value nbx = gpu::GridDimOp::create(b, loc, gpu::Dimension::x);
  Value q0 = m.add(g.tRowLo, m.mul(m.sub(m.sub(nbx, one), bx),
                                   m.c(kBlockKeys)));
  Value hasWork = m.lt(q0, g.tRowHi);
  // A component that writes every row once (its float32 stores, and the
  // stored gradients where the package has them) writes each row that
  // exists, zeros where it computes nothing (a finishing one: the earlier
  // components' sums), so blocks without work run too (no key tiles).
  const bool everyBlock = writesOnce || finishing;
  Value store = storeGrads || finishing ? m.ne(arg(GradStore), zero) : Value();
  enterIfWork(g, everyBlock ? m.truth(true) : hasWork);

  // The forward's key range of rows [q0, q1) (emitComponent's itemRange).
  Value q1 = m.min(m.add(q0, m.c(kBlockKeys)), g.tRowHi);
  Value first = hi == inf ? g.tKeyLo : m.max(g.tKeyLo, m.sub(q0, m.c(hi)));
  Value last = lo == ninf ? g.tKeyHi : m.min(g.tKeyHi, m.sub(q1, m.c(lo)));
  if (Value end = excludedKeysFrom(comp, g, m.sub(q1, one)))
    last = m.min(last, end);
  last = m.max(last, first);
  Value fullLo =
      hi == inf ? first : m.max(first, m.sub(m.sub(q1, one), m.c(hi)));
  Value fullHi = lo == ninf ? last : m.min(last, m.add(m.sub(q0, m.c(lo)), one));
  // Every row attends keys before the first row's excluded segment.
  if (Value end = excludedKeysFrom(comp, g, q0))
    fullHi = m.min(fullHi, end);
  Value numTiles = m.ceilDiv(m.sub(last, first), m.c(kBlockKeys));
  if (everyBlock)
    numTiles = f.select(hasWork, numTiles, zero);

  Value qTile = cx.tiles[0], doTile = cx.tiles[1];
  loadGradRows(cx, qTile, q0, q1, /*keys=*/false, arg(Q));
  loadGradRows(cx, doTile, q0, q1, /*keys=*/false, arg(GradOut));

  Value laneRow = arith::DivUIOp::create(b, loc, lane, m.c(4));
  Value laneCol = m.mul(arith::RemUIOp::create(b, loc, lane, m.c(4)), m.c(2));
  Value warpRow = m.mul(warp, m.c(16));
  Value tq[2], valid[2], rowAt[2], negLse[2], delta[2];
  for (int64_t half = 0; half < 2; ++half) {
    tq[half] = m.add(q0, m.add(warpRow, m.add(laneRow, m.c(8 * half))));
    valid[half] = m.lt(tq[half], q1);
    rowAt[half] = f.select(valid[half],
                           m.add(cx.qHead, gradQueryRow(cx, tq[half])), zero);
    negLse[half] = negLse2(valid[half], rowAt[half]);
    delta[half] = f.select(
        valid[half], memref::LoadOp::create(b, loc, arg(Delta), rowAt[half]),
        f.c(0.0));
  }

  auto keyTileStart = [&](Value i) {
    return m.add(first, m.mul(i, m.c(kBlockKeys)));
  };
  auto loadKeys = [&](Value i, Value slot) {
    // K and V of the key rows, kv head hk.
    walkedLoad(
        [&]() {
          tmaLoadWalkedTiles(slot, g.base, arg(KOrigin), keyTileStart(i),
                             comp.getPeriod(), g.hk, g.bIdx);
        },
        [&]() {
          loadGradRows(cx, walkedTile(slot, 0), keyTileStart(i), last,
                       /*keys=*/true, arg(K));
          loadGradRows(cx, walkedTile(slot, 1), keyTileStart(i), last,
                       /*keys=*/true, arg(V));
        });
  };
  // Keys past `last` inside the tensor arrive by TMA as they are: zero
  // them, as cp.async's zero fill does (their scores are masked, but
  // dQ += dS K and dP = dO V^T multiply those rows by zero, and 0 * inf,
  // say padding past lengths[b], is NaN).
  auto zeroKeyTail = [&](Value i, Value slot) {
    zeroWalkedTails(slot, m.sub(last, keyTileStart(i)));
  };
  SmallVector<Value> init(frags * 4, f.c(0.0));
  auto computeTile = [&](Value i, Value slot,
                         ValueRange acc) -> SmallVector<Value> {
    Value k0 = keyTileStart(i);
    Value kTile = walkedTile(slot, 0), vTile = walkedTile(slot, 1);
    SmallVector<AccFrag> s = rowsTimesTileT(qTile, kTile);
    auto keyOf = [&](int64_t n, int64_t e) {
      return m.add(k0, m.add(laneCol, m.c(n * 8 + e % 2)));
    };
    if (shape.hasKeyBias)
      for (int64_t n = 0; n < kKeyNTiles; ++n)
        for (int64_t e = 0; e < 2; ++e) {
          Value bias = keyBiasOver(cx, keyOf(n, e), last);
          s[n][e] = f.add(s[n][e], bias);
          s[n][e + 2] = f.add(s[n][e + 2], bias);
        }
    Value masked = m.either(m.lt(k0, fullLo),
                            m.lt(fullHi, m.add(k0, m.c(kBlockKeys))));
    if (comp.hasFilters() && !exclusionsAsRanges(shape, comp))
      masked = m.truth(true);
    s = maskScores(cx, s, masked, [&](int64_t n, int64_t e) {
      Value t = tq[e / 2], tk = keyOf(n, e);
      return m.both(m.both(m.lt(tk, last), m.lt(t, q1)),
                    pairInBand(comp, g, t, tk));
    });
    Value c2 = f.c(shape.scale * M_LOG2E);
    SmallVector<AccFrag> dp = rowsTimesTileT(doTile, vTile);
    for (int64_t n = 0; n < kKeyNTiles; ++n)
      for (int64_t e = 0; e < 4; ++e) {
        Value p = exp2(LLVM::FMAOp::create(b, loc, s[n][e], c2,
                                           negLse[e / 2]));
        s[n][e] = f.mul(p, f.sub(dp[n][e], delta[e / 2]));
      }
    return addPackedTimesTile(acc, packAccumulators(s), kTile);
  };
  scf::ForOp loop =
      walkTiles(numTiles, init, loadKeys, computeTile, zeroKeyTail);

  auto result = [&](int64_t dn, int64_t half, int64_t e) {
    return f.mul(loop.getResult(dn * 4 + half * 2 + e), f.c(shape.scale));
  };
  // dq += scale * dQ: the block owns its rows (components run one after
  // another), so a plain read-modify-write. A component that writes every
  // row once stores dq = scale * dQ instead, 0 on rows that exist but
  // compute nothing.
  auto addIntoDq = [&]() {
    if (writesOnce) {
      storeF32Rows(
          {DQ}, laneCol, {m.lt(tq[0], g.tRowAll), m.lt(tq[1], g.tRowAll)},
          [&](int64_t half) { return valid[half]; },
          [&](int64_t half) {
            return m.mul(m.add(cx.qHead, gradQueryRow(cx, tq[half])), m.c(D));
          },
          [&](size_t, int64_t dn, int64_t half, int64_t e) {
            return result(dn, half, e);
          });
      return;
    }
    for (int64_t half = 0; half < 2; ++half) {
      auto ifValid = scf::IfOp::create(b, loc, TypeRange{}, valid[half], false);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(ifValid.thenBlock());
      writeShareF32({DQ}, m.mul(rowAt[half], m.c(D)), laneCol,
                    /*atomic=*/false, [&](size_t, int64_t dn, int64_t e) {
                      return result(dn, half, e);
                    });
    }
  };
  // Stored: dq = scale * dQ in the input type through dq's strides, 0 on
  // rows that compute nothing (past lengths[b], or in a block without work);
  // where the package finishes the gradients, the earlier components' sum
  // added first, or this share into the sums where a later component
  // holds the row (byLaterComponents).
  Value dqBase = m.add(m.mul(g.bIdx, arg(DQStrideB)), m.mul(g.h, arg(DQStrideH)));
  finishGrads(
      store, addIntoDq, {m.lt(tq[0], g.tRowAll), m.lt(tq[1], g.tRowAll)},
      [&](int64_t half) {
        Value zeroF = f.c(0.0);
        Value accRow =
            m.mul(m.add(cx.qHead, gradQueryRow(cx, tq[half])), m.c(D));
        auto share = [&](int64_t dn, int64_t e) {
          return f.select(valid[half], result(dn, half, e), zeroF);
        };
        auto intoSums = [&]() {
          writeShareF32(
              {DQAcc}, accRow, laneCol, /*atomic=*/false,
              [&](size_t, int64_t dn, int64_t e) { return share(dn, e); });
        };
        auto finish = [&]() {
          Value rowBase =
              m.add(dqBase, m.mul(gradQueryRow(cx, tq[half]), arg(DQStrideR)));
          storeTotalRow(DQ, DQAcc, accRow, rowBase, laneCol, share);
        };
        byLaterComponents(g.h, groupPosition(comp, g, tq[half]), intoSums,
                          finish);
      });
  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  func->setAttr("attn.launch", gradLaunch("grad_q", sharedBytes, comp));
  return func;
}

gpu::GPUFuncOp KernelEmitter::emitGradKeys(StringRef name,
                                           ComponentAttr comp) {
  const int64_t D = shape.headDim, frags = D / 8;
  const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
  const int64_t lo = comp.getBandLo(), hi = comp.getBandHi();
  // K, V, two slots of Q and dO tiles, then two slots of the walked query
  // tile's lse and delta (64 each).
  const int64_t statsOffset = kGradTiles * shape.kvTileBytes();
  // Q and dO tiles by TMA (sm_90a; gathered rows where their period
  // divides the query rows): two mbarriers after the stats.
  const bool tmaWalk = shape.tma;
  const int64_t barriersOffset = statsOffset + 2 * 2 * kBlockKeys * 4;
  const int64_t sharedBytes =
      barriersOffset + (tmaWalk ? 16 : 0) + (shape.wgmma ? 1024 : 0);
  Value bx;
  // Its segments are those of the rows and the keys (with fewer rows than
  // keys, bottom-right aligned, the first keys' segments hold no row), so
  // that a component that writes every key once reaches them all.
  GradContext cx = beginGradKernel(name, comp, bx, /*keySegments=*/true);
  auto func = cast<gpu::GPUFuncOp>(entry->getParentOp());
  const GroupItem &g = cx.g;
  Value zero = m.c(0);
  // Under grouped-query attention a component that writes every key once
  // walks, in one block, the query tiles of all `group` q heads sharing a
  // kv head, so that the block alone writes its keys' dk and dv: of a
  // batch's blocks (x, h), those with h < kvHeads take the (key tile,
  // kv head) pairs in key-tile-major order,
  // x + gridDim.x * h = tile * kvHeads + kv head, and the others return.
  // Its f32 and 16-bit paths differ in their last stores only, so neither
  // path's loop pays for the other (two bodies behind one branch spilled
  // twice as much; bench/gqa_grads_h100.md).
  const int64_t group = shape.heads / shape.kvHeads;
  const bool groupWalk = writesOnce && group > 1;
  Value groupBlock;
  if (groupWalk) {
    Value nbx = gpu::GridDimOp::create(b, loc, gpu::Dimension::x);
    Value pair = m.add(bx, m.mul(nbx, g.h));
    Value kvHeads = m.c(shape.kvHeads);
    Value kvHead = arith::RemUIOp::create(b, loc, pair, kvHeads);
    groupBlock = m.lt(g.h, kvHeads);
    bx = arith::DivUIOp::create(b, loc, pair, kvHeads);
    cx.g.hk = kvHead;
    cx.g.h = m.mul(kvHead, m.c(group));
    cx.kBase = m.add(m.mul(g.bIdx, arg(KStrideB)), m.mul(g.hk, arg(KStrideH)));
  }
  Value k0 = m.add(g.tKeyLo, m.mul(bx, m.c(kBlockKeys)));
  Value hasWork = m.lt(k0, g.tKeyHi);
  // A component that writes every key once runs every block (see
  // emitGradQueries).
  Value store = storeGrads || finishing ? m.ne(arg(GradStore), zero) : Value();
  enterIfWork(g, groupWalk                 ? groupBlock
                 : writesOnce || finishing ? m.truth(true)
                                           : hasWork);

  // Rows t attending keys [k0, k1): lo <= t - tk <= hi.
  Value k1 = m.min(m.add(k0, m.c(kBlockKeys)), g.tKeyHi);
  Value qFirst = lo == ninf ? g.tRowLo : m.max(g.tRowLo, m.add(k0, m.c(lo)));
  // Rows in the first key's excluded segment, or before it, attend none of
  // the block's keys.
  if (Value from = rowsAttendFrom(comp, g, k0))
    qFirst = m.max(qFirst, from);
  Value qLast = hi == inf ? g.tRowHi : m.min(g.tRowHi, m.add(k1, m.c(hi)));
  qLast = m.max(qLast, qFirst);
  Value headTiles = m.ceilDiv(m.sub(qLast, qFirst), m.c(kBlockKeys));
  if (writesOnce || finishing)
    headTiles = f.select(hasWork, headTiles, zero);
  // Walked tile i is tile i - j * headTiles of q head h + j, j the number
  // of whole heads before it (the group's heads one after the other under
  // the GQA walk; h's tiles alone otherwise), counted with one compare per
  // head rather than a 64-bit division per tile.
  Value numTiles = groupWalk ? m.mul(headTiles, m.c(group)) : headTiles;
  struct WalkedHead {
    GradContext cx; // with the head's qHead and qBase
    Value tile;     // its tile index within the head
    Value head;     // the q head
  };
  auto walkedHead = [&](Value i) {
    WalkedHead w{cx, i, g.h};
    if (!groupWalk)
      return w;
    Value j = zero, start = zero;
    for (int64_t n = 1; n < group; ++n) {
      Value past = m.le(m.mul(headTiles, m.c(n)), i);
      j = f.select(past, m.c(n), j);
      start = f.select(past, m.mul(headTiles, m.c(n)), start);
    }
    w.tile = m.sub(i, start);
    Value h = w.head = m.add(g.h, j);
    w.cx.qHead = m.mul(m.add(m.mul(g.bIdx, m.c(shape.heads)), h), arg(QLen));
    w.cx.qBase = m.add(m.mul(g.bIdx, arg(QStrideB)), m.mul(h, arg(QStrideH)));
    return w;
  };

  Value kTile = cx.tiles[0], vTile = cx.tiles[1];
  auto workgroup =
      gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
  auto statsType = MemRefType::get({2 * 2 * kBlockKeys}, f32,
                                   MemRefLayoutAttrInterface{}, workgroup);
  Value stats = memref::ViewOp::create(b, loc, statsType, gradShared,
                                       shape.wgmma
                                           ? m.add(tilesOffset, m.c(statsOffset))
                                           : m.c(statsOffset),
                                       ValueRange{});
  loadGradRows(cx, kTile, k0, k1, /*keys=*/true, arg(K));
  loadGradRows(cx, vTile, k0, k1, /*keys=*/true, arg(V));
  walkBarriers = Value();
  if (tmaWalk)
    beginTmaWalk(barriersOffset, comp.getPeriod(), arg(QLen));

  Value laneRow = arith::DivUIOp::create(b, loc, lane, m.c(4));
  Value laneCol = m.mul(arith::RemUIOp::create(b, loc, lane, m.c(4)), m.c(2));
  Value warpRow = m.mul(warp, m.c(16));
  Value tk[2], bias[2];
  for (int64_t half = 0; half < 2; ++half) {
    tk[half] = m.add(k0, m.add(warpRow, m.add(laneRow, m.c(8 * half))));
    if (shape.hasKeyBias)
      bias[half] = keyBiasOver(cx, tk[half], k1);
  }

  auto rowTileStart = [&](Value i) {
    return m.add(qFirst, m.mul(i, m.c(kBlockKeys)));
  };
  // A walked tile: its Q and dO rows, and (one copy a thread: lse by the
  // first 64 threads, delta by the others) its rows' lse and delta, zeros
  // past qLast.
  auto loadRows = [&](Value i, Value slot) {
    WalkedHead w = walkedHead(i);
    Value t0 = rowTileStart(w.tile);
    // Q and dO of the query rows, q head w.head.
    walkedLoad(
        [&]() {
          tmaLoadWalkedTiles(slot, g.base, arg(QOrigin), t0, comp.getPeriod(),
                             w.head, g.bIdx);
        },
        [&]() {
          loadGradRows(w.cx, walkedTile(slot, 0), t0, qLast, /*keys=*/false,
                       arg(Q));
          loadGradRows(w.cx, walkedTile(slot, 1), t0, qLast, /*keys=*/false,
                       arg(GradOut));
        });
    Value isDelta = m.le(m.c(kBlockKeys), tid);
    Value r = arith::RemUIOp::create(b, loc, tid, m.c(kBlockKeys));
    Value t = m.add(t0, r);
    Value ok = m.lt(t, qLast);
    Value row = f.select(ok, m.add(w.cx.qHead, gradQueryRow(cx, t)), zero);
    auto copyStat = [&](Value source) {
      nvgpu::DeviceAsyncCopyOp::create(
          b, loc, nvgpu::DeviceAsyncTokenType::get(ctx), stats,
          ValueRange{m.add(m.mul(slot, m.c(2 * kBlockKeys)), tid)}, source,
          ValueRange{row}, b.getIndexAttr(1), f.select(ok, m.c(1), zero),
          UnitAttr());
    };
    // A branch (uniform per warp: threads 0-63 and 64-127), not a select
    // between the two memrefs, which the generic LLVM conversions before
    // gpu-to-nvvm cannot type (global address space) and report.
    ifElse(
        isDelta, [&] { copyStat(arg(Delta)); }, [&] { copyStat(arg(Lse)); });
  };
  SmallVector<Value> init(2 * frags * 4, f.c(0.0));
  auto computeTile = [&](Value i, Value slot,
                         ValueRange state) -> SmallVector<Value> {
    WalkedHead walked = walkedHead(i);
    Value t0 = rowTileStart(walked.tile);
    // The filters see the walked q head: under the GQA walk the group's
    // heads take turns, and a filter may follow the head (a dilated branch
    // with head offsets).
    GroupItem rowsGroup = g;
    rowsGroup.h = walked.head;
    Value qTile = walkedTile(slot, 0), doTile = walkedTile(slot, 1);
    Value statsAt = m.mul(slot, m.c(2 * kBlockKeys));
    SmallVector<AccFrag> s = rowsTimesTileT(kTile, qTile);
    if (shape.hasKeyBias)
      for (int64_t n = 0; n < kKeyNTiles; ++n)
        for (int64_t e = 0; e < 4; ++e)
          s[n][e] = f.add(s[n][e], bias[e / 2]);
    auto queryOf = [&](int64_t n, int64_t e) {
      return m.add(t0, m.add(laneCol, m.c(n * 8 + e % 2)));
    };
    // Tiles wholly inside the band for every pair need no mask.
    Value full = m.both(m.eq(k1, m.add(k0, m.c(kBlockKeys))),
                        m.le(m.add(t0, m.c(kBlockKeys)), qLast));
    if (lo != ninf)
      full = m.both(full, m.le(m.c(lo), m.sub(t0, m.add(k0, m.c(kBlockKeys - 1)))));
    if (hi != inf)
      full = m.both(full, m.le(m.sub(m.add(t0, m.c(kBlockKeys - 1)), k0), m.c(hi)));
    // Exclusions as key ranges: the tile's first row attends every key of
    // the block before its excluded segment, and so do the rows after it.
    if (Value from = excludedPositionsFrom(comp, groupPosition(comp, g, t0)))
      full =
          m.both(full, m.lt(groupPosition(comp, g, m.sub(k1, m.c(1))), from));
    Value masked = comp.hasFilters() && !exclusionsAsRanges(shape, comp)
                       ? m.truth(true)
                       : m.eq(full, m.truth(false));
    s = maskScores(cx, s, masked, [&](int64_t n, int64_t e) {
      Value t = queryOf(n, e), key = tk[e / 2];
      return m.both(m.both(m.lt(t, qLast), m.lt(key, k1)),
                    pairInBand(comp, rowsGroup, t, key));
    });
    Value c2 = f.c(shape.scale * M_LOG2E);
    // -lse log2(e) per column, or -inf for a row with no key (lse -inf):
    // its P is then 0. Rows past qLast (lse 0) are masked above.
    SmallVector<Value> lseCol(kKeyNTiles * 2), deltaCol(kKeyNTiles * 2);
    for (int64_t n = 0; n < kKeyNTiles; ++n)
      for (int64_t e = 0; e < 2; ++e) {
        Value col = m.add(statsAt, m.add(laneCol, m.c(n * 8 + e)));
        Value lse = memref::LoadOp::create(b, loc, stats, col);
        lseCol[n * 2 + e] = f.select(f.gt(lse, f.negInf()),
                                     f.mul(lse, f.c(-M_LOG2E)), f.negInf());
        deltaCol[n * 2 + e] = memref::LoadOp::create(
            b, loc, stats, m.add(col, m.c(kBlockKeys)));
      }
    for (int64_t n = 0; n < kKeyNTiles; ++n)
      for (int64_t e = 0; e < 4; ++e)
        s[n][e] = exp2(LLVM::FMAOp::create(b, loc, s[n][e], c2,
                                           lseCol[n * 2 + e % 2]));
    SmallVector<Value> dv = addPackedTimesTile(
        state.take_back(frags * 4), packAccumulators(s), doTile);
    SmallVector<AccFrag> dp = rowsTimesTileT(vTile, doTile);
    for (int64_t n = 0; n < kKeyNTiles; ++n)
      for (int64_t e = 0; e < 4; ++e)
        s[n][e] = f.mul(s[n][e], f.sub(dp[n][e], deltaCol[n * 2 + e % 2]));
    SmallVector<Value> dk = addPackedTimesTile(
        state.take_front(frags * 4), packAccumulators(s), qTile);
    dk.append(dv);
    return dk;
  };
  // Rows past qLast inside the tensor arrive by TMA as they are: zero them,
  // as cp.async's zero fill does (their P and dS are masked to 0, which
  // dK += dS^T Q and dV += P^T dO multiply by these rows).
  auto zeroRowTail = [&](Value i, Value slot) {
    zeroWalkedTails(slot, m.sub(qLast, rowTileStart(walkedHead(i).tile)));
  };
  scf::ForOp loop =
      walkTiles(numTiles, init, loadRows, computeTile, zeroRowTail);

  auto dkOf = [&](int64_t dn, int64_t half, int64_t e) {
    return f.mul(loop.getResult(dn * 4 + half * 2 + e), f.c(shape.scale));
  };
  auto dvOf = [&](int64_t dn, int64_t half, int64_t e) {
    return loop.getResult(frags * 4 + dn * 4 + half * 2 + e);
  };
  // dk += scale * dK and dv += dV, atomically: the blocks of every q head
  // sharing the kv head add into the same rows under grouped-query
  // attention, and even where a block owns its keys a plain read-modify-
  // write, each load behind the store before it, lost to the atomics (its
  // loads wait at the block's end, where a reduction does not;
  // bench/grad_reductions_ab_h100.log; batched as addF32Pairs does, it
  // was not tried). On sm_90a each pair of elements is one 8-byte vector
  // reduction (red.global.add.v2.f32, PTX ISA 8.1), on sm_80 two scalar
  // ones. (A
  // component that writes every key once, one q head per kv head or the
  // GQA walk, stores dk = scale * dK and dv = dV in f32 instead, zeros on
  // keys that compute nothing, as the stored path below.)
  // The block's (batch, kv head) pair, and the first element of key
  // tk[half]'s row in contiguous f32 dk and dv (and in their f32 sums).
  auto kvHeadOf = [&]() {
    return m.add(m.mul(g.bIdx, m.c(shape.kvHeads)), g.hk);
  };
  auto f32KeyRow = [&](Value kvHead, int64_t half) {
    return m.mul(m.add(m.mul(kvHead, arg(KLen)), gradKeyRow(cx, tk[half])),
                 m.c(D));
  };
  auto addIntoDkDv = [&]() {
    Value kvHead = kvHeadOf();
    if (writesOnce) {
      storeF32Rows(
          {DK, DV}, laneCol, {m.lt(tk[0], g.tKeyAll), m.lt(tk[1], g.tKeyAll)},
          [&](int64_t half) { return m.lt(tk[half], k1); },
          [&](int64_t half) { return f32KeyRow(kvHead, half); },
          [&](size_t grad, int64_t dn, int64_t half, int64_t e) {
            return grad ? dvOf(dn, half, e) : dkOf(dn, half, e);
          });
      return;
    }
    for (int64_t half = 0; half < 2; ++half) {
      auto ifValid =
          scf::IfOp::create(b, loc, TypeRange{}, m.lt(tk[half], k1), false);
      OpBuilder::InsertionGuard guard(b);
      b.setInsertionPointToStart(ifValid.thenBlock());
      writeShareF32({DK, DV}, f32KeyRow(kvHead, half), laneCol,
                    /*atomic=*/true, [&](size_t grad, int64_t dn, int64_t e) {
                      return grad ? dvOf(dn, half, e) : dkOf(dn, half, e);
                    });
    }
  };
  // Stored: dk = scale * dK and dv = dV in the input type through their
  // (shared) strides, 0 on keys no row attends here (past lengths[b], or in
  // a block without work). One q head per kv head, or the GQA walk: no
  // other block writes these rows.
  Value dkBase = m.add(m.mul(g.bIdx, arg(DKStrideB)), m.mul(g.hk, arg(DKStrideH)));
  finishGrads(store, addIntoDkDv, {m.lt(tk[0], g.tKeyAll), m.lt(tk[1], g.tKeyAll)},
              [&](int64_t half) {
    Value zeroF = f.c(0.0);
    Value valid = m.lt(tk[half], k1);
    Value accRow = f32KeyRow(kvHeadOf(), half);
    auto share = [&](GradArg grad, int64_t dn, int64_t e) {
      return f.select(valid, grad == DK ? dkOf(dn, half, e) : dvOf(dn, half, e),
                      zeroF);
    };
    auto intoSums = [&]() {
      writeShareF32({DKAcc, DVAcc}, accRow, laneCol, /*atomic=*/true,
                    [&](size_t i, int64_t dn, int64_t e) {
                      return share(i ? DV : DK, dn, e);
                    });
    };
    auto finish = [&]() {
      Value rowBase =
          m.add(dkBase, m.mul(gradKeyRow(cx, tk[half]), arg(DKStrideR)));
      for (GradArg grad : {DK, DV})
        storeTotalRow(
            grad, grad == DK ? DKAcc : DVAcc, accRow, rowBase, laneCol,
            [&](int64_t dn, int64_t e) { return share(grad, dn, e); });
    };
    byLaterComponents(g.h, groupPosition(comp, g, tk[half]), intoSums, finish);
  });
  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  func->setAttr("attn.launch", gradLaunch("grad_kv", sharedBytes, comp));
  return func;
}

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
    for (auto [i, c] : llvm::enumerate(comps))
      add(emitterOf(c.getComponent())
              .emitComponent(("component_" + Twine(i)).str(), c.getComponent(),
                             modeOf(i)));
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
