//===- DedupKernel.cpp - the unique ids of token sequences, on the GPU ----===//
//
// The three dedup kernels of DedupKernel.h, run in this order (the first
// two only for sequences longer than one chunk, P > Q = kDedupChunk):
//
//   dedup_sort_chunks   grid (B, chunks): block (b, c) sorts the ids at
//                       positions [cQ, cQ + Q) of sequence b (ids past the
//                       length, and the padding up to Q, get the largest
//                       i64) with a bitonic network in shared memory,
//                       ordering (id, position) pairs: for k = 2, 4, ..., Q
//                       and j = k/2, ..., 1 every thread compares pairs
//                       (a, a + j), a = 2i - (i mod j), swapping where they
//                       are out of the order of their k-block (ascending
//                       where a & k == 0). The sorted ids go to slotAt, their
//                       positions to keyIds (both scratch until dedup_keys).
//   dedup_merge_chunks  grid (B, chunks): block (b, c) loads every sorted
//                       chunk of sequence b into shared memory and gives
//                       each id x of its chunk (local index k) its rank in
//                       the whole sequence, k + (ids <= x in earlier chunks)
//                       + (ids < x in later chunks), each count a branchless
//                       binary search; ties go to the earlier chunk, so the
//                       ranks are a permutation. The id's position goes to
//                       keyBias[rank] (an i32 in the f32's bits).
//   dedup_keys          grid B: block b sorts its sequence itself where it
//                       is one chunk (the same network), else reads the
//                       positions in id order and their ids; then
//     1. numbers the runs, in rounds of 1024 consecutive elements (thread t
//        takes element 1024r + t): element i < n starts a run where i == 0
//        or id[i] != id[i-1]; a block-wide inclusive sum of the round's
//        starts (warp shuffles, then the warps' totals) plus the runs of the
//        rounds before gives each element its run number. It writes each
//        position's slot (its run number) and, at a run's start, the run's
//        id and its start index (into keyBias, as a float: exact below
//        2^24); U = the number of runs;
//     2. after a barrier, the thread of the run's last element turns the
//        start into log(count) = log2(end - start + 1) * ln 2;
//     3. slots U.. of keyIds/keyBias get 0 and -inf, positions n.. slot -1.
//
// One block a sequence sorting all of it (the first form) kept B SMs busy
// for the whole sort: 0.3 ms for 4 sequences of 10000 ids on an H100. The
// chunks spread the sort over B * L / Q blocks, and the merge is a handful
// of binary searches an id. (The first form also walked runs of 16
// consecutive elements per thread, which put a warp's 32 lanes on one bank
// of shared memory at every read.)
//
// The kernels write only at indices below L derived from positions, ranks
// and run numbers, whatever the ids are: the caller checks info's smallest
// and largest id before it reads tables at them.
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
  // The kernel's arguments (DedupKernel.h), the sequence's first element
  // in [B, L] (row), its clamped length n, its sort size P = 2^logP and
  // the chunk size Q = min(P, kDedupChunk).
  Value tokens, lengths, keyIds, keyBias, slotAt, info, L, logP;
  Value seq, row, given, n, P, Q;
  Value shared; // dynamic shared memory, i8

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
  Value padding() {
    return arith::ConstantIntOp::create(b, loc, i64,
                                        std::numeric_limits<int64_t>::max());
  }
  /// id where `inside`, else the padding (which sorts last).
  Value orPadding(Value inside, Value id) {
    return arith::SelectOp::create(b, loc, inside, id, padding());
  }
  /// mem[row + offset] where `inside`, else mem[row]: a read that stays in
  /// the sequence whatever offset is.
  Value loadInRow(Value mem, Value inside, Value offset) {
    return load(mem, arith::SelectOp::create(b, loc, inside,
                                             m.add(row, offset), row));
  }

  /// The kernel's arguments and the values every dedup kernel uses. The
  /// grid's x dimension numbers the sequences (up to 2^31 - 1 of them; y
  /// and z hold at most 65535), y the chunks of one.
  void begin(gpu::GPUFuncOp func) {
    Block *entry = &func.getBody().front();
    b.setInsertionPointToStart(entry);
    tokens = entry->getArgument(0), lengths = entry->getArgument(1);
    keyIds = entry->getArgument(2), keyBias = entry->getArgument(3);
    slotAt = entry->getArgument(4), info = entry->getArgument(5);
    L = entry->getArgument(6), logP = entry->getArgument(7);
    tid = gpu::ThreadIdOp::create(b, loc, gpu::Dimension::x);
    lane = arith::RemUIOp::create(b, loc, tid, m.c(32));
    warp = arith::DivUIOp::create(b, loc, tid, m.c(32));
    seq = gpu::BlockIdOp::create(b, loc, gpu::Dimension::x);
    row = m.mul(seq, L);
    P = arith::ShLIOp::create(b, loc, m.c(1), logP);
    Q = m.min(P, m.c(kDedupChunk));
    // n = clamp(lengths[b], 0, L).
    given = load(lengths, seq);
    n = m.min(m.max(toIndex(given), m.c(0)), L);
    auto workgroup = gpu::AddressSpaceAttr::get(b.getContext(),
                                                gpu::AddressSpace::Workgroup);
    shared = gpu::DynamicSharedMemoryOp::create(
        b, loc,
        MemRefType::get({ShapedType::kDynamic}, b.getI8Type(),
                        MemRefLayoutAttrInterface{}, workgroup));
  }

  /// A view of `count` elements of type t at byteOffset of shared memory.
  Value sharedOf(Type t, Value byteOffset, Value count) {
    auto viewType = MemRefType::get(
        {ShapedType::kDynamic}, t, MemRefLayoutAttrInterface{},
        gpu::AddressSpaceAttr::get(b.getContext(),
                                   gpu::AddressSpace::Workgroup));
    return memref::ViewOp::create(b, loc, viewType, shared, byteOffset,
                                  ValueRange{count});
  }
  /// keys i64 [count] at 0, positions i32 [count] after them, the warps'
  /// totals after those.
  void sharedArrays(Value count) {
    keys = sharedOf(i64, m.c(0), count);
    positions = sharedOf(i32, m.mul(count, m.c(8)), count);
    totals = sharedOf(i32, m.mul(count, m.c(12)), m.c(kDedupThreads / 32));
  }

  /// keys/positions [0, count) = the ids and positions of the sequence's
  /// elements [base, base + count); those past its length get the padding
  /// (the largest i64), which sorts last. Ends with a barrier.
  void loadIds(Value base, Value count) {
    Value real = m.min(m.max(m.sub(n, base), m.c(0)), count);
    forThreadStrided(count, [&](Value i) {
      Value inside = m.lt(i, real);
      store(orPadding(inside, loadInRow(tokens, inside, m.add(base, i))), keys,
            i);
      store(toI32(m.add(base, i)), positions, i);
    });
    barrier();
  }

  /// Bitonic sort of (keys, positions)[0, count) ascending (count =
  /// 2^logCount): stage s (k = 2^s), step t (j = 2^(s-1-t)).
  /// Ends with a barrier.
  void sortShared(Value logCount) {
    Value count = arith::ShLIOp::create(b, loc, m.c(1), logCount);
    auto stages = scf::ForOp::create(b, loc, m.c(1), m.add(logCount, m.c(1)),
                                     m.c(1));
    OpBuilder::InsertionGuard g1(b);
    b.setInsertionPointToStart(stages.getBody());
    Value s = stages.getInductionVar();
    Value k = arith::ShLIOp::create(b, loc, m.c(1), s);
    auto steps = scf::ForOp::create(b, loc, m.c(0), s, m.c(1));
    b.setInsertionPointToStart(steps.getBody());
    Value j = arith::ShLIOp::create(
        b, loc, m.c(1), m.sub(m.sub(s, m.c(1)), steps.getInductionVar()));
    // The pair's indices in 32-bit arithmetic (index is 64-bit: two
    // instructions an operation).
    Value j32 = toI32(j), k32 = toI32(k);
    auto c32 = [&](int32_t v) {
      return arith::ConstantIntOp::create(b, loc, i32, v).getResult();
    };
    forThreadStrided(arith::DivUIOp::create(b, loc, count, m.c(2)),
                     [&](Value i) {
      Value i32v = toI32(i);
      Value a32 = arith::SubIOp::create(
          b, loc, arith::ShLIOp::create(b, loc, i32v, c32(1)),
          arith::AndIOp::create(b, loc, i32v,
                                arith::SubIOp::create(b, loc, j32, c32(1))));
      Value a = toIndex(a32);
      Value c = toIndex(arith::AddIOp::create(b, loc, a32, j32));
      Value ascending = arith::CmpIOp::create(
          b, loc, arith::CmpIPredicate::eq,
          arith::AndIOp::create(b, loc, a32, k32), c32(0));
      Value ka = load(keys, a), kc = load(keys, c);
      Value pa = load(positions, a), pc = load(positions, c);
      // (id, position) in lexicographic order: equal ids keep their
      // positions' order, and a real id equal to the padding (the largest
      // i64) sorts before the padding, whose positions come after.
      auto cmp = [&](arith::CmpIPredicate p, Value x, Value y) {
        return arith::CmpIOp::create(b, loc, p, x, y).getResult();
      };
      Value sameId = cmp(arith::CmpIPredicate::eq, ka, kc);
      Value greater = m.either(
          cmp(arith::CmpIPredicate::sgt, ka, kc),
          m.both(sameId, cmp(arith::CmpIPredicate::sgt, pa, pc)));
      Value less = m.either(
          cmp(arith::CmpIPredicate::slt, ka, kc),
          m.both(sameId, cmp(arith::CmpIPredicate::slt, pa, pc)));
      Value swap = arith::SelectOp::create(b, loc, ascending, greater, less);
      ifThen(swap, [&] {
        store(kc, keys, a);
        store(ka, keys, c);
        store(pc, positions, a);
        store(pa, positions, c);
      });
    });
    barrier();
  }

  /// How many of the Q sorted ids at sorted[base, base + Q) are below x
  /// (orEqual: at most x): a branchless binary search of logQ + 1 probes.
  Value countBelow(Value sorted, Value base, Value logQ, Value x,
                   Value orEqual) {
    auto below = [&](Value at) {
      Value probe = load(sorted, m.add(base, at));
      Value lt = arith::CmpIOp::create(b, loc, arith::CmpIPredicate::slt,
                                       probe, x);
      Value le = arith::CmpIOp::create(b, loc, arith::CmpIPredicate::sle,
                                       probe, x);
      return arith::SelectOp::create(b, loc, orEqual, le, lt).getResult();
    };
    // lo += step where sorted[lo + step - 1] is below x, step = Q/2 .. 1.
    auto search = scf::ForOp::create(b, loc, m.c(0), logQ, m.c(1),
                                     ValueRange{m.c(0)});
    {
      OpBuilder::InsertionGuard g(b);
      b.setInsertionPointToStart(search.getBody());
      Value lo = search.getRegionIterArgs()[0];
      Value step = arith::ShRUIOp::create(
          b, loc, arith::ShLIOp::create(b, loc, m.c(1), logQ),
          m.add(search.getInductionVar(), m.c(1)));
      Value next = arith::SelectOp::create(
          b, loc, below(m.sub(m.add(lo, step), m.c(1))), m.add(lo, step), lo);
      scf::YieldOp::create(b, loc, ValueRange{next});
    }
    Value lo = search.getResult(0);
    return arith::SelectOp::create(b, loc, below(lo), m.add(lo, m.c(1)), lo);
  }

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


