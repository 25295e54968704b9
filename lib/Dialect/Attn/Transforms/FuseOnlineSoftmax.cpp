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

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Dialect/Attn/IR/AttnOrigins.h"
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

/// `for i in [lb, ub) { body(i) }`.
template <typename Fn>
void forEach(OpBuilder &b, Location loc, Value lb, Value ub, Fn body) {
  auto loop = scf::ForOp::create(b, loc, lb, ub,
                                 arith::ConstantIndexOp::create(b, loc, 1));
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(loop.getBody());
  body(loop.getInductionVar());
}

/// `for i in [lb, ub) iter(x = init) { x = body(i, x) }`, returns the final x.
template <typename Fn>
Value reduce(OpBuilder &b, Location loc, Value lb, Value ub, Value init,
             Fn body) {
  auto loop = scf::ForOp::create(b, loc, lb, ub,
                                 arith::ConstantIndexOp::create(b, loc, 1),
                                 ValueRange{init});
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(loop.getBody());
  Value next = body(loop.getInductionVar(), loop.getRegionIterArgs()[0]);
  scf::YieldOp::create(b, loc, next);
  return loop.getResult(0);
}

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
  ComponentAttr comp = op.getComponent();
  Value q = op.getQuery(), k = op.getKey(), v = op.getValue();
  Value bIdx = op.getBatch(), h = op.getHead(), base = op.getGroupBase();
  Value c0 = m.c(0), r = m.c(comp.getPeriod());

  Value heads = memref::DimOp::create(b, loc, q, dims::kHeads);
  Value kvHeads = memref::DimOp::create(b, loc, k, dims::kHeads);
  Value qLen = memref::DimOp::create(b, loc, q, dims::kRows);
  Value kLen = keyCount(b, loc, k, op.getKeyIds());
  Value headDim = memref::DimOp::create(b, loc, q, dims::kHeadDim);
  Value g = arith::DivUIOp::create(b, loc, h,
                                   arith::DivUIOp::create(b, loc, heads, kvHeads));
  // Row index = position - qOrigin, key index = position - kOrigin. With
  // origins, the filters see global positions (as rows of a square problem).
  // With origins the filters see positions q_pos + stride * i and
  // k_pos + stride * j (AttnOrigins.h).
  Placement at = Placement::decode(m, op.getOrigins(), qLen, kLen);
  const bool hasOrigins = at.hasOrigins;
  Value qOrigin = at.qOrigin, kOrigin = at.kOrigin;
  Value predQLen = hasOrigins ? c0 : qLen, predKLen = hasOrigins ? c0 : kLen;
  Value scale = f.c(float(op.getScaleAttr().getValueAsDouble()));
  Value length;
  if (op.getLengths()) {
    length = memref::LoadOp::create(b, loc, op.getLengths(), bIdx);
    length = arith::IndexCastOp::create(b, loc, b.getIndexType(), length);
  }

  // Key j of batch b: row j of k[b], or with key_ids row key_ids[b, j] of
  // the tables k[0] and v[0].
  auto keyRow = [&](Value j) -> std::pair<Value, Value> {
    if (!op.getKeyIds())
      return {bIdx, j};
    Value id = memref::LoadOp::create(b, loc, op.getKeyIds(),
                                      ValueRange{bIdx, j});
    return {c0, arith::IndexCastOp::create(b, loc, b.getIndexType(), id)};
  };

  forEach(b, loc, op.getRowBegin(), op.getRowEnd(), [&](Value tq) {
    Value rowPos = m.add(base, m.mul(r, tq));
    Value i = m.sub(rowPos, qOrigin);
    Value predRow = hasOrigins ? m.add(at.qPos, m.mul(at.stride, i)) : i;
    SmallVector<Value> row{bIdx, h, i};
    Value oldMax = memref::LoadOp::create(b, loc, op.getMax(), row);
    Value oldSum = memref::LoadOp::create(b, loc, op.getSum(), row);

    // Pass 1: scores and the new running maximum.
    Value newMax = reduce(
        b, loc, op.getKeyBegin(), op.getKeyEnd(), oldMax,
        [&](Value tk, Value runMax) {
          Value keyPos = m.add(base, m.mul(r, tk));
          Value j = m.sub(keyPos, kOrigin);
          Value predKey =
              hasOrigins ? m.add(at.kPos, m.mul(at.stride, j)) : keyPos;
          auto dot = [&]() {
            auto [kb, kRow] = keyRow(j);
            Value sum = reduce(b, loc, c0, headDim, f.c(0.0f),
                               [&](Value d, Value acc) {
                                 Value qd = f.load(q, ValueRange{bIdx, h, i, d});
                                 Value kd = f.load(k, ValueRange{kb, g, kRow, d});
                                 return f.fma(qd, kd, acc);
                               });
            Value score = f.mul(scale, sum);
            if (op.getKeyBias()) // log(count), -inf for ignored keys
              score = f.add(score, memref::LoadOp::create(
                                       b, loc, op.getKeyBias(),
                                       ValueRange{bIdx, j}));
            return score;
          };
          Value s;
          if (op.getMasked()) {
            // In the band lo <= t_q - t_k <= hi, in every include pattern and
            // in no exclude pattern.
            Value inside = m.truth(true);
            Value dt = m.sub(tq, tk);
            if (comp.getBandLo() != ComponentAttr::kNegInf)
              inside = m.both(inside, m.le(m.c(comp.getBandLo()), dt));
            if (comp.getBandHi() != ComponentAttr::kPosInf)
              inside = m.both(inside, m.le(dt, m.c(comp.getBandHi())));
            for (Attribute inc : comp.getInclude())
              inside = m.both(inside, buildPatternPredicate(
                                          b, loc, inc, h, predRow, predKey,
                                          predQLen, predKLen, length));
            for (Attribute exc : comp.getExclude()) {
              Value in = buildPatternPredicate(b, loc, exc, h, predRow, predKey,
                                               predQLen, predKLen, length);
              inside = m.both(inside, m.eq(in, m.truth(false)));
            }
            auto ifOp = scf::IfOp::create(b, loc, TypeRange{b.getF32Type()},
                                          inside, /*withElse=*/true);
            {
              OpBuilder::InsertionGuard guard(b);
              b.setInsertionPointToStart(ifOp.thenBlock());
              scf::YieldOp::create(b, loc, dot());
              b.setInsertionPointToStart(ifOp.elseBlock());
              scf::YieldOp::create(b, loc, f.negInf());
            }
            s = ifOp.getResult(0);
          } else {
            s = dot();
          }
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
          Value j = m.sub(m.add(base, m.mul(r, tk)), kOrigin);
          Value s = memref::LoadOp::create(b, loc, scores,
                                           m.sub(tk, op.getKeyBegin()));
          Value p = f.exp(f.sub(s, newMax)); // exp(-inf) = 0 for masked keys
          auto [vb, vRow] = keyRow(j);
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
