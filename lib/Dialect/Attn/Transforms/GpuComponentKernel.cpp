//===- GpuComponentKernel.cpp - a component as a tensor-core kernel -------===//
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
// ComponentKernel), and per warpgroup
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
// the two products is the same code for both paths. At head dim 64 a key
// tile of contiguous keys holds 128 keys (S[64x128] by wgmma.m64n128k16,
// its K and V tiles the 16 KB of D = 128's; ComponentKernel's blockKeys).
//
// Narrow bands (at most 129 keys wide, period 1) get one-warpgroup blocks
// of 64 rows that hold all of their (at most three) key tiles at once and
// take the softmax in one step (residentKeyTiles, ComponentKernel::
// residentStep). Gathered components with filters walk their key tiles on
// one-warpgroup blocks too, where their predicates fit the registers
// (needsOneWarpgroup), unless their exclusions are all key ranges
// (exclusionsAsRanges).
//
// With `warp-specialize`, components whose rows attend many contiguous keys
// get FlashAttention-3's structure instead: a producer warpgroup issuing
// the TMA loads into a ring of slots, three consumer warpgroups (192 rows)
// whose softmax of one tile overlaps their P . V of the previous one, one
// block per SM (isWarpSpecialized, ComponentKernel's `ws`, overlappedLoop).
//
// The code. KernelEmitter::emitComponent makes a ComponentKernel, whose
// members are the kernel's choices and the values its steps share, and
// whose methods are the steps, called by ComponentKernel::emit in the
// order the kernel runs them (see the class).
//
//===----------------------------------------------------------------------===//

#include "GpuKernelEmitter.h"

using namespace mlir;

namespace mlir::attn::gpu_codegen {

//===----------------------------------------------------------------------===//
// Component kernels
//===----------------------------------------------------------------------===//

namespace {

/// One component kernel as it is emitted. The constructor fixes its
/// choices (the state mode, the kernel's form, its shared-memory layout);
/// emit() builds the kernel, calling the steps in the order it runs them:
///
///   placeItem, itemRange   the block's rows [q0, q1) and key tiles
///   prologue               the mbarriers, Q and the first key tile (with
///                          warp specialisation, the producer's whole loop)
///   beginRows              the thread's two rows (mma.sync: Q's fragments)
///   initialState           the loop's O, max and sum
///   overlappedLoop         the key loop: warp-specialised,
///   residentStep             or resident keys in one step,
///   pipelinedLoop            or one key tile a step
///   mergeEarlierState      the earlier components' state (dependent
///                          launches)
///   storeRows              out (or the state) and lse
///
/// The values that several steps use (the item's ranges, the thread's rows,
/// the shared tiles) are members, set by the step that makes them. A
/// ComponentKernel is a copy of the emitter, so that the shared helpers
/// (inlinePtx, wgmma, tmaLoadTile, ...) read as in the other kernels.
class ComponentKernel : public KernelEmitter {
public:
  ComponentKernel(const KernelEmitter &emitter, ComponentAttr comp,
                  StateMode mode);
  gpu::GPUFuncOp emit(StringRef name);

private:
  // The block's work item: placeItem sets the item's values and returns
  // whether it has rows; itemRange sets the key range of its rows and the
  // head's bases in q, k, v and out.
  Value placeItem(Value bx, Value by, Value bz, Value nbx);
  void itemRange();
  /// Query row i of gathered row t; the position of gathered key t; key tk
  /// as the filter predicates see it (its global key index).
  Value qRowIndex(Value t);
  Value keyPos(Value t);
  Value predicateKey(Value tk);
  Value toI32(Value index);

  // Shared memory: Q, then K of every slot, then V of every slot (resident
  // keys: V[i] is K[i]), then the mbarriers.
  Value keyOffset(Value slot);
  Value valueOffset(Value slot);
  Value keyTile(Value slot);
  Value valueTile(Value slot);
  /// A slot's "full" mbarrier, and (ws) its "empty" one.
  Value barrierAt(Value slot);
  Value emptyAt(Value slot);
  /// A barrier of every thread that computes (with ws, named barrier 1 of
  /// the consumer threads).
  void consumerBarrier();
  /// The wgmmas read shared memory through the async proxy: makes this
  /// thread's copies visible to it (before a barrier).
  void fenceForWgmma();

  // Loads.
  void loadKeyTile(Value k0, Value slot);
  Value commitGroup();
  void tmaLoadBoxes(Value map, Value offset, Value k0, Value bar);
  SmallVector<Value> queryBoxCoords(Value t0);
  void issueQueryTile(Value bar);
  void tmaLoadQueryTile(Value bar);
  void tmaLoadKeyTile(Value k0, Value slot);
  void residentLoad(Value bar, bool values);
  void waitTile(Value it, function_ref<Value()> barrier);
  void waitKeyTile(Value it, Value slot);
  void zeroValueTail(Value k0, Value slot);
  /// The mbarriers, then Q's tile and the first key tile (by TMA or
  /// cp.async), waited for; with ws, the producer warpgroup's loop.
  void prologue();
  void initBarriers();
  void produceKeyTiles();
  void loadFirstTiles();
  void loadQueryByCopies();

  // The softmax state.
  struct StoredRow {
    Value valid, row, outAt, max, sum, leaderSum;
  };
  StoredRow loadStoredRow(int64_t half);
  SmallVector<Value> loadStoredPair(const StoredRow &s, int64_t dn);
  /// The thread's two rows and the loop's initial state (`init`).
  void beginRows();
  void initialState();

  // One key tile's products, masks and softmax.
  SmallVector<AccFrag> toFrags(ValueRange flat);
  SmallVector<Value> flatten(ArrayRef<AccFrag> frags);
  SmallVector<Value> issueScoresWgmma(Value slot);
  SmallVector<AccFrag> scoresMmaSync(Value slot);
  void biasAndMask(SmallVector<AccFrag> &s, Value k0);
  void addKeyBias(SmallVector<AccFrag> &s, Value k0);
  Value edgeTile(Value k0);
  SmallVector<Value> windowMasked(ArrayRef<AccFrag> s, Value k0);
  SmallVector<Value> predicateMasked(ArrayRef<AccFrag> s, Value k0);
  struct SoftmaxStep {
    Value rescale;            // i1: multiply O by alpha
    Value alpha[2];           // per row half
    SmallVector<Value> stats; // the new [max0, max1, sum0, sum1]
  };
  SoftmaxStep softmaxStep(SmallVector<AccFrag> &s, ValueRange stats);
  SmallVector<Value> rescaleAcc(ValueRange o, const SoftmaxStep &step);
  SmallVector<Value> issueValuesWgmma(ValueRange o, ValueRange p, Value slot,
                                      bool fresh = false);
  SmallVector<AccFrag> valuesMmaSync(SmallVector<AccFrag> o, ArrayRef<Value> p,
                                     Value slot);

  // The key loops; each returns the final O, then [max0, max1, sum0, sum1].
  void handBack(Value slot);
  void awaitKeyTile(Value it, Value slot, Value k0);
  Value slotOf(Value it);
  SmallVector<Value> overlappedLoop();
  SmallVector<Value> residentStep();
  SmallVector<Value> pipelinedLoop();

  // After the loop.
  SmallVector<Value> mergeEarlierState(ArrayRef<Value> own);
  void storeRows(ValueRange fin);
  Value rowWritten(Value t);
  SmallVector<Value, 2> stagedAt(Value row, Value dn, Value e);
  Value partByTma(Value part);

