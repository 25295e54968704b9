//===- FuseOnlineSoftmax.cpp - tile updates -> fused online softmax -------===//
//
// attn-fuse-online-softmax: lowers the state operations on memrefs to loops.
// For each row i of a tile_update, with running max m, denominator l and
// accumulator acc (f32):
//
//     s_j    = scale * q_i . k_j            (-inf where a masked pair is out)
//     m'     = max(m, max_j s_j)            // newMax = max(oldMax, rowMax(S))
//     alpha  = exp(m - m')                  // rescale of the old state
//     l'     = l * alpha + sum_j exp(s_j - m')
//     acc'   = acc * alpha + sum_j exp(s_j - m') v_j
//
// A row whose tile holds no attended key keeps its state, so rows that never
// see a key end with l = 0, which finalize turns into out = 0, lse = -inf.
//
//===----------------------------------------------------------------------===//

#include "TilePairs.h"

#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Utils/FloatMath.h"
#include "attn/Utils/IndexMath.h"
#include "attn/Pattern/Pattern.h"

#include "mlir/Dialect/Math/IR/Math.h"
#include "mlir/Interfaces/FunctionInterfaces.h"

#include <limits>

namespace mlir::attn {
#define GEN_PASS_DEF_ATTNFUSEONLINESOFTMAX
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

namespace {

void lowerInitState(InitStateOp op) {
  OpBuilder b(op);
  Location loc = op.getLoc();
  FloatMath f{b, loc};
  IndexMath m{b, loc};
  Value zero = f.c(0.0f), negInf = f.negInf();
  Value c0 = m.c(0);
  auto dim = [&](Value v, unsigned d) {
    return memref::DimOp::create(b, loc, v, d).getResult();
  };
  forEach(b, loc, c0, dim(op.getAcc(), 0), [&](Value i0) {
    forEach(b, loc, c0, dim(op.getAcc(), 1), [&](Value i1) {
      forEach(b, loc, c0, dim(op.getAcc(), 2), [&](Value i2) {
        memref::StoreOp::create(b, loc, negInf, op.getMax(),
                                ValueRange{i0, i1, i2});
        memref::StoreOp::create(b, loc, zero, op.getSum(),
                                ValueRange{i0, i1, i2});
        forEach(b, loc, c0, dim(op.getAcc(), 3), [&](Value i3) {
          memref::StoreOp::create(b, loc, zero, op.getAcc(),
                                  ValueRange{i0, i1, i2, i3});
        });
      });
    });
  });
  op.erase();
}

void lowerFinalize(FinalizeOp op) {
  OpBuilder b(op);
  Location loc = op.getLoc();
  FloatMath f{b, loc};
  IndexMath m{b, loc};
  Value c0 = m.c(0);
  auto dim = [&](Value v, unsigned d) {
    return memref::DimOp::create(b, loc, v, d).getResult();
  };
  Value headDim = dim(op.getAcc(), 3);
  forEach(b, loc, c0, dim(op.getAcc(), 0), [&](Value i0) {
    forEach(b, loc, c0, dim(op.getAcc(), 1), [&](Value i1) {
      forEach(b, loc, c0, dim(op.getAcc(), 2), [&](Value i2) {
        SmallVector<Value> row{i0, i1, i2};
        Value l = memref::LoadOp::create(b, loc, op.getSum(), row);
        Value mx = memref::LoadOp::create(b, loc, op.getMax(), row);
        Value attended = f.gt(l, f.c(0.0f));
        // Rows with no attended key: out = 0, lse = -inf (never NaN).
        Value inv = arith::SelectOp::create(b, loc, attended,
                                            f.div(f.c(1.0f), l), f.c(0.0f));
        forEach(b, loc, c0, headDim, [&](Value d) {
          Value a = memref::LoadOp::create(b, loc, op.getAcc(),
                                           ValueRange{i0, i1, i2, d});
          f.store(f.mul(a, inv), op.getOutput(), ValueRange{i0, i1, i2, d});
        });
        if (op.getLse()) {
          Value lse = arith::SelectOp::create(b, loc, attended,
                                              f.add(mx, f.log(l)), f.negInf());
          memref::StoreOp::create(b, loc, lse, op.getLse(), row);
        }
      });
    });
  });
  op.erase();
}

/// Lowers one tile update; `scores` is a buffer of at least `max_keys` f32
/// that holds one row's scores for the key tile.
void lowerTileUpdate(TileUpdateOp op, Value scores) {
  OpBuilder b(op);
  Location loc = op.getLoc();
  FloatMath f{b, loc};
  IndexMath m{b, loc};
  Value v = op.getValue();
  Value bIdx = op.getBatch(), h = op.getHead();
  Value c0 = m.c(0);
  TilePairs pairs(b, loc, op.getComponent(), op.getQuery(), op.getKey(),
                  op.getLengths(), op.getKeyBias(), op.getKeyIds(), bIdx, h,
                  op.getGroupBase(), op.getOrigins(),
                  op.getScaleAttr().getValueAsDouble(), op.getMasked());
  Value g = pairs.kvHead(), headDim = pairs.headDim();

  forEach(b, loc, op.getRowBegin(), op.getRowEnd(), [&](Value tq) {
    Value i = pairs.rowIndex(tq);
    SmallVector<Value> row{bIdx, h, i};
    Value oldMax = memref::LoadOp::create(b, loc, op.getMax(), row);
    Value oldSum = memref::LoadOp::create(b, loc, op.getSum(), row);

    // Pass 1: scores and the new running maximum.
    Value newMax = reduce(
        b, loc, op.getKeyBegin(), op.getKeyEnd(), oldMax,
        [&](Value tk, Value runMax) {
          Value s = pairs.score(tq, i, tk, pairs.keyIndex(tk));
          memref::StoreOp::create(b, loc, s, scores,
                                  m.sub(tk, op.getKeyBegin()));
          return f.max(runMax, s);
        });

    // Pass 2, only if the tile attends anything for this row: rescale the
    // state by exp(oldMax - newMax) and add exp(s - newMax) * v.
    Value any = f.gt(newMax, f.negInf());
    auto ifAny = scf::IfOp::create(b, loc, TypeRange{}, any, false);
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPointToStart(ifAny.thenBlock());
    Value alpha = f.exp(f.sub(oldMax, newMax));
    forEach(b, loc, c0, headDim, [&](Value d) {
      SmallVector<Value> at{bIdx, h, i, d};
      Value a = memref::LoadOp::create(b, loc, op.getAcc(), at);
      memref::StoreOp::create(b, loc, f.mul(a, alpha), op.getAcc(), at);
    });
    Value newSum = reduce(
        b, loc, op.getKeyBegin(), op.getKeyEnd(), f.mul(oldSum, alpha),
        [&](Value tk, Value runSum) {
          Value j = pairs.keyIndex(tk);
          Value s = memref::LoadOp::create(b, loc, scores,
                                           m.sub(tk, op.getKeyBegin()));
          Value p = f.exp(f.sub(s, newMax)); // exp(-inf) = 0 for masked keys
          auto [vb, vRow] = pairs.keyRow(j);
          forEach(b, loc, c0, headDim, [&](Value d) {
            SmallVector<Value> at{bIdx, h, i, d};
            Value a = memref::LoadOp::create(b, loc, op.getAcc(), at);
            Value vd = f.load(v, ValueRange{vb, g, vRow, d});
            memref::StoreOp::create(b, loc, f.fma(p, vd, a), op.getAcc(), at);
          });
          return f.add(runSum, p);
        });
    memref::StoreOp::create(b, loc, newMax, op.getMax(), row);
    memref::StoreOp::create(b, loc, newSum, op.getSum(), row);
  });
  op.erase();
}

struct AttnFuseOnlineSoftmaxPass
    : public mlir::attn::impl::AttnFuseOnlineSoftmaxBase<AttnFuseOnlineSoftmaxPass> {
  void runOnOperation() override {
    SmallVector<Operation *> ops;
    bool leftover = false;
    getOperation()->walk([&](Operation *op) {
      if (isa<TileUpdateOp, InitStateOp, FinalizeOp>(op)) {
        if (op->getNumResults() == 0)
          ops.push_back(op);
        else
          leftover = true;
      } else if (auto c = dyn_cast<ComponentOp>(op)) {
        (void)c;
        leftover = true;
      }
    });
    if (leftover) {
      getOperation()->emitError(
          "attn-fuse-online-softmax expects bufferized, tiled attention "
          "(run attn-decompose, attn-bufferize and attn-tile first)");
      return signalPassFailure();
    }
    // One scores buffer per function and key-tile size, allocated on the
    // stack once at function entry rather than inside the loops.
    DenseMap<std::pair<Operation *, int64_t>, Value> scoreBuffers;
    auto scoresFor = [&](TileUpdateOp u) {
      auto func = u->getParentOfType<FunctionOpInterface>();
      int64_t size = u.getMaxKeys();
      Value &buffer = scoreBuffers[{func.getOperation(), size}];
      if (!buffer) {
        OpBuilder b(&func.getFunctionBody().front(),
                    func.getFunctionBody().front().begin());
        buffer = memref::AllocaOp::create(
            b, func.getLoc(), MemRefType::get({size}, b.getF32Type()));
      }
      return buffer;
    };
    for (Operation *op : ops) {
      if (auto u = dyn_cast<TileUpdateOp>(op))
        lowerTileUpdate(u, scoresFor(u));
      else if (auto i = dyn_cast<InitStateOp>(op))
        lowerInitState(i);
      else
        lowerFinalize(cast<FinalizeOp>(op));
    }
  }
};
} // namespace
