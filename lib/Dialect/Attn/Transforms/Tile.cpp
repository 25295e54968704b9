//===- Tile.cpp - closed-form tile schedules for components ---------------===//
//
// attn-tile: each memref attn.component becomes loops over batch b, head h,
// residue class c, segment s and row tile; a group (s, c) holds positions
// base + r*t with base = s*w + c. For a row tile t_q in [q0, q1) the keys of
// the band lo <= t_q - t_k <= hi are
//
//     t_k in [max(kLo, q0 - hi), min(kHi, q1 - lo))          (any row)
//     t_k in [q1 - 1 - hi, q0 - lo]                           (every row)
//
// The second range needs no mask; the rest of the first is the band's two
// edges, updated by masked tile_updates. Components with include/exclude
// filters mask every tile. Only index arithmetic: no mask tensor, and the same
// code for every sequence length (lengths[b] clips the row and key ranges).
// Rows and keys sit at positions origin + index: the component's `origins`
// (a rank's slice of the sequence) or the bottom-right alignment (Lk - Lq, 0).
// attn.component_grad gets the same loops, of attn.tile_grad.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Dialect/Attn/IR/AttnOrigins.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Pattern/Pattern.h"
#include "attn/Utils/IndexMath.h"

namespace mlir::attn {
#define GEN_PASS_DEF_ATTNTILE
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

namespace {

/// Emits `for i in [lb, ub) step s { body(i) }` and returns with the builder
/// after the loop.
template <typename Fn>
void forLoop(OpBuilder &b, Location loc, Value lb, Value ub, Value step,
             Fn body) {
  auto loop = scf::ForOp::create(b, loc, lb, ub, step);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(loop.getBody());
  body(loop.getInductionVar());
}

struct AttnTilePass : public mlir::attn::impl::AttnTileBase<AttnTilePass> {
  using AttnTileBase::AttnTileBase;

  void runOnOperation() override {
    if (qTile < 1 || kvTile < 1) {
      getOperation()->emitError("attn-tile: tile sizes must be >= 1");
      return signalPassFailure();
    }
    SmallVector<Operation *> ops;
    getOperation()->walk([&](Operation *op) {
      if (isa<ComponentOp, ComponentGradOp>(op) && op->getNumResults() == 0)
        ops.push_back(op);
    });
    for (Operation *op : ops) {
      if (auto c = dyn_cast<ComponentOp>(op))
        tile(c);
      else
        tile(cast<ComponentGradOp>(op));
      op->erase();
      ++numTiledComponents;
    }
  }

  void tile(ComponentOp op) {
    OpBuilder b(op);
    TypedAttr maxKeys = b.getI64IntegerAttr(kvTile);
    schedule(b, op.getLoc(), op.getComponent(), op.getQuery(), op.getKey(),
             op.getKeyIds(), op.getLengths(), op.getOrigins(),
             [&](Value bIdx, Value hIdx, Value base, Value q0, Value q1,
                 Value k0, Value k1, bool masked) {
               TileUpdateOp::create(
                   b, op.getLoc(), op.getQuery(), op.getKey(), op.getValue(),
                   op.getLengths(), op.getKeyBias(), op.getKeyIds(),
                   op.getAcc(), op.getMax(), op.getSum(), bIdx, hIdx, base,
                   q0, q1, k0, k1, op.getOrigins(), op.getComponent(),
                   op.getScaleAttr(), cast<IntegerAttr>(maxKeys),
                   masked ? b.getUnitAttr() : UnitAttr());
             });
  }

  void tile(ComponentGradOp op) {
    OpBuilder b(op);
    schedule(b, op.getLoc(), op.getComponent(), op.getQuery(), op.getKey(),
             /*keyIds=*/Value(), op.getLengths(), op.getOrigins(),
             [&](Value bIdx, Value hIdx, Value base, Value q0, Value q1,
                 Value k0, Value k1, bool masked) {
               TileGradOp::create(
                   b, op.getLoc(), op.getQuery(), op.getKey(), op.getValue(),
                   op.getGradOutput(), op.getLse(), op.getDelta(),
                   op.getLengths(), op.getKeyBias(), op.getDq(), op.getDk(),
                   op.getDv(), bIdx, hIdx, base, q0, q1, k0, k1,
                   op.getOrigins(), op.getComponent(), op.getScaleAttr(),
                   masked ? b.getUnitAttr() : UnitAttr());
             });
  }