  // The kernel's choices (the constructor).
  ComponentAttr comp;
  StateMode mode;
  bool loadsState, writesOut, ws, resident, mergesAfterLoop;
  int64_t kBlockRows, residentTiles, threads, slots;
  /// Keys a tile (kBlockKeys, or 128 at head dim 64: see the constructor),
  /// their 8-column accumulator tiles, and the bytes of a K or V tile.
  int64_t blockKeys, keyNTiles, keyTileBytes;
  int64_t barrierOffset, numBarriers, sharedBytes;
  int64_t D, H, lo, hi, period, oFrags, polynomialExps;
  int64_t kvPanelBytes, qPanelBytes;
  double scaleLog2;
  static constexpr int64_t inf = ComponentAttr::kPosInf;
  static constexpr int64_t ninf = ComponentAttr::kNegInf;

  // The kernel's arguments and constants.
  Value zero, one, r, qLen, kLen;
  /// Query row i sits at position i + delta, key j at j + kOrigin.
  Value delta, kOrigin, qPos, kPos, posStride;

  // The work item (placeItem, itemRange).
  Value tileIdx, bIdx, h, hk, rowsEnd, keysEnd, length, c, headHasClass;
  Value base, tRowLo, tRowHi, tRowAll, tKeyLo, tKeyHi, q0;
  Value q1, first, last, fullLo, fullHi, numTiles, qHead, qBase, kBase, oBase;
  GroupItem item;

  // Shared memory and loads.
  Value dyn, qTile;
  Value tableRows, idsRow;
  bool tmaKeys;
  Value useTma, useTmaQ, isLeader;
  Value plane, planeRow0, qPlane, qPlaneRow0;
  Value window;

  // The thread's rows and the loop's initial state.
  Value laneRow, laneCol, warpRow;
  Value tq[2];
  Value lastBeforeExclusion[2];
  SmallVector<std::array<Value, 4>> qFrag;
  SmallVector<Value> init;
  Value isQuadLeader;

