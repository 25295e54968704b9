//===- DedupKernel.h - the unique ids of token sequences, on the GPU -*- C++ -*-===//
//
// GPU packages with key_ids (tokenized attention over unique ids,
// docs/Tokenized.md) carry one more kernel, `dedup_keys`, which turns a batch
// of token sequences into what their attention call takes: each sequence's
// unique ids in ascending order, their log(count) biases, and each position's
// slot among them. convert-attn-to-gpu emits it beside the attention
// kernels; the runtime runs it through attn_package_dedup_keys.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_LIB_TRANSFORMS_DEDUPKERNEL_H
#define ATTN_LIB_TRANSFORMS_DEDUPKERNEL_H

#include "mlir/Dialect/GPU/IR/GPUDialect.h"

namespace mlir::attn {

/// Threads of a dedup_keys block (one block a sequence).
constexpr int64_t kDedupThreads = 1024;

/// Bytes of shared memory a dedup_keys block of sort size `p` (a power of
/// two, at least the sequence length) takes: an i64 id and an i32 position
/// per element, then one i32 per warp.
constexpr int64_t dedupSharedBytes(int64_t p) {
  return p * 12 + (kDedupThreads / 32) * 4;
}

/// Emits the dedup_keys kernel at b's insertion point (inside a
/// gpu.module). Its arguments, all global memrefs of B * L (or B * 4)
/// elements, then two scalars:
///
///   tokens  i64 [B, L]   the ids of each sequence
///   lengths i64 [B]      its length (clamped to [0, L])
///   keyIds  i32 [B, L]   out: its unique ids ascending, 0 past them
///   keyBias f32 [B, L]   out: log(count) of each, -inf past them
///   slotAt  i64 [B, L]   out: each position's slot (index into keyIds),
///                        -1 past the length
///   info    i64 [B, 4]   out: unique ids, the length as given, the
///                        smallest and the largest id (0, 0 when empty)
///   L, logP              the sort size P = 2^logP >= L (P <= maxLen)
///
/// Block b sorts sequence b's ids in shared memory (a bitonic network,
/// carrying each id's position), numbers the runs of equal ids with a
/// block-wide prefix sum, and writes one entry per run and per position.
/// Deterministic: the slots follow the ids' order.
gpu::GPUFuncOp emitDedupKeysKernel(OpBuilder &b, Location loc,
                                   int64_t maxLen);

} // namespace mlir::attn

#endif // ATTN_LIB_TRANSFORMS_DEDUPKERNEL_H
