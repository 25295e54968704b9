//===- AttnDims.h - names of the attention dimensions ----------*- C++ -*-===//
//
// One place naming the dimensions of the attention operands, used by every
// pass: query/output [B, H, Lq, D], key/value [B, Hkv, Lk, D], state and LSE
// [B, H, Lq].
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_DIALECT_ATTN_IR_ATTNDIMS_H
#define ATTN_DIALECT_ATTN_IR_ATTNDIMS_H

namespace mlir::attn::dims {
/// Dimension indices of query, key, value, output and accumulator.
enum : unsigned { kBatch = 0, kHeads = 1, kRows = 2, kHeadDim = 3 };
/// Rank of query/key/value/output/acc, and of max/sum/LSE.
constexpr unsigned kTensorRank = 4;
constexpr unsigned kRowStateRank = 3;
} // namespace mlir::attn::dims

#endif // ATTN_DIALECT_ATTN_IR_ATTNDIMS_H