  // The stores.
  bool staged, storeByTma;
  Value rowTile, writtenEnd;
};

} // namespace

gpu::GPUFuncOp KernelEmitter::emitComponent(StringRef name, ComponentAttr comp,
                                            StateMode mode) {
  return ComponentKernel(*this, comp, mode).emit(name);
}

ComponentKernel::ComponentKernel(const KernelEmitter &emitter,
                                 ComponentAttr comp, StateMode mode)
    : KernelEmitter(emitter), comp(comp), mode(mode) {
  loadsState = mode == StateMode::Update || mode == StateMode::End;
  writesOut = mode == StateMode::Single || mode == StateMode::End;
  kBlockRows = shape.blockRows();
  // Warp specialisation (the `warp-specialize` option; components whose
  // keys are contiguous, so always by TMA): a producer warpgroup (threads
  // 0-127) issues every K/V load into a ring of kWsSlots slots, handed
  // back by the consumers through "empty" mbarriers, and the consumer
  // warpgroups (threads 128.., shape.warpgroups of them: 3, 192 rows) run
  // overlappedLoop. One block per SM; setmaxnreg moves registers from the
  // producer (kProducerRegisters) to the consumers (kConsumerRegisters).
  ws = isWarpSpecialized(shape, comp);
  // Resident keys (residentKeyTiles): a one-warpgroup block loads all its
  // key tiles into the slots at once and takes one softmax step over them.
  // The block's rows [q0, q0 + 64) attend keys inside the residentTiles
  // tiles of its window, which starts at key q0 - hi (see residentStep).
  residentTiles = shape.wgmma && shape.warpgroups == 1 && !ws
                      ? residentKeyTiles(shape, comp)
                      : 0;
  resident = residentTiles > 0;
  threads = ws ? shape.threads() + 128 : shape.threads();
  // Key tiles of 128 keys at head dim 64 (wgmma, contiguous keys, not
  // resident): a tile's MMAs take half as long there against the same
  // per-step costs (the waits, the barriers, the row max's shuffles, the
  // rescale vote), and 128 keys bring them back to D = 128's share, with
  // the same bytes of shared memory a tile (128 rows of 128 bytes) and the
  // same registers (S doubles as O halves). Causal +2-8%, local +8-9%,
  // LongNet's union +5-8% at 4096-32768 tokens a sequence; gathered keys
  // (strided's residue classes, short rows) lost 6-18% and keep 64
  // (bench/gpu_ab.md, "Key tiles of 128 at head dim 64").
  blockKeys =
      shape.wgmma && shape.headDim == 64 && !resident && comp.getPeriod() == 1
          ? 2 * kBlockKeys
          : kBlockKeys;
  keyNTiles = blockKeys / 8;
  keyTileBytes = blockKeys * shape.rowBytes();
  slots = ws ? kWsSlots : resident ? residentTiles : 2;
  // Shared memory: Q, K[slots], V[slots], then with TMA the 8-byte
  // mbarriers: one "full" per slot and, with ws, one "empty" per slot.
  // Resident keys: V[i] is K[i] (V arrives once S is done), and two
  // barriers, one for the K tiles and one for the V tiles.
  // wgmma tiles start at the first 1024-byte boundary of the dynamic shared
  // memory (the swizzle repeats every 1024 bytes and the descriptors assume
  // it starts at one): 1024 bytes of slack.
  barrierOffset =
      shape.qTileBytes() + (resident ? 1 : 2) * slots * keyTileBytes;
  numBarriers = resident ? 2 : slots * (ws ? 2 : 1);
  sharedBytes = barrierOffset + (shape.wgmma ? 1024 : 0) +
                (shape.tma ? 8 * numBarriers : 0);
  D = shape.headDim;
  H = shape.heads;
  lo = comp.getBandLo();
  hi = comp.getBandHi();
  period = comp.getPeriod();
  tmaKeys = shape.tma;
  // `update` and `end` continue the earlier components' state. Where the
  // kernel is a programmatic dependent launch of the one before
  // (shape.dependentLaunch) they start from the empty state and merge the
  // stored one in after the loop (mergeEarlierState), so that all of the
  // loop may overlap the kernel before; otherwise they load it first, where
  // its loads overlap Q's and the first key tile's.
  mergesAfterLoop = loadsState && shape.dependentLaunch();
  // The loop state: O fragments (D/8 of them), then max and sum per row
  // half.
  oFrags = D / 8;
  scaleLog2 = shape.scale * M_LOG2E;
  // 128-byte rows: a K/V panel is 64 rows, a Q panel blockRows rows.
  kvPanelBytes = blockKeys * 128;
  qPanelBytes = kBlockRows * 128;
  // The first polynomialExps of each row half's 2 * keyNTiles scores are
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
  polynomialExps = shape.wgmma && !ws && shape.headDim > 64 ? 2 : 0;
  // 16-bit rows (out, or a 16-bit state's O / sum) go through shared memory
  // (storeRows); with TMA they leave by TMA stores where they can.
  staged = writesOut || shape.halfState;
  storeByTma = staged && tmaKeys;
}

gpu::GPUFuncOp ComponentKernel::emit(StringRef name) {
  auto func = beginKernel(name, threads);
  // Two blocks per SM, so that one block's softmax overlaps the other's
  // MMAs: ptxas then keeps the 256-thread wgmma kernels within 128
  // registers per thread. Resident blocks (one warpgroup, 64 KB) fit three;
  // a warp-specialised block takes the SM.
  if (shape.wgmma)
    func->setAttr(NVVM::NVVMDialect::getMinctasmAttrName(),
                  b.getI32IntegerAttr(ws         ? 1
                                      : resident ? 3
                                                 : 2));
  // The next kernel of the package may launch as soon as every block of
  // this one has started (it waits for this one's results before touching
  // them: mergeEarlierState).
  if (shape.dependentLaunch())
    inlinePtx({}, {}, "griddepcontrol.launch_dependents;", "");
  zero = m.c(0);
  one = m.c(1);
  r = m.c(period);
  qLen = arg(QLen);
  kLen = arg(KLen);
  delta = arg(QOrigin);
  kOrigin = arg(KOrigin);
  qPos = arg(QPos);
  kPos = arg(KPos);
  posStride = arg(PosStride);

  // The block's work item: (row tile, group, batch * heads + head), as the
  // block coordinates (bx, by, bz) of the component's grid give it.
  Value hasWork = placeItem(
      gpu::BlockIdOp::create(b, loc, gpu::Dimension::x),
      gpu::BlockIdOp::create(b, loc, gpu::Dimension::y),
      m.add(arg(BhOffset), gpu::BlockIdOp::create(b, loc, gpu::Dimension::z)),
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

  // Shared memory: Q, K[slots], V[slots], the mbarriers.
  auto workgroup =
      gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
  dyn = gpu::DynamicSharedMemoryOp::create(
      b, loc,
      MemRefType::get({ShapedType::kDynamic}, b.getI8Type(),
                      MemRefLayoutAttrInterface{}, workgroup));
  if (shape.wgmma)
    alignTiles(dyn);
  qTile = sharedTile(dyn, zero, kBlockRows);

  // With key_ids, k and v are tables [1, Hkv, V, D] (V from the
  // descriptor's size) and key j is row key_ids[b, j]; ids outside [0, V)
  // read as zero rows.
  if (shape.hasKeyIds) {
    Value size = memref::DimOp::create(b, loc, arg(K), 0);
    tableRows = arith::DivUIOp::create(b, loc, size,
                                       m.c(shape.kvHeads * shape.headDim));
    idsRow = m.mul(bIdx, kLen);
  }

  // With TMA (tmaLoadKeyTile), the runtime encodes the maps for the
  // kernel's period r over k's and v's strides, with heads and batches as
  // their own dimensions: the keys of a head as [rows / r][r][D] for r > 1,
  // so that gathered key j = r*a + c is box row a of residue plane c. That
  // view needs r | rows; otherwise the maps are empty and the kernel loads
  // by cp.async (a uniform branch).
  if (tmaKeys)
    useTma = period == 1 ? m.truth(true)
                         : m.eq(arith::RemUIOp::create(b, loc, kLen, r), zero);
  // Key t sits at j = base + r*t - kOrigin = r*(planeRow0 + t) + plane,
  // and query row t at i = base + r*t - qOrigin = r*(qPlaneRow0 + t) +
  // qPlane.
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
  if (tmaKeys)
    useTmaQ = period == 1
                  ? useTma
                  : m.both(useTma,
                           m.eq(arith::RemUIOp::create(b, loc, qLen, r), zero));
  isLeader = m.eq(tid, zero);
  // Resident keys: the block's window of keys starts at q0 - hi
  // (residentLoad).
  if (resident)
    window = m.sub(q0, m.c(hi));

  prologue();
  beginRows();
  initialState();
  SmallVector<Value> finValues = ws         ? overlappedLoop()
                                 : resident ? residentStep()
                                            : pipelinedLoop();
  if (mergesAfterLoop)
    finValues = mergeEarlierState(finValues);
  storeRows(finValues);

  b.setInsertionPointToEnd(entry);
  gpu::ReturnOp::create(b, loc);
  func->setAttr(
      "attn.launch",
      b.getDictionaryAttr({
          b.getNamedAttr("kind", b.getStringAttr(kindName(mode))),
          b.getNamedAttr("block", b.getI64IntegerAttr(threads)),
          b.getNamedAttr("block_rows", b.getI64IntegerAttr(kBlockRows)),
          b.getNamedAttr("shared_bytes", b.getI64IntegerAttr(sharedBytes)),
          b.getNamedAttr("component", comp),
      }));
  return func;
}

//===----------------------------------------------------------------------===//
// The work item
//===----------------------------------------------------------------------===//

Value ComponentKernel::placeItem(Value bx, Value by, Value bz, Value nbx) {
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
}

void ComponentKernel::itemRange() {
  q1 = m.max(m.min(m.add(q0, m.c(kBlockRows)), tRowHi), q0);
  // Key tiles attended by some row of [q0, q1), and those by every row.
  first = hi == inf ? tKeyLo : m.max(tKeyLo, m.sub(q0, m.c(hi)));
  last = lo == ninf ? tKeyHi : m.min(tKeyHi, m.sub(q1, m.c(lo)));
  // Keys from the last row's excluded segment on are no row's.
  if (Value end = excludedKeysFrom(comp, item, m.sub(q1, one)))
    last = m.min(last, end);
  last = f.select(m.lt(q0, q1), m.max(last, first), first);
  fullLo = hi == inf ? first : m.max(first, m.sub(m.sub(q1, one), m.c(hi)));
  fullHi = lo == ninf ? last : m.min(last, m.add(m.sub(q0, m.c(lo)), one));
  // Every row attends keys before the first row's excluded segment.
  if (Value end = excludedKeysFrom(comp, item, q0))
    fullHi = m.min(fullHi, end);
  numTiles = m.ceilDiv(m.sub(last, first), m.c(blockKeys));

  // qHead: the head's first row in lse and the contiguous f32 state;
  // qBase, kBase, oBase: its first element in q, in k and v, and in out
  // (their strides).
  qHead = m.mul(m.add(m.mul(bIdx, m.c(H)), h), qLen);
  qBase = m.add(m.mul(bIdx, arg(QStrideB)), m.mul(h, arg(QStrideH)));
  kBase = m.add(m.mul(bIdx, arg(KStrideB)), m.mul(hk, arg(KStrideH)));
  oBase = m.add(m.mul(bIdx, arg(OStrideB)), m.mul(h, arg(OStrideH)));
}

Value ComponentKernel::qRowIndex(Value t) {
  return m.sub(m.add(base, m.mul(r, t)), delta);
}

Value ComponentKernel::keyPos(Value t) { return m.add(base, m.mul(r, t)); }

Value ComponentKernel::predicateKey(Value tk) {
  return m.add(kPos, m.mul(posStride, m.sub(keyPos(tk), kOrigin)));
}

Value ComponentKernel::toI32(Value index) {
  return arith::IndexCastOp::create(b, loc, i32, index);
}

//===----------------------------------------------------------------------===//
// Shared memory and loads
//===----------------------------------------------------------------------===//

Value ComponentKernel::keyOffset(Value slot) {
  return m.add(m.c(shape.qTileBytes()), m.mul(slot, m.c(keyTileBytes)));
}

Value ComponentKernel::valueOffset(Value slot) {
  if (resident)
    return keyOffset(slot);
  return m.add(m.c(shape.qTileBytes() + slots * keyTileBytes),
               m.mul(slot, m.c(keyTileBytes)));
}

Value ComponentKernel::keyTile(Value slot) {
  return sharedTile(dyn, keyOffset(slot), blockKeys);
}

Value ComponentKernel::valueTile(Value slot) {
  return sharedTile(dyn, valueOffset(slot), blockKeys);
}

Value ComponentKernel::barrierAt(Value slot) {
  return sharedAddress32(m.add(m.c(barrierOffset), m.mul(slot, m.c(8))));
}

Value ComponentKernel::emptyAt(Value slot) {
  return sharedAddress32(
      m.add(m.c(barrierOffset + 8 * slots), m.mul(slot, m.c(8))));
}

void ComponentKernel::consumerBarrier() {
  if (ws)
    inlinePtx({}, {}, "bar.sync 1, " + std::to_string(shape.threads()) + ";",
              "");
  else
    gpu::BarrierOp::create(b, loc);
}

void ComponentKernel::fenceForWgmma() {
  if (shape.wgmma)
    inlinePtx({}, {}, "fence.proxy.async.shared::cta;", "");
}

// cp.async of the K/V tile pair of keys k0.. into a slot; rows past `last`
// (or with ids outside the table) are zero-filled.
void ComponentKernel::loadKeyTile(Value k0, Value slot) {
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
    exists =
        m.both(exists, arith::CmpIOp::create(b, loc, arith::CmpIPredicate::ult,
                                             id, tableRows));
    return {m.add(m.mul(hk, arg(KStrideH)), m.mul(id, arg(KStrideR))), exists};
  };
  asyncLoadTile(keyTile(slot), blockKeys, arg(K), rowAt);
  asyncLoadTile(valueTile(slot), blockKeys, arg(V), rowAt);
}

Value ComponentKernel::commitGroup() {
  return nvgpu::DeviceAsyncCreateGroupOp::create(
      b, loc, nvgpu::DeviceAsyncTokenType::get(ctx), ValueRange{});
}

// With TMA, thread 0 fetches a K/V tile pair: it arms the slot's mbarrier
// with the pair's bytes and issues D/64 box loads (64 columns x 64 rows,
// 128-byte swizzle: the wgmma layout) per tensor; every thread then waits
// on the mbarrier's phase. Keys past the head's rows read as zeros; keys
// past `last` but inside the tensor arrive as they are (see zeroValueTail).
//
// The leader's box loads of one K (or V) tile of keys k0.. into the shared
// bytes at `offset`, completing on `bar`.
void ComponentKernel::tmaLoadBoxes(Value map, Value offset, Value k0,
                                   Value bar) {
  // Box coordinates after the column: (row, head, batch), or (plane, row
  // in the plane, head, batch) for r > 1.
  // A tile of 128 keys is two boxes of 64 rows, the second 64 rows (8 KB)
  // into the tile's panels.
  for (int64_t part = 0; part < blockKeys / 64; ++part) {
    Value t0 = part ? m.add(k0, m.c(64 * part)) : k0;
    SmallVector<Value> coords;
    if (period == 1)
      coords = {toI32(m.sub(keyPos(t0), kOrigin))};
    else
      coords = {toI32(plane), toI32(m.add(planeRow0, t0))};
    coords.append({toI32(hk), toI32(bIdx)});
    tmaLoadTile(map, part ? m.add(offset, m.c(part * 64 * 128)) : offset,
                coords, bar, /*panelBytes=*/blockKeys * 128);
  }
}

// The box coordinates of the 64 rows from gathered row t0 in q's and out's
// maps (which share them).
SmallVector<Value> ComponentKernel::queryBoxCoords(Value t0) {
  SmallVector<Value> coords;
  if (period == 1)
    coords = {toI32(qRowIndex(t0))};
  else
    coords = {toI32(qPlane), toI32(m.add(qPlaneRow0, t0))};
  coords.append({toI32(h), toI32(bIdx)});
  return coords;
}

// The leader fetches Q's tile (rows q0..) on `bar`: boxes of 64 rows, in
// the tile's panels of kBlockRows rows. Rows past the group's end arrive
// as they are (or as zeros past q's rows): they only make rows that are
// never stored, since no product mixes rows. issueQueryTile is the
// leader's part, where the caller is the leader.
void ComponentKernel::issueQueryTile(Value bar) {
  tmaExpectMoreBytes(bar, shape.qTileBytes());
  for (int64_t part = 0; part < kBlockRows / 64; ++part)
    tmaLoadTile(arg(QMap), m.c(part * 64 * 128),
                queryBoxCoords(m.add(q0, m.c(64 * part))), bar,
                /*panelBytes=*/kBlockRows * 128);
}

void ComponentKernel::tmaLoadQueryTile(Value bar) {
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                  /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(leader.thenBlock());
  issueQueryTile(bar);
}

// The leader fetches the K/V tile pair of keys k0.. into a slot.
void ComponentKernel::tmaLoadKeyTile(Value k0, Value slot) {
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                  /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(leader.thenBlock());
  // One arrival (the leader's) that expects both tiles' bytes.
  Value bar = barrierAt(slot);
  tmaExpectBytes(bar, 2 * keyTileBytes);
  tmaLoadBoxes(arg(KMap), keyOffset(slot), k0, bar);
  tmaLoadBoxes(arg(VMap), valueOffset(slot), k0, bar);
}

// Resident keys: the block's window of keys starts at q0 - hi, whether or
// not such keys exist: the leader fetches the K (or V) tiles of keys
// window + 64 i into every slot i, completing on one mbarrier. Keys outside
// the tensor arrive as zeros (TMA); keys outside [first, last) are masked,
// and V's rows there zeroed (zeroValueTail).
void ComponentKernel::residentLoad(Value bar, bool values) {
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                  /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(leader.thenBlock());
  tmaExpectBytes(bar, slots * keyTileBytes);
  for (int64_t i = 0; i < slots; ++i)
    tmaLoadBoxes(arg(values ? VMap : KMap), keyOffset(m.c(i)),
                 m.add(window, m.c(i * blockKeys)), bar);
}

// Waits for the phase of step `it` of the mbarrier `barrier()` builds: a
// slot's barrier completes one phase per tile through it, so step it waits
// for phase parity (it / slots) % 2. (The address is built after the
// parity: the PTX of the default kernels stays as it was.)
void ComponentKernel::waitTile(Value it, function_ref<Value()> barrier) {
  Value parity = toI32(arith::RemUIOp::create(
      b, loc, arith::DivUIOp::create(b, loc, it, m.c(slots)), m.c(2)));
  waitBarrierParity(barrier(), parity);
}

void ComponentKernel::waitKeyTile(Value it, Value slot) {
  waitTile(it, [&] { return barrierAt(slot); });
}

// A tile reaching past `last` holds keys no row attends; their scores are
// masked, so K's rows may hold anything, but P . V multiplies V's rows by
// zero and 0 * inf (say, padding past lengths[b]) would be NaN: zero those
// rows of V, as cp.async's zero fill does. A resident window's tiles may
// also start before `first`: their rows before it (keys of no row here, or
// zeros) are zeroed as well.
void ComponentKernel::zeroValueTail(Value k0, Value slot) {
  Value tailStart = m.sub(last, k0);
  Value headEnd = resident ? m.sub(first, k0) : Value();
  Value outside = m.lt(tailStart, m.c(blockKeys));
  if (resident)
    outside = m.either(outside, m.lt(zero, headEnd));
  auto edge = scf::IfOp::create(b, loc, TypeRange{}, outside,
                                /*withElse=*/false);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(edge.thenBlock());
  zeroTileRows(
      valueTile(slot),
      [&](Value row) {
        Value inTailRows = m.le(tailStart, row);
        if (resident)
          inTailRows = m.either(inTailRows, m.lt(row, headEnd));
        return inTailRows;
      },
      blockKeys);
  // The wgmmas read V through the async proxy.
  inlinePtx({}, {}, "fence.proxy.async.shared::cta;", "");
}

//===----------------------------------------------------------------------===//
// The prologue
//===----------------------------------------------------------------------===//

// The mbarriers (TMA), Q and the first key tile, waited for by every thread
// that computes.
void ComponentKernel::prologue() {
  if (tmaKeys) {
    initBarriers();
    if (ws)
      produceKeyTiles();
    else
      loadFirstTiles();
  } else {
    loadKeyTile(first, zero);
  }
  loadQueryByCopies();
  Value token = commitGroup();
  nvgpu::DeviceAsyncWaitOp::create(b, loc, token, b.getI32IntegerAttr(0));
  fenceForWgmma();
  consumerBarrier();
}

// The leader initialises every slot's mbarriers (resident keys: the K and
// the V barrier).
void ComponentKernel::initBarriers() {
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader,
                                  /*withElse=*/false);
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

// Warp specialisation: every thread sees the initialised barriers; then the
// producer warpgroup gives registers up and its thread 0 loads every key
// tile of the block, into slot it % slots once the consumers have handed
// back that slot's previous tile (its "empty" barrier, one arrival a
// phase). The consumer warpgroups take the registers and continue after
// this, with their own thread and warp numbers (from 0).
void ComponentKernel::produceKeyTiles() {
  gpu::BarrierOp::create(b, loc);
  auto split = scf::IfOp::create(b, loc, TypeRange{}, m.lt(tid, m.c(128)),
                                 /*withElse=*/true);
  b.setInsertionPointToStart(split.thenBlock());
  inlinePtx({}, {},
            "setmaxnreg.dec.sync.aligned.u32 " +
                std::to_string(kProducerRegisters) + ";",
            "");
  auto leader = scf::IfOp::create(b, loc, TypeRange{}, isLeader, false);
  b.setInsertionPointToStart(leader.thenBlock());
  {
    // Q's tile with the first key tile (a block without key tiles waits
    // for nothing, so it loads nothing).
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
  auto reuse =
      scf::IfOp::create(b, loc, TypeRange{}, m.le(m.c(slots), it), false);
  {
    OpBuilder::InsertionGuard g(b);
    b.setInsertionPointToStart(reuse.thenBlock());
    waitTile(m.sub(it, m.c(slots)), [&] { return emptyAt(slot); });
  }
  tmaLoadKeyTile(m.add(first, m.mul(it, m.c(blockKeys))), slot);
  b.setInsertionPointToStart(split.elseBlock());
  inlinePtx({}, {},
            "setmaxnreg.inc.sync.aligned.u32 " +
                std::to_string(kConsumerRegisters) + ";",
            "");
  tid = m.sub(tid, m.c(128));
  warp = arith::DivUIOp::create(b, loc, tid, m.c(32));
}

// Without warp specialisation: Q's tile and the first key tile by TMA (a
// resident block's K tiles), or the key tile by cp.async where the maps are
// empty. No load may be left in flight when the block exits.
void ComponentKernel::loadFirstTiles() {
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
    auto some =
        scf::IfOp::create(b, loc, TypeRange{}, m.lt(zero, numTiles), false);
    b.setInsertionPointToStart(some.thenBlock());
    loadQuery();
    tmaLoadKeyTile(first, zero);
  }
  b.setInsertionPointToStart(byTma.elseBlock());
  loadKeyTile(first, zero);
}

// Q's tile by cp.async where it does not come by TMA.
void ComponentKernel::loadQueryByCopies() {
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

//===----------------------------------------------------------------------===//
// The thread's rows and the softmax state
//===----------------------------------------------------------------------===//

void ComponentKernel::beginRows() {
  laneRow = arith::DivUIOp::create(b, loc, lane, m.c(4)); // lane / 4
  laneCol = m.mul(arith::RemUIOp::create(b, loc, lane, m.c(4)), m.c(2));
  warpRow = m.mul(warp, m.c(16));
  // This thread's two rows (gathered t).
  tq[0] = m.add(q0, m.add(warpRow, laneRow));
  tq[1] = m.add(tq[0], m.c(8));
  // Exclusions as ranges: the last key column before each row's excluded
  // segment, in 32 bits, worked out once (the edge tiles' window masks end
  // the row's run of columns there).
  if (exclusionsAsRanges(shape, comp))
    for (int64_t r2 = 0; r2 < 2; ++r2)
      lastBeforeExclusion[r2] =
          toI32(m.sub(excludedKeysFrom(comp, item, tq[r2]), m.c(1)));

  // Q fragments, kept in registers for the whole loop (mma.sync; wgmma
  // reads Q from shared memory).
  if (!shape.wgmma) {
    Value row = m.add(warpRow, arith::RemUIOp::create(b, loc, lane, m.c(16)));
    Value colOff = m.mul(arith::DivUIOp::create(b, loc, lane, m.c(16)), m.c(8));
    for (int64_t kk = 0; kk < D / 16; ++kk)
      qFrag.push_back(ldmatrix(qTile, row, m.add(colOff, m.c(kk * 16)), false));
  }
}

// The stored state of this thread's row `half`: its max (-inf for a row
// this block does not compute, which reads row 0 and weighs nothing), its
// sum l, and l on the quad leader only (the loop's l is summed over the
// quad at the end). A 16-bit state is O / l and the row's lse, which is all
// a merge needs: as max m' = lse / ln 2 (log2 units) and sum 1, the merge
// weighs O / l by 2^(m' - M) = l 2^(max - M), exactly as (max, l) would, so
// its kernels store and load no max and sum. `row` numbers the row in lse
// and the f32 state, `outAt` is its first element in out (a 16-bit state's
// home); both 0 for a row not computed.
ComponentKernel::StoredRow ComponentKernel::loadStoredRow(int64_t half) {
  StoredRow s;
  s.valid = m.lt(tq[half], q1);
  s.row = f.select(s.valid, m.add(qHead, qRowIndex(tq[half])), zero);
  s.outAt = f.select(
      s.valid, m.add(oBase, m.mul(qRowIndex(tq[half]), arg(OStrideR))), zero);
  Value mx;
  if (shape.halfState) {
    mx = f.mul(memref::LoadOp::create(b, loc, arg(Lse), s.row), f.c(M_LOG2E));
    s.sum = f.c(1.0);
  } else {
    mx = memref::LoadOp::create(b, loc, arg(Max), s.row);
    s.sum = memref::LoadOp::create(b, loc, arg(Sum), s.row);
  }
  s.max = f.select(s.valid, mx, f.negInf());
  s.leaderSum = f.select(m.both(s.valid, isQuadLeader), s.sum, f.c(0.0));
  return s;
}

// Columns dn*8 + laneCol and the next of a stored row as f32 O (0 where the
// row is not valid): each thread's pair is one load (f32 O, or O / l in 16
// bits, scaled back by the row's l).
SmallVector<Value> ComponentKernel::loadStoredPair(const StoredRow &s,
                                                   int64_t dn) {
  Value rowAt = shape.halfState ? s.outAt : m.mul(s.row, m.c(D));
  Value at = m.add(rowAt, m.add(laneCol, m.c(dn * 8)));
  SmallVector<Value> pair;
  for (Value a : loadStatePair(at, s.sum))
    pair.push_back(f.select(s.valid, a, f.c(0.0)));
  return pair;
}

// The loop's initial state: O (oFrags fragments of 4), then [max0, max1,
// sum0, sum1]. Empty, or the earlier components' state where the kernel
// continues it before its loop (loadsState without mergesAfterLoop).
void ComponentKernel::initialState() {
  isQuadLeader = m.eq(arith::RemUIOp::create(b, loc, lane, m.c(4)), zero);
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
}

//===----------------------------------------------------------------------===//
// One key tile: products, masks, softmax
//===----------------------------------------------------------------------===//

SmallVector<AccFrag> ComponentKernel::toFrags(ValueRange flat) {
  SmallVector<AccFrag> frags(flat.size() / 4);
  for (auto [i, v] : llvm::enumerate(flat))
    frags[i / 4][i % 4] = v;
  return frags;
}

SmallVector<Value> ComponentKernel::flatten(ArrayRef<AccFrag> frags) {
  SmallVector<Value> flat;
  for (const AccFrag &frag : frags)
    flat.append(frag.begin(), frag.end());
  return flat;
}

// S = Q K^T with wgmma, A = Q and B = K from shared memory, K-major: 8-row
// groups 1024 bytes apart (the leading offset is unused: a k16 step stays
// inside one 128-byte row); k step kk is 32 bytes into panel kk/4. (Q as a
// register A operand kept across the loop is miscompiled by ptxas 13.0 for
// D = 64: it reuses the registers after the first wgmma.) Warpgroup g
// multiplies Q rows 64g..64g+63. Issued only: the caller commits and waits.
SmallVector<Value> ComponentKernel::issueScoresWgmma(Value slot) {
  Value qDesc = tileDescriptor(
      m.mul(arith::DivUIOp::create(b, loc, warp, m.c(4)), m.c(64 * 128)), 16,
      1024);
  Value kDesc = tileDescriptor(keyOffset(slot), 16, 1024);
  // The first k step overwrites the accumulators (see wgmma()): they need
  // no zeros, only their types.
  SmallVector<Value> acc(keyNTiles * 4, f.c(0.0));
  for (int64_t kk = 0; kk < D / 16; ++kk) {
    int64_t inRow = (kk % 4) * 32;
    acc = wgmma(acc, advance(qDesc, (kk / 4) * qPanelBytes + inRow),
                advance(kDesc, (kk / 4) * kvPanelBytes + inRow),
                /*transposeB=*/false, /*accumulate=*/kk > 0);
  }
  return acc;
}

// S = Q K^T with mma.sync from the Q fragments and ldmatrix'ed K.
SmallVector<AccFrag> ComponentKernel::scoresMmaSync(Value slot) {
  return fragsTimesTileT(qFrag, keyTile(slot));
}

// The scores of the tile of keys k0..: key bias added, and -inf outside the
// component on edge tiles.
void ComponentKernel::biasAndMask(SmallVector<AccFrag> &s, Value k0) {
  if (shape.hasKeyBias)
    addKeyBias(s, k0);
  Value masked = edgeTile(k0);
  // Without filters (or with exclusions that are all key ranges), each
  // row's attended keys in a tile are one run of columns (windowMasked); a
  // band of 2^30 keys or more, and filters, take the predicate per element.
  const bool windowMask =
      (!comp.hasFilters() || exclusionsAsRanges(shape, comp)) &&
      (lo == ninf || std::abs(lo) < (int64_t(1) << 30)) &&
      (hi == inf || std::abs(hi) < (int64_t(1) << 30));
  SmallVector<Type> sTypes(keyNTiles * 4, f32);
  auto maskIf = scf::IfOp::create(b, loc, sTypes, masked, /*withElse=*/true);
  {
    OpBuilder::InsertionGuard g2(b);
    b.setInsertionPointToStart(maskIf.thenBlock());
    scf::YieldOp::create(
        b, loc, windowMask ? windowMasked(s, k0) : predicateMasked(s, k0));
    b.setInsertionPointToStart(maskIf.elseBlock());
    scf::YieldOp::create(b, loc, flatten(s));
  }
  s = toFrags(maskIf.getResults());
}

// key_bias[b, j] joins the score scale*q.k + bias; the scores here are q.k
// and scaled by scale*log2(e) in the softmax, so add bias / scale. Keys
// past `last` read key 0's bias: they lie in an edge tile and are masked.
void ComponentKernel::addKeyBias(SmallVector<AccFrag> &s, Value k0) {
  Value invScale = f.c(1.0 / shape.scale);
  Value biasRow = m.mul(bIdx, kLen);
  for (int64_t n = 0; n < keyNTiles; ++n)
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

// Whether the tile of keys k0.. is an edge tile, whose scores need masks:
// it is not wholly inside [fullLo, fullHi), or a filter may reach it.
Value ComponentKernel::edgeTile(Value k0) {
  Value masked =
      m.either(m.lt(k0, fullLo), m.lt(fullHi, m.add(k0, m.c(blockKeys))));
  if (!comp.getInclude().empty())
    return m.truth(true);
  if (!comp.getExclude().empty() && !exclusionsAsRanges(shape, comp)) {
    // An exclusion needs the per-element predicate only on tiles it can
    // reach (a union's later branch excludes the earlier branches, which
    // share few tiles with it): test the tile's position ranges, in the
    // predicate's coordinates, against each excluded pattern.
    Value pLo = m.add(qPos, m.mul(posStride, qRowIndex(q0)));
    Value pHi = m.add(qPos, m.mul(posStride, qRowIndex(m.sub(q1, one))));
    Value jLo = predicateKey(k0);
    Value jHi = predicateKey(m.add(k0, m.c(blockKeys - 1)));
    for (Attribute exc : comp.getExclude())
      masked = m.either(
          masked, buildPatternMayHitTile(b, loc, exc, pLo, pHi, jLo, jHi));
  }
  return masked;
}

// Without filters, each row's attended keys in this tile are one run of
// columns: key k0 + laneCol + cc (cc = 8n + e % 2, a constant per element)
// is inside when lower <= cc <= upper, with
//
//   u     = t - (k0 + laneCol)
//   upper = min(last - 1 - (k0 + laneCol), u - lo)   (-1 past q1)
//   lower = u - hi
//
// worked out per row and clamped to [-1, 64], so that each element costs
// one compare against a constant (a band with both ends folds its two into
// one unsigned compare: cc - lower <= upper - lower) and one select. The
// band, lengths and the group's end then cost nothing more per element
// (bench/gpu_ab.md, "Edge-tile masks as one run of columns per row"). In
// 32-bit arithmetic: gathered indices are below 2^31 (as the TMA
// coordinates already assume), and 64-bit tests per element took twice the
// instructions. u is clamped to [end - 1, end + 64] before an end is taken
// off, so nothing overflows.
SmallVector<Value> ComponentKernel::windowMasked(ArrayRef<AccFrag> s,
                                                 Value k0) {
  const bool rangesOnly = exclusionsAsRanges(shape, comp);
  auto c32 = [&](int64_t v) {
    return arith::ConstantIntOp::create(b, loc, i32, v).getResult();
  };
  auto clamp32 = [&](Value x, int64_t from, int64_t to) {
    return m.min(m.max(x, c32(from)), c32(to));
  };
  // x - end, clamped to the tile's columns [-1, 64].
  auto columnsPast = [&](Value x, int64_t end) {
    return arith::SubIOp::create(b, loc, clamp32(x, end - 1, end + blockKeys),
                                 c32(end));
  };
  Value col0 = toI32(m.add(k0, laneCol));
  Value lastCol =
      clamp32(arith::SubIOp::create(b, loc, toI32(m.sub(last, one)), col0), -1,
              blockKeys);
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
                             -1, blockKeys));
    upper[r2] = arith::SelectOp::create(b, loc, m.lt(row, q132), up, c32(-1));
    if (hi == inf)
      continue;
    Value low = columnsPast(u, hi);
    // A resident window may start before `first`.
    if (resident)
      low =
          m.max(low, clamp32(arith::SubIOp::create(b, loc, toI32(first), col0),
                             -1, blockKeys));
    // An empty run: no cc - lower is at most 0 (unsigned).
    Value empty = m.lt(upper[r2], low);
    lower[r2] = arith::SelectOp::create(b, loc, empty, c32(2 * blockKeys), low);
    span[r2] = arith::SelectOp::create(
        b, loc, empty, c32(0), arith::SubIOp::create(b, loc, upper[r2], low));
  }
  SmallVector<Value> out;
  for (int64_t n = 0; n < keyNTiles; ++n)
    for (int64_t e = 0; e < 4; ++e) {
      int64_t cc = n * 8 + e % 2, r2 = e / 2;
      Value inside =
          hi == inf ? m.le(c32(cc), upper[r2])
                    : m.cmp(arith::CmpIPredicate::ule,
                            arith::SubIOp::create(b, loc, c32(cc), lower[r2]),
                            span[r2]);
      out.push_back(f.select(inside, s[n][e], f.negInf()));
    }
  return out;
}

