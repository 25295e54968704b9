//===- DedupKernel.cpp - the unique ids of token sequences, on the GPU ----===//
//
// The dedup_keys kernel of DedupKernel.h. One block of 1024 threads takes one
// sequence:
//
//   1. its ids (padded to P = 2^logP with the largest i64) and positions
//      into shared memory;
//   2. a bitonic sort of the ids, ascending, positions carried along: for
//      k = 2, 4, ..., P and j = k/2, ..., 1 every thread compares pairs
//      (a, a + j), a = 2i - (i mod j), swapping where they are out of the
//      order of their k-block (ascending where a & k == 0);
//   3. run starts: element i < n starts a run where i == 0 or id[i] !=
//      id[i-1]. Each thread takes P/1024 consecutive elements (one, for
//      P <= 1024), counts its starts, and a block-wide exclusive prefix
//      sum (warp shuffles, then the warps' totals) gives the run number of
//      its first element; U = the last total;
//   4. walking its elements again, a thread writes each position's slot
//      (its run number) and, at a run's start, the run's id and its start
//      index (into keyBias, as a float: exact below 2^24); after a barrier
//      the thread holding the run's last element turns the start into
//      log(count) = log2(end - start + 1) * ln 2;
//   5. slots U.. of keyIds/keyBias get 0 and -inf, positions n.. slot -1.
//
// The kernel writes only at indices below L derived from positions and run
// numbers, whatever the ids are: the caller checks info's smallest and
// largest id before it reads tables at them.
//
//===----------------------------------------------------------------------===//

#include "DedupKernel.h"

#include "attn/Utils/FloatMath.h"
#include "attn/Utils/IndexMath.h"

#include "mlir/Dialect/LLVMIR/LLVMDialect.h"
#include "mlir/Dialect/MemRef/IR/MemRef.h"
#include "mlir/Dialect/SCF/IR/SCF.h"

#include <cmath>
#include <limits>

using namespace mlir;
using namespace mlir::attn;

namespace {

/// The kernel's builder state: the arguments and the shared arrays.
struct DedupEmitter {
  OpBuilder &b;
  Location loc;
  IndexMath m;
  FloatMath f;
  Type i32, i64, f32;
  Value tid, lane, warp;
  Value keys, positions, totals; // shared: i64 [P], i32 [P], i32 [32]

  DedupEmitter(OpBuilder &b, Location loc)
      : b(b), loc(loc), m{b, loc}, f{b, loc}, i32(b.getI32Type()),
        i64(b.getI64Type()), f32(b.getF32Type()) {}

  Value toIndex(Value x) {
    return arith::IndexCastOp::create(b, loc, b.getIndexType(), x);
  }
  Value toI64(Value x) { return arith::IndexCastOp::create(b, loc, i64, x); }
  Value toI32(Value x) { return arith::IndexCastOp::create(b, loc, i32, x); }
  Value load(Value mem, Value at) {
    return memref::LoadOp::create(b, loc, mem, ValueRange{at});
  }
  void store(Value v, Value mem, Value at) {
    memref::StoreOp::create(b, loc, v, mem, ValueRange{at});
  }
  void barrier() { gpu::BarrierOp::create(b, loc); }

