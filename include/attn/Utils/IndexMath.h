//===- IndexMath.h - terse index arithmetic for the attn passes -*- C++ -*-===//
//
// A builder wrapper for the closed-form index expressions of the tile
// schedules, the kernels and the pattern predicates (`index`-typed arith ops
// and i1 logic), so that the code reads like the formulas in its comments.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_UTILS_INDEXMATH_H
#define ATTN_UTILS_INDEXMATH_H

#include "mlir/Dialect/Arith/IR/Arith.h"
#include "mlir/IR/Builders.h"

namespace mlir::attn {

struct IndexMath {
  OpBuilder &b;
  Location loc;

  Value c(int64_t v) { return arith::ConstantIndexOp::create(b, loc, v); }
  Value add(Value x, Value y) { return arith::AddIOp::create(b, loc, x, y); }
  Value sub(Value x, Value y) { return arith::SubIOp::create(b, loc, x, y); }
  Value mul(Value x, Value y) { return arith::MulIOp::create(b, loc, x, y); }
  Value min(Value x, Value y) { return arith::MinSIOp::create(b, loc, x, y); }
  Value max(Value x, Value y) { return arith::MaxSIOp::create(b, loc, x, y); }
  Value ceilDiv(Value x, Value y) {
    return arith::CeilDivSIOp::create(b, loc, x, y);
  }
  Value floorDiv(Value x, Value y) {
    return arith::FloorDivSIOp::create(b, loc, x, y);
  }
  Value floorDiv(Value x, int64_t y) { return floorDiv(x, c(y)); }
  /// x - floor(x / y) * y, in [0, y) for y > 0.
  Value floorMod(Value x, int64_t y) {
    return sub(x, mul(floorDiv(x, y), c(y)));
  }

  Value cmp(arith::CmpIPredicate p, Value x, Value y) {
    return arith::CmpIOp::create(b, loc, p, x, y);
  }
  Value lt(Value x, Value y) { return cmp(arith::CmpIPredicate::slt, x, y); }
  Value le(Value x, Value y) { return cmp(arith::CmpIPredicate::sle, x, y); }
  Value eq(Value x, Value y) { return cmp(arith::CmpIPredicate::eq, x, y); }
  Value ne(Value x, Value y) { return cmp(arith::CmpIPredicate::ne, x, y); }

  // i1 logic.
  Value both(Value x, Value y) { return arith::AndIOp::create(b, loc, x, y); }
  Value either(Value x, Value y) { return arith::OrIOp::create(b, loc, x, y); }
  Value negate(Value x) {
    return arith::XOrIOp::create(b, loc, x, truth(true));
  }
  Value truth(bool v) {
    return arith::ConstantIntOp::create(b, loc, b.getI1Type(), v ? 1 : 0);
  }
};

} // namespace mlir::attn

#endif // ATTN_UTILS_INDEXMATH_H