// Otherwise the band test and the filters' predicates per element.
SmallVector<Value> ComponentKernel::predicateMasked(ArrayRef<AccFrag> s,
                                                    Value k0) {
  SmallVector<Value> out;
  for (int64_t n = 0; n < keyNTiles; ++n)
    for (int64_t e = 0; e < 4; ++e) {
      Value t = tq[e / 2];
      Value tk = m.add(k0, m.add(laneCol, m.c(n * 8 + e % 2)));
      Value inside = m.both(m.lt(tk, last), m.lt(t, q1));
      if (resident)
        inside = m.both(inside, m.le(first, tk));
      inside = m.both(inside, pairInBand(comp, item, t, tk));
      out.push_back(f.select(inside, s[n][e], f.negInf()));
    }
  return out;
}

// Online softmax of one tile's scores s (turned into probabilities in
// place) against the running max and sum [max0, max1, sum0, sum1], with
// lazy rescaling: a row keeps its old max m unless the tile's max exceeds
// it by more than kRescaleSlack (in log2 units), so p = exp2(s*c - m) stays
// below 2^kRescaleSlack and O and l stay consistent with the m they were
// scaled by. The warp decides as one (vote.any), so in the common case - no
// row of the warp grew by that much - the D/2 multiplies of O by alpha are
// skipped. The first polynomialExps scores of each row half go by
// exp2Polynomial (see the constructor).
ComponentKernel::SoftmaxStep
ComponentKernel::softmaxStep(SmallVector<AccFrag> &s, ValueRange stats) {
  // One key tile's fragments, or all of a resident block's (the same share
  // of them by polynomial).
  const int64_t numFrags = s.size();
  const int64_t polynomials = polynomialExps * numFrags / keyNTiles;
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
    grows = m.either(grows,
                     f.gt(tileMaxC[half], f.add(oldMax, f.c(kRescaleSlack))));
  }
  SoftmaxStep step;
  step.rescale = NVVM::VoteSyncOp::create(
      b, loc, b.getI1Type(), arith::ConstantIntOp::create(b, loc, i32, -1),
      grows, NVVM::VoteSyncKind::any);
  Value newMax[2], newSum[2];
  for (int64_t half = 0; half < 2; ++half) {
    Value oldMax = stats[half];
    Value oldSum = stats[2 + half];
    Value mx = f.select(step.rescale, f.max(oldMax, tileMaxC[half]), oldMax);
    // A row that has seen no key keeps -inf; exponentiate against 0 then.
    Value mUse = f.select(f.eq(mx, f.negInf()), f.c(0.0), mx);
    step.alpha[half] = exp2(f.sub(oldMax, mUse));
    Value sum = f.select(step.rescale, f.mul(oldSum, step.alpha[half]), oldSum);
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
}