  /// for (i = tid; i < n; i += 1024) body(i)
  template <typename Fn> void forThreadStrided(Value n, Fn body) {
    auto loop = scf::ForOp::create(b, loc, tid, n, m.c(kDedupThreads));
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(loop.getBody());
    body(loop.getInductionVar());
  }
  /// if (cond) body()
  template <typename Fn> void ifThen(Value cond, Fn body) {
    auto op = scf::IfOp::create(b, loc, TypeRange{}, cond, false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(op.thenBlock());
    body();
  }

  /// Whether sorted element i (< P) starts a run of the first n.
  Value startsRun(Value i, Value n) {
    Value zero = m.c(0);
    Value prev = m.max(m.sub(i, m.c(1)), zero);
    Value differs = arith::CmpIOp::create(b, loc, arith::CmpIPredicate::ne,
                                          load(keys, i), load(keys, prev));
    return m.both(m.lt(i, n), m.either(m.eq(i, zero), differs));
  }

  /// Inclusive prefix sum of an i32 over the block (every thread calls
  /// it); also returns the block's total.
  std::pair<Value, Value> blockInclusiveSum(Value v) {
    auto warpScan = [&](Value x) {
      for (int32_t off = 1; off < 32; off *= 2) {
        Value offset = arith::ConstantIntOp::create(b, loc, i32, off);
        Value width = arith::ConstantIntOp::create(b, loc, i32, 32);
        Value up = gpu::ShuffleOp::create(b, loc, x, offset, width,
                                          gpu::ShuffleMode::UP)
                       .getShuffleResult();
        Value has = m.le(m.c(off), lane);
        x = arith::AddIOp::create(
            b, loc, x,
            arith::SelectOp::create(
                b, loc, has, up, arith::ConstantIntOp::create(b, loc, i32, 0)));
      }
      return x;
    };
    Value inWarp = warpScan(v);
    ifThen(m.eq(lane, m.c(31)), [&] { store(inWarp, totals, warp); });
    barrier();
    ifThen(m.eq(warp, m.c(0)), [&] {
      store(warpScan(load(totals, lane)), totals, lane);
    });
    barrier();
    Value before = arith::SelectOp::create(
        b, loc, m.eq(warp, m.c(0)), arith::ConstantIntOp::create(b, loc, i32, 0),
        load(totals, m.max(m.sub(warp, m.c(1)), m.c(0))));
    Value total = load(totals, m.c(31));
    return {arith::AddIOp::create(b, loc, before, inWarp), total};
  }
};

} // namespace

gpu::GPUFuncOp mlir::attn::emitDedupKeysKernel(OpBuilder &b, Location loc,
                                               int64_t maxLen) {
  MLIRContext *ctx = b.getContext();
  auto global = gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Global);
  auto memOf = [&](Type t) {
    return MemRefType::get({ShapedType::kDynamic}, t,
                           MemRefLayoutAttrInterface{}, global);
  };
  Type i32 = b.getI32Type(), i64 = b.getI64Type(), f32 = b.getF32Type();
  Type index = b.getIndexType();
  auto type = FunctionType::get(
      ctx,
      {memOf(i64), memOf(i64), memOf(i32), memOf(f32), memOf(i64), memOf(i64),
       index, index},
      {});
  auto func = gpu::GPUFuncOp::create(b, loc, "dedup_keys", type);
  func->setAttr(gpu::GPUDialect::getKernelFuncAttrName(), b.getUnitAttr());
  func.setKnownBlockSizeAttr(
      b.getDenseI32ArrayAttr({int32_t(kDedupThreads), 1, 1}));
  // The runtime's launch plan (GpuTarget writes it to the manifest): one
  // block a sequence, at most maxLen ids.
  func->setAttr(
      "attn.launch",
      b.getDictionaryAttr(
          {b.getNamedAttr("kind", b.getStringAttr("dedup_keys")),
           b.getNamedAttr("block", b.getI64IntegerAttr(kDedupThreads)),
           b.getNamedAttr("shared_bytes",
                          b.getI64IntegerAttr(dedupSharedBytes(maxLen))),
           b.getNamedAttr("max_len", b.getI64IntegerAttr(maxLen))}));
  Block *entry = &func.getBody().front();
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(entry);
  DedupEmitter e(b, loc);
  IndexMath &m = e.m;
  Value tokens = entry->getArgument(0), lengths = entry->getArgument(1);
  Value keyIds = entry->getArgument(2), keyBias = entry->getArgument(3);
  Value slotAt = entry->getArgument(4), info = entry->getArgument(5);
  Value L = entry->getArgument(6), logP = entry->getArgument(7);

  e.tid = gpu::ThreadIdOp::create(b, loc, gpu::Dimension::x);
  e.lane = arith::RemUIOp::create(b, loc, e.tid, m.c(32));
  e.warp = arith::DivUIOp::create(b, loc, e.tid, m.c(32));
  Value seq = gpu::BlockIdOp::create(b, loc, gpu::Dimension::x);
  Value row = m.mul(seq, L); // the sequence's first element in [B, L]
  Value P = arith::ShLIOp::create(b, loc, m.c(1), logP);

