//===- TilePairs.h - the pairs of one tile, for the CPU lowerings -*- C++ -*-===//
//
// attn-fuse-online-softmax (attn.tile_update) and attn-lower-grad
// (attn.tile_grad) both walk the pairs of one block of a component's group and
// need the same facts about them: which row and key a block index names, the
// score s_ij = scale * q_i . k_j (+ key_bias[b, j]) and, in masked blocks,
// whether the pair belongs to the component at all (band, include and
// exclude filters, at the positions the origins give). TilePairs emits that
// code once for both, and the loop helpers both use.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_LIB_TRANSFORMS_TILEPAIRS_H
#define ATTN_LIB_TRANSFORMS_TILEPAIRS_H

#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "attn/Dialect/Attn/IR/AttnOrigins.h"
#include "attn/Utils/FloatMath.h"
#include "attn/Utils/IndexMath.h"

#include "mlir/Dialect/SCF/IR/SCF.h"

namespace mlir::attn {

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

class TilePairs {
public:
  /// The block of `comp`'s group at `base` (positions base + period * t) of
  /// batch `batch` and query head `head`. `keyIds`, `lengths` and `keyBias`
  /// may be null.
  TilePairs(OpBuilder &b, Location loc, ComponentAttr comp, Value query,
            Value key, Value lengths, Value keyBias, Value keyIds, Value batch,
            Value head, Value base, ValueRange origins, double scale,
            bool masked);

  /// Query row index i of block index t_q.
  Value rowIndex(Value tq);
  /// Key index j of block index t_k.
  Value keyIndex(Value tk);
  /// Where key j's vectors are in `key` and `value`: (batch, row); with
  /// key_ids row key_ids[b, j] of the tables' batch 0.
  std::pair<Value, Value> keyRow(Value j);
  /// The score of row i (block index t_q) and key j (block index t_k):
  /// -inf for a pair outside the component (masked blocks only test it).
  Value score(Value tq, Value i, Value tk, Value j);

  Value kvHead() const { return g; }
  Value headDim() const { return d; }

private:
  OpBuilder &b;
  Location loc;
  FloatMath f;
  IndexMath m;
  ComponentAttr comp;
  Value q, k, keyBias, keyIds, bIdx, h, base, r;
  Value g, d, scale, length;
  Placement at;
  Value predQLen, predKLen;
  bool masked;
};

} // namespace mlir::attn

#endif // ATTN_LIB_TRANSFORMS_TILEPAIRS_H
