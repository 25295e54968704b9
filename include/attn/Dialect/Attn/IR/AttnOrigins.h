//===- AttnOrigins.h - where a component's rows and keys sit ----*- C++ -*-===//
//
// The optional `origins` operands of attn.component and attn.tile_update,
// decoded in one place for the passes that lower them:
//   (q_origin, k_origin): query row i at position q_origin + i, key j at
//       k_origin + j, for the component's groups and bands, for `lengths`
//       and for filters (a rank's contiguous slice in ring attention);
//   (q_origin, k_origin, q_pos, k_pos, stride): the groups and bands use the
//       origins, `lengths` and filters see row i at q_pos + stride * i and key
//       j at k_pos + stride * j (the striped ring layout: local components on
//       origins 0, global positions rank + ranks * index).
// Without origins, row i sits at i + Lk - Lq and key j at j.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_DIALECT_ATTN_IR_ATTNORIGINS_H
#define ATTN_DIALECT_ATTN_IR_ATTNORIGINS_H

#include "attn/Utils/IndexMath.h"

#include "mlir/Dialect/MemRef/IR/MemRef.h"

namespace mlir::attn {

/// The number of keys Lk: the rows of `key` [B, Hkv, Lk, D], or with
/// `keyIds` [B, Lk] (key and value are then tables [1, Hkv, V, D]) its
/// columns.
inline Value keyCount(OpBuilder &b, Location loc, Value key, Value keyIds) {
  return keyIds ? memref::DimOp::create(b, loc, keyIds, 1).getResult()
                : memref::DimOp::create(b, loc, key, 2).getResult();
}

struct Placement {
  bool hasOrigins = false;
  Value qOrigin, kOrigin; ///< groups and bands
  Value qPos, kPos, stride; ///< lengths and filters (with origins only)

  static Placement decode(IndexMath &m, ValueRange origins, Value qLen,
                          Value kLen) {
    Placement p;
    p.hasOrigins = !origins.empty();
    p.qOrigin = p.hasOrigins ? origins[0] : m.sub(kLen, qLen);
    p.kOrigin = p.hasOrigins ? origins[1] : m.c(0);
    const bool positions = origins.size() == 5;
    p.qPos = positions ? origins[2] : p.qOrigin;
    p.kPos = positions ? origins[3] : p.kOrigin;
    p.stride = positions ? origins[4] : m.c(1);
    return p;
  }
};

} // namespace mlir::attn

#endif // ATTN_DIALECT_ATTN_IR_ATTNORIGINS_H