// O * alpha, the multiply only where the warp rescales.
SmallVector<Value> ComponentKernel::rescaleAcc(ValueRange o,
                                               const SoftmaxStep &step) {
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
}

// O += P V with wgmma, P (as i32 registers) from registers, V is B = [keys
// x D] with D contiguous (MN-major, transposed): the 64-column panels are
// 8192 bytes apart (leading offset), 8-key groups 1024 (stride offset); k
// step j starts 16 keys = 2048 bytes on. Issued only. With `fresh`,
// O = P V: o only gives the accumulators' types.
SmallVector<Value> ComponentKernel::issueValuesWgmma(ValueRange o, ValueRange p,
                                                     Value slot, bool fresh) {
  Value vDesc = tileDescriptor(valueOffset(slot), kvPanelBytes, 1024);
  SmallVector<Value> acc(o);
  for (int64_t j = 0; j < keyNTiles / 2; ++j)
    acc = wgmma(acc, p.slice(j * 4, 4), advance(vDesc, j * 2048),
                /*transposeB=*/true, /*accumulate=*/!fresh || j > 0);
  return acc;
}

// O += P V with mma.sync and ldmatrix'ed (transposed) V.
SmallVector<AccFrag> ComponentKernel::valuesMmaSync(SmallVector<AccFrag> o,
                                                    ArrayRef<Value> p,
                                                    Value slot) {
  return addPackedTimesTileMmaSync(std::move(o), p, valueTile(slot));
}

