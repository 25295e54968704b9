//===- Decompose.cpp - attn.attention -> dense components -----------------===//
//
// attn-decompose: replaces attn.attention by init_state, one attn.component
// per component of its pattern (attn::decompose in lib/Pattern), and finalize;
// and attn.attention_grad by grad_init and one attn.component_grad per
// component (the same components: their gradients add up). All at tensor level; shapes of the state follow the query's, dynamic sizes
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
    SmallVector<AttentionGradOp> grads;
    getOperation()->walk([&](AttentionGradOp op) { grads.push_back(op); });
    for (AttentionGradOp op : grads)
      rewrite(op);
  }

  void rewrite(AttentionGradOp op) {
    OpBuilder b(op);
    Location loc = op.getLoc();
    auto qType = op.getQuery().getType();
    Value delta = emptyLike(b, loc, op.getQuery(), qType.getShape().drop_back(),
                            b.getF32Type());
    auto gradLike = [&](Value input) {
      auto t = cast<RankedTensorType>(input.getType());
      return emptyLike(b, loc, input, t.getShape(), t.getElementType());
    };
    Value dq = gradLike(op.getQuery()), dk = gradLike(op.getKey()),
          dv = gradLike(op.getValue());
    auto init = GradInitOp::create(
        b, loc, TypeRange{delta.getType(), dq.getType(), dk.getType(), dv.getType()},
        op.getOutput(), op.getGradOutput(), delta, dq, dk, dv);
    delta = init.getResult(0);
    SmallVector<Value> grads{init.getResult(1), init.getResult(2),
                             init.getResult(3)};
    SmallVector<Type> gradTypes{dq.getType(), dk.getType(), dv.getType()};

    FloatAttr scale = b.getF64FloatAttr(op.getEffectiveScale());
    for (ComponentAttr component : decompose(op.getPattern())) {
      auto c = ComponentGradOp::create(
          b, loc, gradTypes, op.getQuery(), op.getKey(), op.getValue(),
          op.getGradOutput(), op.getLse(), delta,
          component.getUseLengths() || component.hasFilters() ? op.getLengths()
                                                              : Value(),
          op.getKeyBias(), grads[0], grads[1], grads[2],
          /*origins=*/ValueRange{}, component, scale);
      grads.assign(c.getResults().begin(), c.getResults().end());
      ++numComponents;
    }
    op->replaceAllUsesWith(grads);
    op->erase();
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
