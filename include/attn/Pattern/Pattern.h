//===- Pattern.h - evaluate and decompose attention patterns ---*- C++ -*-===//
//
// The pattern library: the plain evaluation of m(h, i, j) for any pattern
// attribute (docs/Semantics.md), its decomposition into dense components, and
// the same predicates built as IR for the kernels' masked tiles. The plain
// evaluation is the oracle of every test, so it is written straight from the
// definitions and knows nothing of components or tiles.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_PATTERN_PATTERN_H
#define ATTN_PATTERN_PATTERN_H

#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "mlir/IR/Builders.h"

#include <cstdint>

namespace mlir::attn {

/// One query/key pair of one head in one sequence.
struct PairPosition {
  int64_t head = 0;
  int64_t row = 0;    ///< query row i, 0-based
  int64_t key = 0;    ///< key row j, 0-based
  int64_t qLen = 0;   ///< Lq
  int64_t kLen = 0;   ///< Lk
  int64_t length = -1; ///< lengths[b] for tokenized patterns, -1 if none
};

/// Floor division and modulus (rounding towards -inf), as the semantics use.
inline int64_t floorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
inline int64_t floorMod(int64_t a, int64_t b) { return a - floorDiv(a, b) * b; }
inline int64_t ceilDiv(int64_t a, int64_t b) { return -floorDiv(-a, b); }

/// m(h, i, j) of `pattern`, straight from the definitions.
int64_t multiplicity(Attribute pattern, const PairPosition &pos);

/// Whether the pair belongs to `component` (its group, band, lengths and
/// filters), evaluated directly.
bool componentContains(ComponentAttr component, const PairPosition &pos);

/// Splits `pattern` into components whose memberships add up to its
/// multiplicity: sum(componentContains(c, pos)) == multiplicity(pattern, pos).
SmallVector<ComponentAttr> decompose(Attribute pattern);

/// Builds IR for ComponentAttr::classOfHead: the residue class of head
/// `head` (index) and an i1 that is false when the head has no pairs.
/// Only for a head residue.
std::pair<Value, Value> buildHeadClass(OpBuilder &b, Location loc,
                                       ComponentAttr component, Value head);

/// Builds IR computing `multiplicity(pattern, pos) > 0` as an i1. All values
/// are `index`; `length` may be null when the pattern reads no lengths.
Value buildPatternPredicate(OpBuilder &b, Location loc, Attribute pattern,
                            Value head, Value row, Value key, Value qLen,
                            Value kLen, Value length);

/// Builds IR for a conservative test on a tile: an i1 that is false only if
/// no pair with position p in [pLo, pHi] and key j in [jLo, jHi] can be in
/// `pattern` (positions as in buildPatternPredicate, p = i + Lk - Lq). It
/// lets a kernel skip a filter's per-element predicate on tiles the filter
/// cannot reach; where it cannot tell (tokenized, full) it is true.
Value buildPatternMayHitTile(OpBuilder &b, Location loc, Attribute pattern,
                             Value pLo, Value pHi, Value jLo, Value jHi);

} // namespace mlir::attn

#endif // ATTN_PATTERN_PATTERN_H