  auto workgroup =
      gpu::AddressSpaceAttr::get(ctx, gpu::AddressSpace::Workgroup);
  Value shared = gpu::DynamicSharedMemoryOp::create(
      b, loc,
      MemRefType::get({ShapedType::kDynamic}, b.getI8Type(),
                      MemRefLayoutAttrInterface{}, workgroup));
  auto sharedOf = [&](Type t, Value byteOffset, Value count) {
    auto viewType = MemRefType::get({ShapedType::kDynamic}, t,
                                    MemRefLayoutAttrInterface{}, workgroup);
    return memref::ViewOp::create(b, loc, viewType, shared, byteOffset,
                                  ValueRange{count});
  };
  e.keys = sharedOf(i64, m.c(0), P);
  e.positions = sharedOf(i32, m.mul(P, m.c(8)), P);
  e.totals = sharedOf(i32, m.mul(P, m.c(12)), m.c(kDedupThreads / 32));

  // n = clamp(lengths[b], 0, L).
  Value given = e.load(lengths, seq);
  Value n = m.min(m.max(e.toIndex(given), m.c(0)), L);

  // 1. Ids and positions; padding sorts last.
  Value padding = arith::ConstantIntOp::create(
      b, loc, i64, std::numeric_limits<int64_t>::max());
  e.forThreadStrided(P, [&](Value i) {
    Value inside = m.lt(i, n);
    Value at = arith::SelectOp::create(b, loc, inside, m.add(row, i), row);
    Value id = e.load(tokens, at);
    e.store(arith::SelectOp::create(b, loc, inside, id, padding), e.keys, i);
    e.store(e.toI32(i), e.positions, i);
  });
  e.barrier();

  // 2. Bitonic sort: stage s (k = 2^s), step t (j = 2^(s-1-t)).
  {
    auto stages = scf::ForOp::create(b, loc, m.c(1), m.add(logP, m.c(1)),
                                     m.c(1));
    OpBuilder::InsertionGuard g1(b);
    b.setInsertionPointToStart(stages.getBody());
    Value s = stages.getInductionVar();
    Value k = arith::ShLIOp::create(b, loc, m.c(1), s);
    auto steps = scf::ForOp::create(b, loc, m.c(0), s, m.c(1));
    b.setInsertionPointToStart(steps.getBody());
    Value j = arith::ShLIOp::create(
        b, loc, m.c(1), m.sub(m.sub(s, m.c(1)), steps.getInductionVar()));
    e.forThreadStrided(arith::DivUIOp::create(b, loc, P, m.c(2)),
                       [&](Value i) {
      Value a = m.sub(m.mul(i, m.c(2)),
                      arith::AndIOp::create(b, loc, i, m.sub(j, m.c(1))));
      Value c = m.add(a, j);
      Value ascending =
          m.eq(arith::AndIOp::create(b, loc, a, k), m.c(0));
      Value ka = e.load(e.keys, a), kc = e.load(e.keys, c);
      Value greater = arith::CmpIOp::create(b, loc, arith::CmpIPredicate::sgt,
                                            ka, kc);
      Value less = arith::CmpIOp::create(b, loc, arith::CmpIPredicate::slt,
                                         ka, kc);
      Value swap = arith::SelectOp::create(b, loc, ascending, greater, less);
      e.ifThen(swap, [&] {
        Value pa = e.load(e.positions, a), pc = e.load(e.positions, c);
        e.store(kc, e.keys, a);
        e.store(ka, e.keys, c);
        e.store(pc, e.positions, a);
        e.store(pa, e.positions, c);
      });
    });
    e.barrier();
  }

  // The sequence's counts for the caller's checks.
  e.ifThen(m.eq(e.tid, m.c(0)), [&] {
    Value some = m.lt(m.c(0), n);
    Value zero64 = arith::ConstantIntOp::create(b, loc, i64, 0);
    Value last = m.max(m.sub(n, m.c(1)), m.c(0));
    Value at = m.mul(seq, m.c(4));
    e.store(given, info, m.add(at, m.c(1)));
    e.store(arith::SelectOp::create(b, loc, some, e.load(e.keys, m.c(0)), zero64),
            info, m.add(at, m.c(2)));
    e.store(arith::SelectOp::create(b, loc, some, e.load(e.keys, last), zero64),
            info, m.add(at, m.c(3)));
  });

