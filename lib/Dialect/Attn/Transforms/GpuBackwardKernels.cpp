//===- GpuBackwardKernels.cpp - grad_q and grad_kv ------------------------===//
//
// The backward pass's kernels per component (docs/Backward.md): grad_q
// walks the forward's key tiles for a block of rows, grad_kv the query
// tiles that attend a block of keys; both recompute P from the
// forward's lse and share the forward's closed-form schedules.
//
//===----------------------------------------------------------------------===//

#include "GpuKernelEmitter.h"

using namespace mlir;

namespace mlir::attn::gpu_codegen {

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

SmallVector<AccFrag> KernelEmitter::rowsTimesTileT(Value aOffset,
                                                   Value bOffset) {
  const int64_t D = shape.headDim;
  if (shape.wgmma) {
    // The forward's S = Q K^T (ComponentKernel::issueScoresWgmma): both
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
  // On sm_90a the runtime launches every backward kernel after a round's
  // first as a programmatic dependent launch of the one before
  // (Package::runGpuBackward): the next may start once every block of this
  // one has started, and waits (dependencyWait) before it writes.
  if (shape.wgmma)
    inlinePtx({}, {}, "griddepcontrol.launch_dependents;", "");
  return cx;
}

Value KernelEmitter::walkedTile(Value slot, int64_t which) {
  Value tileIndex = m.add(m.c(2 + which), m.mul(slot, m.c(2)));
  return m.mul(tileIndex, m.c(shape.kvTileBytes()));
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

void KernelEmitter::dependencyWait() {
  if (shape.wgmma)
    inlinePtx({}, {}, "griddepcontrol.wait;", "");
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

  // The forward's key range of rows [q0, q1) (ComponentKernel::itemRange).
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
  dependencyWait();
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
  dependencyWait();
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
  dependencyWait();
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
  dependencyWait();
  gpu::ReturnOp::create(b, loc);
  func->setAttr("attn.launch", gradLaunch("grad_kv", sharedBytes, comp));
  return func;
}

} // namespace mlir::attn::gpu_codegen