//===----------------------------------------------------------------------===//
// The key loops
//===----------------------------------------------------------------------===//

// Warp specialisation: the consumers hand a slot back to the producer.
void ComponentKernel::handBack(Value slot) {
  inlinePtx({}, {emptyAt(slot)}, "mbarrier.arrive.shared::cta.b64 _, [$0];",
            "r");
}

// Waits for key tile `it`; on an edge tile both warpgroups zero V's rows
// past `last` (the same zeros) and meet before either reads them.
void ComponentKernel::awaitKeyTile(Value it, Value slot, Value k0) {
  waitKeyTile(it, slot);
  auto edge = scf::IfOp::create(b, loc, TypeRange{},
                                m.lt(m.sub(last, k0), m.c(blockKeys)), false);
  OpBuilder::InsertionGuard g2(b);
  b.setInsertionPointToStart(edge.thenBlock());
  zeroValueTail(k0, slot);
  consumerBarrier();
}

Value ComponentKernel::slotOf(Value it) {
  return arith::RemUIOp::create(b, loc, it, m.c(slots));
}

// The consumers' key loop of a warp-specialised kernel, after
// FlashAttention-3:
//
//   S(0); softmax(0)
//   step it = 1 .. n-1:  issue S(it) and P.V(it-1); wait for S(it) only;
//                        softmax(it) while P.V(it-1) runs; wait for it;
//                        hand slot it-1 back; O *= alpha(it)
//   P.V(n-1)
//
// O and P stay in flight across the softmax: the consumers' 160 registers
// hold them (ptxas serializes the wgmmas at 128, C7512). Three warpgroups
// interleave on their own; ping-pong turns between two (named barriers) did
// not pay (bench/gpu_ab.md).
SmallVector<Value> ComponentKernel::overlappedLoop() {
  SmallVector<Type> types;
  for (Value v : init)
    types.push_back(v.getType());
  auto some = scf::IfOp::create(b, loc, types, m.lt(zero, numTiles), true);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(some.elseBlock());
  scf::YieldOp::create(b, loc, init);
  b.setInsertionPointToStart(some.thenBlock());

  // O and P (as i32 pairs) through wgmma.fence: P.V reads both.
  const int64_t oRegs = oFrags * 4, pRegs = keyNTiles / 2 * 4;
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
  SmallVector<AccFrag> s0 = toFrags(wgmmaCommitAndWait(issueScoresWgmma(zero)));
  biasAndMask(s0, first);
  SoftmaxStep step0 = softmaxStep(s0, ArrayRef<Value>(init).drop_front(oRegs));
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
    Value k0 = m.add(first, m.mul(it, m.c(blockKeys)));
    awaitKeyTile(it, slot, k0);
    SmallVector<Value> fenced =
        fencedValues(state.take_front(oRegs), state.take_back(pRegs));
    SmallVector<Value> scores = wgmmaCommit(issueScoresWgmma(slot));
    SmallVector<Value> o = issueValues(fenced, prevSlot);
    SmallVector<AccFrag> s = toFrags(wgmmaWait(scores, 1));
    biasAndMask(s, k0);
    SoftmaxStep step = softmaxStep(s, state.drop_front(oRegs).take_front(4));
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
}