  /// Emits the component's loops at `b`, calling `emitTile(batch, head,
  /// group base, q0, q1, k0, k1, masked)` for each block of rows
  /// [q0, q1) and keys [k0, k1) of a group (indices t of positions
  /// base + period * t).
  template <typename EmitTile>
  void schedule(OpBuilder &b, Location loc, ComponentAttr comp, Value query,
                Value key, Value keyIds, Value lengths, ValueRange origins,
                EmitTile emitTile) {
    IndexMath m{b, loc};
    const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
    const int64_t lo = comp.getBandLo(), hi = comp.getBandHi();

    Value zero = m.c(0), one = m.c(1), r = m.c(comp.getPeriod());
    Value batch = memref::DimOp::create(b, loc, query, dims::kBatch);
    Value heads = memref::DimOp::create(b, loc, query, dims::kHeads);
    Value qLen = memref::DimOp::create(b, loc, query, dims::kRows);
    Value kLen = keyCount(b, loc, key, keyIds);
    // Query row i sits at position i + qOrigin, key j at j + kOrigin.
    Placement at = Placement::decode(m, origins, qLen, kLen);
    const bool hasOrigins = at.hasOrigins;
    Value qOrigin = at.qOrigin, kOrigin = at.kOrigin;

    auto emitKeyTiles = [&](Value bIdx, Value hIdx, Value base, Value q0,
                            Value q1, Value from, Value to, bool masked) {
      forLoop(b, loc, from, to, m.c(kvTile), [&](Value k0) {
        Value k1 = m.min(m.add(k0, m.c(kvTile)), to);
        emitTile(bIdx, hIdx, base, q0, q1, k0, k1, masked);
      });
    };

    // One group: rows at positions [rLo, rHi), keys at [kLo, kHi).
    auto emitGroup = [&](Value bIdx, Value hIdx, Value base, Value rLo,
                         Value rHi, Value kLo, Value kHi) {
      Value tRowLo = m.ceilDiv(m.sub(rLo, base), r);
      Value tRowHi = m.ceilDiv(m.sub(rHi, base), r);
      Value tKeyLo = m.ceilDiv(m.sub(kLo, base), r);
      Value tKeyHi = m.ceilDiv(m.sub(kHi, base), r);
      forLoop(b, loc, tRowLo, tRowHi, m.c(qTile), [&](Value q0) {
        Value q1 = m.min(m.add(q0, m.c(qTile)), tRowHi);
        // Keys attended by some row of the tile.
        Value first = hi == inf ? tKeyLo : m.max(tKeyLo, m.sub(q0, m.c(hi)));
        Value last = lo == ninf ? tKeyHi : m.min(tKeyHi, m.sub(q1, m.c(lo)));
        if (comp.hasFilters()) {
          emitKeyTiles(bIdx, hIdx, base, q0, q1, first, last, true);
          return;
        }
        // Keys attended by every row of the tile: no mask needed.
        Value fullLo = hi == inf
                           ? first
                           : m.max(first, m.sub(m.sub(q1, one), m.c(hi)));
        fullLo = m.min(fullLo, last);
        Value fullHi =
            lo == ninf ? last : m.min(last, m.add(m.sub(q0, m.c(lo)), one));
        fullHi = m.max(fullHi, fullLo);
        // An unbounded side of the band has no edge to mask.
        if (hi != inf)
          emitKeyTiles(bIdx, hIdx, base, q0, q1, first, fullLo, true);
        emitKeyTiles(bIdx, hIdx, base, q0, q1, fullLo, fullHi, false);
        if (lo != ninf)
          emitKeyTiles(bIdx, hIdx, base, q0, q1, fullHi, last, true);
      });
    };

    forLoop(b, loc, zero, batch, one, [&](Value bIdx) {
      // Rows [0, rowsEnd) and keys [0, keysEnd) lie within lengths[b]: row
      // indices (positions with origins) and key positions below it.
      Value rowsEnd = qLen, keysEnd = kLen;
      if (comp.getUseLengths()) {
        Value len = memref::LoadOp::create(b, loc, lengths, bIdx);
        len = arith::IndexCastOp::create(b, loc, b.getIndexType(), len);
        // Row i is inside when q_pos + stride * i < len (key j likewise).
        Value rowLen = hasOrigins ? m.ceilDiv(m.sub(len, at.qPos), at.stride)
                                  : len;
        rowsEnd = m.min(qLen, m.max(rowLen, zero));
        Value keyLen = m.ceilDiv(m.sub(len, at.kPos), at.stride);
        keysEnd = m.min(kLen, m.max(keyLen, zero));
      }
      Value rowPosLo = qOrigin, rowPosHi = m.add(qOrigin, rowsEnd);
      Value keyPosLo = kOrigin, keyPosHi = m.add(kOrigin, keysEnd);
      forLoop(b, loc, zero, heads, one, [&](Value hIdx) {
        Value cLo, cHi;
        if (comp.getResidue() == ComponentAttr::kAllResidues) {
          cLo = zero;
          cHi = r;
        } else {
          Value valid = m.truth(true);
          if (comp.getResidue() == ComponentAttr::kHeadResidue)
            std::tie(cLo, valid) = buildHeadClass(b, loc, comp, hIdx);
          else
            cLo = m.c(comp.getResidue());
          // A head outside a general head residue has no class: empty loop.
          cHi = arith::SelectOp::create(b, loc, valid, m.add(cLo, one), cLo);
        }
        forLoop(b, loc, cLo, cHi, one, [&](Value c) {
          if (comp.getSegment() == 0) {
            emitGroup(bIdx, hIdx, c, rowPosLo, rowPosHi, keyPosLo, keyPosHi);
            return;
          }
          Value w = m.c(comp.getSegment());
          Value sLo = m.floorDiv(rowPosLo, w);
          Value sHi = m.add(m.floorDiv(m.sub(rowPosHi, one), w), one);
          forLoop(b, loc, sLo, sHi, one, [&](Value s) {
            Value segLo = m.mul(s, w), segHi = m.add(segLo, w);
            emitGroup(bIdx, hIdx, m.add(segLo, c), m.max(rowPosLo, segLo),
                      m.min(rowPosHi, segHi), m.max(keyPosLo, segLo),
                      m.min(keyPosHi, segHi));
          });
        });
      });
    });
  }
};
} // namespace
