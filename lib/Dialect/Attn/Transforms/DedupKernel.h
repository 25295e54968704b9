//===- DedupKernel.h - the unique ids of token sequences, on the GPU -*- C++ -*-===//
//
// GPU packages with key_ids (tokenized attention over unique ids,
// docs/Tokenized.md) carry three more kernels, the dedup kernels, which turn
// a batch of token sequences into what their attention call takes: each
// sequence's unique ids in ascending order, their log(count) biases, and
// each position's slot among them. convert-attn-to-gpu emits them beside
// the attention kernels; the runtime runs them through
// attn_package_dedup_keys.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_LIB_TRANSFORMS_DEDUPKERNEL_H
#define ATTN_LIB_TRANSFORMS_DEDUPKERNEL_H

#include "mlir/Dialect/GPU/IR/GPUDialect.h"

namespace mlir::attn {

/// Threads of a dedup block.
constexpr int64_t kDedupThreads = 1024;

/// Ids a dedup_sort_chunks block sorts (and dedup_merge_chunks ranks), one
/// per thread; sequences of at most this many ids skip both kernels.
constexpr int64_t kDedupChunkLog = 10;
constexpr int64_t kDedupChunk = int64_t(1) << kDedupChunkLog;

/// The kernels' names (also their manifest kinds), in launch order.
constexpr const char *kDedupSortChunks = "dedup_sort_chunks";
constexpr const char *kDedupMergeChunks = "dedup_merge_chunks";
constexpr const char *kDedupKeys = "dedup_keys";

/// Bytes of shared memory a dedup_keys block of sort size `p` (a power of
/// two, at least the sequence length) takes: an i64 id and an i32 position
/// per element, then one i32 per warp.
constexpr int64_t dedupSharedBytes(int64_t p) {
  return p * 12 + (kDedupThreads / 32) * 4;
}

/// Emits the three dedup kernels at b's insertion point (inside a
/// gpu.module) and returns their names in launch order. Each takes the
/// same arguments, all global memrefs of B * L (or B * 4) elements, then
/// two scalars:
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
/// dedup_sort_chunks and dedup_merge_chunks run only where P > kDedupChunk,
/// on a grid of (ceil(L / kDedupChunk), B) blocks, and use keyIds, keyBias
/// and slotAt as scratch; dedup_keys runs on B blocks (sorting a sequence
/// of one chunk itself) and writes the outputs. Together they sort each
/// sequence's ids (carrying each id's position), number the runs of equal
/// ids, and write one entry per run and per position. Deterministic: the
/// slots follow the ids' order.
ArrayAttr emitDedupKernels(OpBuilder &b, Location loc, int64_t maxLen);

} // namespace mlir::attn

#endif // ATTN_LIB_TRANSFORMS_DEDUPKERNEL_H