  // 3. Each thread's elements [first, first + chunk): chunk = max(1, P/1024).
  Value chunk = m.max(arith::DivUIOp::create(b, loc, P, m.c(kDedupThreads)),
                      m.c(1));
  Value first = m.mul(e.tid, chunk);
  Value end = m.min(m.add(first, chunk), P);
  Value zero32 = arith::ConstantIntOp::create(b, loc, i32, 0);
  Value one32 = arith::ConstantIntOp::create(b, loc, i32, 1);
  // body(i, run number of i) for this thread's elements, `runBefore` being
  // the number of the run before its first element; returns runBefore plus
  // the runs that start in them.
  auto walk = [&](Value runBefore, function_ref<void(Value, Value)> body) {
    auto loop = scf::ForOp::create(b, loc, first, m.max(end, first), m.c(1),
                                   ValueRange{runBefore});
    OpBuilder::InsertionGuard g(b);
    b.setInsertionPointToStart(loop.getBody());
    Value i = loop.getInductionVar();
    Value run = arith::AddIOp::create(
        b, loc, loop.getRegionIterArgs()[0],
        arith::SelectOp::create(b, loc, e.startsRun(i, n), one32, zero32));
    body(i, run);
    scf::YieldOp::create(b, loc, ValueRange{run});
    return loop.getResult(0);
  };
  // The run starts among this thread's elements.
  Value starts = walk(zero32, [](Value, Value) {});
  auto [inclusive, unique] = e.blockInclusiveSum(starts);
  // The run number before this thread's first element: starts before it,
  // minus one.
  Value runBefore = arith::SubIOp::create(
      b, loc, arith::SubIOp::create(b, loc, inclusive, starts), one32);
  e.ifThen(m.eq(e.tid, m.c(0)), [&] {
    e.store(arith::ExtSIOp::create(b, loc, i64, unique), info,
            m.mul(seq, m.c(4)));
  });

  // 4. Slots of positions; ids and start indices of runs.
  walk(runBefore, [&](Value i, Value run) {
    e.ifThen(m.lt(i, n), [&] {
      Value runIndex = e.toIndex(run);
      Value position = e.toIndex(e.load(e.positions, i));
      e.store(arith::ExtSIOp::create(b, loc, i64, run), slotAt,
              m.add(row, position));
      e.ifThen(e.startsRun(i, n), [&] {
        e.store(arith::TruncIOp::create(b, loc, i32, e.load(e.keys, i)),
                keyIds, m.add(row, runIndex));
        e.store(arith::SIToFPOp::create(b, loc, f32, e.toI32(i)), keyBias,
                m.add(row, runIndex));
      });
    });
  });
  e.barrier();
  // ... then log(count) where each run ends.
  walk(runBefore, [&](Value i, Value run) {
    Value next = m.min(m.add(i, m.c(1)), m.sub(P, m.c(1)));
    Value endsRun = m.both(
        m.lt(i, n),
        m.either(m.eq(i, m.sub(n, m.c(1))),
                 arith::CmpIOp::create(b, loc, arith::CmpIPredicate::ne,
                                       e.load(e.keys, next),
                                       e.load(e.keys, i))));
    e.ifThen(endsRun, [&] {
      Value at = m.add(row, e.toIndex(run));
      Value start = e.load(keyBias, at);
      Value count = e.f.add(
          e.f.sub(arith::SIToFPOp::create(b, loc, f32, e.toI32(i)), start),
          e.f.c(1.0f));
      Value log2 = LLVM::CallIntrinsicOp::create(
                       b, loc, f32, b.getStringAttr("llvm.nvvm.lg2.approx.f"),
                       ValueRange{count})
                       .getResult(0);
      e.store(e.f.mul(log2, e.f.c(float(M_LN2))), keyBias, at);
    });
  });

  // 5. Past the unique ids and past the length.
  Value u = e.toIndex(unique);
  e.forThreadStrided(L, [&](Value r) {
    e.ifThen(m.le(u, r), [&] {
      e.store(zero32, keyIds, m.add(row, r));
      e.store(e.f.negInf(), keyBias, m.add(row, r));
    });
    e.ifThen(m.le(n, r), [&] {
      e.store(arith::ConstantIntOp::create(b, loc, i64, -1), slotAt,
              m.add(row, r));
    });
  });
  gpu::ReturnOp::create(b, loc);
  return func;
}
