//===- Decompose.cpp - attn.attention -> dense components -----------------===//
//
// attn-decompose: replaces attn.attention by init_state, one attn.component
// per component of its pattern (attn::decompose in lib/Pattern), and finalize.
// All at tensor level; shapes of the state follow the query's, dynamic sizes
// are read with tensor.dim.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Pattern/Pattern.h"

#include "mlir/IR/PatternMatch.h"

namespace mlir::attn {
#define GEN_PASS_DEF_ATTNDECOMPOSE
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

/// An empty tensor of `shape` (dynamic dims taken from `like`'s) and f32 or
/// `elem` elements.
static Value emptyLike(OpBuilder &b, Location loc, Value like,
                       ArrayRef<int64_t> shape, Type elem) {
  SmallVector<Value> dynSizes;
  for (auto [dim, size] : llvm::enumerate(shape))
    if (ShapedType::isDynamic(size))
      dynSizes.push_back(tensor::DimOp::create(b, loc, like, dim));
  return tensor::EmptyOp::create(b, loc, shape, elem, dynSizes);
}

namespace {
struct AttnDecomposePass
    : public mlir::attn::impl::AttnDecomposeBase<AttnDecomposePass> {
  void runOnOperation() override {
    SmallVector<AttentionOp> ops;
    getOperation()->walk([&](AttentionOp op) { ops.push_back(op); });
    for (AttentionOp op : ops)
      rewrite(op);
  }

  void rewrite(AttentionOp op) {
    OpBuilder b(op);
    Location loc = op.getLoc();
    auto qType = op.getQuery().getType();
    Type f32 = b.getF32Type();
    ArrayRef<int64_t> accShape = qType.getShape();
    ArrayRef<int64_t> rowShape = accShape.drop_back();

    Value acc = emptyLike(b, loc, op.getQuery(), accShape, f32);
    Value max = emptyLike(b, loc, op.getQuery(), rowShape, f32);
    Value sum = emptyLike(b, loc, op.getQuery(), rowShape, f32);
    SmallVector<Type> stateTypes{acc.getType(), max.getType(), sum.getType()};
    auto init = InitStateOp::create(b, loc, stateTypes, acc, max, sum);
    ValueRange state = init.getResults();

    FloatAttr scale = b.getF64FloatAttr(op.getEffectiveScale());
    for (ComponentAttr component : decompose(op.getPattern())) {
      auto c = ComponentOp::create(
          b, loc, stateTypes, op.getQuery(), op.getKey(), op.getValue(),
          component.getUseLengths() || component.hasFilters() ? op.getLengths()
                                                              : Value(),
          op.getKeyBias(), op.getKeyIds(), state[0], state[1], state[2], /*origins=*/ValueRange{}, component,
          scale);
      state = c.getResults();
      ++numComponents;
    }

    Value out = emptyLike(b, loc, op.getQuery(), accShape, qType.getElementType());
    SmallVector<Type> resultTypes{out.getType()};
    Value lse;
    if (op.getLse()) {
      lse = emptyLike(b, loc, op.getQuery(), rowShape, f32);
      resultTypes.push_back(lse.getType());
    }
    auto fin = FinalizeOp::create(b, loc, resultTypes, state[0], state[1],
                                  state[2], out, lse);
    op->replaceAllUsesWith(fin.getResults());
    op->erase();
  }
};
} // namespace