// Resident keys (residentKeyTiles): every key tile of the block is in its
// slot after one mbarrier phase, and the whole row is one step:
//
//   wait for K; S[i] = Q . K[i]^T for every slot i (one commit group)
//   barrier (no warp reads K any more); the leader loads V[i] into K[i]
//   mask each tile; softmax with one max and one sum per row (O is 0:
//     nothing to rescale)
//   wait for V; zero its rows outside [first, last); O = sum over i of
//     P[i] . V[i]
//
// The softmax runs while V arrives.
SmallVector<Value> ComponentKernel::residentStep() {
  const int64_t oRegs = oFrags * 4, pRegs = keyNTiles / 2 * 4;
  // Tile i holds keys window + 64 i.
  auto tileK0 = [&](int64_t i) { return m.add(window, m.c(i * blockKeys)); };
  waitKeyTile(zero, zero);
  inlinePtx({}, {}, "wgmma.fence.sync.aligned;", "");
  SmallVector<Value> scores;
  for (int64_t i = 0; i < slots; ++i)
    llvm::append_range(scores, issueScoresWgmma(m.c(i)));
  SmallVector<AccFrag> s = toFrags(wgmmaCommitAndWait(scores));
  gpu::BarrierOp::create(b, loc);
  residentLoad(barrierAt(one), /*values=*/true);
  for (int64_t i = 0; i < slots; ++i) {
    auto from = s.begin() + i * keyNTiles;
    SmallVector<AccFrag> tile(from, from + keyNTiles);
    biasAndMask(tile, tileK0(i));
    std::copy(tile.begin(), tile.end(), from);
  }
  SoftmaxStep step = softmaxStep(s, ArrayRef<Value>(init).drop_front(oRegs));
  SmallVector<Value> operands;
  for (Value reg : packAccumulators(s))
    operands.push_back(asI32(reg));
  waitTile(zero, [&] { return barrierAt(one); });
  {
    Value windowEnd = m.add(window, m.c(slots * blockKeys));
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
}

// One step per key tile: wait for the tile; after the barrier every warp is
// also done with the previous one, so the next tile can load into its slot
// while this one computes (one barrier per tile). cp.async zero-fills rows
// past the last key; TMA brings them as they are, so V's are zeroed (only
// tiles that a later step waits for are loaded: none may be in flight when
// the block exits).
SmallVector<Value> ComponentKernel::pipelinedLoop() {
  auto loop = scf::ForOp::create(b, loc, zero, numTiles, one, init);
  {
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(loop.getBody());
    Value it = loop.getInductionVar();
    ValueRange state = loop.getRegionIterArgs();
    Value k0 = m.add(first, m.mul(it, m.c(blockKeys)));
    Value slot = arith::RemUIOp::create(b, loc, it, m.c(slots));
    Value nextSlot = m.sub(one, slot);
    Value nextK0 = m.add(k0, m.c(blockKeys));
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
  return SmallVector<Value>(loop.getResults());
}

//===----------------------------------------------------------------------===//
// After the loop: the merge and the stores
//===----------------------------------------------------------------------===//

// The earlier components' state of this block's rows (m', l', O'), merged
// into the loop's (m, l, O) per row: both move to M = max(m, m'),
// O = O 2^(m - M) + O' 2^(m' - M), likewise l (l' on the quad leader only:
// the loop's l is summed over the quad at the end). An empty state (max
// -inf) weighs nothing. The kernel is a programmatic dependent launch of
// the one before (the runtime's "dependent_launch"): everything before ran
// while that one finished, and griddepcontrol.wait waits for its results
// here.
SmallVector<Value> ComponentKernel::mergeEarlierState(ArrayRef<Value> own) {
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
}

// Rows written: out every existing row (those not computed, past
// lengths[b], as 0 / -inf); `begin` every existing row (those it does not
// compute hold the empty state, as init would have left them); `update`
// only its own rows: those before writtenEnd.
Value ComponentKernel::rowWritten(Value t) { return m.lt(t, writtenEnd); }

// Where staged element (row, 8 dn + e) sits in rowTile, e < 8.
SmallVector<Value, 2> ComponentKernel::stagedAt(Value row, Value dn, Value e) {
  if (storeByTma)
    return {m.add(swizzledOffset(row, dn, kBlockRows), e)};
  return {row, m.add(m.mul(dn, m.c(8)), e)};
}

// Whether the 64-row part `part` of the block's rows leaves by TMA.
Value ComponentKernel::partByTma(Value part) {
  Value end = m.add(q0, m.mul(m.add(part, one), m.c(64)));
  return m.both(useTmaQ, m.le(end, writtenEnd));
}

// The loop's final rows, normalized: out and lse (`single`, `end`), or the
// state (a 16-bit state as O / sum and lse, in out; an f32 state as O, max
// and sum). 16-bit rows go through shared memory (free once every warp has
// left the loop): each thread writes its normalized pairs into rows of
// D + 8 elements (the 8 rows of a store then fall in different banks), and
// each warp copies its 16 rows out in 16-byte pieces, whole rows per store.
// With TMA the staged rows take Q's tile, in its swizzled panels (of
// kBlockRows rows), and each 64-row part whose rows are all written leaves
// by TMA stores through out's map (thread 0 issues them and waits until
// they have read shared memory); the threads store the other parts as
// before (rows past the group's end inside the tensor, or no map). An f32
// state is stored directly.
void ComponentKernel::storeRows(ValueRange fin) {
  Value ln2 = f.c(M_LN2);
  if (storeByTma) {
    consumerBarrier();
    rowTile = sharedTile(dyn, zero, kBlockRows);
  } else if (staged) {
    consumerBarrier();
    auto workgroup =
        gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
    auto type = MemRefType::get({kBlockRows, D + 8}, f16,
                                MemRefLayoutAttrInterface{}, workgroup);
    rowTile = memref::ViewOp::create(
        b, loc, type, dyn, shape.wgmma ? tilesOffset : zero, ValueRange{});
  }
  writtenEnd = writesOut || mode == StateMode::Begin ? tRowAll : q1;
  for (int64_t half = 0; half < 2; ++half) {
    Value t = tq[half];
    Value valid = m.lt(t, q1);
    Value mx = fin[oFrags * 4 + half];
    Value sum = quadReduce(fin[oFrags * 4 + 2 + half], /*isMax=*/false);
    Value rowIdx = m.add(qHead, qRowIndex(t));
    Value ok = m.both(valid, f.gt(sum, f.c(0.0)));
    if (staged) {
      Value inv =
          f.select(ok, arith::DivFOp::create(b, loc, f.c(1.0), sum), f.c(0.0));
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
  if (!staged)
    return;
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
        auto whole =
            scf::IfOp::create(b, loc, TypeRange{}, partByTma(m.c(part)), false);
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
    Value col =
        m.mul(arith::RemUIOp::create(b, loc, chunk, m.c(chunksPerRow)), m.c(8));
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

} // namespace mlir::attn::gpu_codegen
