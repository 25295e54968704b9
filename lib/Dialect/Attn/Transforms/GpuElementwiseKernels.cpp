//===- GpuElementwiseKernels.cpp - kernels over every element -------------===//
//
// The element-wise kernels of a package, one thread per 8 elements of
// B*H*Lq*D: the forward's init (the empty state) and finalize (out and
// lse from the state), the backward's grad_prepare (delta = dO . O per
// row) and the ring backward's grad_add (key gradients from peers).
//
//===----------------------------------------------------------------------===//

#include "GpuKernelEmitter.h"

using namespace mlir;

namespace mlir::attn::gpu_codegen {

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

} // namespace mlir::attn::gpu_codegen