namespace {

/// A dedup kernel's function with DedupKernel.h's arguments and its launch
/// plan (GpuTarget writes it to the manifest); the body is left empty.
gpu::GPUFuncOp createDedupFunc(OpBuilder &b, Location loc, StringRef name,
                               int64_t sharedBytes, int64_t maxLen,
                               bool chunked) {
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
  auto func = gpu::GPUFuncOp::create(b, loc, name, type);
  func->setAttr(gpu::GPUDialect::getKernelFuncAttrName(), b.getUnitAttr());
  func.setKnownBlockSizeAttr(
      b.getDenseI32ArrayAttr({int32_t(kDedupThreads), 1, 1}));
  SmallVector<NamedAttribute> launch = {
      b.getNamedAttr("kind", b.getStringAttr(name)),
      b.getNamedAttr("block", b.getI64IntegerAttr(kDedupThreads)),
      b.getNamedAttr("shared_bytes", b.getI64IntegerAttr(sharedBytes)),
      b.getNamedAttr("max_len", b.getI64IntegerAttr(maxLen))};
  // The chunk kernels' grid is (B, chunks): the runtime needs the chunk.
  if (chunked)
    launch.push_back(
        b.getNamedAttr("chunk", b.getI64IntegerAttr(kDedupChunk)));
  func->setAttr("attn.launch", b.getDictionaryAttr(launch));
  return func;
}

/// dedup_sort_chunks: block (b, c) sorts chunk c of sequence b into
/// slotAt (ids) and keyIds (positions).
void emitSortChunks(OpBuilder &b, Location loc, int64_t maxLen) {
  auto func = createDedupFunc(b, loc, kDedupSortChunks,
                              12 * kDedupChunk + 4 * (kDedupThreads / 32),
                              maxLen, /*chunked=*/true);
  OpBuilder::InsertionGuard guard(b);
  DedupEmitter e(b, loc);
  IndexMath &m = e.m;
  e.begin(func);
  Value chunk = gpu::BlockIdOp::create(b, loc, gpu::Dimension::y);
  Value base = m.mul(chunk, e.Q);
  Value logQ = m.min(e.logP, m.c(kDedupChunkLog));
  e.sharedArrays(e.Q);
  e.loadIds(base, e.Q);
  e.sortShared(logQ);
  e.forThreadStrided(m.min(e.Q, m.sub(e.L, base)), [&](Value i) {
    Value at = m.add(e.row, m.add(base, i));
    e.store(e.load(e.keys, i), e.slotAt, at);
    e.store(e.load(e.positions, i), e.keyIds, at);
  });
  gpu::ReturnOp::create(b, loc);
}

/// dedup_merge_chunks: block (b, c) ranks chunk c's ids among all of
/// sequence b's and writes each one's position to keyBias[rank].
void emitMergeChunks(OpBuilder &b, Location loc, int64_t maxLen) {
  auto func = createDedupFunc(b, loc, kDedupMergeChunks, 8 * maxLen, maxLen,
                              /*chunked=*/true);
  OpBuilder::InsertionGuard guard(b);
  DedupEmitter e(b, loc);
  IndexMath &m = e.m;
  e.begin(func);
  Value chunk = gpu::BlockIdOp::create(b, loc, gpu::Dimension::y);
  Value logQ = m.min(e.logP, m.c(kDedupChunkLog));
  Value chunks = arith::DivUIOp::create(
      b, loc, m.add(e.L, m.sub(e.Q, m.c(1))), e.Q);
  Value all = m.mul(chunks, e.Q);
  Value sorted = e.sharedOf(e.i64, m.c(0), all);
  // Every chunk's sorted ids; the last chunk's tail past L sorts last.
  e.forThreadStrided(all, [&](Value i) {
    Value inside = m.lt(i, e.L);
    e.store(e.orPadding(inside, e.loadInRow(e.slotAt, inside, i)), sorted, i);
  });
  e.barrier();
  Value base = m.mul(chunk, e.Q);
  Value real = m.min(m.max(m.sub(e.n, base), m.c(0)), e.Q);
  e.forThreadStrided(real, [&](Value k) {
    Value x = e.load(sorted, m.add(base, k));
    auto others = scf::ForOp::create(b, loc, m.c(0), chunks, m.c(1),
                                     ValueRange{k});
    {
      OpBuilder::InsertionGuard g(b);
      b.setInsertionPointToStart(others.getBody());
      Value other = others.getInductionVar();
      Value rank = others.getRegionIterArgs()[0];
      Value count = e.countBelow(sorted, m.mul(other, e.Q), logQ, x,
                                 m.lt(other, chunk));
      Value self = m.eq(other, chunk);
      scf::YieldOp::create(
          b, loc,
          ValueRange{arith::SelectOp::create(b, loc, self, rank,
                                             m.add(rank, count))});
    }
    Value rank = others.getResult(0);
    // The ranks of the real ids are a permutation of [0, n): within a
    // chunk they sort before the padding (positions break ties with it),
    // and no chunk before the one holding position n has any padding. The
    // guard keeps the store inside the sequence all the same.
    e.ifThen(m.lt(rank, e.L), [&] {
      Value position = e.load(e.keyIds, m.add(e.row, m.add(base, k)));
      e.store(arith::BitcastOp::create(b, loc, e.f32, position), e.keyBias,
              m.add(e.row, rank));
    });
  });
  gpu::ReturnOp::create(b, loc);
}

/// dedup_keys: block b numbers the runs of sequence b's ids in the order
/// dedup_merge_chunks left and writes the outputs.
void emitNumberRuns(OpBuilder &b, Location loc, int64_t maxLen) {
  auto func = createDedupFunc(b, loc, kDedupKeys, dedupSharedBytes(maxLen),
                              maxLen, /*chunked=*/false);
  OpBuilder::InsertionGuard guard(b);
  DedupEmitter e(b, loc);
  IndexMath &m = e.m;
  e.begin(func);
  Type i32 = e.i32, i64 = e.i64, f32 = e.f32;
  Value P = e.P, n = e.n, L = e.L, row = e.row, seq = e.seq;
  Value keyIds = e.keyIds, keyBias = e.keyBias, slotAt = e.slotAt,
        info = e.info;
  e.sharedArrays(P);

  // The sequence's ids in ascending order, each with its position; padding
  // sorts last. A sequence of one chunk (P <= kDedupChunk) is sorted here
  // (the runtime launches no chunk kernels for it); a longer one comes in
  // the order dedup_merge_chunks left, as positions, whose ids are read
  // again (each position clamped into the sequence, so that no read can
  // leave it).
  Value oneChunk = m.le(P, m.c(kDedupChunk));
  auto sortHere = scf::IfOp::create(b, loc, TypeRange{}, oneChunk, true);
  {
    OpBuilder::InsertionGuard g(b);
    b.setInsertionPointToStart(sortHere.thenBlock());
    e.loadIds(m.c(0), P);
    e.sortShared(e.logP);
    b.setInsertionPointToStart(sortHere.elseBlock());
    e.forThreadStrided(P, [&](Value i) {
      Value inside = m.lt(i, n);
      Value bits = arith::BitcastOp::create(b, loc, i32,
                                            e.loadInRow(keyBias, inside, i));
      Value position =
          m.min(m.max(e.toIndex(bits), m.c(0)), m.sub(L, m.c(1)));
      Value id = e.load(e.tokens, m.add(row, position));
      e.store(e.orPadding(inside, id), e.keys, i);
      e.store(e.toI32(position), e.positions, i);
    });
    e.barrier();
  }

  // The sequence's counts for the caller's checks.
  e.ifThen(m.eq(e.tid, m.c(0)), [&] {
    Value some = m.lt(m.c(0), n);
    Value zero64 = arith::ConstantIntOp::create(b, loc, i64, 0);
    Value last = m.max(m.sub(n, m.c(1)), m.c(0));
    Value at = m.mul(seq, m.c(4));
    e.store(e.given, info, m.add(at, m.c(1)));
    e.store(arith::SelectOp::create(b, loc, some, e.load(e.keys, m.c(0)), zero64),
            info, m.add(at, m.c(2)));
    e.store(arith::SelectOp::create(b, loc, some, e.load(e.keys, last), zero64),
            info, m.add(at, m.c(3)));
  });

  // 1. Run numbers, in rounds of 1024 consecutive elements (thread t takes
  // element 1024r + t: consecutive threads read consecutive words of
  // shared memory, where a run of elements per thread would have all of a
  // warp's lanes on one bank). A round's block-wide inclusive sum of run
  // starts, plus the runs of the rounds before, numbers its elements; each
  // position gets its slot, each run its id and its start index (into
  // keyBias, as a float: exact below 2^24), and the element its run number
  // (into positions, which it has read).
  Value zero32 = arith::ConstantIntOp::create(b, loc, i32, 0);
  Value one32 = arith::ConstantIntOp::create(b, loc, i32, 1);
  Value minusOne32 = arith::ConstantIntOp::create(b, loc, i32, -1);
  // Rounds up to the length (none past it holds a run start).
  Value lastRound = m.min(
      P, arith::AndIOp::create(b, loc, m.add(n, m.c(kDedupThreads - 1)),
                               m.c(~(kDedupThreads - 1))));
  auto rounds = scf::ForOp::create(b, loc, m.c(0), lastRound,
                                   m.c(kDedupThreads), ValueRange{minusOne32});
  {
    OpBuilder::InsertionGuard g(b);
    b.setInsertionPointToStart(rounds.getBody());
    Value i = m.add(rounds.getInductionVar(), e.tid);
    Value runsBefore = rounds.getRegionIterArgs()[0];
    Value inRange = m.lt(i, P);
    Value at = m.min(i, m.sub(P, m.c(1)));
    Value starts = m.both(inRange, e.startsRun(at, n));
    auto [inclusive, total] = e.blockInclusiveSum(
        arith::SelectOp::create(b, loc, starts, one32, zero32));
    Value run = arith::AddIOp::create(b, loc, runsBefore, inclusive);
    e.ifThen(m.both(inRange, m.lt(i, n)), [&] {
      Value runIndex = e.toIndex(run);
      Value position = e.toIndex(e.load(e.positions, i));
      e.store(arith::ExtSIOp::create(b, loc, i64, run), slotAt,
              m.add(row, position));
      e.store(run, e.positions, i);
      e.ifThen(starts, [&] {
        e.store(arith::TruncIOp::create(b, loc, i32, e.load(e.keys, i)),
                keyIds, m.add(row, runIndex));
        e.store(arith::SIToFPOp::create(b, loc, f32, e.toI32(i)), keyBias,
                m.add(row, runIndex));
      });
    });
    // The warps' totals are read again next round.
    e.barrier();
    scf::YieldOp::create(b, loc,
                         ValueRange{arith::AddIOp::create(b, loc, runsBefore,
                                                          total)});
  }
  // U = the last run number + 1.
  Value unique = arith::AddIOp::create(b, loc, rounds.getResult(0), one32);
  e.ifThen(m.eq(e.tid, m.c(0)), [&] {
    e.store(arith::ExtSIOp::create(b, loc, i64, unique), info,
            m.mul(seq, m.c(4)));
  });

  // 2. log(count) = log2(end - start + 1) * ln 2, written where each run
  // ends (its start index is in keyBias since the barrier above).
  e.forThreadStrided(n, [&](Value i) {
    Value next = m.min(m.add(i, m.c(1)), m.sub(P, m.c(1)));
    Value endsRun = m.either(
        m.eq(i, m.sub(n, m.c(1))),
        arith::CmpIOp::create(b, loc, arith::CmpIPredicate::ne,
                              e.load(e.keys, next), e.load(e.keys, i)));
    e.ifThen(endsRun, [&] {
      Value at = m.add(row, e.toIndex(e.load(e.positions, i)));
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

  // 3. Past the unique ids and past the length.
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
}

} // namespace

ArrayAttr mlir::attn::emitDedupKernels(OpBuilder &b, Location loc,
                                       int64_t maxLen) {
  emitSortChunks(b, loc, maxLen);
  emitMergeChunks(b, loc, maxLen);
  emitNumberRuns(b, loc, maxLen);
  return b.getStrArrayAttr({kDedupSortChunks, kDedupMergeChunks, kDedupKeys});
}
