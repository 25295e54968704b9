//===- LowerGrad.cpp - the backward pass's tiles to loops -----------------===//
//
// attn-lower-grad: lowers attn.grad_init and attn.tile_grad on memrefs to
// scalar loops. The backward pass recomputes the forward's probabilities
// from the saved lse instead of storing them (FlashAttention's recompute):
// for a pair (i, j) of a component, with s its score,
//
//     p      = exp(s - lse_i)              (the component's share of P_ij)
//     dv_j  += p * dO_i
//     ds     = p * (dO_i . v_j - delta_i)  delta_i = dO_i . O_i (grad_init)
//     dq_i  += scale * ds * k_j
//     dk_j  += scale * ds * q_i
//
// which is d(loss) through softmax: dS = P o (dP - rowsum(P o dP)), and
// rowsum(P o dP) = dO_i . sum_j P_ij v_j = dO_i . O_i. A pair's multiplicity
// is the number of components that hold it, so adding every component's
// pairs gives the pattern's gradients. Rows with lse = -inf attend nothing,
// and pairs with score -inf (outside a masked tile's component, or a key
// bias of -inf) add nothing: both are skipped, so padding that holds NaN or
// inf never reaches the gradients.
//
//===----------------------------------------------------------------------===//

#include "TilePairs.h"

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"

#include "mlir/Dialect/Math/IR/Math.h"

namespace mlir::attn {
#define GEN_PASS_DEF_ATTNLOWERGRAD
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

namespace {

Value dim(OpBuilder &b, Location loc, Value v, unsigned d) {
  return memref::DimOp::create(b, loc, v, d).getResult();
}

/// Stores 0 into every element of the rank-4 memref `x`.
void zeroFill(OpBuilder &b, Location loc, Value x) {
  FloatMath f{b, loc};
  Value c0 = arith::ConstantIndexOp::create(b, loc, 0), zero = f.c(0.0f);
  forEach(b, loc, c0, dim(b, loc, x, 0), [&](Value i0) {
    forEach(b, loc, c0, dim(b, loc, x, 1), [&](Value i1) {
      forEach(b, loc, c0, dim(b, loc, x, 2), [&](Value i2) {
        forEach(b, loc, c0, dim(b, loc, x, 3), [&](Value i3) {
          f.store(zero, x, ValueRange{i0, i1, i2, i3});
        });
      });
    });
  });
}

void lowerGradInit(GradInitOp op) {
  OpBuilder b(op);
  Location loc = op.getLoc();
  FloatMath f{b, loc};
  Value c0 = arith::ConstantIndexOp::create(b, loc, 0);
  Value out = op.getOutput(), dout = op.getGradOutput();
  forEach(b, loc, c0, dim(b, loc, out, 0), [&](Value i0) {
    forEach(b, loc, c0, dim(b, loc, out, 1), [&](Value i1) {
      forEach(b, loc, c0, dim(b, loc, out, 2), [&](Value i2) {
        Value delta = reduce(
            b, loc, c0, dim(b, loc, out, 3), f.c(0.0f), [&](Value d, Value acc) {
              SmallVector<Value> at{i0, i1, i2, d};
              return f.fma(f.load(out, at), f.load(dout, at), acc);
            });
        memref::StoreOp::create(b, loc, delta, op.getDelta(),
                                ValueRange{i0, i1, i2});
      });
    });
  });
  for (Value grad : {op.getDq(), op.getDk(), op.getDv()})
    zeroFill(b, loc, grad);
  op.erase();
}

/// `x[at] += y`.
void accumulate(FloatMath &f, Value y, Value x, ValueRange at) {
  f.store(f.add(f.load(x, at), y), x, at);
}

void lowerTileGrad(TileGradOp op) {
  OpBuilder b(op);
  Location loc = op.getLoc();
  FloatMath f{b, loc};
  IndexMath m{b, loc};
  Value q = op.getQuery(), k = op.getKey(), v = op.getValue(),
        dout = op.getGradOutput();
  Value bIdx = op.getBatch(), h = op.getHead();
  const double scaleValue = op.getScaleAttr().getValueAsDouble();
  TilePairs pairs(b, loc, op.getComponent(), q, k, op.getLengths(),
                  op.getKeyBias(), /*keyIds=*/Value(), bIdx, h,
                  op.getGroupBase(), op.getOrigins(), scaleValue,
                  op.getMasked());
  Value g = pairs.kvHead(), headDim = pairs.headDim();
  Value c0 = m.c(0), scale = f.c(float(scaleValue));

  forEach(b, loc, op.getRowBegin(), op.getRowEnd(), [&](Value tq) {
    Value i = pairs.rowIndex(tq);
    SmallVector<Value> row{bIdx, h, i};
    Value lse = memref::LoadOp::create(b, loc, op.getLse(), row);
    // A row that attends nothing (lse = -inf) has no gradient.
    auto ifRow = scf::IfOp::create(b, loc, TypeRange{},
                                   f.gt(lse, f.negInf()), false);
    OpBuilder::InsertionGuard rowGuard(b);
    b.setInsertionPointToStart(ifRow.thenBlock());
    Value delta = memref::LoadOp::create(b, loc, op.getDelta(), row);
    forEach(b, loc, op.getKeyBegin(), op.getKeyEnd(), [&](Value tk) {
      Value j = pairs.keyIndex(tk);
      Value s = pairs.score(tq, i, tk, j);
      auto ifPair = scf::IfOp::create(b, loc, TypeRange{},
                                      f.gt(s, f.negInf()), false);
      OpBuilder::InsertionGuard pairGuard(b);
      b.setInsertionPointToStart(ifPair.thenBlock());
      Value p = f.exp(f.sub(s, lse));
      Value dp = reduce(b, loc, c0, headDim, f.c(0.0f), [&](Value d, Value acc) {
        return f.fma(f.load(dout, ValueRange{bIdx, h, i, d}),
                     f.load(v, ValueRange{bIdx, g, j, d}), acc);
      });
      Value ds = f.mul(scale, f.mul(p, f.sub(dp, delta)));
      forEach(b, loc, c0, headDim, [&](Value d) {
        SmallVector<Value> qAt{bIdx, h, i, d}, kAt{bIdx, g, j, d};
        accumulate(f, f.mul(p, f.load(dout, qAt)), op.getDv(), kAt);
        accumulate(f, f.mul(ds, f.load(k, kAt)), op.getDq(), qAt);
        accumulate(f, f.mul(ds, f.load(q, qAt)), op.getDk(), kAt);
      });
    });
  });
  op.erase();
}

struct AttnLowerGradPass
    : public mlir::attn::impl::AttnLowerGradBase<AttnLowerGradPass> {
  void runOnOperation() override {
    SmallVector<Operation *> ops;
    bool leftover = false;
    getOperation()->walk([&](Operation *op) {
      if (isa<GradInitOp, TileGradOp>(op) && op->getNumResults() == 0)
        ops.push_back(op);
      else if (isa<GradInitOp, ComponentGradOp>(op))
        leftover = true;
    });
    if (leftover) {
      getOperation()->emitError(
          "attn-lower-grad expects a bufferized, tiled backward pass (run "
          "attn-decompose, attn-bufferize and attn-tile first)");
      return signalPassFailure();
    }
    for (Operation *op : ops) {
      if (auto init = dyn_cast<GradInitOp>(op))
        lowerGradInit(init);
      else
        lowerTileGrad(cast<TileGradOp>(op));
    }
  }
};
} // namespace
