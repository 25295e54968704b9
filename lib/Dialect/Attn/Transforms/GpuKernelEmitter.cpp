//===- GpuKernelEmitter.cpp - what every kernel of a package uses ---------===//
//
// KernelEmitter's building blocks, shared by the forward's and the
// backward's kernels: the kernel entry, lane reductions, mma.sync and
// ldmatrix fragments, warpgroup MMAs in inline PTX, shared-memory tiles
// (padded or 128-byte swizzled), cp.async and TMA copies with their
// mbarriers, and where a block's group of rows and keys lies.
//
//===----------------------------------------------------------------------===//

#include "GpuKernelEmitter.h"

using namespace mlir;

namespace mlir::attn::gpu_codegen {

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

void KernelEmitter::zeroTileRows(Value tile, function_ref<Value(Value)> zeroed,
                                 int64_t rows) {
  const int64_t chunksPerRow = shape.headDim / 8;
  auto zeros = arith::ConstantOp::create(
      b, loc,
      DenseElementsAttr::get(VectorType::get({8}, f16), b.getZeroAttr(f16)));
  const int64_t chunks = rows * chunksPerRow;
  for (int64_t pass = 0; pass * shape.threads() < chunks; ++pass) {
    Value idx = m.add(tid, m.c(pass * shape.threads()));
    Value row = arith::DivUIOp::create(b, loc, idx, m.c(chunksPerRow));
    Value chunk = arith::RemUIOp::create(b, loc, idx, m.c(chunksPerRow));
    Value inRows = zeroed(row);
    // (A last pass that only some threads fill when the threads do not
    // divide the chunks: rows past the tile are not in it.)
    if ((pass + 1) * shape.threads() > chunks)
      inRows = m.both(inRows, m.lt(row, m.c(rows)));
    auto ifRow = scf::IfOp::create(b, loc, TypeRange{}, inRows, false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(ifRow.thenBlock());
    vector::StoreOp::create(b, loc, zeros, tile,
                            swizzledOffset(row, chunk, rows));
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

} // namespace mlir::attn::gpu_codegen
