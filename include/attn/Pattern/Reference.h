//===- Reference.h - double-precision reference attention ------*- C++ -*-===//
//
// The oracle of every backend: attention computed in double precision by
// evaluating m(h, i, j) for every pair, exactly as docs/Semantics.md states.
// Quadratic and slow by design; it must stay obviously right.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_PATTERN_REFERENCE_H
#define ATTN_PATTERN_REFERENCE_H

#include "mlir/IR/Attributes.h"

#include <cstdint>
#include <vector>

namespace mlir::attn {

struct ReferenceShape {
  int64_t batch, heads, kvHeads, qLen, kLen, headDim;
};

/// q is [B,H,Lq,D], k and v [B,Hkv,Lk,D], all contiguous; `lengths` has B
/// entries or is empty. Writes out [B,H,Lq,D] and lse [B,H,Lq].
void referenceAttention(Attribute pattern, double scale,
                        const ReferenceShape &shape, const float *q,
                        const float *k, const float *v,
                        const std::vector<int64_t> &lengths,
                        std::vector<double> &out, std::vector<double> &lse);

} // namespace mlir::attn

#endif // ATTN_PATTERN_REFERENCE_H
